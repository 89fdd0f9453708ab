"""The hosts of a deployment, one per node id, from a plain list or a TOML table, and where they
keep it (torch-free).

A plain file has one `host` or `host:port` a line, in node-id order; `#` starts a comment. A TOML
file (`.toml`) has `hosts = ["host", "host:port", ...]` or a `[hosts]` table from node id to
address, and may set `port` (the default port). A host without a port gets the default port.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError, read_toml

DEFAULT_PORT = 7100
HOST_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$")  # a DNS name or an IPv4 address


@dataclass(frozen=True)
class Target:
    """Where the hosts keep a deployment: the account, the folder, the virtual environment."""
    user: str = "pi"
    directory: str = "/home/pi/gossipfl-run"
    venv: str = "/home/pi/gossipfl-venv"


class HostsError(ConfigError):
    """A hosts file that cannot be used; the message names the file and the entry."""


def read_hosts(path: str | Path) -> list[str]:
    """The `host:port` address of each node id, in id order, all distinct."""
    path = Path(path)
    if not path.is_file():
        raise HostsError(f"hosts file not found: {path}")
    if path.suffix == ".toml":
        entries, port = _toml_entries(path)
    else:
        entries, port = _text_entries(path), DEFAULT_PORT
    if not entries:
        raise HostsError(f"{path}: lists no hosts")
    addresses, seen = [], {}
    for where, text in entries:
        address = parse_address(text, port, where)
        if address in seen:
            raise HostsError(f"{where}: {address} repeats {seen[address]}; give each node its own host:port")
        seen[address] = where
        addresses.append(address)
    return addresses


def parse_address(text: str, default_port: int, where: str) -> str:
    host, sep, port = text.rpartition(":") if ":" in text else (text, "", str(default_port))
    if not HOST_NAME.match(host):
        raise HostsError(f"{where}: {text!r} is not a host name or IPv4 address")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise HostsError(f"{where}: {text!r} has port {port!r}; a port is 1..65535")
    return f"{host}:{int(port)}"


def _text_entries(path: Path) -> list[tuple[str, str]]:
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if len(words) > 1:
            raise HostsError(f"{path}:{number}: one host a line, got {len(words)} words")
        if words:
            entries.append((f"{path}:{number}", words[0]))
    return entries


def _toml_entries(path: Path) -> tuple[list[tuple[str, str]], int]:
    data = read_toml(path)
    unknown = sorted(set(data) - {"hosts", "port"})
    if unknown:
        raise HostsError(f"{path}: unknown key {unknown[0]!r}; a hosts file has `hosts` and optionally `port`")
    port = data.get("port", DEFAULT_PORT)
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise HostsError(f"{path}: port = {port!r} must be 1..65535")
    hosts = data.get("hosts")
    if isinstance(hosts, dict):
        ids = sorted(hosts, key=lambda k: int(k) if k.isdigit() else -1)
        if ids != [str(i) for i in range(len(hosts))]:
            raise HostsError(f"{path}: [hosts] keys must be the node ids 0..{len(hosts) - 1}, got {sorted(hosts)}")
        hosts = [hosts[i] for i in ids]
    if not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts):
        raise HostsError(f"{path}: `hosts` must be a list of \"host[:port]\" strings or a [hosts] table by node id")
    return [(f"{path}: hosts[{i}]", h) for i, h in enumerate(hosts)], port
