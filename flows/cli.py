"""``rlhf``: run the pipeline, validate data, show the config, promote, roll back, serve, label.

    rlhf run      [--config FILE] [--set stage.field=value ...]
                                                    if refused, feedback rounds (on_refusal)
    rlhf feedback [--config FILE] [--rounds N] [--set ...]
                                                    run; if refused, up to N feedback rounds
    rlhf validate [--config FILE] [--set ...]
    rlhf config   [--config FILE] [--set ...] [--docs]
    rlhf models   [--config FILE]                   policy versions, aliases, key metrics
    rlhf promote  VERSION --to ALIAS [--config FILE]
    rlhf rollback [--alias ALIAS] [--config FILE]   (default: the production alias)
    rlhf serve    [--alias ALIAS] [--port P] [--host H] [--poll-seconds S] [--config FILE]
                                                    bearer token: $RLHF_SERVE_TOKEN or printed
    rlhf label    BATCH [--annotator NAME] [--out LABELS] [--port P] [--host H] [--seed S]
                                                    the labeling page; needs no config
    rlhf label    BATCH --label-studio URL [--token-env VAR] [--title T] [--votes N]
                  [--out LABELS] [--seed S]         push the batch to Label Studio (once),
                                                    export its annotations as our labels
    rlhf schedule [--config FILE] [--set ...] [--pool P] [--only NAME] [--worker]
                                                    deploy deploy/prefect.yaml to PREFECT_API_URL
    rlhf ui       [--config FILE] [--port P] [--host H]
                                                    MLflow's UI on the tracking store; links
                                                    Prefect's UI when a server is configured

The registry commands read the tracking URI and registered names from the config.
Exit codes: 0 success, 2 bad config, refused data (nothing trained) or a registry request
that cannot be carried out (unknown version or alias, nothing to roll back to), 1 anything
else.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import sys

# Before anything imports prefect (it reads settings once): the temporary API's telemetry
# writes harmless "database is locked" errors on SQLite, and its 20 s default startup
# timeout is too short for a first start on a busy 2-core machine (~12 s when idle).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from typing import TYPE_CHECKING  # noqa: E402

from flows import DEFAULT_CONFIG, prefect_api  # noqa: E402  (both stdlib only)

if TYPE_CHECKING:
    from flows.config import PipelineConfig

# The config imports every stage module and Prefect (~1.5 s; the ML libraries only load when
# a stage runs): main() imports it after starting what can boot meanwhile (prefect_api).
FLOW_COMMANDS = ("run", "feedback")
"""Commands that run a Prefect flow (and so need a Prefect API)."""


def field_docs(model: type, prefix: str = "") -> list[str]:
    """One line per config field: dotted name, type, default and its docstring."""
    from pydantic import BaseModel

    lines = []
    for name, f in model.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            lines += field_docs(ann, f"{prefix}{name}.")
            continue
        default = "required" if f.is_required() else repr(f.get_default(call_default_factory=True))
        doc = (f.description or "").replace("\n", " ")
        lines.append(f"{prefix}{name} = {default}  # {doc}")
    return lines


def cmd_run(cfg: PipelineConfig) -> int:
    from flows.feedback import rounds_on_refusal
    from flows.pipeline import rlhf_pipeline

    out = rlhf_pipeline(cfg)
    print(json.dumps({"result": out.result, "parent_run_id": out.parent_run_id,
                      "tracking_uri": out.tracking_uri, "reasons": out.decision.reasons,
                      "metrics": out.metrics}, indent=2))
    if out.reused:
        print("reused (unchanged key): " + ", ".join(f"{stage} from run {run}"
                                                     for stage, run in out.reused.items()))
    if out.candidate is not None:
        c = out.candidate
        print(f"candidate: {c.policy_name} version {c.policy_version}"
              + (" (unchanged: existing version reused)" if c.reused else ""))
    if out.registration is not None:
        r = out.registration
        print(f"promoted {r.policy_name} version {r.policy_version}: "
              f"aliases {', '.join(r.aliases)}")
    elif rounds_on_refusal(cfg, out):
        print(f"gate refused promotion (failed: {', '.join(out.decision.failed)}): starting up "
              f"to {cfg.feedback.max_rounds} feedback rounds (feedback.on_refusal=round, "
              f"labeler {cfg.feedback.labeler})")
        return cmd_feedback(cfg, rounds=None, first=out)
    else:
        print("gate refused promotion: feedback round needed (reasons above; "
              "`rlhf feedback` starts one)")
    return 0


def cmd_feedback(cfg: PipelineConfig, rounds: int | None, first=None) -> int:
    """Feedback rounds after ``first`` (a refused pipeline result), or after a pipeline run."""
    from flows.feedback import feedback_rounds

    final, done = feedback_rounds(cfg, rounds=rounds, first=first)
    for i, r in enumerate(done, 1):
        v = r.checked.preferences
        print(f"round {i}: {v.new_rows} new pairs -> {v.uri} ({v.rows} pairs); "
              f"flagged annotators: {', '.join(r.checked.flagged) or 'none'}; "
              f"pipeline run {r.pipeline.parent_run_id}: {r.pipeline.result}")
    print(json.dumps({"result": final.result, "parent_run_id": final.parent_run_id,
                      "rounds": len(done), "round_run_ids": [r.round_run_id for r in done],
                      "reasons": final.decision.reasons}, indent=2))
    return 0


def cmd_validate(cfg: PipelineConfig) -> int:
    from tasks.outputs import OutputRoot
    from tasks.validation import run_validation

    # An s3:// output_dir: the report goes to the local scratch folder (a check, not a stage).
    result = run_validation(cfg.validation, data=cfg.data.model_dump(),
                            tokenizer_path=cfg.base_model.path,
                            chat_template=cfg.base_model.chat_template,
                            out_dir=str(OutputRoot.of(cfg.output_dir, cfg.name).local), ctx=None)
    print(json.dumps(result.model_dump(mode="json"), indent=2, default=str))
    print("all datasets passed validation")
    return 0


def _registry(cfg: PipelineConfig):
    from tasks.register import open_registry
    from tasks.tracking import tracking_uri

    return open_registry(cfg.registry, tracking_uri(cfg.tracking.uri))


def cmd_models(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    from release.registry import version_rows, versions_table

    registry = _registry(cfg)
    rows = version_rows(registry)
    print(versions_table(rows) if rows else
          f"no versions of {registry.policy_name} at {registry.tracking_uri}")
    return 0


def cmd_promote(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    alias = cfg.registry.known_alias(args.to)
    changes = _registry(cfg).move(args.version, [alias])
    print(f"{cfg.registry.policy_name}@{alias} -> version {args.version}"
          + ("" if changes else " (already)"))
    return 0


def cmd_rollback(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    alias = cfg.registry.known_alias(args.alias or cfg.registry.production_alias)
    old, new = _registry(cfg).rollback(alias)
    print(f"{cfg.registry.policy_name}@{alias}: version {old} -> version {new}")
    return 0


def _serve_until_stopped(serve, *args, suffix: str = "", **kwargs):
    """Run a server in the foreground with request logging; SIGTERM stops it as Ctrl-C does
    (the server closes; ``rlhf serve`` then removes its downloaded versions). Returns what
    ``serve`` returns, None when stopped. ``suffix`` follows the ready line (a generated
    token)."""
    import logging
    import signal

    from tasks.tracking import redact_logs

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    redact_logs()  # request logs quote paths and headers
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        return serve(*args, on_ready=lambda line: print(line + suffix, flush=True), **kwargs)
    except KeyboardInterrupt:
        return None


SERVE_TOKEN_ENV = "RLHF_SERVE_TOKEN"


def cmd_serve(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    import secrets

    from release.serve import serve
    from tasks.tracking import tracking_uri

    alias = cfg.registry.known_alias(args.alias or cfg.registry.production_alias)
    # A token you chose (shared with clients) is never printed; a generated one must be.
    token = os.environ.get(SERVE_TOKEN_ENV) or secrets.token_urlsafe(24)
    note = "" if os.environ.get(SERVE_TOKEN_ENV) else (
        f"\nbearer token: {token}   (generated; set {SERVE_TOKEN_ENV} to choose one)")
    serve_fn = functools.partial(serve, token=token)
    _serve_until_stopped(serve_fn, tracking_uri(cfg.tracking.uri), cfg.registry.policy_name,
                         alias, host=args.host, port=args.port, poll_seconds=args.poll_seconds,
                         suffix=note)
    return 0


def cmd_label_studio(args: argparse.Namespace) -> int:
    """Push the batch to Label Studio (the first time; later runs resume its project), export
    what has been annotated so far into our labels file and say how far it is."""
    from labeling.batch import read_batch
    from labeling.label_studio import (LabelStudio, project_title, pull_labels, push_batch,
                                       read_labels, token_from_env)
    from tasks.labelers import missing_votes

    client = LabelStudio(args.label_studio, token_from_env(args.token_env))
    project = push_batch(client, args.batch, title=project_title(args.title, args.batch),
                         votes=args.votes, seed=args.seed)
    out = pull_labels(client, project, args.batch, args.out)
    ids = [p.pair_id for p in read_batch(args.batch)]
    missing = missing_votes(ids, read_labels(out), project.votes)
    print(f"Label Studio project {project.project_id} ({project.title!r}): label at "
          f"{project.labeling_url}")
    print(f"{len(ids) - len(missing)}/{len(ids)} pairs have {project.votes} votes; "
          f"{len(read_labels(out))} labels -> {out}")
    return 0


def cmd_label(args: argparse.Namespace) -> int:
    from dataio import DataError
    from labeling.label_studio import LabelStudioError
    from labeling.server import serve

    if args.label_studio:
        try:
            return cmd_label_studio(args)
        except (DataError, LabelStudioError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    try:
        _serve_until_stopped(serve, args.batch, annotator=args.annotator, out=args.out,
                             host=args.host, port=args.port, seed=args.seed)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


SCHEDULE_FILE = "deploy/prefect.yaml"
SCHEDULE_POOL = "rlhf-local"


def deploy_spec(spec: dict, names: list[str], pool: str | None, params: dict | None) -> dict:
    """``deploy/prefect.yaml`` narrowed to ``names``, with the work pool and the run
    parameters (config path, overrides) filled in. ``prefect deploy --all`` ignores CLI
    options such as ``--params`` and ``--pool`` ("These options will be ignored"), and one
    ``prefect deploy --name`` per deployment would import the flows once each (~10 s here)."""
    import copy

    spec = copy.deepcopy(spec)
    spec["deployments"] = [d for d in spec.get("deployments") or [] if d["name"] in names]
    for d in spec["deployments"]:
        if params:
            d["parameters"] = {**(d.get("parameters") or {}), **params}
        if pool:
            d["work_pool"] = {**(d.get("work_pool") or {}), "name": pool}
    return spec


def ensure_process_pool(name: str) -> None:
    """Create a process work pool named ``name`` unless one exists (what `prefect work-pool
    create --type process` does; `--overwrite` would reset an existing pool's settings)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(
                name=name, type="process",
                base_job_template=ProcessWorker.get_default_base_job_template()))
            print(f"created process work pool {name}")


def cmd_schedule(args: argparse.Namespace) -> int:
    """Deploy the deployments of ``deploy/prefect.yaml`` (run from the repository root) with
    a config path and overrides as parameters, creating the process work pool if missing;
    with ``--worker``, then run a worker of that pool in the foreground."""
    import subprocess
    import tempfile

    import yaml

    from prefect.settings import get_current_settings

    api = get_current_settings().api.url  # PREFECT_API_URL, from the environment or a profile
    if not api:
        print("error: PREFECT_API_URL is not set. Schedules need a running Prefect server "
              "(the temporary one of `rlhf run` creates no scheduled runs): start one with "
              "`prefect server start`, then export "
              "PREFECT_API_URL=http://127.0.0.1:4200/api", file=sys.stderr)
        return 2
    try:
        spec = yaml.safe_load(open(args.prefect_file, encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        print(f"error: {args.prefect_file}: {e} (run from the repository root)", file=sys.stderr)
        return 2
    names = [d["name"] for d in spec.get("deployments") or []]
    unknown = sorted(set(args.only) - set(names))
    if unknown:
        print(f"error: {args.prefect_file}: no deployment named {', '.join(unknown)} "
              f"(it has {', '.join(names)})", file=sys.stderr)
        return 2
    params = None
    if args.config is not None or args.overrides:
        config = args.config or DEFAULT_CONFIG
        from flows.config import load_config

        load_config(config, args.overrides)  # refuse a bad config now, not at 2 a.m.
        params = {"config_path": config, "overrides": args.overrides}
    pool = args.pool or (spec["deployments"][0].get("work_pool") or {}).get("name") or SCHEDULE_POOL
    import httpx

    try:
        ensure_process_pool(pool)
    except httpx.HTTPError as e:  # a connection refused, or an error status from the server
        from dataio.uri import redact

        # PREFECT_API_URL may carry a user and password; the error quotes it.
        print(redact(f"error: Prefect server at {api}: {e}"), file=sys.stderr)
        return 1
    prefect = [sys.executable, "-m", "prefect"]
    # Entrypoints and the pull step's `pwd` are relative to the working directory (the
    # repository root), not to the file, so the filled-in copy can live anywhere.
    with tempfile.TemporaryDirectory() as tmp:
        filled = os.path.join(tmp, "prefect.yaml")
        with open(filled, "w", encoding="utf-8") as f:
            yaml.safe_dump(deploy_spec(spec, args.only or names, args.pool, params), f,
                           sort_keys=False)
        cmd = prefect + ["--no-prompt", "deploy", "--all", "--prefect-file", filled]
        if subprocess.run(cmd).returncode:
            print(f"error: prefect deploy of {args.prefect_file} failed (output above)",
                  file=sys.stderr)
            return 1
    print(f"deployed {', '.join(args.only or names)} from {args.prefect_file} to {api}; "
          f"work pool {pool}")
    if not args.worker:
        print(f"runs start when a worker polls the pool: rlhf schedule --worker, or "
              f"prefect worker start --pool {pool}")
        return 0
    sys.stdout.flush()
    os.execv(sys.executable, prefect + ["worker", "start", "--pool", pool])


def cmd_ui(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    from tasks.tracking import tracking_uri
    from tasks.ui import UiError, serve_ui

    try:
        code = _serve_until_stopped(serve_ui, tracking_uri(cfg.tracking.uri),
                                    cfg.tracking.experiment, host=args.host, port=args.port)
    except UiError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return code or 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {}
    for name, help_ in (("run", "run the whole pipeline"),
                        ("feedback", "run the pipeline; if refused, run feedback rounds"),
                        ("validate", "validate the datasets only"),
                        ("config", "print the resolved config"),
                        ("models", "list the policy's registry versions, aliases and metrics"),
                        ("promote", "point an alias at a policy version"),
                        ("rollback", "point an alias back at the version it named before"),
                        ("serve", "serve the version an alias names; follows the alias"),
                        ("ui", "MLflow's UI on the tracking store (and where Prefect's is)")):
        p = commands[name] = sub.add_parser(name, help=help_)
        p.add_argument("--config", default=DEFAULT_CONFIG, help=f"YAML file (default {DEFAULT_CONFIG})")
        p.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="STAGE.FIELD=VALUE", help="override one field (repeatable)")
    commands["config"].add_argument("--docs", action="store_true",
                                    help="list every field with its doc")
    commands["promote"].add_argument("version", help="policy version number")
    commands["promote"].add_argument("--to", required=True, metavar="ALIAS",
                                     help="candidate, staging or production (as configured)")
    for name in ("rollback", "serve"):
        commands[name].add_argument("--alias", default=None,
                                    help="alias to act on (default: registry.production_alias)")
    commands["feedback"].add_argument(
        "--rounds", type=int, default=None, metavar="N",
        help="feedback rounds at most, stopping at promotion (default feedback.max_rounds)")
    serve_args = commands["serve"]
    serve_args.add_argument("--host", default="127.0.0.1",
                            help="interface to bind (default 127.0.0.1); requests need "
                                 "Authorization: Bearer $RLHF_SERVE_TOKEN (or the token printed)")
    serve_args.add_argument("--port", type=int, default=8080, help="port (0: any free one)")
    serve_args.add_argument("--poll-seconds", type=float, default=10.0,
                            help="how often to check whether the alias moved (default 10)")
    ui_args = commands["ui"]
    ui_args.add_argument("--host", default="127.0.0.1",
                         help="interface for mlflow server (default 127.0.0.1; no authentication)")
    ui_args.add_argument("--port", type=int, default=5000,
                         help="port (default 5000, MLflow's; 0: any free one)")
    from labeling import label_studio as ls  # stdlib only: cheap at parser time

    label = sub.add_parser("label", help="label pairs of a batch in the browser")
    label.add_argument("batch", help="JSONL file of {pair_id, prompt, response_a, response_b}")
    label.add_argument("--annotator", default=os.environ.get("USER") or "annotator",
                       help="annotator_id written with each label (default $USER)")
    label.add_argument("--out", default=None, metavar="LABELS",
                       help="labels JSONL file (default BATCH's stem + .labels.jsonl); "
                            "the same file again resumes")
    label.add_argument("--host", default="127.0.0.1",
                       help="interface to bind (default 127.0.0.1; token-protected, no TLS)")
    label.add_argument("--port", type=int, default=8000, help="port (0: any free one)")
    label.add_argument("--seed", type=int, default=0,
                       help="seed of which response is shown on the left (default 0)")
    label.add_argument("--label-studio", default=None, metavar="URL",
                       help="label in the Label Studio at URL instead of the page: push the "
                            "batch as a project (once), export its annotations to LABELS "
                            "(default BATCH's stem + .label-studio.labels.jsonl)")
    label.add_argument("--token-env", default=ls.DEFAULT_TOKEN_ENV, metavar="VAR",
                       help="environment variable holding the Label Studio token "
                            "(default LABEL_STUDIO_API_KEY)")
    label.add_argument("--title", default=ls.DEFAULT_TITLE,
                       help="Label Studio project title; the batch's folder name is appended")
    label.add_argument("--votes", type=int, default=3,
                       help="annotations per pair Label Studio asks for (default 3)")
    sched = sub.add_parser("schedule", help="deploy the recurring runs of deploy/prefect.yaml "
                                            "to PREFECT_API_URL; --worker also runs a worker")
    sched.add_argument("--config", default=None,
                       help="config path the runs use, relative to the repository root "
                            "(default: the prefect.yaml's parameters, configs/demo.yaml)")
    sched.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="STAGE.FIELD=VALUE", help="override one field in every run")
    sched.add_argument("--prefect-file", default=SCHEDULE_FILE,
                       help=f"deployments file (default {SCHEDULE_FILE})")
    sched.add_argument("--only", action="append", default=[], metavar="NAME",
                       help="deploy only this deployment (nightly, weekly; repeatable)")
    sched.add_argument("--pool", default=None,
                       help=f"process work pool (default the file's, {SCHEDULE_POOL}); "
                            "created if missing")
    sched.add_argument("--worker", action="store_true",
                       help="after deploying, run a worker of the pool in the foreground")
    return parser


def run_flow_command(args: argparse.Namespace, cfg: PipelineConfig,
                     api: prefect_api.TemporaryAPI | None) -> int:
    """``run`` or ``feedback``, on the Prefect API ``api`` (started by ``main``; None: the one
    Prefect's settings name, or Prefect's own temporary one)."""
    import flows.feedback  # noqa: F401  (imported before the objects are frozen below)
    import flows.pipeline  # noqa: F401
    from tasks.report import load_plotting
    from tasks.tracking import open_store

    # What every run loads anyway, loaded while the server boots: MLflow and its stores (first
    # used by the parent run) and the report's plotting (used last).
    open_store(cfg.tracking.uri)
    load_plotting()
    # Everything imported so far lives until exit: freezing it spares each full garbage
    # collection from walking it, and the interpreter's exit too (~1 s of a re-run).
    gc.freeze()
    with prefect_api.serving(api):
        return cmd_run(cfg) if args.command == "run" else cmd_feedback(cfg, args.rounds)


REGISTRY_COMMANDS = {"models": cmd_models, "promote": cmd_promote, "rollback": cmd_rollback,
                     "serve": cmd_serve}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Prefect's temporary API boots on the other core while the stages are imported below.
    api = prefect_api.start_unless_configured() if args.command in FLOW_COMMANDS else None
    from flows.config import ConfigError, PipelineConfig, load_config

    if args.command == "label":
        return cmd_label(args)
    if args.command == "schedule":
        try:
            return cmd_schedule(args)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        if api is not None:
            api.stop()
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.command == "config":
        if args.docs:
            print("\n".join(field_docs(PipelineConfig)))
        else:
            import yaml

            print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        return 0
    if args.command == "ui":
        return cmd_ui(cfg, args)
    if args.command in REGISTRY_COMMANDS:
        from release.aliases import RegistryError

        try:
            return REGISTRY_COMMANDS[args.command](cfg, args)
        except RegistryError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    from dataio import DataError
    from tasks.validation import DataValidationError

    try:
        if args.command == "validate":
            return cmd_validate(cfg)
        return run_flow_command(args, cfg, api)
    except (DataValidationError, DataError) as e:
        print(f"error: data refused before training:\n{e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
