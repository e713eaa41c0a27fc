"""A trainer group that outlives the death of any of its ranks, for every loop that trains: the
group is stopped and started again, every rank loads the newest complete checkpoint, and the loop
continues at that checkpoint's data cursor. Steps since the checkpoint are taken again (the same
rows, in the same order), so each step counts once in the optimizer's history.

    group = TrainerGroup(roles, spec, on_restart=ctx.warn)
    run_steps(group, total, step, checkpoint_every)   # step(i) trains step i on group.actors
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import ray
from ray.exceptions import ActorUnavailableError, RayActorError
from stillroom.actors.runtime.trainers import resume, save_checkpoint


class TrainerGroup:
    def __init__(self, roles, spec, max_restarts: int = 2, on_restart: Callable[[str], None] = lambda m: None):
        self.roles, self.spec, self.max_restarts, self.on_restart = roles, spec, max_restarts, on_restart
        self.restarts = 0
        self.cursor = 0

    @property
    def actors(self) -> list:
        return self.roles.actors["trainer"]

    def start(self) -> int:
        """Create the ranks once; each resumes from the newest complete checkpoint. The cursor."""
        if "trainer" not in self.roles.actors:
            self.cursor = resume(self.roles.start("trainer", self.spec))
        return self.cursor

    def alive(self) -> bool:
        try:
            ray.get([t.__ray_ready__.remote() for t in self.actors], timeout=30)
            return True
        except (RayActorError, ray.exceptions.GetTimeoutError):
            return False

    def restart(self, error: Exception, where: str) -> int:
        """Every rank again, from the newest complete checkpoint; its cursor. Past max_restarts the
        error is raised, saying how often and where."""
        self.restarts += 1
        if self.restarts > self.max_restarts:
            raise RuntimeError(f"a trainer rank died {self.restarts} times (last at {where}); giving up: {error}")
        self.roles.stop("trainer")
        cursor = self.start()
        self.on_restart(
            f"a trainer rank died at {where} ({type(error).__name__}); every rank restarted from the "
            f"checkpoint at step {cursor}, and training goes on from there"
        )
        return cursor


def with_restarts(group: TrainerGroup, call: Callable[[list], object], where: str):
    """call(group.actors) (saving the model, a held-out measure); a rank that dies meanwhile
    restarts the group from its newest checkpoint, and the call is made again."""
    while True:
        try:
            return call(group.actors)
        except RayActorError as error:
            if group.alive():
                raise
            group.restart(error, where)


T = TypeVar("T")


def retrying(call: Callable[[], T], where: str, on_retry: Callable[[str], None], attempts: int = 5) -> T:
    """call() again when an actor it used died: Ray restarts generators and scorers (their
    max_restarts), and a call that needs no synced weights (evaluation's frozen models) can simply
    be made again. Each retry is reported; past `attempts` the error is raised, saying where."""
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except (RayActorError, ActorUnavailableError) as error:
            if attempt == attempts:
                raise RuntimeError(f"{where}: a role actor died {attempts} times; giving up: {error}") from error
            on_retry(f"{where}: a role actor died ({type(error).__name__}); Ray restarts it and the call is made again")
            time.sleep(1.0)
    raise AssertionError("unreachable")


def run_steps(
    group: TrainerGroup,
    total: int,
    step: Callable[[int], None],
    checkpoint_every: int,
    on_resume: Callable[[int], None] = lambda cursor: None,
    retries: int = 5,
) -> None:
    """step(i) for i from the group's cursor to total, a checkpoint every checkpoint_every steps
    and at the end. A trainer that dies restarts the group from its checkpoint; an actor error
    while every rank lives (another role restarting, e.g. a student generator) retries the step.
    on_resume(cursor) runs after either (e.g. to send the weights again)."""
    i, tries = group.start(), 0
    while i < total:
        try:
            step(i)
            i, tries = i + 1, 0
            if i % checkpoint_every == 0 or i == total:
                save_checkpoint(group.actors, i)
        except RayActorError as error:
            if group.alive():
                tries += 1
                if tries > retries:
                    raise
                time.sleep(1.0)  # the other role is coming back (Ray restarts it)
            else:
                i = group.restart(error, f"step {i + 1} of {total}")
            on_resume(i)
