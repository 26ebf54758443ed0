"""Self-test of bench/proxy.py, run by bench.py before any stage: five requests pipelined on one
keep-alive connection (an aws-chunked PUT with trailers, a batch delete, a LIST, a GET, a HEAD)
must reach a recording upstream byte-exact and be counted one per operation."""

import asyncio
import json
import os
import sys
import urllib.request

PROXY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "proxy.py")


async def _run():
    got = []

    async def upstream(reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                body = b""
                if b"transfer-encoding: chunked" in head.lower():
                    while True:
                        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                        if size == 0:
                            while await reader.readuntil(b"\r\n") != b"\r\n":
                                pass
                            break
                        body += (await reader.readexactly(size + 2))[:-2]
                else:
                    for line in head.split(b"\r\n"):
                        if line.lower().startswith(b"content-length:"):
                            body = await reader.readexactly(int(line.split(b":")[1]))
                got.append((head.split(b"\r\n")[0].decode(), body))
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except asyncio.IncompleteReadError:
            writer.close()

    server = await asyncio.start_server(upstream, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, PROXY, "--upstream", f"127.0.0.1:{port}", "--latency-ms", "1",
        stdout=asyncio.subprocess.PIPE)
    try:
        ports = json.loads(await proc.stdout.readline())
        reader, writer = await asyncio.open_connection("127.0.0.1", ports["port"])
        writer.write(
            b"PUT /b/k1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Encoding: aws-chunked\r\n\r\n5;chunk-signature=abc\r\nhello\r\n"
            b"3;chunk-signature=def\r\n!!!\r\n0;chunk-signature=fin\r\nx-amz-checksum-crc32: 1\r\n\r\n"
            b"POST /b?delete HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nabcd"
            b"GET /b?list-type=2&prefix=a HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /b/k1 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"HEAD /b/k1 HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        answers = b""
        while answers.count(b"ok") < 5:
            chunk = await asyncio.wait_for(reader.read(4096), 10)
            if not chunk:
                break
            answers += chunk
        writer.close()
        counts = await asyncio.to_thread(
            lambda: json.loads(urllib.request.urlopen(
                f"http://127.0.0.1:{ports['control_port']}/counts", timeout=10).read()))
    finally:
        proc.terminate()
        await proc.wait()
        server.close()
    return got, counts


def selftest():
    """(ok, detail)."""
    got, counts = asyncio.run(_run())
    want = [("PUT /b/k1 HTTP/1.1", b"hello!!!"), ("POST /b?delete HTTP/1.1", b"abcd"),
            ("GET /b?list-type=2&prefix=a HTTP/1.1", b""), ("GET /b/k1 HTTP/1.1", b""),
            ("HEAD /b/k1 HTTP/1.1", b"")]
    by_op = {k: counts[k] for k in ("put", "delete", "list", "get", "head", "other")}
    ok = got == want and by_op == {"put": 1, "delete": 1, "list": 1, "get": 1, "head": 1, "other": 0}
    return ok, f"upstream saw {got}, counts {counts}"


if __name__ == "__main__":
    ok, detail = selftest()
    print("ok" if ok else f"FAIL: {detail}")
    sys.exit(0 if ok else 1)
