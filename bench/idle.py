#!/usr/bin/env python3
"""Hold N idle TLS connections to a proxy, for the idle-memory scenario.

Each connection completes a TLS handshake and one keep-alive GET of the open
pixel (like a mail client that fetched it), then sits idle. Prints
"ready <open>" once all are established, waits for a line on stdin, prints
"still-open <n>" and exits (closing every connection).
"""
import asyncio
import ssl
import sys

HOST, PORT, COUNT = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
REQUEST = f"GET /wf/open HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()


async def one(ctx, sem, conns):
    async with sem:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", PORT, ssl=ctx, server_hostname=HOST), 30)
            writer.write(REQUEST)
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await asyncio.wait_for(reader.readexactly(length), 30)
            conns.append((reader, writer))
        except Exception as e:  # noqa: BLE001 - counted, reported by the caller
            print(f"connect failed: {e!r}", file=sys.stderr)


async def main():
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    sem = asyncio.Semaphore(256)
    conns = []
    await asyncio.gather(*(one(ctx, sem, conns) for _ in range(COUNT)))
    print(f"ready {len(conns)}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await asyncio.sleep(0.2)
    still = sum(1 for r, _ in conns if not r.at_eof())
    print(f"still-open {still}", flush=True)
    for _, w in conns:
        w.close()


asyncio.run(main())
