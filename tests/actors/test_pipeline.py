"""The roles on a real local Ray cluster: the generate -> score -> train loop through the queues,
DeepSpeed ranks in sync, a trainer killed mid-stage, weight sync, and nothing left behind."""

from __future__ import annotations

import os
import threading
from dataclasses import replace
from functools import partial

import pyarrow as pa
import pytest
from stillroom.actors.roles.generator import GeneratorSpec, SamplingParams
from stillroom.actors.roles.scorer import RewardSpec, ScorerSpec
from stillroom.actors.roles.trainer import TrainerSpec
from stillroom.actors.runtime.batches import batch_id, make_batch, refill_batch, training_arrays
from stillroom.actors.runtime.cluster import Placement, RoleGroup, release_job
from stillroom.actors.runtime.journal import Journal
from stillroom.actors.runtime.loop import TrainLoop
from stillroom.actors.runtime.loop_config import LoopConfig, Refill

from tests.service.helpers import wait_for

pytestmark = pytest.mark.slow
N_BATCHES = 6


def reward_weighted(batch):
    """Every completion token, weighted by its sample's reward."""
    return training_arrays(batch, pad_id=0, weight_column="reward"), {}


def prompts(n=N_BATCHES):
    return [
        make_batch(f"b{i:03d}", {"prompt": [f"ticket {i} billing", f"order {i} refund"], "answer": ["a", "b"]})
        for i in range(n)
    ]


def roles(job_id: str, tiny_model, trainers: int = 2, trainer_threads: int = 0):
    group = RoleGroup(
        job_id,
        {
            "generator": Placement(1, 0.5),
            "scorer": Placement(1, 0.25),
            "trainer": Placement(trainers, 0.5, threads=trainer_threads),
        },
    )
    group.start("generator", GeneratorSpec(str(tiny_model), lora_r=4, target_modules=("q_proj", "v_proj")))
    group.start(
        "scorer",
        ScorerSpec(
            (
                RewardSpec("length_penalty", args=(("max_chars", "20"),)),
                RewardSpec("exact_match", args=(("column", "answer"),)),
            )
        ),
    )
    return group


def trainer_spec(tiny_model, tmp_path, zero=2):
    return TrainerSpec(
        str(tiny_model),
        lora_r=4,
        target_modules=("q_proj", "v_proj"),
        zero_stage=zero,
        learning_rate=1e-3,
        checkpoint_dir=str(tmp_path / "ckpt"),
    )


def alive(ray_client, job_id):
    from ray.util.state import list_actors, list_placement_groups

    actors = [a for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000) if a.name.startswith(job_id)]
    groups = [g for g in list_placement_groups(limit=1000) if g.name.startswith(job_id) and g.state != "REMOVED"]
    return actors, groups


def test_pipeline_moves_every_batch_once_and_ranks_stay_in_sync(ray_client, tiny_model, tmp_path):
    group = roles("job-pipe1", tiny_model, trainer_threads=1)  # as if it overlapped the generator
    try:
        journal = Journal(tmp_path / "journal")
        loop = TrainLoop(
            group,
            trainer_spec(tiny_model, tmp_path),
            journal,
            LoopConfig(
                prepare=reward_weighted,
                sampling=SamplingParams(n=2, max_new_tokens=6),
                queue_size=2,
                checkpoint_every=3,
            ),
        )
        result = loop.run(prompts())
        assert result.trained == [f"b{i:03d}" for i in range(N_BATCHES)]  # none lost, none twice, in order
        assert journal.ids() == result.trained
        names = {a.name for a in alive(ray_client, "job-pipe1")[0]}
        assert names == {"job-pipe1:generator:0", "job-pipe1:scorer:0", "job-pipe1:trainer:0", "job-pipe1:trainer:1"}
        rows = [r for b in map(journal.read, journal.ids()) for r in b.to_pylist()]
        assert len(rows) == N_BATCHES * 2 * 2 and len({r["sample_id"] for r in rows}) == len(rows)
        assert len(result.syncs) == N_BATCHES + 1  # initial + one per step
        trainers = group.actors["trainer"]
        d0, d1 = ray_client.get([t.digest.remote() for t in trainers])
        assert d0 == d1  # the two ZeRO-2 ranks hold bitwise-equal parameters
        assert ray_client.get(trainers[0].use_threads.remote(None)) == "1 thread"  # generating beside it
        # after a sync, the generator computes exactly what the trainer computes
        import numpy as np

        ids = np.array([[5, 6, 7, 8, 9, 10]])
        loop._sync_weights()
        gen_logits = ray_client.get(group.actors["generator"][0].logits.remote(ids))
        np.testing.assert_allclose(gen_logits, ray_client.get(trainers[0].logits.remote(ids)), atol=1e-5)
        # a second run of the same stage replays the journal instead of generating
        again = TrainLoop(
            group,
            replace(trainer_spec(tiny_model, tmp_path), checkpoint_dir=str(tmp_path / "c2")),
            journal,
            LoopConfig(prepare=reward_weighted, sampling=SamplingParams(n=2, max_new_tokens=6)),
        )
        assert again.run(prompts()).replayed == N_BATCHES
        # nothing to generate: the trainers computed on every core
        every = f"{os.cpu_count()} thread{'s' * (os.cpu_count() != 1)}"
        assert ray_client.get([t.use_threads.remote(None) for t in group.actors["trainer"]]) == [every, every]
    finally:
        group.close()
    assert wait_for(lambda: alive(ray_client, "job-pipe1") == ([], []), timeout=30)


def test_killed_trainer_resumes_from_checkpoint_at_the_same_cursor(ray_client, tiny_model, tmp_path):
    group = roles("job-pipe2", tiny_model)
    journal = Journal(tmp_path / "journal")
    killed = []

    def kill_after_third_step(metrics: dict) -> None:
        # Kill rank 1 right after step 3 (checkpoints every 2): the next step finds it dead.
        if "loss" in metrics and len(loop.result.steps) == 3 and not killed:
            killed.append(group.actors["trainer"][1])
            ray_client.kill(killed[0])

    loop = TrainLoop(
        group,
        trainer_spec(tiny_model, tmp_path),
        journal,
        LoopConfig(prepare=reward_weighted, sampling=SamplingParams(n=2, max_new_tokens=6), checkpoint_every=2),
        on_metrics=kill_after_third_step,
    )
    try:
        result = loop.run(prompts())
        assert killed and result.trainer_restarts == 1
        # every batch was trained; after the restart the group went back to the checkpoint at
        # cursor 2 and trained b002 again, then went on in order
        assert result.trained == ["b000", "b001", "b002", "b002", "b003", "b004", "b005"]
        assert [s["step"] for s in result.steps] == [1, 2, 3, 3, 4, 5, 6]  # optimizer steps follow the cursor
        assert journal.ids() == [f"b{i:03d}" for i in range(N_BATCHES)]
        rows = [r["sample_id"] for b in map(journal.read, journal.ids()) for r in b.to_pylist()]
        assert len(rows) == len(set(rows)) == N_BATCHES * 4  # each sample journaled exactly once
    finally:
        group.close()
    assert wait_for(lambda: alive(ray_client, "job-pipe2") == ([], []), timeout=30)


def test_roles_span_two_nodes(ray_client, tiny_model, tmp_path):
    from ray.util.state import list_actors
    from stillroom.actors.runtime.cluster import Placement as P

    nodes = {n["NodeID"] for n in ray_client.nodes() if n["Alive"]}
    assert len(nodes) == 2
    group = RoleGroup(
        "job-2node",
        {
            "generator": P(1, 0.5, custom=(("node_a", 1.0),)),
            "scorer": P(1, 0.25, custom=(("node_b", 1.0),)),
            "trainer": P(2, 0.25, custom=(("node_b", 1.0),)),
        },
    )
    try:
        group.start("generator", GeneratorSpec(str(tiny_model), lora_r=4, target_modules=("q_proj", "v_proj")))
        group.start("scorer", ScorerSpec((RewardSpec("json_valid"),)))
        loop = TrainLoop(
            group,
            trainer_spec(tiny_model, tmp_path),
            Journal(tmp_path / "journal"),
            LoopConfig(prepare=reward_weighted, sampling=SamplingParams(n=2, max_new_tokens=4)),
        )
        assert loop.run(prompts(2)).trained == ["b000", "b001"]
        placed = {
            a.name: a.node_id
            for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
            if a.name.startswith("job-2node")
        }
        assert placed["job-2node:generator:0"] != placed["job-2node:trainer:0"]
        assert placed["job-2node:trainer:0"] == placed["job-2node:trainer:1"] == placed["job-2node:scorer:0"]
        assert len(loop.result.syncs) == 3  # weights crossed nodes, trainer -> generator
    finally:
        group.close()


def test_roles_that_compute_at_the_same_time_get_their_own_threads(ray_client, tiny_model):
    import os

    import ray
    from ray.util.state import list_actors
    from stillroom.v1 import job_pb2 as pb

    assert Placement.of(pb.RoleResources(num_cpus=0.5)).threads == 0  # taking turns: every core
    assert Placement.of(pb.RoleResources(num_cpus=0.5), overlap=True).threads == 1
    assert Placement.of(pb.RoleResources(num_cpus=2.5), overlap=True).threads == 3
    assert Placement.of(pb.RoleResources(num_cpus=0.5, threads=2), overlap=True).threads == 2
    group = RoleGroup("job-threads", {"generator": Placement(1, 0.25, threads=1), "student": Placement(1, 0.25)})
    try:
        handles = group.start("generator", GeneratorSpec(str(tiny_model))) + group.start(
            "student", GeneratorSpec(str(tiny_model))
        )
        ray.get([h.num_parameters.remote() for h in handles])
        reprs = {
            a.name: a.repr_name
            for a in list_actors(filters=[("state", "=", "ALIVE")], detail=True, limit=1000)
            if a.name.startswith("job-threads")
        }
        assert reprs["job-threads:generator:0"].endswith(", 1 thread)")
        assert reprs["job-threads:student:0"].endswith(f", {os.cpu_count()} threads)")
    finally:
        group.close()


class _Owner:
    """Stands in for a job's supervisor: it creates the job's role group and owns it."""

    def make(self, job_id: str) -> bool:
        self.group = RoleGroup(job_id, {"scorer": Placement(1, 0.25), "generator": Placement(1, 0.25)})
        self.group.start("scorer", ScorerSpec((RewardSpec("json_valid"),)))
        return True


def test_killing_the_owner_leaves_no_actor_or_placement_group(ray_client):
    import sys

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need not import tests/
    owner = ray_client.remote(num_cpus=0)(_Owner).remote()
    assert ray_client.get(owner.make.remote("job-owned"))
    assert wait_for(lambda: alive(ray_client, "job-owned")[0] and alive(ray_client, "job-owned")[1], timeout=60)
    ray_client.kill(owner)  # a supervisor that dies takes the role actors it owns...
    assert wait_for(lambda: not alive(ray_client, "job-owned")[0], timeout=60)
    assert alive(ray_client, "job-owned")[1]  # ...but not the placement group:
    release_job("job-owned")  # the dispatcher releases it when the job ends
    assert wait_for(lambda: alive(ray_client, "job-owned") == ([], []), timeout=60)


@pytest.mark.parametrize("max_staleness", [0, 1])
def test_generation_runs_at_most_max_staleness_versions_ahead(ray_client, tiny_model, tmp_path, max_staleness):
    group = roles(f"job-stale{max_staleness}", tiny_model, trainers=1)
    seen: list[float] = []
    loop = TrainLoop(
        group,
        trainer_spec(tiny_model, tmp_path, zero=0),
        Journal(tmp_path / "journal"),
        LoopConfig(
            prepare=reward_weighted,
            sampling=SamplingParams(n=2, max_new_tokens=4),
            max_staleness=max_staleness,
            queue_size=4,
            poll_s=0.01,
        ),  # the loop often waits while its producers are still at work
        on_metrics=lambda m: seen.append(m["policy/staleness"]) if "policy/staleness" in m else None,
    )
    try:
        loop.run(prompts())
    finally:
        group.close()
    assert len(seen) == N_BATCHES
    assert max(seen) <= max_staleness
    if max_staleness:
        assert max(seen) > 0  # generation did run ahead of training: the two overlapped


def test_roles_that_cannot_fit_fail_at_once_with_the_numbers(ray_client):
    # one replica bigger than any node (the head has 2 CPUs, the worker 1)
    with pytest.raises(RuntimeError, match=r"resources\.trainer: one replica asks for \{'CPU': 99\.0\}"):
        RoleGroup("job-big", {"trainer": Placement(1, 99.0)})
    # replicas that each fit a node but not all together
    with pytest.raises(RuntimeError, match="need more than the cluster has: 4 CPU wanted, 3 in the cluster"):
        RoleGroup("job-big", {"trainer": Placement(2, 2.0)})


def order_rows_only(batch):
    """A filter that keeps half of a step's own samples (its "order" prompts) and every refill
    sample; it keeps nothing of step b002, however often that step is refilled."""
    if batch_id(batch) == "b002":
        return {}, {}
    kept = [i for i, p in enumerate(batch.column("prompt").to_pylist()) if not p.startswith("ticket")]
    return training_arrays(batch.take(pa.array(kept)), pad_id=0), {"kept": len(kept)}


def run_within(loop: TrainLoop, batches: list, timeout: float, stop: threading.Event):
    """loop.run(batches) on a thread; fails (and cancels the loop) if it does not end in time."""
    out: dict = {}

    def target():
        try:
            out["result"] = loop.run(batches)
        except BaseException as error:  # noqa: BLE001 - handed to the test
            out["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        stop.set()  # the loop raises InterruptedError at its next poll
        thread.join(60)
        pytest.fail(f"the train loop did not finish {len(batches)} steps within {timeout:.0f} s")
    if "error" in out:
        raise out["error"]
    return out["result"]


@pytest.mark.parametrize("max_staleness", [None, 0])
def test_a_short_step_is_refilled_from_further_generations(ray_client, tiny_model, tmp_path, max_staleness):
    """Each step needs 2 rows per prompt (4); its own samples give 2, so one refill of 2 further
    prompts (journaled under <step>+1) tops it up. A step the filter never keeps anything of is
    refilled up to the bound and makes no update, with a warning that says so; it still counts as
    a step, so with max_staleness 0 the step after it is fed (it used to wait for ever)."""
    group = roles(f"job-refill{max_staleness}", tiny_model, trainers=1)
    metrics, warnings, stop = [], [], threading.Event()
    extra = [{"prompt": f"refill {i}", "answer": "a"} for i in range(8)]
    loop = TrainLoop(
        group,
        trainer_spec(tiny_model, tmp_path, zero=0),
        Journal(tmp_path / "journal"),
        LoopConfig(
            prepare=order_rows_only,
            sampling=SamplingParams(n=2, max_new_tokens=4),
            refill=Refill(2.0, 3, partial(refill_batch, rows=extra, n=2, seed=0)),
            max_staleness=max_staleness,
            poll_s=0.05,
        ),
        on_metrics=metrics.append,
        cancelled=stop.is_set,
        on_warning=warnings.append,
    )
    try:
        result = run_within(loop, prompts(4), timeout=240, stop=stop)
    finally:
        group.close()
    assert result.trained == ["b000", "b001", "b002", "b003"]
    assert [s["step"] for s in result.steps] == [1, 2, 3, 4] and result.skipped == ["b002"]
    assert [m["sampling/rounds"] for m in metrics if "sampling/rounds" in m] == [2.0, 2.0, 3.0, 2.0]
    assert [m["kept"] for m in metrics if "kept" in m] == [6, 6, 6]  # 2 own + 4 refill rows
    assert [m["train/step"] for m in metrics if "train/skipped" in m] == [3]
    assert set(loop.journal.ids()) >= {"b000+1", "b001+1", "b002+1", "b002+2", "b003+1"}
    assert warnings == [
        "b002: 0 of 4 rows to train on after 3 generation rounds (the filters left the rest out); "
        "the step makes no update but counts",
        "1 of 4 steps had nothing to train on (no group with reward signal, or every sample filtered out, "
        "after every generation round): no update, but each counted as a step (step number, learning-rate "
        "schedule and weight sync moved on): b002",
    ]


@pytest.mark.parametrize("role", ["generator", "scorer"])
def test_a_generator_or_scorer_killed_mid_stage_loses_nothing(ray_client, tiny_model, tmp_path, role):
    """SIGKILL-like death of a generator (or scorer) after step 2: Ray restarts it, the loop
    re-syncs it and sends again every batch not yet back; nothing is trained twice, nothing lost,
    and what the teacher had written is replayed from the journal, not generated again."""
    group = roles(f"job-kill-{role}", tiny_model, trainers=1)
    journal, killed, warnings = Journal(tmp_path / "journal"), [], []

    def kill_after_second_step(metrics: dict) -> None:
        if "loss" in metrics and len(loop.result.steps) == 2 and not killed:
            killed.append(group.actors[role][0])
            ray_client.kill(killed[0], no_restart=False)

    loop = TrainLoop(
        group,
        trainer_spec(tiny_model, tmp_path, zero=0),
        journal,
        # synchronous: batch 3 is sent only after the death, so it is lost unless re-sent
        LoopConfig(
            prepare=reward_weighted, sampling=SamplingParams(n=2, max_new_tokens=6), max_staleness=0, poll_s=0.2
        ),
        on_metrics=kill_after_second_step,
        on_warning=warnings.append,
    )
    try:
        result = loop.run(prompts())
    finally:
        group.close()
    assert killed and result.role_restarts == {role: 1}
    assert result.trained == [f"b{i:03d}" for i in range(N_BATCHES)]  # in order, none twice, none lost
    assert len(result.steps) == N_BATCHES
    assert journal.ids() == result.trained
    rows = [r["sample_id"] for b in map(journal.read, journal.ids()) for r in b.to_pylist()]
    assert len(rows) == len(set(rows)) == N_BATCHES * 4
    assert len(warnings) == 1 and warnings[0].startswith(f"{role} 0 died at step 2 (")


def test_a_feeder_that_raises_fails_the_loop_with_the_reason(ray_client, tiny_model, tmp_path):
    """The prompt feeder runs on its own thread; when it raises (here: a corrupt journal file for
    batch b001), the train loop raises its error instead of waiting for b001 forever."""
    group = roles("job-feed", tiny_model, trainers=1)
    journal = Journal(tmp_path / "journal")
    (journal.root / "b001.parquet").write_bytes(b"not parquet")
    loop = TrainLoop(
        group,
        trainer_spec(tiny_model, tmp_path, zero=0),
        journal,
        LoopConfig(prepare=reward_weighted, sampling=SamplingParams(n=2, max_new_tokens=4), poll_s=0.2),
    )
    try:
        with pytest.raises(RuntimeError, match="feeding prompts to the generators failed: .*Parquet"):
            loop.run(prompts(3))
    finally:
        group.close()


def test_evaluation_answers_again_when_its_scorer_dies_mid_call(ray_client, tiny_model, tmp_path):
    """The scorer is SIGKILLed while it scores (its reward cued the kill): Ray restarts it, the
    chunk is answered and scored again, and the metrics are those of a run nobody killed."""
    from stillroom.actors.stages.evaluate import evaluate_model

    marker = tmp_path / "scoring"
    group = RoleGroup("job-eval-kill", {"generator": Placement(1, 0.5), "scorer": Placement(1, 0.25)})
    (generator,) = group.start("generator", GeneratorSpec(str(tiny_model)))
    reward = RewardSpec("tests.unsafe_rewards:marks_then_sleeps", args=(("marker", str(marker)),))
    (scorer,) = group.start("scorer", ScorerSpec((reward,), allowed_modules=("tests.unsafe_rewards",)))
    rows = [{"prompt": f"ticket {i} billing"} for i in range(4)]
    greedy = SamplingParams(n=1, max_new_tokens=6, temperature=0.0)
    retries: list[str] = []

    def kill_when_scoring():
        wait_for(marker.exists, 60, 0.05)
        ray_client.kill(scorer, no_restart=False)

    killer = threading.Thread(target=kill_when_scoring)
    killer.start()
    try:
        killed = evaluate_model(generator, scorer, rows, greedy, on_retry=retries.append)
        calm = evaluate_model(generator, scorer, rows, greedy)
    finally:
        killer.join()
        group.close()
    assert len(retries) == 1 and "a role actor died" in retries[0]
    assert killed["marks_then_sleeps"] == calm["marks_then_sleeps"] > 0
