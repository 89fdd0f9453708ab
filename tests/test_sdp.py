import json
import math

import cvxpy as cp
import networkx as nx
import numpy as np
import pytest

from gossipfl.graph import first_order, mixing, sdp, topology, weights


def assert_mixing_matrix(w: np.ndarray, graph: nx.Graph, nonnegative: bool) -> None:
    mixing.check(w, graph, tol=1e-10)
    if nonnegative:
        assert w.min() >= -1e-12


def uniform_cycle_weight(n: int) -> float:
    return 1.0 / (2.0 - math.cos(2 * math.pi / n) - math.cos(2 * math.pi * (n // 2) / n))


def random_graphs() -> list[nx.Graph]:
    return [topology.build("erdos_renyi", 18, p=0.3, seed=3), topology.build("erdos_renyi", 24, p=0.2, seed=5),
            topology.build("random_geometric", 20, radius=0.45, seed=1),
            topology.build("random_geometric", 24, radius=0.4, seed=7)]


@pytest.mark.parametrize("n", range(5, 9))
def test_path_fmmc_slem_is_cos_pi_over_n(n):
    result = sdp.fmmc(nx.path_graph(n))
    assert result.slem == pytest.approx(math.cos(math.pi / n), abs=1e-4)
    assert result.status == "optimal"


@pytest.mark.parametrize("n", [5, 6, 7, 8, 9])
def test_cycle_fmmc_matches_the_optimal_uniform_weight(n):
    graph = nx.cycle_graph(n)
    uniform = mixing.from_edge_weights(graph, np.full(n, uniform_cycle_weight(n)))
    assert sdp.fmmc(graph).slem == pytest.approx(mixing.slem(uniform), abs=1e-6)


@pytest.mark.parametrize("graph, expected", [
    (nx.petersen_graph(), 3 / 7),
    (nx.convert_node_labels_to_integers(nx.hypercube_graph(3)), 1 / 2),
    (nx.complete_graph(7), 0.0),
])
@pytest.mark.parametrize("program", [sdp.fmmc, sdp.fdla])
def test_known_optimal_slems(graph, expected, program):
    assert program(graph).slem == pytest.approx(expected, abs=1e-6)


def test_an_explicit_solver_is_used_and_an_unknown_one_refused():
    result = sdp.fmmc(nx.petersen_graph(), solver="scs")
    assert result.solver == "SCS" and result.slem == pytest.approx(3 / 7, abs=1e-3)
    with pytest.raises(ValueError, match="not installed"):
        sdp.fmmc(nx.petersen_graph(), solver="NO_SUCH_SOLVER")


@pytest.mark.parametrize("graph", random_graphs())
def test_fdla_beats_fmmc_beats_heuristics_and_both_are_mixing_matrices(graph):
    fdla, fmmc = sdp.fdla(graph), sdp.fmmc(graph)
    tol = 1e-6
    assert fdla.slem <= fmmc.slem + tol
    assert fmmc.slem <= mixing.slem(mixing.metropolis(graph)) + tol
    assert fmmc.slem <= mixing.slem(mixing.max_degree(graph)) + tol
    assert fdla.slem <= mixing.slem(mixing.best_constant(graph)) + tol  # may have negative self-weights
    assert_mixing_matrix(fmmc.matrix, graph, nonnegative=True)
    assert_mixing_matrix(fdla.matrix, graph, nonnegative=False)
    assert fmmc.slem == pytest.approx(mixing.slem(fmmc.matrix), abs=1e-12)


@pytest.fixture
def crashing_solver(monkeypatch):
    def crash(self, *args, **kwargs):
        raise cp.error.SolverError("simulated crash")

    monkeypatch.setattr(cp.Problem, "solve", crash)


def test_a_solver_that_raises_falls_back_to_metropolis_with_a_warning(crashing_solver):
    graph = nx.petersen_graph()
    with pytest.warns(RuntimeWarning, match="simulated crash"):
        result = sdp.fmmc(graph)
    assert result.status.startswith("fallback: ") and "simulated crash" in result.status
    np.testing.assert_array_equal(result.matrix, mixing.metropolis(graph))
    assert result.slem == pytest.approx(mixing.slem(mixing.metropolis(graph)))


def fake_solution(monkeypatch, edge_weights):
    """Make the solver 'succeed' with the given edge weights, as SCS did when it returned SLEM > 1."""
    def solve(problem, solver):
        for variable in problem.variables():
            variable.value = edge_weights(variable.shape) if variable.shape else np.array(0.0)
        return "optimal"

    monkeypatch.setattr(sdp, "_solve", solve)


@pytest.mark.parametrize("weights, reason", [
    (lambda shape: np.zeros(shape), "SLEM"),  # W = I: never mixes
    (lambda shape: np.full(shape, -0.2), "violate"),  # negative weights in an FMMC answer
    (lambda shape: None, "finite"),
])
def test_a_solution_that_fails_validation_falls_back(monkeypatch, weights, reason):
    fake_solution(monkeypatch, weights)
    with pytest.warns(RuntimeWarning, match=reason):
        result = sdp.fmmc(nx.cycle_graph(6))
    assert result.status.startswith("fallback: ")
    np.testing.assert_array_equal(result.matrix, mixing.metropolis(nx.cycle_graph(6)))


def test_fdla_answers_with_slem_above_one_are_refused(monkeypatch):
    fake_solution(monkeypatch, lambda shape: np.full(shape, 1.5))
    with pytest.warns(RuntimeWarning, match="SLEM"):
        assert sdp.fdla(nx.cycle_graph(6)).status.startswith("fallback: ")


def test_solver_rounding_noise_is_clipped_not_refused(monkeypatch):
    graph = nx.cycle_graph(6)
    fake_solution(monkeypatch, lambda shape: np.r_[0.5 + 1e-7, np.full(shape[0] - 2, 0.5), -1e-9])
    result = sdp.fmmc(graph)
    assert result.status == "optimal"
    assert_mixing_matrix(result.matrix, graph, nonnegative=True)


def test_first_order_agrees_with_the_sdp_on_mid_size_graphs():
    for graph in (topology.build("random_geometric", 32, radius=0.4, seed=1),
                  topology.build("erdos_renyi", 40, p=0.15, seed=2)):
        large = first_order.fmmc_first_order(graph)
        assert large.slem == pytest.approx(sdp.fmmc(graph).slem, abs=1e-3)
        assert_mixing_matrix(large.matrix, graph, nonnegative=True)


def test_first_order_block_krylov_path_matches_the_dense_one_on_a_torus(monkeypatch):
    graph = topology.build("torus", 144)  # 4-fold extreme eigenvalues, which one-vector Lanczos misses
    dense = first_order.fmmc_first_order(graph, iters=100)
    monkeypatch.setattr(first_order, "DENSE_EIGEN_LIMIT", 100)
    sparse = first_order.fmmc_first_order(graph, iters=100)
    assert sparse.slem == pytest.approx(dense.slem, abs=1e-5)
    assert sparse.slem < mixing.slem(mixing.metropolis(graph)) - 0.01


def test_feasible_set_projection_matches_a_quadratic_program():
    graph = topology.build("erdos_renyi", 15, p=0.4, seed=1)
    edges = mixing.edge_array(graph)
    point = np.random.default_rng(0).uniform(-0.2, 0.8, len(edges))
    w = cp.Variable(len(edges))
    cp.Problem(cp.Minimize(cp.sum_squares(w - point)),
               [w >= 0, sdp._incidence(edges, 15, signed=False) @ w <= 1]).solve(solver="CLARABEL")
    projected = first_order._FeasibleSetProjection(edges, 15)(point)
    np.testing.assert_allclose(projected, w.value, atol=1e-6)


def test_one_perp_basis_is_orthonormal_and_orthogonal_to_ones():
    basis = sdp._one_perp_basis(topology.build("random_geometric", 37, radius=0.4, seed=2)).toarray()
    np.testing.assert_allclose(basis.T @ basis, np.eye(36), atol=1e-12)
    np.testing.assert_allclose(basis.sum(axis=0), 0.0, atol=1e-12)


@pytest.mark.parametrize("n", range(4, 9))
def test_optimal_rates_on_a_path_reach_the_known_lambda2(n):
    budget = 3.0
    result = sdp.optimal_rates(nx.path_graph(n), budget=budget)
    assert result.lambda2 == pytest.approx(12 * budget / (n * (n * n - 1)), rel=1e-5)
    assert result.chi1 == pytest.approx(1 / result.lambda2)
    assert result.rates.sum() == pytest.approx(budget) and result.rates.min() >= 0


@pytest.mark.parametrize("graph", random_graphs()[:2] + [nx.petersen_graph(), nx.star_graph(6)])
def test_optimal_rates_beat_uniform_rates(graph):
    optimal, uniform = sdp.optimal_rates(graph), sdp.uniform_rates(graph)
    assert optimal.lambda2 >= uniform.lambda2 - 1e-6
    assert optimal.edges == uniform.edges == [tuple(e) for e in mixing.edge_array(graph).tolist()]


def test_uniform_rates_resistances_on_a_tree_are_inverse_rates():
    result = sdp.uniform_rates(nx.path_graph(6), budget=2.0)
    assert result.chi2 == pytest.approx(5 / 2.0)  # each tree edge is a cut: R_uv = 1 / r_uv = m / budget


def test_rates_fall_back_to_uniform_when_the_solver_fails(crashing_solver):
    with pytest.warns(RuntimeWarning, match="simulated crash.*uniform"):
        result = sdp.optimal_rates(nx.path_graph(5))
    assert result.status.startswith("fallback: ")
    np.testing.assert_allclose(result.rates, 0.25)


@pytest.mark.parametrize("method", weights.METHODS)
def test_solve_weights_round_trips_through_json(method):
    graph = topology.build("random_geometric", 12, radius=0.5, seed=3)
    result = weights.solve_weights(graph, method)
    assert result.method == method
    loaded = weights.from_json(json.loads(json.dumps(weights.to_json(result))), graph)
    np.testing.assert_array_equal(loaded.matrix, result.matrix)
    assert (loaded.method, loaded.solver, loaded.status, loaded.slem) == (
        result.method, result.solver, result.status, result.slem)


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown weight method"):
        weights.solve_weights(nx.path_graph(3), "fastest")


def test_tampered_or_foreign_matrices_are_refused_on_load():
    graph = nx.cycle_graph(6)
    stored = weights.to_json(sdp.fmmc(graph))
    edited = json.loads(json.dumps(stored))
    edited["matrix"][0][0] += 0.01
    edited["matrix"][0][1] -= 0.01
    edited["matrix"][1][0] -= 0.01
    edited["matrix"][1][1] += 0.01
    with pytest.raises(ValueError, match="SLEM"):
        weights.from_json(edited)
    with pytest.raises(ValueError, match="not an edge"):
        weights.from_json(stored, nx.path_graph(6))
    with pytest.raises(ValueError, match="shape"):
        weights.from_json({**stored, "n": 5})


@pytest.mark.parametrize("graph, program, cost", [
    (topology.build("ring", 3000), sdp.fmmc, "about 5.8 GB on 2 cores"),              # memory, before building
    (topology.build("ring", 3000), sdp.optimal_rates, "about 5.8 GB"),
    (topology.build("random_regular", 300, degree=4), sdp.fdla, "and 18 min with SCS"),  # SCS time, cubic in n
])
def test_an_sdp_too_large_is_refused_up_front_with_its_cost_and_the_alternative(graph, program, cost, monkeypatch):
    monkeypatch.setattr(sdp, "_solve", lambda *a: pytest.fail("a refused program must not be solved"))
    with pytest.raises(sdp.ProgramTooLarge) as info:
        program(graph)
    assert cost in str(info.value)
    assert ("fmmc_first_order" if program is not sdp.optimal_rates else 'gossip.rates = "uniform"') in str(info.value)


def test_the_size_limit_leaves_the_sdp_where_it_is_quick():
    sdp.check_program_size(1024, "fmmc", "-", "CLARABEL")  # rings of 1024: 21 s measured
    sdp.check_program_size(128, "fmmc", "-", "SCS")
    assert "fmmc_first_order" in weights.METHODS  # the alternative the refusal points at exists
