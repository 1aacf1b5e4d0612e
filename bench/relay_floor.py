"""The floor for relayed chunks: uvloop passing bytes on, verbatim, as they come.

Each client connection gets a connection of its own to the upstream, and every
byte read on one is written to the other at once: no parsing, no framing, no
method to restore (the client sends the real one), no backpressure (a token stream
needs none). What any Python relay on
uvloop pays per chunk before doing its job, as bench/floor.py is for small
requests.

    python bench/relay_floor.py PORT UPSTREAM_PORT
"""

import asyncio
import sys

import uvloop


class Relay(asyncio.Protocol):
    """One side of a pair: what it reads, its peer writes."""

    def __init__(self, peer: "Relay | None" = None) -> None:
        self.peer, self.transport, self.early, self.connecting = peer, None, [], None

    def connection_made(self, transport) -> None:
        self.transport = transport
        if self.peer is None:  # a client: open its own way to the upstream
            self.connecting = asyncio.ensure_future(self.connect())

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, self.peer = await loop.create_connection(lambda: Relay(self), "127.0.0.1", UPSTREAM)
        except OSError:
            self.transport.close()
            return
        if self.transport.is_closing():  # the client left meanwhile
            self.peer.transport.close()
            return
        self.peer.transport.writelines(self.early)  # sent before the upstream answered the connect

    def data_received(self, data: bytes) -> None:
        if self.peer is None or self.peer.transport is None:
            self.early.append(data)
        else:
            self.peer.transport.write(data)

    def connection_lost(self, error) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


async def main(port: int) -> None:
    await asyncio.get_running_loop().create_server(Relay, "127.0.0.1", port)
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    UPSTREAM = int(sys.argv[2])
    uvloop.run(main(int(sys.argv[1])))
