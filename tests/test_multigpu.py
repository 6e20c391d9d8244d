"""Training stages under ``accelerate launch``: 2 CPU processes (gloo) against one process.

Two kinds of agreement, because two kinds are true:
- The PPO update itself is exact: fed the same episodes, 2 processes end with the weights one
  process ends with, up to float summation order (``test_ppo_update_in_two_processes_...``).
- A whole launched stage agrees only statistically: each process samples (PPO) or drops out
  (SFT) with its own random numbers, so the runs see different noise. Those tests check the
  plumbing (Prefect task -> accelerate launch -> typed result, one MLflow run, the same steps
  and episodes) and that the results agree within that noise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.launch import LaunchConfig, free_port, launch_command

REPO = Path(__file__).resolve().parents[1]
DDP = str(REPO / "deploy" / "accelerate" / "ddp.yaml")
LAUNCH = LaunchConfig(num_processes=2, config_file=DDP, cpu=True)


def test_launch_command_names_processes_config_port_and_worker(tmp_path):
    cmd = launch_command(LAUNCH, tmp_path / "request.json", 40123)
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--num_processes") + 1] == "2"
    assert cmd[cmd.index("--config_file") + 1] == DDP
    assert cmd[cmd.index("--main_process_port") + 1] == "40123"
    assert cmd[-3:] == ["-m", "tasks.stage_worker", str(tmp_path / "request.json")]
    # Without a config file: plain DDP, with everything `accelerate config` would ask given.
    plain = launch_command(LaunchConfig(num_processes=4), tmp_path / "r.json", None)
    assert "--multi_gpu" in plain and "--config_file" not in plain
    assert "--main_process_port" not in plain


def test_launch_applies_to_chosen_stages_only():
    assert not LaunchConfig().applies_to("sft")  # one process: the task's own
    partial = LaunchConfig(num_processes=2, stages=["sft", "reward"])
    assert partial.applies_to("reward") and not partial.applies_to("policy")


def test_shipped_accelerate_configs_load_with_accelerate():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    expected = {"ddp.yaml": DistributedType.MULTI_GPU,
                "deepspeed_zero2.yaml": DistributedType.DEEPSPEED,
                "fsdp.yaml": DistributedType.FSDP}
    for name, kind in expected.items():
        cfg = load_config_from_file(str(REPO / "deploy" / "accelerate" / name))
        assert cfg.distributed_type == kind, name
        # No fixed port: the pipeline picks a free one per launch.
        assert getattr(cfg, "main_process_port", None) is None, name
    zero2 = load_config_from_file(str(REPO / "deploy" / "accelerate" / "deepspeed_zero2.yaml"))
    assert zero2.deepspeed_config["zero_stage"] == 2
    fsdp = load_config_from_file(str(REPO / "deploy" / "accelerate" / "fsdp.yaml"))
    assert fsdp.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"


def test_pipeline_config_has_a_launch_section():
    from flows.config import ConfigError, load_config

    cfg = load_config(REPO / "configs" / "demo.yaml",
                      ["launch.num_processes=2", f"launch.config_file={DDP}"])
    assert cfg.launch.num_processes == 2 and cfg.launch.applies_to("policy")
    with pytest.raises(ConfigError, match="launch.num_processes"):
        load_config(REPO / "configs" / "demo.yaml", ["launch.num_processes=0"])
    with pytest.raises(ConfigError, match="launch.config_file: .*no such file"):
        load_config(REPO / "configs" / "demo.yaml", ["launch.config_file=deploy/nope.yaml"])


def _env() -> dict[str, str]:
    return {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def test_ppo_update_in_two_processes_equals_one_process(tiny_reward_dir, tmp_path):
    out = tmp_path / "ddp.json"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", DDP,
           "--num_processes", "2", "--main_process_port", str(free_port()),
           "tests/ppo_ddp_worker.py", tiny_reward_dir, str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["world_size"] == 2
    assert r["whiten_max_diff"] < 1e-6
    assert r["checksums"][0] == r["checksums"][1]  # both processes hold the same weights
    # The update moved weights by ~6e-4; the two runs differ by float rounding only (~2e-8).
    assert r["max_param_change"] > 1e-4
    assert r["max_param_diff"] < 1e-6
    for k, v in r["ref_stats"].items():
        if k == "val/clipfrac":
            # clip(V, V_old +- eps) rebuilds V as V_old + (V - V_old): a rounding tie decides
            # "clipped > unclipped" for unclipped positions, so this share moves with rounding.
            continue
        if k == "perf/accumulation":  # micro-batches per process: 8 in one, 4 in each of two
            assert (v, r["stats"][k]) == (8.0, 4.0)
            continue
        assert r["stats"][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k


def _child_runs(ctx, name: str):
    from mlflow import MlflowClient

    client = MlflowClient(ctx.tracking_uri)
    runs = client.search_runs([ctx.experiment_id],
                              f"tags.mlflow.parentRunId = '{ctx.parent_run_id}'")
    return client, [r for r in runs if r.info.run_name == name]


def test_sft_and_ppo_launched_by_prefect_tasks_agree_with_one_process(
        prefect_harness, make_ctx, tiny_reward_dir, head_file, tmp_path):
    from prefect import flow

    from tasks.base import BaseModelConfig
    from tasks.policy import PolicyConfig, policy_task, run_policy
    from tasks.ppo import PPOConfig
    from tasks.sft import SFTConfig, run_sft, sft_task

    data = head_file(REPO / "demo" / "data" / "sft.jsonl", tmp_path / "sft.jsonl", 128)
    base = BaseModelConfig(path=str(REPO / "demo" / "base_model"))
    # The global SFT batch is 8 in both runs: 8 in one process, 4 in each of two.
    sft_cfg = dict(max_steps=8, gradient_accumulation_steps=1, learning_rate=1e-3,
                   max_length=128, logging_steps=4, eval_fraction=0.1)
    ppo = PolicyConfig(ppo=PPOConfig(total_episodes=48, batch_size=16, mini_batch_size=8,
                                     ppo_epochs=1, max_new_tokens=12, learning_rate=3e-4,
                                     max_prompt_length=32, mixed_precision="no"))
    inputs = dict(sft_model_uri=str(base.path), reward_model_uri=tiny_reward_dir,
                  prompts_uri=str(REPO / "demo" / "data" / "rl_prompts.jsonl"),
                  preferences_uri=str(REPO / "demo" / "data" / "preferences.jsonl"), seed=0)

    one_ctx, two_ctx = make_ctx("one_process"), make_ctx("two_processes")
    one_sft = run_sft(SFTConfig(per_device_train_batch_size=8, **sft_cfg), base_model=base,
                      data_uri=data, out_dir=str(tmp_path / "sft1"), seed=0, ctx=one_ctx)
    one_ppo = run_policy(ppo, out_dir=str(tmp_path / "ppo1"), ctx=one_ctx, **inputs)

    @flow
    def launched():
        sft = sft_task(SFTConfig(per_device_train_batch_size=4, **sft_cfg), launch=LAUNCH,
                       base_model=base, data_uri=data, out_dir=str(tmp_path / "sft2"), seed=0,
                       ctx=two_ctx)
        policy = policy_task(ppo, launch=LAUNCH, out_dir=str(tmp_path / "ppo2"), ctx=two_ctx,
                             **inputs)
        return sft, policy

    two_sft, two_ppo = launched()

    # SFT: the same examples in every step (accelerate shards each global batch, and the
    # loss is averaged over the tokens of all processes); only dropout's random masks differ,
    # which moved the losses by 0.1% (train) and 0.8% (eval) here: 3% allows for that, while a
    # process training on the wrong share or a wrong gradient scale shows up as more.
    assert two_sft.num_train_examples == one_sft.num_train_examples
    for k in ("sft/train_loss", "sft/eval_loss"):
        assert two_sft.metrics[k] == pytest.approx(one_sft.metrics[k], rel=0.03), k
    assert (Path(two_sft.model_uri) / "model.safetensors").exists()

    # PPO: the same updates of the same prompts (16 per update, 8 per process); responses
    # are sampled with other random numbers, so scores agree within sampling noise: one
    # episode's score has sd ~0.38 here (normalised reward with the missing-EOS penalty), so
    # the mean of 48 episodes differs between two runs by sd 0.38 * sqrt(2/48) = 0.08; we
    # allow 4 sd. KL starts at 0 and stays below ~0.5 nats in 3 small updates in both.
    assert two_ppo.steps == one_ppo.steps == two_ppo.planned_steps == 3
    assert two_ppo.stop_reason is None and (Path(two_ppo.model_uri) / "model.safetensors").exists()
    client, runs = _child_runs(two_ctx, "policy")
    assert len(runs) == 1  # the main process logs; the other one opened no run
    kl = client.get_metric_history(runs[0].info.run_id, "ppo/objective/kl")
    assert [m.step for m in kl] == [1, 2, 3]  # each update logged once
    scores = {}
    for name, ctx in (("one", one_ctx), ("two", two_ctx)):
        c, (run,) = _child_runs(ctx, "policy")
        history = c.get_metric_history(run.info.run_id, "ppo/objective/scores")
        scores[name] = sum(m.value for m in history) / len(history)
    assert scores["two"] == pytest.approx(scores["one"], abs=4 * 0.38 * (2 / 48) ** 0.5)
    assert abs(two_ppo.metrics["ppo/final_kl"] - one_ppo.metrics["ppo/final_kl"]) < 0.5
    _, sft_runs = _child_runs(two_ctx, "sft")
    assert len(sft_runs) == 1


def test_reward_scores_through_a_wrapper_equal_the_direct_scores():
    """The reward trainer under DDP scores through the wrapper's forward (its gradient hooks
    need it); the scores must be the ones ``score_sequences`` gives, padding included."""
    import torch

    from models.loading import load_sequence_scorer
    from models.reward import score_sequences, score_sequences_through

    torch.manual_seed(0)
    rm = load_sequence_scorer(str(REPO / "demo" / "base_model")).eval()
    rm.config.pad_token_id = 0
    ids = torch.randint(1, 100, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, :2] = 0  # left padding
    mask[1, -3:] = 0  # right padding
    with torch.no_grad():
        direct = score_sequences(rm, ids, mask)
        through = score_sequences_through(rm, rm, ids, mask)  # the model as its own wrapper
    assert torch.allclose(direct, through, atol=1e-6)


def test_stage_worker_hands_back_data_errors_and_tracebacks(make_ctx, tmp_path):
    """What a launched process leaves for the parent when it fails: a data error as data (the
    parent raises it again: exit 2 in the CLI), anything else as its traceback."""
    from tasks import stage_worker

    ctx = make_ctx("worker_errors")
    result = tmp_path / "result.json"

    def request(**inputs) -> str:
        path = tmp_path / "request.json"
        path.write_text(json.dumps({"stage": "sft", "result_path": str(result), "inputs": {
            "cfg": {"max_steps": 1}, "out_dir": str(tmp_path / "sft"), "seed": 0,
            "ctx": ctx.model_dump(), **inputs}}))
        return str(path)

    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"question": "no prompt or completion here"}\n')
    code = stage_worker.main([request(base_model={"path": str(REPO / "demo" / "base_model")},
                                      data_uri=str(wrong))])
    assert code == 2
    error = json.loads(result.read_text())["data_error"]
    assert error["uri"] == str(wrong) and error["rule"] == "required_columns"

    result.unlink()
    with pytest.raises(OSError):
        stage_worker.main([request(base_model={"path": str(tmp_path / "no_model")},
                                   data_uri=str(REPO / "demo" / "data" / "sft.jsonl"))])
    assert not result.exists()
    assert "Traceback" in (tmp_path / "result.json.rank0.error").read_text()


def test_stage_worker_leaves_the_process_group():
    """Each launched process tears its process group down before exiting (a process that
    exited with gloo's still up could abort at shutdown and fail the stage); a no-op without
    one."""
    import torch.distributed as dist

    from tasks.launch import free_port
    from tasks.stage_worker import _leave_process_group

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1)
    assert dist.is_initialized()
    _leave_process_group()
    assert not dist.is_initialized()
    _leave_process_group()  # nothing to leave
