"""The live line of each running stage that `stillroom watch` shows: steps done of total, the rate,
the time left, and the latest headline figures, from the job's own events (their times, not the
clock's, so a watch that starts late or reconnects shows the same numbers).

    view = ProgressView()
    line = view.update(event)   # the stage's line after a progress or metrics event, else None

A stage may run phases one after another, each with its own progress unit (distill's student
"steps", then its labelled-only baseline's "baseline steps", whose metrics are named baseline/...):
the line shows the phase of the latest progress event, its own rate and its own figures.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from stillroom.v1 import job_pb2 as pb

# The figures a line shows: the first group a phase reports, best first. A GRPO step's loss says
# little (it hovers near 0 by construction); its reward and how many groups had none to learn from
# do, as TRL users watch them. Then the losses (TRL's names first) and the KL.
HEADLINES = (
    ("reward", "frac_reward_zero_std"),
    ("loss",),
    ("train/loss",),
    ("eval/loss",),
    ("distill/loss",),
    ("kl",),
)


@dataclass
class _Phase:
    done: int = 0
    total: int = 0
    first: tuple[float, int] | None = None  # (time, done) of its first progress event
    last_time: float = 0.0


@dataclass
class _Figures:
    rank: int = len(HEADLINES)  # the best headline group seen so far; worse ones are not shown
    values: dict[str, float] = field(default_factory=dict)


@dataclass
class _Stage:
    unit: str = ""  # the phase being shown: that of the latest progress event
    phases: dict[str, _Phase] = field(default_factory=dict)  # by unit
    figures: dict[str, _Figures] = field(default_factory=dict)  # by metric prefix ("" or "baseline/")


def prefix_of(unit: str) -> str:
    """The metric prefix of a phase: "baseline steps" -> "baseline/", "steps" -> ""."""
    head, _, _ = unit.rpartition(" ")
    return f"{head.replace(' ', '_')}/" if head else ""


class ProgressView:
    def __init__(self) -> None:
        self.stages: dict[str, _Stage] = {}

    def update(self, event: pb.Event) -> str | None:
        """Fold in one event; the line of its stage when the event changes it."""
        if event.type not in (pb.EVENT_TYPE_PROGRESS, pb.EVENT_TYPE_METRICS) or not event.stage:
            return None
        stage = self.stages.setdefault(event.stage, _Stage())
        if event.type == pb.EVENT_TYPE_PROGRESS:
            p, now = event.progress, event.time.ToNanoseconds() / 1e9
            stage.unit = p.unit
            phase = stage.phases.setdefault(p.unit, _Phase())
            phase.done, phase.total, phase.last_time = p.done, p.total, now
            phase.first = phase.first or (now, p.done)
        elif prefix_of(stage.unit) not in fold_metrics(stage.figures, event.metrics):
            return None  # nothing the shown phase headlines
        shown = stage.phases.get(stage.unit)
        return self.line(event.stage) if shown and shown.total else None

    def line(self, name: str) -> str:
        """e.g. "sft  12/48 steps  2.10 steps/s  ETA 0:17  loss 0.532"."""
        s = self.stages[name]
        phase = s.phases[s.unit]
        parts = [f"{name}  {phase.done}/{phase.total} {s.unit}"]
        rate = self.rate(name)
        if rate:
            parts.append(f"{rate:.2f} {s.unit}/s")
            if phase.done < phase.total:
                left = int(round((phase.total - phase.done) / rate))
                parts.append(f"ETA {left // 60}:{left % 60:02d}")
        figures = s.figures.get(prefix_of(s.unit), _Figures())
        parts += [f"{k} {v:.4g}" for k, v in figures.values.items()]
        return "  ".join(parts)

    def rate(self, name: str) -> float:
        """Units per second of the shown phase since its first progress event (0 until there are two)."""
        s = self.stages[name]
        phase = s.phases.get(s.unit)
        if phase is None or phase.first is None or phase.last_time <= phase.first[0]:
            return 0.0
        return (phase.done - phase.first[1]) / (phase.last_time - phase.first[0])


def fold_metrics(figures: dict[str, _Figures], metrics) -> set[str]:
    """Fold a metrics event into each phase's figures (by prefix: "" and every "<name>/" its keys
    carry); returns the prefixes whose figures changed. A phase keeps its best headline group."""
    changed = set()
    for prefix in {""} | {k.split("/", 1)[0] + "/" for k in metrics if "/" in k}:
        group = next(((i, g) for i, g in enumerate(HEADLINES) if prefix + g[0] in metrics), None)
        mine = figures.setdefault(prefix, _Figures())
        if group is None or group[0] > mine.rank:
            continue
        rank, keys = group
        if rank < mine.rank:
            mine.rank, mine.values = rank, {}
        mine.values.update({prefix + k: metrics[prefix + k] for k in keys if prefix + k in metrics})
        changed.add(prefix)
    return changed
