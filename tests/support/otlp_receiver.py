"""A minimal OTLP/HTTP receiver, run as its own process on 127.0.0.1: it keeps what exporters send.

``POST /v1/traces`` (protobuf, as ``opentelemetry-exporter-otlp-proto-http`` sends it) is appended to
``OUT`` as one length-prefixed record per export (4 bytes big-endian, then the raw request body) and
answered with an empty ``ExportTraceServiceResponse``. Tests decode the records with
``opentelemetry.proto`` and grep their raw bytes for what must never be there.

    python tests/support/otlp_receiver.py OUT

It prints ``PORT <n>`` on stdout once it listens.
"""

from __future__ import annotations

import gzip
import struct
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOCK = threading.Lock()


def make_handler(out: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            if self.headers.get("content-encoding") == "gzip":
                body = gzip.decompress(body)
            if self.path == "/v1/traces":
                with LOCK, open(out, "ab") as f:
                    f.write(struct.pack(">I", len(body)) + body)
                self.send_response(200)
            else:
                self.send_response(404)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


def read_records(path: str) -> list[bytes]:
    """Every export request received so far, raw."""
    try:
        data = open(path, "rb").read()
    except FileNotFoundError:
        return []
    records, i = [], 0
    while i + 4 <= len(data):
        (n,) = struct.unpack(">I", data[i:i + 4])
        records.append(data[i + 4:i + 4 + n])
        i += 4 + n
    return records


def main() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(sys.argv[1]))
    print(f"PORT {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
