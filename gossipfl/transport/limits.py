"""The bounds a transport keeps against hostile or broken peers, and the process's open-file limit.

Every field has a default that honest traffic never reaches; None means "derived from the
transport's own settings" (its high-water mark, message size, number of peers, open-file limit),
resolved by `Limits.resolve`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import resource
from dataclasses import dataclass

log = logging.getLogger(__name__)

FD_HEADROOM = 128          # open files kept free for checkpoints, data, logs and libzmq's own
FDS_PER_CONNECTION = 2     # libzmq's socket and the watcher's duplicate of it
NR_OPEN_FALLBACK = 1 << 20


@dataclass(frozen=True)
class Limits:
    rounds_ahead: int = 2                     # keep messages at most this many rounds ahead of the current one
    buffered_per_sender: int | None = None    # messages kept for later steps, per sender; None = hwm
    buffer_ttl_s: float = 600.0               # a kept message older than this is dropped
    burst: int | None = None                  # messages a connection may send beyond one per receive; None = 4 hwm
    max_connections: int | None = None        # accepted connections in all; None = 4 per peer + 64, within the fd limit
    max_connections_per_address: int | None = None  # from one remote address; None = 2 per peer + 4
    max_pending_bytes: int | None = None      # bytes libzmq may hold for one connection; None = (hwm + 1) messages + 1 MiB
    idle_timeout_s: float = 300.0             # a connection with no valid message after this long is closed
    keepalive_s: int = 10                     # TCP keepalive idle time and probe interval; 3 lost probes drop a peer

    def resolve(self, hwm: int, frame_bytes: int, peers: int) -> "Limits":
        """Fill every None from the transport's high-water mark, largest message (header and
        payload) and number of peers."""
        budget = max(1, (open_file_limit() - open_files() - FD_HEADROOM) // FDS_PER_CONNECTION)
        wanted = self.max_connections or 4 * peers + 64
        if wanted > budget:
            log.warning("the open-file limit leaves room for %d connections, not %d", budget, wanted)
        return dataclasses.replace(
            self,
            buffered_per_sender=self.buffered_per_sender or hwm,
            burst=self.burst or 4 * hwm,
            max_connections=min(wanted, budget),
            max_connections_per_address=self.max_connections_per_address or 2 * peers + 4,
            max_pending_bytes=self.max_pending_bytes or (hwm + 1) * frame_bytes + (1 << 20),
        )


def open_file_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def open_files() -> int:
    """Files this process has open now (Linux); 0 where /proc is missing."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


def raise_open_file_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit and return the new soft
    limit. The usual soft limit of 1,024 is what a connection flood exhausts first (then any
    file the node opens, a checkpoint say, fails); the hard limit is often far higher."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        try:
            with open("/proc/sys/fs/nr_open") as f:
                hard = int(f.read())
        except (OSError, ValueError):
            hard = NR_OPEN_FALLBACK
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        except (ValueError, OSError) as error:  # e.g. macOS caps it below the hard limit
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, hard, error)
    return open_file_limit()
