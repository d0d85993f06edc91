"""A minimal S3-speaking HTTP server that ignores conditional headers (If-None-Match, If-Match), as some object
stores and gateways do: for testing that mnkpipe detects such a server and refuses to lock a store on it."""

import hashlib
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Handler(BaseHTTPRequestHandler):
    objects: dict  # path -> bytes, set per server

    def log_message(self, *args):  # quiet
        pass

    def _reply(self, code: int, body: bytes = b"", etag: str | None = None):
        self.send_response(code)
        if etag:
            self.send_header("ETag", etag)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Last-Modified", "Thu, 03 Dec 2026 10:00:00 GMT")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_PUT(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.objects[self.path] = body
        self._reply(200, etag=f'"{hashlib.md5(body).hexdigest()}"')

    def do_GET(self):
        body = self.objects.get(self.path)
        if body is None:
            return self._reply(404, b"<Error><Code>NoSuchKey</Code></Error>")
        self._reply(200, body, etag=f'"{hashlib.md5(body).hexdigest()}"')

    do_HEAD = do_GET

    def do_DELETE(self):
        self.objects.pop(self.path, None)
        self._reply(204)

    def do_POST(self):
        """DeleteObjects (POST /BUCKET?delete with <Key>s), which S3 clients use to delete even one object."""
        body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
        bucket = self.path.split("?")[0]
        keys = re.findall(r"<Key>(.*?)</Key>", body)
        for key in keys:
            self.objects.pop(f"{bucket}/{key}", None)
        deleted = "".join(f"<Deleted><Key>{k}</Key></Deleted>" for k in keys)
        self._reply(200, f"<DeleteResult>{deleted}</DeleteResult>".encode())


def start_naive_s3() -> tuple[ThreadingHTTPServer, str]:
    """Serve on a free loopback port in a daemon thread; returns (server, endpoint URL). server.shutdown() stops it."""
    handler = type("Handler", (_Handler,), {"objects": {}})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"
