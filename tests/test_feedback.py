"""Feedback rounds: selection by hand values, simulated annotators, labels -> pairs, dataset
versions, and one round end to end on the tiny demo pipeline."""

from __future__ import annotations

import json

import pytest

from tasks.feedback import (labels_to_preferences, select_pairs, uncertainty_scores,
                            weakness_scores, write_version)
from tasks.labelers import missing_votes


def test_uncertainty_scores_and_selection_by_hand():
    # 1 - |2p - 1|: p=0.5 -> 1, p=0.9 -> 0.2, p=0.1 -> 0.2, p=0.6 -> 0.8, p=1 -> 0
    assert uncertainty_scores([0.5, 0.9, 0.1, 0.6, 1.0]) == pytest.approx([1.0, 0.2, 0.2, 0.8, 0.0])
    def most_uncertain(p_rm, k, p_ho=None, w=1.0):
        return select_pairs(k, uncertainty_scores(p_rm, p_ho, w), None, 0.0)

    assert most_uncertain([0.5, 0.9, 0.1, 0.6, 1.0], k=3) == [0, 3, 1]  # tie 1/2: lower index
    # Disagreement: pair 1 is sure (0.9) but the held-out model says 0.2: 0.2 + 0.7 = 0.9.
    p_ho = [0.5, 0.2, 0.1, 0.6, 1.0]
    assert uncertainty_scores([0.5, 0.9, 0.1, 0.6, 1.0], p_ho) == pytest.approx(
        [1.0, 0.9, 0.2, 0.8, 0.0])
    assert most_uncertain([0.5, 0.9, 0.1, 0.6, 1.0], 2, p_ho) == [0, 1]
    assert most_uncertain([0.5, 0.9, 0.1, 0.6, 1.0], 2, p_ho, w=0.0) == [0, 3]
    assert most_uncertain([0.7], k=5) == [0]
    r = select_pairs(4, [0.0] * 10, None, 0.0, random_seed=3)  # the random baseline
    assert r == select_pairs(4, [0.0] * 10, None, 0.0, random_seed=3)
    assert len(set(r)) == 4 and max(r) < 10


def test_weakness_scores_by_hand():
    p_rm = [0.9, 0.2, 0.5]  # P(candidate a beats baseline b) by the optimised reward model
    len_a, len_b = [20.0, 10.0, 10.0], [10.0, 20.0, 10.0]
    rep_a, rep_b = [0.3, 0.0, 0.0], [0.0, 0.0, 0.1]
    # Length: P(longer wins) * gap/max. Pair 0: a longer, 0.9 * 10/20 = 0.45; pair 1: b longer,
    # (1 - 0.2) * 10/20 = 0.4; pair 2: equal lengths, 0.
    assert weakness_scores(["length"], p_rm, len_a, len_b, rep_a, rep_b) == pytest.approx(
        [0.45, 0.4, 0.0])
    # Repetition: P(more repetitive wins) * |rep gap|: 0.9 * 0.3, (1 - 0.2) * 0 (a "wins" ties
    # with 1 - p), (1 - 0.5) * 0.1.
    assert weakness_scores(["repetition"], p_rm, len_a, len_b, rep_a, rep_b) == pytest.approx(
        [0.27, 0.0, 0.05])
    # Over-optimisation: |p_rm - p_heldout|; a low win rate: p_rm; failed checks add up.
    p_ho = [0.1, 0.2, 0.9]
    assert weakness_scores(["overoptimisation", "win_rate"], p_rm, len_a, len_b, rep_a, rep_b,
                           p_ho) == pytest.approx([0.8 + 0.9, 0.0 + 0.2, 0.4 + 0.5])
    # KL or perplexity failures are not something a label can answer.
    assert weakness_scores(["kl", "perplexity_sft"], p_rm, len_a, len_b, rep_a, rep_b) is None


def test_select_pairs_mixes_weakness_and_uncertainty():
    unc, weak = [0.9, 0.1, 0.8, 0.7, 0.2], [0.0, 1.0, 0.0, 0.5, 0.9]
    # Half of 4 by weakness (1, 4), then by uncertainty among the rest (0, 2); no pair twice.
    assert select_pairs(4, unc, weak, 0.5) == [1, 4, 0, 2]
    assert select_pairs(4, unc, None, 0.5) == [0, 2, 3, 4]  # no targeted failure: uncertainty
    assert select_pairs(2, unc, weak, 1.0) == [1, 4]
    assert select_pairs(9, unc, weak, 0.5) == [1, 4, 0, 2, 3]  # k > n: every pair once
    r = select_pairs(4, unc, weak, 0.5, random_seed=7)
    assert r[:2] == [1, 4] and set(r[2:]) <= {0, 2, 3}
    assert r == select_pairs(4, unc, weak, 0.5, random_seed=7) and len(set(r)) == 4


@pytest.mark.parametrize("selection, baseline, failed", [
    ("uncertainty", None, []), ("random", None, []), ("uncertainty", "demo/base_model", []),
    ("uncertainty", "demo/base_model", ["length", "kl"])])
def test_select_writes_a_labeling_batch(tiny_reward_dir, tmp_path, selection, baseline, failed):
    from labeling.batch import read_batch
    from tasks.feedback import FeedbackConfig, Models, run_select

    cfg = FeedbackConfig(selection=selection, batch_size=4, max_candidates=12, max_new_tokens=8)
    models = Models(policy_uri="demo/base_model", reward_model_uri=tiny_reward_dir,
                    heldout_model_uri=tiny_reward_dir, baseline_uri=baseline,
                    failed_checks=failed)
    uri, metrics = run_select(cfg, models=models, prompts_uri="demo/data/rl_prompts.jsonl",
                              seed=0, out_dir=str(tmp_path / "round"))
    pairs = read_batch(uri)  # the labeling page's own reader accepts it
    assert uri == str(tmp_path / "round" / "batch.jsonl") and len(pairs) == 4
    # ... and the same batch as Label Studio's task JSON, for an import by hand
    from labeling.label_studio import tasks_for
    assert json.load(open(tmp_path / "round" / "batch.label-studio.json")) == tasks_for(pairs, 0)
    assert all(p.response_a != p.response_b for p in pairs)
    assert metrics["select/candidates"] == 12 and metrics["select/pairs"] == 4
    assert metrics["select/weakness_pairs"] == (2 if "length" in failed else 0)
    if selection == "uncertainty" and not failed:  # then every pick is by uncertainty,
        # so the picked pairs are the most uncertain ones (with failed checks half the
        # batch is picked by weakness instead: test_select_pairs_mixes_weakness_and_uncertainty
        # covers that mix)
        assert metrics["select/uncertainty_picked"] >= metrics["select/uncertainty_all"]
    again, _ = run_select(cfg, models=models, prompts_uri="demo/data/rl_prompts.jsonl", seed=0,
                          out_dir=str(tmp_path / "again"))
    assert open(again).read() == open(uri).read()  # seeded


def _batch(tmp_path, n=60):
    from tasks.feedback import write_jsonl_atomic

    good = [" a wonderful, lovely film.", " truly great and moving.", " beautiful acting."]
    bad = [" awful and boring.", " a terrible, ugly mess.", " dull. i hated it."]
    rows = [{"pair_id": f"q{i}", "prompt": "The movie was",
             "response_a": good[i % 3] if i % 2 else bad[i % 3],
             "response_b": bad[i % 3] if i % 2 else good[i % 3]} for i in range(n)]
    uri = str(tmp_path / "batch.jsonl")
    write_jsonl_atomic(uri, rows)
    return uri, rows


def test_simulated_labeler_careful_agree_careless_does_not(tmp_path):
    from demo.judge import sentiment_judge
    from tasks.labelers import SimulatedLabeler

    uri, rows = _batch(tmp_path, 200)
    labeler = SimulatedLabeler("demo.judge:sentiment_judge", votes_per_pair=5, seed=0)
    labels_uri = labeler.label(uri)
    labels = [json.loads(line) for line in open(labels_uri)]
    assert len(labels) == 5 * len(rows)  # every annotator votes once on every pair
    gold = {}
    for r in rows:
        ga, gb = sentiment_judge([r["response_a"], r["response_b"]])
        gold[r["pair_id"]] = "response_a" if ga > gb else "response_b"
    agree = {}
    for lab in labels:
        agree.setdefault(lab["annotator_id"], []).append(lab["preferred"] == gold[lab["pair_id"]])
    rate = {a: sum(v) / len(v) for a, v in agree.items()}
    assert set(rate) == {"a0", "a1", "a2", "a3", "a4"}
    assert all(rate[a] > 0.9 for a in ("a0", "a1", "a2", "a3")), rate
    assert rate["a4"] < 0.75, rate
    assert SimulatedLabeler("demo.judge:sentiment_judge", 5, 0).label(uri) == labels_uri
    assert [json.loads(line)["preferred"] for line in open(labels_uri)] == \
        [lab["preferred"] for lab in labels]  # seeded


def test_page_labeler_completeness_check():
    labels = [{"pair_id": "p1", "annotator_id": "x", "preferred": "response_a"},
              {"pair_id": "p1", "annotator_id": "x", "preferred": "response_b"},  # same person
              {"pair_id": "p1", "annotator_id": "y", "preferred": "response_b"},
              {"pair_id": "p2", "annotator_id": "x", "preferred": "response_a"},
              {"pair_id": "p9", "annotator_id": "z", "preferred": "response_a"}]  # not in batch
    assert missing_votes(["p1", "p2", "p3"], labels, 2) == {"p2": 1, "p3": 2}
    assert missing_votes(["p1", "p2"], labels, 1) == {}


def test_page_labeler_times_out_then_finds_labels(tmp_path):
    from dataio import write_jsonl_atomic
    from tasks.labelers import PageLabeler

    uri, rows = _batch(tmp_path, 2)
    page = PageLabeler(votes_per_pair=1, poll_seconds=0.01, timeout_seconds=0.05)
    with pytest.raises(TimeoutError, match="2 votes still missing on 2 pairs"):
        page.label(uri)
    labels = [{"pair_id": r["pair_id"], "annotator_id": "alice", "preferred": "response_a",
               "a_shown_first": True, "labeled_at": "2026-11-26T00:00:00+00:00"} for r in rows]
    write_jsonl_atomic(str(tmp_path / "batch.labels.jsonl"), labels)
    assert page.label(uri) == str(tmp_path / "batch.labels.jsonl")


def test_labels_to_preferences_by_hand():
    pairs = [{"pair_id": "p1", "prompt": "P", "response_a": "A1", "response_b": "B1"},
             {"pair_id": "p2", "prompt": "Q", "response_a": "A2", "response_b": "B2"},
             {"pair_id": "p3", "prompt": "R", "response_a": "A3", "response_b": "B3"}]
    labels = [
        # p1: 2 of 3 prefer b -> chosen B1, chosen_votes 2
        {"pair_id": "p1", "annotator_id": "x", "preferred": "response_b", "a_shown_first": True},
        {"pair_id": "p1", "annotator_id": "y", "preferred": "response_a", "a_shown_first": True},
        {"pair_id": "p1", "annotator_id": "z", "preferred": "response_b", "a_shown_first": False},
        # p2: one vote for a
        {"pair_id": "p2", "annotator_id": "x", "preferred": "response_a", "a_shown_first": False},
        # p3: a tie, dropped
        {"pair_id": "p3", "annotator_id": "x", "preferred": "response_a", "a_shown_first": True},
        {"pair_id": "p3", "annotator_id": "y", "preferred": "response_b", "a_shown_first": True},
    ]
    prefs, rows = labels_to_preferences(pairs, labels)
    assert prefs == [
        {"pair_id": "p1", "prompt": "P", "chosen": "B1", "rejected": "A1", "chosen_votes": 2,
         "num_votes": 3},
        {"pair_id": "p2", "prompt": "Q", "chosen": "A2", "rejected": "B2", "chosen_votes": 1,
         "num_votes": 1}]
    assert rows == [
        {"pair_id": "p1", "annotator_id": "x", "preferred": "chosen", "chosen_shown_first": False},
        {"pair_id": "p1", "annotator_id": "y", "preferred": "rejected",
         "chosen_shown_first": False},
        {"pair_id": "p1", "annotator_id": "z", "preferred": "chosen", "chosen_shown_first": True},
        {"pair_id": "p2", "annotator_id": "x", "preferred": "chosen", "chosen_shown_first": False}]


def test_versions_are_content_addressed_and_never_overwrite(tmp_path):
    old = tmp_path / "preferences.jsonl"
    old.write_bytes(b'{"pair_id": "p0", "prompt": "P", "chosen": "a", "rejected": "b"}\n')
    before = old.read_bytes()
    new = [{"pair_id": "n1", "prompt": "Q", "chosen": "c", "rejected": "d"},
           {"pair_id": "p0", "prompt": "P", "chosen": "a", "rejected": "b"}]  # already there
    out = tmp_path / "data"
    v1 = write_version(str(old), new, str(out), "preferences", skip_ids={"p0"})
    assert v1.uri == str(out / f"preferences-{v1.sha256[:12]}.jsonl")
    assert (v1.rows, v1.new_rows) == (2, 1)
    lines = open(v1.uri, "rb").read().splitlines(keepends=True)
    assert lines[0] == before and json.loads(lines[1])["pair_id"] == "n1"
    mtime = (out / v1.uri.split("/")[-1]).stat().st_mtime_ns
    v2 = write_version(str(old), new, str(out), "preferences", skip_ids={"p0"})  # same round
    assert v2 == v1 and (out / v1.uri.split("/")[-1]).stat().st_mtime_ns == mtime
    v3 = write_version(v1.uri, [{"pair_id": "n2", "prompt": "R", "chosen": "e",
                                 "rejected": "f"}], str(out), "preferences")
    assert v3.uri != v1.uri and v3.rows == 3
    assert old.read_bytes() == before  # the old version, byte for byte
    assert open(v1.uri, "rb").read() == b"".join(lines)
    assert len(list(out.iterdir())) == 2


# Thresholds any trained policy passes, except the win rate: the first run is refused.
REFUSE = ["gate.min_win_rate=1.01", "gate.min_win_rate_lower=0.0", "gate.max_kl=1e9",
          "gate.min_gold_gain=-100", "gate.max_longer_preferred=1.0",
          "gate.max_repetition_increase=1.0", "gate.max_perplexity_increase=1e9",
          "gate.max_perplexity_increase_vs_sft=1e9", "gate.max_reward_divergence=1.0",
          "feedback.batch_size=40", "feedback.max_candidates=64", "feedback.max_new_tokens=12",
          "feedback.votes_per_pair=5", "feedback.sample_batch_size=64"]


def test_feedback_round_end_to_end(prefect_harness, tiny_overrides, tmp_path):
    from mlflow import MlflowClient

    from flows.config import load_config
    from flows.feedback import feedback_rounds

    cfg = load_config("configs/demo.yaml", tiny_overrides + REFUSE)
    old_bytes = open(cfg.data.preferences, "rb").read()
    final, rounds = feedback_rounds(cfg, rounds=1)
    assert len(rounds) == 1 and final.result == "feedback_round_needed"
    r = rounds[0]
    first_run = r.triggered_by
    v = r.checked.preferences
    assert v.uri.startswith(f"{tmp_path}/runs/demo/data/preferences-{v.sha256[:12]}")
    assert 0 < v.new_rows <= 40 and v.rows == 3000 + v.new_rows
    assert open(v.uri, "rb").read().startswith(old_bytes)
    assert open(cfg.data.preferences, "rb").read() == old_bytes
    assert r.config.data.preferences == v.uri
    assert r.config.data.preference_labels == r.checked.preference_labels.uri

    client = MlflowClient(final.tracking_uri)
    rr = client.get_run(r.round_run_id)
    assert rr.info.status == "FINISHED"
    assert rr.data.tags["rlhf.triggered_by"] == first_run
    assert rr.data.tags["rlhf.next_pipeline_run"] == final.parent_run_id
    assert rr.data.tags["rlhf.dataset_version"] == v.sha256[:12]
    assert rr.data.tags["data.preferences.sha256"] == v.sha256
    assert rr.data.tags["rlhf.result"] == "feedback_round_needed"
    assert rr.data.tags["rlhf.batch_uri"] == r.batch_uri
    assert "agreement/alpha" in rr.data.metrics and "rlhf.agreement_alpha" in rr.data.tags
    # REFUSE fails the win rate: half the batch targets it (pairs the reward model is sure of).
    assert rr.data.metrics["select/weakness_pairs"] == 20
    # The careless annotator (a4, T = 3) is flagged and has the lowest agreement, and the
    # round's tag lists exactly what the checks flagged. Whether a careful one is flagged too
    # is sampling noise on 40 pairs (a3, T = 0.3, agreed on 73 % of 37 votes against the
    # others' ~91 % once); tests/test_data_checks.py pins the rule on the demo's 3,000 pairs.
    rates = {k.split("/")[1]: v for k, v in r.checked.metrics.items()
             if k.startswith("agreement/") and k.endswith("/agreement_with_majority")}
    assert "a4" in r.checked.flagged and min(rates, key=rates.get) == "a4", rates
    assert rr.data.tags["rlhf.flagged_annotators"] == ",".join(r.checked.flagged)
    inputs = {d.dataset.name for d in rr.inputs.dataset_inputs}
    assert f"preferences@{v.sha256[:12]}" in inputs
    assert client.get_experiment(rr.info.experiment_id).name == cfg.tracking.experiment
    second = client.get_run(final.parent_run_id)
    assert second.data.tags["rlhf.feedback_round"] == r.round_run_id
    assert second.data.tags["data.preferences.sha256"] == v.sha256
    assert final.parent_run_id != first_run
    children = client.search_runs(
        [rr.info.experiment_id], f"tags.mlflow.parentRunId = '{r.round_run_id}'")
    assert [c.info.run_name for c in children] == ["validation"]


def test_cli_feedback_runs_rounds_and_prints_each(monkeypatch, capsys):
    """The subcommand is thin: it hands config and --rounds to feedback_rounds and prints."""
    from types import SimpleNamespace as NS

    import flows.feedback
    from flows.cli import main

    seen = {}
    version = NS(new_rows=7, uri="runs/demo/data/preferences-abc.jsonl", rows=3007)
    pipeline = NS(parent_run_id="run2", result="promoted")
    final = NS(result="promoted", parent_run_id="run2", decision=NS(reasons=["ok"]))

    def fake(cfg, rounds=None, first=None):
        seen.update(rounds=rounds, batch=cfg.feedback.batch_size)
        return final, [NS(checked=NS(preferences=version, flagged=["a4"]), pipeline=pipeline,
                          round_run_id="round1")]

    monkeypatch.setattr(flows.feedback, "feedback_rounds", fake)
    assert main(["feedback", "--rounds", "2", "--set", "feedback.batch_size=8"]) == 0
    assert seen == {"rounds": 2, "batch": 8}
    out = capsys.readouterr().out
    assert ("round 1: 7 new pairs -> runs/demo/data/preferences-abc.jsonl (3007 pairs); "
            "flagged annotators: a4; pipeline run run2: promoted") in out
    assert json.loads(out[out.index("{"):])["round_run_ids"] == ["round1"]


@pytest.mark.parametrize("on_refusal, max_rounds, starts", [
    ("round", 3, True), ("stop", 3, False), ("round", 0, False)])
def test_cli_run_starts_rounds_when_the_gate_refuses(monkeypatch, capsys, on_refusal, max_rounds,
                                                     starts):
    """``rlhf run``: a refusal hands the refused result to feedback_rounds (``first``), unless
    ``feedback.on_refusal=stop`` or no rounds are allowed."""
    from types import SimpleNamespace as NS

    import flows.feedback
    import flows.pipeline
    from flows.cli import main

    refused = NS(result="feedback_round_needed", parent_run_id="run1", tracking_uri="sqlite://",
                 decision=NS(reasons=["FAIL: length"], failed=["length"]), metrics={},
                 candidate=None, registration=None, reused={})
    seen = {}

    def rounds(cfg, rounds=None, first=None):
        seen.update(first=first, rounds=rounds)
        return NS(result="promoted", parent_run_id="run2", decision=NS(reasons=[])), []

    monkeypatch.setattr(flows.pipeline, "rlhf_pipeline", lambda cfg: refused)
    monkeypatch.setattr(flows.feedback, "feedback_rounds", rounds)
    assert main(["run", "--set", f"feedback.on_refusal={on_refusal}",
                 "--set", f"feedback.max_rounds={max_rounds}"]) == 0
    out = capsys.readouterr().out
    assert (seen == {"first": refused, "rounds": None}) == starts
    assert ("starting up to 3 feedback rounds" in out) == starts
    assert ("gate refused promotion (failed: length)" in out) == starts
