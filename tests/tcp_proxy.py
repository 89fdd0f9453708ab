"""A TCP proxy that makes a link worse: one-way delay with jitter, and every connection reset now and then.

    python tests/tcp_proxy.py [--delay-ms D] [--jitter-ms J] [--reset-s R] [--stats FILE] LISTEN=TARGET ...

Test infrastructure for the multi-host test: this kernel has no `tc netem`, so delay and dropped
connections are made here, in user space (a bandwidth cap is `tc tbf`'s job). Each LISTEN
host:port forwards to its TARGET host:port. Every chunk read is written on D ms (plus a uniform
draw within +-J) later, never before an earlier chunk of the same direction (TCP keeps order);
each connection is reset R seconds after it opened (an RST both ways, as a dead NAT entry or a
flapping link does; the peers reconnect, and what was in flight is lost). Prints "ready" once it listens; on SIGTERM it writes its counters to FILE as JSON.

For tests that need a loss at a chosen moment: on SIGUSR1 it swallows whatever any connection
carries (a link gone dead) and prints "swallowing"; on SIGUSR2 it resets every open connection,
forwards again and prints "reset".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path

CHUNK = 64 * 1024
QUEUED_CHUNKS = 64  # per direction: a slow receiver holds the sender back instead of filling memory


@dataclass
class Impairment:
    delay_s: float = 0.0
    jitter_s: float = 0.0
    reset_s: float = 0.0


@dataclass
class Counters:
    connections: int = 0
    resets: int = 0
    bytes: int = 0


@dataclass
class Proxy:
    impairment: Impairment
    rng: random.Random = field(default_factory=lambda: random.Random(0))
    counters: Counters = field(default_factory=Counters)
    swallowing: bool = False
    open: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = field(default_factory=set)

    async def pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One direction: read, hold each chunk until it is due, write; EOF passes through."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(QUEUED_CHUNKS)

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                await asyncio.sleep(max(0.0, due - loop.time()))
                if not data:
                    writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()
                self.counters.bytes += len(data)

        delivering = asyncio.create_task(deliver())
        try:
            due, imp = 0.0, self.impairment
            while data := await reader.read(CHUNK):
                if self.swallowing:
                    continue
                due = max(due, loop.time() + imp.delay_s + self.rng.uniform(-imp.jitter_s, imp.jitter_s))
                await queue.put((due, data))
            await queue.put((due, b""))
            await delivering
        finally:
            delivering.cancel()

    async def serve(self, client_reader: asyncio.StreamReader, client: asyncio.StreamWriter, target: tuple[str, int]) -> None:
        try:
            upstream_reader, upstream = await asyncio.open_connection(*target)
        except OSError:
            client.transport.abort()
            return
        self.counters.connections += 1
        reset_s = self.impairment.reset_s
        timer = asyncio.get_running_loop().call_later(reset_s, self.reset, client, upstream) if reset_s else None
        self.open.add((client, upstream))
        try:
            await asyncio.gather(self.pump(client_reader, upstream), self.pump(upstream_reader, client))
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open.discard((client, upstream))
            if timer is not None:
                timer.cancel()
            client.transport.abort()
            upstream.transport.abort()

    def reset(self, *writers: asyncio.StreamWriter) -> None:
        """End a connection with an RST both ways (linger 0), not a FIN."""
        for writer in writers:
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        self.counters.resets += 1

    def swallow(self) -> None:
        self.swallowing = True
        print("swallowing", flush=True)

    def reset_all(self) -> None:
        for pair in list(self.open):
            self.reset(*pair)
        self.swallowing = False
        print("reset", flush=True)


def host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def main(routes: list[tuple[tuple[str, int], tuple[str, int]]], impairment: Impairment, stats: Path | None) -> None:
    proxy = Proxy(impairment)
    servers = [await asyncio.start_server(lambda r, w, t=target: proxy.serve(r, w, t), *listen)
               for listen, target in routes]
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stopped.set)
    loop.add_signal_handler(signal.SIGUSR1, proxy.swallow)
    loop.add_signal_handler(signal.SIGUSR2, proxy.reset_all)
    print("ready", flush=True)
    await stopped.wait()
    for server in servers:
        server.close()
    if stats is not None:
        stats.write_text(json.dumps(vars(proxy.counters)))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("routes", nargs="+", metavar="LISTEN=TARGET")
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--jitter-ms", type=float, default=0.0)
    parser.add_argument("--reset-s", type=float, default=0.0)
    parser.add_argument("--stats", type=Path)
    args = parser.parse_args()
    pairs = [tuple(host_port(part) for part in route.split("=", 1)) for route in args.routes]
    asyncio.run(main(pairs, Impairment(args.delay_ms / 1e3, args.jitter_ms / 1e3, args.reset_s), args.stats))
