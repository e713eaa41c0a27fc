"""Retrieval's pure parts: the corpus (checked row by row), the key its index is stored under,
how passages are placed in a prompt, and recall@k. The index itself is the retriever role's
(roles/retriever.py); light imports only, so the control plane validates corpora with this too.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from stillroom.actors.common import paths
from stillroom.actors.common.datasets import DataError, Example, read_rows

DEFAULT_TOP_K = 3
DEFAULT_TEMPLATE = "Use these passages:\n{passages}\n\n{prompt}"
DEFAULT_PASSAGE = "[{id}] {title}: {text}"
RRF_K = 60  # reciprocal rank fusion's constant (Cormack, Clarke & Buettcher 2009)
FUSION_DEPTH = 50  # how deep each ranking goes into a fusion


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    title: str = ""


@dataclass(frozen=True)
class RetrieverSpec:
    """The retriever role's spec (roles/retriever.py); here, so a stage names it without bm25s."""

    corpus: str  # the corpus file or directory
    index_root: str  # one directory per index key
    format: str = ""
    kind: str = "bm25"  # bm25, dense or hybrid
    embedding_model: str = ""  # dense and hybrid: a sentence-transformers directory ("": the packaged MiniLM)
    name: str = "retriever"  # <job-id>:retriever:0 when it runs as an actor


@dataclass(frozen=True)
class Settings:
    """How prompts get passages (a stillroom.v1.RetrievalSpec with its defaults applied)."""

    top_k: int = DEFAULT_TOP_K
    kind: str = "bm25"
    template: str = DEFAULT_TEMPLATE
    passage_template: str = DEFAULT_PASSAGE
    gold_column: str = ""
    embedding_model: str = ""

    @classmethod
    def of(cls, spec) -> Settings:
        kind = type(spec).DESCRIPTOR.fields_by_name["retriever"].enum_type.values_by_number[spec.retriever].name
        kind = kind.removeprefix("RETRIEVER_KIND_").lower()
        return cls(
            spec.top_k or DEFAULT_TOP_K,
            "bm25" if kind == "unspecified" else kind,
            spec.template or DEFAULT_TEMPLATE,
            spec.passage_template or DEFAULT_PASSAGE,
            spec.gold_column,
            spec.embedding_model,
        )


def load_corpus(path: str | Path, fmt: str = "", excluded: Iterable[Path] = ()) -> list[Document]:
    """The corpus's documents. Raises DataError naming the file and row: a row without an `id` or
    `text`, a duplicate id, an empty corpus. `excluded`: as datasets.read_rows."""
    _, rows = read_rows(path, fmt, excluded)
    if not rows:
        raise DataError(path, "the corpus has no documents")
    docs, seen = [], {}
    for i, row in enumerate(rows, start=1):
        doc_id, text = row.get("id"), row.get("text")
        if doc_id is None or str(doc_id) == "":
            raise DataError(path, "a document needs an 'id'", row=i)
        if not isinstance(text, str) or not text.strip():
            raise DataError(path, f"document {doc_id!r} has no 'text'", row=i)
        if str(doc_id) in seen:
            raise DataError(path, f"duplicate document id {doc_id!r} (first at row {seen[str(doc_id)]})", row=i)
        seen[str(doc_id)] = i
        docs.append(Document(str(doc_id), text, str(row.get("title") or "")))
    return docs


def content_digest(path: str | Path) -> str:
    """sha256 of a file's bytes, or of every file of a directory (names and bytes, in order).
    Files are read through paths.read_bytes: a FIFO is refused (NotRegularFile), never waited on."""
    path, digest = Path(path), hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
        digest.update(str(f.relative_to(path) if path.is_dir() else "").encode())
        digest.update(paths.read_bytes(f))
    return digest.hexdigest()


def index_key(corpus_digest: str, kind: str, version: str) -> str:
    """What an index is stored under: the corpus content, the retriever and its library version.
    Any of them changing makes another key, so a stale index is never reused."""
    return hashlib.sha256(json.dumps([corpus_digest, kind, version]).encode()).hexdigest()[:16]


def place(settings: Settings, prompt: str, passages: list[Document]) -> str:
    """The prompt with its passages in the template."""
    shown = "\n".join(settings.passage_template.format(id=d.id, title=d.title or d.id, text=d.text) for d in passages)
    return settings.template.replace("{passages}", shown).replace("{prompt}", prompt)


def with_passages(settings: Settings, ex: Example, passages: list[Document], index: str) -> Example:
    """The example as the model sees it with retrieval: the prompt (the last user turn of a
    conversation) with its passages, and the provenance kept as columns: the question alone
    (`query`), `passage_ids` and the `index` key."""
    refs: dict[str, Any] = {**ex.references, "query": ex.prompt, "passage_ids": [d.id for d in passages]}
    refs["index"] = index
    if ex.messages:
        turns = [dict(t) for t in ex.messages]
        users = [i for i, t in enumerate(turns) if t["role"] == "user"]
        last = users[-1] if users else len(turns) - 1
        turns[last]["content"] = place(settings, turns[last]["content"], passages)
        return replace(ex, prompt="\n".join(t["content"] for t in turns), references=refs, messages=turns)
    return replace(ex, prompt=place(settings, ex.prompt, passages), references=refs)


def fuse(rankings: list[list[str]], k: int, rrf_k: int = RRF_K) -> list[tuple[str, float]]:
    """Reciprocal rank fusion: each document scores sum(1 / (rrf_k + rank)) over the rankings it
    is in (rank 1 is the best); the k best (id, score), best first, ties in the order first seen.
    rankings: R lists of document ids, each best first."""
    scores: dict[str, float] = {}
    for ranking in rankings:
        for rank, doc in enumerate(ranking, start=1):
            scores[doc] = scores.get(doc, 0.0) + 1.0 / (rrf_k + rank)
    return sorted(scores.items(), key=lambda item: -item[1])[:k]


def recall_at_k(gold: list[str], retrieved: list[list[str]]) -> float:
    """The fraction of rows whose gold passage id is among the ids retrieved for them."""
    pairs = [(g, ids) for g, ids in zip(gold, retrieved, strict=True) if g]
    return sum(g in ids for g, ids in pairs) / len(pairs) if pairs else float("nan")
