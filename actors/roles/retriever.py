"""The retriever role: BM25 (bm25s) over a job's corpus. The index is built once per corpus content
and settings (common/retrieval.index_key), stored under the job service's index directory, and
loaded by every later retriever with the same key; stages ask it for passages in batches.

    r = Retriever(RetrieverSpec(corpus="handbook.jsonl", index_root="artifacts/indexes"))
    r.retrieve(["my refund never came"], k=3)   # [[("refunds-basic", 3.2), ...]]
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import bm25s
from stillroom.actors.common.retrieval import Document, RetrieverSpec, content_digest, index_key, load_corpus

STOPWORDS = "english"
COMPLETE = "COMPLETE"


def words(texts: list[str]) -> list[list[str]]:
    """What BM25 matches on: lower-cased words of two or more characters, English stopwords out."""
    return bm25s.tokenize(texts, stopwords=STOPWORDS, return_ids=False, show_progress=False)


class Retriever:
    def __init__(self, spec: RetrieverSpec):
        self.spec = spec
        self.docs = load_corpus(spec.corpus, spec.format)
        self.by_id = {d.id: d for d in self.docs}
        self.key = index_key(content_digest(spec.corpus), spec.kind, bm25s.__version__)
        self.dir = Path(spec.index_root) / self.key
        self.built_s = 0.0 if (self.dir / COMPLETE).exists() else self._build()
        self.index = bm25s.BM25.load(str(self.dir), show_progress=False)

    def __repr__(self) -> str:
        return f"Retriever({self.spec.name}, {self.spec.kind}, {len(self.docs)} documents, index {self.key})"

    def _build(self) -> float:
        """Index the corpus into a temporary directory, then rename it into place (two jobs
        building the same index at once: one rename wins, both indexes are the same)."""
        started = time.perf_counter()
        index = bm25s.BM25()
        index.index(words([f"{d.title} {d.text}" for d in self.docs]), show_progress=False)
        tmp = self.dir.with_name(f"{self.key}.tmp{os.getpid()}")
        index.save(str(tmp), show_progress=False)
        (tmp / "documents.json").write_text(json.dumps([asdict(d) for d in self.docs]))
        (tmp / COMPLETE).write_text(json.dumps({"documents": len(self.docs), "kind": self.spec.kind}))
        try:
            tmp.rename(self.dir)
        except OSError:  # another retriever put the same index there first
            shutil.rmtree(tmp, ignore_errors=True)
        return time.perf_counter() - started

    def retrieve(self, queries: list[str], k: int) -> list[list[tuple[str, float]]]:
        """The k best (document id, BM25 score) per query, best first; fewer where fewer documents
        share a word with the query (none: an empty list)."""
        k = min(k, len(self.docs))
        ids, scores = self.index.retrieve(words(queries), k=k, show_progress=False, n_threads=1)
        return [
            [(self.docs[int(i)].id, float(s)) for i, s in zip(row, srow, strict=True) if s > 0]
            for row, srow in zip(ids, scores, strict=True)
        ]

    def documents(self, ids: list[str]) -> list[Document]:
        return [self.by_id[i] for i in ids]

    def passages(self, queries: list[str], k: int) -> list[list[Document]]:
        """The k best documents per query, whole (what a prompt shows)."""
        return [self.documents([i for i, _ in hits]) for hits in self.retrieve(queries, k)]

    def info(self) -> dict:
        size = sum(f.stat().st_size for f in self.dir.rglob("*") if f.is_file())
        return {"key": self.key, "documents": len(self.docs), "built_s": self.built_s, "bytes": size}
