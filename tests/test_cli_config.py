"""Config parsing and the CLI's refusals, before any work starts."""

from __future__ import annotations

import os

import pytest

from flows.cli import main
from flows.config import ConfigError, load_config


def test_demo_config_parses_with_overrides():
    cfg = load_config("configs/demo.yaml", ["policy.ppo.init_kl_coef=0.2", "sft.max_steps=3"])
    assert cfg.policy.ppo.init_kl_coef == 0.2 and cfg.sft.max_steps == 3
    assert cfg.base_model.path == "demo/base_model"


@pytest.mark.parametrize("override, field", [
    ("sft.max_stepz=3", "sft.max_stepz: unknown field"),
    ("policy.ppo.init_kl_coef=abc", "policy.ppo.init_kl_coef"),
    ("policy.algorithm=sarsa", "policy.algorithm"),
    ("nonsense.x=1", "nonsense: unknown field"),
])
def test_bad_field_is_named(override, field):
    with pytest.raises(ConfigError) as err:
        load_config("configs/demo.yaml", [override])
    assert field in str(err.value)


def test_cli_exits_2_on_bad_config(capsys):
    assert main(["run", "--set", "reward.lr=1"]) == 2
    assert "reward.lr: unknown field" in capsys.readouterr().err


def test_cli_missing_config_file(capsys):
    assert main(["run", "--config", "nope.yaml"]) == 2
    assert "nope.yaml: config file not found" in capsys.readouterr().err


def test_cli_config_docs_list_every_field(capsys):
    assert main(["config", "--docs"]) == 0
    out = capsys.readouterr().out
    assert "policy.ppo.kl_target = 4.0  # Target KL per sequence" in out
    assert "gate.min_win_rate" in out and "data.sft = required" in out


def test_cli_validate_refuses_bad_file(tmp_path, capsys):
    bad = tmp_path / "sft.jsonl"
    bad.write_text('{"prompt": "The film is", "completion": " fine."}\n{"prompt": "x", "compl')
    assert main(["validate", "--set", f"data.sft={bad}", "--set", f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "row 2" in err


def test_the_config_and_flows_import_no_ml_library():
    """Every rlhf command imports the config (hence every stage module) and run/feedback the
    flows, while Prefect's temporary API boots (flows/prefect_api.py): torch, pandas, MLflow
    and the rest load when a stage runs, not then (they cost ~2 s before the first stage)."""
    import subprocess
    import sys
    from pathlib import Path

    heavy = ("torch", "pandas", "numpy", "mlflow", "transformers", "great_expectations",
             "datasets", "trl", "peft", "matplotlib")
    code = ("import sys, flows.cli, flows.config, flows.pipeline, flows.feedback; "
            f"print(sorted(m for m in {heavy!r} if m in sys.modules))")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(root)}, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
