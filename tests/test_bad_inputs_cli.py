"""The bad-input corpus through the CLI: `rlhf validate` and `rlhf run` both refuse each
defect with exit code 2, before any training, naming the rule; nothing is registered and the
input files are byte-identical afterwards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dataio import content_hash
from flows.cli import main
from test_bad_inputs import CHAT_TEMPLATE, DEFECTS, _conversational_sft, build_case


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


@pytest.mark.parametrize("case, dataset, edit, rule, row, overrides", DEFECTS,
                         ids=[d[0] for d in DEFECTS])
def test_cli_refuses_bad_input(prefect_harness, tracking_uri, tmp_path, capsys, case, dataset,
                               edit, rule, row, overrides):
    from mlflow import MlflowClient

    data = build_case(tmp_path, dataset, edit)
    before = {n: content_hash(u) for n, u in data.items() if Path(u).exists()}
    args = cli_args(data, overrides, tmp_path, tracking_uri, case)
    for command in ("validate", "run"):
        assert main([command, *args]) == 2, command
        err = capsys.readouterr().err
        assert "data refused before training" in err and f"rule {rule}:" in err, (command, err)
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(f"bad-{case}")
    stages = {r.info.run_name for r in client.search_runs([exp.experiment_id])}
    assert stages <= {"demo-pipeline", "validation"}  # no training stage started
    assert client.search_registered_models() == []
    assert {n: content_hash(u) for n, u in data.items() if Path(u).exists()} == before


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
