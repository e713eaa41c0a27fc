"""A job's report, rendered from its events alone: per stage, PNG plots of loss, reward and KL
against step; the evaluation table; the audit summary; stage states and durations; as Markdown.

Pure (events in, files out; matplotlib, no torch, no grpc), so the supervisor writes it into the
job's artifacts when the job ends and the CLI renders the same thing client-side:

    stillroom report JOB_ID [--out DIR]
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from pathlib import Path

from stillroom.v1 import job_pb2 as pb

Series = dict[str, dict[str, list[tuple[float, float]]]]  # stage -> metric -> [(step, value)]

# What each plot panel shows: a metric belongs to the first panel one of whose patterns its name
# (lower-cased) matches (re.search: a plain word matches where the name contains it).
PANELS = {"loss": ("loss",), "reward": ("reward", "json_", "accuracy"), "KL": ("kl",)}
# A grpo stage's panels, one scale each, as TRL users read them: the mean reward (and each
# function's), its spread within groups, the fraction of groups with no signal, the KL to the
# reference, the clipped fractions. Exact names: the failure counters (rewards/samples,
# rewards/<fn>/errors...) would squash the reward into a flat line at the bottom of its axis.
GRPO_PANELS = {
    "reward": (r"^reward$", r"^rewards/[^/]+/mean$"),
    "reward_std": (r"^reward_std$",),
    "frac_reward_zero_std": (r"^frac_reward_zero_std$",),
    "KL": (r"^kl$",),
    "clip ratio": (r"^clip_ratio/",),
}
# The distill stage's second panel: what a student is judged by (held-out KL per evaluation, the
# fraction of teacher samples its filter kept, the retained quality), not counters.
DISTILL_PANELS = {
    "loss": ("loss",),
    "student vs teacher": ("eval/kl", "eval/", "kept_fraction", "retained/"),
}
STAGE_PANELS = {"distill": DISTILL_PANELS, "grpo": GRPO_PANELS}
EVAL_COLUMNS = ("json_exact", "json_fields", "json_valid", "tokens_per_s", "parameters", "size_bytes")


def step_of(e: pb.Event, done: dict[str, float]) -> float:
    """The step a metrics event belongs to: its own `step` or `train/step`, else its stage's
    progress so far (`done`, by stage; 0 before any)."""
    return e.metrics.get("step", e.metrics.get("train/step", done.get(e.stage, 0.0)))


def series(events: Iterable[pb.Event]) -> Series:
    """Every metric of every stage against its step: the metrics' own `step` or `train/step` when
    they carry one, else the stage's progress so far (0 before any)."""
    out: Series = {}
    done: dict[str, float] = {}
    for e in events:
        if e.type == pb.EVENT_TYPE_PROGRESS:
            done[e.stage] = float(e.progress.done)
        elif e.type == pb.EVENT_TYPE_METRICS:
            step = step_of(e, done)
            for name, value in e.metrics.items():
                out.setdefault(e.stage, {}).setdefault(name, []).append((step, value))
    return out


def evaluation(values: Series) -> dict[str, dict[str, float]]:
    """model -> metric -> value, from the evaluate stages' eval/<model>/<metric> metrics."""
    table: dict[str, dict[str, float]] = {}
    for metrics in values.values():
        for name, points in metrics.items():
            parts = name.split("/")  # eval/<rung>/<metric>, the metric perhaps retained/<metric>
            if len(parts) >= 3 and parts[0] == "eval":
                table.setdefault(parts[1], {})["/".join(parts[2:])] = points[-1][1]
    return table


def eval_table(report: dict[str, dict[str, float]]) -> str:
    """The side-by-side Markdown table: one row per model, the usual columns first; a metric with
    a 95% interval (<metric>/ci_low, /ci_high) shows it in its own cell: `0.62 [0.52, 0.71]`."""
    names = {k for r in report.values() for k in r}
    names -= {n for n in names if _interval_of(n) in names}
    columns = [c for c in EVAL_COLUMNS if c in names] + sorted(names - set(EVAL_COLUMNS))
    lines = ["| model | " + " | ".join(columns) + " |", "| --- |" + " --- |" * len(columns)]
    for model, r in report.items():
        lines.append(f"| {model} | " + " | ".join(_with_interval(c, r) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def _interval_of(name: str) -> str | None:
    """The metric whose interval bound `name` is (json_exact/ci_low -> json_exact), else None."""
    head, _, tail = name.rpartition("/")
    return head if tail in ("ci_low", "ci_high") and head else None


def _with_interval(column: str, row: dict[str, float]) -> str:
    low, high = row.get(column + "/ci_low"), row.get(column + "/ci_high")
    if column not in row or low is None or high is None or math.isnan(low) or math.isnan(high):
        return _cell(column, row.get(column))
    return f"{row[column]:.2f} [{low:.2f}, {high:.2f}]"


def _cell(column: str, value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if column == "size_bytes":
        return f"{value / 2**20:.1f} MiB"
    if column == "parameters":
        return f"{value / 1e6:.1f} M"
    if column == "tokens_per_s":
        return f"{value:.0f}"
    return f"{value:.3f}"


def panels_of(metrics: dict[str, list[tuple[float, float]]], kinds: dict = PANELS) -> dict[str, dict]:
    """title -> the curves it draws: each metric with two points or more in the first panel whose
    words its name contains; evaluation rows (eval/<rung>/<metric>) belong in the table."""
    panels = {title: {} for title in kinds}
    for name, points in metrics.items():
        if len(points) < 2 or (name.startswith("eval/") and name.count("/") >= 2):
            continue
        title = next((t for t, words in kinds.items() if any(re.search(w, name.lower()) for w in words)), None)
        if title:
            panels[title][name] = points
    return {t: m for t, m in panels.items() if m}


def plot_stage(stage: str, metrics: dict[str, list[tuple[float, float]]], path: Path, kinds: dict = PANELS) -> bool:
    """One PNG for a stage: a panel each for loss, reward and KL (those it has; a distill stage's:
    loss, and the student against its teacher; a grpo stage's: GRPO_PANELS), three to a row. False
    when the stage has none of them."""
    panels = panels_of(metrics, kinds)
    if not panels:
        return False
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on a cluster node
    import matplotlib.pyplot as plt

    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.5 * rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax, (title, curves) in zip(axes.flat, panels.items(), strict=False):  # axes past the panels stay hidden
        for name, points in sorted(curves.items()):
            ax.plot([s for s, _ in points], [v for _, v in points], marker=".", label=name)
        ax.set_title(f"{stage}: {title}")
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def stage_rows(events: Iterable[pb.Event]) -> list[tuple[str, str, float, str]]:
    """(stage, final state, seconds from RUNNING to its end, message) in the order stages ran."""
    started: dict[str, float] = {}
    rows: dict[str, tuple[str, str, float, str]] = {}
    for e in events:
        if e.type != pb.EVENT_TYPE_STAGE_STATE:
            continue
        t = e.time.seconds + e.time.nanos / 1e9
        if e.stage_state == pb.STAGE_STATE_RUNNING:
            started[e.stage] = t
        state = pb.StageState.Name(e.stage_state).removeprefix("STAGE_STATE_")
        rows[e.stage] = (e.stage, state, t - started.get(e.stage, t), e.message)
    return list(rows.values())


def audit_summary(spec: pb.JobSpec, values: Series) -> str:
    audits = [s.name for s in spec.stages if s.WhichOneof("kind") == "audit"]
    lines = []
    for name in audits:
        final = {k: v[-1][1] for k, v in values.get(name, {}).items()}
        lines += [f"### {name}", "", "| check | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.4g} |" for k, v in sorted(final.items())]
        lines.append("")
    return "\n".join(lines)


def render(job_id: str, spec: pb.JobSpec, events: list[pb.Event], out_dir: Path) -> Path:
    """Write out_dir/report.md and out_dir/plots/<stage>.png; returns the report's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    values = series(events)
    title = spec.display_name or job_id
    lines = [f"# {title}", "", f"Job `{job_id}`.", "", "## Stages", "", "| stage | state | seconds | message |"]
    lines.append("| --- | --- | --- | --- |")
    lines += [f"| {s} | {state} | {sec:.0f} | {msg} |" for s, state, sec, msg in stage_rows(events)]
    table = evaluation(values)
    if table:
        lines += ["", "## Evaluation (held-out split)", "", eval_table(table)]
    warned = [
        f"- {e.stage}: {e.message.removeprefix('warning: ')}" for e in events if e.message.startswith("warning: ")
    ]
    if warned:
        lines += ["", "## Warnings", "", *warned]
    audit = audit_summary(spec, values)
    if audit:
        lines += ["", "## Audit", "", audit]
    kinds = {s.name: STAGE_PANELS.get(s.WhichOneof("kind"), PANELS) for s in spec.stages}
    plots = [s for s in values if plot_stage(s, values[s], out_dir / "plots" / f"{s}.png", kinds.get(s, PANELS))]
    if plots:
        lines += ["", "## Training curves", ""]
        lines += [f"![{s}](plots/{s}.png)" for s in plots]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
