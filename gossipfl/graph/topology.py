"""Communication graphs: builders, graph files and the checks every topology must pass.

Nodes are always the integers 0..n-1 so that a node id is also its row in a mixing matrix.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import networkx as nx

from ..errors import UserError


class TopologyError(UserError, ValueError):
    """A graph that cannot be used for gossip (disconnected, self-loops, bad ids, bad file)."""


def validate(graph: nx.Graph) -> nx.Graph:
    """Return `graph` if it is usable for gossip, else raise TopologyError saying why."""
    n = graph.number_of_nodes()
    if n == 0:
        raise TopologyError("topology has no nodes")
    if graph.is_directed():
        raise TopologyError("topology must be undirected")
    if set(graph.nodes) != set(range(n)):
        bad = sorted(map(repr, set(graph.nodes) - set(range(n))))[:5]
        raise TopologyError(f"node ids must be the integers 0..{n - 1}; found {', '.join(bad)}")
    loops = list(nx.selfloop_edges(graph))
    if loops:
        raise TopologyError(f"topology has self-loops at nodes {sorted(u for u, _ in loops)[:10]}")
    if n > 1 and not nx.is_connected(graph):
        parts = nx.number_connected_components(graph)
        raise TopologyError(f"topology is disconnected ({parts} components): gossip cannot reach every node")
    return graph


def _relabel(graph: nx.Graph) -> nx.Graph:
    """Plain undirected graph on 0..n-1 in a stable order (grid tuples, string ids)."""
    mapping = {node: i for i, node in enumerate(sorted(graph.nodes, key=_sort_key))}
    out = nx.Graph()
    out.add_nodes_from(range(len(mapping)))
    out.add_edges_from((mapping[u], mapping[v]) for u, v in graph.edges)
    return out


def _sort_key(node: object) -> tuple:
    return (0, node) if isinstance(node, (int, tuple)) else (1, str(node))


def _retry_connected(make: Callable[[int], nx.Graph], seed: int, what: str, tries: int = 200) -> nx.Graph:
    for attempt in range(tries):
        graph = make(seed + attempt * 7919)
        if nx.is_connected(graph):
            return graph
    raise TopologyError(f"could not draw a connected {what} in {tries} tries; raise its density parameter")


def ring(n: int) -> nx.Graph:
    return nx.cycle_graph(n) if n > 2 else nx.path_graph(n)


def grid(rows: int, cols: int, periodic: bool = False) -> nx.Graph:
    return _relabel(nx.grid_2d_graph(rows, cols, periodic=periodic))


def exponential(n: int) -> nx.Graph:
    """Each node i links to i + 2^k (mod n) for every 2^k < n: log-diameter, log-degree."""
    graph = nx.Graph()
    graph.add_nodes_from(range(n))
    k = 1
    while k < n:
        graph.add_edges_from((i, (i + k) % n) for i in range(n) if (i + k) % n != i)
        k *= 2
    return graph


def erdos_renyi(n: int, p: float, seed: int) -> nx.Graph:
    return _retry_connected(lambda s: nx.gnp_random_graph(n, p, seed=s), seed, f"Erdos-Renyi graph (p={p})")


def random_regular(n: int, degree: int, seed: int) -> nx.Graph:
    if degree >= n or (n * degree) % 2:
        raise TopologyError(f"random_regular needs degree < n and n*degree even (n={n}, degree={degree})")
    return _retry_connected(lambda s: nx.random_regular_graph(degree, n, seed=s), seed, "random regular graph")


def random_geometric(n: int, radius: float, seed: int) -> nx.Graph:
    return _retry_connected(lambda s: nx.random_geometric_graph(n, radius, seed=s), seed,
                            f"random geometric graph (radius={radius})")


def small_world(n: int, k: int, p: float, seed: int) -> nx.Graph:
    return _retry_connected(lambda s: nx.watts_strogatz_graph(n, k, p, seed=s), seed, "small-world graph")


def build(kind: str, n: int, *, seed: int = 0, p: float = 0.3, degree: int = 4, radius: float = 0.4,
          k: int = 4, rows: int = 0) -> nx.Graph:
    """Build a named topology on nodes 0..n-1 (`rows` = 0 picks the squarest grid)."""
    if n < 1:
        raise TopologyError(f"topology needs at least one node, got nodes={n}")
    if kind in ("grid", "torus"):
        rows = rows or _squarest_factor(n)
        if n % rows:
            raise TopologyError(f"grid rows={rows} does not divide nodes={n}")
        graph = grid(rows, n // rows, periodic=kind == "torus" and min(rows, n // rows) > 2)
    else:
        builders: dict[str, Callable[[], nx.Graph]] = {
            "ring": lambda: ring(n),
            "complete": lambda: nx.complete_graph(n),
            "star": lambda: nx.star_graph(n - 1),
            "erdos_renyi": lambda: erdos_renyi(n, p, seed),
            "random_regular": lambda: random_regular(n, degree, seed),
            "random_geometric": lambda: random_geometric(n, radius, seed),
            "small_world": lambda: small_world(n, k, p, seed),
            "exponential": lambda: exponential(n),
        }
        if kind not in builders:
            raise TopologyError(f"unknown topology kind {kind!r}; choose one of {', '.join(KINDS)}")
        graph = _relabel(builders[kind]())
    return validate(graph)


KINDS = ("ring", "grid", "torus", "complete", "star", "erdos_renyi", "random_regular",
         "random_geometric", "small_world", "exponential")


def _squarest_factor(n: int) -> int:
    return max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)


GRAPH_FORMATS = {".edgelist": "edgelist", ".edges": "edgelist", ".txt": "edgelist",
                 ".graphml": "graphml", ".json": "json"}


def _format_of(path: Path) -> str:
    try:
        return GRAPH_FORMATS[path.suffix.lower()]
    except KeyError:
        raise TopologyError(f"{path}: unknown graph file type {path.suffix!r}; use one of "
                            f"{', '.join(GRAPH_FORMATS)}") from None


def write_graph(graph: nx.Graph, path: str | Path) -> Path:
    """Write `graph` as an edge list, GraphML or node-link JSON, chosen by the file suffix."""
    path = Path(path)
    fmt = _format_of(path)
    if fmt == "edgelist":
        lines = [f"# nodes {graph.number_of_nodes()}"] + [f"{u} {v}" for u, v in sorted(graph.edges)]
        path.write_text("\n".join(lines) + "\n")
    elif fmt == "graphml":
        nx.write_graphml(graph, path)
    else:
        data = {"nodes": sorted(graph.nodes), "edges": [list(e) for e in sorted(graph.edges)]}
        path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def read_graph(path: str | Path) -> nx.Graph:
    """Read and validate a graph file; node ids must be (or spell) the integers 0..n-1."""
    path = Path(path)
    fmt = _format_of(path)
    if not path.is_file():
        raise TopologyError(f"graph file not found: {path}")
    try:
        if fmt == "edgelist":
            graph = _read_edgelist(path.read_text())
        elif fmt == "graphml":
            graph = nx.read_graphml(path)
        else:
            data = json.loads(path.read_text())
            graph = nx.Graph()
            graph.add_nodes_from(data.get("nodes", []))
            graph.add_edges_from(tuple(e[:2]) for e in data["edges"])
    except (ValueError, KeyError, TypeError, IndexError, nx.NetworkXError) as exc:
        raise TopologyError(f"{path}: cannot parse {fmt} graph: {exc}") from exc
    return validate(_integer_ids(nx.Graph(graph), path))


def _read_edgelist(text: str) -> nx.Graph:
    graph = nx.Graph()
    for line in text.splitlines():
        words = line.split()
        if len(words) == 3 and words[:2] == ["#", "nodes"]:
            graph.add_nodes_from(str(i) for i in range(int(words[2])))
        elif words and not words[0].startswith("#"):
            graph.add_edge(words[0], words[1])
    return graph


def _integer_ids(graph: nx.Graph, path: Path) -> nx.Graph:
    def as_int(node: object) -> int:
        try:
            return int(node)  # type: ignore[call-overload]
        except (TypeError, ValueError):
            raise TopologyError(f"{path}: node id {node!r} is not an integer") from None
    return nx.relabel_nodes(graph, {node: as_int(node) for node in graph.nodes})
