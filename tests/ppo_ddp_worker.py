"""One PPO update in 2 processes against the same update in one; used by test_multigpu.py.

    accelerate launch --multi_gpu --num_processes 2 tests/ppo_ddp_worker.py RM_DIR OUT_JSON

Every process builds the same whole rollout batch (same seed, same weights) and keeps its
half, so the two runs see the same episodes and sampling noise plays no part. With one
episode per micro-batch the data-parallel loss is the one-process loss term for term (the
mean of per-episode losses), so the weights after the update must agree up to float
summation order. Rank 0 then repeats the update in one process and writes the differences.
"""

import json
import sys
from pathlib import Path

import torch
from transformers import set_seed

from models.ppo import masked_whiten
from tasks.distributed import DataParallel
from tasks.ppo import PPOConfig, _load_prompts, build_models
from tasks.ppo_trainer import init_train_state, make_rollout, ppo_update

# One mini-batch of 8 episodes, one per micro-batch; two epochs, so the second epoch starts
# from weights the first updated (a process that drifted would show it).
CFG = PPOConfig(total_episodes=8, batch_size=8, mini_batch_size=8, gradient_accumulation_steps=8,
                ppo_epochs=2, max_new_tokens=8, learning_rate=3e-4, mixed_precision="no")


def fresh(rm_dir: str, dp: DataParallel):
    set_seed(0)
    models = build_models(CFG, "demo/base_model", rm_dir, dp.device)
    state = init_train_state(CFG, models, [], 0, n_updates=1)
    return models, state


def params(models) -> dict[str, torch.Tensor]:
    return {f"{role}.{k}": v.detach().clone() for role, m in (("policy", models.policy),
                                                              ("critic", models.critic))
            for k, v in m.state_dict().items()}


def main(rm_dir: str, out_json: str) -> None:
    torch.set_num_threads(1)
    dp = DataParallel.setup()
    models, state = fresh(rm_dir, dp)
    prompts = _load_prompts("demo/data/rl_prompts.jsonl", models.tokenizer, 32)[:CFG.batch_size]
    torch.manual_seed(0)
    full = make_rollout(CFG, models, prompts, beta=0.05)  # the same whole batch everywhere
    half = CFG.batch_size // dp.world_size
    mine = torch.arange(dp.rank * half, (dp.rank + 1) * half)
    share = full.select(mine)

    # Whitening a share with the whole batch's statistics = whitening the whole batch.
    whiten_diff = float((dp.masked_whiten(share.rewards, share.response_mask)
                         - masked_whiten(full.rewards, full.response_mask)[mine]).abs().max())
    stats = ppo_update(CFG, models, share, beta=0.05, optimizer=state.optimizer,
                       gen=torch.Generator().manual_seed(0), dp=dp)
    stats = dp.mean_stats(stats)
    after = params(models)
    checksums = dp.gather_object(sum(float(v.double().sum()) for v in after.values()))
    if not dp.is_main:
        return

    ref_models, ref_state = fresh(rm_dir, DataParallel(0, 1, dp.device))
    ref_stats = ppo_update(CFG, ref_models, full, beta=0.05, optimizer=ref_state.optimizer,
                           gen=torch.Generator().manual_seed(0))
    ref = params(ref_models)
    before = params(fresh(rm_dir, DataParallel(0, 1, dp.device))[0])
    Path(out_json).write_text(json.dumps({
        "world_size": dp.world_size,
        "whiten_max_diff": whiten_diff,
        "checksums": checksums,
        "max_param_diff": max(float((after[k] - ref[k]).abs().max()) for k in ref),
        "max_param_change": max(float((ref[k] - before[k]).abs().max()) for k in ref),
        "stats": stats, "ref_stats": ref_stats,
    }))


if __name__ == "__main__":
    main(*sys.argv[1:3])
