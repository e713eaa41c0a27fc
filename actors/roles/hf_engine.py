"""The `hf` engine of the Generator role (the default): transformers `generate` with a forward hook
that keeps, per step, the sampled token's log-prob at the sampling temperature and the top-k at
temperature 1; the n samples of a prompt share one prefill (a repeated KV cache); teacher grading
(score) is one left-padded forward per chunk of rows; weight syncs load a PEFT adapter or full
parameters in place. generator.py holds the role around it (lock, policy version, rows).
"""

from __future__ import annotations

import numpy as np
import torch
from peft import PeftModel, set_peft_model_state_dict
from stillroom.actors.algo.losses import tempered
from stillroom.actors.models.loading import DTYPES, load_causal_lm, stop_ids, with_new_adapter
from stillroom.actors.roles.engine import Sampled
from transformers import DynamicCache

SCORE_ROWS = 16  # rows per teacher-forced forward in score: bounds its (rows, T, V) logits


def left_positions(mask: torch.Tensor) -> torch.Tensor:
    """mask (B, T) of a left-padded batch -> position ids (B, T) that count real tokens only, as
    each row alone would have them (pads get 0)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


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


class HfEngine:
    """A transformers model (plus a PEFT adapter) on the role's device. Not thread-safe: the role
    calls it under its lock."""

    def __init__(self, spec, device: str, tokenizer):
        self.spec, self.device, self.tokenizer = spec, device, tokenizer
        model = load_causal_lm(spec.model_path, spec.dtype, spec.quantize_4bit)
        if spec.adapter_path:
            model = PeftModel.from_pretrained(model, spec.adapter_path, is_trainable=False)
            if spec.frozen and not spec.quantize_4bit:
                model = model.merge_and_unload()
        elif spec.lora_r:
            model = with_new_adapter(model, spec.lora_r, spec.lora_alpha, target_modules=spec.target_modules)
        self.model = (model if spec.quantize_4bit else model.to(device)).eval()
        # An answer ends at any of the model's EOS ids or the chat template's end of turn.
        self.stop_ids = stop_ids(tokenizer, self.model.generation_config)
        torch.manual_seed(spec.seed)

    def sample(self, prompt_ids: list[list[int]], params) -> Sampled:
        """params.n samples per prompt, prompt-major; rows run past their stop token (padding)."""
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
                min_new_tokens=params.min_new_tokens or None,
                num_return_sequences=1 if cache is not None else params.n,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.stop_ids,
            )
        finally:
            hook.remove()
        new = sequences[:, enc["input_ids"].shape[1] :]
        chosen, top_ids, top_lps = steps.finish(new)
        rows = range(new.shape[0])
        topk = None if top_ids is None else [(top_ids[r], top_lps[r]) for r in rows]
        return Sampled([new[r].tolist() for r in rows], [chosen[r] for r in rows], topk)

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

    def score(self, prompts: list[list[int]], completions: list[list[int]], k: int):
        """Teacher-forced top-k (ids, log-probs), each (T_i, k) at temperature 1, per row's completion;
        one chunk's (rows, T, V) log-probs at a time."""
        tops = [
            torch.topk(logp, k, dim=-1)
            for lo in range(0, len(prompts), SCORE_ROWS)
            for logp in self._completion_logps(prompts[lo : lo + SCORE_ROWS], completions[lo : lo + SCORE_ROWS])
        ]
        return [(top.indices, top.values) for top in tops]

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

    def weights_dtype(self) -> str:
        """The dtype a sync should ship weights in: that of the parameters it writes (the
        adapter's under LoRA: peft keeps an adapter float32 on a bfloat16 base), the widest."""
        adapter = self.spec.lora_r or self.spec.adapter_path
        named = [(n, p) for n, p in self.model.named_parameters() if p.is_floating_point()]
        dtypes = {p.dtype for n, p in named if "lora_" in n or not adapter}
        widest = max(dtypes or {torch.float32}, key=lambda d: d.itemsize)
        return next((name for name, d in DTYPES.items() if d == widest), "float32")

    def install(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.spec.lora_r or self.spec.adapter_path:
            result = set_peft_model_state_dict(self.model, tensors)
            if getattr(result, "unexpected_keys", None):
                raise ValueError(f"adapter keys the generator does not have: {result.unexpected_keys[:3]}")
        else:
            missing = set(tensors) - set(dict(self.model.named_parameters()))
            if missing:
                raise ValueError(f"weights the generator does not have: {sorted(missing)[:3]}")
            self.model.load_state_dict(tensors, strict=False)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def close(self) -> None:
        """Nothing to stop: the model goes with the role."""

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        """input_ids (B, T) -> logits (B, T, V) float32."""
        return self.model(input_ids=torch.from_numpy(input_ids).to(self.device)).logits.float().cpu().numpy()
