import networkx as nx
import numpy as np
import pytest
import torch

from gossipfl.graph import poisson, sdp, topology
from gossipfl.runtimes.sim import Simulation


def apply(x, edges, fired):
    for e in fired:
        u, v = edges[e]
        x[u] = x[v] = 0.5 * (x[u] + x[v])
    return x


def test_firings_follow_the_rates():
    rates = np.array([1.0, 3.0, 0.0, 4.0])
    times, fired = poisson.firings(rates, 500.0, np.random.default_rng(0))
    assert np.all(np.diff(times) >= 0) and times.max() < 500.0
    assert abs(len(fired) - 8 * 500) < 4 * np.sqrt(8 * 500)
    share = np.bincount(fired, minlength=4) / len(fired)
    np.testing.assert_allclose(share, rates / rates.sum(), atol=0.02)


def test_pairwise_gossip_preserves_the_average_and_decays_at_least_at_half_lambda2():
    graph = topology.build("random_geometric", 20, seed=3, radius=0.45)
    for rates in (sdp.uniform_rates(graph, 10.0), sdp.optimal_rates(graph, 10.0)):
        edges = np.array(rates.edges)
        x0 = np.random.default_rng(1).normal(size=(20, 3))
        v0 = ((x0 - x0.mean(0)) ** 2).sum()
        for t in (0.5, 1.0, 2.0):
            ratios = []
            for trial in range(300):
                _, fired = poisson.firings(rates.rates, t, np.random.default_rng(trial))
                x = apply(x0.copy(), edges, fired)
                np.testing.assert_allclose(x.mean(0), x0.mean(0), atol=1e-12)
                ratios.append(((x - x.mean(0)) ** 2).sum() / v0)
            bound = np.exp(-rates.lambda2 * t / 2)
            assert np.mean(ratios) <= bound * 1.05, (rates.method, t, np.mean(ratios), bound)


@pytest.mark.parametrize("engine", ["nodes", "vectorized"])
def test_poisson_schedule_in_the_simulator_preserves_the_average_and_counts_pairs(small_config, engine):
    sim = Simulation(small_config(train__local_steps=0, gossip__schedule="poisson", gossip__init="independent",
                                  gossip__poisson_time=2.0, engine=engine), progress=False)
    x0 = sim.vectors().double()
    sim.step(0)
    x1 = sim.vectors().double()
    torch.testing.assert_close(x1.mean(0), x0.mean(0), rtol=0, atol=1e-6)
    pairs = sim.experiment.plan(0).exchanges
    assert len(pairs) > 0 and all(sim.experiment.graph.has_edge(p.owner, p.peer) and p.owner < p.peer for p in pairs)
    d = x0.shape[1]
    assert sim.engine.counters()["bytes_sent"] == 2 * len(pairs) * d * 4
    assert pairs == sim.experiment.plan(0).exchanges != sim.experiment.plan(1).exchanges


def test_optimal_rates_mix_a_barbell_faster_than_uniform_ones():
    graph = nx.barbell_graph(5, 0)
    uniform, optimal = sdp.uniform_rates(graph, 5.0), sdp.optimal_rates(graph, 5.0)
    assert optimal.lambda2 > 1.5 * uniform.lambda2
