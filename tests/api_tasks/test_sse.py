"""The SSE decoder against the framing real servers produce."""

from __future__ import annotations

import pytest

from api_tasks.errors import InvalidResponseError
from api_tasks.stream.sse import SSEDecoder, SSEEvent


def _feed_all(parts: list[bytes]) -> list[SSEEvent]:
    decoder = SSEDecoder()
    events = [e for part in parts for e in decoder.feed(part)]
    return events + decoder.close()


def test_data_comments_event_and_done() -> None:
    raw = b': keep-alive\n\n:\nevent: message\ndata: {"a":1}\n\ndata: [DONE]\n\n'
    assert _feed_all([raw]) == [SSEEvent('{"a":1}'), SSEEvent("[DONE]")]


def test_multiline_data_is_joined_with_newlines() -> None:
    assert _feed_all([b"data: {\"a\":\ndata: 1}\n\n"]) == [SSEEvent('{"a":\n1}')]


@pytest.mark.parametrize("ending", [b"\r\n", b"\r", b"\n"])
def test_every_line_ending(ending: bytes) -> None:
    raw = b"data: a" + ending + b"data: b" + ending + ending + b"data: c" + ending + ending
    assert _feed_all([raw]) == [SSEEvent("a\nb"), SSEEvent("c")]


def test_crlf_split_across_reads_is_one_line_ending() -> None:
    assert _feed_all([b"data: a\r", b"\ndata: b\r\n\r", b"\n"]) == [SSEEvent("a\nb")]


def test_utf8_split_across_reads_and_byte_by_byte() -> None:
    raw = 'data: {"c":"héllo 你好 🎉"}\n\n'.encode()
    expected = [SSEEvent('{"c":"héllo 你好 🎉"}')]
    assert _feed_all([raw[:12], raw[12:]]) == expected
    assert _feed_all([raw[i:i + 1] for i in range(len(raw))]) == expected


def test_event_name_id_and_no_space_after_colon() -> None:
    assert _feed_all([b"event: error\nid: 7\ndata:x\n\n"]) == [SSEEvent("x", "error", "7")]


def test_invalid_utf8_becomes_replacement_characters() -> None:
    assert _feed_all([b"data: a\xff\xfeb\n\n"]) == [SSEEvent("a\ufffd\ufffdb")]


def test_final_event_without_blank_line_is_flushed_at_close() -> None:
    assert _feed_all([b"data: last"]) == [SSEEvent("last")]


def test_line_over_the_cap_raises() -> None:
    decoder = SSEDecoder(max_line_bytes=1024)
    with pytest.raises(InvalidResponseError) as caught:
        decoder.feed(b"data: " + b"x" * 2000)
    assert caught.value.code == "line_too_long"


def test_a_bom_at_the_start_is_ignored() -> None:
    assert _feed_all([b"\xef\xbb\xbfdata: a\n\n"]) == [SSEEvent("a")]


def test_a_long_line_in_small_reads_is_not_rescanned() -> None:
    decoder = SSEDecoder(max_line_bytes=8 * 1024 * 1024)
    piece = b"x" * 1024
    decoder.feed(b"data: ")
    for _ in range(4096):  # 4 MiB: quadratic rescanning would take seconds here
        assert decoder.feed(piece) == []
    assert decoder.feed(b"\n\n") == [SSEEvent("x" * 4 * 1024 * 1024)]
