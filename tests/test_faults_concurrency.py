"""Fault: two pipeline runs at once on the same registered model."""

from __future__ import annotations

import threading
import time
import uuid

import pytest


def test_two_runs_registering_at_once_are_serialised_and_aliases_only_name_finished_versions(
        tmp_path, monkeypatch):
    """Fault: two runs register their candidate and promote it to ``staging`` at the same
    moment, on one registered model. Guarantee: the registry lock (``release.lock``) makes
    their writes take turns: while they run, a poller never sees ``candidate`` or ``staging``
    name a version that is not READY or whose logged model is not finalised, and afterwards
    the second version records the first as the one it replaced (``rlhf.previous.<alias>``,
    where a rollback goes), which two interleaved read-plan-writes would get wrong."""
    from mlflow import MlflowClient

    from release.aliases import previous_tag
    from release.registry import Candidate, Registry

    monkeypatch.setenv("RLHF_CACHE_DIR", str(tmp_path / "cache"))  # where the lock file lives
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("faults-concurrency",
                                   artifact_location=str(tmp_path / "artifacts"))
    reward_run = client.create_run(exp, run_name="reward").info.run_id
    name = f"policy-{uuid.uuid4().hex[:6]}"

    def candidate(tokens: int) -> Candidate:
        # Same weights, other generation settings: another content key, so a new version.
        return Candidate(policy_uri="demo/base_model",
                         policy_run_id=client.create_run(exp, run_name="policy").info.run_id,
                         reward_uri="demo/base_model", reward_run_id=reward_run,
                         generation={"max_new_tokens": tokens, "temperature": 0.0})

    start, done, errors, seen = threading.Barrier(2), threading.Event(), [], []

    def pipeline_end(c: Candidate) -> None:
        try:
            registry = Registry(uri, name, f"{name}-rm")
            start.wait()
            version = registry.register(c, "candidate").policy_version
            registry.move(version, ["staging"])
        except BaseException as e:  # surfaced below
            errors.append(e)

    def poll() -> None:
        try:
            watch()
        except BaseException as e:  # surfaced below
            errors.append(e)

    def watch() -> None:
        reader = MlflowClient(uri)
        while not done.is_set():
            for alias in ("candidate", "staging"):
                try:
                    mv = reader.get_model_version_by_alias(name, alias)
                except Exception:  # not registered yet, or alias not set yet
                    continue
                # The version's source is its logged model (models:/<id>); the sqlite store
                # does not fill ModelVersion.model_id.
                model = reader.get_logged_model(mv.model_id or mv.source.removeprefix("models:/"))
                seen.append((alias, str(mv.version), mv.status, str(model.status)))
            time.sleep(0.02)

    runs = [threading.Thread(target=pipeline_end, args=(candidate(n),)) for n in (8, 9)]
    poller = threading.Thread(target=poll)
    poller.start()
    for t in runs:
        t.start()
    for t in runs:
        t.join(timeout=300)
    done.set()
    poller.join()
    assert not errors, errors
    assert seen, "the poller saw no alias at all"
    assert {(status, model) for _, _, status, model in seen} == {("READY", "READY")}, seen

    versions = sorted(Registry(uri, name, f"{name}-rm").versions(name), key=lambda v: int(v.version))
    assert [v.version for v in versions] == ["1", "2"] or [int(v.version) for v in versions] == [1, 2]
    second = client.get_model_version(name, "2")
    assert second.tags.get(previous_tag("candidate")) == "1"
    assert second.tags.get(previous_tag("staging")) == "1"
    assert client.get_model_version_by_alias(name, "staging").version in ("2", 2)


def test_two_scheduled_runs_never_hold_the_registry_slot_together(prefect_harness):
    """Fault: two scheduled runs (say the nightly pipeline and a feedback deployment) start
    together on one registered model. Guarantee: the Prefect global concurrency limit named
    after the model (``flows.scheduled``) admits one at a time: their slot-holding intervals
    do not overlap."""
    from prefect import flow

    from flows.scheduled import _registry_slot

    name = f"faults-{uuid.uuid4().hex[:6]}"
    held: list[tuple[float, float]] = []

    @flow
    def holder():
        with _registry_slot(name):
            t0 = time.monotonic()
            time.sleep(1.5)
            held.append((t0, time.monotonic()))

    threads = [threading.Thread(target=holder) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(held) == 2
    (a0, a1), (b0, b1) = sorted(held)
    assert a1 <= b0, held
