"""merge_payload: later layers win, None removes, unknown fields pass through, shallow."""

from api_tasks.upstream.merge import merge_payload


def test_later_layers_win() -> None:
    merged = merge_payload({"a": 1, "b": 1}, {"b": 2, "c": 2}, {"c": 3})
    assert merged == {"a": 1, "b": 2, "c": 3}


def test_none_removes_a_default_and_a_later_value_restores_it() -> None:
    assert merge_payload({"presence_penalty": 0.5}, {"presence_penalty": None}) == {}
    assert merge_payload({"x": 1}, {"x": None}, {"x": 2}) == {"x": 2}


def test_nested_values_are_replaced_whole() -> None:
    merged = merge_payload({"response_format": {"type": "json_schema", "schema": {}}},
                           {"response_format": {"type": "json_object"}})
    assert merged == {"response_format": {"type": "json_object"}}


def test_inputs_are_not_mutated_and_unknown_fields_pass() -> None:
    base, job = {"a": 1}, {"logprobs": True, "n": 2, "stop": ["\n"], "user": "u"}
    merged = merge_payload(base, job)
    assert merged == {"a": 1, **job} and base == {"a": 1}
