"""The allow-list for job-chosen URLs, against the forms attackers use."""

from __future__ import annotations

import json
import socket

import pytest

from api_tasks.errors import InvalidJob, UrlRefused
from api_tasks.upstream.call_handle import CallHandle
from api_tasks.upstream.http_client import CallRequest, HttpClient
from api_tasks.upstream.job_urls import AddressGuard, AddressRefused, check_job_url
from config.allow_list import parse_allow_entry
from tests.support.fake_upstream import FakeUpstream

ENTRIES = ("*.internal", "llm-*.corp", "127.0.0.1:8080", "10.0.0.0/8", "[::1]:9000",
           "api.example.com:*")


@pytest.mark.parametrize(("url", "called"), [
    ("http://a.internal/v1", "http://a.internal:80"),
    ("https://llm-x.corp/", "https://llm-x.corp:443"),
    ("HTTP://A.INTERNAL", "http://a.internal:80"),
    ("http://127.0.0.1:8080/v1", "http://127.0.0.1:8080"),
    ("http://10.1.2.3/", "http://10.1.2.3:80"),
    ("http://[::1]:9000/v1/", "http://[::1]:9000"),
    ("http://api.example.com:6379/base/v1", "http://api.example.com:6379/base"),
])
def test_allowed_urls_are_rebuilt_from_their_checked_parts(url: str, called: str) -> None:
    assert check_job_url(ENTRIES, "u", url).url == called


@pytest.mark.parametrize(("url", "why"), [
    # urlsplit and urllib3 disagree on these: urllib3 would connect to 127.0.0.1:80
    ("http://127.0.0.1\\.internal/v1", "backslash"),
    ("http://llm-attacker.example\\.corp/", "backslash"),
    ("http://a.internal@127.0.0.1:8080/", "credentials"),
    ("http://127.0.0.1:8080@a.internal/", "credentials"),
    ("http://a.internal#@evil.example/", "query or a fragment"),
    ("http://a.internal?@evil.example/", "query or a fragment"),
    ("http://%31%32%37.0.0.1:8080/", "percent-encode"),
    ("http://a%2einternal/", "percent-encode"),
    ("http://a.internal\t/", "printable ASCII"),
    ("http://a.internal\r\nHost: evil/", "printable ASCII"),
    ("http://a .internal/", "printable ASCII"),
    ("http://\uff41.internal/", "printable ASCII"),  # a full-width letter, NFKC-folded by IDNA
    ("http://a.internal./", "trailing dot"),
    ("http://a..internal/", "not a valid DNS name"),
    ("http:///a.internal", "with a host"),
    ("//a.internal/", "http:// or https://"),
    ("file:///etc/passwd", "http:// or https://"),
    # one address, many spellings: each reaches 127.0.0.1 where a parser accepts it
    ("http://2130706433:8080/", "unusual form"),
    ("http://0x7f000001:8080/", "unusual form"),
    ("http://0177.0.0.1:8080/", "unusual form"),
    ("http://127.1:8080/", "unusual form"),
    ("http://127.0.0.0x1:8080/", "unusual form"),
    ("http://[::ffff:127.0.0.1]:8080/", "not on upstream"),
    ("http://[::1%25lo]:9000/", "percent-encode"),
    ("http://[::1:9000/", "malformed"),
    # ports: only those the entry names (80 and 443 when it names none)
    ("http://127.0.0.1/", "port 80 is not on"),
    ("http://127.0.0.1:6379/", "port 6379 is not on"),
    ("http://a.internal:6379/", "port 6379 is not on"),
    ("http://a.internal:080/", "a number from 1 to 65535"),
    ("http://a.internal:0/", "a number from 1 to 65535"),
    ("http://a.internal:99999/", "a number from 1 to 65535"),
    ("http://evil.example/", "not on upstream"),
    ("http://llm-x.corp.evil.example/", "not on upstream"),
    (42, "URL string"),
])
def test_ambiguous_and_unlisted_urls_are_refused(url: object, why: str) -> None:
    with pytest.raises(InvalidJob) as caught:
        check_job_url(ENTRIES, "u", url)
    assert caught.value.param == "base_url" and why in str(caught.value)


def test_an_upstream_without_an_allow_list_refuses_every_url() -> None:
    with pytest.raises(InvalidJob, match="does not let jobs choose"):
        check_job_url((), "u", "http://a.internal/")


@pytest.mark.parametrize("entry", ["127.0.0.*", "10.0.*.*", "*", "*.*", "0.0.0.0/0", "[::/0]",
                                   "2130706433", "::1", "[::1",
                                   "a.internal:x", "a.internal:65536", "a/b", "a\\b.internal",
                                   ""])
def test_bad_allow_list_entries_are_refused(entry: str) -> None:
    with pytest.raises(ValueError):
        parse_allow_entry(entry)


def test_a_name_resolving_to_loopback_needs_its_address_listed() -> None:
    with pytest.raises(AddressRefused, match=r"127\.0\.0\.1"):
        AddressGuard(("localhost:8080",)).resolve("localhost", 8080)
    assert AddressGuard(("localhost:8080", "127.0.0.0/8:8080")).resolve("localhost", 8080) \
        == "127.0.0.1"


def test_an_unresolvable_name_is_a_connection_error_not_a_refusal() -> None:
    with pytest.raises(socket.gaierror):
        AddressGuard(("*.invalid",)).resolve("no-such-host.invalid", 80)


def test_an_address_entry_names_only_its_own_ports() -> None:
    guard = AddressGuard(("*.tunnel.example", "10.0.0.5:8000"))
    assert guard.permits("10.0.0.5", 8000)
    assert not guard.permits("10.0.0.5", 80)  # a name under the tunnel glob, on port 80


@pytest.mark.parametrize("address", ["64:ff9b::a00:5", "64:ff9b::7f00:1", "2002:a00:1::1",
                                     "::ffff:0:a00:1", "::7f00:1", "::ffff:127.0.0.1",
                                     "fe80::1", "::1", "169.254.169.254", "100.64.0.1"])
def test_addresses_that_carry_or_are_private_ones_are_not_public(address: str) -> None:
    assert not AddressGuard(("*.example",)).permits(address, 443)


def test_a_pooled_connection_opened_for_another_call_is_checked_again(
        fake: FakeUpstream) -> None:
    """A thread's session keeps connections by host and port: one opened for a configured
    upstream must not carry a job whose allow-list does not name that address."""
    http = HttpClient()
    body = json.dumps({"model": "pool-check", "messages": [{"role": "user", "content": "x"}]})

    def call(guard: AddressGuard | None) -> None:
        request = CallRequest(fake.base_url + "/v1/chat/completions",
                              {"Content-Type": "application/json"}, body.encode(), 2, 5,
                              1 << 20, guard=guard)
        handle = CallHandle("pool-check")
        http.read_json(handle, http.send(handle, request), request)

    call(None)  # a configured upstream: no guard
    with pytest.raises(UrlRefused, match="does not name"):
        call(AddressGuard(("localhost:*",)))
    call(AddressGuard(("127.0.0.0/8:*",)))  # named: the same kept connection is fine
    assert len(fake.requests("pool-check")) == 2
