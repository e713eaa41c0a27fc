"""Generator: batched sampling from any model a job holds (the teacher being tuned, the frozen
teacher, the student, every evaluated model), plus an optional PEFT adapter, through an engine
(engine.py: transformers by default, vLLM where a recipe picks it). Returns, per sample, the token
ids, per-token log-probs (at the sampling temperature) and, on request, the top-k log-probs per
token (at temperature 1, the model's own) stored compactly (int32 ids, float16 log-probs); the
columns and dtypes are the same whatever the engine. A plain class; runtime/cluster.py makes it a
Ray actor.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import torch
from stillroom.actors.common.datasets import decode_turns
from stillroom.actors.models.loading import (
    compute_threads,
    encode_prompt,
    generation_dtype,
    precision,
    role_device,
    use_cores,
)
from stillroom.actors.roles.engine import Sampled, open_engine
from stillroom.actors.runtime.batches import GENERATED_COLUMNS, batch_id, make_batch, with_columns
from stillroom.actors.runtime.channels import Channel, pump
from stillroom.actors.runtime.journal import Journal
from stillroom.actors.runtime.metrics import record, tags_of
from transformers import AutoTokenizer


@dataclass(frozen=True)
class GeneratorSpec:
    model_path: str
    name: str = "generator"  # <job-id>:generator:<rank> when it runs as an actor
    adapter_path: str = ""  # a saved PEFT adapter to start from
    # The LoRA shape of the policy being trained, so synced adapters load into the same modules.
    lora_r: int = 0
    lora_alpha: float = 16.0
    target_modules: tuple[str, ...] = ()
    quantize_4bit: bool = False  # a QLoRA policy: the same nf4 base the trainer trains on
    frozen: bool = False  # no weight syncs will come: merge the adapter into the base for speed
    dtype: str = ""  # "": the generator picks, on its own hardware (loading.generation_dtype)
    seed: int = 0
    engine: str = ""  # "" or "hf": transformers; "vllm": vLLM in-process (resources.<role>.engine)


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    max_new_tokens: int = 32
    temperature: float = 1.0  # 0 is greedy
    top_p: float = 1.0
    top_k: int = 0
    topk_logprobs: int = 0  # record the top-k log-probs per token (for logit KD)
    min_new_tokens: int = 0  # no stop token before this many (benchmarks: equal work for every engine)


def compact_topk(tops: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, pa.Array]:
    """Each sample's top-k, (ids, log-probs) of shape (T_i, k), as stored: int32 ids and float16
    log-probs, flattened per sample (T_i*k)."""
    ids = [i.to(torch.int32).cpu().numpy().reshape(-1) for i, _ in tops]
    lps = [lp.to(torch.float16).cpu().numpy().reshape(-1) for _, lp in tops]
    return {
        "topk_ids": pa.array([a.tolist() for a in ids], type=pa.list_(pa.int32())),
        "topk_logprobs": pa.array([a.tolist() for a in lps], type=pa.list_(pa.float16())),
    }


class Generator:
    def __init__(self, spec: GeneratorSpec):
        # Device and dtype are chosen here, in the role's own process, on the hardware it was given.
        self.device = role_device(spec.name)
        self.spec = spec = replace(spec, dtype=generation_dtype(spec.dtype, spec.frozen))
        self.version = 0
        use_cores()
        self.tokenizer = AutoTokenizer.from_pretrained(spec.model_path)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.engine = open_engine(spec, self.device, self.tokenizer)
        self.stop_ids = self.engine.stop_ids
        # A weight sync waits for the batch being generated: one batch never mixes two policies.
        self._lock = threading.Lock()

    @property
    def model(self):
        """The engine's model: a transformers model (hf), a vllm.LLM (vllm)."""
        return self.engine.model

    def __repr__(self) -> str:
        engine = self.spec.engine or "hf"
        version, dtype = self.version, self.spec.dtype
        return f"Generator({self.spec.name}, {engine}, policy version {version}, {dtype}, {compute_threads()})"

    def serve(self, inbox: Channel, outbox: Channel, params: SamplingParams, journal_dir: str = "") -> int:
        """Generate for every prompt batch in the inbox until END; journal each result before
        handing it on. Returns the number of batches."""
        journal = Journal(journal_dir) if journal_dir else None
        tags = tags_of(self.spec.name)

        def work(batch: pa.RecordBatch) -> pa.RecordBatch:
            if journal is not None and journal.has(batch_id(batch)):  # re-sent after a death: never regenerate
                return journal.read(batch_id(batch))
            out = self.generate(batch, params)
            if journal is not None:
                journal.write(out)
            return out

        def report(_, out: pa.RecordBatch, seconds: float) -> None:
            tokens = sum(len(ids) for ids in out.column("completion_ids").to_pylist())
            record("tokens_generated_per_s", tokens / max(seconds, 1e-9), tags)

        return pump(inbox, outbox, work, report)

    def encode_prompts(self, batch: pa.RecordBatch) -> list[list[int]]:
        """The prompts' token ids: a `messages` column (JSON, Dataset.prompts) keeps each turn's role."""
        prompts = batch.column("prompt").to_pylist()
        turns = batch.column("messages").to_pylist() if "messages" in batch.schema.names else [None] * len(prompts)
        return [encode_prompt(self.tokenizer, p, messages=decode_turns(m)) for p, m in zip(prompts, turns, strict=True)]

    def generate(self, batch: pa.RecordBatch, params: SamplingParams) -> pa.RecordBatch:
        """Sample params.n completions per prompt row. Other columns are repeated per sample."""
        with self._lock, torch.no_grad():  # the tokenizer too: a Rust tokenizer is not for two threads at once
            prompt_ids = self.encode_prompts(batch)
            return self._rows(batch, prompt_ids, self.engine.sample(prompt_ids, params), params)

    def _rows(self, batch, prompt_ids, sampled: Sampled, params: SamplingParams) -> pa.RecordBatch:
        """One row per sample, each answer cut after its first stop token: its ids, log-probs (at
        T) and, when asked for, top-k (at 1)."""
        stops = set(self.stop_ids)
        columns: dict[str, list] = {k: [] for k in GENERATED_COLUMNS}
        extra = {name: batch.column(name).to_pylist() for name in batch.schema.names if name not in columns}
        for name in extra:
            columns[name] = []
        prompts = batch.column("prompt").to_pylist()
        lengths = []
        for row, ids in enumerate(sampled.ids):
            src = row // params.n
            length = next((i + 1 for i, t in enumerate(ids) if t in stops), len(ids))  # through the stop token
            lengths.append(length)
            columns["sample_id"].append(f"{batch_id(batch)}/{src}/{row % params.n}")
            columns["prompt"].append(prompts[src])
            columns["completion"].append(self.tokenizer.decode(ids[:length], skip_special_tokens=True))
            columns["prompt_ids"].append(prompt_ids[src])
            columns["completion_ids"].append(ids[:length])
            columns["completion_logprobs"].append(sampled.logprobs[row][:length].tolist())
            columns["policy_version"].append(self.version)
            columns["truncated"].append(ids[length - 1] not in stops if length else True)
            for name, values in extra.items():
                columns[name].append(values[src])
        rb = make_batch(batch_id(batch), columns)
        if sampled.topk is not None:
            tops = [(ids[:n], lps[:n]) for (ids, lps), n in zip(sampled.topk, lengths, strict=True)]
            rb = with_columns(rb, compact_topk(tops))
        return rb.replace_schema_metadata(batch.schema.metadata)

    def precision(self) -> str:
        """What this generator computes its log-probs in (loading.precision)."""
        return precision(self.spec.dtype, self.spec.quantize_4bit)

    def weights_dtype(self) -> str:
        """The dtype a sync should ship weights in (the engine knows what it writes them into)."""
        return self.engine.weights_dtype()

    def load_weights(self, weights: dict[str, np.ndarray], version: int) -> float:
        """Install weights from the trainer (a sync hands one object reference, which Ray resolves
        here): a PEFT adapter state dict under LoRA, else full parameters, cast to the parameters'
        dtypes; int16 arrays are bfloat16 bits (numpy has no bfloat16). Returns the seconds it took."""
        started = time.perf_counter()
        tensors = {k: torch.tensor(v, device=self.device) for k, v in weights.items()}
        tensors = {k: t.view(torch.bfloat16) if t.dtype == torch.int16 else t for k, t in tensors.items()}
        with self._lock:
            self.engine.install(tensors)
        self.version = version
        return time.perf_counter() - started

    def score_topk(self, batch: pa.RecordBatch, k: int) -> pa.RecordBatch:
        """Teacher-forced top-k log-probs at every completion token of samples someone else wrote
        (on-policy distillation: the student samples, the teacher grades each token). Replaces the
        batch's topk_ids / topk_logprobs, flattened (T*k) as generate() stores them."""
        prompts, completions = batch.column("prompt_ids").to_pylist(), batch.column("completion_ids").to_pylist()
        with self._lock, torch.no_grad():
            tops = self.engine.score(prompts, completions, k)
        return with_columns(batch, compact_topk(tops))

    def num_parameters(self) -> int:
        return self.engine.num_parameters()

    def close(self) -> None:
        with self._lock:
            self.engine.close()

    @torch.no_grad()
    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        """input_ids (B, T) -> logits (B, T, V) float32."""
        return self.engine.logits(input_ids)
