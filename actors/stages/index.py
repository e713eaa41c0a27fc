"""Retrieval in a job: the `index` stage, and the passages every other stage puts in its prompts.

    index:    data.corpus -> Retriever role (builds the BM25, dense or hybrid index once per corpus
              content and settings, under <artifacts>/indexes/<key>) -> index/info.json, metrics, progress
    examples: a split's rows -> Retriever role (one batched call per chunk) -> the rows with
              passages placed by retrieval.template, and their provenance (passage_ids, index)

A stage asks for its rows through `examples` / `prompt_rows`; without `retrieval` in the spec
they are the split's rows unchanged.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import ray
from stillroom.actors.common import datasets
from stillroom.actors.common.datasets import Example
from stillroom.actors.common.retrieval import RetrieverSpec, Settings, recall_at_k, with_passages
from stillroom.actors.runtime.context import StageContext, StageFailed
from stillroom.v1 import job_pb2 as pb

CHUNK = 512  # queries per call on the retriever


def run(params: pb.IndexStage, spec: pb.JobSpec, ctx: StageContext) -> None:
    """Build (or find) the corpus's index and say which, how big, and how long it took."""
    if not spec.data.corpus.path:
        raise StageFailed("the index stage needs data.corpus")
    ctx.progress(0, 1, "indexes")
    with retriever(ctx, spec) as r:
        info = ray.get(r.info.remote())
    out = ctx.artifact_dir / ctx.stage
    out.mkdir(parents=True, exist_ok=True)
    (out / "info.json").write_text(json.dumps(info | {"reused": info["built_s"] == 0.0}, indent=2))
    ctx.artifact(out / "info.json", "index")
    ctx.outputs["index"] = info["key"]
    ctx.metrics({"index/documents": info["documents"], "index/bytes": info["bytes"], "index/build_s": info["built_s"]})
    ctx.log(
        f"{info['kind']} index {info['key']}: "
        + ("reused" if info["built_s"] == 0.0 else f"built in {info['built_s']:.2f} s")
    )
    ctx.progress(1, 1, "indexes")


@contextmanager
def retriever(ctx: StageContext, spec: pb.JobSpec, corpus: pb.DatasetRef | None = None):
    """A retriever actor over `corpus` (data.corpus unless given), held only inside the block."""
    group = ctx.roles(spec.resources, ("retriever",))
    try:
        index_root = ctx.artifact_dir.parent / "indexes"  # shared by the service's jobs
        (actor,) = group.start("retriever", role_spec(spec, corpus or spec.data.corpus, index_root))
        yield actor
    finally:
        group.close()


def role_spec(spec: pb.JobSpec, ref: pb.DatasetRef, index_root: Path) -> RetrieverSpec:
    """The retriever role's spec: the corpus `ref`, and the job's retrieval kind and model."""
    settings = Settings.of(spec.retrieval)
    fmt = datasets.ref_format(ref)
    return RetrieverSpec(ref.path, str(index_root), fmt, settings.kind, settings.embedding_model)


def examples(ctx: StageContext, spec: pb.JobSpec, ref: pb.DatasetRef, rag: bool = True) -> list[Example]:
    """A split's examples, each with its retrieved passages when the job has `retrieval` (and rag)."""
    rows = datasets.load_ref(ref).examples()
    if not (rag and spec.HasField("retrieval") and rows):
        return rows
    return retrieved(ctx, spec, rows)


def prompt_rows(ctx: StageContext, spec: pb.JobSpec, ref: pb.DatasetRef, rag: bool = True) -> list[dict]:
    """Rows to generate from (Example.prompt_row), with passages as `examples` gives them."""
    return [ex.prompt_row() for ex in examples(ctx, spec, ref, rag)]


def retrieved(ctx: StageContext, spec: pb.JobSpec, rows: list[Example], corpus=None) -> list[Example]:
    """`rows` with the top_k passages of the corpus for each; prompts that match no passage are
    counted (a warning and retrieval/empty_fraction), and keep their prompt with none."""
    settings = Settings.of(spec.retrieval)
    with retriever(ctx, spec, corpus) as r:
        key = ray.get(r.info.remote())["key"]
        queries = [ex.prompt for ex in rows]
        calls = [r.passages.remote(queries[lo : lo + CHUNK], settings.top_k) for lo in range(0, len(queries), CHUNK)]
        passages = [docs for chunk in ray.get(calls) for docs in chunk]
    empty = sum(not docs for docs in passages)
    metrics = {"retrieval/empty_fraction": empty / len(rows), "retrieval/prompts": len(rows)}
    gold = [str(ex.references.get(settings.gold_column) or "") for ex in rows] if settings.gold_column else []
    if any(gold):  # the split names the passage that answers each row
        metrics[f"retrieval/recall@{settings.top_k}"] = recall_at_k(gold, [[d.id for d in p] for p in passages])
    ctx.metrics(metrics)
    if empty:
        ctx.warn(f"retrieval found no passage for {empty} of {len(rows)} prompts; they go without passages")
    return [with_passages(settings, ex, docs, key) for ex, docs in zip(rows, passages, strict=True)]
