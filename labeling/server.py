"""``rlhf label``: the labeling page and its JSON API, on a stdlib HTTP server.

    GET  /?token=T          the page (``static/index.html``), then its app.js and style.css
    GET  /api/next          {"pair": {pair_id, prompt, left, right, a_shown_first} | null,
                             "progress": {"done", "total"}}
    POST /api/choice        {"pair_id", "side": "left" | "right"} -> as /api/next, after
                            recording the label (409: already labeled, 404: unknown pair)
    POST /api/undo          removes the annotator's last label -> {"undone": pair_id | null,
                            ...as /api/next}
    GET  /api/progress      {"done", "total"}

Every request carries the token: ``?token=`` on the page's URL (the server writes it into the
page's asset links), then an ``X-Token`` header from app.js. A missing or wrong token is 403.
The token keeps other local users and web pages in other tabs from reading the batch or
writing labels; it is not TLS, so the server binds 127.0.0.1 unless told otherwise.
The same approach as ``release/serve.py``: ``ThreadingHTTPServer``, no web framework.
"""

from __future__ import annotations

import hmac
import html
import json
import logging
import secrets
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qs, urlsplit

from labeling.batch import (AlreadyLabeled, LabelingSession, LabelStore, default_labels_path,
                            read_batch)

log = logging.getLogger("rlhf.label")

STATIC = Path(__file__).parent / "static"
ASSETS = {"/app.js": "text/javascript; charset=utf-8", "/style.css": "text/css; charset=utf-8"}


class Handler(BaseHTTPRequestHandler):
    server: LabelServer

    def _send(self, status: int, body: str | bytes, content_type: str = "application/json") -> None:
        data = body.encode() if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        # The token is in the page's URL: never send it to another site.
        self.send_header("Referrer-Policy", "no-referrer")
        self.end_headers()
        self.wfile.write(data)

    def _json(self, status: int, value: dict) -> None:
        self._send(status, json.dumps(value))

    def _authorised(self) -> bool:
        given = self.headers.get("X-Token") or parse_qs(urlsplit(self.path).query).get(
            "token", [""])[0]
        # compare_digest: no timing hint about how much of a guessed token was right.
        if hmac.compare_digest(given.encode(), self.server.token.encode()):
            return True
        self._json(403, {"message": "missing or wrong token: open the URL rlhf label printed"})
        return False

    def _state(self) -> dict:
        session = self.server.session
        return {"pair": session.next_pair(), "progress": session.progress()}

    def do_GET(self) -> None:
        if not self._authorised():
            return
        path = urlsplit(self.path).path
        if path in ("/", "/index.html"):
            page = (STATIC / "index.html").read_text(encoding="utf-8")
            self._send(200, page.replace("__TOKEN__", html.escape(self.server.token)),
                       "text/html; charset=utf-8")
        elif path in ASSETS:
            self._send(200, (STATIC / path.lstrip("/")).read_bytes(), ASSETS[path])
        elif path == "/api/next":
            self._json(200, self._state())
        elif path == "/api/progress":
            self._json(200, self.server.session.progress())
        else:
            self._json(404, {"message": f"no route {path}"})

    def do_POST(self) -> None:
        if not self._authorised():
            return
        path = urlsplit(self.path).path
        session = self.server.session
        if path == "/api/undo":
            label = session.undo()
            self._json(200, {"undone": label.pair_id if label else None, **self._state()})
        elif path == "/api/choice":
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                pair_id, side = body["pair_id"], body["side"]
            except (ValueError, TypeError, KeyError):
                self._json(400, {"message": 'expected JSON {"pair_id": ..., "side": '
                                            '"left" | "right"}'})
                return
            try:
                session.choose(str(pair_id), side)
            except KeyError:
                self._json(404, {"message": f"no pair {pair_id!r} in this batch"})
            except AlreadyLabeled as e:
                self._json(409, {"message": str(e)})
            except ValueError as e:
                self._json(400, {"message": str(e)})
            else:
                self._json(200, self._state())
        else:
            self._json(404, {"message": f"no route {path}"})

    def log_message(self, format: str, *args) -> None:
        # The request line holds the token: log the path only.
        log.info("%s %s", self.command, urlsplit(self.path).path)


class LabelServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], session: LabelingSession, token: str):
        super().__init__(address, Handler)
        self.session, self.token = session, token

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/?token={self.token}"


def open_server(batch: str, *, annotator: str, out: str | None = None, host: str = "127.0.0.1",
                port: int = 0, seed: int = 0, token: str | None = None) -> LabelServer:
    """A bound, not yet serving, server for ``batch``; raises ``DataError`` for a bad batch or
    labels file. Tests call this directly; ``serve`` runs it."""
    pairs = read_batch(batch)
    store = LabelStore(out or default_labels_path(batch))
    session = LabelingSession(pairs, store, annotator, seed)
    return LabelServer((host, port), session, token or secrets.token_urlsafe(24))


def serve(batch: str, *, annotator: str, out: str | None = None, host: str = "127.0.0.1",
          port: int = 8000, seed: int = 0, on_ready: Callable[[str], None] = print) -> None:
    """Serve the page until interrupted; ``on_ready`` gets the URL with the token (port 0
    picks a free port)."""
    server = open_server(batch, annotator=annotator, out=out, host=host, port=port, seed=seed)
    try:
        on_ready(server.url)
        server.serve_forever()
    finally:
        server.server_close()
