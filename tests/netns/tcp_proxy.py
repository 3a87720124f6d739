#!/usr/bin/python3
"""A plain TCP proxy for the netns fault test (tests/netns/netns_test.py).

    tcp_proxy.py --listen 198.18.0.50:6000 --target 198.18.0.10:5555

Accepts connections on --listen and pipes each one, both ways, to a new
connection to --target. Prints "listening HOST:PORT" on stdout once it
accepts. Standard library only (asyncio).

Every socket has SO_LINGER {on, 0}, so when the test SIGKILLs the proxy the
kernel resets every connection through it (RST to both the ZeroMQ peers)
instead of closing them gracefully: a "blip" as a crashed middlebox or a NAT
losing its table shows it. The listening socket has SO_REUSEADDR (asyncio's
default), so a new proxy binds the same port at once.
"""

import argparse
import asyncio
import signal
import socket
import struct
import sys

CHUNK = 256 * 1024
LINGER_RESET = struct.pack("ii", 1, 0)


def parse_endpoint(text):
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def harden(writer):
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def pump(reader, writer):
    try:
        while True:
            data = await reader.read(CHUNK)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        # One side gone: drop the other at once (linger 0 makes it an RST),
        # as the peers would see from a middlebox that lost the connection.
        writer.transport.abort()


async def handle(target, client_reader, client_writer):
    harden(client_writer)
    try:
        upstream_reader, upstream_writer = await asyncio.wait_for(
            asyncio.open_connection(*target), timeout=5)
    except (OSError, asyncio.TimeoutError):
        client_writer.transport.abort()
        return
    harden(upstream_writer)
    await asyncio.gather(pump(client_reader, upstream_writer),
                         pump(upstream_reader, client_writer))


async def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", type=parse_endpoint, required=True, help="HOST:PORT to accept on")
    parser.add_argument("--target", type=parse_endpoint, required=True, help="HOST:PORT to connect to")
    a = parser.parse_args()
    server = await asyncio.start_server(lambda r, w: handle(a.target, r, w), a.listen[0], a.listen[1],
                                        reuse_address=True, backlog=1024)
    print(f"listening {a.listen[0]}:{a.listen[1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
    sys.exit(0)
