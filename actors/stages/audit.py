"""The `audit` stage: a data-quality report before any GPU hour is spent.

Per split: rows, empty or missing fields, exact duplicates, duplicate prompts with conflicting
answers, near duplicates (MinHash over word 3-shingles), length in tokens, label distribution.
Across splits: leakage of eval/test inputs into train/unlabeled. Writes audit/report.json and
audit/report.md, and fails the job when a threshold is crossed (unless warn_only).
"""

from __future__ import annotations

import json
import re
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable

import numpy as np
from stillroom.actors.common import datasets
from stillroom.actors.models.loading import load_tokenizer
from stillroom.actors.runtime.context import StageContext, StageFailed
from stillroom.v1 import job_pb2 as pb

TRAIN_SIDE, EVAL_SIDE = ("train", "unlabeled"), ("eval", "test")
_PRIME = (1 << 61) - 1


def normalize(text: str) -> str:
    return " ".join(text.lower().split())


def shingles(text: str, n: int = 3) -> np.ndarray:
    """Stable 32-bit hashes of the word n-grams of normalized text. Shape (num_shingles,)."""
    words = re.findall(r"\w+", text.lower())
    grams = [" ".join(words[i : i + n]) for i in range(max(1, len(words) - n + 1))] if words else []
    return np.unique(np.array([zlib.crc32(g.encode()) for g in grams], dtype=np.uint64))


def minhash(sh: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """MinHash signature: min over shingles of (a*x + b) mod p. sh (S,), a and b (P,) -> (P,)."""
    if sh.size == 0:
        return np.full(a.shape, _PRIME, dtype=np.uint64)
    return ((a[:, None] * sh[None, :] + b[:, None]) % _PRIME).min(axis=1)


def jaccard(x: np.ndarray, y: np.ndarray) -> float:
    if x.size == 0 and y.size == 0:
        return 1.0
    inter = np.intersect1d(x, y, assume_unique=True).size
    return inter / (x.size + y.size - inter)


def near_duplicate_pairs(
    texts: list[str],
    threshold: float,
    others: list[str] | None = None,
    num_perm: int = 64,
    bands: int = 16,
    seed: int = 0,
    tick: Callable[[], None] = lambda: None,
) -> list[tuple[int, int, float]]:
    """(i, j, similarity) with Jaccard >= threshold: within `texts` (i < j), or texts[i] vs others[j].
    LSH over `bands` bands of the MinHash finds candidates; each is confirmed by exact Jaccard.
    `tick` is called every 1000 rows (a stage checks for cancellation there)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 1 << 31, num_perm, dtype=np.uint64)
    b = rng.integers(0, 1 << 31, num_perm, dtype=np.uint64)

    def signatures(strings: list[str]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        sh, sig = [], []
        for i, t in enumerate(strings):
            if i % 1000 == 0:
                tick()
            sh.append(shingles(t))
            sig.append(minhash(sh[-1], a, b))
        return sh, sig

    left, sig_l = signatures(texts)
    right, sig_r = (left, sig_l) if others is None else signatures(others)
    rows = num_perm // bands
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for j, sig in enumerate(sig_r):
        for band in range(bands):
            buckets[(band, sig[band * rows : (band + 1) * rows].tobytes())].append(j)
    found: dict[tuple[int, int], float] = {}
    for i, sig in enumerate(sig_l):
        if i % 1000 == 0:
            tick()
        for band in range(bands):
            for j in buckets.get((band, sig[band * rows : (band + 1) * rows].tobytes()), ()):
                if (others is None and j <= i) or (i, j) in found:
                    continue
                sim = jaccard(left[i], right[j])
                if sim >= threshold:
                    found[(i, j)] = sim
    return sorted((i, j, s) for (i, j), s in found.items())


def length_stats(lengths: list[int], max_tokens: int) -> dict[str, float]:
    if not lengths:
        return {"count": 0}
    arr = np.asarray(lengths)
    return {
        "min": int(arr.min()),
        "mean": round(float(arr.mean()), 1),
        "p50": int(np.percentile(arr, 50)),
        "p90": int(np.percentile(arr, 90)),
        "p99": int(np.percentile(arr, 99)),
        "max": int(arr.max()),
        "over_max_tokens": int((arr > max_tokens).sum()),
    }


def label_value(example: datasets.Example, name: str):
    """A label: a reference column, the completion itself, or a top-level field of a JSON completion."""
    if name in example.references:
        return example.references[name]
    if name == "completion":
        return example.completion
    try:
        parsed = json.loads(example.completion or "")
    except (json.JSONDecodeError, TypeError):
        return None
    return parsed.get(name) if isinstance(parsed, dict) else None


def audit_split(
    examples: list[datasets.Example],
    count_tokens: Callable[[list[str]], list[int]],
    params: pb.AuditStage,
    tick: Callable[[], None] = lambda: None,
) -> dict:
    n = len(examples)
    labelled = any(e.completion is not None for e in examples)
    empty_prompt = sum(1 for e in examples if not e.prompt.strip())
    empty_completion = sum(1 for e in examples if labelled and not (e.completion or "").strip())
    by_prompt: dict[str, set[str]] = defaultdict(set)
    rows = Counter()
    for e in examples:
        by_prompt[normalize(e.prompt)].add(normalize(e.completion or ""))
        rows[(normalize(e.prompt), normalize(e.completion or ""))] += 1
    duplicates = sum(c - 1 for c in rows.values())
    conflicting = sum(1 for answers in by_prompt.values() if len(answers) > 1)
    prompts = [e.prompt for e in examples]
    # Identical prompts are counted above; near duplicates are the ones that differ a little.
    pairs = [
        (i, j, s)
        for i, j, s in near_duplicate_pairs(prompts, params.near_duplicate_threshold or 0.85, tick=tick)
        if normalize(prompts[i]) != normalize(prompts[j])
    ]
    near_rows = {j for _, j, _ in pairs}
    text = [e.prompt + ("\n" + e.completion if e.completion else "") for e in examples]
    report = {
        "rows": n,
        "labelled": labelled,
        "empty_prompt": empty_prompt,
        "empty_completion": empty_completion,
        "empty_fraction": _frac(max(empty_prompt, empty_completion), n),
        "duplicate_rows": duplicates,
        "duplicate_fraction": _frac(duplicates, n),
        "conflicting_prompts": conflicting,
        "near_duplicate_rows": len(near_rows),
        "near_duplicate_fraction": _frac(len(near_rows), n),
        "near_duplicate_examples": [[i + 1, j + 1, round(s, 3)] for i, j, s in pairs[:10]],
        "tokens": length_stats(count_tokens(text), params.max_tokens or 2048),
    }
    if params.label_fields and labelled:
        report["labels"] = {
            f: dict(Counter(str(label_value(e, f)) for e in examples).most_common(20)) for f in params.label_fields
        }
    return report


def leakage(
    train_side: list[str], eval_side: list[str], threshold: float, tick: Callable[[], None] = lambda: None
) -> dict:
    """Eval-side rows whose prompt also appears (exactly or nearly) on the train side."""
    seen = {normalize(t) for t in train_side}
    exact = {i for i, t in enumerate(eval_side) if normalize(t) in seen}
    near = {i for i, _, _ in near_duplicate_pairs(eval_side, threshold, others=train_side, tick=tick)} - exact
    return {
        "exact": len(exact),
        "near": len(near),
        "fraction": _frac(len(exact | near), len(eval_side)),
        "rows": sorted(i + 1 for i in exact | near)[:20],
    }


def violations(report: dict, params: pb.AuditStage) -> list[str]:
    """The thresholds the report crosses, as sentences."""
    limits = {
        "empty_fraction": params.max_empty_fraction or 0.01,
        "duplicate_fraction": params.max_duplicate_fraction or 0.05,
        "near_duplicate_fraction": params.max_near_duplicate_fraction or 0.2,
    }
    out = []
    for split, r in report["splits"].items():
        if r["rows"] < (params.min_rows or 1):
            out.append(f"{split} has {r['rows']} rows, fewer than min_rows {params.min_rows or 1}")
        out += [f"{split} {k} {r[k]:.3f} > max {v:g}" for k, v in limits.items() if r[k] > v]
    max_leak = params.max_leakage_fraction
    out += [
        f"{pair} leakage {r['fraction']:.3f} > max {max_leak:g} ({r['exact']} exact, {r['near']} near)"
        for pair, r in report["leakage"].items()
        if r["fraction"] > max_leak
    ]
    return out


def run(params: pb.AuditStage, spec: pb.JobSpec, ctx: StageContext) -> None:
    """Stage entry point."""
    splits = {name: getattr(spec.data, name) for name in TRAIN_SIDE + EVAL_SIDE if getattr(spec.data, name).path}
    count_tokens, unit = _token_counter(spec)
    report: dict = {"token_unit": unit, "splits": {}, "leakage": {}}
    examples = {}
    for done, (name, ref) in enumerate(splits.items()):
        ctx.check_cancelled()
        ds = datasets.load_ref(ref)
        examples[name] = ds.examples()
        report["splits"][name] = {
            "path": ref.path,
            "shape": ds.shape,
            "columns": ds.columns,
            **audit_split(examples[name], count_tokens, params, tick=ctx.check_cancelled),
        }
        ctx.progress(done + 1, len(splits), "splits")
    threshold = params.near_duplicate_threshold or 0.85
    for a in (s for s in TRAIN_SIDE if s in examples):
        for b in (s for s in EVAL_SIDE if s in examples):
            report["leakage"][f"{a}/{b}"] = leakage(
                [e.prompt for e in examples[a]], [e.prompt for e in examples[b]], threshold, tick=ctx.check_cancelled
            )
    report["violations"] = violations(report, params)
    out = ctx.artifact_dir / "audit"
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True))
    (out / "report.md").write_text(summary(report))
    ctx.artifact(out / "report.json", "report")
    ctx.artifact(out / "report.md", "report")
    ctx.metrics(_headline(report))
    if report["violations"] and not params.warn_only:
        raise StageFailed("data audit failed: " + "; ".join(report["violations"]))


def summary(report: dict) -> str:
    """The human-readable report."""
    lines = ["# Data audit", ""]
    for name, r in report["splits"].items():
        t = r["tokens"]
        lines += [
            f"## {name}: {r['rows']} rows ({r['shape']})",
            "",
            f"- empty prompts {r['empty_prompt']}, empty answers {r['empty_completion']}",
            f"- exact duplicate rows {r['duplicate_rows']} ({r['duplicate_fraction']:.1%}), "
            f"prompts with conflicting answers {r['conflicting_prompts']}",
            f"- near-duplicate rows {r['near_duplicate_rows']} ({r['near_duplicate_fraction']:.1%})",
            f"- length in {report['token_unit']}: min {t.get('min')}, p50 {t.get('p50')}, p90 {t.get('p90')}, "
            f"max {t.get('max')}, over limit {t.get('over_max_tokens')}",
        ]
        for field, dist in r.get("labels", {}).items():
            lines.append(f"- {field}: " + ", ".join(f"{k} {v}" for k, v in dist.items()))
        lines.append("")
    for pair, r in report["leakage"].items():
        lines.append(f"- leakage {pair}: {r['exact']} exact, {r['near']} near ({r['fraction']:.1%})")
    lines += ["", "## Verdict", ""]
    lines += [f"- FAIL: {v}" for v in report["violations"]] or ["- pass: no threshold crossed"]
    return "\n".join(lines) + "\n"


def _headline(report: dict) -> dict[str, float]:
    out = {}
    for name, r in report["splits"].items():
        out.update(
            {
                f"{name}/rows": r["rows"],
                f"{name}/duplicate_fraction": r["duplicate_fraction"],
                f"{name}/near_duplicate_fraction": r["near_duplicate_fraction"],
                f"{name}/tokens_p50": r["tokens"].get("p50", 0),
            }
        )
    out.update({f"leakage/{k}": r["fraction"] for k, r in report["leakage"].items()})
    out["violations"] = len(report["violations"])
    return out


def _frac(a: int, n: int) -> float:
    return round(a / n, 6) if n else 0.0


def _token_counter(spec: pb.JobSpec) -> tuple[Callable[[list[str]], list[int]], str]:
    """Count with the teacher's tokenizer when there is one, else in words."""
    if not spec.teacher.path:
        return (lambda texts: [len(t.split()) for t in texts]), "words"
    tok = load_tokenizer(spec.teacher)
    return (lambda texts: [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]), "tokens"
