"""What both ways of distilling use (actors/stages/distill.py offline, actors/stages/on_policy.py
on-policy): the stage's settings (DistillConfig) and the step from a batch of the teacher's scored
samples to the student's training arrays (the filter, then `prepare`). Both stages import it; neither
imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
import pyarrow as pa
from stillroom.actors.algo import filters
from stillroom.actors.algo.objectives import KdObjective
from stillroom.actors.common import datasets
from stillroom.actors.common.distill_sampling import teacher_sampling
from stillroom.actors.models.loading import encode_examples, encode_prompt
from stillroom.actors.roles.generator import SamplingParams
from stillroom.actors.roles.scorer import failure_metrics
from stillroom.actors.runtime.batches import make_batch, refill_batch, training_arrays, with_columns
from stillroom.actors.runtime.loop_config import LoopConfig, Refill
from stillroom.v1 import job_pb2 as pb


@dataclass(frozen=True)
class DistillConfig:
    on_policy_fraction: float  # lambda: the share of steps that train on the student's own samples
    on_policy_objective: KdObjective
    num_samples: int
    filter: str
    min_reward: float
    min_agreement: float
    sampling: SamplingParams
    objective: KdObjective
    prompts_per_step: int
    epochs: int
    max_steps: int
    eval_prompts: int
    max_ahead: int | None
    samples_per_step: int  # a step is refilled from further teacher generations until it has these
    max_resample: int
    min_kept_fraction: float
    max_reward_failures: float  # the fraction of samples reward functions may fail on

    @classmethod
    def of(cls, p: pb.DistillStage) -> DistillConfig:
        n, t = teacher_sampling(p)
        temperature = p.temperature or 1.0
        sampling = SamplingParams(n=n, max_new_tokens=p.max_new_tokens or 64, temperature=t, topk_logprobs=p.top_k or 8)
        alpha = p.alpha if p.HasField("alpha") else 0.5
        objective = KdObjective(alpha, p.kd_loss or "forward_kl", p.jsd_beta or 0.5, temperature, p.scale_by_t2)
        on_policy = getattr(p, "lambda") or (1.0 if p.mode == "on_policy" else 0.0)
        student_kd = KdObjective(0.0, p.kd_loss or "reverse_kl", p.jsd_beta or 0.5, temperature, p.scale_by_t2)
        return cls(
            on_policy,
            student_kd,
            n,
            p.filter or "majority_vote",
            p.min_reward,
            p.min_agreement,
            sampling,
            objective,
            p.prompts_per_step or 8,
            p.optim.epochs or 1,
            p.optim.max_steps,
            p.eval_prompts or 16,
            p.max_ahead if p.HasField("max_ahead") else None,
            p.samples_per_step or p.prompts_per_step or 8,
            p.max_resample or 3,
            p.min_kept_fraction,
            p.max_reward_failure_fraction or 0.5,
        )

    def loop(self, prepare_batch, checkpoint_every: int, rows: list[dict], seed: int) -> LoopConfig:
        """Offline distillation: no weight syncs (the teacher is frozen), max_ahead bounds generation;
        a step the filter leaves short is refilled with further prompts from `rows`."""
        return LoopConfig(
            prepare=prepare_batch,
            sampling=self.sampling,
            objective=self.objective,
            sync_every=0,
            max_ahead=self.max_ahead,
            refill=Refill(
                self.samples_per_step / self.prompts_per_step,
                self.max_resample,
                partial(refill_batch, rows=rows, n=self.prompts_per_step, seed=seed),
            ),
            checkpoint_every=checkpoint_every,
        )


def keep(batch: pa.RecordBatch, cfg: DistillConfig) -> tuple[list[int], dict[str, float]]:
    """Indices of the samples the filter keeps, group by group (n samples per prompt)."""
    n, rows = cfg.num_samples, batch.num_rows
    rewards = batch.column("reward").to_pylist()
    completions = batch.column("completion").to_pylist()
    kept, agreement = [], []
    for lo in range(0, rows, n):
        chosen, agree = filters.select(
            cfg.filter, rewards[lo : lo + n], completions[lo : lo + n], cfg.min_reward, cfg.min_agreement
        )
        kept += [lo + i for i in chosen]
        if agree is not None:
            agreement.append(agree)
    metrics = {"distill/kept_fraction": len(kept) / max(rows, 1), "distill/kept": len(kept), "distill/samples": rows}
    metrics.update(failure_metrics(batch))
    if agreement:
        metrics["distill/agreement"] = float(np.mean(agreement))
    return kept, metrics


def prepare(
    batch: pa.RecordBatch, cfg: DistillConfig, student_tokenizer=None, bare_tokenizer=None
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Filter, then the student's arrays. With a student tokenizer (it differs from the teacher's),
    the kept texts are tokenized again for the student and only sequence-level KD (CE) is possible.
    With a bare tokenizer, the student's prompts are the questions without their passages."""
    kept, metrics = keep(batch, cfg)
    if not kept:
        return {}, metrics
    batch = batch.take(pa.array(kept))
    if bare_tokenizer is not None and "query" in batch.schema.names:
        batch = without_passages(batch, bare_tokenizer)
    if student_tokenizer is not None:
        texts = [
            datasets.Example(p, c)
            for p, c in zip(batch.column("prompt").to_pylist(), batch.column("completion").to_pylist(), strict=True)
        ]
        arrays = training_arrays(make_batch("retokenized", encode_examples(student_tokenizer, texts, 4096)), pad_id=0)
        return arrays, metrics
    return training_arrays(batch, pad_id=0), metrics


def without_passages(batch: pa.RecordBatch, tokenizer) -> pa.RecordBatch:
    """The samples with their prompts as the question alone (the `query` column retrieval kept):
    the completion and its top-k stay as the teacher wrote them, aligned to the completion's tokens."""
    queries = batch.column("query").to_pylist()
    return with_columns(batch, {"prompt": queries, "prompt_ids": [encode_prompt(tokenizer, q) for q in queries]})
