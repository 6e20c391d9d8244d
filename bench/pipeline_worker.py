"""One ``rlhf run`` in this process, timed from the outside of the project code.

    python bench/pipeline_worker.py OUT.json -- run --config configs/demo.yaml [--set k=v ...]

``bench/bench_pipeline.py`` starts it once per measured run. It runs exactly what ``rlhf run``
runs (``flows.cli.main``) and changes none of it: it only wraps, by attribute, the functions
whose time it attributes, and records for every wrapped call its thread, its start and end
(``time.perf_counter`` since this file started) and its category:

- ``import``: a module loaded for the first time (CPython looks ``_find_and_load`` up on
  ``importlib._bootstrap`` at every import that misses ``sys.modules``, so wrapping it sees
  every real import, lazy ones inside stages included);
- ``mlflow``: every public ``MlflowClient`` method and the fluent calls the stages make
  (``start_run``, ``log_*``, ``set_tag*``, ``get_artifact_uri``, ...);
- ``prefect_api``: starting and stopping Prefect's temporary API server (no
  ``PREFECT_API_URL``: ``SubprocessASGIServer.start``/``stop``);
- ``cache_key``: hashing stage inputs and code for content-addressed stages, where
  ``tasks.cache`` exists;
- ``stage``: the body of a stage's ``run_<stage>`` function (validation, sft, reward,
  policy, evaluate, gate, report).

Times are *exclusive*: a call's time excludes the wrapped calls inside it (an import inside
an MLflow call inside ``run_sft`` counts once, as an import in stage ``sft``), so every second
of a thread falls in exactly one category. What no wrapper covers (Prefect's flow and task
engine, the flow's own code, pydantic validation of task inputs, the CLI) is what is left of
the wall time, reported by ``bench_pipeline.py`` as Prefect engine + flow glue.

A sampling thread reads the resident set size of this process (``/proc/self/statm``) every
50 ms and that of its child processes (the Prefect API server) every 0.5 s.
"""

from __future__ import annotations

import time

P0 = time.perf_counter()
T0 = time.time()

import functools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402

EVENTS: list[tuple] = []  # (category, name, stage, thread, start, end, self_s)
_LOCAL = threading.local()
_STAGE = {"name": "cli"}  # the stage window the main thread is in (stages run one at a time)


def _stack() -> list:
    if not hasattr(_LOCAL, "stack"):
        _LOCAL.stack = []
    return _LOCAL.stack


def timed(category: str, name: str, fn):
    """``fn`` that records its exclusive time under ``category``."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        stack = _stack()
        if category == "mlflow" and stack and stack[-1][0] == "mlflow":
            return fn(*args, **kwargs)  # a fluent call's own client calls: already counted
        frame = [category, 0.0]  # [category, time spent in wrapped calls inside this one]
        stack.append(frame)
        prev_stage = _STAGE["name"]
        if category == "stage":
            _STAGE["name"] = name
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            end = time.perf_counter()
            stack.pop()
            if category == "stage":
                _STAGE["name"] = prev_stage
            if stack:
                stack[-1][1] += end - start
            label = args[0] if category == "import" else name  # the module's name
            EVENTS.append((category, label, name if category == "stage" else _STAGE["name"],
                           threading.current_thread().name, start - P0, end - P0,
                           end - start - frame[1]))
    return wrapper


def wrap_imports() -> None:
    import importlib._bootstrap as bootstrap

    bootstrap._find_and_load = timed("import", "import", bootstrap._find_and_load)


def wrap_mlflow() -> None:
    import mlflow
    import mlflow.artifacts
    import mlflow.data
    from mlflow.tracking.client import MlflowClient

    for name, attr in list(vars(MlflowClient).items()):
        if callable(attr) and not name.startswith("_"):
            setattr(MlflowClient, name, timed("mlflow", f"client.{name}", attr))
    for name in ("start_run", "end_run", "log_params", "log_param", "log_metrics", "log_metric",
                 "log_dict", "log_artifacts", "log_artifact", "log_text", "log_table",
                 "set_tag", "set_tags", "get_artifact_uri", "set_tracking_uri",
                 "set_experiment", "log_input", "log_inputs", "register_model",
                 "search_runs", "get_run"):
        if hasattr(mlflow, name):
            setattr(mlflow, name, timed("mlflow", name, getattr(mlflow, name)))
    mlflow.data.from_pandas = timed("mlflow", "data.from_pandas", mlflow.data.from_pandas)
    mlflow.artifacts.download_artifacts = timed("mlflow", "download_artifacts",
                                                mlflow.artifacts.download_artifacts)


def wrap_prefect_server() -> None:
    from prefect.server.api.server import SubprocessASGIServer

    for name in ("start", "stop"):
        setattr(SubprocessASGIServer, name,
                timed("prefect_api", f"server.{name}", getattr(SubprocessASGIServer, name)))


def wrap_stages() -> None:
    import importlib

    # sft, reward and policy are looked up by name (``tasks.launch.stage_function``); the
    # other stages' tasks wrap their function directly, so the task's ``fn`` is wrapped (the
    # feedback round also calls ``run_validation`` by name). ``functools.wraps`` keeps the
    # name, module and signature that Prefect and the cache keys read.
    for stage, target in {"validation": "tasks.validation:run_validation",
                          "sft": "tasks.sft:run_sft", "reward": "tasks.reward:run_reward",
                          "policy": "tasks.policy:run_policy"}.items():
        module, name = target.split(":")
        mod = importlib.import_module(module)
        setattr(mod, name, timed("stage", stage, getattr(mod, name)))
    for stage, target in {"validation": "tasks.validation:validation_task",
                          "evaluate": "tasks.evaluate:evaluate_task",
                          "gate": "tasks.gate:gate_task",
                          "report": "tasks.report:report_task"}.items():
        module, name = target.split(":")
        stage_task = getattr(importlib.import_module(module), name)
        stage_task.fn = timed("stage", stage, stage_task.fn)
    try:
        cache = importlib.import_module("tasks.cache")
    except ModuleNotFoundError:  # before content-addressed stages
        return
    for name in ("fingerprint", "code_version", "key_inputs"):
        if hasattr(cache, name):
            setattr(cache, name, timed("cache_key", name, getattr(cache, name)))


def children_rss_kb(page_kb: int) -> int:
    """Resident KB of this process's descendants (the Prefect server and its children)."""
    total, todo = 0, [os.getpid()]
    while todo:
        pid = todo.pop()
        try:
            tids = os.listdir(f"/proc/{pid}/task")
            kids = [int(k) for t in tids
                    for k in open(f"/proc/{pid}/task/{t}/children").read().split()]
        except OSError:
            continue
        for k in kids:
            try:
                total += int(open(f"/proc/{k}/statm").read().split()[1]) * page_kb
            except OSError:
                pass
        todo += kids
    return total


def sample_rss(samples: list, stop: threading.Event) -> None:
    page_kb = os.sysconf("SC_PAGE_SIZE") // 1024
    kids, n = 0, 0
    while not stop.is_set():
        rss = int(open("/proc/self/statm").read().split()[1]) * page_kb
        if n % 10 == 0:
            kids = children_rss_kb(page_kb)
        samples.append((time.perf_counter() - P0, rss, kids))
        n += 1
        stop.wait(0.05)


def main() -> int:
    out, argv = sys.argv[1], sys.argv[sys.argv.index("--") + 1:]
    samples: list = []
    stop = threading.Event()
    sampler = threading.Thread(target=sample_rss, args=(samples, stop), daemon=True,
                               name="rss-sampler")
    sampler.start()
    wrap_imports()
    # The CLI first: it sets Prefect's settings in the environment before Prefect loads them.
    from flows import cli

    # Imported here rather than first used inside the flow so they can be wrapped; their
    # import time is counted (category import, stage "cli") either way.
    wrap_mlflow()
    wrap_prefect_server()
    wrap_stages()

    import flows.pipeline

    captured = {}
    flow = flows.pipeline.rlhf_pipeline

    def run_flow(*args, **kwargs):
        start = time.perf_counter()
        captured["flow_start"] = start - P0
        _STAGE["name"] = "flow"  # calls outside any stage body: the flow's own
        try:
            result = flow(*args, **kwargs)
        finally:
            captured["flow_end"] = time.perf_counter() - P0
            _STAGE["name"] = "cli"
        captured["result"] = result.model_dump(mode="json")
        return result

    flows.pipeline.rlhf_pipeline = run_flow  # cmd_run imports it from the module at call time
    rc = cli.main(argv)
    end = time.perf_counter() - P0
    stop.set()
    sampler.join()
    status = open("/proc/self/status").read()
    hwm_kb = int(next(line.split()[1] for line in status.splitlines()
                      if line.startswith("VmHWM:")))
    record = {"rc": rc, "t0_epoch": T0, "end_s": end, "vm_hwm_kb": hwm_kb, **captured,
              "events": EVENTS, "rss_samples": samples}
    with open(out, "w") as f:
        json.dump(record, f)
    # The Prefect API server is stopped by its atexit hook: that time is outside end_s.
    return rc


if __name__ == "__main__":
    sys.exit(main())
