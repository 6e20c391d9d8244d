"""The labeling page: batch refusals, the labels file, the token-protected API, and the page
itself driven by keyboard in headless Chromium through the DevTools protocol."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from browser import headless_chromium, start_reader, wait_line
from dataio import DataError
from labeling.batch import (LabelStore, a_shown_first, default_labels_path, read_batch)
from labeling.server import open_server
from tasks.process import stop_process

REPO = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def make_pairs(n: int) -> list[dict]:
    # Distinct texts, so which response is on the left can be read back from the page.
    return [{"pair_id": f"p{i}", "prompt": f"prompt {i}?", "response_a": f"answer A of {i}",
             "response_b": f"answer B of {i}"} for i in range(1, n + 1)]


# --- the batch format ---------------------------------------------------------------------

def test_batch_reads_pairs_and_labels_path(tmp_path):
    batch = write_jsonl(tmp_path / "batch7.jsonl", make_pairs(3))
    pairs = read_batch(str(batch))
    assert [p.pair_id for p in pairs] == ["p1", "p2", "p3"]
    assert pairs[1].response_b == "answer B of 2"
    assert default_labels_path(batch) == tmp_path / "batch7.labels.jsonl"


@pytest.mark.parametrize("bad_row, rule, words", [
    ({"pair_id": "x", "prompt": "q", "response_a": "a"}, "required_columns", "response_b"),
    ({"pair_id": "p1", "prompt": "q", "response_a": "a", "response_b": "b"}, "unique_pair_id",
     "already used on row 1"),
    ({"pair_id": "x", "prompt": "q", "response_a": "a", "response_b": "  "}, "non_empty_text",
     "response_b is empty"),
    ({"pair_id": "x", "prompt": ["q"], "response_a": "a", "response_b": "b"}, "column_type",
     "prompt must be a string"),
    ("{not json", "json", "not valid JSON"),
])
def test_bad_batch_refused_naming_file_row_rule(tmp_path, bad_row, rule, words):
    batch = write_jsonl(tmp_path / "b.jsonl", make_pairs(2) + [bad_row])
    with pytest.raises(DataError) as e:
        read_batch(str(batch))
    message = str(e.value)
    assert f"{batch}: row 3: rule {rule}: " in message and words in message


def test_undo_removes_only_the_annotators_last_label(tmp_path):
    rows = [{"pair_id": p, "annotator_id": who, "preferred": "response_a", "a_shown_first": True,
             "labeled_at": "2026-11-26T00:00:00+00:00"}
            for p, who in (("p1", "alice"), ("p2", "alice"), ("p1", "bob"))]
    path = write_jsonl(tmp_path / "l.jsonl", rows)
    store = LabelStore(path)
    assert store.undo("alice").pair_id == "p2"
    assert [json.loads(l)["pair_id"] + json.loads(l)["annotator_id"]
            for l in path.read_text().splitlines()] == ["p1alice", "p1bob"]
    assert LabelStore(path).labels == store.labels
    assert store.undo("carol") is None
    assert [p.name for p in tmp_path.iterdir()] == ["l.jsonl"]  # no temporary file left


# --- the API ------------------------------------------------------------------------------

@pytest.fixture
def serving(tmp_path):
    """Start a server on a free port for a 4-pair batch; yields a function opening more."""
    batch = write_jsonl(tmp_path / "batch.jsonl", make_pairs(4))
    servers = []

    def start(annotator="alice", out=None):
        server = open_server(str(batch), annotator=annotator, out=out, port=0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def call(server, method, path, body=None, token=None):
    """(status, JSON) of one request; the server's own token unless ``token`` is given."""
    host, port = server.server_address[:2]
    req = urllib.request.Request(f"http://{host}:{port}{path}", method=method,
                                 data=None if body is None else json.dumps(body).encode())
    if token is None:
        token = server.token
    if token:
        req.add_header("X-Token", token)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_every_request_needs_the_token(serving):
    server = serving()
    for method, path in (("GET", "/"), ("GET", "/app.js"), ("GET", "/api/next"),
                         ("GET", "/api/progress"), ("POST", "/api/undo")):
        assert call(server, method, path, token="")[0] == 403, path
        assert call(server, method, path, token=server.token + "x")[0] == 403, path
    status, page = call(server, "GET", f"/?token={server.token}", token="")
    assert status == 200 and f'app.js?token={server.token}' in page.decode()
    assert call(server, "GET", f"/app.js?token={server.token}", token="")[0] == 200
    assert call(server, "GET", "/api/nothing")[0] == 404
    assert server.url.startswith("http://127.0.0.1:") and server.url.endswith(server.token)


def test_choice_undo_progress_and_the_labels_file(serving, tmp_path):
    server = serving()
    status, body = call(server, "GET", "/api/next")
    state = json.loads(body)
    assert status == 200 and state["progress"] == {"done": 0, "total": 4}
    first = state["pair"]
    assert first["pair_id"] == "p1" and first["prompt"] == "prompt 1?"
    assert first["a_shown_first"] == a_shown_first(0, "p1")
    assert first["left"] == ("answer A of 1" if first["a_shown_first"] else "answer B of 1")

    state = json.loads(call(server, "POST", "/api/choice", {"pair_id": "p1", "side": "left"})[1])
    assert state["pair"]["pair_id"] == "p2" and state["progress"]["done"] == 1
    assert call(server, "POST", "/api/choice", {"pair_id": "p1", "side": "left"})[0] == 409
    assert call(server, "POST", "/api/choice", {"pair_id": "p9", "side": "left"})[0] == 404
    assert call(server, "POST", "/api/choice", {"pair_id": "p2", "side": "up"})[0] == 400
    assert call(server, "POST", "/api/choice", {"side": "left"})[0] == 400
    call(server, "POST", "/api/choice", {"pair_id": "p2", "side": "right"})
    assert json.loads(call(server, "GET", "/api/progress")[1]) == {"done": 2, "total": 4}

    labels_path = tmp_path / "batch.labels.jsonl"
    rows = [json.loads(l) for l in labels_path.read_text().splitlines()]
    assert [r["pair_id"] for r in rows] == ["p1", "p2"]
    assert set(rows[0]) == {"pair_id", "annotator_id", "preferred", "a_shown_first",
                            "labeled_at"}
    for row, side in zip(rows, ("left", "right")):
        on_left = "response_a" if row["a_shown_first"] else "response_b"
        on_right = "response_b" if row["a_shown_first"] else "response_a"
        assert row["preferred"] == (on_left if side == "left" else on_right)
        assert row["annotator_id"] == "alice" and row["labeled_at"].endswith("+00:00")

    state = json.loads(call(server, "POST", "/api/undo")[1])
    assert state["undone"] == "p2" and state["pair"]["pair_id"] == "p2"
    assert state["progress"]["done"] == 1
    assert [json.loads(l)["pair_id"] for l in labels_path.read_text().splitlines()] == ["p1"]


def test_resume_continues_where_the_annotator_stopped(serving, tmp_path):
    server = serving()
    for pid in ("p1", "p2"):
        call(server, "POST", "/api/choice", {"pair_id": pid, "side": "right"})
    server.shutdown()

    again = serving()  # same batch, same labels file: a restart
    state = json.loads(call(again, "GET", "/api/next")[1])
    assert state["pair"]["pair_id"] == "p3" and state["progress"] == {"done": 2, "total": 4}
    # The same seed shows each pair the same way round after a restart.
    assert state["pair"]["a_shown_first"] == a_shown_first(0, "p3")
    bob = serving(annotator="bob", out=str(tmp_path / "batch.labels.jsonl"))
    assert json.loads(call(bob, "GET", "/api/progress")[1]) == {"done": 0, "total": 4}


def test_labels_file_of_another_batch_refused(tmp_path):
    batch = write_jsonl(tmp_path / "b.jsonl", make_pairs(2))
    write_jsonl(tmp_path / "b.labels.jsonl", [{
        "pair_id": "zz", "annotator_id": "a", "preferred": "response_a", "a_shown_first": True,
        "labeled_at": "2026-11-26T00:00:00+00:00"}])
    with pytest.raises(DataError, match="rule pair_in_batch: .*'zz'"):
        open_server(str(batch), annotator="a", port=0)


# --- the page, in headless Chromium -------------------------------------------------------

@pytest.mark.timeout(120)
def test_label_a_batch_by_keyboard_in_headless_chromium(tmp_path):
    deadline = time.monotonic() + 60
    pairs = make_pairs(6)
    batch = write_jsonl(tmp_path / "batch.jsonl", pairs)
    labels = tmp_path / "out.labels.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "label", str(batch), "--annotator", "kim",
         "--out", str(labels), "--port", "0"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with headless_chromium(tmp_path, deadline) as devtools:
            url = wait_line(start_reader(server.stdout), "?token=", deadline, "rlhf label")
            assert url.startswith("http://127.0.0.1:")
            devtools.send("Page.navigate", url=url)
            label_by_keyboard(devtools, pairs, labels, deadline)
    finally:
        stop_process(server, timeout=10)
    assert server.returncode == 0, "rlhf label should exit cleanly on SIGTERM"


def label_by_keyboard(devtools, pairs: list[dict], labels: Path, deadline: float) -> None:
    """Choose, undo and move through the six pairs by keyboard; check the labels file."""
    def wait_page(condition: str, what: str):
        return devtools.wait(condition, what, deadline, poll=0.05)

    by_id = {p["pair_id"]: p for p in pairs}
    expected: dict[str, tuple[str, bool]] = {}  # pair_id -> (preferred, a_shown_first)
    order: list[str] = []
    shown_first = set()
    for key in ("1", "ArrowRight", "1", "u", "ArrowRight", "2", "ArrowLeft", "ArrowRight"):
        state = wait_page("document.body.dataset.state === 'ready' && JSON.stringify("
                          "[document.body.dataset.pairId, document.getElementById('left')"
                          ".textContent, document.getElementById('progress').textContent])",
                          "showed a pair")
        pair_id, left, progress = json.loads(state)
        assert progress == f"{len(order)} / 6"
        pair = by_id[pair_id]
        assert left in (pair["response_a"], pair["response_b"])
        a_first = left == pair["response_a"]
        shown_first.add(a_first)
        if key == "u":
            undone = order.pop()
            del expected[undone]
        else:
            assert pair_id == f"p{len(order) + 1}"
            side_left = key in ("1", "ArrowLeft")
            expected[pair_id] = ("response_a" if side_left == a_first else "response_b",
                                 a_first)
            order.append(pair_id)
        devtools.key(key)
        wait_page(f"document.getElementById('progress').textContent !== '{progress}'",
                  f"moved on after {key!r}")
    wait_page("document.body.dataset.state === 'done' && "
              "document.body.innerText.includes('done')", "showed done")
    assert devtools.eval("document.getElementById('progress').textContent") == "6 / 6"
    assert shown_first == {True, False}, "the seeded order should put A left and right"

    rows = [json.loads(l) for l in labels.read_text().splitlines()]
    assert [r["pair_id"] for r in rows] == [f"p{i}" for i in range(1, 7)]
    assert {r["pair_id"]: (r["preferred"], r["a_shown_first"]) for r in rows} == expected
    assert all(r["annotator_id"] == "kim" for r in rows)
    # p3 was chosen left, undone, then chosen right: the label is the right one only.
    p3_first = expected["p3"][1]
    assert expected["p3"][0] == ("response_b" if p3_first else "response_a")
    assert time.monotonic() < deadline
