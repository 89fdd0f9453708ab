import torch

from gossipfl.algorithms.robust import WARMUP, DistanceGuard, FilterInput

D = 1000


def honest(own, distance, seed):
    g = torch.Generator().manual_seed(seed)
    step = torch.randn(1, D, generator=g)
    return own + step / step.norm() * distance


def call(guard, own, received):
    weights = torch.ones(1, len(received) + 1, dtype=torch.float64)
    out = guard(FilterInput(torch.zeros(1, dtype=torch.long), own, received, weights))
    return out.received, out.weights, out.suspicion > 0


def test_a_huge_finite_vector_is_pulled_to_the_node_and_its_input_is_untouched():
    own = torch.randn(1, D)
    poison = torch.full((1, D), 1e30)
    out, _, flagged = call(DistanceGuard(1), own, [poison])
    assert flagged.tolist() == [[True]]
    assert torch.isfinite(out[0]).all() and torch.equal(poison, torch.full((1, D), 1e30))
    assert float((out[0] - own).norm()) <= 10.0 * float(own.norm()) * (1 + 1e-6)


def test_vectors_within_the_bound_pass_bit_for_bit():
    guard = DistanceGuard(1)
    own = torch.randn(1, D)
    for seed in range(20):
        sent = honest(own, 0.1 + 0.01 * seed, seed)
        out, _, flagged = call(guard, own, [sent])
        assert not flagged.any() and out[0] is sent


def test_the_bound_is_learned_from_recent_honest_distances():
    guard = DistanceGuard(1, factor=10.0)
    own = torch.randn(1, D) * 10  # the relative cap (10 x ||own||) is far above what follows
    for seed in range(WARMUP):
        call(guard, own, [honest(own, 0.01, seed)])
    out, _, flagged = call(guard, own, [honest(own, 5.0, 99)])  # 500 x the usual distance
    assert flagged.all()
    assert float((out[0] - own).norm()) <= 0.1 * (1 + 1e-4)  # clipped to 10 x the median of 0.01 (float32)


def test_a_minority_sending_at_the_bound_cannot_ratchet_it_up():
    guard = DistanceGuard(1, factor=10.0)
    own = torch.randn(1, D) * 10
    for seed in range(200):
        attacker = honest(own, 1e6, seed)  # always beyond the bound: recorded at the bound
        call(guard, own, [honest(own, 0.01, 1000 + seed), honest(own, 0.01, 2000 + seed), attacker])
    bound = guard.bound(torch.zeros(1, dtype=torch.long), own.norm(dim=1).double())
    assert float(bound[0]) <= 10.0 * 0.01 * 1.001


def test_each_node_of_a_population_has_its_own_bound():
    guard = DistanceGuard(2)
    own = torch.randn(2, D) * 10
    rows = torch.arange(2)
    for seed in range(WARMUP):
        near = torch.cat([honest(own[:1], 0.01, seed), honest(own[1:], 1.0, seed)])
        guard(FilterInput(rows, own, [near], torch.ones(2, 2, dtype=torch.float64)))
    far = torch.cat([honest(own[:1], 0.5, 7), honest(own[1:], 0.5, 7)])
    suspicion = guard(FilterInput(rows, own, [far], torch.ones(2, 2, dtype=torch.float64))).suspicion
    assert (suspicion[:, 0] > 0).tolist() == [True, False] and 0 < float(suspicion[0, 0]) < 1


def test_missing_senders_are_neither_clipped_nor_recorded():
    guard = DistanceGuard(1)
    own = torch.randn(1, D)
    weights = torch.tensor([[0.5, 0.0]], dtype=torch.float64)
    out = guard(FilterInput(torch.zeros(1, dtype=torch.long), own, [torch.full((1, D), 1e30)], weights))
    assert not (out.suspicion > 0).any() and int(guard.seen[0]) == 0


def test_suspects_are_scored_relative_to_each_observers_typical_neighbour():
    from gossipfl.metrics import suspects
    # node 9 is discarded in full by both observers; honest senders have a third of their values trimmed
    seen = {(0, 1): (10, 3.3), (0, 2): (10, 3.4), (0, 9): (10, 10.0), (3, 2): (10, 3.3), (3, 4): (10, 3.4),
            (3, 9): (10, 10.0)}
    report = suspects(seen, 0.5, attackers=[9])
    assert [s["node"] for s in report["suspected"]] == [9]
    assert report["suspects_precision"] == 1.0 and report["suspects_recall"] == 1.0
    assert suspects(seen, 0.5)["suspicion_scores"]["1"] == 0.0
    assert suspects({(0, 1): (5, 0.0)}, 0.5, attackers=[7])["suspects_precision"] is None
