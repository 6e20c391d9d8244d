"""``rlhf``: run the pipeline, validate data, or show the config.

    rlhf run      [--config FILE] [--set stage.field=value ...]
    rlhf validate [--config FILE] [--set ...]
    rlhf config   [--config FILE] [--set ...] [--docs]

Exit codes: 0 success, 2 bad config or refused data (nothing trained), 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# Before anything imports prefect (it reads settings once): the temporary API's telemetry
# writes harmless "database is locked" errors on SQLite, and its 20 s default startup
# timeout is too short for a first start on a busy 2-core machine (~12 s when idle).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from flows.config import DEFAULT_CONFIG, ConfigError, PipelineConfig, load_config  # noqa: E402


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
    from flows.pipeline import rlhf_pipeline

    out = rlhf_pipeline(cfg)
    print(json.dumps({"result": out.result, "parent_run_id": out.parent_run_id,
                      "tracking_uri": out.tracking_uri, "reasons": out.decision.reasons,
                      "metrics": out.metrics}, indent=2))
    if out.registration is not None:
        r = out.registration
        print(f"registered {r.policy_name} version {r.policy_version} "
              f"with aliases {', '.join(r.aliases)}")
    else:
        print("gate refused promotion: feedback round needed (reasons above)")
    return 0


def cmd_validate(cfg: PipelineConfig) -> int:
    from tasks.validation import run_validation

    result = run_validation(cfg.validation, data=cfg.data.model_dump(),
                            tokenizer_path=cfg.base_model.path,
                            chat_template=cfg.base_model.chat_template,
                            out_dir=os.path.join(cfg.output_dir, cfg.name), ctx=None)
    print(json.dumps(result.model_dump(mode="json"), indent=2, default=str))
    print("all datasets passed validation")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlhf", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in (("run", "run the whole pipeline"),
                        ("validate", "validate the datasets only"),
                        ("config", "print the resolved config")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--config", default=DEFAULT_CONFIG, help=f"YAML file (default {DEFAULT_CONFIG})")
        p.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="STAGE.FIELD=VALUE", help="override one field (repeatable)")
        if name == "config":
            p.add_argument("--docs", action="store_true", help="list every field with its doc")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.command == "config":
        if args.docs:
            print("\n".join(field_docs(PipelineConfig)))
        else:
            import yaml

            print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        return 0
    from dataio import DataError
    from tasks.validation import DataValidationError

    try:
        return cmd_run(cfg) if args.command == "run" else cmd_validate(cfg)
    except (DataValidationError, DataError) as e:
        print(f"error: data refused before training:\n{e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
