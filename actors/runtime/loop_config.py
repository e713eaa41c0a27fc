"""What the train loop (runtime/loop.py) is told and what it reports: its settings, the refill of
short steps, one step's prepared arrays, the result."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
from stillroom.actors.algo.objectives import NllObjective, Objective
from stillroom.actors.roles.generator import SamplingParams

Prepare = Callable[[pa.RecordBatch], tuple[dict[str, np.ndarray], dict[str, float]]]


@dataclass(frozen=True)
class Refill:
    """Top a step up from further generations, as DAPO's dynamic sampling does: while prepare yields
    fewer than per_prompt trainer rows per prompt of the step's batch, generate
    `prompts(step_batch, round)` (a prompt batch with an id of its own, deterministic, so a restart
    replays it from the journal) and prepare everything the step drew together; at most `rounds`
    prompt batches per step, the first included."""

    per_prompt: float
    rounds: int
    prompts: Callable[[pa.RecordBatch, int], pa.RecordBatch]


@dataclass
class Prepared:
    """One step's trainer arrays, from one scored batch or several (a refill)."""

    batch_id: str
    arrays: dict[str, np.ndarray]
    metrics: dict[str, float]
    versions: list[int]  # the policy versions that generated it (staleness)


@dataclass(frozen=True)
class LoopConfig:
    # scored batch -> (trainer arrays, metrics): where advantages are computed (GRPO) or samples filtered.
    prepare: Prepare
    sampling: SamplingParams = field(default_factory=SamplingParams)
    objective: Objective = field(default_factory=NllObjective)
    num_iterations: int = 1  # optimizer steps per generated batch (old log-probs kept)
    # With weight syncs: generation runs at most this many policy versions ahead of training
    # (0: synchronous). None: only the queues bound it.
    max_staleness: int | None = None
    # Without weight syncs (distillation): generation runs at most this many batches ahead of
    # training; 0 alternates them, the fastest when the roles share a few cores. None: the queues.
    max_ahead: int | None = None
    sync_every: int = 1
    # When prepare leaves a step short (dynamic sampling's zero-variance groups, distillation's
    # filters): more prompts for it, until it holds refill.rows rows.
    refill: Refill | None = None
    checkpoint_every: int = 1
    queue_size: int = 4
    max_trainer_restarts: int = 2
    max_role_restarts: int = 2  # per role (generators, scorers): Ray's own max_restarts for them
    restart_timeout_s: float = 300.0  # how long a restarted generator or scorer may take to come back
    poll_s: float = 1.0  # how often the train loop checks on cancellation and its producers while waiting
    metrics_every_s: float = 2.0  # how often the queues' depths are sampled into their gauges


@dataclass
class LoopResult:
    trained: list[str] = field(default_factory=list)  # batch ids, in training order (replays included)
    steps: list[dict] = field(default_factory=list)  # one per step trained, those with no rows too
    skipped: list[str] = field(default_factory=list)  # batch ids of the steps with no rows: no update
    syncs: list[float] = field(default_factory=list)  # seconds per weight sync
    trainer_restarts: int = 0
    role_restarts: dict[str, int] = field(default_factory=dict)  # generator / scorer deaths recovered
    replayed: int = 0  # batches taken from the journal instead of generated
    duplicates_dropped: int = 0
