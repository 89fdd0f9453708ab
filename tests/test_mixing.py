import numpy as np
import pytest

from gossipfl.graph import mixing, topology

GRAPHS = {
    "ring": topology.build("ring", 12),
    "torus": topology.build("torus", 16),
    "geometric": topology.build("random_geometric", 24, seed=1, radius=0.45),
    "star": topology.build("star", 9),
}
SYMMETRIC = ["metropolis", "max_degree", "best_constant"]


@pytest.mark.parametrize("graph", GRAPHS.values(), ids=GRAPHS.keys())
@pytest.mark.parametrize("method", SYMMETRIC)
def test_doubly_stochastic_weights_preserve_the_average_and_converge(graph, method):
    w = mixing.HEURISTICS[method](graph)
    mixing.check(w, graph)
    x = np.random.default_rng(0).normal(size=(graph.number_of_nodes(), 5))
    y = mixing.power(w, 200) @ x
    np.testing.assert_allclose(y.mean(axis=0), x.mean(axis=0), atol=1e-12)
    assert mixing.slem(w) < 1
    np.testing.assert_allclose(y, np.broadcast_to(x.mean(axis=0), y.shape), atol=1e-6 if method != "max_degree"
                               or graph.number_of_nodes() < 20 else 1e-3)


def test_uniform_neighbourhood_is_row_stochastic_but_not_symmetric_on_irregular_graphs():
    g = GRAPHS["star"]
    w = mixing.uniform_neighbourhood(g)
    mixing.check(w, g, doubly_stochastic=False)
    with pytest.raises(ValueError, match="symmetric"):
        mixing.check(w, g)


def test_ring_metropolis_slem_matches_closed_form():
    n = 12
    w = mixing.metropolis(GRAPHS["ring"])
    assert np.allclose(w[0, [1, 11, 0]], 1 / 3)
    eig = [1 / 3 + 2 / 3 * np.cos(2 * np.pi * k / n) for k in range(1, n)]
    assert mixing.slem(w) == pytest.approx(max(abs(e) for e in eig), abs=1e-12)
    assert mixing.spectral_gap(w) == pytest.approx(1 - mixing.slem(w))


def test_best_constant_beats_max_degree_on_a_ring_and_complete_graph_mixes_at_once():
    g = GRAPHS["ring"]
    assert mixing.slem(mixing.best_constant(g)) <= mixing.slem(mixing.max_degree(g)) + 1e-12
    k = topology.build("complete", 6)
    assert mixing.slem(mixing.best_constant(k)) == pytest.approx(0, abs=1e-12)


def test_power_is_repeated_product():
    w = mixing.metropolis(GRAPHS["torus"])
    assert np.allclose(mixing.power(w, 3), w @ w @ w)


def test_check_rejects_weight_off_the_graph():
    g = GRAPHS["ring"]
    w = mixing.metropolis(g)
    w[0, 5] = w[5, 0] = 0.1
    with pytest.raises(ValueError, match="not an edge"):
        mixing.check(w, g)
