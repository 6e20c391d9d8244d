"""Feedback round stage: pick the pairs the reward model is least sure of, get them labeled,
check the labels and write a new version of the preference dataset.

1. **select**: each candidate prompt (the RL prompts) gets two responses from the current
   policy; both reward models score them. A pair is uncertain when the policy's reward model
   gives P(a > b) near 0.5 (its calibrated ``RewardNorm.preference_prob``) and/or when the
   held-out reward model disagrees with it: labels help most where the model cannot tell
   (uncertainty sampling, Settles 2009, "Active Learning Literature Survey", sec. 3.1; the two
   reward models are a query-by-committee of two, sec. 3.2). ``random`` is the baseline.
2. **batch**: the chosen pairs as a labeling batch (``labeling/batch.py``).
3. **label**: any ``Labeler`` (``tasks/labelers.py``: ``label(batch_uri) -> labels_uri``):
   simulated annotators, the labeling page (``rlhf label``) or a Label Studio project
   (``labeling/label_studio.py``); later a judge model (ROADMAP.md).
4. **check and version**: majority vote -> preference pairs, votes -> ``preference_labels``
   rows; the validation stage checks them (label suite, annotator agreement); then old pairs +
   new pairs are written as a new content-addressed file ``preferences-<sha12>.jsonl`` (the old
   file is never touched) and logged as a dataset input of the round's MLflow run.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from pathlib import Path
from typing import Any, Literal, Sequence

from prefect import task
from pydantic import BaseModel, Field

from dataio import jsonl_bytes, local_path, openable, read_records, write_jsonl_atomic
from labeling.label_studio import DEFAULT_TITLE, DEFAULT_TOKEN_ENV
from tasks.base import StageConfig, TrackingContext
from tasks.refusal import refusals_returned


class FeedbackConfig(StageConfig):
    """One human-feedback round: which pairs to label, who labels them, how many votes."""

    selection: Literal["uncertainty", "random"] = "uncertainty"
    """``uncertainty``: the pairs the reward models are least sure of; ``random``: any pairs
    (the baseline a benchmark compares against)."""
    batch_size: int = Field(default=64, ge=1)
    """Pairs sent to the labelers per round."""
    max_candidates: int | None = Field(default=512, ge=1)
    """RL prompts (a seeded random subset) that get two sampled responses each; null: all."""
    disagreement_weight: float = Field(default=1.0, ge=0.0)
    """Weight of |P_rm - P_heldout| (the two reward models disagree) beside 1 - |2 P_rm - 1|
    (the policy's reward model is unsure) in a pair's uncertainty; 0 ignores the held-out one."""
    max_new_tokens: int = Field(default=128, ge=1)
    """Response length cap when sampling candidates (use the policy stage's)."""
    temperature: float = Field(default=1.0, gt=0.0)
    """Sampling temperature for candidate responses."""
    sample_batch_size: int = Field(default=32, ge=1)
    """Sequences per generation/scoring batch."""
    labeler: Literal["simulated", "page", "label_studio"] = "page"
    """``simulated``: annotators simulated from a gold judge (demo and benchmarks); ``page``:
    people label the batch with ``rlhf label BATCH`` and the round waits for the labels file;
    ``label_studio``: the round pushes the batch to the Label Studio at
    ``label_studio_url`` as a project and waits until people have annotated every task."""
    votes_per_pair: int = Field(default=3, ge=1)
    """Votes per pair (distinct annotators); the majority makes chosen/rejected (odd avoids
    ties, which are dropped)."""
    simulated_judge: str | None = None
    """``module:function`` the simulated annotators vote on (Bradley-Terry on its scores);
    null: ``evaluate.gold_judge``."""
    page_poll_seconds: float = Field(default=10.0, gt=0.0)
    """How often the ``page`` and ``label_studio`` labelers check whether the labels are
    complete."""
    page_timeout_seconds: float = Field(default=7 * 24 * 3600.0, gt=0.0)
    """How long the ``page`` and ``label_studio`` labelers wait for complete labels before
    failing."""
    label_studio_url: str = "http://localhost:8080"
    """Label Studio's address (``labeler: label_studio``)."""
    label_studio_token_env: str = DEFAULT_TOKEN_ENV
    """Environment variable holding the Label Studio API token (personal access token or
    legacy token); the token itself never goes in a config file or a log."""
    label_studio_title: str = DEFAULT_TITLE
    """Label Studio project title; the round's folder name (``round-<run id>``) is appended,
    cut to Label Studio's 50 characters."""
    weakness_share: float = Field(default=0.5, ge=0.0, le=1.0)
    """Share of the batch aimed at the checks the gate failed (``weakness_scores``: length,
    repetition, over-optimisation, win rate), when one of them failed; the rest by
    ``selection``."""
    on_refusal: Literal["round", "stop"] = "round"
    """What ``rlhf run`` does when the gate refuses the candidate: ``round`` starts feedback
    rounds (up to ``max_rounds``, stopping at promotion); ``stop`` ends with the result
    ``feedback_round_needed`` and the reasons."""
    max_rounds: int = Field(default=3, ge=0)
    """Rounds a refusal starts at most (``rlhf feedback --rounds`` overrides); they stop at
    promotion."""


# --- select ------------------------------------------------------------------------------

def uncertainty_scores(p_rm: Sequence[float], p_heldout: Sequence[float] | None = None,
                       disagreement_weight: float = 1.0) -> list[float]:
    """Per pair: ``(1 - |2 p_rm - 1|) + w * |p_rm - p_heldout|``.

    ``p_rm``: the policy's reward model's calibrated P(a > b); 1 at p = 0.5, 0 at p in {0, 1}.
    ``p_heldout``: the held-out reward model's P(a > b); their gap is the committee's
    disagreement (0 when none is given).
    """
    scores = []
    for i, p in enumerate(p_rm):
        s = 1.0 - abs(2.0 * p - 1.0)
        if p_heldout is not None:
            s += disagreement_weight * abs(p - p_heldout[i])
        scores.append(s)
    return scores


TARGETED = ("length", "repetition", "overoptimisation", "win_rate", "win_rate_lower",
            "gold_gain", "champion")
"""Gate checks (``tasks.gate.CHECKS``) a pair's labels can speak to; KL, perplexity or a
failed data check call for other fixes than labels."""


def weakness_scores(failed: Sequence[str], p_rm: Sequence[float], len_a: Sequence[float],
                    len_b: Sequence[float], rep_a: Sequence[float], rep_b: Sequence[float],
                    p_heldout: Sequence[float] | None = None) -> list[float] | None:
    """Per pair (a = candidate, b = baseline), how squarely its label tests a check the gate
    failed; None when no failed check is one that labels can speak to (``TARGETED``).

    Each term is in [0, 1] and they add up, one per failed check:
    - length: the reward model prefers the longer response, by a wide margin in length:
      ``P(longer wins) * |len_a - len_b| / max(len_a, len_b)``. A person then says whether
      longer really is better, which is what a length-following reward model got wrong;
    - repetition: the same with the share of repeated bigrams in place of length;
    - over-optimisation: the two reward models disagree, ``|p_rm - p_heldout|``;
    - a win rate or gold gain too low (also against the champion): the reward model is sure
      the candidate wins, ``p_rm``; a judge that disagrees is where the reward model is wrong.
    """
    hit = [f for f in failed if f in TARGETED]
    if not hit:
        return None
    scores = [0.0] * len(p_rm)
    for i, p in enumerate(p_rm):
        if "length" in hit:
            longer_wins = p if len_a[i] > len_b[i] else 1.0 - p
            gap = abs(len_a[i] - len_b[i]) / max(len_a[i], len_b[i], 1.0)
            scores[i] += longer_wins * gap
        if "repetition" in hit:
            more_wins = p if rep_a[i] > rep_b[i] else 1.0 - p
            scores[i] += more_wins * abs(rep_a[i] - rep_b[i])
        if "overoptimisation" in hit and p_heldout is not None:
            scores[i] += abs(p - p_heldout[i])
        if {"win_rate", "win_rate_lower", "gold_gain", "champion"} & set(hit):
            scores[i] += p
    return scores


def select_pairs(k: int, uncertainty: Sequence[float], weakness: Sequence[float] | None,
                 weakness_share: float, random_seed: int | None = None) -> list[int]:
    """``round(k * weakness_share)`` pairs by ``weakness`` (highest first, when given), then
    the rest by uncertainty (highest first), or at random with ``random_seed``; no pair twice.
    Ties: lower index first."""
    n = len(uncertainty)
    k = min(k, n)
    picked: list[int] = []
    if weakness is not None:
        by_weakness = sorted(range(n), key=lambda i: (-weakness[i], i))
        picked = by_weakness[:round(k * weakness_share)]
    rest = [i for i in range(n) if i not in set(picked)]
    if random_seed is not None:
        fill = random.Random(random_seed).sample(rest, k - len(picked))
    else:
        fill = sorted(rest, key=lambda i: (-uncertainty[i], i))[:k - len(picked)]
    return picked + fill


def pair_id(prompt: str, a: str, b: str) -> str:
    """A pair's id from its content: an identical pair gets the same id in any round."""
    return "fb-" + hashlib.sha256(json.dumps([prompt, a, b]).encode()).hexdigest()[:12]


class Models(BaseModel):
    """What a refused pipeline run trained: the models a round samples and scores with."""

    policy_uri: str
    reward_model_uri: str
    heldout_model_uri: str | None = None
    baseline_uri: str | None = None
    """Response b comes from this policy (the production champion the candidate was measured
    against, else the SFT model it started from), so a pair asks "candidate or baseline?";
    None: both responses from the candidate."""
    failed_checks: list[str] = []
    """The gate's failed checks (``Decision.failed``): part of the batch targets them."""


def run_select(cfg: FeedbackConfig, *, models: Models, prompts_uri: str, seed: int,
               out_dir: str) -> tuple[str, dict[str, float]]:
    """Sample two responses per candidate prompt, pick ``batch_size`` pairs, write the batch
    ``<out_dir>/batch.jsonl``; -> (batch URI, selection metrics)."""
    import torch

    from dataio import render_prompt
    from models.diagnostics import repetition_rate
    from models.loading import load_causal_lm, load_sequence_scorer, load_tokenizer
    from models.reward import RewardNorm
    from tasks.evaluate import EvaluateConfig, sample_and_score

    # Models a pipeline with an s3:// output_dir published: their cached local copies.
    models = models.model_copy(update={k: openable(v) for k, v in models if isinstance(v, str)})
    tokenizer = load_tokenizer(models.policy_uri)
    policy = load_causal_lm(models.policy_uri).eval()
    scorers = {"rm": load_sequence_scorer(models.reward_model_uri).eval()}
    if models.heldout_model_uri:
        scorers["heldout"] = load_sequence_scorer(models.heldout_model_uri).eval()
    for m in (policy, *scorers.values()):
        m.config.pad_token_id = tokenizer.pad_token_id
    raw = [r["prompt"] for r in read_records(prompts_uri)]
    order = list(range(len(raw)))
    random.Random(seed).shuffle(order)
    raw = [raw[i] for i in order[:cfg.max_candidates]]
    rendered = [render_prompt(p, tokenizer) for p in raw]
    sampling = EvaluateConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                              batch_size=cfg.sample_batch_size)
    if models.baseline_uri:
        # Candidate against baseline: what the refused policy changed is what to ask about
        # (two samples of a collapsed policy are often the same answer twice).
        baseline = load_causal_lm(models.baseline_uri).eval()
        baseline.config.pad_token_id = tokenizer.pad_token_id
        sa = sample_and_score(policy, tokenizer, rendered, sampling, seed, scorers)
        sb = sample_and_score(baseline, tokenizer, rendered, sampling, seed + 1, scorers)
        a_texts, b_texts = sa.texts, sb.texts
        score_a, score_b = sa.scores, sb.scores
        len_a, len_b = sa.length, sb.length
    else:
        # Two samples per prompt, adjacent: rows 2i and 2i+1 are pair i's responses a and b.
        s = sample_and_score(policy, tokenizer, [p for p in rendered for _ in range(2)],
                             sampling, seed, scorers)
        a_texts, b_texts = s.texts[0::2], s.texts[1::2]
        score_a = {k: v[0::2] for k, v in s.scores.items()}
        score_b = {k: v[1::2] for k, v in s.scores.items()}
        len_a, len_b = s.length[0::2], s.length[1::2]
    # Identical or empty responses are no question to ask anyone (and the batch refuses them).
    usable = [i for i in range(len(raw)) if isinstance(raw[i], str) and a_texts[i].strip()
              and b_texts[i].strip() and a_texts[i] != b_texts[i]]
    keep = torch.tensor(usable, dtype=torch.long)
    rep_a, rep_b = (torch.tensor([repetition_rate(t) for t in texts]) for texts in (a_texts,
                                                                                   b_texts))
    picked, scores, n_weak = choose_pairs(
        cfg, RewardNorm.load(models.reward_model_uri), {k: v[keep] for k, v in score_a.items()},
        {k: v[keep] for k, v in score_b.items()}, seed, failed=models.failed_checks,
        lengths=(len_a[keep], len_b[keep]), repetition=(rep_a[keep], rep_b[keep]))
    rows = []
    for j in picked:
        i = usable[j]
        rows.append({"pair_id": pair_id(raw[i], a_texts[i], b_texts[i]), "prompt": raw[i],
                     "response_a": a_texts[i], "response_b": b_texts[i]})
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    batch_uri = str(Path(out_dir) / "batch.jsonl")
    write_jsonl_atomic(batch_uri, rows)
    # The same batch as Label Studio's task JSON, for a person who imports it in its UI (the
    # label_studio labeler pushes the same tasks through the API itself).
    from labeling.label_studio import write_tasks_file

    write_tasks_file(batch_uri, seed)
    metrics = {"select/candidates": float(len(raw)), "select/usable": float(len(usable)),
               "select/pairs": float(len(rows)),
               "select/uncertainty_picked": _mean([scores[j] for j in picked]),
               "select/uncertainty_all": _mean(scores),
               "select/weakness_pairs": float(n_weak)}
    return batch_uri, metrics


def choose_pairs(cfg: FeedbackConfig, norm, score_a: dict[str, Any], score_b: dict[str, Any],
                 seed: int, failed: Sequence[str] = (), lengths: tuple | None = None,
                 repetition: tuple | None = None) -> tuple[list[int], list[float], int]:
    """Which candidate pairs to label: (``cfg.batch_size`` indices, every candidate's
    uncertainty score, how many were picked for the gate's failed checks). Apart from
    sampling so a benchmark can run it on any pool.

    ``score_a``/``score_b``: raw scores (N,) of responses a and b by ``"rm"`` (the policy's
    reward model, calibrated by ``norm``, a ``RewardNorm``) and optionally ``"heldout"``.
    ``failed``: the gate's failed checks; with ``lengths``/``repetition`` ((N,) for a, (N,)
    for b) a ``cfg.weakness_share`` of the batch targets them (``weakness_scores``), the rest
    goes by ``cfg.selection``.
    """
    import torch

    p_rm = norm.preference_prob(score_a["rm"], score_b["rm"])  # (N,)
    p_ho = None
    if "heldout" in score_a:  # the held-out model is not calibrated: T = 1
        p_ho = torch.sigmoid(score_a["heldout"] - score_b["heldout"])  # (N,)
    u_rm = [float(p) for p in p_rm]
    u_ho = [float(p) for p in p_ho] if p_ho is not None else None
    scores = uncertainty_scores(u_rm, u_ho, cfg.disagreement_weight)
    weakness = None
    if failed and lengths is not None and repetition is not None:
        fl = lambda xs: [float(x) for x in xs]  # noqa: E731
        weakness = weakness_scores(failed, u_rm, fl(lengths[0]), fl(lengths[1]),
                                   fl(repetition[0]), fl(repetition[1]), u_ho)
    picked = select_pairs(cfg.batch_size, scores, weakness, cfg.weakness_share,
                          random_seed=seed if cfg.selection == "random" else None)
    n_weak = round(min(cfg.batch_size, len(u_rm)) * cfg.weakness_share) if weakness else 0
    return picked, scores, n_weak


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else math.nan


# --- check and version -------------------------------------------------------------------

def labels_to_preferences(pairs: Sequence[dict], labels: Sequence[dict]
                          ) -> tuple[list[dict], list[dict]]:
    """Batch pairs + page labels -> (preference pairs, ``preference_labels`` rows).

    chosen = the response most annotators preferred; ``chosen_votes``/``num_votes`` the vote
    share (the reward stage's margin reads it); tied pairs are dropped with their votes.
    One vote per annotator and pair: a later label replaces an earlier one.
    """
    by_pair: dict[str, dict[str, dict]] = {}
    for label in labels:
        by_pair.setdefault(label["pair_id"], {})[label["annotator_id"]] = label
    prefs, rows = [], []
    for pair in pairs:
        votes = list(by_pair.get(pair["pair_id"], {}).values())
        a_votes = sum(v["preferred"] == "response_a" for v in votes)
        if not votes or 2 * a_votes == len(votes):
            continue
        a_wins = 2 * a_votes > len(votes)
        chosen, rejected = ((pair["response_a"], pair["response_b"]) if a_wins
                            else (pair["response_b"], pair["response_a"]))
        prefs.append({"pair_id": pair["pair_id"], "prompt": pair["prompt"], "chosen": chosen,
                      "rejected": rejected,
                      "chosen_votes": a_votes if a_wins else len(votes) - a_votes,
                      "num_votes": len(votes)})
        for v in votes:
            picked_a = v["preferred"] == "response_a"
            rows.append({"pair_id": pair["pair_id"], "annotator_id": v["annotator_id"],
                         "preferred": "chosen" if picked_a == a_wins else "rejected",
                         # chosen was on the left iff (a on the left) == (a is chosen)
                         "chosen_shown_first": bool(v["a_shown_first"]) == a_wins})
    return prefs, rows


class Version(BaseModel):
    """A dataset version: where it is and the sha256 of its bytes."""

    uri: str
    sha256: str
    rows: int
    new_rows: int


def write_version(old_uri: str | None, new_rows: list[dict], out_dir: str, name: str,
                  skip_ids: set[str] | None = None) -> Version:
    """``<out_dir>/<name>-<sha12>.jsonl`` = the old file's rows, then ``new_rows`` (those whose
    pair_id is in ``skip_ids`` left out). Content-addressed: the same content gets the same
    name and is not rewritten; the old file is only read."""
    head = b""
    old_rows = 0
    if old_uri:
        path = local_path(old_uri)
        if path.is_file() and path.suffix == ".jsonl":  # keep the old rows byte for byte
            head = path.read_bytes()
            if head and not head.endswith(b"\n"):
                head += b"\n"
            old_rows = sum(1 for line in head.splitlines() if line.strip())
        else:
            records = read_records(old_uri)
            head, old_rows = jsonl_bytes(records), len(records)
    rows = [r for r in new_rows if r.get("pair_id") not in (skip_ids or set())]
    blob = head + jsonl_bytes(rows)
    sha = hashlib.sha256(blob).hexdigest()
    # A string join, not Path: ``out_dir`` may be ``s3://bucket/...`` (Path would drop a slash).
    uri = f"{out_dir.rstrip('/')}/{name}-{sha[:12]}.jsonl"
    if not local_path(uri).exists():
        write_jsonl_atomic(uri, rows, head=head)
    return Version(uri=uri, sha256=sha, rows=old_rows + len(rows), new_rows=len(rows))


class CheckedLabels(BaseModel):
    """A round's labels, checked and versioned."""

    pairs_uri: str
    """The round's own new pairs (majority vote)."""
    labels_uri: str
    """The round's own votes as ``preference_labels`` rows."""
    preferences: Version
    preference_labels: Version
    metrics: dict[str, float]
    """The validation stage's metrics on the round's pairs and labels (``agreement/...``)."""
    flagged: list[str]
    """Annotators the agreement checks flagged."""
    validation_run_id: str


def run_check_and_version(*, batch_uri: str, labels_uri: str, preferences_uri: str,
                          preference_labels_uri: str | None, validation, tokenizer_path: str,
                          chat_template: str | None, round_dir: str, data_dir: str,
                          ctx: TrackingContext) -> CheckedLabels:
    """Labels -> pairs; validate them (a child run of the round's run); write the new versions
    of ``preferences`` and ``preference_labels``; log them as the round run's inputs."""
    from tasks.validation import run_validation

    batch = read_records(batch_uri)
    labels = read_records(labels_uri)
    prefs, votes = labels_to_preferences(batch, labels)
    pairs_uri, votes_uri = (str(Path(round_dir) / f) for f in ("pairs.jsonl", "labels.jsonl"))
    write_jsonl_atomic(pairs_uri, prefs)
    write_jsonl_atomic(votes_uri, votes)
    # A round's batch is as small as the config says: the row minimums are for training sets
    # (the next pipeline run validates the whole new version against them).
    small = dict(validation.min_rows_by_dataset, preferences=1, preference_labels=1)
    checked = run_validation(validation.model_copy(update={"min_rows_by_dataset": small}),
                             data={"preferences": pairs_uri, "preference_labels": votes_uri},
                             tokenizer_path=tokenizer_path, chat_template=chat_template,
                             out_dir=round_dir, ctx=ctx)
    flagged = sorted(k.split("/")[1] for k, v in checked.metrics.items()
                     if k.startswith("agreement/") and k.endswith("/flagged") and v)
    old_ids = {r.get("pair_id") for r in read_records(preferences_uri)}
    new_ids = {p["pair_id"] for p in prefs} - old_ids
    pref_v = write_version(preferences_uri, prefs, data_dir, "preferences", skip_ids=old_ids)
    label_v = write_version(preference_labels_uri, [v for v in votes if v["pair_id"] in new_ids],
                            data_dir, "preference_labels")
    log_version(ctx, "preferences", pref_v)
    log_version(ctx, "preference_labels", label_v)
    return CheckedLabels(pairs_uri=pairs_uri, labels_uri=votes_uri, preferences=pref_v,
                         preference_labels=label_v, metrics=checked.metrics, flagged=flagged,
                         validation_run_id=checked.run_id)


def log_version(ctx: TrackingContext, name: str, version: Version) -> None:
    """The version as a dataset input of the round's run (``ctx.parent_run_id``)."""
    import pandas as pd
    from mlflow import MlflowClient

    from tasks.tracking import log_dataset_input

    log_dataset_input(ctx.tracking_uri, ctx.parent_run_id, name,
                      pd.DataFrame(read_records(version.uri)), version.uri, version.sha256)
    client = MlflowClient(ctx.tracking_uri)
    client.set_tag(ctx.parent_run_id, f"data.{name}.sha256", version.sha256)
    client.set_tag(ctx.parent_run_id, f"data.{name}.uri", version.uri)


def label_batch(labeler: Any, batch_uri: str) -> str:
    return labeler.label(batch_uri)


select_task = task(name="feedback-select")(run_select)
label_task = task(name="feedback-label")(label_batch)
# Labels refused by validation come back as the task's value, for `accepted` (tasks/refusal.py).
check_task = task(name="feedback-check-and-version")(refusals_returned(run_check_and_version))
