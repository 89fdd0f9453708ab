import gzip

import numpy as np
import pytest
import torch

from gossipfl import data
from gossipfl.data import DatasetError


def labels(n=3000, classes=10, seed=0):
    return np.random.default_rng(seed).integers(0, classes, n)


@pytest.mark.parametrize("method", ["iid", "dirichlet", "shards"])
def test_partitions_cover_every_sample_exactly_once(method):
    y = labels()
    parts = data.partition(y, 16, method, seed=4, alpha=0.3, shards_per_node=2)
    assert len(parts) == 16
    joined = np.concatenate(parts)
    assert len(joined) == len(y)
    assert np.array_equal(np.sort(joined), np.arange(len(y)))
    assert min(len(p) for p in parts) > 0
    again = data.partition(y, 16, method, seed=4, alpha=0.3, shards_per_node=2)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def test_dirichlet_skew_grows_as_alpha_shrinks_and_shards_limit_labels():
    y = labels(6000)

    def mean_labels(parts, share=0.05):
        return np.mean([np.sum(np.bincount(y[p], minlength=10) > share * len(p)) for p in parts])

    skewed = data.partition(y, 10, "dirichlet", seed=0, alpha=0.1)
    mild = data.partition(y, 10, "dirichlet", seed=0, alpha=100.0)
    assert mean_labels(skewed) < 5 < mean_labels(mild)
    shards = data.partition(y, 10, "shards", seed=0, shards_per_node=2)
    assert max(len(np.unique(y[p])) for p in shards) <= 4  # two shards, each straddling <= 2 labels


def test_local_test_slices_are_disjoint_and_follow_the_node_label_mix():
    y_train, y_test = labels(4000), labels(1000, seed=1)
    parts = data.partition(y_train, 8, "shards", seed=0, shards_per_node=1)
    local = data.local_test_split(parts, y_train, y_test, seed=0)
    joined = np.concatenate(local)
    assert len(joined) == len(set(joined.tolist())) <= len(y_test)
    for train, test in zip(parts, local):
        assert set(y_test[test]) <= set(y_train[train])


def write_idx(path, array, gz):
    codes = {np.uint8: 0x08}
    header = bytes([0, 0, codes[array.dtype.type], array.ndim]) + b"".join(
        d.to_bytes(4, "big") for d in array.shape)
    body = header + array.tobytes()
    (gzip.open if gz else open)(path, "wb").write(body)


@pytest.mark.parametrize("gz", [False, True])
def test_reads_any_directory_of_idx_files(tmp_path, gz, monkeypatch):
    rng = np.random.default_rng(0)
    images = {"train": rng.integers(0, 256, (50, 28, 28), dtype=np.uint8),
              "t10k": rng.integers(0, 256, (20, 28, 28), dtype=np.uint8)}
    for split, img in images.items():
        suffix = ".gz" if gz else ""
        write_idx(tmp_path / f"{split}-images-idx3-ubyte{suffix}", img, gz)
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte{suffix}", rng.integers(0, 10, len(img), dtype=np.uint8), gz)
    ds = data.load("fashion-mnist", str(tmp_path))
    assert ds.train_inputs().shape == (50, 1, 28, 28) and ds.test_inputs().shape == (20, 1, 28, 28)
    assert ds.num_classes == 10 and ds.y_train.dtype.is_floating_point is False
    assert abs(float(ds.train_inputs().mean())) < 1e-5  # normalised with training statistics
    assert float(ds.train_inputs().std()) == pytest.approx(1.0, rel=1e-3)
    assert ds.train_stored.dtype == torch.uint8  # a quarter of float32 until a node takes its slice
    monkeypatch.setenv("GOSSIPFL_DATA", str(tmp_path))
    assert data.data_dir() == tmp_path and data.resolve_name("auto") == "fashion-mnist"


def test_bad_idx_and_missing_dataset_explain_themselves(tmp_path, monkeypatch):
    (tmp_path / "x").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(DatasetError, match="bad magic"):
        data.read_idx(tmp_path / "x")
    write_idx(tmp_path / "short", np.zeros((4, 3), dtype=np.uint8), gz=False)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-2])
    with pytest.raises(DatasetError, match="header says 12"):
        data.read_idx(tmp_path / "short")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist"):
        data.load("mnist", str(empty))
    monkeypatch.setenv("GOSSIPFL_DATA", str(empty))  # a named folder is used, not swapped for digits
    with pytest.raises(DatasetError, match="no t.*-idx.-ubyte.* in .*empty"):
        data.load("auto")


def test_digits_and_synthetic_are_offline_and_seeded():
    d = data.load("digits", seed=3)
    assert d.input_shape == (1, 8, 8) and len(d.y_train) + len(d.y_test) == 1797
    assert set(d.y_test.tolist()) == set(range(10))
    s1 = data.load("synthetic", seed=1, synthetic=(500, 6, 3))
    s2 = data.load("synthetic", seed=1, synthetic=(500, 6, 3))
    assert s1.input_shape == (6,) and s1.num_classes == 3
    assert (s1.train_inputs() == s2.train_inputs()).all()


def test_too_many_nodes_for_the_data_is_an_error():
    with pytest.raises(DatasetError, match="nodes but only"):
        data.partition(labels(5), 10, "iid", seed=0)
