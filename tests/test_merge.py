import pytest
import torch
from torch import nn

from gossipfl import models
from gossipfl.algorithms.merge import Merger, VarianceCorrection, weighted_mean
from gossipfl.params import FlatModel


def xavier_mlp(seed):
    torch.manual_seed(seed)
    net = models.build("mlp", (1, 16, 16), 10, hidden=[256, 128])
    for m in net.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight)
    return FlatModel(net)


def weight_variances(flat, vector):
    return [float(vector[e.offset:e.offset + e.numel].var(unbiased=False))
            for e in flat.layout.entries if e.kind == "param" and len(e.shape) == 2]


def test_weighted_mean_renormalises_over_what_arrived():
    a, b = torch.full((4,), 1.0), torch.full((4,), 4.0)
    out = torch.empty(4)
    weighted_mean([a, b], [0.5, 0.25], out)
    assert torch.allclose(out, torch.full((4,), 2.0))


def test_variance_correction_leaves_identical_inputs_unchanged():
    flat = xavier_mlp(0)
    merger = Merger(flat.layout, "variance_corrected")
    own = flat.vector.clone()
    before = own.clone()
    merger(own, 0.5, [before.clone(), before.clone()], [0.25, 0.25])
    torch.testing.assert_close(own, before, rtol=0, atol=1e-6)


@pytest.mark.parametrize("target", ["follow_others", "follow_self", "conservative"])
def test_variance_correction_keeps_each_tensor_mean_and_hits_the_target(target):
    models_ = [xavier_mlp(s).vector * (1 + s) for s in range(3)]  # different variances per model
    layout = xavier_mlp(0).layout
    vc = VarianceCorrection(layout, target, c=0.3, eps=0.0)
    weights = [0.5, 0.3, 0.2]
    mixed = weighted_mean(models_, weights, torch.empty_like(models_[0]))
    plain_mean, plain_var = vc.stats(mixed)
    expected = {
        "follow_others": sum(w * vc.stats(v)[1] for v, w in zip(models_, weights)),
        "follow_self": vc.stats(models_[0])[1],
        "conservative": plain_var + 0.3 * (sum(w * vc.stats(v)[1] for v, w in zip(models_, weights)) - plain_var),
    }[target]
    vc(mixed, models_, weights, models_[0])
    mean, var = vc.stats(mixed)
    torch.testing.assert_close(mean, plain_mean, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(var, expected, rtol=1e-4, atol=0)


def test_variance_correction_skips_scalars_norm_layers_and_buffers():
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 1))
    flat = FlatModel(net)
    vc = VarianceCorrection(flat.layout)
    kinds = {e.name: e.kind for e in flat.layout.entries}
    assert kinds["1.weight"] == "norm" and kinds["1.running_mean"] == "buffer"
    # corrected: 0.weight, 0.bias, 2.weight; not 2.bias (one element), the norm layer or buffers
    covered = set(vc.index.tolist())
    for e in flat.layout.entries:
        inside = set(range(e.offset, e.offset + e.numel)) <= covered
        assert inside == (e.name in {"0.weight", "0.bias", "2.weight"}), e.name


def test_averaging_independent_xavier_models_shrinks_variance_and_correction_restores_it():
    k = 8
    flats = [xavier_mlp(seed) for seed in range(k)]
    vectors = [f.vector.clone() for f in flats]
    layout = flats[0].layout
    start = weight_variances(flats[0], vectors[0])

    def merged(rule, **kw):
        own = vectors[0].clone()
        Merger(layout, rule, **kw)(own, 1.0, vectors[1:], [1.0] * (k - 1))
        return weight_variances(flats[0], own)

    for before, after in zip(start, merged("mean")):
        assert after == pytest.approx(before / k, rel=0.1)
    for before, after in zip(start, merged("variance_corrected", eps=0.0)):
        assert after == pytest.approx(before, rel=0.02)
    # the paper's eps = 1e-4 pulls the scale towards 1 for layers whose variance is near eps
    for before, after in zip(start, merged("variance_corrected")):
        assert 0.8 * before < after <= before


def test_merger_without_neighbours_keeps_own_vector():
    flat = xavier_mlp(0)
    own = flat.vector.clone()
    Merger(flat.layout, "variance_corrected")(own, 0.4, [], [])
    assert torch.equal(own, flat.vector)
