import pytest
import torch
from torch import nn

from gossipfl import models
from gossipfl.algorithms.merge import Merger, VarianceCorrection, correctable, keep_finite, weighted_mean
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


def rows(*vectors):
    return [v.view(1, -1) for v in vectors]  # one node's received vectors


def test_weighted_mean_renormalises_over_what_arrived():
    own = torch.full((2, 4), 1.0)
    received = torch.stack([torch.full((2, 1, 4), 4.0), torch.full((2, 1, 4), 100.0)], dim=1).squeeze(2)
    weights = torch.tensor([[0.5, 0.25, 0.0], [0.5, 0.25, 0.25]], dtype=torch.float64)  # node 0 misses a sender
    out = weighted_mean(own, received.unbind(1), weights, torch.empty(2, 4))
    torch.testing.assert_close(out[0], torch.full((4,), 2.0))
    torch.testing.assert_close(out[1], torch.full((4,), (0.5 + 1.0 + 25.0) / 1.0))


def test_variance_correction_leaves_identical_inputs_unchanged():
    flat = xavier_mlp(0)
    own = flat.vector.view(1, -1)
    out = Merger(flat.layout, "variance_corrected")(own, rows(own[0], own[0]),
                                                    torch.tensor([[0.5, 0.25, 0.25]], dtype=torch.float64),
                                                    torch.empty_like(own))
    torch.testing.assert_close(out, own, rtol=0, atol=1e-6)


@pytest.mark.parametrize("target", ["follow_others", "follow_self", "conservative"])
def test_variance_correction_keeps_each_tensor_mean_and_hits_the_target(target):
    vectors = [xavier_mlp(s).vector * (1 + s) for s in range(3)]  # different variances per model
    layout = xavier_mlp(0).layout
    vc = VarianceCorrection(layout, target, c=0.3, eps=0.0)
    weights = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64)
    own = vectors[0].view(1, -1)
    mixed = weighted_mean(own, rows(*vectors[1:]), weights, torch.empty_like(own))
    plain_mean, plain_var = vc.moments(mixed)
    variances = [vc.moments(v.view(1, -1))[1] for v in vectors]
    others = sum(w * v for w, v in zip(weights[0].tolist(), variances))
    expected = {"follow_others": others, "follow_self": variances[0],
                "conservative": plain_var + 0.3 * (others - plain_var)}[target]
    vc.correct(mixed, own, rows(*vectors[1:]), weights)
    mean, var = vc.moments(mixed)
    torch.testing.assert_close(mean, plain_mean, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(var, expected, rtol=1e-4, atol=0)


def test_variance_correction_skips_scalars_norm_layers_and_buffers():
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 1))
    flat = FlatModel(net)
    kinds = {e.name: e.kind for e in flat.layout.entries}
    assert kinds["1.weight"] == "norm" and kinds["1.running_mean"] == "buffer"
    # corrected: 0.weight, 0.bias, 2.weight; not 2.bias (one element), the norm layer or buffers
    covered = {i for s in correctable(flat.layout) for i in range(s.start, s.stop)}
    for e in flat.layout.entries:
        inside = set(range(e.offset, e.offset + e.numel)) <= covered
        assert inside == (e.name in {"0.weight", "0.bias", "2.weight"}), e.name


def test_averaging_independent_xavier_models_shrinks_variance_and_correction_restores_it():
    k = 8
    flats = [xavier_mlp(seed) for seed in range(k)]
    vectors = [f.vector.clone() for f in flats]
    start = weight_variances(flats[0], vectors[0])

    def merged(rule, **kw):
        own = vectors[0].view(1, -1)
        out = Merger(flats[0].layout, rule, **kw)(own, rows(*vectors[1:]), torch.ones(1, k, dtype=torch.float64),
                                                  torch.empty_like(own))
        return weight_variances(flats[0], out[0])

    for before, after in zip(start, merged("mean")):
        assert after == pytest.approx(before / k, rel=0.1)
    for before, after in zip(start, merged("variance_corrected", eps=0.0)):
        assert after == pytest.approx(before, rel=0.02)
    # the paper's eps = 1e-4 pulls the scale towards 1 for layers whose variance is near eps
    for before, after in zip(start, merged("variance_corrected")):
        assert 0.8 * before < after <= before


@pytest.mark.parametrize("rule", ["mean", "variance_corrected"])
def test_merging_many_nodes_at_once_equals_merging_each_alone(rule):
    """The vectorized engine merges chunks of nodes; a Node merges a batch of one."""
    vectors = torch.stack([xavier_mlp(s).vector * (1 + 0.1 * s) for s in range(5)])
    merger = Merger(xavier_mlp(0).layout, rule)
    own, received = vectors[:3], torch.stack([vectors[[1, 2]], vectors[[3, 4]], vectors[[0, 4]]]).unbind(1)
    weights = torch.tensor([[0.4, 0.3, 0.3], [0.5, 0.5, 0.0], [0.2, 0.2, 0.6]], dtype=torch.float64)
    together = merger(own, received, weights, torch.empty_like(own))
    for b in range(3):
        alone = merger(own[b:b + 1], [r[b:b + 1] for r in received], weights[b:b + 1], torch.empty_like(own[b:b + 1]))
        torch.testing.assert_close(together[b], alone[0], rtol=0, atol=0)


def test_merger_without_neighbours_keeps_own_vector():
    flat = xavier_mlp(0)
    own = flat.vector.view(1, -1)
    out = Merger(flat.layout, "variance_corrected")(own, [],
                                                    torch.tensor([[0.4]], dtype=torch.float64), torch.empty_like(own))
    assert torch.equal(out, own)


def test_keep_finite_rolls_back_only_the_rows_that_are_not_finite():
    old = torch.arange(12.0).view(3, 4)
    new = old + 100
    new[1, 2] = float("nan")
    new[2, 0] = float("inf")
    assert keep_finite(new, old) == 2
    assert torch.equal(new[0], old[0] + 100) and torch.equal(new[1:], old[1:])
    huge = torch.full((1, 4), 3e38)  # each finite, their sum is not: the exact check decides
    assert keep_finite(huge, old[:1]) == 0 and float(huge[0, 0]) == pytest.approx(3e38)
