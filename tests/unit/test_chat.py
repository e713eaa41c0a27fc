"""Chat data keeps its roles: the tokenizer's own chat template renders a row's system prompt and
turns, the loss covers the assistant's answer with the template's end of turn (not EOS), and
generation stops at every EOS id of the model's generation config and at the end of turn."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from stillroom.actors.common.datasets import load
from stillroom.actors.models.loading import encode_examples, encode_prompt, stop_ids
from transformers import AutoTokenizer

from tests.conftest import write_jsonl

# A default system prompt when the row has none, and an end of turn <|end|> that is not EOS (<eos>).
TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|turn|>system\nticket priority<|end|>\n{% endif %}"
    "{% for m in messages %}<|turn|>{{ m['role'] }}\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|turn|>assistant\n{% endif %}"
)
CHAT = [
    {
        "messages": [
            {"role": "system", "content": "shipping"},
            {"role": "user", "content": "ticket 1 about billing"},
            {"role": "assistant", "content": "refund"},
            {"role": "user", "content": "order 2"},
            {"role": "assistant", "content": "priority order"},
        ]
    }
]


@pytest.fixture(scope="module")
def chat_tokenizer(tiny_tokenizer, tmp_path_factory):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<|turn|>", "<|end|>"]})
    tok.chat_template = TEMPLATE
    out = tmp_path_factory.mktemp("chat-tokenizer")
    tok.save_pretrained(out)
    return AutoTokenizer.from_pretrained(out)


def test_messages_keep_their_roles_and_the_answer_ends_with_the_end_of_turn(chat_tokenizer, tmp_path):
    ex = load(write_jsonl(tmp_path / "chat.jsonl", CHAT)).examples()[0]
    assert [m["role"] for m in ex.messages] == ["system", "user", "assistant", "user"]  # history kept
    assert ex.completion == "priority order"
    arrays = encode_examples(chat_tokenizer, [ex], max_length=512)
    rendered = chat_tokenizer.apply_chat_template(ex.messages, add_generation_prompt=True, tokenize=True)
    assert arrays["prompt_ids"][0] == list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)
    prompt = chat_tokenizer.decode(arrays["prompt_ids"][0])
    # the row's own system prompt (not the template's default), both earlier turns, then the answer's turn
    assert prompt.count("<|turn|>") == 5 and "shipping" in prompt and "ticket 1 about billing" in prompt
    end, eos = chat_tokenizer.convert_tokens_to_ids("<|end|>"), chat_tokenizer.eos_token_id
    completion = arrays["completion_ids"][0]
    assert end in completion and eos not in completion  # the template's end of turn, not EOS
    answer = completion[: completion.index(end)]
    assert chat_tokenizer.decode(answer).replace(" ", "") == "priorityorder"
    # the prompt is all the turns before the answer; the loss covers only the answer's tokens
    whole = chat_tokenizer.apply_chat_template(CHAT[0]["messages"], tokenize=True)
    whole = list(whole["input_ids"]) if hasattr(whole, "keys") else list(whole)
    assert arrays["prompt_ids"][0] + completion == whole


def test_a_plain_prompt_is_one_user_turn_after_the_templates_system_prompt(chat_tokenizer):
    ids = encode_prompt(chat_tokenizer, "order 3")
    text = chat_tokenizer.decode(ids)
    assert text.startswith("<|turn|>") and "priority" in text  # the default system prompt
    assert ids == encode_prompt(chat_tokenizer, "ignored", messages=[{"role": "user", "content": "order 3"}])


def test_prompt_rows_carry_the_turns_to_the_generator(tmp_path):
    rows = load(write_jsonl(tmp_path / "chat.jsonl", CHAT)).prompts()
    assert rows[0]["reference"] == "priority order"
    assert [m["role"] for m in json.loads(rows[0]["messages"])] == ["system", "user", "assistant", "user"]


def test_generation_stops_at_every_eos_id_of_the_generation_config(tiny_model, tmp_path):
    from stillroom.actors.roles.generator import Generator, GeneratorSpec, SamplingParams
    from stillroom.actors.runtime.batches import make_batch
    from transformers import GenerationConfig

    prompts = make_batch("b", {"prompt": ["ticket about billing"]})
    greedy = SamplingParams(n=1, max_new_tokens=8, temperature=0.0)
    free = Generator(GeneratorSpec(str(tiny_model))).generate(prompts, greedy).to_pylist()[0]["completion_ids"]
    assert len(free) == 8
    stop = free[2]  # the token greedy decoding writes third
    model = Path(shutil.copytree(tiny_model, tmp_path / "m"))  # the same weights, another generation config
    eos = AutoTokenizer.from_pretrained(tiny_model).eos_token_id
    GenerationConfig(eos_token_id=[eos, stop], pad_token_id=eos).save_pretrained(model)
    gen = Generator(GeneratorSpec(str(model)))
    assert stop in gen.stop_ids and eos in gen.stop_ids
    row = gen.generate(prompts, greedy).to_pylist()[0]
    first = free.index(stop) + 1
    assert row["completion_ids"] == free[:first] and row["truncated"] is False
    assert np.isfinite(row["completion_logprobs"]).all()


def test_stop_ids_include_the_chat_templates_end_of_turn(chat_tokenizer):
    ids = stop_ids(chat_tokenizer)
    assert chat_tokenizer.convert_tokens_to_ids("<|end|>") in ids and chat_tokenizer.eos_token_id in ids
    assert chat_tokenizer.convert_tokens_to_ids("<|turn|>") not in ids  # opens a turn, never ends one
