"""Checks of a distill stage's stopping rule (`until`) and student_init's layer choice. Pure:
reads only the spec, names every violation by its field path."""

from __future__ import annotations

from stillroom.services.violations import Violations
from stillroom.v1 import job_pb2 as pb

LAYER_CHOICES = ("importance", "every_nth")


def check_distill(s: pb.DistillStage, p: str, v: Violations) -> None:
    _check_until(s, p, v)
    init, q = s.student_init, f"{p}.student_init"
    v.choice(init.layer_choice, f"{q}.layer_choice", LAYER_CHOICES)
    v.number(init.importance_prompts, f"{q}.importance_prompts", lo=1)
    chose = init.layer_choice or init.importance_prompts
    v.check(not chose or init.keep_every_nth_layer > 0, f"{q}.layer_choice", "needs keep_every_nth_layer (how many)")


def _check_until(s: pb.DistillStage, p: str, v: Violations) -> None:
    """A measure the stage can take (kl, or one of its rewards), positive counts, and either a
    stopping rule or a fixed number of steps, not both."""
    if not s.HasField("until"):
        return
    u, q = s.until, f"{p}.until"
    rewards = [r.name for r in s.rewards]
    v.check(
        u.metric in ("", "kl", *rewards),
        f"{q}.metric",
        f"{u.metric!r} is neither kl nor one of {p}.rewards ({', '.join(rewards) or 'none'})",
    )
    for name in ("patience", "max_steps", "eval_every"):
        v.number(getattr(u, name), f"{q}.{name}", lo=1)
    v.number(u.min_delta, f"{q}.min_delta", lo=0, hi=1)
    for name in ("max_steps", "epochs"):
        v.check(
            not getattr(s.optim, name),
            f"{p}.optim.{name}",
            f"trains a fixed number of steps: set it or {q}, not both (until.max_steps is its budget)",
        )
