"""OpenAI's Files API on the gateway through the official SDK: upload, list, read, download,
delete; files belong to their key; bad uploads leave nothing; a large one is never held."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import redis

from api_tasks.record.keys import Keys
from tests.conftest import GATEWAY_KEY as KEY
from tests.conftest import GATEWAY_OTHER_KEY as OTHER_KEY
from tests.conftest import start_gateway
from tests.support.services import GatewayProcess, wait_until

pytestmark = pytest.mark.integration


def _sdk(gateway: GatewayProcess, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0, timeout=60)


def _keys(gateway: GatewayProcess) -> Keys:
    """The key names of the gateway's prefix and shards."""
    env = gateway.env
    return Keys(env["API_TASKS_PREFIX"], int(env.get("API_TASKS_REDIS_SHARDS", "1")))


def _file_keys(redis_client: redis.Redis, prefix: str) -> set[bytes]:
    return {k for k in redis_client.scan_iter(match=f"{prefix}:file:*", count=1000)}


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_a_file_goes_up_and_comes_back_byte_for_byte(gateway: GatewayProcess,
                                                      redis_client: redis.Redis) -> None:
    sdk = _sdk(gateway)
    # several 1 MiB pieces, a last short one, bytes of every value, CRLF and UTF-8 lines
    data = (bytes(range(256)) * 4096 + "é\r\n{\"custom_id\": \"ü\"}\n".encode()) * 3
    made = sdk.files.create(file=("数据 é.jsonl", data), purpose="batch",
                            expires_after={"anchor": "created_at", "seconds": 3600})
    assert (made.object, made.bytes, made.filename, made.purpose, made.status) == (
        "file", len(data), "数据 é.jsonl", "batch", "processed")
    assert made.id.startswith("file-") and made.expires_at == made.created_at + 3600
    assert sdk.files.retrieve(made.id) == made
    assert sdk.files.content(made.id).read() == data
    keys = _keys(gateway)
    assert redis_client.exists(keys.file(made.id)) == 1
    assert 3500 < redis_client.ttl(keys.file_data(made.id)) <= 3600
    assert sdk.files.delete(made.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        sdk.files.retrieve(made.id)
    assert not redis_client.exists(keys.file(made.id), keys.file_data(made.id))


def test_a_keys_files_list_newest_first_and_page_as_the_sdk_expects(
        gateway: GatewayProcess) -> None:
    sdk = _sdk(gateway, OTHER_KEY)  # its own key: other tests' files stay out of its list
    made = [sdk.files.create(file=(f"f{n}.jsonl", b"{}\n" * n), purpose="batch").id
            for n in range(5)]
    listed = [f.id for f in sdk.files.list(limit=2) if f.id in made]  # auto-paging
    assert listed == made[::-1]
    oldest = [f.id for f in sdk.files.list(limit=3, order="asc") if f.id in made]
    assert oldest == made
    assert [f.id for f in sdk.files.list(purpose="batch_output")] == []
    sdk.files.delete(made[2])
    assert [f.id for f in sdk.files.list(limit=2) if f.id in made] == \
        [made[4], made[3], made[1], made[0]]
    for file_id in made[:2] + made[3:]:
        sdk.files.delete(file_id)


def test_files_belong_to_the_key_that_uploaded_them(gateway: GatewayProcess) -> None:
    mine = _sdk(gateway).files.create(file=("mine.jsonl", b"{}\n"), purpose="batch")
    other = _sdk(gateway, OTHER_KEY)
    for attempt in (lambda: other.files.retrieve(mine.id),
                    lambda: other.files.content(mine.id), lambda: other.files.delete(mine.id)):
        with pytest.raises(openai.NotFoundError) as caught:
            attempt()
        assert caught.value.body["code"] == "file_not_found"  # type: ignore[index]
    assert mine.id not in [f.id for f in other.files.list()]
    assert _sdk(gateway).files.retrieve(mine.id).id == mine.id
    _sdk(gateway).files.delete(mine.id)


def test_bad_uploads_are_refused_naming_the_field_and_leave_nothing(
        gateway: GatewayProcess, redis_client: redis.Redis) -> None:
    sdk = _sdk(gateway)
    prefix = gateway.env["API_TASKS_PREFIX"]
    before = _file_keys(redis_client, prefix)
    data = b"x" * (3 * 1024 * 1024)  # stored in pieces before the bad field is read
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.files.create(file=("a.jsonl", data), purpose="fine-tune")
    assert caught.value.body["param"] == "purpose"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.files.create(file=("a.jsonl", data), purpose="batch",
                         expires_after={"anchor": "created_at", "seconds": 10})
    assert caught.value.body["param"] == "expires_after.seconds"  # type: ignore[index]
    auth = {"Authorization": f"Bearer {KEY}"}
    no_file = httpx.post(gateway.url + "/v1/files", headers=auth,
                         files={"purpose": (None, "batch")})  # multipart, with no file
    assert no_file.status_code == 400 and no_file.json()["error"]["param"] == "file"
    for wrong in ({"json": {"purpose": "batch"}}, {"data": {"purpose": "batch"}}):
        assert httpx.post(gateway.url + "/v1/files", headers=auth, **wrong).status_code == 415
    two = httpx.post(gateway.url + "/v1/files", headers=auth, data={"purpose": "batch"},
                     files=[("file", ("a", b"1")), ("file", ("b", b"2"))])
    assert two.status_code == 400 and two.json()["error"]["param"] == "file"
    assert _file_keys(redis_client, prefix) == before


@pytest.fixture(scope="module")
def small_gateway(worker_env: dict[str, str], workdir: Path) -> Iterator[GatewayProcess]:
    """A gateway whose files may be 100 KB at most."""
    process = start_gateway(worker_env, workdir, "small-gateway",
                            lambda config: config.update(files={"max_bytes": 100_000}))
    yield process
    process.stop()


def test_a_file_over_the_cap_is_refused_whether_or_not_it_says_its_size(
        small_gateway: GatewayProcess, redis_client: redis.Redis) -> None:
    prefix = small_gateway.env["API_TASKS_PREFIX"]
    before = _file_keys(redis_client, prefix)
    with pytest.raises(openai.APIStatusError) as caught:
        _sdk(small_gateway).files.create(file=("big.jsonl", b"x" * 300_000), purpose="batch")
    assert caught.value.status_code == 413

    def chunked() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield (b"--b\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
               b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n\r\n")
        for _ in range(40):
            yield b"y" * 10_000
        yield b"\r\n--b--\r\n"
    answer = httpx.post(small_gateway.url + "/v1/files", content=chunked(), headers={
        "Authorization": f"Bearer {KEY}", "Content-Type": "multipart/form-data; boundary=b"})
    assert answer.status_code == 413 and answer.json()["error"]["code"] == "file_too_large"
    fits = _sdk(small_gateway).files.create(file=("ok.jsonl", b"z" * 99_000), purpose="batch")
    assert fits.bytes == 99_000
    keys = _keys(small_gateway)
    assert _file_keys(redis_client, prefix) - before == {
        keys.file(fits.id).encode(), keys.file_data(fits.id).encode()}


def test_a_large_upload_and_download_pass_through_without_being_held(
        gateway: GatewayProcess, tmp_path: Path) -> None:
    assert gateway.proc is not None
    path = tmp_path / "big.jsonl"
    with path.open("wb") as out:
        for _ in range(48):
            out.write(os.urandom(512 * 1024).hex().encode()[:1024 * 1024 - 1] + b"\n")
    sdk = _sdk(gateway)
    # a small file first, so what the first transfer sets up once is not counted as held
    warm = sdk.files.create(file=("warm.jsonl", b"w" * (3 << 20)), purpose="batch")
    assert len(sdk.files.content(warm.id).content) == 3 << 20
    sdk.files.delete(warm.id)
    before = _rss_mb(gateway.proc.pid)
    peak = [before]

    def sample() -> bool:
        peak[0] = max(peak[0], _rss_mb(gateway.proc.pid))  # type: ignore[union-attr]
        return False

    stop = threading.Event()
    sampler = threading.Thread(target=lambda: wait_until(
        lambda: sample() or stop.is_set(), 120, "the transfer", interval=0.05), daemon=True)
    sampler.start()
    with path.open("rb") as source:
        made = sdk.files.create(file=("big.jsonl", source), purpose="batch")
    size = path.stat().st_size
    assert made.bytes == size
    with httpx.stream("GET", f"{gateway.url}/v1/files/{made.id}/content",
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as answer:
        got = 0
        with path.open("rb") as source:
            for piece in answer.iter_bytes(1 << 20):
                assert piece == source.read(len(piece))
                got += len(piece)
    stop.set()
    sampler.join()
    assert got == size
    grown = peak[0] - before
    assert grown < 20, f"the gateway grew {grown:.0f} MB moving a {size >> 20} MB file"
    sdk.files.delete(made.id)
