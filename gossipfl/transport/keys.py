"""CurveZMQ key pairs: one per node, used both for its ROUTER (server) and its DEALERs (client),
and one for the operator, whose `gossipfl status` may ask nodes how they fare.

`write_keys` makes a directory a deployment can ship: per node a secret key file (mode 0600, only
that node's host needs it) and a public key file, the operator's pair (operator.secret stays with
whoever runs `gossipfl status`), plus `keys.toml`, the listing every node trusts: each node's
public key (`[public_keys]`, which a deployment file can include) and the operator's
(`[status_keys]`). A status key opens a connection but speaks for no node, so it can ask for
status and nothing else. Keys are Z85 text, as libzmq takes them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import tomli_w
import zmq

from ..config import tomllib  # tomllib, or tomli before Python 3.11

log = logging.getLogger(__name__)
LISTING = "keys.toml"
OPERATOR = "operator"  # the file stem of the operator's key pair, and its name in [status_keys]


@dataclass(frozen=True)
class CurveConfig:
    """This node's key pair and the public keys it accepts, by node id (Z85 bytes). A peer's entry
    is also the server key this node's DEALER expects when it connects to that peer."""
    secret_key: bytes
    public_key: bytes
    allowed_public_keys: dict[int, bytes]
    status_keys: frozenset[bytes] = frozenset()  # may connect and ask for status, as no node


def generate_keypair() -> tuple[bytes, bytes]:
    """(public, secret), Z85-encoded."""
    return zmq.curve_keypair()


def write_keys(directory: str | os.PathLike, node_ids: Iterable[int], replace: bool = False) -> Path:
    """Generate a key pair per node and the operator's into `directory`; returns the path of the
    public listing. Existing key files raise FileExistsError unless `replace`: a deployment's
    keys are not lost by a second run of `gossipfl keys`."""
    directory, node_ids = Path(directory), list(node_ids)
    stems = [f"node-{node}" for node in node_ids] + [OPERATOR]
    names = [LISTING] + [f"{stem}.{kind}" for stem in stems for kind in ("secret", "public")]
    existing = [name for name in names if (directory / name).exists()]
    if existing and not replace:
        raise FileExistsError(f"{len(existing)} key files exist already ({', '.join(existing[:3])}"
                              f"{', ...' if len(existing) > 3 else ''})")
    return write_host_keys({node: directory for node in node_ids}, directory)[0]


def write_host_keys(folders: Mapping[int, str | os.PathLike], operator_folder: str | os.PathLike) -> list[Path]:
    """A key pair per node, each written to its node's folder (several nodes may share one), the
    operator's pair to `operator_folder`, and the public listing of all of them to every folder:
    a host's folder then holds its own secret keys only. Returns the listings' paths, one per
    distinct folder (the first is the first node's)."""
    pairs = {node: generate_keypair() for node in folders}
    operator_public, operator_secret = generate_keypair()
    listing = tomli_w.dumps({"public_keys": {str(node): public.decode("ascii") for node, (public, _) in pairs.items()},
                             "status_keys": {OPERATOR: operator_public.decode("ascii")}})
    stems = {**{f"node-{node}": (Path(folders[node]), pair) for node, pair in pairs.items()},
             OPERATOR: (Path(operator_folder), (operator_public, operator_secret))}
    for stem, (directory, (public, secret)) in stems.items():
        directory.mkdir(parents=True, exist_ok=True)
        _write_secret(directory / f"{stem}.secret", secret)
        (directory / f"{stem}.public").write_bytes(public + b"\n")
    paths = list(dict.fromkeys(directory / LISTING for directory, _ in stems.values()))
    for path in paths:
        path.write_text(listing)
    return paths


def read_public_keys(path: str | os.PathLike) -> dict[int, bytes]:
    """The `[public_keys]` table of a listing (or of a deployment file that includes one)."""
    return {int(node): key for node, key in _read_table(path, "public_keys").items()}


def read_status_keys(path: str | os.PathLike) -> frozenset[bytes]:
    """The keys of a listing's `[status_keys]` table (none in a listing written before it existed)."""
    return frozenset(_read_table(path, "status_keys").values())


def _read_table(path: str | os.PathLike, name: str) -> dict[str, bytes]:
    with open(path, "rb") as f:
        table = tomllib.load(f).get(name, {})
    return {key: value.encode("ascii") for key, value in table.items()}


def load_keys(directory: str | os.PathLike, node_id: int, listing: str | os.PathLike | None = None) -> CurveConfig:
    """Node `node_id`'s CurveConfig from a directory written by `write_keys` (the listing defaults
    to the directory's keys.toml)."""
    directory = Path(directory)
    listing = listing or directory / LISTING
    public, secret = load_keypair(directory, f"node-{node_id}")
    return CurveConfig(secret_key=secret, public_key=public, allowed_public_keys=read_public_keys(listing),
                       status_keys=read_status_keys(listing))


def load_operator_keys(directory: str | os.PathLike) -> CurveConfig:
    """The operator's key pair and, as the server keys to expect, every node's public key: what
    `gossipfl status` connects with. Raises FileNotFoundError for a folder without operator keys."""
    public, secret = load_keypair(directory, OPERATOR)
    return CurveConfig(secret_key=secret, public_key=public, allowed_public_keys=read_public_keys(
        Path(directory) / LISTING))


def load_keypair(directory: str | os.PathLike, stem: str) -> tuple[bytes, bytes]:
    """(public, secret) of STEM.public and STEM.secret in `directory` (e.g. "operator")."""
    secret_path = Path(directory) / f"{stem}.secret"
    if secret_path.stat().st_mode & 0o077:
        log.warning("%s is readable by other users; it should be mode 0600", secret_path)
    return (Path(directory) / f"{stem}.public").read_bytes().strip(), secret_path.read_bytes().strip()


def _write_secret(path: Path, secret: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)  # an existing file keeps its old mode through O_CREAT
        f.write(secret + b"\n")
