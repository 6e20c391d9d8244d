"""Bad input through the CLI, as a user runs it: `rlhf validate`, `rlhf run` and `rlhf feedback`
in a subprocess exit 2 with the file, row and rule on stderr, the report path, no traceback and
the report once (Prefect's task and flow failure logs used to print it three times, with two
tracebacks); nothing is trained or registered and the inputs are byte-identical. A real bug
still raises with its traceback.

A handful of cases, each another role and format; the whole corpus goes through the validation
stage in-process (test_bad_inputs.py, test_bad_inputs_every_role.py), which is what the CLI
calls. The subprocesses use the session's Prefect test server (PREFECT_API_URL), so none
starts a server of its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bad_corpus import CHAT_TEMPLATE, RawBytes, base_rows, build_case, write_dataset
from dataio import content_hash
from flows.cli import main
from test_bad_inputs import _conversational_sft

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory) -> str:
    # One store for the module: creating an MLflow database costs seconds per case.
    return f"sqlite:///{tmp_path_factory.mktemp('cli_mlflow') / 'mlflow.db'}"


def cli_args(data: dict[str, str], overrides: dict, tmp_path: Path, uri: str, case: str
             ) -> list[str]:
    args = [f"data.{name}={uri_}" for name, uri_ in data.items()]
    args += [f"validation.{k}={json.dumps(v)}" for k, v in overrides.items()]
    args += [f"output_dir={tmp_path / 'runs'}", f"tracking.uri={uri}",
             f"tracking.experiment=bad-{case}"]
    return [a for s in args for a in ("--set", s)]


def all_files(tmp_path: Path, role: str, rows: list[dict], fmt: str) -> dict[str, str]:
    """The valid demo-sized base for every role (JSONL), with ``role`` replaced by ``rows``."""
    base = base_rows()
    data = {n: write_dataset(tmp_path, n, rs, "jsonl") for n, rs in base.items() if n != role}
    (tmp_path / "bad").mkdir()
    data[role] = write_dataset(tmp_path / "bad", role, rows, fmt)
    return data


def _surrogate_label(rows):  # the case: a pyarrow UnicodeEncodeError traceback, exit 1
    rows[3]["annotator_id"] = "a\ud800"
    return rows


def _int_completions(rows):  # a Parquet file whose completion column is int64
    return [{**r, "completion": 7} for r in rows]


def _latin1_chosen(rows):
    rows[5]["chosen"] = RawBytes(rows[5]["chosen"].encode() + " caf\xe9".encode("latin-1"))
    return rows


# (command, role, format, edit, rule, row (or how the rows are named) or None)
CASES = [
    ("run", "preference_labels", "jsonl", _surrogate_label, "valid_utf8_text", 4),
    ("run", "sft", "parquet", _int_completions, "column_type", "40 rows (first 5: 1, 2, 3, 4, 5)"),
    ("feedback", "preferences", "datasets", _latin1_chosen, "utf8", 6),
    ("validate", "eval_prompts", "jsonl", lambda rows: rows[:3], "min_rows", None),
]


def _rlhf(args: list[str]) -> subprocess.CompletedProcess:
    from prefect.settings import get_current_settings

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "PREFECT_API_URL": str(get_current_settings().api.url)}
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("command, role, fmt, edit, rule, row", CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES])
def test_cli_refuses_bad_input_cleanly(prefect_harness, tracking_uri, tmp_path, command, role,
                                       fmt, edit, rule, row):
    from mlflow import MlflowClient

    data = all_files(tmp_path, role, edit(base_rows()[role]), fmt)
    before = {n: content_hash(u) for n, u in data.items()}
    case = f"{command}-{role}-{fmt}"
    proc = _rlhf([command, *cli_args(data, {}, tmp_path, tracking_uri, case)])
    err = proc.stderr
    assert proc.returncode == 2, err[-3000:]
    assert "Traceback" not in err and "NoneType: None" not in err, err[-3000:]
    where = f"row {row}: " if isinstance(row, int) else f"{row}: " if row else ""
    violation = f"{data[role]}: {where}rule {rule}:"
    assert f"error: data refused before training:\n" in err, err[-3000:]
    assert violation in err, err[-3000:]
    # The report once (the CLI's message); Prefect's run states carry one line with the first.
    assert err.count(f"rule {rule}:") <= 3 and err.count("\n  report: ") == 1, err[-3000:]
    report = err.split("\n  report: ")[1].split("\n")[0]
    assert Path(report).exists() and report.endswith("report.html")
    if command != "validate":
        finished = [ln for ln in err.splitlines() if "Finished in state Failed(" in ln]
        assert finished and all("refused: data validation failed" in ln for ln in finished), \
            err[-3000:]
        client = MlflowClient(tracking_uri)
        exp = client.get_experiment_by_name(f"bad-{case}")
        stages = {r.info.run_name for r in client.search_runs([exp.experiment_id])}
        assert stages <= {"demo-pipeline", "validation"}, stages  # no training stage started
        assert client.search_registered_models() == []
    assert {n: content_hash(u) for n, u in data.items()} == before


def test_a_bug_in_validation_still_raises_with_its_traceback(prefect_harness, tracking_uri,
                                                             tmp_path, monkeypatch):
    """Only refusals are turned into one line: an exception of any other type leaves `rlhf
    run` as it is (Python prints its traceback, exit 1)."""
    from data_checks import suites

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in a rule")

    monkeypatch.setattr(suites, "validate", broken)
    data = all_files(tmp_path, "sft", base_rows()["sft"], "jsonl")
    with pytest.raises(RuntimeError, match="a bug in a rule"):
        main(["run", *cli_args(data, {}, tmp_path, tracking_uri, "bug")])


def test_cli_validate_says_how_to_set_a_chat_template(tracking_uri, tmp_path, capsys):
    data = build_case(tmp_path, "sft", _conversational_sft)
    args = cli_args(data, {}, tmp_path, tracking_uri, "chat-template")
    assert main(["validate", *args]) == 2
    err = capsys.readouterr().err
    assert f"{data['sft']}: rule chat_template:" in err
    assert "set base_model.chat_template to a Jinja template string or a path" in err
    jinja = tmp_path / "chat.jinja"
    jinja.write_text(CHAT_TEMPLATE, encoding="utf-8")
    assert main(["validate", *args, "--set", f"base_model.chat_template={jinja}"]) == 0
