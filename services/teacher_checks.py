"""Checks of the distill stages against the teacher's architecture, read without torch from its
config.json (a model directory) or its GGUF header (a .gguf file): top_k within the vocabulary,
and a student made by `student_init.config_overrides` that is a sane, smaller model of the
teacher's kind: known keys, positive values, heads that divide, fewer parameters than the teacher.

The parameter count is a Llama-style estimate (embeddings, untied head, attention with grouped
key/value heads, a gated MLP of three matrices): the student and the teacher are counted the same
way, which is what the comparison needs. A teacher whose config cannot be read is not judged here.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from stillroom.actors.common import paths
from stillroom.services.gguf_header import read_config
from stillroom.services.violations import Violations
from stillroom.v1 import job_pb2 as pb

MAX_STUDENT_PARAMS = 100_000_000_000  # 100B: beyond any student, whatever the teacher
MAX_CONFIG_BYTES = 4 << 20  # a config.json is a few KB; a larger one is not read
# Keys whose value sizes the model: they must be >= 1 (token ids, by contrast, may be 0).
SIZE_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
)
# Other spellings of the same sizes in some architectures' config.json (GPT-2, OPT...).
ALIASES = {"n_embd": "hidden_size", "n_layer": "num_hidden_layers", "n_head": "num_attention_heads"}
ALIASES |= {"n_inner": "intermediate_size", "ffn_dim": "intermediate_size", "n_positions": "max_position_embeddings"}


def check_distill_against_teacher(spec: pb.JobSpec, v: Violations) -> None:
    """Each distill stage's top_k and student_init.config_overrides against the teacher."""
    stages = [(i, s.distill) for i, s in enumerate(spec.stages) if s.WhichOneof("kind") == "distill"]
    if not stages or not spec.teacher.path or any(f == "teacher.path" for f, _ in v.items):
        return  # no teacher, or one already refused
    config = teacher_config(spec.teacher.path)
    if config is None:
        return
    vocab = _sizes(config).get("vocab_size")
    for i, d in stages:
        p = f"stages[{i}].distill"
        if vocab and d.top_k > vocab:
            v.check(False, f"{p}.top_k", f"{d.top_k} is more than the teacher's vocabulary of {vocab} tokens")
        if d.student_init.config_overrides and not spec.student.path:
            _check_overrides(config, dict(d.student_init.config_overrides), f"{p}.student_init.config_overrides", v)


def teacher_config(path: str) -> dict | None:
    """The teacher's config (config.json's keys; a GGUF's header as the same keys, marked
    `_gguf`), or None when it cannot be read."""
    try:
        local = paths.package_file(path) if path.startswith("pkg://") else Path(path)
        f = local / "config.json" if local.is_dir() else local
        st = os.stat(f)
    except (paths.PathError, OSError, ValueError):
        return None
    return _read_config(str(f), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=64)
def _read_config(path: str, mtime_ns: int, size: int) -> dict | None:
    """Read once per version of the file (its mtime and size)."""
    try:
        if path.endswith(".gguf"):
            return read_config(path)
        if size > MAX_CONFIG_BYTES:
            return None
        config = json.loads(paths.read_bytes(path, MAX_CONFIG_BYTES))
    except (OSError, ValueError, RecursionError):
        return None
    return config if isinstance(config, dict) else None


def _sizes(config: dict) -> dict[str, int]:
    """The size keys of a config, aliases and a multimodal model's text_config folded in."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    out = {}
    for source in (text, config):
        for key, value in source.items():
            name = ALIASES.get(key, key)
            if name in SIZE_KEYS and isinstance(value, int) and not isinstance(value, bool) and name not in out:
                out[name] = value
    return out


def _check_overrides(config: dict, overrides: dict[str, int], p: str, v: Violations) -> None:
    """Keys the teacher's config has, integers there, values >= 1 (ids >= 0), the teacher's
    vocabulary, heads that divide, and a student smaller than its teacher."""
    before = len(v.items)
    for key, value in overrides.items():
        _check_key(config, key, value, f"{p}[{key!r}]", v)
    if len(v.items) > before:
        return  # sizes from bad values would only repeat them
    teacher = _sizes(config)
    student = teacher | {ALIASES.get(k, k): val for k, val in overrides.items()}
    _check_heads(student, overrides, p, v)
    if "vocab_size" in overrides and teacher.get("vocab_size"):
        v.check(
            student["vocab_size"] == teacher["vocab_size"],
            f"{p}['vocab_size']",
            f"the student shares the teacher's tokenizer: its vocabulary has {teacher['vocab_size']} tokens",
        )
    if len(v.items) == before:
        _check_size(config, teacher, student, overrides, p, v)


def _check_key(config: dict, key: str, value: int, path: str, v: Violations) -> None:
    """A key the teacher's config has, or a size key (transformers' configs have those even where
    config.json leaves them out, e.g. head_dim); a GGUF header shows only the sizes, so its other
    keys are left to the job. An integer there, and a value >= 1 (>= 0 for token ids and flags)."""
    if key not in config and key not in SIZE_KEYS and not config.get("_gguf"):
        ints = sorted(k for k, val in config.items() if isinstance(val, int | None) and not isinstance(val, bool))
        v.check(False, path, f"the teacher's config has no {key!r} (its integer fields: {', '.join(ints)})")
        return
    current = config.get(key)
    if isinstance(current, float | str | list | dict):
        v.check(False, path, f"is a {type(current).__name__} in the teacher's config, not an integer")
        return
    lowest = 0 if key.endswith("_id") or isinstance(current, bool) else 1
    v.check(value >= lowest, path, f"must be >= {lowest}")


def _check_size(config: dict, teacher: dict, student: dict, overrides: dict[str, int], p: str, v: Violations) -> None:
    """A student no larger than its teacher (nor than MAX_STUDENT_PARAMS), named on the override
    that grew the most against the teacher's own value."""
    made, own = estimate_params(student, config | overrides), estimate_params(teacher, config)
    if made is None:
        return
    most = min(own or MAX_STUDENT_PARAMS, MAX_STUDENT_PARAMS)
    if made <= most:
        return
    growth = {k: val / max(teacher.get(ALIASES.get(k, k)) or 1, 1) for k, val in overrides.items()}
    key = max(growth, key=growth.get)
    than = f"the teacher's {own:,}" if most == own else f"this server's bound of {MAX_STUDENT_PARAMS:,}"
    v.check(
        False, f"{p}[{key!r}]", f"makes a student of about {made:,} parameters, more than {than} (Llama-style estimate)"
    )


def estimate_params(sizes: dict[str, int], config: dict) -> int | None:
    """Parameters of a decoder of these sizes, Llama-style: embeddings (and an untied head), per
    layer attention (query and output: heads x head_dim; key and value: kv heads x head_dim), a
    gated MLP (three hidden x intermediate matrices) and two norms. None without width and depth."""
    hidden, layers = sizes.get("hidden_size"), sizes.get("num_hidden_layers")
    if not hidden or not layers:
        return None
    heads = sizes.get("num_attention_heads") or 1
    kv = sizes.get("num_key_value_heads") or heads
    head_dim = sizes.get("head_dim") or max(hidden // heads, 1)
    inter = sizes.get("intermediate_size") or 4 * hidden
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv * head_dim
    layer = attention + 3 * hidden * inter + 2 * hidden
    embeddings = sizes.get("vocab_size", 0) * hidden * (1 if config.get("tie_word_embeddings", True) else 2)
    if "n_positions" in config:  # learned absolute positions (GPT-2): a table of them
        embeddings += sizes.get("max_position_embeddings", 0) * hidden
    return layers * layer + embeddings + hidden


def _check_heads(sizes: dict[str, int], overrides: dict[str, int], p: str, v: Violations) -> None:
    """Attention heads that split the hidden size (unless head_dim is explicit) and key/value heads
    that divide the heads, named on the key the spec changed."""
    hidden, heads, kv = sizes.get("hidden_size"), sizes.get("num_attention_heads"), sizes.get("num_key_value_heads")
    changed = [k for k in ("hidden_size", "num_attention_heads", "num_key_value_heads") if k in overrides]
    if not changed:
        return
    if hidden and heads and "head_dim" not in sizes:
        v.check(
            hidden % heads == 0,
            f"{p}[{changed[0]!r}]",
            f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}",
        )
    if heads and kv:
        v.check(
            heads % kv == 0,
            f"{p}[{changed[-1]!r}]",
            f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}",
        )
