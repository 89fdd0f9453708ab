"""Datasets that work offline, and seeded partitions of them across nodes.

Every training sample goes to exactly one node. Each node also gets a disjoint slice of the test
set drawn with its own label mix, for local evaluation; global metrics use the whole test set.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import UserError

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DatasetError(UserError, RuntimeError):
    """A dataset that cannot be found or read; the message says how to get it."""


@dataclass
class Dataset:
    """Training inputs stay in their stored form (uint8 for IDX images: a quarter of float32) and
    are normalised per node slice by `train_inputs`, so a node process holds one float copy of its
    own data only. Test inputs are normalised once: every evaluation uses all of them."""
    name: str
    train_stored: torch.Tensor  # (N, C, H, W) for images or (N, F), any dtype
    y_train: torch.Tensor       # int64
    x_test: torch.Tensor        # float32, normalised
    y_test: torch.Tensor
    num_classes: int
    scale: float = 1.0          # train input = stored * scale + shift
    shift: float = 0.0

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_stored.shape[1:])

    def train_inputs(self, index: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised float32 training inputs (all, or those at `index`)."""
        stored = self.train_stored if index is None else self.train_stored[index]
        return stored.to(torch.float32, copy=True).mul_(self.scale).add_(self.shift)


def read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file (raw or gzip) into a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise DatasetError(f"{path}: not an IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DatasetError(f"{path}: IDX body holds {len(raw) - header} bytes, header says {expected}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def named_dir(path: str = "") -> tuple[str, str] | None:
    """(where it was named, the directory) for data.path, else $GOSSIPFL_DATA; None if neither is set."""
    for source, value in (("data.path", path), ("GOSSIPFL_DATA", os.environ.get("GOSSIPFL_DATA", ""))):
        if value:
            return source, value
    return None


def data_dir(path: str = "") -> Path:
    """The IDX directory: data.path, else $GOSSIPFL_DATA, else Debian's Fashion-MNIST path. A
    directory that was named but does not exist is an error, never a quiet switch to digits."""
    named = named_dir(path)
    if named is None:
        return Path(DEBIAN_FASHION_MNIST)
    source, value = named
    if not Path(value).is_dir():
        raise DatasetError(f"{source} = {value!r} is not a directory")
    return Path(value)


def _find(directory: Path, stem: str) -> Path:
    for candidate in (directory / stem, directory / f"{stem}.gz", directory / stem.replace("-idx", ".idx")):
        if candidate.is_file():
            return candidate
    raise DatasetError(
        f"no {stem}[.gz] in {directory}. Install Fashion-MNIST with "
        f"'apt-get install dataset-fashion-mnist' (Debian/Ubuntu), or point data.path or "
        f"GOSSIPFL_DATA at a directory holding the four IDX files; or use data.dataset = \"digits\".")


def _pixel_moments(images: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation of 8-bit pixels from their histogram: exact, no float copy."""
    flat = images.reshape(-1)
    block = 1 << 22  # bincount widens its input to int64: count in blocks, not one 8x copy
    counts = sum(np.bincount(flat[i:i + block], minlength=256) for i in range(0, len(flat), block)).astype(np.float64)
    values = np.arange(len(counts), dtype=np.float64)
    mean = float(counts @ values / counts.sum())
    return mean, float(np.sqrt(counts @ (values - mean) ** 2 / counts.sum()))


def load_idx_dataset(name: str, path: str = "") -> Dataset:
    """MNIST-format images (28x28 grey, ten classes) from a directory of IDX files, standardised
    with the training set's pixel mean and deviation."""
    directory = data_dir(path)
    arrays = {key: read_idx(_find(directory, stem)) for key, stem in IDX_FILES.items()}
    train = torch.from_numpy(arrays["train_images"].copy()).unsqueeze(1)
    mean, std = _pixel_moments(arrays["train_images"])
    scale, shift = 1.0 / std, -mean / std
    x_test = torch.from_numpy(arrays["test_images"].copy()).unsqueeze(1).to(torch.float32).mul_(scale).add_(shift)
    return Dataset(name, train, torch.from_numpy(arrays["train_labels"].astype(np.int64)), x_test,
                   torch.from_numpy(arrays["test_labels"].astype(np.int64)), 10, scale, shift)


def load_digits(seed: int = 0, test_fraction: float = 0.25) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1797 images), split into train and test with a seed."""
    from sklearn.datasets import load_digits as sk_digits
    bunch = sk_digits()
    x = torch.from_numpy((bunch.images / 16.0).astype(np.float32)).unsqueeze(1)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    return _split("digits", x, y, 10, seed, test_fraction)


def make_synthetic(samples: int, features: int, classes: int, seed: int = 0,
                   test_fraction: float = 0.25) -> Dataset:
    """Gaussian clusters around random class centres: quick, learnable, and any size."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, features, generator=g) * 1.5
    y = torch.randint(0, classes, (samples,), generator=g)
    x = centres[y] + torch.randn(samples, features, generator=g)
    return _split("synthetic", x, y, classes, seed, test_fraction)


def _split(name: str, x: torch.Tensor, y: torch.Tensor, classes: int, seed: int, test_fraction: float) -> Dataset:
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(y) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return Dataset(name, x[train], y[train], x[test], y[test], classes)


def fashion_mnist_available(path: str = "") -> bool:
    directory = data_dir(path)
    return all(any((directory / f"{stem}{ext}").is_file() for ext in ("", ".gz")) for stem in IDX_FILES.values())


def resolve_name(name: str, path: str = "") -> str:
    """Turn "auto" into fashion-mnist when a data folder is named or Debian's is installed, else digits."""
    if name != "auto":
        return name
    return "fashion-mnist" if named_dir(path) or fashion_mnist_available() else "digits"


def check_mnist_source(path: str = "") -> None:
    """MNIST has no built-in location: it must be named, and not be Fashion-MNIST's folder."""
    named = named_dir(path)
    if named is None:
        raise DatasetError('data.dataset = "mnist" needs data.path (or GOSSIPFL_DATA) naming a folder of '
                           "MNIST's IDX files; there is no default MNIST location")
    if data_dir(path).resolve() == Path(DEBIAN_FASHION_MNIST).resolve():
        raise DatasetError(f'data.dataset = "mnist" but {named[0]} = {named[1]!r} holds Fashion-MNIST; '
                           f'use data.dataset = "fashion-mnist", or name a folder of MNIST files')


DATASETS = ("auto", "fashion-mnist", "mnist", "digits", "synthetic")


def load(name: str, path: str = "", *, seed: int = 0, synthetic: tuple[int, int, int] = (4000, 20, 4)) -> Dataset:
    name = resolve_name(name, path)
    if name == "mnist":
        check_mnist_source(path)
    if name in ("fashion-mnist", "mnist"):
        return load_idx_dataset(name, path)
    if name == "digits":
        return load_digits(seed)
    if name == "synthetic":
        return make_synthetic(*synthetic, seed=seed)
    raise DatasetError(f"unknown dataset {name!r}")


# ---------------------------------------------------------------- partitions


def partition_iid(labels: np.ndarray, nodes: int, rng: np.random.Generator) -> list[np.ndarray]:
    return [np.sort(part) for part in np.array_split(rng.permutation(len(labels)), nodes)]


def partition_dirichlet(labels: np.ndarray, nodes: int, alpha: float, rng: np.random.Generator,
                        min_size: int = 2) -> list[np.ndarray]:
    """Label skew: each class is split across nodes by proportions ~ Dirichlet(alpha).

    Redrawn (a bounded number of times) until every node holds at least `min_size` samples,
    because a node without data cannot take a training step.
    """
    classes = np.unique(labels)
    for _ in range(100):
        parts: list[list[np.ndarray]] = [[] for _ in range(nodes)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(nodes, alpha))) * len(idx)).astype(int)[:-1]
            for node, chunk in enumerate(np.split(idx, cuts)):
                parts[node].append(chunk)
        result = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in result) >= min_size:
            return result
    raise DatasetError(f"Dirichlet(alpha={alpha}) left a node with under {min_size} samples in 100 draws; "
                       f"raise data.alpha or use fewer nodes")


def partition_shards(labels: np.ndarray, nodes: int, shards_per_node: int,
                     rng: np.random.Generator) -> list[np.ndarray]:
    """Pathological skew (McMahan et al.): sort by label, cut into shards, deal shards_per_node each."""
    order = np.argsort(labels, kind="stable")
    shards = np.array_split(order, nodes * shards_per_node)
    deal = rng.permutation(len(shards)).reshape(nodes, shards_per_node)
    return [np.sort(np.concatenate([shards[s] for s in row])) for row in deal]


PARTITIONS = ("iid", "dirichlet", "shards")


def partition(labels: np.ndarray, nodes: int, method: str, *, seed: int, alpha: float = 0.3,
              shards_per_node: int = 2) -> list[np.ndarray]:
    """Split sample indices across nodes (`method` one of PARTITIONS); the parts are disjoint and
    cover every index."""
    if nodes > len(labels):
        raise DatasetError(f"{nodes} nodes but only {len(labels)} training samples")
    rng = np.random.default_rng(seed)
    if method == "iid":
        return partition_iid(labels, nodes, rng)
    if method == "dirichlet":
        return partition_dirichlet(labels, nodes, alpha, rng)
    if method == "shards":
        return partition_shards(labels, nodes, shards_per_node, rng)
    raise DatasetError(f"unknown partition {method!r}; choose one of {', '.join(PARTITIONS)}")


def local_test_split(train_parts: list[np.ndarray], train_labels: np.ndarray, test_labels: np.ndarray,
                     seed: int) -> list[np.ndarray]:
    """Disjoint test slices, class c shared among nodes in proportion to their class-c training data."""
    rng = np.random.default_rng(seed)
    nodes = len(train_parts)
    counts = np.stack([np.bincount(train_labels[p], minlength=int(test_labels.max()) + 1) for p in train_parts])
    out: list[list[np.ndarray]] = [[] for _ in range(nodes)]
    for c in range(counts.shape[1]):
        idx = rng.permutation(np.flatnonzero(test_labels == c))
        total = counts[:, c].sum()
        if total == 0 or len(idx) == 0:
            continue
        cuts = (np.cumsum(counts[:, c]) / total * len(idx)).astype(int)[:-1]
        for node, chunk in enumerate(np.split(idx, cuts)):
            out[node].append(chunk)
    return [np.sort(np.concatenate(p)) if p else np.empty(0, dtype=np.int64) for p in out]
