"""Key names: one shard keeps the names the project always had; with more, everything one
script touches for a job or a batch shares a Redis Cluster slot."""

from __future__ import annotations

import uuid

from redis.crc import key_slot

from api_tasks.batches.api_batches import batch_event, output_file_ids
from api_tasks.record.keys import Keys
from api_tasks.record.webhooks import job_event_id
from config.settings import Settings


def _slot(key: str) -> int:
    return key_slot(key.encode())


def test_one_shard_keeps_the_documented_names() -> None:
    keys = Keys("p")
    assert [keys.job("j"), keys.events("j"), keys.channel("j"),
            keys.running(0), keys.running_messages(0), keys.delayed(0), keys.batches(0),
            keys.batch("batch_b"), keys.batch_input("batch_b"), keys.file("file-f"),
            keys.file_data("file-f"), keys.webhooks(0), keys.webhook("evt_j-0"),
            keys.worker("w")] == [
        "p:job:j", "p:events:j", "p:channel:j", "p:running",
        "p:running:messages", "p:delayed", "p:batches", "p:batch:batch_b",
        "p:batch:batch_b:input", "p:file:file-f", "p:file:file-f:data", "p:webhooks",
        "p:webhook:evt_j-0", "p:worker:w"]


def test_a_jobs_keys_and_its_shards_indexes_share_a_slot() -> None:
    keys = Keys("p", 8)
    seen = set()
    for job_id in [str(uuid.uuid4()) for _ in range(300)] + ["a-b", "batch_x-b-c"]:
        shard = keys.shard(job_id)
        seen.add(shard)
        delivery = f"{job_event_id(job_id)}-0"
        slots = {_slot(k) for k in (
            keys.job(job_id), keys.result(job_id), keys.events(job_id), keys.cancel(job_id),
            keys.running(shard), keys.running_messages(shard),
            keys.delayed(shard), keys.delayed_messages(shard), keys.webhooks(shard),
            keys.webhook(delivery))}
        assert len(slots) == 1, job_id
        assert keys.job(job_id).startswith(f"p:job:{{s{shard}}}:")
    assert seen == set(range(8))  # the jobs spread over every shard


def test_a_batch_its_lines_files_and_events_share_a_slot() -> None:
    keys = Keys("p", 8)
    for _ in range(100):
        batch_id = f"batch_{uuid.uuid4().hex}"
        shard = keys.shard(batch_id)
        output, errors = output_file_ids(batch_id)
        event = f"evt_{batch_id.removeprefix('batch_')}"
        line = f"{batch_id}-17"
        slots = {_slot(k) for k in (
            keys.batch(batch_id), keys.batch_input(batch_id), keys.batch_jobs(batch_id),
            keys.batch_output(batch_id), keys.batch_errors(batch_id),
            keys.batch_staged(batch_id, "t"), keys.batch_lock(batch_id), keys.batches(shard),
            keys.file(output), keys.file(errors), keys.webhook(f"{event}-1"),
            keys.job(line), keys.running(keys.shard(line)),
            keys.webhook(f"{job_event_id(line)}-0"))}
        assert len(slots) == 1, batch_id


def test_a_batchs_webhook_event_is_queued_in_its_shard(settings: Settings) -> None:
    keys = Keys("p", 8)
    batch_id = f"batch_{uuid.uuid4().hex}"
    hooks = batch_event(keys, settings, "hooked", "batch.completed", batch_id)
    assert hooks.keys and len({_slot(k) for k in hooks.keys}) == 1
    assert _slot(hooks.keys[0]) == _slot(keys.batch(batch_id))
    # its owner's index and the sender's wake-up follow the script, on slots of their own
    assert [call.script for call in hooks.after] == ["owner_index"] * (len(hooks.keys) - 1) \
        + ["wake"]


def test_an_upstream_groups_limits_and_deployments_share_a_slot() -> None:
    """Everything ``admit``, ``route`` and ``routed`` touch for one group: its scopes (its
    own, a model glob's, a deployment's, a learnt model's) and its deployments' state."""
    keys = Keys("p", 8, {"pair-a": "pair", "pair-b": "pair"})
    group = [keys.limit("pair"), keys.in_flight("pair/gpt-*"), keys.line("pair-a"),
             keys.line_until("pair-b/m-1"), keys.line_costs("pair"), keys.cooldown("pair-a"),
             keys.calls("pair-b"), keys.latency("pair-a"), keys.breaker("pair-b"),
             keys.breaker_failures("pair-a"), keys.limit("pair/org/model")]
    assert len({_slot(k) for k in group}) == 1
    assert keys.breaker("pair-a") == "p:breaker:{g:pair}:pair-a"
    assert keys.limit("key:main") == "p:limit:{g:key:main}:key:main"  # a key's: its own
    assert Keys("p", 1, {"pair-a": "pair"}).limit("pair-a") == "p:limit:pair-a"
