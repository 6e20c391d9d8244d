"""Run report: what one pipeline run measured, what the gate decided and why, what happens next.

``build_report`` is pure (typed results in, sections out) and renders to markdown and HTML;
``run_report`` is the side effect: it draws the training curves from the policy run's metric
history and logs ``report.md``, ``report.html`` and ``training_curves.png`` on the parent run,
plus the markdown as a Prefect artifact (visible in the Prefect UI beside the flow run).
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field

from prefect import task

from tasks.base import PolicyResult, TrackingContext
from tasks.evaluate import EvaluateResult
from tasks.gate import Decision


@dataclass
class Section:
    title: str
    lines: list[str] = field(default_factory=list)
    table: list[list[str]] = field(default_factory=list)  # header row first


def _f(value: float | None, fmt: str = ".3f") -> str:
    return "n/a" if value is None else format(value, fmt)


def build_report(name: str, result: str, decision: Decision, evaluation: EvaluateResult,
                 policy: PolicyResult, stage_metrics: dict[str, dict[str, float]],
                 next_step: str) -> list[Section]:
    """The report's sections, from the stages' typed results (no I/O)."""
    m = lambda key: evaluation.metrics.get(f"eval/{key}")  # noqa: E731
    def matched(suffix: str, prefix: str = "") -> str:
        pairs = m(f"{prefix}matched_pairs{suffix}")
        return f"{_f(m(f'{prefix}matched_win_rate{suffix}'))} ({_f(pairs, '.0f')})"

    outcome = Section("Outcome", [f"Pipeline `{name}`: **{result}**.", next_step])
    gate = Section("Gate", [f"- {r}" for r in decision.reasons])

    wins = Section("Win rates", [
        f"Share of {int(m('num_prompts') or 0)} held-out prompts where the candidate's responses "
        f"score higher on average (ties count half), with a {evaluation.judge} headline; "
        "intervals are percentile bootstraps over prompts; at equal length: the win rate over "
        "sample pairs whose lengths differ by at most 2 tokens (how many such pairs)."])
    wins.table.append(["judge", "against", "win rate", "interval", "at equal length"])
    for judge in ("gold", "heldout_rm", "rm"):
        if m(f"win_rate_{judge}") is not None:
            wins.table.append([judge, "SFT", _f(m(f"win_rate_{judge}")),
                               f"[{_f(m(f'win_rate_{judge}_lo'))}, {_f(m(f'win_rate_{judge}_hi'))}]",
                               matched(f"_{judge}")])
    if m("champion/win_rate") is not None:
        wins.table.append([evaluation.judge, f"production v{evaluation.champion_version}",
                           _f(m("champion/win_rate")),
                           f"[{_f(m('champion/win_rate_lo'))}, {_f(m('champion/win_rate_hi'))}]",
                           matched("", "champion/")])

    diag = Section("Reward hacking and capability", [
        "What the reward rewards, measured without a gold judge (see the gate's reasons)."])
    diag.table.append(["signal", "candidate", "SFT"])
    for label, key, fmt in (("response tokens", "len", ".1f"), ("repeated bigrams", "repetition",
                                                                 ".3f"),
                            ("distinct bigrams", "distinct2", ".3f"),
                            ("held-out SFT perplexity", "ppl", ".2f")):
        diag.table.append([label, _f(m(f"{key}_policy"), fmt), _f(m(f"{key}_sft"), fmt)])
    for judge in ("heldout_rm", "rm"):
        if m(f"{judge}_length_corr") is not None:
            diag.lines.append(f"- {judge} score vs length, Spearman: "
                              f"{_f(m(f'{judge}_length_corr'), '.2f')}")
    diag.lines.append(f"- KL(policy || SFT): {_f(m('kl_policy_sft'), '.2f')} nats per sequence")
    for key, label in (("reward/longer_preferred", "reward model"),
                       ("reward/heldout/longer_preferred", "held-out reward model")):
        if key in stage_metrics.get("reward", {}):
            diag.lines.append(f"- the {label} prefers the longer response of a held-out pair: "
                              f"{_f(stage_metrics['reward'][key], '.0%')}")

    training = Section("Training", [
        f"Policy optimiser `{policy.algorithm}`: {policy.steps} of {policy.planned_steps} steps"
        + (f", stopped early: {policy.stop_reason}" if policy.stop_reason else "") + ".",
        "![training curves](training_curves.png)"])
    stages = Section("Stage metrics")
    stages.table.append(["stage", "metric", "value"])
    for stage, metrics in stage_metrics.items():
        stages.table += [[stage, k, _f(v, ".4g")] for k, v in sorted(metrics.items())]
    return [outcome, gate, wins, diag, training, stages]


def to_markdown(sections: list[Section]) -> str:
    out = ["# RLHF pipeline run report"]
    for s in sections:
        out += ["", f"## {s.title}", *s.lines]
        if s.table:
            out += ["", "| " + " | ".join(s.table[0]) + " |",
                    "|" + "---|" * len(s.table[0])]
            out += ["| " + " | ".join(row) + " |" for row in s.table[1:]]
    return "\n".join(out) + "\n"


def to_html(sections: list[Section]) -> str:
    def line(text: str) -> str:
        if text.startswith("!["):  # the one image: ![alt](file)
            alt, src = text[2:].rstrip(")").split("](")
            return f'<img alt="{html.escape(alt)}" src="{html.escape(src)}" width="720">'
        text = html.escape(text.removeprefix("- "))
        return f"<p>{text.replace('**', '')}</p>"

    out = ["<!doctype html><meta charset='utf-8'><title>RLHF run report</title>",
           "<style>body{font-family:sans-serif;max-width:60em}td,th{padding:2px 8px;"
           "border-bottom:1px solid #ddd;text-align:left}</style>",
           "<h1>RLHF pipeline run report</h1>"]
    for s in sections:
        out += [f"<h2>{html.escape(s.title)}</h2>", *map(line, s.lines)]
        if s.table:
            head, *rows = s.table
            out.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head)
                       + "</tr>" + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>"
                                                             for c in r) + "</tr>" for r in rows)
                       + "</table>")
    return "\n".join(out) + "\n"


def load_plotting():
    """matplotlib's pyplot on its file-only backend (~0.4 s to import): the CLI loads it while
    Prefect's temporary API boots, so the report finds it loaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def training_curves(client, run_id: str, algorithm: str):
    """KL to SFT and reward score per update, from the policy run's metric history."""
    plt = load_plotting()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3))
    for ax, key in zip(axes, ("objective/kl", "objective/scores")):
        history = client.get_metric_history(run_id, f"{algorithm}/{key}")
        ax.plot([h.step for h in history], [h.value for h in history])
        ax.set_title(key)
        ax.set_xlabel("step")
    fig.tight_layout()
    return fig


def run_report(*, name: str, result: str, decision: Decision, evaluation: EvaluateResult,
               policy: PolicyResult, stage_metrics: dict[str, dict[str, float]], next_step: str,
               ctx: TrackingContext) -> str:
    """Log the report on the parent run (and as a Prefect artifact); returns the markdown."""
    from mlflow import MlflowClient
    from prefect.artifacts import create_markdown_artifact
    from prefect.context import FlowRunContext

    from dataio.uri import redact

    sections = build_report(name, result, decision, evaluation, policy, stage_metrics, next_step)
    # Reports quote reasons and paths that came from outside (gate reasons, stop reasons):
    # redact the rendered text, the last step before it is written anywhere.
    markdown = redact(to_markdown(sections))
    client = MlflowClient(ctx.tracking_uri)
    client.log_text(ctx.parent_run_id, markdown, "report/report.md")
    client.log_text(ctx.parent_run_id, redact(to_html(sections)), "report/report.html")
    fig = training_curves(client, policy.run_id, policy.algorithm)
    client.log_figure(ctx.parent_run_id, fig, "report/training_curves.png")
    fig.clf()
    if FlowRunContext.get() is not None:
        create_markdown_artifact(markdown=markdown, key="rlhf-run-report",
                                 description=f"Run report of pipeline {name}")
    return markdown


report_task = task(name="report")(run_report)
