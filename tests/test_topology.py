import networkx as nx
import pytest

from gossipfl.graph import topology
from gossipfl.graph.topology import TopologyError


@pytest.mark.parametrize("kind", topology.KINDS)
def test_every_builder_gives_a_valid_graph_on_0_to_n_minus_1(kind):
    g = topology.build(kind, 16, seed=3, p=0.3, degree=4, radius=0.5, k=4)
    assert set(g.nodes) == set(range(16))
    assert nx.is_connected(g)
    assert nx.number_of_selfloops(g) == 0


def test_builders_have_their_expected_shape():
    assert all(d == 2 for _, d in topology.build("ring", 10).degree)
    assert all(d == 4 for _, d in topology.build("torus", 16).degree)
    assert sorted(d for _, d in topology.build("grid", 12, rows=3).degree)[:4] == [2, 2, 2, 2]
    assert topology.build("complete", 7).number_of_edges() == 21
    assert max(d for _, d in topology.build("star", 9).degree) == 8
    assert all(d == 3 for _, d in topology.build("random_regular", 12, degree=3, seed=1).degree)
    assert all(d == 7 for _, d in topology.build("exponential", 16).degree)  # +-1, +-2, +-4 and +8


def test_random_builders_are_seeded():
    a = topology.build("erdos_renyi", 30, seed=5, p=0.2)
    b = topology.build("erdos_renyi", 30, seed=5, p=0.2)
    c = topology.build("erdos_renyi", 30, seed=6, p=0.2)
    assert set(a.edges) == set(b.edges) != set(c.edges)


def test_rejects_disconnected_graph_self_loops_and_bad_ids():
    g = nx.Graph([(0, 1), (2, 3)])
    with pytest.raises(TopologyError, match="disconnected"):
        topology.validate(g)
    with pytest.raises(TopologyError, match="self-loops"):
        topology.validate(nx.Graph([(0, 1), (1, 1)]))
    with pytest.raises(TopologyError, match="0..2"):
        topology.validate(nx.Graph([(0, 1), (1, 5)]))
    with pytest.raises(TopologyError, match="unknown topology kind 'moebius'"):
        topology.build("moebius", 4)
    with pytest.raises(TopologyError, match="connected Erdos-Renyi"):
        topology.build("erdos_renyi", 50, p=0.0)


@pytest.mark.parametrize("suffix", [".edgelist", ".txt", ".graphml", ".json"])
def test_graph_files_round_trip(tmp_path, suffix):
    g = topology.build("random_geometric", 20, seed=2, radius=0.5)
    path = topology.write_graph(g, tmp_path / f"g{suffix}")
    back = topology.read_graph(path)
    assert set(back.nodes) == set(g.nodes)
    assert {frozenset(e) for e in back.edges} == {frozenset(e) for e in g.edges}


def test_edge_list_keeps_isolated_ids_and_rejects_bad_files(tmp_path):
    (tmp_path / "iso.edgelist").write_text("# nodes 3\n0 1\n")
    with pytest.raises(TopologyError, match="disconnected"):
        topology.read_graph(tmp_path / "iso.edgelist")
    (tmp_path / "names.txt").write_text("a b\n")
    with pytest.raises(TopologyError, match="not an integer"):
        topology.read_graph(tmp_path / "names.txt")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(TopologyError, match="cannot parse"):
        topology.read_graph(tmp_path / "bad.json")
    with pytest.raises(TopologyError, match="unknown graph file type"):
        topology.read_graph(tmp_path / "g.gexf")
    with pytest.raises(TopologyError, match="not found"):
        topology.read_graph(tmp_path / "missing.json")


def test_example_topologies_load():
    from pathlib import Path
    files = sorted((Path(__file__).parent.parent / "topologies").glob("*.*"))
    graphs = [f for f in files if f.suffix in topology.GRAPH_FORMATS]
    assert graphs, "topologies/ should ship example graphs"
    for f in graphs:
        assert topology.read_graph(f).number_of_nodes() > 1
