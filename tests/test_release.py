"""Registry promotion, rollback and serving: alias plans checked by hand, then a real sqlite
MLflow store, real registry writes and real servers (``rlhf serve``, ``mlflow models serve``)
on tiny policies (the demo base model with perturbed weights, so versions answer differently).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from release.aliases import (KEY_TAG, Change, DeleteAlias, DeleteTag, ModelState,
                             NothingToRollBack, SetAlias, SetTag, UnknownAlias, UnknownVersion,
                             check_alias_name, find_by_key, plan_move, plan_promotion,
                             plan_rollback, undo_writes)
from release.registry import VersionRow, content_key, versions_table
from tasks.process import free_port

REPO = Path(__file__).resolve().parents[1]
PROMPT = "The acting of this film was"
GENERATION = {"max_new_tokens": 12, "temperature": 0.0}


# -- pure alias planning, by hand ---------------------------------------------------------

def _states():
    """policy v1 (production, trained against reward 1), v2 (staging, reward 2), v3 (new)."""
    policy = ModelState("pol", {"production": "1", "staging": "2"}, {
        "1": {"rlhf.reward_model": "rm/1"},
        "2": {"rlhf.reward_model": "rm/2", "rlhf.previous.staging": "1"},
        "3": {"rlhf.reward_model": "rm/2"}})
    reward = ModelState("rm", {"production": "1", "staging": "2"}, {"1": {}, "2": {}})
    return policy, reward


def test_move_records_what_it_replaces_and_how_to_undo_it():
    policy, reward = _states()
    assert plan_move(policy, reward, "production", "3") == [
        Change(SetTag("pol", "3", "rlhf.previous.production", "1"),
               DeleteTag("pol", "3", "rlhf.previous.production")),
        Change(SetAlias("pol", "production", "3"), SetAlias("pol", "production", "1")),
        Change(SetAlias("rm", "production", "2"), SetAlias("rm", "production", "1"))]
    # A first-ever alias: no previous to record, nothing to restore but absence.
    assert plan_move(policy, reward, "candidate", "3") == [
        Change(SetAlias("pol", "candidate", "3"), DeleteAlias("pol", "candidate")),
        Change(SetAlias("rm", "candidate", "2"), DeleteAlias("rm", "candidate"))]
    assert plan_move(policy, reward, "staging", "2") == []  # already there: no write at all


def test_move_clears_a_stale_previous_and_drops_an_unknown_reward_alias():
    policy, reward = _states()
    policy = policy.with_version("4", {"rlhf.previous.candidate": "1"})  # no reward lineage
    assert plan_move(policy, reward, "candidate", "4") == [
        Change(DeleteTag("pol", "4", "rlhf.previous.candidate"),
               SetTag("pol", "4", "rlhf.previous.candidate", "1")),
        Change(SetAlias("pol", "candidate", "4"), DeleteAlias("pol", "candidate"))]
    assert plan_move(policy, reward, "staging", "4")[-1] == Change(
        DeleteAlias("rm", "staging"), SetAlias("rm", "staging", "2"))


def test_promotion_moves_aliases_in_order_and_undo_runs_backwards():
    policy, reward = _states()
    changes = plan_promotion(policy, reward, "3", ["staging", "production"])
    assert [c.do for c in changes if isinstance(c.do, SetAlias)] == [
        SetAlias("pol", "staging", "3"),  # reward staging already names reward version 2
        SetAlias("pol", "production", "3"), SetAlias("rm", "production", "2")]
    assert undo_writes(changes[:2]) == [SetAlias("pol", "staging", "2"),
                                        DeleteTag("pol", "3", "rlhf.previous.staging")]
    with pytest.raises(UnknownVersion, match="pol has no version 9"):
        plan_promotion(policy, reward, "9", ["staging"])


def test_rollback_walks_back_one_move_at_a_time():
    policy, reward = _states()
    policy = ModelState("pol", {"staging": "2"}, policy.tags)
    current, target, changes = plan_rollback(policy, reward, "staging")
    assert (current, target) == ("2", "1")
    assert [c.do for c in changes] == [SetAlias("pol", "staging", "1"), SetAlias("rm", "staging", "1")]
    # Version 1 has no previous staging version: the next rollback has nowhere to go.
    with pytest.raises(NothingToRollBack, match="version 1 was the first"):
        plan_rollback(ModelState("pol", {"staging": "1"}, policy.tags), reward, "staging")
    with pytest.raises(NothingToRollBack, match="version 1, .* no longer exists"):
        plan_rollback(ModelState("pol", {"staging": "2"}, {"2": policy.tags["2"]}), None,
                      "staging")
    with pytest.raises(UnknownAlias, match="no alias 'production'"):
        plan_rollback(policy, reward, "production")


def test_content_key_lookup_and_alias_names(tmp_path):
    state = ModelState("pol", {}, {"1": {KEY_TAG: "a"}, "2": {KEY_TAG: "b"}, "10": {KEY_TAG: "a"}})
    assert find_by_key(state, "a") == "10" and find_by_key(state, "c") is None
    for bad in ("latest", "v3", "has space", ""):
        with pytest.raises(ValueError):
            check_alias_name(bad)
    assert check_alias_name("production") == "production"

    model = tmp_path / "m"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights")
    (model / "tokenizer.json").write_text("{}")
    key = content_key(str(model), GENERATION)
    (model / "rlhf_lineage.json").write_text('{"sft_model": "/elsewhere"}')  # not content
    assert content_key(f"file://{model}", GENERATION) == key
    assert content_key(str(model), {**GENERATION, "temperature": 0.7}) != key
    (model / "model.safetensors").write_bytes(b"weightz")
    assert content_key(str(model), GENERATION) != key


def test_versions_table():
    tags = {"rlhf.eval": json.dumps({"eval/win_rate": 0.75, "eval/kl_policy_sft": 2.5,
                                     "eval/gold_policy": 0.5, "eval/gold_sft": 0.25}),
            "rlhf.reward_model": "rm/1"}
    table = versions_table([VersionRow("2", ["production", "staging"], 0, tags),
                            VersionRow("1", [], 60_000, {})])
    assert table.splitlines() == [
        "version  aliases             created (UTC)     win_rate  kl     gold_gain  reward_model",
        "2        production,staging  1970-01-01 00:00  0.750     2.500  +0.250     rm/1",
        "1        -                   1970-01-01 00:01  -         -      -          -"]


def test_registry_config_refuses_clashing_aliases():
    from pydantic import ValidationError

    from tasks.register import RegistryConfig

    with pytest.raises(ValidationError, match="must differ"):
        RegistryConfig(staging_alias="production")
    with pytest.raises(ValidationError, match="not a valid alias"):
        RegistryConfig(production_alias="latest")
    with pytest.raises(UnknownAlias, match="expected one of candidate, staging, production"):
        RegistryConfig().known_alias("prod")


# -- a real MLflow store -------------------------------------------------------------------

@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite store for the module (creating one costs seconds); tests use their own
    registered names."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("release_store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    exp = MlflowClient(uri).create_experiment("release", artifact_location=str(root / "art"))
    return uri, exp


@pytest.fixture(scope="module")
def policies(tmp_path_factory) -> list[str]:
    """Three policy dirs: the demo base model with seeded noise on every weight; greedy
    completions of PROMPT differ between them."""
    import torch
    from safetensors.torch import load_file, save_file

    dirs = []
    for seed in (1, 2, 3):
        out = tmp_path_factory.mktemp(f"policy{seed}") / "policy"
        shutil.copytree(REPO / "demo/base_model", out)
        gen = torch.Generator().manual_seed(seed)
        weights = load_file(out / "model.safetensors")
        save_file({k: w + 0.3 * w.std().nan_to_num(0.02) * torch.randn(w.shape, generator=gen)
                   for k, w in weights.items()}, out / "model.safetensors",
                  metadata={"format": "pt"})
        (out / "rlhf_lineage.json").write_text(json.dumps({"seed": seed}))
        dirs.append(str(out))
    return dirs


def _names(request) -> list[str]:
    test = request.node.name.replace("_", "-")[5:40]
    return [f"registry.policy_name=pol-{test}", f"registry.reward_name=rm-{test}"]


def _cfg(store, request, *extra):
    from flows.config import load_config

    return load_config(REPO / "configs/demo.yaml", [
        f"tracking.uri={store[0]}", "registry.generation.max_new_tokens=12", *_names(request),
        *extra]).registry


def _stage_records(store, policy_dir: str, reward_dir: str = str(REPO / "demo/base_model")):
    """Runs and stage results as the pipeline hands them to the register stage."""
    from mlflow import MlflowClient

    from tasks.base import ModelResult, PolicyResult, TrackingContext
    from tasks.evaluate import EvaluateResult

    uri, exp = store
    client = MlflowClient(uri)
    run = {s: client.create_run(exp, run_name=s).info.run_id
           for s in ("pipeline", "sft", "reward", "policy", "evaluate")}
    client.log_artifacts(run["reward"], reward_dir, "model")
    metrics = {"eval/win_rate": 0.75, "eval/kl_policy_sft": 2.0}
    return dict(
        policy=PolicyResult(stage="policy", run_id=run["policy"], model_uri=policy_dir,
                            algorithm="ppo", steps=1, planned_steps=1),
        reward=ModelResult(stage="reward", run_id=run["reward"], model_uri=reward_dir),
        sft=ModelResult(stage="sft", run_id=run["sft"], model_uri="unused"),
        evaluation=EvaluateResult(stage="evaluate", run_id=run["evaluate"], metrics=metrics,
                                  judge="reward_model"),
        data_hashes={"sft": "ab12"},
        ctx=TrackingContext(tracking_uri=uri, experiment_id=exp, parent_run_id=run["pipeline"]))


def _aliases(client, name: str) -> dict[str, str]:
    return {a: str(v) for a, v in client.get_registered_model(name).aliases.items()}


def _versions(client, name: str) -> list[str]:
    return sorted(str(v.version) for v in client.search_model_versions(f"name='{name}'"))


def test_register_is_keyed_by_content_and_tagged_with_lineage(store, policies, request):
    from mlflow import MlflowClient

    from tasks.register import register_candidate

    cfg = _cfg(store, request)
    client = MlflowClient(store[0])
    first = register_candidate(cfg, **_stage_records(store, policies[0]))
    again = register_candidate(cfg, **_stage_records(store, policies[0]))  # an unchanged re-run
    assert (first.policy_version, first.reused) == ("1", False)
    assert (again.policy_version, again.reused, again.aliases) == ("1", True, ["candidate"])
    assert _versions(client, cfg.policy_name) == ["1"] and _versions(client, cfg.reward_name) == ["1"]

    records = _stage_records(store, policies[1])
    second = register_candidate(cfg, **records)
    assert (second.policy_version, second.reward_version) == ("2", "1")  # same reward model
    assert _aliases(client, cfg.policy_name) == {"candidate": "2"}
    assert _aliases(client, cfg.reward_name) == {"candidate": "1"}
    tags = client.get_model_version(cfg.policy_name, "2").tags
    assert tags["rlhf.previous.candidate"] == "1"
    assert tags["rlhf.reward_model"] == f"{cfg.reward_name}/1"
    assert tags["rlhf.sft_run_id"] == records["sft"].run_id
    assert tags["rlhf.parent_run_id"] == records["ctx"].parent_run_id
    assert tags["data.sft.sha256"] == "ab12" and tags["rlhf.algorithm"] == "ppo"
    assert json.loads(tags["rlhf.eval"]) == records["evaluation"].metrics
    assert len(tags["rlhf.git_commit"]) == 40 or not (REPO / ".git").exists()
    assert tags[KEY_TAG] == second.content_key
    # The version serves an MLflow Model logged from the policy run.
    mv = client.get_model_version(cfg.policy_name, "2")
    assert mv.source.startswith("models:/m-") and mv.run_id == records["policy"].run_id


class FailingClient:
    """A real MlflowClient whose alias write for one (model, alias) raises, as a registry that
    goes away part-way through a move would."""

    def __new__(cls, uri: str, model: str, alias: str):
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        class _Failing(MlflowClient):
            def set_registered_model_alias(self, name, alias_, version):
                if (name, alias_) == (model, alias):
                    raise MlflowException(f"injected failure setting {model}@{alias}")
                return super().set_registered_model_alias(name, alias_, version)

        return _Failing(uri)


def test_failure_part_way_leaves_the_registry_as_it_was(store, policies, request):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from tasks.register import promote, register_candidate

    cfg = _cfg(store, request, "registry.auto_production=true")
    client = MlflowClient(store[0])
    records = _stage_records(store, policies[0])
    # The very first registration fails: not even the registered models are left behind.
    with pytest.raises(MlflowException, match="injected failure"):
        register_candidate(cfg, **records,
                           client=FailingClient(store[0], cfg.policy_name, "candidate"))
    both = f"name LIKE '%{cfg.policy_name[4:]}'"  # the policy's and the reward model's names
    assert client.search_registered_models(both) == []

    v1 = promote(cfg, candidate=register_candidate(cfg, **records), ctx=records["ctx"])
    assert v1.aliases == ["candidate", "production", "staging"]
    assert len(client.search_registered_models(both)) == 2
    before = {n: (_aliases(client, n), _versions(client, n))
              for n in (cfg.policy_name, cfg.reward_name)}
    models_before = len(client.search_logged_models([store[1]]))

    # Registration fails at its last step (the reward model's alias): the new policy and
    # reward versions, the logged model and the candidate move are all undone.
    records = _stage_records(store, policies[1], reward_dir=policies[2])
    failing = FailingClient(store[0], cfg.reward_name, "candidate")
    with pytest.raises(MlflowException, match="injected failure"):
        register_candidate(cfg, **records, client=failing)
    assert {n: (_aliases(client, n), _versions(client, n)) for n in before} == before
    assert len(client.search_logged_models([store[1]])) == models_before

    # Promotion fails at production after staging moved: staging is restored too.
    v2 = register_candidate(cfg, **records)
    failing = FailingClient(store[0], cfg.policy_name, "production")
    with pytest.raises(MlflowException, match="injected failure"):
        promote(cfg, candidate=v2, ctx=records["ctx"], client=failing)
    new, new_rm = v2.policy_version, v2.reward_version  # MLflow never reuses a version number
    assert _aliases(client, cfg.policy_name) == {"candidate": new, "staging": "1",
                                                 "production": "1"}
    assert _aliases(client, cfg.reward_name) == {"candidate": new_rm, "staging": "1",
                                                 "production": "1"}
    assert "rlhf.previous.staging" not in client.get_model_version(cfg.policy_name, new).tags


def _cli(store, request, *args) -> int:
    from flows.cli import main

    sets = [a for s in [f"tracking.uri={store[0]}", *_names(request)] for a in ("--set", s)]
    return main([*args, *sets])


def test_promote_rollback_and_models_from_the_cli(store, policies, request, capsys, tmp_path):
    from release.registry import champion_policy_dir
    from tasks.register import register_candidate

    import mlflow

    cfg = _cfg(store, request)
    for policy in policies[:2]:
        register_candidate(cfg, **_stage_records(store, policy))
    # Everything below reads the store it is given, never the process-wide tracking URI.
    decoy = tmp_path / "decoy.db"
    mlflow.set_tracking_uri(f"sqlite:///{decoy}")
    request.addfinalizer(lambda: mlflow.set_tracking_uri(store[0]))
    assert champion_policy_dir(store[0], cfg.policy_name, dst=str(tmp_path)) is None
    assert _cli(store, request, "promote", "1", "--to", "production") == 0
    assert _cli(store, request, "promote", "2", "--to", "production") == 0
    assert _cli(store, request, "models") == 0
    out = capsys.readouterr().out
    assert f"{cfg.policy_name}@production -> version 2" in out
    assert "2        candidate,production" in out and "0.750" in out

    champion = Path(champion_policy_dir(store[0], cfg.policy_name, dst=str(tmp_path)))
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (champion / name).read_bytes() == (Path(policies[1]) / name).read_bytes()

    assert _cli(store, request, "rollback") == 0
    assert "@production: version 2 -> version 1" in capsys.readouterr().out
    for args, message in ((["rollback"], "nothing to roll back to: "),
                          (["rollback", "--alias", "staging"], "has no alias 'staging'"),
                          (["rollback", "--alias", "prod"], "unknown alias 'prod'"),
                          (["promote", "7", "--to", "staging"], "has no version 7"),
                          (["promote", "1", "--to", "latest"], "unknown alias 'latest'")):
        assert _cli(store, request, *args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err, err
    assert not decoy.exists()


# -- real servers --------------------------------------------------------------------------

def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return {**env, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
            "OMP_NUM_THREADS": "1", **extra}


SERVE_TOKEN = "test-serve-token-7f3a9c"
BEARER = {"Authorization": f"Bearer {SERVE_TOKEN}"}


def _get(url: str, headers: dict[str, str] = BEARER) -> dict:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as r:
        return json.loads(r.read())


def _predict(url: str, prompts: list[str], headers: dict[str, str] = BEARER,
             **params) -> tuple[list[str], str | None]:
    body = {"inputs": prompts, **({"params": params} if params else {})}
    req = urllib.request.Request(f"{url}/invocations", json.dumps(body).encode(),
                                 {"Content-Type": "application/json", **headers})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())["predictions"], r.headers.get("X-Model-Version")


def _wait(check, timeout: float, proc: subprocess.Popen, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{what}: server exited with {proc.returncode}"
        try:
            if result := check():
                return result
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{what}: not within {timeout} s")


def _expected(uri: str, name: str, version: str) -> str:
    """Greedy completion of PROMPT by ``version``, loaded here through MLflow."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    return mlflow.pyfunc.load_model(f"models:/{name}/{version}").predict([PROMPT])[0]


def _stop(proc: subprocess.Popen) -> str:
    proc.terminate()
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out or ""


def test_servers_answer_and_rlhf_serve_follows_the_alias(store, policies, request):
    from tasks.register import register_candidate

    cfg = _cfg(store, request)
    for policy in policies[:2]:
        register_candidate(cfg, **_stage_records(store, policy))
    assert _cli(store, request, "promote", "1", "--to", "production") == 0
    mlflow_port = free_port()
    # Both servers start at once (each ~10-25 s on 2 busy cores).
    mlflow_serve = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m",
         f"models:/{cfg.policy_name}@production", "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(mlflow_port)],
        env=_env(MLFLOW_TRACKING_URI=store[0]), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    rlhf_serve = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "serve", "--port", "0", "--poll-seconds", "0.3",
         *[a for s in [f"tracking.uri={store[0]}", *_names(request)] for a in ("--set", s)]],
        cwd=REPO, env=_env(RLHF_SERVE_TOKEN=SERVE_TOKEN), stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, text=True)
    try:
        expected = {v: _expected(store[0], cfg.policy_name, v) for v in ("1", "2")}
        assert expected["1"] != expected["2"], "test policies must answer differently"

        ready = rlhf_serve.stdout.readline()
        assert "(version 1) on http://127.0.0.1:" in ready, ready
        url = ready.split(" on ")[-1].strip()
        assert _get(f"{url}/health")["version"] == "1"
        assert _predict(url, [PROMPT]) == ([expected["1"]], "1")
        # Without the bearer token (or with another) nothing but /ping answers: 401.
        for headers in ({}, {"Authorization": "Bearer wrong"},
                        {"Authorization": SERVE_TOKEN}):
            for call in (lambda: _predict(url, [PROMPT], headers=headers),
                         lambda: _get(f"{url}/health", headers=headers)):
                with pytest.raises(urllib.error.HTTPError) as denied:
                    call()
                assert denied.value.code == 401, headers
        assert urllib.request.urlopen(f"{url}/ping", timeout=30).status == 200

        assert _cli(store, request, "promote", "2", "--to", "production") == 0
        _wait(lambda: _get(f"{url}/health")["version"] == "2", 60, rlhf_serve, "swap to v2")
        assert _predict(url, [PROMPT, PROMPT]) == ([expected["2"]] * 2, "2")

        assert _cli(store, request, "rollback") == 0
        _wait(lambda: _get(f"{url}/health")["version"] == "1", 60, rlhf_serve, "swap back")
        assert _predict(url, [PROMPT]) == ([expected["1"]], "1")

        # MLflow's own server resolved models:/<name>@production at start (version 1).
        mlflow_url = f"http://127.0.0.1:{mlflow_port}"
        _wait(lambda: urllib.request.urlopen(f"{mlflow_url}/ping", timeout=5).status == 200,
              180, mlflow_serve, "mlflow models serve")
        assert _predict(mlflow_url, [PROMPT])[0] == [expected["1"]]
        # A request's params override the logged generation settings (12 new tokens).
        short = _predict(mlflow_url, [PROMPT], max_new_tokens=2)[0][0]
        assert short and expected["1"].startswith(short) and short != expected["1"]
    finally:
        _stop(rlhf_serve)
        log = _stop(mlflow_serve)
    assert rlhf_serve.returncode == 0  # SIGTERM stops it cleanly
    assert "Traceback" not in log, log[-3000:]
