"""Fault: S3 errors from the endpoint (throttling, 500s, dropped connections).

A small HTTP proxy sits between boto3 and moto's S3 server and answers the first N requests
with the fault (a real network fault seen by botocore's real HTTP stack, not a mock of S3);
later requests go through to moto.
"""

from __future__ import annotations

import http.client
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest

from dataio import DataError, read_records

SLOWDOWN = (503, b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                 b'<Message>Please reduce your request rate.</Message></Error>')
INTERNAL = (500, b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code>'
                 b'<Message>We encountered an internal error.</Message></Error>')


class FaultyProxy:
    """Forwards to ``upstream``; the first ``faults`` requests get ``fault`` instead:
    ``(status, body)`` or ``"drop"`` (the connection closed without an answer)."""

    def __init__(self, upstream: str, fault, faults: int):
        self.fault, self.left, self.requests, self.paths = fault, faults, 0, []
        self.lock = threading.Lock()
        up = urlsplit(upstream)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def handle_one(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with proxy.lock:
                    proxy.requests += 1
                    proxy.paths.append(f"{self.command} {self.path}")
                    faulty = proxy.left > 0
                    proxy.left -= faulty
                if faulty and proxy.fault == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)  # mid-request, no status line
                    return
                if faulty:
                    status, payload = proxy.fault
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(up.hostname, up.port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                headers["Host"] = up.netloc  # moto routes on the host; signatures are not checked
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection",
                                         "server", "date"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = handle_one

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def s3_object(s3_server, tmp_path, monkeypatch):
    """A small JSONL object in moto's bucket, and a fresh read cache (every read goes to S3)."""
    key = f"faults/{tmp_path.name}.jsonl"
    s3_server.client().put_object(Bucket=s3_server.bucket, Key=key,
                                  Body=b'{"prompt": "a", "completion": "b"}\n')
    monkeypatch.setenv("RLHF_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")  # keeps the all-fail cases to a few seconds
    return f"s3://{s3_server.bucket}/{key}"


FAULTS = {"throttled (503 SlowDown)": SLOWDOWN, "internal error (500)": INTERNAL,
          "dropped connection": "drop"}


@pytest.mark.parametrize("fault", FAULTS.values(), ids=FAULTS.keys())
def test_transient_s3_faults_are_retried(fault, s3_server, s3_object, monkeypatch):
    """Fault: the S3 endpoint throttles, fails with 500 or drops the connection, twice.
    Guarantee: botocore retries (standard mode, backoff) and the read succeeds with the
    object's content; the proxy saw the retried requests."""
    with FaultyProxy(s3_server.endpoint, fault, faults=2) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.endpoint)
        rows = read_records(s3_object)
    assert rows == [{"prompt": "a", "completion": "b"}]
    assert proxy.requests >= 3  # two faults, then the request that went through


@pytest.mark.parametrize("fault, says", [(SLOWDOWN, "SlowDown; 3 attempts"),
                                         (INTERNAL, "InternalError; 3 attempts"),
                                         ("drop", "up to 3 attempts")],
                         ids=FAULTS.keys())
def test_persistent_s3_faults_end_in_a_clear_error(fault, says, s3_server, s3_object,
                                                   monkeypatch):
    """Fault: the S3 endpoint keeps throttling / failing / dropping connections.
    Guarantee: after the configured attempts (AWS_MAX_ATTEMPTS) with backoff, a DataError
    names the URI, the S3 error and the attempts (rule s3_access; the CLI turns it into exit
    2), within seconds, never a botocore traceback or a hang."""
    with FaultyProxy(s3_server.endpoint, fault, faults=10**6) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.endpoint)
        t0 = time.monotonic()
        with pytest.raises(DataError) as err:
            read_records(s3_object)
        elapsed = time.monotonic() - t0
    assert proxy.requests == 3, (str(err.value), proxy.paths)
    assert err.value.rule == "s3_access"
    assert s3_object in str(err.value) and says in str(err.value)
    assert "rlhf-test-secret" not in str(err.value) and proxy.endpoint not in str(err.value)
    assert elapsed < 30
