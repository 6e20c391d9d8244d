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
- ``prefect_api``: starting, waiting for and stopping the temporary Prefect API server (no
  ``PREFECT_API_URL``): the CLI's early start (``flows.prefect_api.TemporaryAPI``: the time
  the run waits in ``ready``, the server boots in its own process meanwhile), or Prefect's own
  ``SubprocessASGIServer.start``/``stop`` where Prefect starts it;
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


AFTER_IMPORT: dict[str, list] = {}
"""Module name -> functions that wrap its attributes once it is loaded: wrapping as modules
arrive, rather than importing them all first, leaves the CLI's import order (and what it
overlaps with Prefect's server start) as it is."""


def after_import(*modules: str):
    def register(fn):
        for m in modules:
            AFTER_IMPORT.setdefault(m, []).append(fn)
        return fn
    return register


def wrap_imports() -> None:
    import importlib._bootstrap as bootstrap

    timed_load = timed("import", "import", bootstrap._find_and_load)

    def find_and_load(name, *args, **kwargs):
        module = timed_load(name, *args, **kwargs)
        for wrap in AFTER_IMPORT.pop(name, ()):
            wrap(module)
        return module

    bootstrap._find_and_load = find_and_load


@after_import("mlflow.tracking.client")
def wrap_mlflow_client(module) -> None:
    MlflowClient = module.MlflowClient

    for name, attr in list(vars(MlflowClient).items()):
        if callable(attr) and not name.startswith("_"):
            setattr(MlflowClient, name, timed("mlflow", f"client.{name}", attr))


@after_import("mlflow")
def wrap_mlflow(mlflow) -> None:
    for name in ("start_run", "end_run", "log_params", "log_param", "log_metrics", "log_metric",
                 "log_dict", "log_artifacts", "log_artifact", "log_text", "log_table",
                 "set_tag", "set_tags", "get_artifact_uri", "set_tracking_uri",
                 "set_experiment", "log_input", "log_inputs", "register_model",
                 "search_runs", "get_run"):
        if hasattr(mlflow, name):
            setattr(mlflow, name, timed("mlflow", name, getattr(mlflow, name)))


@after_import("mlflow.data")
def wrap_mlflow_data(module) -> None:
    module.from_pandas = timed("mlflow", "data.from_pandas", module.from_pandas)


@after_import("mlflow.artifacts")
def wrap_mlflow_artifacts(module) -> None:
    module.download_artifacts = timed("mlflow", "download_artifacts", module.download_artifacts)


@after_import("prefect.server.api.server")
def wrap_prefect_server(module) -> None:
    """Prefect's own temporary server, where it starts one (the CLI normally starts it)."""
    for name in ("start", "stop"):
        setattr(module.SubprocessASGIServer, name,
                timed("prefect_api", f"server.{name}",
                      getattr(module.SubprocessASGIServer, name)))


@after_import("flows.prefect_api")
def wrap_temporary_api(module) -> None:
    """The CLI's early start of the temporary API: what the run waits for is ``ready`` (the
    server boots meanwhile, in its own process) and ``stop`` at exit."""
    for name in ("_start", "ready", "stop"):
        setattr(module.TemporaryAPI, name,
                timed("prefect_api", f"server.{name}", getattr(module.TemporaryAPI, name)))


def wrap_stages() -> None:
    # sft, reward and policy are looked up by name (``tasks.launch.stage_function``); the
    # other stages' tasks wrap their function directly, so the task's ``fn`` is wrapped (the
    # feedback round also calls ``run_validation`` by name). ``functools.wraps`` keeps the
    # name, module and signature that Prefect and the cache keys read.
    def wrap_function(stage, name):
        return lambda mod: setattr(mod, name, timed("stage", stage, getattr(mod, name)))

    def wrap_task(stage, name):
        def wrap(mod):
            stage_task = getattr(mod, name)
            stage_task.fn = timed("stage", stage, stage_task.fn)
        return wrap

    for stage, target in {"validation": "tasks.validation:run_validation",
                          "sft": "tasks.sft:run_sft", "reward": "tasks.reward:run_reward",
                          "policy": "tasks.policy:run_policy"}.items():
        module, name = target.split(":")
        after_import(module)(wrap_function(stage, name))
    for stage, target in {"validation": "tasks.validation:validation_task",
                          "evaluate": "tasks.evaluate:evaluate_task",
                          "gate": "tasks.gate:gate_task",
                          "report": "tasks.report:report_task"}.items():
        module, name = target.split(":")
        after_import(module)(wrap_task(stage, name))

    @after_import("tasks.cache")
    def wrap_cache_keys(cache):
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
    wrap_stages()
    captured = {}

    @after_import("flows.pipeline")
    def wrap_flow(module) -> None:
        flow = module.rlhf_pipeline

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

        module.rlhf_pipeline = run_flow  # cmd_run imports it from the module at call time

    # The CLI (it sets Prefect's settings in the environment before Prefect loads them);
    # everything else is wrapped as it is imported.
    from flows import cli

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
