"""generate -> score -> train through bounded queues: the loop that GRPO and distillation build on.

    prompts --q--> Generator x n --q--> RewardScorer x m --q--> train loop (Trainer group x k)
                         ^------------------- weight sync ----------------------------'

The train loop runs here (in the supervisor): it takes scored batches in batch-id order (so the
data cursor means the same thing after a restart), shards each across the trainer ranks, syncs
weights to the generators and checkpoints every few steps. A step that filters leave short is
refilled with further prompts (Refill); one left with nothing makes no update but counts as a
step (step number, learning-rate schedule, weight sync). Every batch sent stays outstanding until it comes back
scored: a generator or scorer that dies is restarted by Ray, synced, served again, and the
outstanding batches re-sent (from the journal where the teacher wrote them); a trainer that dies is
replaced, with its whole group, from the newest complete checkpoint (runtime/restarts.py), and the
batches trained since then are trained again from memory.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pyarrow as pa
import ray
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.util.queue import Empty, Queue
from stillroom.actors.algo.objectives import GrpoObjective
from stillroom.actors.runtime.batches import BATCH_ID, batch_id, concat, replay_of
from stillroom.actors.runtime.channels import END, Channel, Seen
from stillroom.actors.runtime.cluster import RoleGroup
from stillroom.actors.runtime.journal import Journal
from stillroom.actors.runtime.loop_config import LoopConfig, LoopResult, Prepared
from stillroom.actors.runtime.metrics import Sampler, record
from stillroom.actors.runtime.restarts import TrainerGroup
from stillroom.actors.runtime.trainers import save_checkpoint, skip_step, sync, train_step


class TrainLoop:
    def __init__(
        self,
        roles: RoleGroup,
        trainer_spec,
        journal: Journal,
        cfg: LoopConfig,
        on_metrics: Callable[[dict], None] = lambda m: None,
        cancelled: Callable[[], bool] = lambda: False,
        on_warning: Callable[[str], None] = lambda message: None,
    ):
        self.roles, self.trainer_spec, self.journal, self.cfg = roles, trainer_spec, journal, cfg
        self.on_metrics, self.cancelled, self.on_warning = on_metrics, cancelled, on_warning
        self.prompts = Channel(Queue(maxsize=cfg.queue_size))
        self.rollouts = Channel(Queue(maxsize=cfg.queue_size))
        self.scored = Channel(Queue(maxsize=cfg.queue_size))
        self.result = LoopResult()
        self._serving: dict = {}  # ObjectRef of a serve loop -> (role, index)
        self._outstanding: dict[str, pa.RecordBatch] = {}  # sent, not yet back scored: re-sent if a role dies
        self._synced = threading.Condition()
        self._synced_steps = 0  # training steps whose weights the generators have (without syncs: done)
        self.trainers = TrainerGroup(roles, trainer_spec, cfg.max_trainer_restarts, on_warning)
        self._pending: dict[str, pa.RecordBatch] = {}  # scored batches that arrived before their turn
        self._seen = Seen()
        self._owner: threading.Thread | None = None  # the thread run() trains on
        self._feed_error: Exception | None = None

    def run(self, prompt_batches: list[pa.RecordBatch]) -> LoopResult:
        """Train on every batch, in order; returns what happened."""
        self._owner = threading.current_thread()
        start = self.start_trainers()
        self._old_logprobs_source()
        todo = prompt_batches[start:]
        if self.cfg.sync_every:
            self._sync_weights()
        for role in ("generator", "scorer"):
            for index in range(len(self.roles.actors[role])):
                self._serve(role, index)
        threading.Thread(target=self._feed, args=(todo,), daemon=True).start()
        sampler = Sampler(self.cfg.metrics_every_s, self._record_queue_depths).start()
        since_checkpoint: list[Prepared] = []
        last_generated = max((i for i, b in enumerate(todo) if self._generated(b)), default=-1)
        try:
            for i, batch in enumerate(todo):
                if i == last_generated + 1:
                    self._trainers_alone()
                since_checkpoint.append(self._prepared(self._await(batch_id(batch))))
                since_checkpoint = self._train(since_checkpoint, cursor=start + i + 1)
        finally:
            sampler.stop()
        self._close()
        self.result.duplicates_dropped = self._seen.dropped
        self._warn_skipped(len(todo))
        return self.result

    def _old_logprobs_source(self) -> None:
        """GRPO's old log-probs: the generator's where it computes in the trainer's precision, else
        the trainer's own before each step (GrpoObjective.trainer_old_logprobs); the job's
        policy/trainer_old_logprobs says which (1: the trainer's)."""
        objective = self.cfg.objective
        if not isinstance(objective, GrpoObjective) or not self.roles.actors.get("generator"):
            return
        trainer = ray.get(self.roles.actors["trainer"][0].precision.remote())
        generator = ray.get(self.roles.actors["generator"][0].precision.remote())
        if trainer != generator and not objective.trainer_old_logprobs:
            self.cfg = replace(self.cfg, objective=replace(objective, trainer_old_logprobs=True))
        self.on_metrics({"policy/trainer_old_logprobs": float(self.cfg.objective.trainer_old_logprobs)})

    def _warn_skipped(self, steps: int) -> None:
        """One warning that says how many steps had nothing to train on (each made no update)."""
        skipped = sorted(set(self.result.skipped))
        if skipped:
            shown = ", ".join(skipped[:10]) + (", ..." if len(skipped) > 10 else "")
            self.on_warning(
                f"{len(skipped)} of {steps} steps had nothing to train on (no group with reward signal, or every "
                f"sample filtered out, after every generation round): no update, but each counted as a step "
                f"(step number, learning-rate schedule and weight sync moved on): {shown}"
            )

    def _generated(self, batch: pa.RecordBatch) -> bool:
        """Whether the generators will sample this batch (neither another epoch's replay nor in the
        journal already)."""
        return not replay_of(batch) and not self.journal.has(batch_id(batch))

    def _trainers_alone(self) -> None:
        """Nothing is left to generate (another epoch replays the journal): trainers that shared
        the cores with the generators compute on every core of theirs from now on."""
        p = self.roles.placements["trainer"]
        if p.threads != p.alone_threads:
            ray.get([t.use_threads.remote(p.alone_threads) for t in self.roles.actors["trainer"]])

    # -- feeding --------------------------------------------------------------------------------

    def _feed(self, todo: list[pa.RecordBatch]) -> None:
        """Every step's prompts, each held back until the policy it must be sampled from exists.
        An error here is the train loop's to raise (it would otherwise wait for batches forever)."""
        try:
            for i, batch in enumerate(todo):
                self._wait_for_policy(i)
                self._submit(batch)
        except Exception as error:  # noqa: BLE001 - re-raised on the loop's thread
            self._feed_error = error

    def _submit(self, batch: pa.RecordBatch, wait_for_source: bool = True) -> None:
        """Prompts to the generators, or the journal's copy straight to the scorers. A batch marked
        as a replay (another epoch over the teacher's output) waits for its source to be journaled
        and is never generated; a refill's replay, sent once its source's step is trained, does
        not wait: a source not journaled by then was never needed, and the prompts are generated."""
        self._outstanding[batch_id(batch)] = batch
        source = replay_of(batch)
        while wait_for_source and source and not self.journal.has(source) and not self.cancelled():
            time.sleep(self.cfg.poll_s / 10)
        source = source if source and self.journal.has(source) else ""
        if self.journal.has(source or batch_id(batch)):
            written = self.journal.read(source or batch_id(batch))
            self._put(self.rollouts, written.replace_schema_metadata({BATCH_ID: batch_id(batch).encode()}))
            self.result.replayed += 1
        else:
            self._put(self.prompts, batch)

    def _put(self, channel: Channel, batch: pa.RecordBatch) -> None:
        """Put, never blocking for good: on the loop's own thread (a refill), a full queue waits on
        the consumers downstream, so take scored batches off their queue while it waits."""
        on_loop = threading.current_thread() is self._owner
        while not channel.put(batch, timeout=self.cfg.poll_s / 10 if on_loop else None):
            self._stash(timeout=0)

    def _close(self) -> None:
        """END to every generator, then (once they have drained) to every scorer. Every batch is
        trained by now, so a loop whose actor died since has nothing left to lose. Meanwhile the
        scored queue is emptied: after a re-send, a scorer may still be putting duplicates there,
        and a full queue would block it before it reads its END."""
        loops = [ref for ref, (role, _) in self._serving.items() if role == "generator"]
        for _ in loops:
            self._put_draining(self.prompts, END)
        self._drain_until(loops)
        for _ in range(len(self._serving) - len(loops)):
            self._put_draining(self.rollouts, END)
        self._drain_until(list(self._serving))
        for ref in self._serving:
            try:
                ray.get(ref)
            except RayActorError:
                pass

    def _put_draining(self, channel: Channel, item) -> None:
        while not channel.put(item, timeout=0.5):
            self._drain_scored()

    def _drain_until(self, refs: list) -> None:
        while len(ray.wait(refs, num_returns=len(refs), timeout=0.5)[0]) < len(refs):
            self._drain_scored()

    def _drain_scored(self) -> None:
        """Drop what is left in the scored queue (only duplicates are, once every batch is trained)."""
        while True:
            try:
                self.scored.get(timeout=0)
            except Empty:
                return
            self._seen.dropped += 1

    # -- the generators' and scorers' serve loops, and their deaths -----------------------------

    def _serve(self, role: str, index: int) -> None:
        actor = self.roles.actors[role][index]
        if role == "generator":
            ref = actor.serve.remote(self.prompts, self.rollouts, self.cfg.sampling, str(self.journal.root))
        else:
            ref = actor.serve.remote(self.rollouts, self.scored)
        self._serving[ref] = (role, index)

    def _check_producers(self) -> None:
        """A serve loop that ended: its actor died (recover it), failed (raise its error), or, with
        every loop ended and a batch still awaited, the batch is lost for good (raise)."""
        refs = list(self._serving)
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        for ref in done:
            try:
                ray.get(ref)  # a loop that raised raises its error here
            except RayActorError as error:
                self._recover(ref, error)
        if len(done) == len(refs) and all(ref in self._serving for ref in done):
            raise RuntimeError("the generators and scorers finished, but a batch never arrived")

    def _recover(self, ref, error: Exception) -> None:
        """A generator or scorer died: Ray restarts it (its restart budget); it gets the current
        weights and a new serve loop, and every batch sent but not yet back is sent again (from
        the journal where the teacher already wrote it). Ids seen twice are dropped downstream."""
        role, index = self._serving.pop(ref)
        died = self.result.role_restarts[role] = self.result.role_restarts.get(role, 0) + 1
        step = len(self.result.trained)
        if died > self.cfg.max_role_restarts:
            raise RuntimeError(f"{role} {index} died {died} times (at step {step}); giving up: {error}") from error
        actor = self.roles.actors[role][index]
        _when_back(actor, timeout=self.cfg.restart_timeout_s, what=f"{role} {index}")
        if role == "generator" and self.cfg.sync_every:
            sync(self.roles.actors["trainer"], [actor], len(self.result.steps))
        self._serve(role, index)
        lost = [b for bid, b in list(self._outstanding.items()) if bid not in self._pending]
        for batch in lost:
            self._submit(batch, wait_for_source=False)
        self.on_warning(
            f"{role} {index} died at step {step} ({type(error).__name__}); Ray restarted it and "
            f"{len(lost)} batches not yet scored were sent again: {', '.join(batch_id(b) for b in lost)}"
        )

    def _wait_for_policy(self, i: int) -> None:
        """Hold batch i back until the generators have the weights of step i - max_staleness
        (without syncs: until step i - max_ahead is trained)."""
        lead = self.cfg.max_staleness if self.cfg.sync_every else self.cfg.max_ahead
        if lead is None:
            return
        with self._synced:
            self._synced.wait_for(lambda: self._synced_steps >= i - lead or self.cancelled())

    def _record_queue_depths(self) -> None:
        for name in ("prompts", "rollouts", "scored"):
            record("queue_depth", getattr(self, name).size(), {"job_id": self.roles.job_id, "queue": name})

    def _await(self, bid: str) -> pa.RecordBatch:
        """The scored batch `bid`; batches that arrive before it wait their turn, re-sent ones are dropped."""
        while bid not in self._pending:
            self._stash(timeout=self.cfg.poll_s)
        return self._pending.pop(bid)

    def _stash(self, timeout: float) -> None:
        """Take one scored batch (if one comes within the timeout) into pending."""
        batch = self._next_scored(timeout)
        if batch is not None:
            self._outstanding.pop(batch_id(batch), None)
            if self._seen.fresh(batch_id(batch)):
                self._pending[batch_id(batch)] = batch

    def _next_scored(self, timeout: float) -> pa.RecordBatch | None:
        if self.cancelled():
            raise InterruptedError("cancelled")
        if self._feed_error is not None:
            raise RuntimeError(f"feeding prompts to the generators failed: {self._feed_error}") from self._feed_error
        try:
            return self.scored.get(timeout=timeout)
        except Empty:
            self._check_producers()
            return None

    def _prepared(self, batch: pa.RecordBatch) -> Prepared:
        """The step's arrays; with a refill, topped up from further generations while short."""
        arrays, metrics = self.cfg.prepare(batch)
        refill, parts = self.cfg.refill, [batch]
        prompts = batch.num_rows / max(self.cfg.sampling.n, 1)
        need = int(np.ceil(refill.per_prompt * prompts)) if refill else 0
        while refill and _rows(arrays) < need and len(parts) < refill.rounds:
            more = refill.prompts(batch, len(parts))
            self._submit(more, wait_for_source=False)
            parts.append(self._await(batch_id(more)))
            arrays, metrics = self.cfg.prepare(concat(parts, batch_id(batch)))
        if refill:
            metrics["sampling/rounds"] = float(len(parts))
            if _rows(arrays) < need:
                what = "training on what there is" if _rows(arrays) else "the step makes no update but counts"
                self.on_warning(
                    f"{batch_id(batch)}: {_rows(arrays)} of {need} rows to train on after {len(parts)} "
                    f"generation rounds (the filters left the rest out); {what}"
                )
        synced = self.cfg.sync_every and "policy_version" in batch.schema.names  # else there is no policy to lag
        versions = [v for b in parts for v in b.column("policy_version").to_pylist()] if synced else []
        return Prepared(batch_id(batch), arrays, metrics, versions)

    # -- training -------------------------------------------------------------------------------

    def _train(self, batches: list[Prepared], cursor: int) -> list[Prepared]:
        """Train on batches[-1]; the others were trained since the last checkpoint. If a trainer
        dies, restart the group from that checkpoint and train them all again. Returns the batches
        that no checkpoint covers yet."""
        replay: list[Prepared] = []
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
            except RayActorError as error:
                self.trainers.restart(error, f"step {cursor}")
                self.result.trainer_restarts = self.trainers.restarts
                replay = batches[:-1]

    def _step(self, step: Prepared) -> None:
        """Train on one step's arrays. A step with none (every sample filtered out, no group with
        reward signal) makes no update but still counts as a step: the trainers' step number and
        learning-rate schedule move on, and so does the policy version the feeder waits for
        (with max_staleness 0, a step that did not count would hold the next batch back forever)."""
        trainers = self.roles.actors["trainer"]
        if step.arrays:
            done = train_step(trainers, step.arrays, self.cfg.objective, self.cfg.num_iterations)
        else:
            done = skip_step(trainers, self.cfg.num_iterations)
            self.result.skipped.append(step.batch_id)
        done["batch_id"] = step.batch_id
        staleness = len(self.result.steps) - float(np.mean(step.versions)) if step.versions else 0.0
        self.result.trained.append(step.batch_id)
        self.result.steps.append(done)
        named = {k: v for k, v in done.items() if k not in ("batch_id", "tokens", "step_s", "step")}  # loss, kl, ...
        self.on_metrics(
            {
                **step.metrics,
                **named,
                "train/step": done["step"],
                **({} if step.arrays else {"train/skipped": 1.0}),
                "policy/staleness": staleness,
                "train/tokens_per_s": done["tokens"] / max(done["step_s"], 1e-9),
            }
        )

    def start_trainers(self) -> int:
        """Create the trainer group once; every rank resumes from the newest complete checkpoint.
        Returns the data cursor to continue from."""
        return self.trainers.start()

    def _advance(self, steps: int) -> None:
        """The generators may now run max_staleness batches past `steps`."""
        with self._synced:
            self._synced_steps = steps
            self._synced.notify_all()

    def _sync_weights(self) -> None:
        """Trainer -> generators: the adapter under LoRA, else full weights, in the generators'
        dtype, shipped by rank 0 as one object reference (trainers.sync); its bytes and seconds
        are the job's sync/bytes and sync/seconds."""
        version = len(self.result.steps)
        metrics = sync(self.roles.actors["trainer"], self.roles.actors["generator"], version)
        self._advance(version)
        self.result.syncs.append(metrics["sync/seconds"])
        tags = {"job_id": self.roles.job_id, "role": "trainer", "rank": "0"}
        record("weight_sync_s", metrics["sync/seconds"], tags)
        record("weight_sync_bytes", metrics["sync/bytes"], tags)
        self.on_metrics({**metrics, "policy/version": version})


def _rows(arrays: dict[str, np.ndarray]) -> int:
    return len(arrays["input_ids"]) if arrays else 0


def _when_back(actor, timeout: float, what: str) -> None:
    """Wait until a restarting actor answers again (its constructor ran); ActorDiedError if it
    will not come back (restarts exhausted)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=max(1.0, deadline - time.monotonic()))
            return
        except ActorUnavailableError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} did not come back within {timeout:.0f} s of a restart") from None
            time.sleep(0.5)
