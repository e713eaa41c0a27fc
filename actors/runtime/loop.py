"""generate -> score -> train through bounded queues: the loop that GRPO and distillation build on.

    prompts --q--> Generator x n --q--> RewardScorer x m --q--> train loop (Trainer group x k)
                         ^------------------- weight sync ----------------------------'

The train loop runs here (in the supervisor): it takes scored batches in batch-id order (so the
data cursor means the same thing after a restart), shards each across the trainer ranks, syncs
weights to the generators and checkpoints every few steps. A trainer that dies is replaced, with
its whole group, from the newest complete checkpoint; batches trained since then are trained again
from memory, and what the teacher generated is replayed from the journal, never regenerated.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import ray
from ray.exceptions import RayActorError
from ray.util.queue import Empty, Queue
from stillroom.actors.algo.objectives import NllObjective, Objective
from stillroom.actors.roles.generator import SamplingParams
from stillroom.actors.runtime.batches import BATCH_ID, batch_id, replay_of
from stillroom.actors.runtime.channels import END, Channel, Seen
from stillroom.actors.runtime.cluster import RoleGroup
from stillroom.actors.runtime.journal import Journal
from stillroom.actors.runtime.metrics import record
from stillroom.actors.runtime.trainers import resume, save_checkpoint, train_step, weights

Prepare = Callable[[pa.RecordBatch], tuple[dict[str, np.ndarray], dict[str, float]]]


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
    checkpoint_every: int = 1
    queue_size: int = 4
    max_trainer_restarts: int = 2
    poll_s: float = 1.0  # how often the train loop checks on cancellation and its producers while waiting


@dataclass
class LoopResult:
    trained: list[str] = field(default_factory=list)  # batch ids, in training order (replays included)
    steps: list[dict] = field(default_factory=list)
    syncs: list[float] = field(default_factory=list)  # seconds per weight sync
    trainer_restarts: int = 0
    replayed: int = 0  # batches taken from the journal instead of generated
    duplicates_dropped: int = 0


class TrainLoop:
    def __init__(
        self,
        roles: RoleGroup,
        trainer_spec,
        journal: Journal,
        cfg: LoopConfig,
        on_metrics: Callable[[dict], None] = lambda m: None,
        cancelled: Callable[[], bool] = lambda: False,
    ):
        self.roles, self.trainer_spec, self.journal, self.cfg = roles, trainer_spec, journal, cfg
        self.on_metrics, self.cancelled = on_metrics, cancelled
        self.prompts = Channel(Queue(maxsize=cfg.queue_size))
        self.rollouts = Channel(Queue(maxsize=cfg.queue_size))
        self.scored = Channel(Queue(maxsize=cfg.queue_size))
        self.result = LoopResult()
        self.producers: list = []
        self._synced = threading.Condition()
        self._synced_steps = 0  # training steps whose weights the generators have (without syncs: done)
        self._cursor = 0

    def run(self, prompt_batches: list[pa.RecordBatch]) -> LoopResult:
        """Train on every batch, in order; returns what happened."""
        start = self.start_trainers()
        todo = prompt_batches[start:]
        generators, scorers = self.roles.actors["generator"], self.roles.actors["scorer"]
        if self.cfg.sync_every:
            self._sync_weights()
        loops = [
            g.serve.remote(self.prompts, self.rollouts, self.cfg.sampling, str(self.journal.root)) for g in generators
        ]
        scoring = [s.serve.remote(self.rollouts, self.scored) for s in scorers]
        self.producers = loops + scoring
        threading.Thread(target=self._feed, args=(todo, loops, len(scorers)), daemon=True).start()
        pending: dict[str, pa.RecordBatch] = {}
        seen, since_checkpoint = Seen(), []
        for i, expected in enumerate(batch_id(b) for b in todo):
            while expected not in pending:
                batch = self._next_scored()
                if seen.fresh(batch_id(batch)):
                    pending[batch_id(batch)] = batch
            since_checkpoint.append(pending.pop(expected))
            since_checkpoint = self._train(since_checkpoint, cursor=start + i + 1)
        ray.get(loops + scoring)
        self.result.duplicates_dropped = seen.dropped
        return self.result

    # -- feeding --------------------------------------------------------------------------------

    def _feed(self, todo: list[pa.RecordBatch], loops: list, scorers: int) -> None:
        """Prompts to the generators, or the journal's copy straight to the scorers; then END.
        A batch marked as a replay (another epoch over the teacher's output) waits for its source
        to be journaled and is never generated."""
        for i, batch in enumerate(todo):
            self._wait_for_policy(i)
            source = replay_of(batch)
            while source and not self.journal.has(source) and not self.cancelled():
                time.sleep(self.cfg.poll_s / 10)
            if self.journal.has(source or batch_id(batch)):
                written = self.journal.read(source or batch_id(batch))
                self.rollouts.put(written.replace_schema_metadata({BATCH_ID: batch_id(batch).encode()}))
                self.result.replayed += 1
            else:
                self.prompts.put(batch)
        for _ in loops:
            self.prompts.put(END)
        ray.wait(loops, num_returns=len(loops), timeout=None)
        for _ in range(scorers):
            self.rollouts.put(END)

    def _wait_for_policy(self, i: int) -> None:
        """Hold batch i back until the generators have the weights of step i - max_staleness
        (without syncs: until step i - max_ahead is trained)."""
        lead = self.cfg.max_staleness if self.cfg.sync_every else self.cfg.max_ahead
        if lead is None:
            return
        with self._synced:
            self._synced.wait_for(lambda: self._synced_steps >= i - lead or self.cancelled())

    def _next_scored(self) -> pa.RecordBatch:
        while True:
            if self.cancelled():
                raise InterruptedError("cancelled")
            try:
                return self.scored.get(timeout=self.cfg.poll_s)
            except Empty:
                done, _ = ray.wait(self.producers, num_returns=len(self.producers), timeout=0)
                ray.get(done)  # a generator or scorer loop that failed raises its error here
                if len(done) == len(self.producers):
                    raise RuntimeError("the generators and scorers finished, but a batch never arrived") from None
            record("queue_depth", self.rollouts.size(), self.roles.job_id, "rollouts")

    # -- training -------------------------------------------------------------------------------

    def _train(self, batches: list[pa.RecordBatch], cursor: int) -> list[pa.RecordBatch]:
        """Train on batches[-1]; the others were trained since the last checkpoint. If a trainer
        dies, restart the group from that checkpoint and train them all again. Returns the batches
        that no checkpoint covers yet."""
        replay: list[pa.RecordBatch] = []
        while True:
            try:
                for batch in [*replay, batches[-1]]:
                    self._step(batch)
                if self.cfg.sync_every and cursor % self.cfg.sync_every == 0:
                    self._sync_weights()
                elif not self.cfg.sync_every:
                    self._advance(len(self.result.trained))  # nothing to sync: the batch is done
                if cursor % self.cfg.checkpoint_every == 0:
                    save_checkpoint(self.roles.actors["trainer"], cursor)
                    return []
                return batches
            except RayActorError:
                if self.result.trainer_restarts >= self.cfg.max_trainer_restarts:
                    raise
                self.result.trainer_restarts += 1
                self._restart_trainers()
                replay = batches[:-1]

    def _step(self, batch: pa.RecordBatch) -> None:
        arrays, metrics = self.cfg.prepare(batch)
        if not arrays:  # nothing in this batch is worth learning from (e.g. every sample filtered out)
            self.result.trained.append(batch_id(batch))
            self.on_metrics(metrics)
            return
        step = train_step(self.roles.actors["trainer"], arrays, self.cfg.objective, self.cfg.num_iterations)
        step["batch_id"] = batch_id(batch)
        synced = self.cfg.sync_every and "policy_version" in batch.schema.names  # else there is no policy to lag
        versions = batch.column("policy_version").to_pylist() if synced else []
        staleness = len(self.result.steps) - float(np.mean(versions)) if versions else 0.0
        self.result.trained.append(step["batch_id"])
        self.result.steps.append(step)
        named = {k: v for k, v in step.items() if k not in ("batch_id", "tokens", "step_s", "step")}  # loss, kl, ...
        self.on_metrics(
            {
                **metrics,
                **named,
                "train/step": step["step"],
                "policy/staleness": staleness,
                "train/tokens_per_s": step["tokens"] / max(step["step_s"], 1e-9),
            }
        )

    def start_trainers(self) -> int:
        """Create the trainer group once; every rank resumes from the newest complete checkpoint.
        Returns the data cursor to continue from."""
        if "trainer" not in self.roles.actors:
            self._cursor = resume(self.roles.start("trainer", self.trainer_spec))
        return self._cursor

    def _restart_trainers(self) -> int:
        self.roles.stop("trainer")
        return self.start_trainers()

    def _advance(self, steps: int) -> None:
        """The generators may now run max_staleness batches past `steps`."""
        with self._synced:
            self._synced_steps = steps
            self._synced.notify_all()

    def _sync_weights(self) -> None:
        """Trainer -> generators: the adapter under LoRA, else full weights, as numpy copies."""
        started = time.perf_counter()
        trainers = self.roles.actors["trainer"]
        ref = ray.put(weights(trainers))
        version = len(self.result.steps)
        ray.get([g.load_weights.remote(ref, version) for g in self.roles.actors["generator"]])
        seconds = time.perf_counter() - started
        self._advance(len(self.result.steps))
        self.result.syncs.append(seconds)
        record("weight_sync_s", seconds, self.roles.job_id, "trainer")
        self.on_metrics({"sync/seconds": seconds, "policy/version": version})
