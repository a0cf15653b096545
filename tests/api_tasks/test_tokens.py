"""Token costs: tiktoken where it fits the model and is on disk, an estimate otherwise."""

from __future__ import annotations

import tiktoken

from api_tasks.execution.tokens import count_prompt, estimate_cost, offline_encodings

MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Count the tokens in this sentence, please.",
             "name": "alice"}]


def _recipe(encoding: tiktoken.Encoding) -> int:
    """OpenAI's counting recipe for chat prompts, written out by hand."""
    total = 3
    for message in MESSAGES:
        total += 3 + sum(len(encoding.encode(v)) for v in message.values())
        total += 1 if "name" in message else 0
    return total


def test_an_openai_model_is_counted_with_its_real_encoding_offline() -> None:
    encoding = tiktoken.get_encoding("cl100k_base_offline")
    cost = estimate_cost({"model": "gpt-4", "messages": MESSAGES, "max_tokens": 50, "n": 2})
    assert cost == _recipe(encoding) + 100
    prompt = "The quick brown fox jumps over the lazy dog " * 20
    assert estimate_cost({"model": "gpt-3.5-turbo-instruct", "prompt": prompt,
                          "max_tokens": 10}) != estimate_cost({"model": "llama-3", "prompt":
                                                               prompt, "max_tokens": 10})


def test_other_models_and_the_estimate_setting_use_four_characters_a_token() -> None:
    prompt = "x" * 401
    assert estimate_cost({"model": "llama-3-8b", "prompt": prompt, "max_tokens": 7}) == 101 + 1 + 7
    assert estimate_cost({"model": "gpt-4", "prompt": prompt, "max_tokens": 7},
                         tokenizer="estimate") == 101 + 1 + 7
    assert estimate_cost({"model": "m", "prompt": [1, 2, 3], "max_tokens": 0}) == 3


def test_a_named_encoding_loads_from_disk_and_an_unknown_one_is_never_downloaded() -> None:
    encoding = tiktoken.get_encoding("cl100k_base_offline")
    text = "Tokenizers split words into pieces."
    assert count_prompt("cl100k_base", "any-model")(text) == len(encoding.encode(text))
    assert count_prompt("o200k_base", "gpt-4o")(text) == 9  # not on disk: the estimate
    assert "cl100k_base_offline" in offline_encodings()


def test_a_missing_or_negative_ceiling_is_never_free() -> None:
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert estimate_cost(base) > 256
    assert estimate_cost({**base, "max_tokens": -5}) >= 1


def test_an_embedding_counts_its_input_and_a_response_its_output_ceiling() -> None:
    texts = ["x" * 40, "y" * 80]
    assert estimate_cost({"model": "m", "input": texts}, reply=False) == (10 + 1) + (20 + 1)
    assert estimate_cost({"model": "m", "input": "x" * 40, "max_tokens": 50},
                         reply=False) == 11  # no reply: a ceiling given anyway counts nothing
    assert estimate_cost({"model": "m", "input": [[1, 2, 3], [4, 5]]}, reply=False) == 5
    framed = estimate_cost({"model": "m", "input": [{"role": "user", "content": "x" * 40}],
                            "max_output_tokens": 100})
    assert framed == 3 + (3 + 1 + 10) + 100  # priming, the message's framing, role, text
    plain = estimate_cost({"model": "m", "input": "x" * 40, "instructions": "y" * 8,
                           "max_output_tokens": 7})
    assert plain == 11 + (3 + 2) + 7
