"""A labeling batch in a real Label Studio, over its REST API, and the annotations read back.

    client = LabelStudio("http://localhost:8080", token_from_env("LABEL_STUDIO_API_KEY"))
    project = push_batch(client, "round/batch.jsonl", title="rlhf feedback round-1", votes=3)
    # people label at project.labeling_url, each vote an annotation
    labels_uri, by_pair = pull_labels(client, project, "round/batch.jsonl")

Each pair is one Label Studio task: the prompt, and the two responses as ``left``/``right``
under a ``Pairwise`` tag (``LABEL_CONFIG``). Which response goes on the left is the same seeded
coin as on our own page (``labeling.batch.a_shown_first``) and travels in the task's data, so
the read-back knows which response a "left" meant and position bias stays measurable.
``maximum_annotations`` = votes per pair: Label Studio hands each task to that many people.

The read-back writes labels in our format (``labeling/batch.py``: one row per vote, annotator
= the Label Studio account's email) to ``<batch stem>.label-studio.labels.jsonl``, so the
round's checks read them as they read the page's.

The project lives as long as its batch: ``<batch stem>.label-studio-project.json`` beside the
batch records the server and project id, so pushing the same batch again resumes that project
instead of creating another. ``<batch stem>.label-studio.json`` is the batch as Label Studio's
task JSON, for importing by hand in its UI.

Plain ``urllib`` against the documented API (``/api/projects``, ``/api/projects/<id>/import``,
``/api/projects/<id>/export``, ``/api/users``), no ``label-studio-sdk``: the SDK is ~20
packages for five requests. Checked against label-studio 1.23.2. Tokens: a legacy token is sent
as ``Authorization: Token ...``; a personal access token (a JWT refresh token, Label Studio's
default since 1.18) is exchanged at ``/api/token/refresh`` for a short-lived access token sent
as ``Bearer``, and exchanged again when it expires. The token is never logged or put in an
error message.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dataio import DataError, local_path, read_records, write_jsonl_atomic
from labeling.batch import Label, Pair, a_shown_first, read_batch

# Two responses side by side, one choice. The Pairwise tag's result is
# {"type": "pairwise", "value": {"selected": "left" | "right"}}; "left" is the first toName.
LABEL_CONFIG = """<View>
  <Header value="Which response is better?"/>
  <Text name="prompt" value="$prompt"/>
  <View style="display: flex; gap: 1em;">
    <View style="flex: 1;"><Header value="Left" size="5"/>
      <Text name="left" value="$left"/></View>
    <View style="flex: 1;"><Header value="Right" size="5"/>
      <Text name="right" value="$right"/></View>
  </View>
  <Pairwise name="preferred" toName="left,right"/>
</View>"""
CHOICE_FROM = "preferred"
TITLE_MAX = 50  # Label Studio's PROJECT_TITLE_MAX_LEN (min 3)
DEFAULT_TITLE = "rlhf feedback"
DEFAULT_TOKEN_ENV = "LABEL_STUDIO_API_KEY"  # the variable label-studio-sdk reads too


class LabelStudioError(RuntimeError):
    """A request Label Studio refused or could not answer; the message says which and why,
    ``status`` is the HTTP status (None when there was no answer)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def token_from_env(var: str) -> str:
    """The API token in ``$var``; ``LabelStudioError`` naming the variable when it is unset."""
    token = os.environ.get(var, "").strip()
    if not token:
        raise LabelStudioError(
            f"${var} is not set: put a Label Studio access token in it (Label Studio: "
            f"Account & Settings > Personal Access Token, or the legacy Access Token)")
    return token


def _is_jwt(token: str) -> bool:
    return token.count(".") == 2 and token.startswith("eyJ")


class LabelStudio:
    """A Label Studio server at ``url``, authenticated by ``token``."""

    def __init__(self, url: str, token: str, timeout: float = 60.0):
        self.url, self.timeout = url.rstrip("/"), timeout
        self._token = token
        self._access: str | None = None  # Bearer token from a personal access token

    def __repr__(self) -> str:  # never the token
        return f"LabelStudio({self.url!r})"

    def _auth(self, refresh: bool) -> str:
        if not _is_jwt(self._token):
            return f"Token {self._token}"
        if refresh or self._access is None:
            self._access = self._send("POST", "/api/token/refresh", {"refresh": self._token},
                                      auth=None)["access"]
        return f"Bearer {self._access}"

    def request(self, method: str, path: str, body: Any = None, query: str = "") -> Any:
        """``method path`` with a JSON body -> the decoded JSON answer."""
        try:
            return self._send(method, path + query, body, self._auth(refresh=False))
        except _Unauthorized:
            if not _is_jwt(self._token):
                raise LabelStudioError(f"Label Studio at {self.url} refused the token "
                                       f"(401): wrong or revoked token?", 401) from None
            try:  # the access token expired (5 minutes): exchange the refresh token again
                return self._send(method, path + query, body, self._auth(refresh=True))
            except _Unauthorized:
                raise LabelStudioError(f"Label Studio at {self.url} refused the token "
                                       f"(401): wrong or revoked token?", 401) from None

    def _send(self, method: str, path: str, body: Any, auth: str | None) -> Any:
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if auth:
            headers["Authorization"] = auth
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            if e.code == 401 and auth:
                raise _Unauthorized() from None
            detail = e.read().decode(errors="replace")
            try:  # Label Studio answers {"detail": ..., "validation_errors": {...}}
                j = json.loads(detail)
                detail = json.dumps(j.get("validation_errors") or j.get("detail") or j)
            except ValueError:
                detail = detail[:300]
            raise LabelStudioError(f"Label Studio at {self.url}: {method} {path.split('?')[0]} "
                                   f"-> {e.code}: {detail}", e.code) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise LabelStudioError(
                f"cannot reach Label Studio at {self.url} ({reason}): is it running? "
                f"(.venv-label-studio/bin/label-studio start)") from None
        return json.loads(raw) if raw else None

    # --- the few calls a round needs --------------------------------------------------------

    def create_project(self, title: str, votes: int) -> int:
        p = self.request("POST", "/api/projects", {
            "title": title, "label_config": LABEL_CONFIG, "maximum_annotations": votes,
            "description": "rlhf-pipeline feedback round: choose the better response"})
        return int(p["id"])

    def project(self, project_id: int) -> dict | None:
        """The project's fields, or None when it no longer exists."""
        try:
            return self.request("GET", f"/api/projects/{project_id}")
        except LabelStudioError as e:
            if e.status == 404:
                return None
            raise

    def import_tasks(self, project_id: int, tasks: list[dict]) -> int:
        """All tasks in one request (Label Studio imports them in one transaction)."""
        return int(self.request("POST", f"/api/projects/{project_id}/import", tasks)["task_count"])

    def export(self, project_id: int) -> list[dict]:
        """Every task with its annotations (Label Studio's JSON export)."""
        return self.request("GET", f"/api/projects/{project_id}/export",
                            query="?exportType=JSON&download_all_tasks=true")

    def user_emails(self) -> dict[int, str]:
        """User id -> email, for the annotators of an export (it names them by id)."""
        return {int(u["id"]): u["email"] for u in self.request("GET", "/api/users")}


class _Unauthorized(Exception):
    pass


# --- batch -> tasks -> labels (pure) ---------------------------------------------------------

def tasks_for(pairs: list[Pair], seed: int = 0) -> list[dict]:
    """Label Studio tasks, one per pair: prompt, left, right, and which side response_a is."""
    tasks = []
    for p in pairs:
        first = a_shown_first(seed, p.pair_id)
        left, right = (p.response_a, p.response_b) if first else (p.response_b, p.response_a)
        tasks.append({"data": {"pair_id": p.pair_id, "prompt": p.prompt, "left": left,
                               "right": right, "a_shown_first": first}})
    return tasks


def _utc(stamp: str) -> str:
    """Label Studio's ``2026-11-26T08:11:59.925832Z`` -> ours, ``2026-11-26T08:11:59+00:00``."""
    t = datetime.fromisoformat(stamp).astimezone(timezone.utc)
    return t.isoformat(timespec="seconds")


def labels_from_export(export: list[dict], pairs: list[Pair], emails: dict[int, str],
                       where: str = "Label Studio export") -> list[Label]:
    """Label Studio's JSON export -> our labels, one per submitted (not skipped) annotation
    with a pairwise choice, oldest first (so a later vote of the same person wins later on).

    ``DataError`` (``where``, task id, rule) for a task that is not a pair of this batch or
    whose texts differ from it: the project is not this batch's, or someone edited it."""
    by_id = {p.pair_id: p for p in pairs}
    found = []
    for task in export:
        data, tid = task.get("data") or {}, task.get("id")
        pair = by_id.get(data.get("pair_id"))
        if pair is None:
            raise DataError(where, f"task {tid} has pair_id {data.get('pair_id')!r}, which is "
                                   f"not in the batch: wrong project?", rule="pair_in_batch")
        first = bool(data.get("a_shown_first"))
        shown = (pair.response_a, pair.response_b) if first else (pair.response_b, pair.response_a)
        if (data.get("left"), data.get("right")) != shown:
            raise DataError(where, f"task {tid} ({pair.pair_id}) shows other texts than the "
                                   f"batch's pair: edited in Label Studio?", rule="pair_in_batch")
        for ann in task.get("annotations") or []:
            if ann.get("was_cancelled"):
                continue  # skipped by the annotator: no vote
            choice = next((r["value"].get("selected") for r in ann.get("result") or []
                           if r.get("type") == "pairwise" and r.get("from_name") == CHOICE_FROM),
                          None)
            if choice not in ("left", "right"):
                continue  # submitted without a choice: no vote
            who = ann.get("completed_by")
            who = who.get("email") if isinstance(who, dict) else emails.get(who, f"user-{who}")
            preferred = "response_a" if (choice == "left") == first else "response_b"
            stamp = ann.get("updated_at") or ann.get("created_at")
            found.append((stamp, ann.get("id", 0),
                          Label(pair.pair_id, who, preferred, first, _utc(stamp))))
    return [label for _, _, label in sorted(found, key=lambda x: (x[0], x[1]))]


# --- files beside the batch -----------------------------------------------------------------

def _beside(batch_uri: str, suffix: str) -> Path:
    path = local_path(batch_uri)
    return path.with_name(f"{path.stem}{suffix}")


def labels_path(batch_uri: str) -> Path:
    """``round/batch.jsonl`` -> ``round/batch.label-studio.labels.jsonl``."""
    return _beside(batch_uri, ".label-studio.labels.jsonl")


def write_tasks_file(batch_uri: str, seed: int = 0) -> str:
    """``<batch stem>.label-studio.json``: the batch as Label Studio tasks (UI import)."""
    out = _beside(batch_uri, ".label-studio.json")
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(tasks_for(read_batch(batch_uri), seed), indent=1) + "\n",
                   encoding="utf-8")
    os.replace(tmp, out)
    return str(out)


@dataclass(frozen=True)
class Project:
    """A batch's project in Label Studio (also the state file beside the batch)."""

    url: str
    project_id: int
    title: str
    votes: int

    @property
    def labeling_url(self) -> str:
        return f"{self.url}/projects/{self.project_id}/data"


def project_title(prefix: str, batch_uri: str) -> str:
    """``prefix`` + the batch's folder (``round-<run id>``, cut to fit Label Studio's 50)."""
    title = f"{prefix} {local_path(batch_uri).parent.name}".strip()
    return title[:TITLE_MAX]


def push_batch(client: LabelStudio, batch_uri: str, *, title: str, votes: int,
               seed: int = 0) -> Project:
    """Create the batch's project and import its pairs, or resume the project this batch was
    pushed to before (same server; a project deleted meanwhile is created again)."""
    pairs = read_batch(batch_uri)
    state = _beside(batch_uri, ".label-studio-project.json")
    project = None
    if state.exists():
        saved = Project(**json.loads(state.read_text(encoding="utf-8")))
        if saved.url == client.url and client.project(saved.project_id) is not None:
            project = saved
    if project is None:
        project = Project(client.url, client.create_project(title, votes), title, votes)
        state.write_text(json.dumps(asdict(project)) + "\n", encoding="utf-8")
    # A crash between create and import leaves an empty project: import on resume.
    if int(client.project(project.project_id).get("task_number") or 0) == 0:
        client.import_tasks(project.project_id, tasks_for(pairs, seed))
    return project


def pull_labels(client: LabelStudio, project: Project, batch_uri: str,
                out: str | None = None) -> str:
    """Export the project's annotations, write them as our labels file (atomically, the whole
    file each time: Label Studio holds the truth); -> its path."""
    pairs = read_batch(batch_uri)
    where = f"{project.labeling_url} (export)"
    labels = labels_from_export(client.export(project.project_id), pairs, client.user_emails(),
                                where)
    path = str(out or labels_path(batch_uri))
    write_jsonl_atomic(path, [asdict(label) for label in labels])
    return path


def read_labels(path: str) -> list[dict]:
    """A labels file as rows ([] for an empty one)."""
    p = Path(path)
    return read_records(path) if p.exists() and p.stat().st_size else []
