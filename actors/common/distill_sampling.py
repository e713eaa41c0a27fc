"""How the teacher labels a distill stage's prompts when the recipe does not say: a pure rule the
stage (actors/stages/distill_samples.py) and the submit-time checks (services/) both read."""

from __future__ import annotations

from stillroom.v1 import job_pb2 as pb

# Filters that choose among a prompt's samples: named, they need several (default 4, at temperature 1).
CHOOSING_FILTERS = ("best_of_n", "majority_vote")


def teacher_sampling(p: pb.DistillStage) -> tuple[int, float]:
    """(samples per prompt, temperature) the teacher labels with. By default its greedy answer, once:
    the answer it would serve, which the student is compared against; several samples at
    temperature 1 only when asked for (num_samples > 1, or a filter that chooses among samples).
    Why (issue 27): from a teacher right a third of the time, 4 samples at temperature 1 agreed 27%
    of the time, and the vote kept an arbitrary one of four different answers."""
    n = p.num_samples or (4 if p.filter in CHOOSING_FILTERS else 1)
    if p.HasField("sampling_temperature"):
        return n, p.sampling_temperature
    return n, 1.0 if n > 1 else 0.0
