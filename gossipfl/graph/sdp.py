"""Optimised gossip weights and rates: the CVXPY programs.

FMMC (Boyd, Diaconis, Xiao 2004) and FDLA (Xiao & Boyd 2004) find the symmetric weights with the
smallest SLEM, hence the fastest consensus; DADAO (Nabli & Oyallon 2023) gives each edge a Poisson
gossip rate that maximises lambda_2 of the rate-weighted Laplacian under a total rate budget.

Every program has one variable per edge (W = I - A diag(w) A^T, A the incidence matrix), so its
size grows with the edges and rows sum to one by construction. Spectral constraints live on 1-perp,
through an orthonormal basis V of the complement of the all-ones vector: V^T W V drops the trivial
eigenvalue, and the common form L + 11^T/n >= t I, which silently caps lambda_2 at 1, is avoided.
V is a sparse Haar-like basis: with a dense V, SCS took 208 s instead of 15 s on a 64-node random
geometric graph.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import networkx as nx
import numpy as np

from ..errors import UserError
from . import mixing, topology
from .mixing import edge_array

if TYPE_CHECKING:  # cvxpy (about 80 MB and 1 s to import) and scipy.sparse (24 MB) are imported by the
    import cvxpy as cp  # functions that solve, so node processes that only load a stored W.json never pay
    import scipy.sparse as sp  # for them

# Clarabel (interior point, with chordal decomposition) is fast and accurate while the largest clique
# of the projected Laplacian's sparsity pattern stays small. Measured on 2 cores: width 11-27 (rings
# to 256 nodes, tori to 64, random graphs to 32) solved in 0.1-2 s; width 33-64 (tori of 128 and 256,
# 64-node random graphs) took 10-86 s, where SCS needed 2-5 s up to 128 nodes. SCS at eps 1e-4 lands
# within about 1e-4 of the optimal SLEM; CVXPY's default 1e-5 took 6x longer for the same 4 digits.
CLARABEL_MAX_WIDTH = 28
SOLVER_OPTIONS: dict[str, dict[str, Any]] = {"SCS": {"eps_abs": 1e-4, "eps_rel": 1e-4}}
# Solver noise above this on w >= 0 or on a node's weight sum means a failed solve (SCS at eps 1e-4
# left violations of 1.4e-4 on a 64-node graph), below it is rounded onto the feasible set.
FEASIBILITY_TOL = 1e-3
ROUNDING_TOL = 1e-12  # a self-weight of 1 - (sum of weights) may land at -2e-16

# The cost of a program grows with d = n - 1, the size of its matrix inequalities (FMMC and FDLA
# have two, the rates program one). Measured on 2 shared cores: Clarabel on rings, d = 1023: 21 s,
# 0.48 GB peak; d = 2999: past 100 s and 5.9 GB (CVXPY's canonicalisation alone: 16 s, 2.2 GB;
# d = 2047: 6.8 s, 1.1 GB). SCS (wide cliques), random 4-regular graphs: d = 63: 15 s; d = 127:
# 60 to over 180 s. Programs estimated past either limit are refused before anything is built.
BYTES_PER_D2 = 650
CLARABEL_SECONDS_PER_D2 = 2e-5
SCS_SECONDS_PER_D3 = 4e-5
MAX_PROGRAM_BYTES = 4e9
MAX_PROGRAM_SECONDS = 600.0
FIRST_ORDER_HINT = ('"fmmc_first_order" (FMMC without an SDP, within about 1e-4 of its SLEM): '
                    'gossip.weights = "fmmc_first_order", or gossipfl topology --weights fmmc_first_order')
RATES_HINT = 'uniform rates (gossip.rates = "uniform", or gossipfl topology --rates uniform)'


@dataclass(frozen=True)
class SolveResult:
    """A mixing matrix and how it was obtained; `slem` is measured on `matrix`, not the solver's objective."""

    matrix: np.ndarray
    method: str
    solver: str
    status: str
    seconds: float
    slem: float


@dataclass(frozen=True)
class RatesResult:
    """Per-edge Poisson gossip rates, in `edges` order, with the constants DADAO's rates depend on.

    chi1 = 1 / lambda_2(L) sets the gossip (consensus) speed; chi2 = max_uv R_uv, the largest
    effective resistance of an edge, bounds how much one pairwise exchange can move the average error.
    """

    rates: np.ndarray
    edges: list[tuple[int, int]]
    lambda2: float
    chi1: float
    chi2: float
    method: str
    solver: str
    status: str
    seconds: float


class ProgramTooLarge(UserError, ValueError):
    """An SDP estimated to need more memory or time than MAX_PROGRAM_BYTES or MAX_PROGRAM_SECONDS."""


def check_program_size(n: int, method: str, alternative: str, solver: str | None = None) -> None:
    """Refuse, with the estimated cost, an SDP on n nodes that would run for many minutes or
    exhaust memory; `solver` None checks memory only (before the program is built)."""
    d = n - 1
    gigabytes = BYTES_PER_D2 * d * d / 1e9
    seconds = 0.0 if solver is None else (CLARABEL_SECONDS_PER_D2 * d * d if solver == "CLARABEL"
                                          else SCS_SECONDS_PER_D3 * d ** 3)
    if gigabytes * 1e9 > MAX_PROGRAM_BYTES or seconds > MAX_PROGRAM_SECONDS:
        cost = f"about {gigabytes:.1f} GB" + (f" and {seconds / 60:.0f} min with {solver}" if solver else "")
        raise ProgramTooLarge(
            f"{method} on {n} nodes is too large for an SDP: its {d}x{d} matrix inequalities need {cost} "
            f"on 2 cores (limits: {MAX_PROGRAM_BYTES / 1e9:.0f} GB, {MAX_PROGRAM_SECONDS / 60:.0f} min); "
            f"use {alternative}")


class _Rejected(Exception):
    """A solve whose answer must not be used; the message says why."""


# ---------------------------------------------------------------------------------------------
# Shared pieces of the edge-weight programs


def node_sums(weights: np.ndarray, edges: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(edges[:, 0], weights, n) + np.bincount(edges[:, 1], weights, n)


def scale_into_budget(weights: np.ndarray, edges: np.ndarray, n: int) -> np.ndarray:
    """Scale down the edges of nodes whose weights sum over 1; scaling only lowers other nodes' sums."""
    sums = node_sums(weights, edges, n)
    return weights / np.maximum(1.0, np.maximum(sums[edges[:, 0]], sums[edges[:, 1]]))


def _one_perp_basis(graph: nx.Graph) -> sp.csc_matrix:
    """Orthonormal basis (n x n-1) of 1-perp with O(n log n) non-zeros.

    Haar vectors over a reverse Cuthill-McKee order: vector k is +a on one half of a span of nodes
    and -b on the other half, zero elsewhere. Edges between nearby nodes cancel in V^T (e_u - e_v)
    for every span that holds both ends, so V^T L V stays sparse and Clarabel can decompose it.
    """
    import scipy.sparse as sp
    from scipy.sparse.csgraph import reverse_cuthill_mckee
    n = graph.number_of_nodes()
    adjacency = sp.csr_matrix(nx.to_scipy_sparse_array(graph, nodelist=range(n)))
    order = reverse_cuthill_mckee(adjacency, symmetric_mode=True)
    rows, cols, vals = [], [], []
    spans = [(0, n)]
    while spans:
        lo, hi = spans.pop()
        if hi - lo < 2:
            continue
        mid = (lo + hi) // 2
        left, right, size = mid - lo, hi - mid, hi - lo
        rows.append(order[lo:hi])
        cols.append(np.full(size, len(cols)))
        vals.append(np.r_[np.full(left, math.sqrt(right / (left * size))),
                          np.full(right, -math.sqrt(left / (right * size)))])
        spans += [(lo, mid), (mid, hi)]
    return sp.csc_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n - 1))


def _incidence(edges: np.ndarray, n: int, signed: bool = True) -> sp.csc_matrix:
    import scipy.sparse as sp
    m = len(edges)
    signs = np.r_[np.ones(m), -np.ones(m) if signed else np.ones(m)]
    return sp.csc_matrix((signs, (edges.T.ravel(), np.r_[np.arange(m), np.arange(m)])), shape=(n, m))


def _outer_columns(b: sp.csc_matrix) -> sp.csc_matrix:
    """Column e of the result is vec(b_e b_e^T), so that vec(sum_e w_e b_e b_e^T) = result @ w."""
    import scipy.sparse as sp
    b = sp.csc_matrix(b)
    b.sort_indices()
    counts = np.diff(b.indptr)
    pairs = counts**2
    column = np.repeat(np.arange(b.shape[1]), pairs)
    local = np.arange(pairs.sum()) - np.repeat(np.cumsum(pairs) - pairs, pairs)
    width = np.repeat(counts, pairs)
    first = np.repeat(b.indptr[:-1], pairs) + local // width
    second = np.repeat(b.indptr[:-1], pairs) + local % width
    rows = b.indices[first] + b.shape[0] * b.indices[second]
    return sp.csc_matrix((b.data[first] * b.data[second], (rows, column)), shape=(b.shape[0] ** 2, b.shape[1]))


def _factor_width(pattern: sp.csc_matrix) -> int:
    """Largest column of a sparse factor of `pattern` in minimum-degree order, about its largest clique."""
    import scipy.sparse as sp
    from scipy.sparse.linalg import splu
    size = pattern.shape[0]
    spd = sp.csc_matrix(pattern + size * sp.eye(size))
    factor = splu(spd, permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0, options={"SymmetricMode": True})
    return int(np.diff(sp.csc_matrix(factor.L).indptr).max())


@dataclass(frozen=True)
class _EdgeProgram:
    """What every edge-variable program needs: the edges and the map w -> V^T L(w) V."""

    edges: np.ndarray
    laplacian_map: sp.csc_matrix  # vec(V^T L(w) V) = laplacian_map @ w, column-major
    default_solver: str

    @classmethod
    def of(cls, graph: nx.Graph) -> _EdgeProgram:
        import scipy.sparse as sp
        n = graph.number_of_nodes()
        edges = edge_array(graph)
        laplacian_map = _outer_columns(_one_perp_basis(graph).T @ _incidence(edges, n))
        occupied = np.unique(laplacian_map.indices)
        pattern = sp.csc_matrix((np.ones(occupied.size), (occupied % (n - 1), occupied // (n - 1))),
                                shape=(n - 1, n - 1))
        solver = "CLARABEL" if _factor_width(pattern) <= CLARABEL_MAX_WIDTH else "SCS"
        return cls(edges, laplacian_map, solver)

    def solver(self, requested: str | None) -> str:
        import cvxpy as cp
        if requested is None:
            return self.default_solver
        if requested.upper() not in cp.installed_solvers():
            raise ValueError(f"solver {requested!r} is not installed; CVXPY has {', '.join(cp.installed_solvers())}")
        return requested.upper()

    def projected_laplacian(self, weights: cp.Expression) -> cp.Expression:
        import cvxpy as cp
        size = math.isqrt(self.laplacian_map.shape[0])
        return cp.reshape(self.laplacian_map @ weights, (size, size), order="F")


def _solve(problem: cp.Problem, solver: str) -> str:
    """Run CVXPY; a solver that raises or ends without a solution becomes _Rejected."""
    import cvxpy as cp
    try:
        with warnings.catch_warnings():  # the status says "optimal_inaccurate" and the answer is checked
            warnings.filterwarnings("ignore", message="Solution may be inaccurate", category=UserWarning)
            problem.solve(solver=solver, **SOLVER_OPTIONS.get(solver, {}))
    except (cp.error.SolverError, ValueError, ArithmeticError, MemoryError) as exc:
        raise _Rejected(f"{solver} raised {type(exc).__name__}: {exc}") from exc
    if problem.status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE):
        raise _Rejected(f"{solver} ended with status {problem.status}")
    return str(problem.status)


def _finite(values: np.ndarray | None, what: str) -> np.ndarray:
    if values is None or not np.all(np.isfinite(values)):
        raise _Rejected(f"solver returned no finite {what}")
    return np.asarray(values, dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# Fastest-mixing weights (SDP)


def fmmc(graph: nx.Graph, solver: str | None = None) -> SolveResult:
    """Fastest-mixing Markov chain: w >= 0 and self-weights >= 0, so W stays a stochastic matrix.

    `solver` names a CVXPY solver; by default Clarabel where the problem decomposes into small
    cliques, else SCS. A failed or unusable solve warns and returns Metropolis weights, with a
    status "fallback: <reason>".
    """
    return _fastest_mixing(graph, "fmmc", nonnegative=True, solver=solver)


def fdla(graph: nx.Graph, solver: str | None = None) -> SolveResult:
    """Fastest distributed linear averaging: signs are free, so SLEM(FDLA) <= SLEM(FMMC), at the cost
    of negative weights (W is no longer a Markov chain, and merges extrapolate)."""
    return _fastest_mixing(graph, "fdla", nonnegative=False, solver=solver)


def _fastest_mixing(graph: nx.Graph, method: str, nonnegative: bool, solver: str | None) -> SolveResult:
    """Minimise s subject to -s I <= V^T (W - 11^T/n) V <= s I, i.e. SLEM(W) <= s, over edge weights."""
    start = time.perf_counter()
    n = topology.validate(graph).number_of_nodes()
    if n == 1:
        return SolveResult(np.eye(1), method, "closed-form", "optimal", time.perf_counter() - start, 0.0)
    check_program_size(n, method, FIRST_ORDER_HINT)
    import cvxpy as cp
    program = _EdgeProgram.of(graph)
    solver = program.solver(solver)
    check_program_size(n, method, FIRST_ORDER_HINT, solver)
    weights, bound = cp.Variable(len(program.edges)), cp.Variable()
    deviation = np.eye(n - 1) - program.projected_laplacian(weights)
    constraints = [deviation << bound * np.eye(n - 1), deviation >> -bound * np.eye(n - 1)]
    if nonnegative:
        constraints += [weights >= 0, _incidence(program.edges, n, signed=False) @ weights <= 1]
    try:
        status = _solve(cp.Problem(cp.Minimize(bound), constraints), solver)
        matrix, slem = checked_matrix(graph, _finite(weights.value, "edge weights"), nonnegative)
    except _Rejected as exc:
        return _metropolis_fallback(graph, method, solver, str(exc), start)
    return SolveResult(matrix, method, solver, status, time.perf_counter() - start, slem)


def checked_matrix(graph: nx.Graph, weights: np.ndarray, nonnegative: bool) -> tuple[np.ndarray, float]:
    """Build W from solved edge weights and refuse it unless it is a usable mixing matrix."""
    if nonnegative:
        weights = _restore_feasibility(weights, edge_array(graph), graph.number_of_nodes())
    matrix = mixing.from_edge_weights(graph, weights)
    try:
        mixing.check(matrix, graph)
    except ValueError as exc:
        raise _Rejected(str(exc)) from exc
    if nonnegative and matrix.min() < -ROUNDING_TOL:
        raise _Rejected(f"a weight of {matrix.min():.3g} in a matrix that must be non-negative")
    slem = mixing.slem(matrix)
    if not slem < 1.0:
        raise _Rejected(f"SLEM {slem:.6f} >= 1: these weights would not converge to the average")
    return matrix, slem


def _restore_feasibility(weights: np.ndarray, edges: np.ndarray, n: int) -> np.ndarray:
    """Round solver noise (w = -1e-9, a self-weight of -1e-7) onto w >= 0 and node sums <= 1."""
    excess = max(-weights.min(), (node_sums(weights, edges, n) - 1.0).max(), 0.0)
    if excess > FEASIBILITY_TOL:
        raise _Rejected(f"solved weights violate w >= 0 or a self-weight >= 0 by {excess:.3g}")
    return scale_into_budget(np.maximum(weights, 0.0), edges, n)


def _metropolis_fallback(graph: nx.Graph, method: str, solver: str, reason: str, start: float) -> SolveResult:
    warnings.warn(f"{method}: {reason}; falling back to Metropolis weights", RuntimeWarning, stacklevel=3)
    matrix = mixing.metropolis(graph)
    return SolveResult(matrix, method, solver, f"fallback: {reason}", time.perf_counter() - start,
                       mixing.slem(matrix))


# ---------------------------------------------------------------------------------------------
# Per-edge Poisson gossip rates (DADAO)


def optimal_rates(graph: nx.Graph, budget: float = 1.0, solver: str | None = None) -> RatesResult:
    """Maximise lambda_2 of L(r) = sum_e r_e (e_u - e_v)(e_u - e_v)^T over r >= 0, sum r = budget.

    Written as V^T L(r) V >= t I on 1-perp; falls back to uniform rates (with a warning) when the
    solver fails or its answer does not check out.
    """
    start = time.perf_counter()
    n = _rates_graph(graph, budget)
    check_program_size(n, "optimal rates", RATES_HINT)
    import cvxpy as cp
    program = _EdgeProgram.of(graph)
    solver = program.solver(solver)
    check_program_size(n, "optimal rates", RATES_HINT, solver)
    rates, floor = cp.Variable(len(program.edges)), cp.Variable()
    problem = cp.Problem(cp.Maximize(floor), [program.projected_laplacian(rates) >> floor * np.eye(n - 1),
                                              rates >= 0, cp.sum(rates) == budget])
    try:
        status = _solve(problem, solver)
        result = _rates_result(graph, _checked_rates(_finite(rates.value, "rates"), budget), "optimal", solver,
                               status, start)
    except _Rejected as exc:
        warnings.warn(f"optimal_rates: {exc}; falling back to uniform rates", RuntimeWarning, stacklevel=2)
        fallback = uniform_rates(graph, budget)
        return replace(fallback, method="optimal", solver=solver, status=f"fallback: {exc}",
                       seconds=time.perf_counter() - start)
    return result


def uniform_rates(graph: nx.Graph, budget: float = 1.0) -> RatesResult:
    """Every edge fires at budget / m: the baseline DADAO's optimised rates are compared with."""
    start = time.perf_counter()
    _rates_graph(graph, budget)
    m = graph.number_of_edges()
    return _rates_result(graph, np.full(m, budget / m), "uniform", "closed-form", "optimal", start)


def _rates_graph(graph: nx.Graph, budget: float) -> int:
    n = topology.validate(graph).number_of_nodes()
    if n < 2 or not budget > 0:
        raise ValueError(f"gossip rates need at least two nodes and a positive budget (n={n}, budget={budget})")
    return n


def _checked_rates(rates: np.ndarray, budget: float) -> np.ndarray:
    """Round solver noise onto r >= 0, sum r = budget; larger violations mean a failed solve."""
    if rates.min() < -FEASIBILITY_TOL * budget:
        raise _Rejected(f"solved rates go negative ({rates.min():.3g})")
    rates = np.maximum(rates, 0.0)
    return rates * (budget / rates.sum())


def _rates_result(graph: nx.Graph, rates: np.ndarray, method: str, solver: str, status: str,
                  start: float) -> RatesResult:
    edges = edge_array(graph)
    laplacian = np.eye(graph.number_of_nodes()) - mixing.from_edge_weights(graph, rates)
    lambda2 = float(np.linalg.eigvalsh(laplacian)[1])
    if not lambda2 > 0:
        raise _Rejected(f"rates leave the graph disconnected (lambda_2 = {lambda2:.3g})")
    pseudo_inverse = np.linalg.pinv(laplacian, hermitian=True)
    u, v = edges[:, 0], edges[:, 1]
    resistance = pseudo_inverse[u, u] + pseudo_inverse[v, v] - 2.0 * pseudo_inverse[u, v]
    return RatesResult(rates, [(int(a), int(b)) for a, b in edges], lambda2, 1.0 / lambda2,
                       float(resistance.max()), method, solver, status, time.perf_counter() - start)
