"""Generator: batched sampling with transformers from any model a job holds (the teacher being
tuned, the frozen teacher, the student, every evaluated model), plus an optional PEFT adapter.
Returns, per sample, the token ids, per-token log-probs (at the sampling temperature) and, on
request, the top-k log-probs per token (at temperature 1, the model's own) stored compactly (int32
ids, float16 log-probs). A plain class; runtime/cluster.py makes it a Ray actor.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import torch
from peft import PeftModel, set_peft_model_state_dict
from stillroom.actors.algo.losses import tempered
from stillroom.actors.common.datasets import decode_turns
from stillroom.actors.models.loading import (
    DTYPES,
    compute_threads,
    encode_prompt,
    generation_dtype,
    load_causal_lm,
    precision,
    role_device,
    stop_ids,
    use_cores,
    with_new_adapter,
)
from stillroom.actors.runtime.batches import GENERATED_COLUMNS, batch_id, make_batch, with_columns
from stillroom.actors.runtime.channels import Channel, pump
from stillroom.actors.runtime.journal import Journal
from stillroom.actors.runtime.metrics import record, tags_of
from transformers import AutoTokenizer, DynamicCache


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


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    max_new_tokens: int = 32
    temperature: float = 1.0  # 0 is greedy
    top_p: float = 1.0
    top_k: int = 0
    topk_logprobs: int = 0  # record the top-k log-probs per token (for logit KD)


SCORE_ROWS = 16  # rows per teacher-forced forward in score_topk: bounds its (rows, T, V) logits


def left_positions(mask: torch.Tensor) -> torch.Tensor:
    """mask (B, T) of a left-padded batch -> position ids (B, T) that count real tokens only, as
    each row alone would have them (pads get 0)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def compact_topk(tops: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, pa.Array]:
    """Each sample's top-k, (ids, log-probs) of shape (T_i, k), as stored: int32 ids and float16
    log-probs, flattened per sample (T_i*k)."""
    ids = [i.to(torch.int32).cpu().numpy().reshape(-1) for i, _ in tops]
    lps = [lp.to(torch.float16).cpu().numpy().reshape(-1) for _, lp in tops]
    return {
        "topk_ids": pa.array([a.tolist() for a in ids], type=pa.list_(pa.int32())),
        "topk_logprobs": pa.array([a.tolist() for a in lps], type=pa.list_(pa.float16())),
    }


class StepLogprobs:
    """A forward hook that keeps, per generation step, what the samples need of the step's raw
    (B, V) logits and drops the rest: the sampled token's log-prob at the sampling temperature and,
    when k > 0, the top-k temperature-1 log-probs (the KD loss tempers them itself, so top-k at T
    would be tempered twice). Memory is a few (B, V) rows, whatever the number of steps: the old way
    kept every step's logits and made 3-4 (B, T, V) float32 copies of them.

    The token sampled at step t is drawn after the forward, so its log-prob is taken at step t+1,
    whose input it is (or by finish(), for the last step): one (B, V) row waits until then. What is
    kept is written into buffers sized once for `steps`: small tensors kept per step would be carved
    out of the freed (B, V) blocks and fragment the heap (measured: +0.4-0.9 GB over 256 steps)."""

    def __init__(self, temperature: float, k: int, steps: int):
        self.temperature, self.k, self.steps = temperature, k, steps
        self.waiting: torch.Tensor | None = None  # (B, V) log-probs at T of the step just computed
        self.forwards = self.taken = 0
        self.chosen = self.top_ids = self.top_lps = None  # (B, steps) and (B, steps, k), at the first forward

    def __call__(self, module, args, kwargs, output) -> None:
        logits = output.logits[:, -1].float()  # what generate samples from (and output_logits returned)
        if self.waiting is not None:  # this forward's input is the token sampled from the last one
            self._take((kwargs["input_ids"] if "input_ids" in kwargs else args[0])[:, -1])
        if self.chosen is None:
            self._allocate(logits.shape[0], logits.device)
        if self.forwards == self.steps:
            raise RuntimeError(f"generate ran more forwards than its {self.steps} new tokens")
        self.waiting = torch.log_softmax(tempered(logits, self.temperature), dim=-1)
        if self.k:
            raw = self.waiting if self.temperature in (0.0, 1.0) else torch.log_softmax(logits, dim=-1)
            top = torch.topk(raw, self.k, dim=-1)
            self.top_ids[:, self.forwards], self.top_lps[:, self.forwards] = top.indices, top.values
        self.forwards += 1

    def _allocate(self, rows: int, device) -> None:
        self.chosen = torch.zeros(rows, self.steps, device=device)
        self.top_ids = torch.zeros(rows, self.steps, self.k, dtype=torch.long, device=device)
        self.top_lps = torch.zeros(rows, self.steps, self.k, device=device)

    def _take(self, tokens: torch.Tensor) -> None:
        self.chosen[:, self.taken] = self.waiting.gather(1, tokens[:, None].to(self.waiting.device))[:, 0]
        self.taken += 1
        self.waiting = None

    def finish(self, new: torch.Tensor):
        """new (B, T): the generated ids -> (chosen (B, T), top_ids (B, T, k), top_lps (B, T, k)) on
        the CPU; the top-k are None when k is 0."""
        self._take(new[:, -1])
        steps = new.shape[1]
        if self.taken != steps:  # one forward per step: anything else would misalign the log-probs
            raise RuntimeError(f"generate ran {self.taken} forwards for {steps} new tokens")
        if not self.k:
            return self.chosen[:, :steps].cpu(), None, None
        return self.chosen[:, :steps].cpu(), self.top_ids[:, :steps].cpu(), self.top_lps[:, :steps].cpu()


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
        model = load_causal_lm(spec.model_path, spec.dtype, spec.quantize_4bit)
        if spec.adapter_path:
            model = PeftModel.from_pretrained(model, spec.adapter_path, is_trainable=False)
            if spec.frozen and not spec.quantize_4bit:
                model = model.merge_and_unload()
        elif spec.lora_r:
            model = with_new_adapter(model, spec.lora_r, spec.lora_alpha, target_modules=spec.target_modules)
        self.model = (model if spec.quantize_4bit else model.to(self.device)).eval()
        # An answer ends at any of the model's EOS ids or the chat template's end of turn.
        self.stop_ids = stop_ids(self.tokenizer, self.model.generation_config)
        # A weight sync waits for the batch being generated: one batch never mixes two policies.
        self._lock = threading.Lock()
        torch.manual_seed(spec.seed)

    def __repr__(self) -> str:
        return f"Generator({self.spec.name}, policy version {self.version}, {self.spec.dtype}, {compute_threads()})"

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
        with self._lock, torch.no_grad():
            return self._generate(batch, params)

    def _generate(self, batch: pa.RecordBatch, params: SamplingParams) -> pa.RecordBatch:
        prompt_ids = self.encode_prompts(batch)
        enc = self.tokenizer.pad({"input_ids": prompt_ids}, return_tensors="pt").to(self.device)
        ids, mask, cache = enc["input_ids"], enc["attention_mask"], self._shared_prefix(enc, params.n)
        if cache is not None:  # n samples per prompt share one prefill
            ids, mask = ids.repeat_interleave(params.n, 0), mask.repeat_interleave(params.n, 0)
        steps = StepLogprobs(params.temperature, params.topk_logprobs, params.max_new_tokens)
        # The raw logits of each step, as generate's output_logits would have them, straight from the
        # model that computes them (a PeftModel generates through its base model).
        base = self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model
        hook = base.register_forward_hook(steps, with_kwargs=True)
        try:
            sequences = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                past_key_values=cache,
                do_sample=params.temperature > 0,
                temperature=params.temperature or None,
                top_p=params.top_p,
                top_k=params.top_k or None,
                max_new_tokens=params.max_new_tokens,
                num_return_sequences=1 if cache is not None else params.n,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.stop_ids,
            )
        finally:
            hook.remove()
        new = sequences[:, enc["input_ids"].shape[1] :]
        chosen, top_ids, top_lps = steps.finish(new)
        return self._rows(batch, prompt_ids, new, chosen, top_ids, top_lps, params)

    def _shared_prefix(self, enc, n: int):
        """The KV cache of every prompt but its last token, computed once and repeated n times, so
        n samples per prompt cost one prefill, not n (prompts are most of the tokens here). None when
        n == 1."""
        if n == 1 or enc["input_ids"].shape[1] < 2:
            return None
        ids, mask = enc["input_ids"][:, :-1], enc["attention_mask"][:, :-1]
        cache = DynamicCache()
        self.model(
            input_ids=ids, attention_mask=mask, position_ids=left_positions(mask), past_key_values=cache, use_cache=True
        )
        cache.batch_repeat_interleave(n)
        return cache

    def _rows(self, batch, prompt_ids, new, chosen, top_ids, top_lps, params: SamplingParams) -> pa.RecordBatch:
        """One row per sample: `chosen` (B, T) the sampled tokens' log-probs (at T), `top_ids` and
        `top_lps` (B, T, k) their top-k (at 1; None when not asked for)."""
        stops = set(self.stop_ids)
        columns: dict[str, list] = {k: [] for k in GENERATED_COLUMNS}
        extra = {name: batch.column(name).to_pylist() for name in batch.schema.names if name not in columns}
        for name in extra:
            columns[name] = []
        prompts = batch.column("prompt").to_pylist()
        lengths = []
        for row in range(new.shape[0]):
            src = row // params.n
            ids = new[row].tolist()
            length = next((i + 1 for i, t in enumerate(ids) if t in stops), len(ids))  # through the stop token
            lengths.append(length)
            columns["sample_id"].append(f"{batch_id(batch)}/{src}/{row % params.n}")
            columns["prompt"].append(prompts[src])
            columns["completion"].append(self.tokenizer.decode(ids[:length], skip_special_tokens=True))
            columns["prompt_ids"].append(prompt_ids[src])
            columns["completion_ids"].append(ids[:length])
            columns["completion_logprobs"].append(chosen[row, :length].tolist())
            columns["policy_version"].append(self.version)
            columns["truncated"].append(ids[length - 1] not in stops if length else True)
            for name, values in extra.items():
                columns[name].append(values[src])
        rb = make_batch(batch_id(batch), columns)
        if top_ids is not None:
            rb = with_columns(rb, compact_topk([(top_ids[i, :n], top_lps[i, :n]) for i, n in enumerate(lengths)]))
        return rb.replace_schema_metadata(batch.schema.metadata)

    def precision(self) -> str:
        """What this generator computes its log-probs in (loading.precision)."""
        return precision(self.spec.dtype, self.spec.quantize_4bit)

    def weights_dtype(self) -> str:
        """The dtype a sync should ship weights in: that of the parameters it writes (the
        adapter's under LoRA: peft keeps an adapter float32 on a bfloat16 base), the widest."""
        adapter = self.spec.lora_r or self.spec.adapter_path
        named = [(n, p) for n, p in self.model.named_parameters() if p.is_floating_point()]
        dtypes = {p.dtype for n, p in named if "lora_" in n or not adapter}
        widest = max(dtypes or {torch.float32}, key=lambda d: d.itemsize)
        return next((name for name, d in DTYPES.items() if d == widest), "float32")

    def load_weights(self, weights: dict[str, np.ndarray], version: int) -> float:
        """Install weights from the trainer (a sync hands one object reference, which Ray resolves
        here): a PEFT adapter state dict under LoRA, else full parameters, cast to the parameters'
        dtypes; int16 arrays are bfloat16 bits (numpy has no bfloat16). Returns the seconds it took."""
        started = time.perf_counter()
        tensors = {k: torch.tensor(v, device=self.device) for k, v in weights.items()}
        tensors = {k: t.view(torch.bfloat16) if t.dtype == torch.int16 else t for k, t in tensors.items()}
        with self._lock:
            self._install(tensors)
        self.version = version
        return time.perf_counter() - started

    def _install(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.spec.lora_r or self.spec.adapter_path:
            result = set_peft_model_state_dict(self.model, tensors)
            if getattr(result, "unexpected_keys", None):
                raise ValueError(f"adapter keys the generator does not have: {result.unexpected_keys[:3]}")
        else:
            missing = set(tensors) - set(dict(self.model.named_parameters()))
            if missing:
                raise ValueError(f"weights the generator does not have: {sorted(missing)[:3]}")
            self.model.load_state_dict(tensors, strict=False)

    def score_topk(self, batch: pa.RecordBatch, k: int) -> pa.RecordBatch:
        """Teacher-forced top-k log-probs at every completion token of samples someone else wrote
        (on-policy distillation: the student samples, the teacher grades each token). Replaces the
        batch's topk_ids / topk_logprobs, flattened (T*k) as generate() stores them."""
        prompts, completions = batch.column("prompt_ids").to_pylist(), batch.column("completion_ids").to_pylist()
        with self._lock, torch.no_grad():  # one chunk's (rows, T, V) log-probs at a time, then their top-k
            tops = [
                torch.topk(logp, k, dim=-1)
                for lo in range(0, len(prompts), SCORE_ROWS)
                for logp in self._completion_logps(prompts[lo : lo + SCORE_ROWS], completions[lo : lo + SCORE_ROWS])
            ]
        return with_columns(batch, compact_topk([(top.indices, top.values) for top in tops]))

    def _completion_logps(self, prompts: list[list[int]], completions: list[list[int]]) -> list[torch.Tensor]:
        """One left-padded forward over prompt + completion rows -> per row a (T_i, V) float32
        log-softmax at its T_i completion tokens. Left padding lines the completions up at the end,
        so logits are computed for the last max(T_i) + 1 positions only (logits_to_keep)."""
        enc = self.tokenizer.pad(
            {"input_ids": [p + c for p, c in zip(prompts, completions, strict=True)]}, return_tensors="pt"
        ).to(self.device)
        keep = max(map(len, completions)) + 1
        logits = self.model(
            input_ids=enc["input_ids"],
            attention_mask=enc["attention_mask"],
            position_ids=left_positions(enc["attention_mask"]),
            logits_to_keep=keep,
        ).logits.float()  # (B, keep, V); row i's completion is predicted at keep - T_i - 1 .. keep - 2
        return [torch.log_softmax(logits[i, keep - len(c) - 1 : keep - 1], -1) for i, c in enumerate(completions)]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @torch.no_grad()
    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        """input_ids (B, T) -> logits (B, T, V) float32."""
        return self.model(input_ids=torch.from_numpy(input_ids).to(self.device)).logits.float().cpu().numpy()
