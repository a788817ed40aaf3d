"""A loopback HTTP host for download tests (nothing downloads at test time) and the archive
builders the served files are made with."""

from __future__ import annotations

import io
import socket
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeHost:
    """Serves ``files`` (path -> bytes) with HTTP Range support and HEAD.

    ``cut[path] = n`` makes the next response for that path announce the full length but
    close the connection after ``n`` bytes (once). ``ignore_range`` answers 200 always.
    ``slow[path] = (block, seconds)`` sends that path ``block`` bytes at a time with a pause
    after each (a transfer long enough to be killed in the middle). ``requests`` records
    ``(path, Range header)`` of every GET, ``heads`` the paths of every HEAD.
    """

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.cut: dict[str, int] = {}
        self.slow: dict[str, tuple[int, float]] = {}
        self.ignore_range = False
        self.requests: list[tuple[str, str | None]] = []
        self.heads: list[str] = []
        host = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_HEAD(self) -> None:
                path = self.path.lstrip("/")
                host.heads.append(path)
                if path not in host.files:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(host.files[path])))
                self.end_headers()

            def do_GET(self) -> None:
                path = self.path.lstrip("/")
                rng = self.headers.get("Range")
                host.requests.append((path, rng))
                if path not in host.files:
                    self.send_error(404)
                    return
                data = host.files[path]
                start = 0
                if rng and not host.ignore_range:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                limit = host.cut.pop(path, None)
                if limit is not None:
                    self.wfile.write(body[:limit])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if path in host.slow:
                    block, pause = host.slow[path]
                    try:
                        for i in range(0, len(body), block):
                            self.wfile.write(body[i : i + block])
                            self.wfile.flush()
                            time.sleep(pause)
                    except OSError:  # the client was killed mid-transfer
                        self.close_connection = True
                    return
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def __enter__(self) -> FakeHost:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def closed_port_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    return f"http://127.0.0.1:{port}"


def tar_bytes(members: dict[str, bytes], extra=None, mode: str = "w") -> bytes:
    """A tar archive (``mode`` "w" plain, "w:gz" gzipped) of ``members`` (name -> bytes) and
    ``extra`` TarInfo entries without data (links, devices)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra or []:
            tar.addfile(info)
    return buf.getvalue()
