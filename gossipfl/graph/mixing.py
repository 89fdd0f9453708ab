"""Gossip mixing matrices from a graph, and the spectral quantities that govern how fast they mix.

A mixing matrix W is n x n with W[i, j] > 0 only on edges and the diagonal. Symmetric, doubly
stochastic W keeps the network average; its SLEM ||W - 11^T/n||_2 sets the consensus rate.
"""

from __future__ import annotations

from typing import Callable

import networkx as nx
import numpy as np


def _degrees(graph: nx.Graph) -> np.ndarray:
    return np.array([graph.degree(i) for i in range(graph.number_of_nodes())], dtype=np.float64)


def edge_array(graph: nx.Graph) -> np.ndarray:
    """Edges as an m x 2 array in graph.edges order: the order of every per-edge weight vector."""
    return np.array(list(graph.edges), dtype=np.int64).reshape(-1, 2)


def from_edge_weights(graph: nx.Graph, weights: np.ndarray) -> np.ndarray:
    """W = I - sum_e w_e (e_u - e_v)(e_u - e_v)^T: symmetric with rows summing to one by construction."""
    n = graph.number_of_nodes()
    edges = edge_array(graph)
    w = np.zeros((n, n))
    if len(edges):
        u, v = edges[:, 0], edges[:, 1]
        w[u, v] = weights
        w[v, u] = weights
    w[np.diag_indices(n)] = 1.0 - w.sum(axis=1)
    return w


def metropolis(graph: nx.Graph) -> np.ndarray:
    """Metropolis-Hastings: w_uv = 1 / (1 + max(d_u, d_v)); needs only the two endpoints' degrees."""
    d = _degrees(graph)
    edges = edge_array(graph)
    if not len(edges):
        return np.eye(graph.number_of_nodes())
    return from_edge_weights(graph, 1.0 / (1.0 + np.maximum(d[edges[:, 0]], d[edges[:, 1]])))


def max_degree(graph: nx.Graph) -> np.ndarray:
    """Every edge gets 1 / (d_max + 1), so every self-weight stays positive (no periodic chains)."""
    d = _degrees(graph)
    return from_edge_weights(graph, np.full(graph.number_of_edges(), 1.0 / (d.max() + 1.0)))


def uniform_neighbourhood(graph: nx.Graph) -> np.ndarray:
    """Row i averages i and its neighbours equally. Row stochastic only: it drifts the average."""
    n = graph.number_of_nodes()
    w = nx.to_numpy_array(graph, nodelist=range(n)) + np.eye(n)
    return w / w.sum(axis=1, keepdims=True)


def best_constant(graph: nx.Graph) -> np.ndarray:
    """W = I - a L with a = 2 / (lambda_max(L) + lambda_2(L)), the best single edge weight (Xiao & Boyd)."""
    n = graph.number_of_nodes()
    if n == 1:
        return np.eye(1)
    lap = nx.laplacian_matrix(graph, nodelist=range(n)).toarray().astype(np.float64)
    eig = np.linalg.eigvalsh(lap)
    return np.eye(n) - (2.0 / (eig[-1] + eig[1])) * lap


HEURISTICS: dict[str, Callable[[nx.Graph], np.ndarray]] = {
    "metropolis": metropolis,
    "max_degree": max_degree,
    "uniform_neighbourhood": uniform_neighbourhood,
    "best_constant": best_constant,
}


def slem(w: np.ndarray) -> float:
    """Second largest eigenvalue modulus, as ||W - 11^T/n||_2 (valid for non-symmetric W too)."""
    n = w.shape[0]
    return float(np.linalg.norm(w - np.full((n, n), 1.0 / n), ord=2))


def spectral_gap(w: np.ndarray) -> float:
    return 1.0 - slem(w)


def power(w: np.ndarray, q: int) -> np.ndarray:
    """W^Q: the effective matrix of Q gossip steps in a row."""
    return np.linalg.matrix_power(w, q)


def check(w: np.ndarray, graph: nx.Graph, *, tol: float = 1e-8, doubly_stochastic: bool = True) -> None:
    """Raise ValueError unless W is finite, n x n, supported on graph + diagonal, and stochastic."""
    n = graph.number_of_nodes()
    if w.shape != (n, n) or not np.all(np.isfinite(w)):
        raise ValueError(f"mixing matrix must be a finite {n}x{n} array, got shape {w.shape}")
    allowed = nx.to_numpy_array(graph, nodelist=range(n)) + np.eye(n) > 0
    if np.any(np.abs(w[~allowed]) > tol):
        raise ValueError("mixing matrix has weight on a pair that is not an edge")
    if np.any(np.abs(w.sum(axis=1) - 1.0) > tol):
        raise ValueError("mixing matrix rows do not sum to 1")
    if doubly_stochastic and np.any(np.abs(w - w.T) > tol):
        raise ValueError("mixing matrix is not symmetric")
