"""The live line of each running stage that `stillroom watch` shows: steps done of total, the rate,
the time left, and the latest loss or reward, from the job's own events (their times, not the
clock's, so a watch that starts late or reconnects shows the same numbers).

    view = ProgressView()
    line = view.update(event)   # the stage's line after a progress or metrics event, else None
"""

from __future__ import annotations

from dataclasses import dataclass, field

from stillroom.v1 import job_pb2 as pb

# The figure a line shows, the first of these a stage reports (TRL's names first).
HEADLINE = ("loss", "train/loss", "reward", "eval/loss", "distill/loss", "kl")


@dataclass
class _Stage:
    unit: str = ""
    done: int = 0
    total: int = 0
    first: tuple[float, int] | None = None  # (time, done) of its first progress event
    last_time: float = 0.0
    figures: dict[str, float] = field(default_factory=dict)


class ProgressView:
    def __init__(self) -> None:
        self.stages: dict[str, _Stage] = {}

    def update(self, event: pb.Event) -> str | None:
        """Fold in one event; the line of its stage when the event changes it."""
        if event.type not in (pb.EVENT_TYPE_PROGRESS, pb.EVENT_TYPE_METRICS) or not event.stage:
            return None
        stage = self.stages.setdefault(event.stage, _Stage())
        now = event.time.ToNanoseconds() / 1e9
        if event.type == pb.EVENT_TYPE_PROGRESS:
            p = event.progress
            stage.unit, stage.done, stage.total, stage.last_time = p.unit, p.done, p.total, now
            stage.first = stage.first or (now, p.done)
        else:
            headline = [k for k in HEADLINE if k in event.metrics]
            if not headline:
                return None
            stage.figures[headline[0]] = event.metrics[headline[0]]
        return self.line(event.stage) if stage.total else None

    def line(self, name: str) -> str:
        """e.g. "sft  12/48 steps  2.10 steps/s  ETA 0:17  loss 0.532"."""
        s = self.stages[name]
        parts = [f"{name}  {s.done}/{s.total} {s.unit}"]
        rate = self.rate(name)
        if rate:
            parts.append(f"{rate:.2f} {s.unit}/s")
            if s.done < s.total:
                left = int(round((s.total - s.done) / rate))
                parts.append(f"ETA {left // 60}:{left % 60:02d}")
        parts += [f"{k} {v:.4g}" for k, v in list(s.figures.items())[-1:]]
        return "  ".join(parts)

    def rate(self, name: str) -> float:
        """Units per second since the stage's first progress event (0 until there are two)."""
        s = self.stages[name]
        if s.first is None or s.last_time <= s.first[0]:
            return 0.0
        return (s.done - s.first[1]) / (s.last_time - s.first[0])
