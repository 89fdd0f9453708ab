"""The final merge: end a run with the exact average of the live nodes' models, over the same
sockets the gossip used (after "A Single Merging Suffices", Gholami et al.: one exact averaging
at the end recovers most of the gap between decentralized and centralized training).

Three phases, each over graph edges only, so every message goes to a neighbour:

1. **Who is live.** For n - 1 steps each node sends its neighbours the nodes it knows to be dead
   and takes in theirs; a neighbour silent in a step is dead. After n - 1 steps every node of a
   connected live component knows the same dead set (when nobody dies meanwhile).
2. **Up the tree.** Every node computes the same spanning tree of its live component: breadth
   first from the lowest live id, neighbours in id order. Each node waits for its children's
   (mean, count), folds in its own model (in float64) and sends the result to its parent.
3. **Down the tree.** The root's average goes back down; every node that receives it holds the
   exact average of the models that took part, and how many they were.

Timeouts keep a dead node from stalling the rest. The first step of phase 1 waits deadline_s
(neighbours may still be finishing their last round); a later step waits twice that, as a
neighbour may itself have waited out a dead neighbour in the step before. A node waits for its
children deadline_s per level of its subtree (plus one), for its parent's average deadline_s per
level of the tree plus its depth (plus two). A child that missed its slot is left out (with its subtree), so the average
is over the live nodes that took part, and `nodes` says how many. It is exact, not robust: every
listed model counts alike (config refuses it together with attackers).
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import torch

from ..transport import Message, Transport

LIVE, UP, DOWN = "merge_live", "merge_up", "merge_down"  # message kinds (transport/wire.py lists them)
KINDS = frozenset({LIVE, UP, DOWN})
BAD = "bad_final_merge"  # rejected-count reason for a merge message whose claims do not fit the tree


@dataclass
class MergeResult:
    vector: torch.Tensor | None  # the average, or None where it did not reach this node
    nodes: int                   # models in the average (0 where it did not reach this node)
    live: int                    # nodes this node took to be live


@dataclass(frozen=True)
class Tree:
    """A spanning tree: each node's parent (None at the root), children, depth and height."""
    root: int
    parent: dict[int, int | None]
    children: dict[int, list[int]]
    depth: dict[int, int]
    height: dict[int, int]   # longest path down to a leaf
    size: dict[int, int]     # nodes in the subtree


def spanning_tree(graph: nx.Graph, live: set[int], node: int) -> Tree:
    """The breadth-first tree of `node`'s component among the `live` nodes, from its lowest id,
    neighbours visited in id order: the same tree on every node that agrees on `live`."""
    component = nx.node_connected_component(graph.subgraph(live), node)
    root = min(component)
    bfs = nx.bfs_tree(graph.subgraph(component), root, sort_neighbors=sorted)
    parent: dict[int, int | None] = {root: None}
    depth = {root: 0}
    order = list(nx.topological_sort(bfs))  # parents before children
    for v in order[1:]:
        (parent[v],) = bfs.predecessors(v)
        depth[v] = depth[parent[v]] + 1
    children = {v: sorted(bfs.successors(v)) for v in order}
    height, size = {}, {}
    for v in reversed(order):
        height[v] = 1 + max((height[c] for c in children[v]), default=-1)
        size[v] = 1 + sum(size[c] for c in children[v])
    return Tree(root, parent, children, depth, height, size)


def final_merge(transport: Transport, node: int, graph: nx.Graph, vector: torch.Tensor, round_index: int,
                deadline_s: float) -> MergeResult:
    """Run this node's part of the final merge of `vector` (its final model); every live node of
    the graph calls it with the same `round_index` (the last round). Sets `transport.deadline_s`."""
    neighbours = set(graph.neighbors(node))
    dead = who_is_dead(transport, node, graph.number_of_nodes(), neighbours, round_index, deadline_s)
    tree = spanning_tree(graph, set(graph.nodes) - dead, node)
    transport.deadline_s = deadline_s * (tree.height[node] + 1)
    got = transport.receive(UP, round_index, 0, set(tree.children[node]))
    own = vector.detach().reshape(-1).double()
    total, count = own.clone(), 1
    for child, message in sorted(got.items()):
        claimed = message.extra.get("count")
        if type(claimed) is not int or not 1 <= claimed <= tree.size[child]:
            transport.rejected[BAD] += 1
            continue
        total.add_(message.vector.double(), alpha=claimed)
        count += claimed
    mean = (total / count).float()
    if tree.parent[node] is None:
        average, nodes = mean, count
    else:
        transport.send(tree.parent[node], Message(UP, node, round_index, 0, mean, {"count": count}))
        transport.deadline_s = deadline_s * (tree.height[tree.root] + tree.depth[node] + 2)
        got = transport.receive(DOWN, round_index, 0, {tree.parent[node]})
        message = got.get(tree.parent[node])
        claimed = message.extra.get("count") if message else None
        if message is None or type(claimed) is not int or not count <= claimed <= len(tree.parent):
            transport.rejected[BAD] += message is not None
            return MergeResult(None, 0, len(tree.parent))
        average, nodes = message.vector.clone(), claimed
    for child in tree.children[node]:
        transport.send(child, Message(DOWN, node, round_index, 0, average, {"count": nodes}))
    return MergeResult(average, nodes, len(tree.parent))


def who_is_dead(transport: Transport, node: int, n: int, neighbours: set[int], round_index: int,
                deadline_s: float) -> set[int]:
    """Phase 1: n - 1 steps of telling neighbours the dead nodes one knows of; a neighbour silent in
    a step is dead. Later steps wait only for the neighbours that answered before."""
    dead: set[int] = set()
    empty = torch.empty(0)
    for step in range(n - 1):
        message = Message(LIVE, node, round_index, step, empty, {"dead": sorted(dead)})
        expected = neighbours - dead
        for j in expected:
            transport.send(j, message)
        transport.deadline_s = deadline_s if step == 0 else 2 * deadline_s
        got = transport.receive(LIVE, round_index, step, expected)
        dead |= expected - set(got)
        for message in got.values():
            told = message.extra.get("dead")
            if not isinstance(told, list) or not all(type(i) is int and 0 <= i < n for i in told):
                transport.rejected[BAD] += 1
                continue
            dead.update(told)
        dead.discard(node)
    return dead
