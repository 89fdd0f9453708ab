"""CurveZMQ key pairs: one per node, used both for its ROUTER (server) and its DEALERs (client).

`write_keys` makes a directory a deployment can ship: per node a secret key file (mode 0600, only
that node's host needs it) and a public key file, plus `keys.toml`, the listing of every node's
public key that each node trusts (and that a deployment file can include as its `[public_keys]`).
Keys are Z85 text, as libzmq takes them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import tomli_w
import zmq

from ..config import tomllib  # tomllib, or tomli before Python 3.11

log = logging.getLogger(__name__)
LISTING = "keys.toml"


@dataclass(frozen=True)
class CurveConfig:
    """This node's key pair and the public keys it accepts, by node id (Z85 bytes). A peer's entry
    is also the server key this node's DEALER expects when it connects to that peer."""
    secret_key: bytes
    public_key: bytes
    allowed_public_keys: dict[int, bytes]


def generate_keypair() -> tuple[bytes, bytes]:
    """(public, secret), Z85-encoded."""
    return zmq.curve_keypair()


def write_keys(directory: str | os.PathLike, node_ids: Iterable[int], replace: bool = False) -> Path:
    """Generate a key pair per node into `directory`; returns the path of the public listing.
    Existing key files raise FileExistsError unless `replace`: a deployment's keys are not lost
    by a second run of `gossipfl keys`."""
    directory = Path(directory)
    node_ids = list(node_ids)
    names = [LISTING] + [f"node-{node}.{kind}" for node in node_ids for kind in ("secret", "public")]
    existing = [name for name in names if (directory / name).exists()]
    if existing and not replace:
        raise FileExistsError(f"{len(existing)} key files exist already ({', '.join(existing[:3])}"
                              f"{', ...' if len(existing) > 3 else ''})")
    directory.mkdir(parents=True, exist_ok=True)
    listing = {}
    for node in node_ids:
        public, secret = generate_keypair()
        _write_secret(directory / f"node-{node}.secret", secret)
        (directory / f"node-{node}.public").write_bytes(public + b"\n")
        listing[str(node)] = public.decode("ascii")
    path = directory / LISTING
    path.write_text(tomli_w.dumps({"public_keys": listing}))
    return path


def read_public_keys(path: str | os.PathLike) -> dict[int, bytes]:
    """The `[public_keys]` table of a listing (or of a deployment file that includes one)."""
    with open(path, "rb") as f:
        table = tomllib.load(f).get("public_keys", {})
    return {int(node): key.encode("ascii") for node, key in table.items()}


def load_keys(directory: str | os.PathLike, node_id: int, listing: str | os.PathLike | None = None) -> CurveConfig:
    """Node `node_id`'s CurveConfig from a directory written by `write_keys` (the listing defaults
    to the directory's keys.toml)."""
    directory = Path(directory)
    secret_path = directory / f"node-{node_id}.secret"
    if secret_path.stat().st_mode & 0o077:
        log.warning("%s is readable by other users; it should be mode 0600", secret_path)
    return CurveConfig(
        secret_key=secret_path.read_bytes().strip(),
        public_key=(directory / f"node-{node_id}.public").read_bytes().strip(),
        allowed_public_keys=read_public_keys(listing or directory / LISTING),
    )


def _write_secret(path: Path, secret: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)  # an existing file keeps its old mode through O_CREAT
        f.write(secret + b"\n")
