#!/usr/bin/env python3
"""A loopback HTTP/1.1 proxy in front of an S3 server that makes it behave like a remote one.

Every request waits `--latency-ms` (default 20 ms, an in-region S3 round trip) before it is
forwarded, and is counted by operation as seen on the wire: LIST (GET on a bucket with
`list-type=2`, `prefix=` or `delimiter=`, or no query), GET, HEAD, PUT, DELETE (a `DELETE` or a
`POST ?delete` batch) and other. Requests are framed on the client->server direction (request
line and headers, then a `Content-Length` body or `chunked` chunks, aws-chunked included since
that is framed by one of the two), so keep-alive connections carrying many requests are counted
right; responses are forwarded as a byte stream. Path-style addressing only (`/bucket/key`).

Control endpoint (its own port, loopback): `GET /counts` -> {"list": N, ..., "requests": N},
`GET /gets` -> {path: GETs of that path} (capped), `GET /cpu` -> {"cpu_seconds": its own CPU
time}, `POST /reset` zeroes the counts and the paths,
`POST /latency?ms=N` changes the added latency.

Bounded: listens on 127.0.0.1 only, forwards to a loopback upstream only, serves at most
`--max-connections` client connections at once (more wait for a slot), request heads of at most
64 KiB. Stdlib only.

Usage: proxy.py --upstream 127.0.0.1:PORT [--port P] [--control-port C] [--latency-ms 20]
Prints one JSON line {"port": P, "control_port": C} when listening.
"""

import argparse
import asyncio
import ipaddress
import json
import signal
import sys
import time
import urllib.parse

MAX_HEAD = 64 * 1024
MAX_TRACKED_PATHS = 2_000_000
OPS = ("list", "get", "head", "put", "delete", "other")


class Stats:
    def __init__(self):
        self.reset()

    def reset(self):
        self.counts = dict.fromkeys(OPS, 0)
        self.gets = {}

    def record(self, op, path):
        self.counts[op] += 1
        if op == "get" and (path in self.gets or len(self.gets) < MAX_TRACKED_PATHS):
            self.gets[path] = self.gets.get(path, 0) + 1


def classify(method, target):
    """The S3 operation of one request line (path-style addressing)."""
    path, _, query = target.partition("?")
    params = urllib.parse.parse_qs(query, keep_blank_values=True)
    segments = [s for s in path.split("/") if s]
    bucket_level = len(segments) <= 1
    if method == "GET":
        if bucket_level and len(segments) == 1:
            if not query or "list-type" in params or "prefix" in params or "delimiter" in params:
                return "list"
            return "other"
        return "get" if not bucket_level else "other"
    if method == "HEAD":
        return "head" if not bucket_level else "other"
    if method == "PUT":
        return "put" if not bucket_level and "uploadId" not in params else "other"
    if method == "DELETE":
        return "delete" if not bucket_level else "other"
    if method == "POST" and "delete" in params:
        return "delete"
    return "other"


async def read_head(reader):
    """One request head (through the blank line), or b"" at a clean end of the connection."""
    try:
        return await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as e:
        if e.partial.strip():
            raise ValueError("connection closed inside a request head")
        return b""
    except asyncio.LimitOverrunError:
        raise ValueError("request head over 64 KiB")


async def copy_exact(reader, writer, n):
    while n > 0:
        chunk = await reader.read(min(n, 1 << 16))
        if not chunk:
            raise ValueError("connection closed inside a request body")
        writer.write(chunk)
        await writer.drain()
        n -= len(chunk)


async def copy_chunked(reader, writer):
    """A chunked body: size lines (extensions such as aws-chunked signatures kept), data,
    then trailers up to the blank line."""
    while True:
        line = await reader.readuntil(b"\r\n")
        writer.write(line)
        size = int(line.split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            while True:
                trailer = await reader.readuntil(b"\r\n")
                writer.write(trailer)
                if trailer == b"\r\n":
                    await writer.drain()
                    return
        await copy_exact(reader, writer, size + 2)


class Proxy:
    def __init__(self, upstream, latency_ms, max_connections):
        self.upstream = upstream
        self.latency = latency_ms / 1000
        self.slots = asyncio.Semaphore(max_connections)
        self.stats = Stats()

    async def client(self, creader, cwriter):
        async with self.slots:
            try:
                ureader, uwriter = await asyncio.open_connection(*self.upstream, limit=MAX_HEAD)
            except OSError as e:
                print(f"proxy: upstream unreachable: {e!r}", file=sys.stderr, flush=True)
                cwriter.close()
                return
            back = asyncio.ensure_future(self.pipe(ureader, cwriter))
            try:
                await self.requests(creader, uwriter)
            except (ValueError, ConnectionError, asyncio.IncompleteReadError,
                    asyncio.LimitOverrunError) as e:
                print(f"proxy: connection dropped: {e!r}", file=sys.stderr, flush=True)
            finally:
                # The response to the last request may still be on its way: close the upstream's
                # write side only, and let the response pipe end the client connection.
                try:
                    if uwriter.can_write_eof():
                        uwriter.write_eof()
                except OSError:
                    pass
                try:
                    await asyncio.wait_for(back, 60)
                except asyncio.TimeoutError:
                    pass
                finally:
                    uwriter.close()
                    cwriter.close()

    async def requests(self, creader, uwriter):
        while True:
            head = await read_head(creader)
            if not head:
                return
            lines = head.split(b"\r\n")
            parts = lines[0].decode("latin-1").split(" ")
            if len(parts) != 3:
                raise ValueError("bad request line")
            method, target, _ = parts
            length, chunked = 0, False
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value.strip())
                elif name == b"transfer-encoding" and b"chunked" in value.lower():
                    chunked = True
            self.stats.record(classify(method, target), target.partition("?")[0])
            if self.latency:
                await asyncio.sleep(self.latency)
            uwriter.write(head)
            await uwriter.drain()
            if chunked:
                await copy_chunked(creader, uwriter)
            elif length:
                await copy_exact(creader, uwriter, length)

    async def pipe(self, reader, writer):
        try:
            while True:
                data = await reader.read(1 << 16)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            try:
                if writer.can_write_eof():
                    writer.write_eof()
            except OSError:
                pass

    async def control(self, reader, writer):
        try:
            head = await read_head(reader)
            method, target = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")[:2]
            path, _, query = target.partition("?")
            status, body = "200 OK", None
            if method == "GET" and path == "/counts":
                body = dict(self.stats.counts, requests=sum(self.stats.counts.values()))
            elif method == "GET" and path == "/gets":
                body = self.stats.gets
            elif method == "GET" and path == "/cpu":
                # The proxy's own CPU, so a benchmark can tell what the machine, not the store,
                # spent on a run.
                body = {"cpu_seconds": time.process_time()}
            elif method == "POST" and path == "/reset":
                self.stats.reset()
                body = {"reset": True}
            elif method == "POST" and path == "/latency":
                ms = float(urllib.parse.parse_qs(query).get("ms", ["20"])[0])
                self.latency = max(0.0, ms) / 1000
                body = {"latency_ms": ms}
            else:
                status, body = "404 Not Found", {"error": "unknown"}
            data = json.dumps(body).encode()
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data)
            await writer.drain()
        except (ValueError, ConnectionError):
            pass
        finally:
            writer.close()


def loopback_address(text):
    host, _, port = text.rpartition(":")
    if not ipaddress.ip_address(host).is_loopback:
        raise argparse.ArgumentTypeError(f"{text}: the upstream must be a loopback address")
    return host, int(port)


async def main(args):
    proxy = Proxy(args.upstream, args.latency_ms, args.max_connections)
    server = await asyncio.start_server(proxy.client, "127.0.0.1", args.port, limit=MAX_HEAD,
                                        backlog=1024)
    control = await asyncio.start_server(proxy.control, "127.0.0.1", args.control_port)
    ports = {"port": server.sockets[0].getsockname()[1],
             "control_port": control.sockets[0].getsockname()[1]}
    print(json.dumps(ports), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server, control:
        await stop.wait()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--upstream", required=True, type=loopback_address, help="HOST:PORT on loopback")
    p.add_argument("--port", type=int, default=0, help="listening port (0: any free one)")
    p.add_argument("--control-port", type=int, default=0)
    p.add_argument("--latency-ms", type=float, default=20.0)
    p.add_argument("--max-connections", type=int, default=512)
    try:
        asyncio.run(main(p.parse_args()))
    except KeyboardInterrupt:
        sys.exit(0)
