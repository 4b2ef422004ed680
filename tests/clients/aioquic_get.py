"""One HTTP/3 GET with aioquic, an HTTP/3 client linkgate's authors did not write.

Usage: aioquic_get.py CA_PEM HOST PORT PATH

Connects to 127.0.0.1:PORT naming HOST (SNI and :authority), verifying the
server against CA_PEM only, and prints one JSON object: the status, the
response headers, the body (text) and the ALPN negotiated. Exits non-zero,
with the reason on stderr, when the handshake or the request fails.
Driven by tests/http3_aioquic.rs.
"""

import asyncio
import json
import ssl
import sys

from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration

TIMEOUT = 15


class Client(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.http = H3Connection(self._quic)
        self.headers = []
        self.body = b""
        self.done = None

    def quic_event_received(self, event):
        for e in self.http.handle_event(event):
            if isinstance(e, HeadersReceived):
                self.headers.extend(e.headers)
            elif isinstance(e, DataReceived):
                self.body += e.data
            if getattr(e, "stream_ended", False) and self.done and not self.done.done():
                self.done.set_result(None)

    async def get(self, authority, path):
        stream = self._quic.get_next_available_stream_id()
        self.done = self._loop.create_future()
        self.http.send_headers(
            stream,
            [
                (b":method", b"GET"),
                (b":scheme", b"https"),
                (b":authority", authority.encode()),
                (b":path", path.encode()),
                (b"user-agent", b"aioquic"),
            ],
            end_stream=True,
        )
        self.transmit()
        await asyncio.wait_for(self.done, TIMEOUT)


async def main(ca, host, port, path):
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name=host)
    config.verify_mode = ssl.CERT_REQUIRED
    config.load_verify_locations(ca)
    async with connect("127.0.0.1", port, configuration=config, create_protocol=Client, wait_connected=True) as client:
        await client.get(host, path)
        alpn = client._quic.tls.alpn_negotiated
    headers = {k.decode(): v.decode() for k, v in client.headers}
    print(
        json.dumps(
            {
                "status": int(headers.pop(":status", "0")),
                "headers": headers,
                "body": client.body.decode(errors="replace"),
                "alpn": alpn,
            }
        )
    )


if __name__ == "__main__":
    ca, host, port, path = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    try:
        asyncio.run(asyncio.wait_for(main(ca, host, port, path), TIMEOUT))
    except Exception as e:  # one line for the test's assertion message
        print(f"aioquic: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
