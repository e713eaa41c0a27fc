"""Train to an outcome (`distill.until`): the distill stage trains in chunks of eval_every steps,
measures the student on held-out prompts after each (its KL to the teacher, or a reward's mean over
its greedy answers), and stops once `patience` evaluations in a row have not beaten the best by
more than min_delta of it (plateau), or at max_steps (budget). With optim.max_steps or epochs set
instead, the stage trains exactly that many steps (steps).

    Until.of(params, steps_per_pass) -> train_until(run_chunk, measure, until, total, start, ctx)

The teacher labels the prompts once (the first pass); further passes replay its journal. The
history of evaluations is kept in a file beside the checkpoints, so a restarted stage that resumes
from a checkpoint goes on counting where it left off.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from stillroom.v1 import job_pb2 as pb

KL = "kl"
PLATEAU, BUDGET, STEPS = "plateau", "budget", "steps"
DEFAULT_PASSES, MAX_EVAL_EVERY = 10, 50


@dataclass(frozen=True)
class Until:
    metric: str  # "kl" (lower is better) or a reward's name (higher is better)
    patience: int
    max_steps: int
    eval_every: int
    min_delta: float

    @classmethod
    def of(cls, p: pb.DistillStage, per_pass: int) -> Until | None:
        """The stage's stopping rule, its defaults filled in for a pass of `per_pass` steps; None
        when optim sets max_steps or epochs (a fixed number of steps) and `until` is not set."""
        if not p.HasField("until") and (p.optim.max_steps or p.optim.epochs):
            return None
        u = p.until
        return cls(
            u.metric or KL,
            u.patience or 2,
            u.max_steps or DEFAULT_PASSES * per_pass,
            u.eval_every or max(1, min(per_pass, MAX_EVAL_EVERY)),
            u.min_delta if u.min_delta else 0.01,
        )

    @property
    def lower_is_better(self) -> bool:
        return self.metric == KL


@dataclass
class Plateau:
    """The evaluations so far and whether to stop: `patience` in a row without an improvement of
    more than min_delta (relative to the best; any rise above a best of 0 counts)."""

    until: Until
    history: list[tuple[int, float]] = field(default_factory=list)  # (step, value)

    def improved(self, value: float, best: float) -> bool:
        gain = (best - value) if self.until.lower_is_better else (value - best)
        return gain > self.until.min_delta * abs(best)

    def best(self) -> tuple[int, float] | None:
        best = None
        for step, value in self.history:
            if not math.isnan(value) and (best is None or self.improved(value, best[1])):
                best = (step, value)
        return best

    def since_best(self) -> int:
        """Evaluations after the best one (0: the last evaluation was the best)."""
        best = self.best()
        return len(self.history) - 1 - self.history.index(best) if best else len(self.history)

    def add(self, step: int, value: float) -> bool:
        """Record an evaluation; True when training should stop."""
        self.history.append((step, value))
        return self.since_best() >= self.until.patience


def load_history(path: Path, upto: int) -> list[tuple[int, float]]:
    """The evaluations a previous attempt recorded, up to the checkpoint it resumes from."""
    if not path.exists():
        return []
    return [(int(s), float(v)) for s, v in json.loads(path.read_text()) if s <= upto]


def train_until(
    run_chunk: Callable[[int, int], None],
    measure: Callable[[], float],
    until: Until,
    start: int,
    report: Callable[[dict[str, float]], None],
    history_file: Path,
    evaluated_at: Callable[[Plateau], None] = lambda plateau: None,
) -> tuple[str, Plateau]:
    """run_chunk(done, end) trains steps done..end-1; measure() the held-out value after it. Every
    eval_every steps from `start` (a resumed cursor) until plateau or max_steps. Returns the stop
    reason and the evaluations; each is reported as eval/<metric> at its step, then handed to
    evaluated_at (the stage prunes its checkpoints there)."""
    plateau = Plateau(until, load_history(history_file, start))
    done = start
    if not plateau.history:  # the student before any training: the baseline of the first comparison
        plateau.add(done, evaluated(measure, until, done, report))
    while done < until.max_steps:
        end = min((done // until.eval_every + 1) * until.eval_every, until.max_steps)
        run_chunk(done, end)
        done = end
        stop = plateau.add(done, evaluated(measure, until, done, report))
        history_file.parent.mkdir(parents=True, exist_ok=True)
        history_file.write_text(json.dumps(plateau.history))
        evaluated_at(plateau)
        if stop:
            return PLATEAU, plateau
    return BUDGET, plateau


def evaluated(measure: Callable[[], float], until: Until, step: int, report) -> float:
    value = measure()
    report({f"eval/{until.metric}": value, "step": float(step)})
    return value


def stop_message(reason: str, plateau: Plateau | None, steps: int) -> str:
    """What the stage says about why it stopped (its stop_reason event)."""
    if reason == STEPS or plateau is None:
        return f"stop_reason={STEPS}: trained the {steps} steps optim.max_steps / epochs set"
    u, best = plateau.until, plateau.best()
    where = f"best held-out {u.metric} {best[1]:.4g} at step {best[0]}" if best else f"no held-out {u.metric}"
    if reason == PLATEAU:
        return (
            f"stop_reason={PLATEAU}: held-out {u.metric} did not improve by more than {u.min_delta:g} of its best "
            f"in {u.patience} evaluations (every {u.eval_every} steps); {where}; {steps} steps"
        )
    improving = "still improving" if best and best[0] == steps else "its last evaluation no better than the best"
    return f"stop_reason={BUDGET}: reached until.max_steps {u.max_steps}, {improving}; {where}"
