"""Label Studio round trip: a real ``label-studio`` (its own venv, ``labeling/label_studio_env.sh``)
started on 127.0.0.1, a batch pushed as a project, annotations submitted by people's accounts
through the API as the browser submits them, exported and read back into our labels, which
then pass the validation stage's label suite and flag the careless annotator.

Without the venv these tests fail (``make test``, and so CI, creates it); set
``RLHF_SKIP_LABEL_STUDIO=1`` to skip them on a machine that has none.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from dataio import DataError, write_jsonl_atomic
from labeling.batch import Pair, a_shown_first, read_batch
from labeling.label_studio import (LabelStudio, LabelStudioError, labels_from_export, tasks_for,
                                   token_from_env)
from tasks.process import free_port

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("LABEL_STUDIO_VENV", ROOT / ".venv-label-studio"))
ADMIN, ADMIN_PASSWORD, ADMIN_TOKEN = "pipeline@example.com", "pipeline-pw-1", "0123456789abcdef0123"
GOOD = [" a wonderful, lovely film.", " truly great and moving.", " beautiful acting."]
BAD = [" awful and boring.", " a terrible, ugly mess.", " dull. i hated it."]


# --- pure: tasks and the export read back, by hand -------------------------------------------

def _pairs(n: int) -> list[Pair]:
    """Pair i: the good response is a on odd i, b on even i."""
    return [Pair(f"q{i}", f"Review {i}. The movie was", GOOD[i % 3] if i % 2 else BAD[i % 3],
                 BAD[i % 3] if i % 2 else GOOD[i % 3]) for i in range(n)]


def _good_side(task_data: dict) -> str:
    return "left" if task_data["left"] in GOOD else "right"


def test_tasks_put_response_a_on_the_seeded_side():
    pairs = _pairs(8)
    tasks = tasks_for(pairs, seed=3)
    assert [t["data"]["pair_id"] for t in tasks] == [p.pair_id for p in pairs]
    sides = set()
    for t, p in zip(tasks, pairs):
        d = t["data"]
        assert d["a_shown_first"] == a_shown_first(3, p.pair_id)  # as on our own page
        assert (d["left"], d["right"]) == ((p.response_a, p.response_b) if d["a_shown_first"]
                                           else (p.response_b, p.response_a))
        sides.add(d["a_shown_first"])
    assert sides == {True, False}


def _ann(aid, who, selected, stamp, **kw):
    result = [] if selected is None else [{"from_name": "preferred", "to_name": "left,right",
                                          "type": "pairwise", "value": {"selected": selected}}]
    return {"id": aid, "completed_by": who, "result": result, "was_cancelled": False,
            "created_at": stamp, "updated_at": stamp, **kw}


def test_export_read_back_by_hand():
    pairs = _pairs(2)
    t0, t1 = (t["data"] for t in tasks_for(pairs, seed=0))
    export = [
        {"id": 11, "data": t0, "annotations": [
            _ann(2, 7, "left", "2026-11-26T08:00:05.5Z"),
            _ann(1, 8, "right", "2026-11-26T08:00:01Z"),
            _ann(3, 9, "left", "2026-11-26T08:00:09Z", was_cancelled=True),  # skipped
            _ann(4, 9, None, "2026-11-26T08:00:09Z")]},                      # no choice
        {"id": 12, "data": t1, "annotations": [
            _ann(5, {"id": 8, "email": "bo@x.org"}, "left", "2026-11-26T09:00:00+01:00")]},
    ]
    labels = labels_from_export(export, pairs, {7: "al@x.org", 8: "bo@x.org"})
    a_left0, a_left1 = t0["a_shown_first"], t1["a_shown_first"]
    assert [(l.pair_id, l.annotator_id, l.preferred, l.a_shown_first, l.labeled_at)
            for l in labels] == [
        # oldest first; "left" means response_a exactly when a was shown on the left
        ("q0", "bo@x.org", "response_b" if a_left0 else "response_a", a_left0,
         "2026-11-26T08:00:01+00:00"),
        ("q0", "al@x.org", "response_a" if a_left0 else "response_b", a_left0,
         "2026-11-26T08:00:05+00:00"),
        ("q1", "bo@x.org", "response_a" if a_left1 else "response_b", a_left1,
         "2026-11-26T08:00:00+00:00"),
    ]


def test_export_of_another_batch_or_edited_task_is_refused():
    pairs = _pairs(2)
    t0 = tasks_for(pairs)[0]["data"]
    with pytest.raises(DataError, match="rule pair_in_batch: task 5 has pair_id 'zz'"):
        labels_from_export([{"id": 5, "data": dict(t0, pair_id="zz")}], pairs, {})
    with pytest.raises(DataError, match="task 6 .*edited in Label Studio"):
        labels_from_export([{"id": 6, "data": dict(t0, left="something else")}], pairs, {})


def test_token_errors_name_the_variable_never_the_token(monkeypatch):
    monkeypatch.delenv("NO_SUCH_LS_TOKEN", raising=False)
    with pytest.raises(LabelStudioError, match=r"\$NO_SUCH_LS_TOKEN is not set"):
        token_from_env("NO_SUCH_LS_TOKEN")
    port = free_port()  # a port nobody listens on
    client = LabelStudio(f"http://127.0.0.1:{port}", "secret-token-123456")
    with pytest.raises(LabelStudioError, match="cannot reach Label Studio") as e:
        client.export(1)
    assert "secret-token" not in str(e.value) and "secret-token" not in repr(client)


# --- a real Label Studio ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def label_studio(tmp_path_factory):
    """``label-studio start`` on 127.0.0.1:<free port> with a temporary data dir and an admin
    (the pipeline's account) whose legacy token is ADMIN_TOKEN; stopped at the end."""
    exe = VENV / "bin" / "label-studio"
    if not exe.exists():
        if os.environ.get("RLHF_SKIP_LABEL_STUDIO") == "1":
            pytest.skip("RLHF_SKIP_LABEL_STUDIO=1 and no Label Studio venv")
        pytest.fail(f"{exe} is missing: run `bash labeling/label_studio_env.sh` (`make test` "
                    f"does), or set RLHF_SKIP_LABEL_STUDIO=1 to skip these tests")
    data = tmp_path_factory.mktemp("label_studio")
    template = VENV / "template-data" / "label_studio.sqlite3"
    if template.exists():  # migrated already: starts in seconds instead of minutes
        shutil.copy(template, data / "label_studio.sqlite3")
    port = free_port()
    env = dict(os.environ, LABEL_STUDIO_BASE_DATA_DIR=str(data), LATEST_VERSION_CHECK="false",
               COLLECT_ANALYTICS="false")
    log = open(data / "server.log", "wb")
    start = time.monotonic()
    proc = subprocess.Popen(
        [str(exe), "start", "--no-browser", "--data-dir", str(data), "--internal-host",
         "127.0.0.1", "--port", str(port), "--username", ADMIN, "--password", ADMIN_PASSWORD,
         "--user-token", ADMIN_TOKEN, "--enable-legacy-api-token", "--log-level", "WARNING"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = start + 300
        while True:
            if proc.poll() is not None:
                pytest.fail(f"label-studio exited ({proc.returncode}):\n"
                            + (data / "server.log").read_text(errors="replace")[-3000:])
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("label-studio did not answer /health in 300 s:\n"
                            + (data / "server.log").read_text(errors="replace")[-3000:])
            time.sleep(0.5)
        print(f"label-studio up in {time.monotonic() - start:.1f} s")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


class Person:
    """Someone with a Label Studio account, using it as the browser does: signed up through
    the signup form, then the JSON API with the session cookie and the CSRF token."""

    def __init__(self, url: str, email: str, password: str, signup: bool = True):
        import requests

        self.url, self.email, self.s = url, email, requests.Session()
        page = "/user/signup/" if signup else "/user/login/"
        self.s.get(url + page).raise_for_status()
        r = self.s.post(url + page, data={"email": email, "password": password,
                                          "csrfmiddlewaretoken": self.s.cookies["csrftoken"]},
                        headers={"Referer": url + page}, allow_redirects=False)
        assert r.status_code == 302, f"{page} for {email}: {r.status_code} {r.text[:300]}"

    def api(self, method: str, path: str, **kw):
        r = self.s.request(method, self.url + path, headers={
            "X-CSRFToken": self.s.cookies["csrftoken"], "Referer": self.url + "/"}, **kw)
        assert r.ok, f"{method} {path}: {r.status_code} {r.text[:300]}"
        return r.json()

    def choose(self, task_id: int, side: str) -> None:
        self.api("POST", f"/api/tasks/{task_id}/annotations/", json={
            "result": [{"from_name": "preferred", "to_name": "left,right", "type": "pairwise",
                        "value": {"selected": side}}], "lead_time": 2.5})


def test_round_trip_through_a_real_label_studio(label_studio, tmp_path, monkeypatch, capsys):
    from flows.cli import main
    from flows.config import load_config
    from labeling.label_studio import labels_path
    from tasks.feedback import labels_to_preferences
    from tasks.labelers import LabelStudioLabeler, make_labeler
    from tasks.validation import ValidationConfig, run_validation

    pairs = _pairs(12)
    batch = str(tmp_path / "round-abc123" / "batch.jsonl")
    write_jsonl_atomic(batch, [vars(p) for p in pairs])
    monkeypatch.setenv("LS_TEST_TOKEN", ADMIN_TOKEN)
    # Seed 2 shows the kind review on the left of 6 of the 12 pairs: someone who always clicks
    # "left" agrees with the others half the time, as a coin would.
    assert sum(_good_side(t["data"]) == "left" for t in tasks_for(pairs, seed=2)) == 6
    # The labeler as `rlhf feedback --set feedback.labeler=label_studio ...` makes it.
    cfg = load_config("configs/demo.yaml", [
        "feedback.labeler=label_studio", f"feedback.label_studio_url={label_studio}",
        "feedback.label_studio_token_env=LS_TEST_TOKEN", "feedback.label_studio_title=rlhf test",
        "feedback.votes_per_pair=4", "feedback.page_poll_seconds=0.2",
        "feedback.page_timeout_seconds=0.5"])
    labeler = make_labeler(cfg.feedback, judge=None, seed=2)
    assert isinstance(labeler, LabelStudioLabeler)
    # Nobody has labeled yet: the round waits, then says where to label and how to resume.
    with pytest.raises(TimeoutError, match=r"48 votes still missing on 12 pairs .*label at "
                                           rf"{label_studio}/projects/\d+/data"):
        labeler.label(batch)
    state = json.loads((tmp_path / "round-abc123" / "batch.label-studio-project.json").read_text())
    assert state["title"] == "rlhf test round-abc123" and state["votes"] == 4

    people = [Person(label_studio, f"{n}@example.com", f"{n}-pw-12345")
              for n in ("ann", "ben", "cy", "dee")]
    project = people[0].api("GET", f"/api/projects/{state['project_id']}")
    assert project["maximum_annotations"] == 4 and project["task_number"] == 12
    tasks = people[0].api("GET", "/api/tasks", params={"project": state["project_id"],
                                                       "page_size": 100})["tasks"]
    by_pair = {p.pair_id: p for p in pairs}
    submitted = []
    for person in people:
        for t in tasks:
            pair = by_pair[t["data"]["pair_id"]]
            # ann, ben, cy choose the kind review; dee clicks "left" whatever it shows.
            side = "left" if person.email == "dee@example.com" else _good_side(t["data"])
            person.choose(t["id"], side)
            first = t["data"]["a_shown_first"]
            submitted.append((pair.pair_id, person.email,
                              "response_a" if (side == "left") == first else "response_b", first))
        if person.email == "ben@example.com":  # half done: the CLI tells how far it is
            assert main(["label", batch, "--label-studio", label_studio, "--token-env",
                         "LS_TEST_TOKEN", "--title", "rlhf test", "--votes", "4"]) == 0
            out = capsys.readouterr().out
            assert f"Label Studio project {state['project_id']} ('rlhf test round-abc123')" in out
            assert f"0/12 pairs have 4 votes; 24 labels -> {labels_path(batch)}" in out

    log, said = logging.getLogger("rlhf.feedback"), []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: said.append(record.getMessage())
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:  # (pytest's caplog sees nothing here: Prefect's logging config owns the root logger)
        labels_uri = labeler.label(batch)  # complete now: the same project, exported
    finally:
        log.removeHandler(handler)
        log.setLevel(logging.NOTSET)
    assert any(f"label at {label_studio}/projects/{state['project_id']}/data" in m for m in said)
    assert labels_uri == str(labels_path(batch))
    labels = [json.loads(line) for line in open(labels_uri)]
    assert sorted((l["pair_id"], l["annotator_id"], l["preferred"], l["a_shown_first"])
                  for l in labels) == sorted(submitted)
    assert all(l["labeled_at"].endswith("+00:00") for l in labels)
    assert json.loads((tmp_path / "round-abc123" / "batch.label-studio-project.json"
                       ).read_text())["project_id"] == state["project_id"]  # resumed, not new
    assert len(people[0].api("GET", "/api/projects")["results"]) == 1

    # The round's checks: majority -> pairs, votes -> preference_labels, the label suite and
    # the agreement checks (dee, agreeing with the others only by chance, is flagged).
    prefs, votes = labels_to_preferences([vars(p) for p in read_batch(batch)], labels)
    assert len(prefs) == 12 and all(p["chosen"] in GOOD for p in prefs)
    write_jsonl_atomic(str(tmp_path / "pairs.jsonl"), prefs)
    write_jsonl_atomic(str(tmp_path / "votes.jsonl"), votes)
    cfg = ValidationConfig(min_rows=1, min_annotator_votes=10)
    checked = run_validation(cfg, data={"preferences": str(tmp_path / "pairs.jsonl"),
                                        "preference_labels": str(tmp_path / "votes.jsonl")},
                             tokenizer_path="demo/base_model", out_dir=str(tmp_path / "v"),
                             ctx=None)
    flagged = sorted(k.split("/")[1] for k, v in checked.metrics.items()
                     if k.startswith("agreement/") and k.endswith("/flagged") and v)
    assert len(flagged) == 1 and flagged[0].startswith("dee")


def test_personal_access_token_and_bad_token(label_studio, tmp_path, monkeypatch, capsys):
    """Label Studio's default token kind (a JWT refresh token, exchanged for Bearer access
    tokens) works as the legacy one does; a wrong token is exit 2, and never printed."""
    from flows.cli import main

    admin = Person(label_studio, ADMIN, ADMIN_PASSWORD, signup=False)
    pat = admin.api("POST", "/api/token/")["token"]
    assert pat.count(".") == 2
    batch = str(tmp_path / "round-pat" / "batch.jsonl")
    write_jsonl_atomic(batch, [vars(p) for p in _pairs(3)])
    monkeypatch.setenv("LS_PAT", pat)
    assert main(["label", batch, "--label-studio", label_studio, "--token-env", "LS_PAT"]) == 0
    assert "0/3 pairs have 3 votes; 0 labels" in capsys.readouterr().out
    monkeypatch.setenv("LS_BAD", "wrong-token-0000")
    assert main(["label", batch, "--label-studio", label_studio, "--token-env", "LS_BAD"]) == 2
    err = capsys.readouterr().err
    assert "refused the token (401)" in err and "wrong-token" not in err
