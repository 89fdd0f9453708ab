"""MoDeST's rules (algorithms/sampling.py) and its rounds in simulate (runtimes/sampled.py)."""

import json
import math
import random

import pytest
import torch

from gossipfl.algorithms.sampling import Aggregation, View, first_responsive, order, quorum
from gossipfl.config import ConfigError
from gossipfl.runtimes.sim import Simulation, choose_engine


def random_view(seed, peers=12):
    rng = random.Random(seed)
    view = View()
    for p in rng.sample(range(peers), peers // 2 + 2):
        view.records[p] = (rng.randrange(4), rng.random() < 0.8)
        view.last_active[p] = rng.randrange(30)
    return view


def state(view):
    return view.last_active, view.records, view.pending


def test_equal_views_give_equal_samples_and_a_different_round_reshuffles():
    a, b = View.of_members(range(40)), View.of_members(range(40))
    for r in range(5):
        assert order(a.candidates(r, 50), r)[:4] == order(b.candidates(r, 50), r)[:4]
    assert order(a.candidates(0, 50), 0) != order(a.candidates(0, 50), 1)
    assert sorted(order(range(40), 3)) == list(range(40))


def test_every_node_is_sampled_s_over_n_of_the_rounds():
    n, s, rounds = 50, 5, 10_000
    counts = [0] * n
    for r in range(rounds):
        for p in order(range(n), r)[:s]:
            counts[p] += 1
    p = s / n
    bound = 5 * math.sqrt(rounds * p * (1 - p))  # five standard deviations of a binomial count
    assert all(abs(c - rounds * p) < bound for c in counts), (min(counts), max(counts), rounds * p, bound)


def test_an_unresponsive_candidate_is_skipped_in_order():
    ordered = [7, 3, 9, 1, 4]
    chosen, skipped = first_responsive(ordered, 2, lambda p: p not in (3, 1))
    assert chosen == [7, 9] and skipped == [3]
    chosen, skipped = first_responsive(ordered, 3, lambda p: p not in (3, 1))
    assert chosen == [7, 9, 4] and skipped == [3, 1]


def test_the_quorum_rule():
    assert quorum(10, 0.8) == 8 and quorum(3, 1.0) == 3 and quorum(4, 0.01) == 1
    agg = Aggregation(needed=3)
    v = torch.ones(2)
    assert not agg.offer(5, 0, v) and not agg.offer(5, 1, v)  # nothing before ceil(sf * s) models
    assert agg.offer(5, 2, v)
    assert not agg.offer(5, 3, v)  # once per round
    assert not agg.offer(4, 0, v) and agg.round == 5  # older rounds are ignored
    assert not agg.offer(6, 0, v) and agg.models.keys() == {0}  # a newer round resets the buffer
    assert not agg.offer(6, 0, v * 2) and len(agg.models) == 1  # one model per sender


def test_view_merging_is_idempotent_commutative_and_monotone():
    for seed in range(30):
        a, b = random_view(seed), random_view(seed + 100)
        ab, ba = a.copy(), b.copy()
        ab.merge(b)
        ba.merge(a)
        ab.flush()
        ba.flush()
        assert state(ab) == state(ba)  # commutative, once the pending joins are applied
        again = ab.copy()
        again.merge(b)
        again.flush()
        assert state(again) == state(ab)  # idempotent
        for peer, r in a.last_active.items():  # monotone: nothing a view knew goes backwards
            assert ab.last_active[peer] >= r and ab.records[peer][0] >= a.records[peer][0]


def test_views_survive_the_header_and_a_malformed_one_is_refused():
    view = random_view(3)
    back = View.from_extra(json.loads(json.dumps(view.to_extra())))
    assert (back.last_active, back.records) == (view.last_active, view.records)
    for bad in ({"active": {"x": 1}, "records": {}}, {"active": {"1": -4}, "records": {}}, {"records": {}}, [1]):
        with pytest.raises(ValueError, match="not a MoDeST view"):
            View.from_extra(bad)


def test_a_joiner_is_not_sampled_before_the_next_flush():
    members = View.of_members(range(10))
    joiner = members.copy()
    joiner.record(42, joined=True, round_index=7)
    members.merge(joiner)
    assert 42 not in members.candidates(7, 50) and 42 in members.pending
    members.flush()
    assert 42 in members.candidates(7, 50)
    left = members.copy()
    left.record(3, joined=False, round_index=8)
    members.merge(left)
    assert 3 not in members.candidates(8, 50)  # a leave applies at once
    silent = View.of_members(range(4))
    silent.last_active[2] = 10
    assert silent.candidates(60, 50) == [2] and silent.candidates(50, 50) == [0, 1, 2, 3]


@pytest.fixture
def modest(small_config):
    return lambda **kw: small_config(topology__nodes=20, rounds=6, train__local_steps=5, sampling__kind="modest",
                                     sampling__sample_size=5, **kw)


@pytest.mark.parametrize("churn", [{}, {"sampling__crash_at": 2, "sampling__crash_nodes": [0, 3, 5, 8, 11],
                                        "sampling__join_at": 3, "sampling__join_nodes": [19],
                                        "sampling__leave_at": 4, "sampling__leave_nodes": [7],
                                        "sampling__aggregators": 2, "sampling__success_fraction": 0.6,
                                        "robust__filters": ["trimmed_mean"]}])
def test_the_node_and_vectorized_engines_agree_on_a_modest_run(modest, tmp_path, churn):
    runs = {}
    for engine in ("nodes", "vectorized"):
        sim = Simulation(modest(engine=engine, **churn), run_dir=tmp_path / engine, progress=False)
        summary = sim.run()
        lines = [json.loads(line) for line in (tmp_path / engine / "metrics.jsonl").read_text().splitlines()]
        runs[engine] = (sim.vectors(), summary, lines)
    torch.testing.assert_close(runs["vectorized"][0], runs["nodes"][0], rtol=1e-4, atol=2e-5)
    for a, b in zip(runs["nodes"][2], runs["vectorized"][2]):
        assert (a["sample"], a["aggregators"], a["skipped"], a["bytes_sent"]) == \
            (b["sample"], b["aggregators"], b["skipped"], b["bytes_sent"])
    lines = runs["nodes"][2]
    assert all(len(line["sample"]) >= 1 for line in lines)
    if churn:
        assert sum(line["skipped"] for line in lines) > 0
        assert not set(lines[-1]["sample"]) & {0, 3, 5, 8, 11, 7}  # crashed and departed nodes train no more


def test_modest_keeps_improving_when_most_nodes_stop_answering(small_config, tmp_path):
    cfg = small_config(topology__nodes=30, rounds=16, train__local_steps=10, sampling__kind="modest",
                       sampling__sample_size=5, sampling__crash_at=6, sampling__crash_fraction=0.8, eval__every=1)
    Simulation(cfg, run_dir=tmp_path / "r", progress=False).run()
    lines = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert all(line["sample"] for line in lines)  # every round completes
    accuracy = [line["accuracy_global_model"] for line in lines]
    assert max(accuracy[10:]) > accuracy[5]  # better after the crash than before it


def test_fedavg_sends_two_models_per_sampled_node_and_round(small_config):
    sim = Simulation(small_config(topology__nodes=12, sampling__kind="fedavg", sampling__sample_size=4), progress=False)
    sim.step(0)
    d = sim.vectors().shape[1]
    assert sim.engine.counters()["bytes_sent"] == 2 * 4 * d * 4


def test_sampling_refuses_what_it_does_not_combine_with(small_config):
    with pytest.raises(ConfigError, match="async"):
        choose_engine(small_config(sampling__kind="modest", gossip__schedule="async"))
    with pytest.raises(ConfigError, match="byzantine"):
        choose_engine(small_config(sampling__kind="modest", byzantine__attack="gaussian", byzantine__nodes=[1]))
