"""The RLHF pipeline flow: it only composes stages.

validate -> SFT -> reward model -> policy optimisation -> evaluate -> gate -> register, or
"feedback round needed". One MLflow parent run per pipeline run; each stage opens its own
child run from the ``TrackingContext`` handed to it (MLflow's active run is per thread).

Stage outputs go to ``{output_dir}/{name}/{stage}-{key}``, where the key hashes the stage's
config, seed and upstream keys: re-running the same config finds the same folder, which is
how an interrupted PPO stage resumes from its checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from prefect import flow, get_run_logger

from flows.config import PipelineConfig
from tasks.base import TrackingContext
from tasks.evaluate import evaluate_task
from tasks.gate import gate_task, register_task
from tasks.policy import policy_task
from tasks.reward_model import reward_model_task
from tasks.sft import sft_task
from tasks.validate_data import validate_data_task


def stage_key(*parts) -> str:
    blob = json.dumps([p.model_dump(mode="json") if hasattr(p, "model_dump") else p
                       for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def start_parent_run(cfg: PipelineConfig) -> TrackingContext:
    from mlflow import MlflowClient

    from tasks.tracking import flatten, tracking_uri

    uri = tracking_uri(cfg.tracking.uri)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(cfg.tracking.experiment)
    run = client.create_run(exp_id, run_name=f"{cfg.name}-pipeline",
                            tags={"rlhf.pipeline": cfg.name})
    for k, v in flatten(cfg).items():
        client.log_param(run.info.run_id, k, str(v)[:6000])
    client.log_dict(run.info.run_id, cfg.model_dump(mode="json"), "config/pipeline.json")
    return TrackingContext(tracking_uri=uri, experiment_id=exp_id, parent_run_id=run.info.run_id)


# No log_prints: it would turn the bytecode listings that `datasets` prints into its own
# fingerprint buffer into thousands of Prefect log lines.
@flow(name="rlhf-pipeline")
def rlhf_pipeline(config: PipelineConfig) -> dict:
    """Run every stage once; returns the gate's decision and where everything went."""
    from mlflow import MlflowClient

    log = get_run_logger()
    ctx = start_parent_run(config)
    client = MlflowClient(ctx.tracking_uri)
    root = Path(config.output_dir) / config.name
    seed = config.seed
    log.info("MLflow parent run %s (%s)", ctx.parent_run_id, ctx.tracking_uri)
    try:
        data = config.data.model_dump()
        checked = validate_data_task(config.validation, data=data,
                                     tokenizer_path=config.base_model.path,
                                     out_dir=str(root), ctx=ctx)
        hashes = checked.extra.get("hashes", {})
        # With quarantine on, the stage hands back clean copies: train on those, never the
        # originals (which stay byte-identical).
        data = {**data, **checked.extra.get("data", {})}
        for name, h in hashes.items():
            client.set_tag(ctx.parent_run_id, f"data.{name}.sha256", h)

        k_sft = stage_key(config.sft, config.base_model, hashes.get("sft"), seed)
        sft = sft_task(config.sft, base_model=config.base_model, data_uri=data["sft"],
                       out_dir=str(root / f"sft-{k_sft}"), seed=seed, ctx=ctx)
        k_rm = stage_key(config.reward, k_sft, hashes.get("preferences"),
                         hashes.get("eval_pairs"), seed)
        reward = reward_model_task(config.reward, sft_model_uri=sft.output_uri,
                                   train_uri=data["preferences"], eval_uri=data["eval_pairs"],
                                   rl_prompts_uri=data["rl_prompts"],
                                   out_dir=str(root / f"reward-{k_rm}"), seed=seed, ctx=ctx)
        # Only the chosen algorithm's settings key the folder: editing DPO's settings must not
        # orphan an interrupted PPO run's checkpoint.
        algo = config.policy.algorithm
        k_pol = stage_key(algo, getattr(config.policy, algo), k_sft, k_rm,
                          hashes.get("rl_prompts"), hashes.get("preferences"), seed)
        policy = policy_task(config.policy, sft_model_uri=sft.output_uri,
                             reward_model_uri=reward.output_uri, prompts_uri=data["rl_prompts"],
                             preferences_uri=data["preferences"],
                             out_dir=str(root / f"policy-{k_pol}"), seed=seed, ctx=ctx)
        evaluation = evaluate_task(config.evaluate, policy_uri=policy.output_uri,
                                   sft_model_uri=sft.output_uri,
                                   reward_model_uri=reward.output_uri,
                                   eval_prompts_uri=data["eval_prompts"], seed=seed, ctx=ctx)
        decision = gate_task(config.gate, evaluation=evaluation,
                             stop_reason=policy.extra.get("stop_reason"), seed=seed, ctx=ctx)
        summary = {"parent_run_id": ctx.parent_run_id, "tracking_uri": ctx.tracking_uri,
                   "promoted": decision["promote"], "reasons": decision["reasons"],
                   "metrics": evaluation.metrics, "policy_uri": policy.output_uri}
        if decision["promote"]:
            summary["registry"] = register_task(config.registry, policy=policy, reward=reward,
                                                sft=sft, data_hashes=hashes,
                                                metrics=evaluation.metrics, ctx=ctx)
            summary["result"] = "promoted"
        else:
            # The next roadmap step turns this into the human-feedback loop.
            summary["result"] = "feedback_round_needed"
        # The headline numbers on the parent too, so pipeline runs compare side by side.
        for key, value in {**evaluation.metrics, "gate/promoted": int(decision["promote"])}.items():
            client.log_metric(ctx.parent_run_id, key, float(value))
        client.set_tag(ctx.parent_run_id, "rlhf.result", summary["result"])
        client.set_terminated(ctx.parent_run_id, "FINISHED")
        for reason in decision["reasons"]:
            log.info("gate %s", reason)
        log.info("result: %s", summary["result"])
        return summary
    except BaseException as e:
        client.set_tag(ctx.parent_run_id, "rlhf.error", f"{type(e).__name__}: {e}"[:5000])
        client.set_terminated(ctx.parent_run_id, "FAILED")
        raise
