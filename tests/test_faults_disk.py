"""Fault: the disk fills up while a stage saves its model."""

from __future__ import annotations

import errno
import os
import subprocess
import uuid
from pathlib import Path

import pytest


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    """A 1 MiB filesystem (the demo model's weights are 2 MB): a real tmpfs where the test may
    mount one (root), else transformers' safetensors writer patched to write half the file and
    then fail with ENOSPC, as a full disk does."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                             capture_output=True).returncode == 0
    if not mounted:
        import transformers.modeling_utils as mu

        real = mu.safe_save_file

        def full_disk(tensors, filename, metadata=None):
            real(tensors, filename, metadata=metadata)
            size = os.path.getsize(filename)
            with open(filename, "r+b") as f:
                f.truncate(size // 2)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

        monkeypatch.setattr(mu, "safe_save_file", full_disk)
    try:
        yield mnt
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_while_saving_sft_leaves_no_model(small_disk, make_ctx, head_file, tmp_path):
    """Fault: the disk fills while the SFT stage writes its model (ENOSPC). Guarantee: the
    stage fails with the disk's error; the stage folder does not exist (no half-written
    model.safetensors that a re-run, evaluation or the registry could pick up), no partial
    folder is left behind, and the stage's MLflow run is FAILED with no model artifact."""
    from mlflow import MlflowClient

    from tasks.base import BaseModelConfig
    from tasks.sft import SFTConfig, run_sft

    ctx = make_ctx(f"disk_{uuid.uuid4().hex[:6]}")
    out = small_disk / "sft-abc"
    cfg = SFTConfig(max_steps=2, per_device_train_batch_size=4, gradient_accumulation_steps=1,
                    learning_rate=1e-3, max_length=64, logging_steps=1, save_steps=0,
                    eval_fraction=0.0)
    data = head_file("demo/data/sft.jsonl", tmp_path / "sft.jsonl", 16)
    # safetensors reports a real ENOSPC as its own SafetensorError naming the OS error.
    with pytest.raises(Exception, match="No space left on device"):
        run_sft(cfg, base_model=BaseModelConfig(path="demo/base_model"), data_uri=data,
                out_dir=str(out), seed=0, ctx=ctx)
    assert not out.exists()
    # The partial folder was removed too; what is left is the (model-less) checkpoint folder a
    # re-run resumes from.
    assert [p.name for p in small_disk.iterdir()] == ["sft-abc.checkpoints"]
    assert not list((small_disk / "sft-abc.checkpoints").rglob("*.safetensors"))
    client = MlflowClient(ctx.tracking_uri)
    (run,) = client.search_runs([ctx.experiment_id], "tags.`rlhf.stage` = 'sft'")
    assert run.info.status == "FAILED"
    assert client.list_artifacts(run.info.run_id, "model") == []


def test_disk_full_on_resave_keeps_the_previous_complete_output(small_disk):
    """Fault: the disk fills while a re-run overwrites an existing stage output. Guarantee:
    readers still see the previous output whole (new files go to a temp folder that is renamed
    over the old one only once complete), and nothing partial is left."""
    import torch
    from transformers import AutoModelForCausalLM

    from tasks.durable import atomic_dir

    out = small_disk / "policy"
    with atomic_dir(out) as tmp:
        (tmp / "rlhf_lineage.json").write_text('{"run": "old"}')
        torch.save({"w": torch.zeros(4)}, tmp / "small.pt")
    model = AutoModelForCausalLM.from_pretrained("demo/base_model")
    with pytest.raises(Exception, match="No space left on device"):
        with atomic_dir(out) as tmp:
            model.save_pretrained(tmp)
    assert sorted(p.name for p in out.iterdir()) == ["rlhf_lineage.json", "small.pt"]
    assert (out / "rlhf_lineage.json").read_text() == '{"run": "old"}'
    assert [p.name for p in small_disk.iterdir()] == ["policy"]
