"""The one table of mixing-weight methods, and W.json, the stored form every node of a run loads.

Closed-form heuristics come from `mixing`, fastest-mixing weights from the SDPs in `sdp`, and
first-order FMMC from `first_order` for graphs beyond an SDP's reach.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import networkx as nx
import numpy as np

from . import first_order, mixing, sdp, topology
from .sdp import SolveResult


def _heuristic(name: str) -> Callable[[nx.Graph], SolveResult]:
    def solve(graph: nx.Graph) -> SolveResult:
        start = time.perf_counter()
        matrix = mixing.HEURISTICS[name](topology.validate(graph))
        return SolveResult(matrix, name, "closed-form", "optimal", time.perf_counter() - start, mixing.slem(matrix))
    return solve


METHODS: dict[str, Callable[[nx.Graph], SolveResult]] = {
    **{name: _heuristic(name) for name in mixing.HEURISTICS},
    "fmmc": sdp.fmmc,
    "fdla": sdp.fdla,
    "fmmc_first_order": first_order.fmmc_first_order,
}


def solve_weights(graph: nx.Graph, method: str) -> SolveResult:
    """Mixing weights by name (a key of METHODS)."""
    if method not in METHODS:
        raise ValueError(f"unknown weight method {method!r}; choose one of {', '.join(METHODS)}")
    return METHODS[method](graph)


def to_json(result: SolveResult) -> dict[str, Any]:
    """A JSON-ready dict; floats survive json's repr exactly, so every node loads the same W."""
    return {"n": int(result.matrix.shape[0]), "method": result.method, "solver": result.solver,
            "status": result.status, "seconds": float(result.seconds), "slem": float(result.slem),
            "matrix": result.matrix.tolist()}


def from_json(data: dict[str, Any], graph: nx.Graph | None = None) -> SolveResult:
    """Load a stored W and refuse it unless it is a mixing matrix (on `graph`, when given) whose SLEM
    matches the recorded one: a hand-edited or truncated W.json must not silently change a run."""
    try:
        matrix = np.array(data["matrix"], dtype=np.float64)
        n, method, slem = int(data["n"]), str(data["method"]), float(data["slem"])
        result = SolveResult(matrix, method, str(data["solver"]), str(data["status"]), float(data["seconds"]), slem)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not a stored mixing matrix: {exc!r}") from exc
    if matrix.shape != (n, n):
        raise ValueError(f"stored matrix has shape {matrix.shape}, expected ({n}, {n})")
    support = graph if graph is not None else nx.from_numpy_array((matrix != 0).astype(np.float64))
    mixing.check(matrix, support, doubly_stochastic=method != "uniform_neighbourhood")
    measured = mixing.slem(matrix)
    if not math.isclose(measured, slem, rel_tol=1e-9, abs_tol=1e-12):
        raise ValueError(f"stored matrix has SLEM {measured:.12g} but records {slem:.12g}")
    return result
