import math

import pytest
import torch
from torch import nn

from gossipfl.algorithms.merge import Merger, weighted_mean
from gossipfl.algorithms.robust import (FILTERS, Balance, Bristle, ClippedGossip, CoordinateMedian, FilterContext,
                                        FilterInput, Krum, TrimmedMean, bristle_weights, class_rows,
                                        recall_per_class, resolve_filter, sorting_network)
from gossipfl.params import FlatModel, StackedModule

CLASSES, FEATURES, HIDDEN = 3, 4, 8


def call(rule, own, received, weights, **extra):
    b = own.shape[0]
    batch = FilterInput(torch.arange(b), own, list(received), torch.as_tensor(weights, dtype=torch.float64), **extra)
    return rule(batch)


def merged(out, own):
    """What the node's vector becomes: the plain merge of the filter's output."""
    return weighted_mean(own, out.received, out.weights, torch.empty_like(own))


# -- a real model and a real recall function for Bristle


def blobs(seed, n_per_class, classes=range(CLASSES)):
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[4.0, 0, 0, 0], [0, 4.0, 0, 0], [0, 0, 4.0, 0]])
    y = torch.tensor([c for c in classes for _ in range(n_per_class)])
    return centres[y] + torch.randn(len(y), FEATURES, generator=g), y


@pytest.fixture(scope="module")
def mlp():
    """A small MLP trained to near-perfect recall on three Gaussian blobs: (flat model, module)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES))
    x, y = blobs(1, 100)
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return FlatModel(net), net


def make_recall(module, layout, x_val, y_val):
    """recall(rows, models): each model's recall per class on node rows[b]'s validation split."""
    stacked = StackedModule(module, layout)

    def recall(rows, models):
        b, m, d = models.shape
        x = x_val[rows].repeat_interleave(m, dim=0)
        logits = stacked(models.reshape(b * m, d), x).view(b, m, x_val.shape[1], CLASSES)
        return recall_per_class(logits, y_val[rows][:, None])
    return recall


@pytest.fixture(scope="module")
def validation():
    """Validation splits of 4 nodes (20 examples each); node 3 has no class-2 examples."""
    splits = [blobs(10 + i, 7) for i in range(3)] + [blobs(13, 10, classes=(0, 1))]
    xs = torch.stack([x[:20] for x, _ in splits])
    ys = torch.stack([y[:20] for _, y in splits])
    return xs, ys


@pytest.fixture(scope="module")
def context(mlp, validation):
    flat, net = mlp
    return FilterContext(layout=flat.layout, rounds=10, seed=3, recall=make_recall(net, flat.layout, *validation))


def wrong_everywhere(flat):
    """The trained model with its class rows rotated: it predicts class c + 1 for class c."""
    rows = class_rows(flat.layout)
    bad = flat.vector.clone()
    bad[rows.flatten()] = flat.vector[rows.roll(1, dims=0).flatten()]
    return bad


def test_recall_per_class_counts_hits_per_class_and_is_nan_for_absent_classes():
    logits = torch.nn.functional.one_hot(torch.tensor([0, 0, 1, 1, 0]), 3).float()
    labels = torch.tensor([0, 1, 1, 1, -1])  # the last example is padding
    torch.testing.assert_close(recall_per_class(logits, labels)[:2], torch.tensor([1.0, 2 / 3], dtype=torch.float64))
    assert math.isnan(float(recall_per_class(logits, labels)[2]))


def test_the_trained_model_is_right_and_the_rotated_one_wrong_on_every_class(mlp, context):
    flat, _ = mlp
    models = torch.stack([flat.vector, wrong_everywhere(flat)])[None]
    recall = context.recall(torch.tensor([0]), models)[0]
    assert bool((recall[0] > 0.9).all()) and bool((recall[1] < 0.1).all())


@pytest.mark.parametrize("n", range(1, 41))
def test_the_sorting_network_sorts(n):
    pairs = sorting_network(n)
    assert all(0 <= i < j < n for i, j in pairs)
    # 0-1 principle: a comparator network sorts everything iff it sorts every 0/1 input
    inputs = (torch.arange(2**n)[:, None] >> torch.arange(n)) & 1 if n <= 14 else torch.randint(0, 100, (3000, n))
    columns = list(inputs.T.clone())
    for i, j in pairs:
        columns[i], columns[j] = torch.minimum(columns[i], columns[j]), torch.maximum(columns[i], columns[j])
    assert torch.equal(torch.stack(columns, dim=1), inputs.sort(dim=1).values)


# -- the rules the issue names


def spread(own, k, scale, seed):
    g = torch.Generator().manual_seed(seed)
    return [own + scale * torch.randn(own.shape, generator=g) for _ in range(k)]


def test_clipped_gossip_that_never_clips_is_plain_gossip():
    own = torch.randn(3, 50)
    received = spread(own, 4, 1.0, 0)
    weights = torch.tensor([[0.2] * 5, [0.4, 0.3, 0.1, 0.1, 0.1], [0.6, 0.1, 0.1, 0.1, 0.1]], dtype=torch.float64)
    for rule in (ClippedGossip(tau=1e9), ClippedGossip(delta=0.0)):
        out = call(rule, own, received, weights)
        assert all(a is b for a, b in zip(out.received, received)) and not bool(out.suspicion.any())
        assert torch.equal(merged(out, own), weighted_mean(own, received, weights, torch.empty_like(own)))


@pytest.mark.parametrize("magnitude", [0.5, 30.0, 1e30])
def test_a_byzantine_neighbour_moves_a_node_by_at_most_its_weight_times_tau(magnitude):
    own = torch.randn(1, 200)
    honest = spread(own, 3, 0.05, 1)
    byzantine = own + magnitude * torch.randn(1, 200, generator=torch.Generator().manual_seed(2))
    weights = torch.tensor([[0.2, 0.2, 0.2, 0.2, 0.2]], dtype=torch.float64)
    honest_pull = sum(0.2 * (x - own) for x in honest)
    # fixed tau: every honest sender lies within it
    out = call(ClippedGossip(tau=1.0), own, honest + [byzantine], weights)
    moved = merged(out, own) - own - honest_pull
    assert float(moved.norm()) <= 0.2 * 1.0 * (1 + 1e-4)
    # adaptive tau: with weights 0.2 and delta 0.1 the farthest sender is clipped to the distance
    # of the next one, here the farthest honest sender
    tau = max(float((x - own).norm()) for x in honest)
    out = call(ClippedGossip(delta=0.1), own, honest + [byzantine], weights)
    moved = merged(out, own) - own - honest_pull
    assert float(moved.norm()) <= 0.2 * tau * (1 + 1e-4)
    far = float((byzantine - own).norm()) > tau
    assert float(out.suspicion[0, 3]) == (pytest.approx(1 - tau / float((byzantine - own).norm())) if far else 0.0)
    assert not bool(out.suspicion[0, :3].any())


def test_trimmed_mean_with_nothing_trimmed_is_the_mean():
    own = torch.randn(2, 30)
    received = spread(own, 4, 1.0, 3)
    weights = torch.tensor([[0.2, 0.2, 0.2, 0.2, 0.2], [0.5, 0.3, 0.0, 0.1, 0.1]], dtype=torch.float64)
    for rule in (TrimmedMean(b=0), TrimmedMean(fraction=0.0)):
        out = call(rule, own, received, weights)
        result = merged(out, own)
        torch.testing.assert_close(result[0], torch.stack([own[0]] + [x[0] for x in received]).mean(0))
        torch.testing.assert_close(result[1], torch.stack([own[1]] + [received[k][1] for k in (0, 2, 3)]).mean(0))
        assert not bool(out.suspicion.any())


def test_trimmed_mean_drops_the_extremes_of_each_coordinate():
    own = torch.tensor([[0.0, 10.0]])
    received = [torch.tensor([[1.0, 11.0]]), torch.tensor([[2.0, 12.0]]), torch.tensor([[100.0, 13.0]]),
                torch.tensor([[-50.0, 14.0]])]
    out = call(TrimmedMean(b=1), own, received, torch.full((1, 5), 0.2))
    torch.testing.assert_close(merged(out, own), torch.tensor([[1.0, 12.0]]))  # (0+1+2)/3, (11+12+13)/3
    torch.testing.assert_close(out.suspicion, torch.tensor([[0.0, 0.0, 0.5, 1.0]], dtype=torch.float64))


def test_the_median_of_identical_inputs_is_that_input():
    own = torch.randn(2, 40)
    for k in (3, 4):
        out = call(CoordinateMedian(), own, [own.clone() for _ in range(k)], torch.full((2, k + 1), 1 / (k + 1)))
        assert torch.equal(merged(out, own), own) and not bool(out.suspicion.any())


def test_the_median_takes_the_middle_value_or_the_mean_of_the_two_middle_ones():
    own = torch.tensor([[0.0]])
    values = [torch.tensor([[v]]) for v in (5.0, -3.0, 100.0, 1.0)]
    out = call(CoordinateMedian(), own, values, torch.full((1, 5), 0.2))
    assert float(merged(out, own)) == 1.0  # sorted -3, 0, 1, 5, 100
    out = call(CoordinateMedian(), own, values, torch.tensor([[0.2, 0.2, 0.2, 0.0, 0.2]]))
    assert float(merged(out, own)) == 0.5  # 100 did not arrive: -3, 0, 1, 5
    assert out.suspicion.tolist()[0][2] == 0.0


@pytest.mark.parametrize("k, f", [(6, 1), (8, 2), (10, 3)])
@pytest.mark.parametrize("strategy", ["colluding_far", "colluding_near", "scattered"])
def test_krum_picks_an_honest_model_when_attackers_are_fewer_than_n_minus_3_over_2(k, f, strategy):
    n = k + 1  # the node and its k senders
    assert f < (n - 3) / 2
    g = torch.Generator().manual_seed(k * 10 + f)
    centre = torch.randn(1, 100, generator=g)
    honest = [centre + 0.1 * torch.randn(1, 100, generator=g) for _ in range(n - f)]
    direction = torch.randn(1, 100, generator=g)
    if strategy == "colluding_far":
        attackers = [centre + 50 * direction] * f
    elif strategy == "colluding_near":  # just outside the honest spread, all alike
        attackers = [centre + 0.3 * direction / direction.norm() * 10] * f
    else:
        attackers = [centre + 20 * torch.randn(1, 100, generator=g) for _ in range(f)]
    own, others = honest[0], honest[1:] + attackers
    for m in (1, 3):
        out = call(Krum(f=f, m=m), own, others, torch.full((1, n), 1 / n))
        kept = [x for x, w in zip([own] + others, out.weights[0].tolist()) if w > 0]
        assert len(kept) == m and all(any(x is h for h in honest) for x in kept)
        assert out.suspicion[0, len(honest) - 1:].tolist() == [1.0] * f


def test_krum_scores_by_the_n_minus_f_minus_2_nearest_on_a_hand_computed_example():
    # n = 5, f = 1: each score sums the 2 nearest squared distances:
    # 0: 0.25 + 9 = 9.25, 0.5: 0.25 + 6.25 = 6.5, 3: 0.04 + 0.16 = 0.2, 3.2: 0.04 + 0.04 = 0.08, 3.4: 0.2
    # (summing all 4 distances would pick 3: 15.45 against 17.61 for 3.2)
    own = torch.tensor([[0.0]])
    received = [torch.tensor([[v]]) for v in (0.5, 3.0, 3.2, 3.4)]
    out = call(Krum(f=1, m=1), own, received, torch.full((1, 5), 0.2))
    assert float(merged(out, own)) == pytest.approx(3.2) and out.weights[0, 0] == 0
    out = call(Krum(f=1, m=3), own, received, torch.full((1, 5), 0.2))
    assert float(merged(out, own)) == pytest.approx(3.2) and out.suspicion.tolist() == [[1.0, 0.0, 0.0, 0.0]]


def test_balance_accepts_within_a_radius_that_shrinks_over_the_run():
    own = torch.tensor([[10.0, 0.0]])
    received = [torch.tensor([[11.0, 0.0]]), torch.tensor([[10.0, 2.0]]), torch.tensor([[10.0, -1.8]])]
    weights = torch.tensor([[0.4, 0.2, 0.2, 0.2]], dtype=torch.float64)
    # round 5 of 10: 0.3 * exp(-0.5) * ||own|| = 1.82 admits the distances 1 and 1.8, not 2
    out = call(Balance(rounds=10), own, received, weights, round=5)
    assert out.weights.tolist() == [[0.4, 0.2, 0.0, 0.2]] and out.suspicion.tolist() == [[0.0, 1.0, 0.0]]
    out = call(Balance(rounds=10, alpha=0.5), own, received, weights, round=5)
    assert out.weights.tolist() == [[0.5, 0.25, 0.0, 0.25]]
    # at the last round the radius is 0.3 * exp(-1) * 10 = 1.10: only the distance 1 remains
    out = call(Balance(rounds=10), own, received, weights, round=10)
    assert out.suspicion.tolist() == [[0.0, 1.0, 1.0]]


def test_bristle_returns_the_node_s_own_model_when_every_received_model_equals_it(mlp, context):
    flat, _ = mlp
    own = flat.vector.view(1, -1)
    rule = resolve_filter("bristle", 4, context, closest=2, random=1)
    out = call(rule, own, [own.clone() for _ in range(4)], torch.full((1, 5), 0.2),
               senders=torch.tensor([[4, 5, 6, 7]]))
    assert torch.equal(merged(out, own), own)
    kept = out.suspicion[0] < 1
    assert int(kept.sum()) == 3 and not bool(out.suspicion[0][kept].any())  # 2 closest + 1 random, trusted alike


def test_bristle_gives_zero_weight_to_a_peer_worse_on_every_class_by_a_wide_margin(mlp, context):
    flat, _ = mlp
    own = flat.vector.view(1, -1)
    good = own + 0.01 * torch.randn(own.shape, generator=torch.Generator().manual_seed(5))
    bad = wrong_everywhere(flat).view(1, -1)
    rule = resolve_filter("bristle", 4, context)
    senders = torch.tensor([[1, 2]])
    with_bad = call(rule, own, [good, bad], torch.full((1, 3), 1 / 3), senders=senders)
    without = call(rule, own, [good, bad], torch.tensor([[1 / 3, 1 / 3, 0.0]]), senders=senders)
    assert torch.equal(merged(with_bad, own), merged(without, own))  # the bad peer changes nothing at all
    assert float(with_bad.suspicion[0, 1]) == 1.0 and float(with_bad.suspicion[0, 0]) == 0.0
    alone = call(rule, own, [bad], torch.tensor([[0.5, 0.5]]), senders=senders[:, 1:])
    assert torch.equal(merged(alone, own), own)


def test_bristle_weights_follow_the_papers_formula_on_a_hand_computed_example():
    # the node has recall 0.5 on both classes; sender 1 has 0.8 on both, sender 2 has 0.45 and 0.55
    recall = torch.tensor([[[0.5, 0.5], [0.8, 0.8], [0.45, 0.55]]], dtype=torch.float64)
    per_class, per_sender = bristle_weights(recall, torch.ones(1, 2, dtype=torch.bool))

    def weight(score, certainty):
        return certainty * max(0.0, 10 / (1 + math.exp(-score / 100)) - 4)

    up, down = 3.0 ** 3.5, -(0.5 ** 4.5)  # d = 10 * |r_j - r_i|: 3 for sender 1, 0.5 for sender 2
    certainty_2 = 0.5 - 0.05  # mean - population std of (0.45, 0.55)
    expected = [[weight(up, 0.8), weight(up, 0.8)], [weight(down, certainty_2), weight(0.5 ** 3.5, certainty_2)]]
    torch.testing.assert_close(per_class[0], torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(per_sender[0], torch.tensor(
        [weight(2 * up, 0.8), weight(down + 0.5 ** 3.5, certainty_2)], dtype=torch.float64))


def test_bristle_weighs_a_class_absent_from_the_split_by_the_per_sender_weight(mlp, context):
    """Node 3's validation split has no class 2: its class-2 rows are merged like every
    parameter outside the class rows, with the sender's overall weight."""
    flat, _ = mlp
    own = flat.vector.view(1, -1)
    other = own + 0.05 * torch.randn(own.shape, generator=torch.Generator().manual_seed(9))
    rule = resolve_filter("bristle", 4, context)
    batch = FilterInput(torch.tensor([3]), own, [other], torch.tensor([[0.5, 0.5]], dtype=torch.float64),
                        senders=torch.tensor([[0]]))
    result = merged(rule(batch), own)
    rows = class_rows(flat.layout)
    first_layer = slice(0, HIDDEN * FEATURES)
    share = (result[0, first_layer] - own[0, first_layer]) / (other[0, first_layer] - own[0, first_layer])
    assert 0 < float(share.mean()) < 1
    class_2 = rows[2]
    torch.testing.assert_close((result[0, class_2] - own[0, class_2]) / (other[0, class_2] - own[0, class_2]),
                               share.mean().expand(len(class_2)), rtol=1e-3, atol=1e-3)


def test_bristle_draws_the_same_random_senders_however_the_slots_are_ordered_or_padded():
    own = torch.zeros(1, 10)
    received = [torch.full((1, 10), float(v)) for v in (1, 2, 3, 4, 5, 6)]
    ids = torch.tensor([[11, 12, 13, 14, 15, 16]])
    rule = Bristle(seed=7, closest=2, random=2, integrate=False)
    picks = set()
    for round_index in range(8):
        def kept(order, pad):
            xs = [received[i] for i in order] + [own] * pad
            senders = torch.cat([ids[:, order], torch.full((1, pad), 99)], dim=1)
            weights = torch.tensor([[0.3] + [0.1] * len(order) + [0.0] * pad], dtype=torch.float64)
            out = call(rule, own, xs, weights, round=round_index, senders=senders)
            return {int(s) for s, susp in zip(senders[0], out.suspicion[0]) if susp == 0 and s != 99}
        first = kept(list(range(6)), 0)
        assert first == kept([5, 3, 1, 0, 2, 4], 0) == kept(list(range(6)), 2)
        assert {11, 12} <= first and len(first) == 4
        picks.add(frozenset(first))
    assert len(picks) > 1  # the random senders change from round to round


# -- every filter: missing senders and batching


def filter_inputs(flat):
    """Six senders per node around the trained model, two of them far off; node 1 misses one."""
    base = flat.vector.view(1, -1)
    g = torch.Generator().manual_seed(11)
    own = base + 0.02 * torch.randn(4, base.shape[1], generator=g)
    received = [own + 0.02 * torch.randn(own.shape, generator=g) for _ in range(4)]
    received += [own + 3.0 * torch.randn(own.shape, generator=g), wrong_everywhere(flat).expand(4, -1).clone()]
    weights = torch.full((4, 7), 1 / 7, dtype=torch.float64)
    weights[1, 2] = 0.0
    senders = torch.tensor([[j + 10 * i for j in range(6)] for i in range(4)])
    return own, received, weights, senders


CASES = [("median", {}), ("trimmed_mean", {"b": 1}), ("trimmed_mean", {"fraction": 0.3}),
         ("krum", {"f": 2, "m": 2}), ("clipped_gossip", {}), ("clipped_gossip", {"tau": 0.1}),
         ("balance", {}), ("balance", {"alpha": 0.5}), ("bristle", {"closest": 3, "random": 1}),
         ("bristle", {"closest": 4, "random": 1, "integrate": False})]


@pytest.fixture(params=CASES, ids=[f"{name}{params or ''}" for name, params in CASES])
def case(request, mlp, context):
    """(filter, (own, received, weights, senders)) for each built-in filter and setting."""
    name, params = request.param
    return resolve_filter(name, 4, context, **params), filter_inputs(mlp[0])


def test_every_built_in_filter_is_covered_here():
    assert {name for name, _ in CASES} == set(FILTERS)


def test_missing_senders_are_ignored(case):
    rule, (own, received, weights, senders) = case
    full = call(rule, own, received, weights, round=3, senders=senders)
    # a seventh sender that did not arrive, its row garbage, in the middle of the slots
    garbage = torch.full_like(own, 1e30)
    padded_weights = torch.cat([weights[:, :3], torch.zeros(4, 1, dtype=torch.float64), weights[:, 3:]], dim=1)
    padded_senders = torch.cat([senders[:, :2], torch.full((4, 1), 77), senders[:, 2:]], dim=1)
    padded = call(rule, own, received[:2] + [garbage] + received[2:], padded_weights, round=3, senders=padded_senders)
    torch.testing.assert_close(merged(padded, own), merged(full, own), rtol=1e-6, atol=1e-6)
    assert not bool(padded.suspicion[:, 2].any())
    torch.testing.assert_close(torch.cat([padded.suspicion[:, :2], padded.suspicion[:, 3:]], dim=1), full.suspicion)


def test_a_batch_of_nodes_equals_each_node_alone(case):
    rule, (own, received, weights, senders) = case
    together = call(rule, own, received, weights, round=2, step=1, senders=senders)
    result = merged(together, own)
    for b in range(4):
        alone = rule(FilterInput(torch.tensor([b]), own[b:b + 1], [x[b:b + 1] for x in received], weights[b:b + 1],
                                 round=2, step=1, senders=senders[b:b + 1]))
        torch.testing.assert_close(merged(alone, own[b:b + 1])[0], result[b], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(alone.suspicion[0], together.suspicion[b], rtol=1e-6, atol=1e-9)


def test_filters_never_write_into_their_inputs(case):
    rule, (own, received, weights, senders) = case
    copies = [own.clone(), [x.clone() for x in received], weights.clone()]
    out = call(rule, own, received, weights, senders=senders)
    assert torch.equal(own, copies[0]) and all(torch.equal(a, b) for a, b in zip(received, copies[1]))
    assert torch.equal(weights, copies[2])
    assert out.suspicion.shape == (4, 6) and bool(((out.suspicion >= 0) & (out.suspicion <= 1)).all())
    assert torch.isfinite(merged(out, own)).all()


def test_the_far_senders_look_more_suspicious_than_the_honest_ones(case):
    rule, (own, received, weights, senders) = case
    out = call(rule, own, received, weights, senders=senders)
    assert float(out.suspicion[:, 4:].mean()) > float(out.suspicion[:, :4].mean())


def test_the_variance_corrected_merge_returns_an_aggregate_as_is(mlp):
    flat, _ = mlp
    own, received, weights, _ = filter_inputs(flat)
    out = call(CoordinateMedian(), own, received, weights)
    result = Merger(flat.layout, "variance_corrected")(own, out.received, out.weights, torch.empty_like(own))
    torch.testing.assert_close(result, out.received[0])


def test_bad_parameters_and_names_are_refused_with_the_field_named(context):
    with pytest.raises(ValueError, match="krum.f"):
        resolve_filter("krum", 1, context, f=-1)
    with pytest.raises(ValueError, match="no parameter 'beta'"):
        resolve_filter("trimmed_mean", 1, context, beta=0.1)
    with pytest.raises(ValueError, match="choose one of"):
        resolve_filter("mediam", 1, context)
    with pytest.raises(ValueError, match="recall"):
        resolve_filter("bristle", 1, FilterContext())
    assert resolve_filter("bristle", 1, FilterContext(), integrate=False) is not None
