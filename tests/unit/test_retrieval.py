"""Retrieval: BM25 scores against the formula and against bm25s itself, dense scores against
sentence-transformers' own embeddings, hybrid against reciprocal rank fusion by hand, recall@k on
a corpus with known answers, the index reused only for the same corpus, passages placed in prompts with their
provenance, bad corpora refused with the file and row, and the ladder's bookkeeping."""

from __future__ import annotations

import math

import bm25s
import pytest
from stillroom.actors.common.datasets import DataError, Example
from stillroom.actors.common.ladder import build_seconds, recommend, with_shots
from stillroom.actors.common.retrieval import Document, Settings, fuse, load_corpus, recall_at_k, with_passages
from stillroom.actors.roles.retriever import Retriever, RetrieverSpec, packaged_embedder, words
from stillroom.actors.stages.index import role_spec
from stillroom.v1 import job_pb2 as pb

from tests.conftest import write_jsonl

HANDBOOK = [
    {"id": "refund-basic", "title": "Refunds (Basic)", "text": "Basic plan refunds are paid within 14 days."},
    {"id": "refund-pro", "title": "Refunds (Pro)", "text": "Pro plan refunds are paid within 30 days."},
    {"id": "priority", "title": "Priority", "text": "Outages are priority one; billing questions priority three."},
    {"id": "escalation", "title": "Escalation", "text": "Escalate security incidents to the security desk."},
]
QUESTIONS = [  # (question, the passage that answers it)
    ("how many days until my basic refunds are paid", "refund-basic"),
    ("pro refunds: when are they paid", "refund-pro"),
    ("what priority is an outage", "priority"),
    ("who handles a security incident", "escalation"),
]


@pytest.fixture
def handbook(tmp_path):
    return write_jsonl(tmp_path / "handbook.jsonl", HANDBOOK)


def test_bm25_scores_are_lucene_bm25_and_the_librarys_own(handbook, tmp_path):
    r = Retriever(RetrieverSpec(str(handbook), str(tmp_path / "indexes")))
    (hits,) = r.retrieve(["security incidents"], k=4)
    assert [doc for doc, _ in hits] == ["escalation"]  # no other document has either word
    # by hand, for each word: Lucene's idf ln(1 + (N - df + .5) / (df + .5)) times its tf part
    # tf / (tf + k1 (1 - b + b dl / avgdl)), k1 1.5, b .75 (Lucene 8+ drops the constant k1 + 1)
    docs = words([f"{d['title']} {d['text']}" for d in HANDBOOK])
    avg = sum(map(len, docs)) / len(docs)
    doc = docs[3]
    expected = 0.0
    for word in ("security", "incidents"):
        df = sum(word in d for d in docs)
        tf = doc.count(word)
        expected += math.log(1 + (4 - df + 0.5) / (df + 0.5)) * tf / (tf + 1.5 * (0.25 + 0.75 * len(doc) / avg))
    assert hits[0][1] == pytest.approx(expected, rel=1e-5)
    library = bm25s.BM25()
    library.index(docs, show_progress=False)
    own = library.get_scores(words(["pro refunds paid"])[0])
    ranked = r.retrieve(["pro refunds paid"], k=4)[0]
    assert [s for _, s in ranked] == pytest.approx(sorted((s for s in own if s > 0), reverse=True), rel=1e-5)
    assert ranked[0][0] == "refund-pro"


def test_recall_at_k_on_questions_with_known_answers(handbook, tmp_path):
    r = Retriever(RetrieverSpec(str(handbook), str(tmp_path / "indexes")))
    retrieved = [[doc for doc, _ in hits] for hits in r.retrieve([q for q, _ in QUESTIONS], k=1)]
    assert recall_at_k([gold for _, gold in QUESTIONS], retrieved) == 1.0
    assert recall_at_k(["refund-pro", "priority"], [["refund-basic"], ["priority"]]) == 0.5
    assert r.retrieve(["zebra"], k=3) == [[]]  # nothing shares a word: no passage, no error


def test_the_index_is_reused_only_for_the_same_corpus(handbook, tmp_path):
    first = Retriever(RetrieverSpec(str(handbook), str(tmp_path / "indexes")))
    again = Retriever(RetrieverSpec(str(handbook), str(tmp_path / "indexes")))
    assert first.built_s > 0 and again.built_s == 0.0 and again.key == first.key
    write_jsonl(handbook, [*HANDBOOK[:3], {"id": "escalation", "text": "Escalate security to the CISO."}])
    changed = Retriever(RetrieverSpec(str(handbook), str(tmp_path / "indexes")))
    assert changed.key != first.key and changed.built_s > 0
    assert changed.passages(["security"], 1)[0][0].text == "Escalate security to the CISO."
    assert sorted(p.name for p in (tmp_path / "indexes").iterdir()) == sorted([first.key, changed.key])


PARAPHRASES = [  # (question sharing no word with its passage, the passage that answers it)
    ("our servers are down and nobody can log in, how urgent is this", "priority"),
    ("someone hacked my account, who do I tell", "escalation"),
    ("when do I get my money back", "refund-basic"),
]


def test_reciprocal_rank_fusion_by_hand():
    fused = fuse([["a", "b", "c"], ["b", "c", "d"]], k=3)
    # b: 1/(60+2) + 1/(60+1); c: 1/(60+3) + 1/(60+2); a: 1/(60+1); d: 1/(60+3)
    assert [d for d, _ in fused] == ["b", "c", "a"]
    assert [s for _, s in fused] == pytest.approx([1 / 62 + 1 / 61, 1 / 63 + 1 / 62, 1 / 61])
    assert fuse([["x"], []], k=5) == [("x", pytest.approx(1 / 61))]


def test_dense_finds_paraphrases_bm25_cannot_and_hybrid_fuses_both(handbook, tmp_path):
    from sentence_transformers import SentenceTransformer

    root = str(tmp_path / "indexes")
    lexical = Retriever(RetrieverSpec(str(handbook), root))
    dense = Retriever(RetrieverSpec(str(handbook), root, kind="dense"))
    queries = [q for q, _ in PARAPHRASES]
    assert lexical.retrieve(queries, k=2) == [[], [], []]  # no shared word: BM25 finds nothing
    hits = dense.retrieve(queries, k=4)
    assert [row[0][0] for row in hits] == [gold for _, gold in PARAPHRASES]
    # the scores are cosine similarities of the library's own embeddings of title: text
    model = SentenceTransformer(str(packaged_embedder(tmp_path / "indexes" / "embedders")))
    docs = model.encode([f"{d['title']}: {d['text']}" for d in HANDBOOK], normalize_embeddings=True)
    q = model.encode(queries[:1], normalize_embeddings=True)[0]
    cosine = {d["id"]: float(v @ q) for d, v in zip(HANDBOOK, docs, strict=True)}
    assert dict(hits[0]) == pytest.approx(cosine, abs=1e-5)
    assert [s for _, s in hits[0]] == pytest.approx(sorted(cosine.values(), reverse=True), abs=1e-5)
    hybrid = Retriever(RetrieverSpec(str(handbook), root, kind="hybrid"))
    asked = [q for q, _ in QUESTIONS] + queries
    each = [[[d for d, _ in row] for row in r.retrieve(asked, k=4)] for r in (lexical, dense)]
    assert hybrid.retrieve(asked, k=2) == [fuse([b, d], k=2) for b, d in zip(*each, strict=True)]
    assert [row[0][0] for row in hybrid.retrieve(queries, k=1)] == [gold for _, gold in PARAPHRASES]
    assert len({lexical.key, dense.key, hybrid.key}) == 3  # each kind its own index
    recipe = pb.JobSpec(retrieval=pb.RetrievalSpec(retriever=pb.RETRIEVER_KIND_HYBRID))
    role = role_spec(recipe, pb.DatasetRef(path=str(handbook)), tmp_path / "indexes")
    assert role == hybrid.spec  # what a job's stages start
    again = Retriever(RetrieverSpec(str(handbook), root, kind="hybrid"))
    assert again.built_s == 0.0 and again.key == hybrid.key  # reused, model and all
    assert sorted(p.name for p in (tmp_path / "indexes" / hybrid.key).iterdir()) == [
        "COMPLETE",
        "bm25",
        "dense.npy",
        "documents.json",
    ]


@pytest.mark.parametrize(
    ("rows", "problem"),
    [
        ([{"id": "a", "text": "x"}, {"id": "b", "text": ""}], "row 2: document 'b' has no 'text'"),
        ([{"id": "a", "text": "x"}, {"text": "y"}], "row 2: a document needs an 'id'"),
        ([{"id": "a", "text": "x"}, {"id": "a", "text": "y"}], "row 2: duplicate document id 'a' (first at row 1)"),
        ([], "the corpus has no documents"),
    ],
)
def test_a_bad_corpus_names_the_file_and_row(tmp_path, rows, problem):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(__import__("json").dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError) as e:
        load_corpus(path)
    assert str(path) in str(e.value) and problem in str(e.value)


def test_passages_go_where_the_template_says_with_their_provenance():
    settings = Settings.of(pb.RetrievalSpec(top_k=2, template="Policy:\n{passages}\nTicket: {prompt}"))
    docs = [Document("refund-pro", "Pro refunds take 30 days.", "Refunds")]
    ex = with_passages(settings, Example("my refund?", "30", {"plan": "pro"}), docs, "abc123")
    assert ex.prompt == "Policy:\n[refund-pro] Refunds: Pro refunds take 30 days.\nTicket: my refund?"
    assert ex.references == {"plan": "pro", "query": "my refund?", "passage_ids": ["refund-pro"], "index": "abc123"}
    chat = Example(
        "hi\nmy refund?", None, {}, [{"role": "system", "content": "hi"}, {"role": "user", "content": "my refund?"}]
    )
    out = with_passages(settings, chat, docs, "abc123")
    assert out.messages[0] == {"role": "system", "content": "hi"}  # only the user's turn gets passages
    assert out.messages[1]["content"].startswith("Policy:\n[refund-pro]") and out.messages[1]["content"].endswith(
        "my refund?"
    )
    assert Settings.of(pb.RetrievalSpec()) == Settings()  # proto zeros are the defaults


def test_the_ladders_few_shot_prompts_costs_and_recommendation():
    shots = [Example("2+2", "4"), Example("3+3", "6")]
    ex = with_shots(shots, Example("5+5", "10"))
    assert [t["role"] for t in ex.messages] == ["user", "assistant", "user", "assistant", "user"]
    assert ex.prompt == "2+2\n4\n\n3+3\n6\n\n5+5" and ex.completion == "10"
    lineage = {"teacher_sft": ["sft"], "teacher_grpo": ["sft", "grpo"], "student": ["sft", "grpo", "distill"]}
    seconds = {"index": 2.0, "sft": 10.0, "grpo": 30.0, "distill": 20.0}
    assert build_seconds("base_teacher+rag", lineage, seconds, ["index"]) == 2.0
    assert build_seconds("student+rag", lineage, seconds, ["index"]) == 62.0
    assert build_seconds("teacher_grpo", lineage, seconds, ["index"]) == 40.0
    results = {
        "base_teacher": {"acc": 0.2, "build_s": 0.0, "parameters": 100.0},
        "base_teacher+rag": {"acc": 0.6, "build_s": 2.0, "parameters": 100.0},
        "teacher_sft+rag": {"acc": 0.92, "build_s": 12.0, "parameters": 100.0},
        "student+rag": {"acc": 0.95, "build_s": 62.0, "parameters": 10.0},
    }
    best, lines = recommend(results, "acc", 0.9)
    assert best == "teacher_sft+rag"
    assert lines == ["student+rag: acc 0.950 (+0.030 over teacher_sft+rag), +50 s more to make"]
    none, short = recommend(results, "acc", 0.99)
    assert none is None and short[0] == "base_teacher: acc 0.200, 0.790 short of 0.99"


def test_a_student_without_passages_learns_the_teachers_answers_from_the_question_alone(tiny_tokenizer):
    from stillroom.actors.models.loading import encode_prompt
    from stillroom.actors.runtime.batches import make_batch
    from stillroom.actors.stages.distill import without_passages
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer)
    with_docs = "Use these passages:\n[billing] billing tickets are refund\n\nticket 7 about billing order"
    batch = make_batch(
        "b000",
        {
            "prompt": [with_docs],
            "query": ["ticket 7 about billing order"],
            "prompt_ids": [encode_prompt(tok, with_docs)],
            "completion_ids": [[5, 6]],
            "topk_ids": [[5, 9, 6, 9]],
        },
    )
    bare = without_passages(batch, tok)
    assert bare.column("prompt_ids").to_pylist() == [encode_prompt(tok, "ticket 7 about billing order")]
    assert len(bare.column("prompt_ids")[0]) < len(batch.column("prompt_ids")[0])
    assert bare.column("completion_ids").to_pylist() == [[5, 6]]  # the teacher's answer and top-k, as written
    assert bare.column("topk_ids").to_pylist() == [[5, 9, 6, 9]]
    assert bare.schema.metadata == batch.schema.metadata  # the batch keeps its id
