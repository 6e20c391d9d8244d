"""Who labels a feedback round's batch, behind one interface: ``label(batch_uri) -> labels_uri``
(the labels file format of ``labeling/batch.py``).

- ``SimulatedLabeler``: annotators simulated from a gold judge (demo, tests, benchmarks);
- ``PageLabeler``: people on the labeling page (``rlhf label BATCH``); the round waits for them;
- ``LabelStudioLabeler``: people in a Label Studio project (``labeling/label_studio.py``); the
  round pushes the batch and waits for the annotations.

``make_labeler`` picks one from ``feedback.labeler``.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict
from datetime import datetime, timezone
from typing import Protocol, Sequence

from dataio import local_path, read_records, write_jsonl_atomic
from tasks.feedback import FeedbackConfig


class Labeler(Protocol):
    """Anyone who labels a batch: page, Label Studio, simulated annotators, later a judge."""

    def label(self, batch_uri: str) -> str:
        """Label every pair of the batch; returns the labels file's URI (``labeling/batch.py``)."""
        ...


class SimulatedLabeler:
    """Annotators simulated as in the demo data (``demo/build.py``: ``label_pairs``): each votes
    by Bradley-Terry on the judge's scores with their own temperature,
    P(a) = sigmoid((g_a - g_b) / T); the demo's ``a4`` (T = 3) is careless on purpose.
    ``votes_per_pair`` distinct annotators per pair, all seeded."""

    def __init__(self, judge: str, votes_per_pair: int, seed: int,
                 annotators: dict[str, float] | None = None):
        if annotators is None:
            from demo.build import ANNOTATORS

            annotators = ANNOTATORS
        if votes_per_pair > len(annotators):
            raise ValueError(f"votes_per_pair={votes_per_pair} but only {len(annotators)} "
                             f"simulated annotators")
        self.judge, self.votes, self.seed, self.annotators = judge, votes_per_pair, seed, annotators

    def label(self, batch_uri: str) -> str:
        from demo.build import simulated_vote
        from labeling.batch import Label, a_shown_first, default_labels_path, read_batch
        from tasks.evaluate import load_judge

        pairs = read_batch(batch_uri)
        judge = load_judge(self.judge)
        rng = random.Random(self.seed)
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        rows = []
        for pair in pairs:
            ga, gb = judge([pair.response_a, pair.response_b])
            for voter in rng.sample(sorted(self.annotators), self.votes):
                a_wins = simulated_vote(rng, ga, gb, self.annotators[voter])
                rows.append(asdict(Label(pair.pair_id, voter,
                                         "response_a" if a_wins else "response_b",
                                         a_shown_first(self.seed, pair.pair_id), stamp)))
        out = str(default_labels_path(local_path(batch_uri)))
        write_jsonl_atomic(out, rows)
        return out


def missing_votes(pair_ids: Sequence[str], labels: Sequence[dict], votes_per_pair: int
                  ) -> dict[str, int]:
    """pair_id -> votes still missing (distinct annotators with a valid choice); {} = complete."""
    voters: dict[str, set] = {p: set() for p in pair_ids}
    for label in labels:
        if label.get("pair_id") in voters and label.get("preferred") in ("response_a",
                                                                         "response_b"):
            voters[label["pair_id"]].add(label.get("annotator_id"))
    return {p: votes_per_pair - len(v) for p, v in voters.items() if len(v) < votes_per_pair}


class PageLabeler:
    """People label the batch on the labeling page, each with their own name::

        rlhf label <round>/batch.jsonl --annotator alice     # writes <round>/batch.labels.jsonl

    ``label`` waits until that labels file holds ``votes_per_pair`` votes from distinct
    annotators for every pair of the batch (polling every ``poll_seconds``), and fails with
    what is missing after ``timeout_seconds``. Annotators should label one after another, or
    a deployment should run the round's wait as a paused flow; the page appends each label to
    the file as it is given."""

    def __init__(self, votes_per_pair: int, poll_seconds: float, timeout_seconds: float):
        self.votes, self.poll, self.timeout = votes_per_pair, poll_seconds, timeout_seconds

    def missing(self, batch_uri: str) -> dict[str, int]:
        from labeling.batch import default_labels_path, read_batch

        ids = [p.pair_id for p in read_batch(batch_uri)]
        path = default_labels_path(local_path(batch_uri))
        labels = read_records(str(path)) if path.exists() and path.stat().st_size else []
        return missing_votes(ids, labels, self.votes)

    def label(self, batch_uri: str) -> str:
        from labeling.batch import default_labels_path

        wait_for_votes(lambda: self.missing(batch_uri), self.poll, self.timeout,
                       f"{batch_uri}", f"label with: rlhf label {batch_uri} --annotator NAME")
        return str(default_labels_path(local_path(batch_uri)))


def wait_for_votes(missing, poll: float, timeout: float, what: str, how: str) -> None:
    """Call ``missing()`` (pair_id -> votes missing) every ``poll`` seconds until it is empty;
    ``TimeoutError`` saying what is missing and ``how`` to give it after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        left = missing()
        if not left:
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: {sum(left.values())} votes still missing on "
                               f"{len(left)} pairs after {timeout:.0f} s ({how})")
        time.sleep(poll)


class LabelStudioLabeler:
    """People label the batch in a Label Studio: ``label`` creates a project for the batch
    (pairwise A/B config, ``votes_per_pair`` annotations per task) and imports its pairs, or
    resumes the project this batch was pushed to before; then it exports the annotations every
    ``poll_seconds`` into ``<batch stem>.label-studio.labels.jsonl`` (our labels format) until
    every pair has ``votes_per_pair`` votes from distinct people, and fails with what is missing
    and where to label after ``timeout_seconds``. ``rlhf label BATCH --label-studio URL`` does
    one such push-and-export by hand. The token is read from ``$token_env`` when labeling
    starts, never stored."""

    def __init__(self, url: str, token_env: str, title: str, votes_per_pair: int,
                 poll_seconds: float, timeout_seconds: float, seed: int = 0):
        self.url, self.token_env, self.title = url, token_env, title
        self.votes, self.poll, self.timeout, self.seed = (votes_per_pair, poll_seconds,
                                                          timeout_seconds, seed)

    def label(self, batch_uri: str) -> str:
        from labeling.batch import read_batch
        from labeling.label_studio import (LabelStudio, project_title, pull_labels, push_batch,
                                           read_labels, token_from_env)

        client = LabelStudio(self.url, token_from_env(self.token_env))
        project = push_batch(client, batch_uri, title=project_title(self.title, batch_uri),
                             votes=self.votes, seed=self.seed)
        ids = [p.pair_id for p in read_batch(batch_uri)]
        _logger().info(
            "batch %s is Label Studio project %d: label at %s (%d votes per pair)",
            batch_uri, project.project_id, project.labeling_url, self.votes)
        out = {}

        def missing() -> dict[str, int]:
            out["path"] = pull_labels(client, project, batch_uri)
            return missing_votes(ids, read_labels(out["path"]), self.votes)

        wait_for_votes(missing, self.poll, self.timeout, f"{batch_uri}",
                       f"label at {project.labeling_url}; the same batch resumes this project")
        return out["path"]


def _logger():
    """The Prefect run's logger inside a round (its lines reach the terminal and the UI), a
    plain one outside any run (tests, scripts)."""
    import logging

    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("rlhf.feedback")


def make_labeler(cfg: FeedbackConfig, *, judge: str | None, seed: int) -> Labeler:
    if cfg.labeler == "page":
        return PageLabeler(cfg.votes_per_pair, cfg.page_poll_seconds, cfg.page_timeout_seconds)
    if cfg.labeler == "label_studio":
        return LabelStudioLabeler(cfg.label_studio_url, cfg.label_studio_token_env,
                                  cfg.label_studio_title, cfg.votes_per_pair,
                                  cfg.page_poll_seconds, cfg.page_timeout_seconds, seed)
    judge = cfg.simulated_judge or judge
    if not judge:
        raise ValueError("feedback.labeler=simulated needs feedback.simulated_judge or "
                         "evaluate.gold_judge (module:function)")
    return SimulatedLabeler(judge, cfg.votes_per_pair, seed)
