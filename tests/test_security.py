"""No secret is ever written; models load safely; credentials never ride in a config.

Pure redaction against hand values, then the refusals (credentials in a config, pickled
weights, repository code), then the tiny demo pipeline run with real-looking secrets in the
environment, and every byte it wrote scanned for them: the MLflow store and artifacts, the
stage folders, the Prefect database and its logs, the run report, stdout and stderr.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import string
import time
from pathlib import Path

import pytest

from dataio.uri import MASK, credentials_in, redact, redact_tree

REPO = Path(__file__).resolve().parents[1]


# -- redaction, by hand ----------------------------------------------------------------------

ENV = {"AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
       "HF_TOKEN": "hf_AbCdEfGhIjKlMnOpQrStUvWxYz012345",
       "MLFLOW_TRACKING_PASSWORD": "correct-horse-battery",
       "MLFLOW_TRACKING_USERNAME": "alice-the-admin",  # a user name is not a secret
       "PREFECT_API_KEY": "short",  # under 8 characters: would mask ordinary words
       "PATH": "/usr/bin:/bin"}


@pytest.mark.parametrize("text, expected", [
    ("http://alice:s3cret@mlflow.internal:5000/api", "http://alice:***@mlflow.internal:5000/api"),
    ("https://ghp_tokenAsUser@github.com/org/repo.git", "https://***@github.com/org/repo.git"),
    ("postgresql://rlhf:pw@db:5432/mlflow and s3://bucket/key",
     "postgresql://rlhf:***@db:5432/mlflow and s3://bucket/key"),
    ("postgresql://mlflow@db:5432/mlflow", "postgresql://mlflow@db:5432/mlflow"),  # a user only
    ("https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIAX%2F1&X-Amz-Signature=ab12&v=2",
     "https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Signature=***&v=2"),
    ("file:///data/p.jsonl?token=abc123&page=2", "file:///data/p.jsonl?token=***&page=2"),
    ("failed: key wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY rejected", "failed: key *** rejected"),
    ("Authorization: Bearer hf_AbCdEfGhIjKlMnOpQrStUvWxYz012345", "Authorization: Bearer ***"),
    ("user alice-the-admin, password correct-horse-battery", "user alice-the-admin, password ***"),
    ("a short value stays: short", "a short value stays: short"),
    ("runs/demo/sft-0123abcd and sqlite:///mlflow.db", "runs/demo/sft-0123abcd and sqlite:///mlflow.db"),
])
def test_redact_masks_userinfo_secret_queries_and_secret_env_values(text, expected):
    assert redact(text, ENV) == expected


def test_redact_tree_walks_keys_lists_and_leaves_other_values():
    tree = {"uri": "http://a:b@h", "n": 3, "flag": None,
            "xs": ["hf_AbCdEfGhIjKlMnOpQrStUvWxYz012345", 1.5],
            "correct-horse-battery": "key"}
    assert redact_tree(tree, ENV) == {"uri": f"http://a:{MASK}@h", "n": 3, "flag": None,
                                      "xs": [MASK, 1.5], MASK: "key"}


@pytest.mark.parametrize("uri, why", [
    ("http://admin:pw@127.0.0.1:5000", "user:password@"),
    ("https://TOKEN@hub.example", "token as the user name"),
    ("postgresql://u:pw@db/mlflow", "user:password@"),
    ("postgresql://mlflow@db:5432/mlflow", None),
    ("file:///d/p.jsonl?token=x", "token=..."),
    ("s3://b/k?X-Amz-Signature=x", "X-Amz-Signature=..."),
    ("sqlite:///mlflow.db", None), ("demo/data/sft.jsonl", None),
    ("http://127.0.0.1:5000", None), ("file:///d/p.jsonl?page=2", None),
])
def test_credentials_in_names_the_reason_without_the_secret(uri, why):
    reason = credentials_in(uri)
    assert (reason is None) if why is None else (why in reason and "pw" not in reason)


# -- refusals ----------------------------------------------------------------------------------

def test_a_config_with_credentials_is_refused_without_echoing_them(capsys, monkeypatch):
    from flows.cli import main

    password, token = "Pw-" + secrets.token_hex(8), "tok" + secrets.token_hex(8)
    code = main(["validate", "--set", f"tracking.uri=http://admin:{password}@127.0.0.1:5000",
                 "--set", f"data.sft=file:///{REPO}/demo/data/sft.jsonl?token={token}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "no_credentials_in_config" in err and "tracking.uri" in err and "data.sft" in err
    assert "MLFLOW_TRACKING_PASSWORD" in err  # where they go instead
    assert password not in err and token not in err and "Traceback" not in err
    # Nor through the environment, where an empty tracking.uri takes the store from.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"https://bot:{password}@mlflow.example")
    assert main(["validate"]) == 2
    err = capsys.readouterr().err
    assert "MLFLOW_TRACKING_URI" in err and password not in err


def _pickled_model_dir(tmp_path: Path) -> Path:
    import shutil

    import torch
    from safetensors.torch import load_file

    d = tmp_path / "pickled"
    d.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(REPO / "demo/base_model" / name, d / name)
    torch.save(load_file(REPO / "demo/base_model/model.safetensors"), d / "pytorch_model.bin")
    return d


def test_pickled_weights_are_refused_by_the_loader_and_the_config(tmp_path, capsys):
    from flows.cli import main
    from models.loading import UnsafeWeights, load_causal_lm, load_sequence_scorer

    d = _pickled_model_dir(tmp_path)
    for load in (load_causal_lm, load_sequence_scorer):
        with pytest.raises(UnsafeWeights, match=r"pytorch_model\.bin.*refused: unpickling"):
            load(str(d))
    assert main(["validate", "--set", f"base_model.path={d}"]) == 2
    err = capsys.readouterr().err
    assert "base_model.path" in err and "safetensors_only" in err and "Traceback" not in err
    # The same weights as safetensors load (the refusal is about the format, not the model).
    load_causal_lm(str(REPO / "demo/base_model"))


def test_repository_code_never_runs_unless_the_config_turns_it_on(tmp_path):
    import shutil

    from flows.config import load_config
    from models.loading import load_causal_lm, load_tokenizer

    # A model directory whose config asks for its own Python class: importing evil.py would
    # create the marker file.
    marker = tmp_path / "code-ran"
    d = tmp_path / f"remote_{secrets.token_hex(4)}"
    shutil.copytree(REPO / "demo/base_model", d)
    cfg = json.loads((d / "config.json").read_text())
    # An architecture transformers does not know, so only the repository's code could load it.
    cfg["model_type"] = "rlhf-evil"
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (d / "config.json").write_text(json.dumps(cfg))
    # Subclasses, not aliases: loading marks the class for auto-saving, which must not
    # touch transformers' own GPT2Config for the rest of the session.
    (d / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                               "from transformers import GPT2Config, GPT2LMHeadModel\n"
                               "class EvilConfig(GPT2Config):\n    model_type = 'rlhf-evil'\n"
                               "class EvilModel(GPT2LMHeadModel):\n"
                               "    config_class = EvilConfig\n")
    assert load_config("configs/demo.yaml").base_model.trust_remote_code is False
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_causal_lm(str(d))
    assert not marker.exists()
    # The control: turned on, the same directory does run its code (so the check above could
    # fail). The tokenizer has no auto_map and is only read.
    from transformers import AutoConfig

    from transformers.dynamic_module_utils import HF_MODULES_CACHE

    load_tokenizer(str(d))
    try:
        AutoConfig.from_pretrained(str(d), trust_remote_code=True)
    finally:  # transformers copied evil.py into its modules cache: take it out again
        shutil.rmtree(Path(HF_MODULES_CACHE) / "transformers_modules" / d.name,
                      ignore_errors=True)
    assert marker.read_text() == "ran"


def test_no_code_path_turns_remote_code_on_by_itself():
    """Beside the behavioural test above: no source file sets it True, so only the config
    (``base_model.trust_remote_code``) can."""
    hits = [f"{p.relative_to(REPO)}:{i}" for d in ("models", "tasks", "flows", "release",
                                                   "dataio", "data_checks", "labeling")
            for p in (REPO / d).rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1)
            if re.search(r"trust_remote_code\s*(=|:)\s*True", line)]
    assert hits == []


def test_a_failed_run_records_its_error_redacted(tmp_path, monkeypatch):
    """Errors quote URLs and headers: the ``rlhf.error`` tag goes through ``redact``."""
    from mlflow import MlflowClient
    from pydantic import BaseModel

    from tasks.tracking import pipeline_run

    hf = "hf_" + secrets.token_hex(16)
    monkeypatch.setenv("HF_TOKEN", hf)

    class Cfg(BaseModel):
        output_dir: str = f"/tmp/{hf}/runs"  # a secret that reached a config another way

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(RuntimeError):
        with pipeline_run("sec", "sec", uri, Cfg()) as run:
            raise RuntimeError(f"GET https://bot:{hf}@hub.example/x failed (token {hf})")
    got = MlflowClient(uri).get_run(run.ctx.parent_run_id).data
    assert got.tags["rlhf.error"] == ("RuntimeError: GET https://bot:***@hub.example/x failed "
                                      "(token ***)")
    assert got.params["output_dir"] == "/tmp/***/runs"


def test_log_records_are_redacted_before_any_handler_writes_them(monkeypatch):
    import io
    import logging

    from tasks.tracking import redact_logs

    key = "pnu_" + secrets.token_hex(16)
    monkeypatch.setenv("PREFECT_API_KEY", key)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    parent, child = logging.getLogger("sec_test"), logging.getLogger("sec_test.child")
    parent.addHandler(handler)
    try:
        redact_logs()
        redact_logs()  # idempotent: one filter per handler
        assert len(handler.filters) == 1
        child.warning("calling http://u:%s@api/x with key %s", "pw", key)
        try:
            raise RuntimeError(f"rejected {key}")
        except RuntimeError:
            child.exception("failed")
    finally:
        parent.removeHandler(handler)
    text = stream.getvalue()
    assert "calling http://u:***@api/x with key ***" in text
    assert "RuntimeError: rejected ***" in text and key not in text


# -- the whole run: no secret in anything written ------------------------------------------

def _fake(prefix: str, n: int, alphabet: str = string.ascii_letters + string.digits) -> str:
    return prefix + "".join(secrets.choice(alphabet) for _ in range(n))


def _files(root: Path, since: float) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and p.stat().st_mtime >= since]


def test_no_secret_is_written_anywhere_by_a_run(prefect_harness, tiny_overrides, tmp_path,
                                                monkeypatch, capfd):
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter
    from prefect.client.schemas.filters import LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import get_current_settings

    from flows.config import load_config
    from flows.pipeline import rlhf_pipeline

    # Real-looking, random each run: a hit can only be this run writing it.
    planted = {
        "AWS_ACCESS_KEY_ID": _fake("AKIA", 16, string.ascii_uppercase + string.digits),
        "AWS_SECRET_ACCESS_KEY": _fake("", 40),
        "AWS_SESSION_TOKEN": _fake("FwoGZXIvYXdzE", 60),
        "HF_TOKEN": _fake("hf_", 34),
        "MLFLOW_TRACKING_PASSWORD": _fake("mlf-", 20),
        "MLFLOW_TRACKING_TOKEN": _fake("mlt-", 24),
        "PREFECT_API_KEY": _fake("pnu_", 36),
        "LABEL_STUDIO_API_KEY": _fake("", 40, "0123456789abcdef"),
        "RLHF_SERVE_TOKEN": _fake("", 32),
    }
    for k, v in planted.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "rlhf-bot")
    since = time.time() - 1

    cfg = load_config("configs/demo.yaml", tiny_overrides)
    state = rlhf_pipeline(cfg, return_state=True)
    summary = state.result()
    APILogWorker.drain_all(timeout=30)
    out, err = capfd.readouterr()

    # Everything the run wrote, and what it printed.
    scanned: dict[str, bytes] = {"stdout": out.encode(), "stderr": err.encode()}
    exp = MlflowClient(summary.tracking_uri).get_experiment_by_name(cfg.tracking.experiment)
    artifacts = Path(exp.artifact_location.removeprefix("file://"))
    db_url = get_current_settings().server.database.connection_url.get_secret_value()
    prefect_dir = Path(db_url.split("///", 1)[1]).parent  # the harness's database (+ WAL)
    storage = Path(get_current_settings().results.local_storage_path)
    for root in (tmp_path, artifacts, prefect_dir, storage):  # tmp_path: MLflow db, stage dirs
        for p in _files(root, since) if root.exists() else []:
            scanned[str(p)] = p.read_bytes()
    assert any(k.endswith("mlflow.db") for k in scanned), "MLflow store not scanned"
    assert any("report.md" in k for k in scanned), "run report not scanned"
    assert any(k.endswith("config/pipeline.json") for k in scanned), "config dump not scanned"
    assert any("prefect" in Path(k).name for k in scanned), "Prefect database not scanned"

    # The Prefect logs of this run, through its API (what the UI shows).
    with get_client(sync_client=True) as client:
        flow_run_id = state.state_details.flow_run_id
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[flow_run_id])))
    assert logs, "no Prefect logs to scan"
    scanned["prefect logs"] = "\n".join(log.message for log in logs).encode()
    scanned["prefect flow run parameters"] = json.dumps(runs[0].parameters).encode()

    leaks = [f"{name} in {where}" for where, data in scanned.items()
             for name, value in planted.items() if value.encode() in data]
    assert leaks == [], leaks
    assert len(scanned) > 20, sorted(scanned)  # the scan covered the run, not an empty folder


def test_redaction_survives_other_threads_changing_the_environment():
    """Fault: another thread sets and unsets a variable while a stage redacts (MLflow's
    telemetry thread does, and a pipeline run died of the KeyError). Guarantee: redaction reads
    the environment whole and still masks every secret."""
    import sys
    import threading

    stop = threading.Event()

    def toggle():
        while not stop.is_set():
            os.environ["_RLHF_TOGGLED"] = "x"
            os.environ.pop("_RLHF_TOGGLED", None)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: the race shows at once
    os.environ["RLHF_TEST_API_TOKEN"] = "tok-" + "9" * 20
    thread = threading.Thread(target=toggle)
    thread.start()
    try:
        for _ in range(3000):
            assert redact("url?x=1 tok-" + "9" * 20) == f"url?x=1 {MASK}"
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(old)
        os.environ.pop("RLHF_TEST_API_TOKEN", None)
