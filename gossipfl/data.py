"""Datasets that work offline, and seeded partitions of them across nodes.

Every training sample goes to exactly one node. Each node also gets a disjoint slice of the test
set drawn with its own label mix, for local evaluation; global metrics use the whole test set.
"""

from __future__ import annotations

import gzip
import json
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
    """Inputs stay in their stored form (uint8 for IDX images: a quarter of float32) and are
    normalised per slice (`train_inputs`, `test_inputs`, `normalise`), so a node process holds one
    float copy of its own training data only, and evaluation converts one test batch at a time."""
    name: str
    train_stored: torch.Tensor  # (N, C, H, W) for images or (N, F), any dtype
    y_train: torch.Tensor       # int64
    test_stored: torch.Tensor   # stored as the training inputs are
    y_test: torch.Tensor
    num_classes: int
    scale: float = 1.0          # input = stored * scale + shift
    shift: float = 0.0

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_stored.shape[1:])

    def normalise(self, stored: torch.Tensor) -> torch.Tensor:
        """Float32 model inputs from stored ones (a new tensor)."""
        return stored.to(torch.float32, copy=True).mul_(self.scale).add_(self.shift)

    def train_inputs(self, index: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised float32 training inputs (all, or those at `index`)."""
        return self.normalise(self.train_stored if index is None else self.train_stored[index])

    def test_inputs(self, index: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised float32 test inputs (all, or those at `index`)."""
        return self.normalise(self.test_stored if index is None else self.test_stored[index])


def read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file (raw or gzip) into a native-endian numpy array, read straight into the
    array (a node that loads the whole set peaks at one copy of it, not two)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        magic = f.read(4)
        if len(magic) < 4 or magic[0] != 0 or magic[1] != 0 or magic[2] not in IDX_DTYPES:
            raise DatasetError(f"{path}: not an IDX file (bad magic number)")
        dims = f.read(4 * magic[3])
        if len(dims) < 4 * magic[3]:
            raise DatasetError(f"{path}: IDX header cut short")
        shape = tuple(int.from_bytes(dims[4 * i:4 * i + 4], "big") for i in range(magic[3]))
        array = np.empty(shape, dtype=np.dtype(IDX_DTYPES[magic[2]]))
        view, filled = memoryview(array.reshape(-1).view(np.uint8)), 0
        while filled < len(view) and (got := f.readinto(view[filled:])):
            filled += got
        if filled < len(view) or f.read(1):
            held = f"{filled}" if filled < len(view) else f"more than {filled}"
            raise DatasetError(f"{path}: IDX body holds {held} bytes, header says {len(view)}")
    return array.astype(array.dtype.newbyteorder("="), copy=False)


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
    mean, std = _pixel_moments(arrays["train_images"])
    images = {key: torch.from_numpy(arrays[key]).unsqueeze(1) for key in ("train_images", "test_images")}
    return Dataset(name, images["train_images"], torch.from_numpy(arrays["train_labels"].astype(np.int64)),
                   images["test_images"], torch.from_numpy(arrays["test_labels"].astype(np.int64)), 10,
                   1.0 / std, -mean / std)


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


# ---------------------------------------------------------------- one node's shard

SHARD_FORMAT = 1
SHARD_ARRAYS = ("train-inputs", "train-labels", "test-inputs", "test-labels", "validation", "local-test")


@dataclass
class Shard:
    """One node's slice of a data set, exported by `gossipfl deploy init` so that a node on a small
    host reads only its own training samples (in partition order) and the test set, never the
    whole training set. `validation` holds positions within the node's samples (held out for
    filters that judge models), `local_test` indices into the test set; `source` is what the
    shard was cut from (data settings, seed, node count), checked against the reading config."""
    node: int
    dataset: Dataset
    validation: np.ndarray
    local_test: np.ndarray
    source: dict

    def per_node(self, own: np.ndarray, nodes: int) -> list[np.ndarray]:
        """A per-node list of index arrays in which only this shard's node has entries."""
        return [own if i == self.node else np.empty(0, dtype=np.int64) for i in range(nodes)]


def write_shard(directory: str | Path, dataset: Dataset, node: int, share: np.ndarray, validation: np.ndarray,
                local_test: np.ndarray, source: dict) -> Path:
    """Export node `node`'s shard: its training samples `share` (indices into `dataset`'s training
    set), the positions among them held out for validation, its local test indices, and the test set."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    index = torch.from_numpy(np.asarray(share, dtype=np.int64))
    arrays = {"train-inputs": dataset.train_stored[index], "train-labels": dataset.y_train[index],
              "test-inputs": dataset.test_stored, "test-labels": dataset.y_test,
              "validation": torch.from_numpy(np.asarray(validation, dtype=np.int64)),
              "local-test": torch.from_numpy(np.asarray(local_test, dtype=np.int64))}
    for name, array in arrays.items():
        np.save(directory / f"{name}.npy", array.numpy(), allow_pickle=False)
    meta = {"format": SHARD_FORMAT, "node": node, "dataset": dataset.name, "num_classes": dataset.num_classes,
            "scale": dataset.scale, "shift": dataset.shift, "source": source}
    (directory / "shard.json").write_text(json.dumps(meta, indent=1) + "\n")
    return directory


def read_shard(directory: str | Path) -> Shard:
    """A shard written by `write_shard`, checked for completeness and consistent shapes (arrays
    are read without pickle)."""
    directory = Path(directory)
    where = f"data.shard = {str(directory)!r}"
    try:
        meta = json.loads((directory / "shard.json").read_text())
        arrays = {name: np.load(directory / f"{name}.npy", allow_pickle=False) for name in SHARD_ARRAYS}
    except FileNotFoundError as exc:
        raise DatasetError(f"{where}: {Path(exc.filename).name} is missing; export the shard again with "
                           f"`gossipfl deploy init`") from None
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{where}: unreadable ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != SHARD_FORMAT:
        raise DatasetError(f"{where}: shard.json is not a format-{SHARD_FORMAT} shard description")
    x, y, tx, ty = (arrays[k] for k in ("train-inputs", "train-labels", "test-inputs", "test-labels"))
    classes = meta.get("num_classes")
    if (len(x) != len(y) or len(tx) != len(ty) or x.shape[1:] != tx.shape[1:] or not isinstance(classes, int)
            or any(a.dtype != np.int64 or a.ndim != 1 for a in (y, ty, arrays["validation"], arrays["local-test"]))
            or not _within(y, classes) or not _within(ty, classes) or not _within(arrays["validation"], len(x))
            or not _within(arrays["local-test"], len(tx))):
        raise DatasetError(f"{where}: its arrays disagree in length, type or range; export it again")
    dataset = Dataset(str(meta["dataset"]), torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(tx),
                      torch.from_numpy(ty), classes, float(meta["scale"]), float(meta["shift"]))
    return Shard(int(meta["node"]), dataset, arrays["validation"], arrays["local-test"], meta["source"])


def _within(index: np.ndarray, bound: int) -> bool:
    return index.size == 0 or (int(index.min()) >= 0 and int(index.max()) < bound)


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
