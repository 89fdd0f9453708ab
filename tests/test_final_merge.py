"""The final merge: the tree every live node computes alike, the exact average over real ZeroMQ
sockets with a dead node left out, and a launched run whose merged model is the mean of the
nodes' final vectors."""

import json
import threading

import networkx as nx
import numpy as np
import pytest
import torch

from gossipfl.runtimes.final_merge import KINDS, final_merge, spanning_tree
from gossipfl.runtimes.launch import launch
from gossipfl.runtimes.process import node_dir
from gossipfl.transport.base import Message
from gossipfl.transport.zmq import ZmqTransport
from zmq_helpers import LAYOUT, free_endpoints

SIZE = 257


def test_the_tree_is_breadth_first_from_the_lowest_live_id():
    ring = nx.cycle_graph(6)
    tree = spanning_tree(ring, set(range(6)), 4)
    assert tree.root == 0 and tree.parent == {0: None, 1: 0, 5: 0, 2: 1, 4: 5, 3: 2}
    assert tree.height[0] == 3 and tree.size[0] == 6 and tree.size[5] == 2
    cut = spanning_tree(ring, {1, 2, 4, 5}, 5)  # 0 and 3 dead: two parts, each with its own root
    assert cut.root == 4 and sorted(cut.parent) == [4, 5]
    assert spanning_tree(ring, {1, 2, 4, 5}, 2).root == 1


def run_merge(graph, vectors, live, deadline_s=0.5, tamper=None):
    """Every live node's final_merge in its own thread over its own ZmqTransport; the dead ones never start."""
    endpoints = free_endpoints(graph.number_of_nodes())
    transports = {i: ZmqTransport(i, endpoints[i], {j: endpoints[j] for j in graph.neighbors(i)}, LAYOUT, SIZE,
                                  deadline_s=deadline_s, kinds=KINDS) for i in live}
    if tamper:
        tamper(transports)
    results = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(
        i, final_merge(transports[i], i, graph, vectors[i], 9, deadline_s))) for i in live]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        return results, transports
    finally:
        for transport in transports.values():
            transport.close()


def test_the_final_merge_is_the_exact_mean_of_the_live_nodes_with_a_dead_one_left_out():
    graph = nx.cycle_graph(6)
    graph.add_edge(0, 3)
    g = torch.Generator().manual_seed(0)
    vectors = [torch.randn(SIZE, generator=g) * 3 + i for i in range(6)]
    live = [0, 1, 3, 4, 5]  # node 2 is dead: the tree goes round it
    results, _ = run_merge(graph, vectors, live)
    expected = torch.stack([vectors[i] for i in live]).double().mean(0)
    for i in live:
        assert results[i].nodes == 5 and results[i].live == 5
        np.testing.assert_allclose(results[i].vector.numpy(), expected.numpy(), rtol=0, atol=1e-6)


def test_a_child_claiming_more_models_than_its_subtree_is_left_out_and_counted():
    graph = nx.path_graph(3)  # 0 - 1 - 2: node 2 is a leaf, node 1 its parent
    vectors = [torch.full((SIZE,), float(i)) for i in range(3)]
    lie = {}

    def tamper(transports):  # node 2 claims its model stands for 50
        real = transports[2].send

        def send(dst, message):
            if message.kind == "merge_up":
                message = Message(message.kind, message.sender, message.round, message.step, message.vector,
                                  {"count": 50})
                lie["sent"] = True
            real(dst, message)
        transports[2].send = send

    results, transports = run_merge(graph, vectors, [0, 1, 2], tamper=tamper)
    assert lie and transports[1].rejected["bad_final_merge"] == 1
    assert results[0].nodes == 2 and float(results[0].vector[0]) == pytest.approx(0.5)


def test_launch_with_final_merge_reports_the_average_of_the_final_vectors(small_config, tmp_path):
    cfg = small_config(topology__nodes=5, rounds=2, deploy__final_merge=True)
    summary = launch(cfg, tmp_path / "run", progress=False)
    finals = [np.load(node_dir(tmp_path / "run", i) / "final.npy", allow_pickle=False) for i in range(5)]
    mean = np.mean(np.stack(finals).astype(np.float64), axis=0)
    assert not np.allclose(finals[0], finals[1], atol=1e-6)  # the gossip alone leaves the models apart
    for i in range(5):
        merged = np.load(node_dir(tmp_path / "run", i) / "merged.npy", allow_pickle=False)
        np.testing.assert_allclose(merged, mean, rtol=0, atol=1e-6)
        node = json.loads((node_dir(tmp_path / "run", i) / "summary.json").read_text())
        assert node["final_merge_nodes"] == 5 and node["final_merge_accuracy"] == summary["final_merge_accuracy"]
    assert summary["final_merge_nodes"] == 5 and summary["final_merge_reached"] == 5
    assert summary["final_merge_accuracy"] == pytest.approx(summary["final_accuracy_average_model"], abs=1e-9)
