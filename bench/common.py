"""What every benchmark shares: the machine's description and its measured matrix-multiply peak,
a tiny Llama built from a config, timing, and writing results (a printed table and
bench/results/<name>.json)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def machine() -> dict:
    import torch

    info = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def matmul_peak(dtype: str = "float32", n: int = 2048, repeats: int = 5) -> float:
    """The machine's sustained matrix-multiply rate in FLOP/s (the best of `repeats` n x n products):
    the ceiling a training step's FLOPs are compared with (MFU)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    kind = getattr(torch, dtype)
    a, b = torch.randn(n, n, dtype=kind, device=device), torch.randn(n, n, dtype=kind, device=device)
    a @ b  # warm-up
    best = min(timed(lambda: a @ b, sync=device == "cuda") for _ in range(repeats))
    return 2 * n**3 / best


def timed(fn: Callable[[], object], sync: bool = False) -> float:
    import torch

    started = time.perf_counter()
    fn()
    if sync:
        torch.cuda.synchronize()
    return time.perf_counter() - started


def median(values: list[float]) -> float:
    return statistics.median(values)


def tiny_llama(
    out: Path, layers: int = 4, hidden: int = 256, vocab: int = 4096, seed: int = 0, tokenizer: str = ""
) -> Path:
    """A random Llama of the given shape with a byte-level tokenizer trained here (no hub), or with
    the tokenizer (and chat template) of the model at `tokenizer`."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if (out / "config.json").exists():
        return out
    if tokenizer:
        fast = AutoTokenizer.from_pretrained(tokenizer)
    else:
        corpus = [f"ticket {i} about billing shipping refund priority order account {i * 7}" for i in range(2000)]
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel()
        specials = ["<unk>", "<eos>", "<pad>"]
        tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials))
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>")
    fast.save_pretrained(out)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=hidden,
        intermediate_size=hidden * 3,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def report(name: str, rows: list[dict], columns: list[str], extra: dict | None = None) -> Path:
    """Print rows as a Markdown table and write {machine, rows, ...} to bench/results/<name>.json."""
    print(f"\n## {name}\n")
    print("| " + " | ".join(columns) + " |")
    print("|" + " --- |" * len(columns))
    for row in rows:
        print("| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine(), "rows": rows}
    path.write_text(json.dumps(payload | (extra or {}), indent=2) + "\n")
    print(f"\n(written to {path})")
    return path


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return "" if value is None else str(value)


def run_stage(spec, workdir: Path, outputs: dict | None = None) -> list:
    """Run the spec's one stage in this process with its real role actors on a local Ray started
    here (no control service). Returns the stage's events (stillroom.v1.Event)."""
    import threading

    import ray
    from stillroom.actors.common.stages import runner
    from stillroom.actors.runtime.context import EventLog, StageContext
    from stillroom.v1 import job_pb2 as pb

    stage = spec.stages[0]
    kind = stage.WhichOneof("kind")
    log = EventLog()
    ctx = StageContext("bench", kind, workdir, log, threading.Event(), spec.seed, outputs or {}, ("bench",), kind)
    repo = str(Path(__file__).parents[1])  # role actors import bench reward functions
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": repo}})
    try:
        runner(kind)(getattr(stage, kind), spec, ctx)
    finally:
        ctx.close()
        ray.shutdown()
    return [pb.Event.FromString(b) for b in log.since(0)[0]]


def step_seconds(events: list, key: str = "train/step") -> list[float]:
    """Seconds between consecutive metrics events that carry `key` (one per training step)."""
    times = [e.time.seconds + e.time.nanos / 1e9 for e in events if key in e.metrics]
    return [b - a for a, b in zip(times, times[1:], strict=False)]
