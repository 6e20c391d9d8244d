"""The validation stage on the demo data, agreement against hand-computed values, quarantine, MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from data_checks.agreement import alpha_from_votes, annotator_agreement, majority_agreement
from data_checks.report import RULES
from dataio import content_hash
from tasks.base import TrackingContext
from tasks.validation import DataValidationError, ValidationConfig, run_validation
from test_bad_inputs import CHAT_TEMPLATE, N, TOKENIZER, base_rows, write_base

ROOT = Path(__file__).resolve().parents[1]
DEMO = {n: str(ROOT / "demo" / "data" / f"{n}.jsonl") for n in
        ("sft", "preferences", "preference_labels", "rl_prompts", "eval_prompts", "eval_pairs")}


def votes(rows):
    return pd.DataFrame(rows, columns=["pair_id", "annotator_id", "vote"])


# --- agreement, against values computed on paper ---------------------------------------------

def test_alpha_hand_computed():
    # Two coders, four units: (1,1) (0,0) (1,0) (1,1). Coincidences: o11=4, o00=2, o01=o10=1,
    # n1=5, n0=3, n=8. alpha = 1 - (n-1) * (o01+o10) / (2 * n0 * n1) = 1 - 7*2/30 = 8/15.
    v = votes([("u1", "A", 1), ("u1", "B", 1), ("u2", "A", 0), ("u2", "B", 0),
               ("u3", "A", 1), ("u3", "B", 0), ("u4", "A", 1), ("u4", "B", 1)])
    assert alpha_from_votes(v) == pytest.approx(8 / 15)


def test_alpha_perfect_and_unpairable():
    assert alpha_from_votes(votes([("u1", "A", 1), ("u1", "B", 1), ("u2", "A", 0),
                                   ("u2", "B", 0)])) == pytest.approx(1.0)
    assert pd.isna(alpha_from_votes(votes([("u1", "A", 1), ("u2", "A", 0)])))


def test_majority_agreement_hand_computed():
    # A, B, C agree on u1-u3 and D always votes against them; on u4 they split.
    v = votes([(u, a, x if a != "D" else 1 - x) for u, x in (("u1", 1), ("u2", 0), ("u3", 1))
               for a in "ABCD"] + [("u4", "A", 1), ("u4", "B", 1), ("u4", "C", 0), ("u4", "D", 0)])
    per = majority_agreement(v)
    # u1-u3: the others of A (B, C, D) are 2:1 for A's value; D's others are 3:0 against D.
    # u4: A's others (1, 0, 0) -> 0, A says 1; C's others (1, 1, 0) -> 1, C says 0; all disagree.
    assert per["agreement_with_majority"].to_dict() == pytest.approx(
        {"A": 3 / 4, "B": 3 / 4, "C": 3 / 4, "D": 0 / 4})
    stats = annotator_agreement(v, min_agreement=0.5, max_gap=0.3, min_votes=1)
    assert [a.annotator for a in stats.flagged()] == ["D"]
    # Without D: o11 = 3 + 3 + 1, o00 = 3, o01 = o10 = 1 (u4: m=3, pairs weighted 1/(m-1));
    # n1 = 8, n0 = 4, n = 12; alpha = 1 - (n-1)(o01+o10) / (2 n0 n1) = 1 - 22/64.
    by = {a.annotator: a for a in stats.annotators}
    assert by["D"].alpha_without == pytest.approx(1 - 22 / 64)


# --- the stage on real files ------------------------------------------------------------------

def test_demo_data_passes_and_flags_a4(tmp_path):
    before = {n: content_hash(u) for n, u in DEMO.items()}
    result = run_validation(ValidationConfig(), data=DEMO, tokenizer_path=TOKENIZER,
                               out_dir=str(tmp_path), ctx=None)
    assert result.passed
    assert result.hashes == before == {n: content_hash(u) for n, u in DEMO.items()}
    report = json.loads((tmp_path / "validation" / "report.json").read_text())
    flagged = [a["annotator"] for a in report["agreement"]["annotators"] if a["flagged"]]
    assert flagged == ["a4"]
    warnings = [f for f in report["failures"] if f["severity"] == "warning"]
    assert [w["rule"] for w in warnings] == ["annotator_quality"] and "'a4'" in warnings[0]["message"]
    assert 0.3 < result.metrics["agreement/alpha"] < 0.5
    assert "a4" in (tmp_path / "validation" / "report.html").read_text()
    # Same data, a4 made an error by config: refused, naming the rule.
    with pytest.raises(DataValidationError, match="rule annotator_quality: annotator 'a4'"):
        run_validation(ValidationConfig(flagged_annotator_is_error=True),
                          data={n: DEMO[n] for n in ("preferences", "preference_labels")},
                          tokenizer_path=TOKENIZER, out_dir=str(tmp_path), ctx=None)


def test_message_format_names_file_row_rule(tmp_path):
    rows = base_rows()
    for i in (2, 4, 6, 8, 10, 12, 14):
        rows["preferences"][i]["rejected"] = rows["preferences"][i]["chosen"]
    rows["preferences"][16]["rejected"] = rows["preferences"][16]["chosen"]
    data = write_base(tmp_path, {"preferences": rows["preferences"]})
    with pytest.raises(DataValidationError) as exc:
        run_validation(ValidationConfig(), data=data, tokenizer_path=TOKENIZER,
                          out_dir=str(tmp_path / "out"), ctx=None)
    assert (f"{data['preferences']}: 8 rows (first 5: 3, 5, 7, 9, 11): rule "
            f"chosen_differs_from_rejected: chosen and rejected are identical") in str(exc.value)
    assert "report: " in str(exc.value)


def test_conversational_format_passes(tmp_path):
    rows = base_rows()
    sft = [{"messages": [{"role": "user", "content": r["prompt"]},
                         {"role": "assistant", "content": r["completion"]}]} for r in rows["sft"]]
    prefs = [{"prompt": [{"role": "user", "content": r["prompt"]}],
              "chosen": [{"role": "assistant", "content": r["chosen"]}],
              "rejected": [{"role": "assistant", "content": r["rejected"]}]}
             for r in rows["preferences"]]
    data = write_base(tmp_path, {"sft": sft, "preferences": prefs})
    result = run_validation(ValidationConfig(), data=data, tokenizer_path=TOKENIZER,
                            chat_template=CHAT_TEMPLATE, out_dir=str(tmp_path / "out"), ctx=None)
    assert result.passed


def hh_pairs(rows: list[dict], conversational: bool) -> list[dict]:
    """Pairs in Anthropic HH's shape: no prompt column, the prompt is chosen's and rejected's
    shared start (TRL's implicit prompt), standard text or conversational."""
    def side(prompt, answer):
        answer = answer.replace(" answer", "", 1)  # " A3 is fine.": the answers differ at once
        if conversational:
            return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        return f"\n\nHuman: {prompt}\n\nAssistant:{answer}"

    return [{**{k: v for k, v in r.items() if k != "prompt"},
             "chosen": side(r["prompt"], r["chosen"]),
             "rejected": side(r["prompt"], r["rejected"])} for r in rows]


@pytest.mark.parametrize("conversational", [False, True], ids=["standard", "conversational"])
def test_implicit_prompt_pairs_pass_and_stages_get_the_split(tmp_path, conversational):
    from dataio import preference_rows, read_records

    rows = base_rows()
    data = write_base(tmp_path, {
        "preferences": hh_pairs(rows["preferences"], conversational),
        "eval_pairs": hh_pairs(rows["eval_pairs"], conversational),
        "preference_labels": rows["preference_labels"], "rl_prompts": rows["rl_prompts"]})
    result = run_validation(ValidationConfig(), data=data, tokenizer_path=TOKENIZER,
                            chat_template=CHAT_TEMPLATE if conversational else None,
                            out_dir=str(tmp_path / "out"), ctx=None)
    assert result.passed and result.metrics["data/preferences/bad_rows"] == 0
    assert "agreement/alpha" in result.metrics  # labels joined to the HH pairs by pair_id
    for name in ("preferences", "eval_pairs"):  # what the reward and DPO stages train on
        split = preference_rows(read_records(result.data[name]), result.data[name],
                                with_margin=True)
        assert len(split) == N and all(r["margin"] == 1.0 for r in split)
        # Row 0 of the base pairs chose " answer Z0 is ok."; hh_pairs dropped " answer".
        prompt, chosen = rows[name][0]["prompt"], " Z0 is ok."
        if conversational:
            assert split[0]["prompt"] == [{"role": "user", "content": prompt}]
            assert split[0]["chosen"] == [{"role": "assistant", "content": chosen}]
        else:
            assert split[0]["prompt"] == f"\n\nHuman: {prompt}\n\nAssistant:"
            assert split[0]["chosen"] == chosen


def test_implicit_prompt_is_checked_like_an_explicit_one(tmp_path):
    rows = base_rows()
    prefs = hh_pairs(rows["preferences"], conversational=False)
    prefs[4]["rejected"] = "Completely different"  # no shared start: empty implicit prompt
    evals = hh_pairs(rows["eval_pairs"], conversational=False)
    evals[2]["chosen"] = evals[2]["chosen"].replace("Describe held out show 2",
                                                    "Tell me about movie number 7")
    evals[2]["rejected"] = evals[2]["rejected"].replace("Describe held out show 2",
                                                        "Tell me about movie number 7")
    data = write_base(tmp_path, {"preferences": prefs, "eval_pairs": evals,
                                 "rl_prompts": rows["rl_prompts"]})
    with pytest.raises(DataValidationError) as exc:
        run_validation(ValidationConfig(), data=data, tokenizer_path=TOKENIZER,
                       out_dir=str(tmp_path / "out"), ctx=None)
    msg = str(exc.value)
    assert (f"{data['preferences']}: row 5: rule non_empty_text: implicit prompt (the shared "
            f"start of chosen and rejected) is empty") in msg
    # The HH-shaped prompt is not the training prompt's text, so leakage compares HH with HH:
    # the derived eval prompt matches the derived training prompt of preferences row 8.
    assert f"{data['eval_pairs']}: row 3: rule prompt_leakage:" in msg
    assert "column 'prompt' is missing" not in msg


def test_quarantine_within_share_sets_rows_aside(tmp_path):
    rows = base_rows()
    rows["sft"][3]["completion"] = ""
    data = write_base(tmp_path, {"sft": rows["sft"]})
    raw = Path(data["sft"]).read_bytes()
    cfg = ValidationConfig(quarantine=True, max_bad_row_fraction=0.05)
    result = run_validation(cfg, data=data, tokenizer_path=TOKENIZER,
                               out_dir=str(tmp_path / "out"), ctx=None)
    assert Path(data["sft"]).read_bytes() == raw  # the input is never modified
    q = tmp_path / "out" / "validation" / "quarantine" / "sft.jsonl"
    clean = Path(result.data["sft"])
    assert q.read_bytes() == raw.splitlines(keepends=True)[3]
    assert len(clean.read_bytes().splitlines()) == len(rows["sft"]) - 1
    reasons = (q.parent / "sft.reasons.jsonl").read_text()
    assert json.loads(reasons) == {"row": 4, "rules": ["non_empty_text"]}


def test_no_tokenizer_skips_token_limits(tmp_path):
    rows = base_rows()
    rows["sft"][0]["completion"] = " word" * 5000
    data = write_base(tmp_path, {"sft": rows["sft"]})
    result = run_validation(ValidationConfig(), data=data, tokenizer_path=None,
                               out_dir=str(tmp_path / "out"), ctx=None)
    assert result.passed


def test_rule_names_are_documented():
    import test_bad_inputs
    import test_bad_inputs_every_role as every

    assert {case[3] for case in test_bad_inputs.DEFECTS} <= set(RULES)
    assert {d.rule for d in every.ROW_DEFECTS} | {d[3] for d in every.FILE_DEFECTS} \
        | {"file_exists", "file_format", "utf8"} <= set(RULES)


def test_mlflow_child_run_has_hashes_metrics_and_report(tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    rows = base_rows()  # two files keep it quick; the other suites are the same code path
    data = write_base(tmp_path, {n: rows[n] for n in ("preferences", "preference_labels")})
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("validate-test", artifact_location=str(tmp_path / "artifacts"))
    parent = client.create_run(exp, run_name="pipeline")
    ctx = TrackingContext(tracking_uri=uri, experiment_id=exp, parent_run_id=parent.info.run_id)
    try:
        result = run_validation(ValidationConfig(), data=data, tokenizer_path=TOKENIZER,
                                   out_dir=str(tmp_path / "out"), ctx=ctx)
    finally:
        mlflow.set_tracking_uri(None)
    run = client.get_run(result.run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    for name, path in data.items():
        assert run.data.tags[f"data.{name}.sha256"] == content_hash(path)
    assert run.data.metrics["data/preferences/rows"] == 40
    assert "agreement/alpha" in run.data.metrics
    assert "agreement/a0/agreement_with_majority" in run.data.metrics
    files = {f.path for f in client.list_artifacts(result.run_id, "data_validation")}
    assert "data_validation/report.html" in files
    assert {i.dataset.name.split("@")[0] for i in run.inputs.dataset_inputs} == set(data)
    client.set_terminated(parent.info.run_id)
