"""Every Redis key and channel name the project uses, under one prefix.

Documented in the README ("Redis keys"); non-Python consumers rely on them.
All are plain strings or JSON, and every one is written with a TTL.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from config.settings import Settings

__all__ = ["Keys", "hash_tag"]


@dataclass(frozen=True)
class Keys:
    """Names of a job's keys under ``prefix``, spread over ``shards`` job shards."""

    prefix: str = "api_tasks"
    shards: int = 1
    # deployment -> its upstream group: a group's scopes and deployments share a slot
    groups: Mapping[str, str] = field(default_factory=dict, hash=False, compare=False)

    @classmethod
    def of(cls, settings: Settings) -> Keys:
        """The key names of these settings: their prefix, shards and upstream groups."""
        groups: dict[str, str] = {}
        for upstream in settings.upstreams:
            for deployment in upstream.deployments or ():
                groups.setdefault(deployment.name, upstream.name)
        return cls(settings.redis.prefix, settings.redis.shards, groups)

    def shard(self, job_id: str) -> int:
        """The shard a job (or batch) lives in: a batch line's (``<batch id>-<n>``) is its
        batch's, so that a batch's scripts reach its lines' keys on one slot. Dashes do not
        count, so that a webhook event's id (``evt_`` and the subject's id without them)
        names its subject's shard too."""
        if self.shards == 1:
            return 0
        if job_id.startswith("batch_"):
            core = job_id.removeprefix("batch_").split("-", 1)[0]
        else:
            core = job_id.replace("-", "")
        return zlib.crc32(core.encode()) % self.shards

    @property
    def every_shard(self) -> range:
        """The shards, for those who sweep them all (the reaper, the scheduler, the pump)."""
        return range(self.shards)

    def _file_tag(self, file_id: str) -> str:
        # a batch's output and error files (``file-<batch's hex>-output``) are in its shard
        return self._tag(file_id.removeprefix("file-").split("-", 1)[0])

    def _tag(self, job_id: str) -> str:
        # a hash tag: a Redis Cluster places every key of one shard on one slot; one shard
        # (a single Redis) keeps the names the project always had
        return f"{{s{self.shard(job_id)}}}:" if self.shards > 1 else ""

    def _group(self, name: str) -> str:
        """The hash tag of the upstream group a scope or deployment belongs to ("" with one
        shard): a group's limits, cool-downs, breakers and loads are read and written by one
        script on a Redis Cluster. A gateway key's own scope (``key:<name>``) is a group of
        its own."""
        if self.shards == 1:
            return ""
        head = name.split("/", 1)[0]
        return f"{{g:{self.groups.get(head, head)}}}:"

    def _at(self, shard: int) -> str:
        """The tag of a shard's own index, after its name ("" with one shard)."""
        return f":{{s{shard}}}" if self.shards > 1 else ""

    def job(self, job_id: str) -> str:
        """Hash: the job's state (status, timestamps, attempts, spec)."""
        return f"{self.prefix}:job:{self._tag(job_id)}{job_id}"

    def result(self, job_id: str) -> str:
        """String: the final JSON envelope (response or error)."""
        return f"{self.prefix}:result:{self._tag(job_id)}{job_id}"

    def events(self, job_id: str) -> str:
        """Stream: every event of the job in order (chunks, then done/error/cancelled)."""
        return f"{self.prefix}:events:{self._tag(job_id)}{job_id}"

    def channel(self, job_id: str) -> str:
        """Pub/sub channel: the same events, live, for fan-out."""
        return f"{self.prefix}:channel:{self._tag(job_id)}{job_id}"

    def cancel(self, job_id: str) -> str:
        """String: present when the job was asked to stop."""
        return f"{self.prefix}:cancel:{self._tag(job_id)}{job_id}"

    def cooldown(self, upstream: str) -> str:
        """String: present while the upstream asked everyone to back off (429)."""
        return f"{self.prefix}:cooldown:{self._group(upstream)}{upstream}"

    def calls(self, deployment: str) -> str:
        """Sorted set: job ids calling a deployment now, by lease expiry (ms): its load."""
        return f"{self.prefix}:calls:{self._group(deployment)}{deployment}"

    def latency(self, deployment: str) -> str:
        """Hash: a deployment's time to first byte, a peak-sensitive moving average (``ewma``,
        ms), and when it was last measured (``at``, ms)."""
        return f"{self.prefix}:latency:{self._group(deployment)}{deployment}"

    def breaker(self, deployment: str) -> str:
        """Hash: a deployment's circuit breaker (open_until, probe_until, opened_at; ms)."""
        return f"{self.prefix}:breaker:{self._group(deployment)}{deployment}"

    def breaker_failures(self, deployment: str) -> str:
        """Sorted set: a deployment's recent failed calls, by time (ms)."""
        return f"{self.prefix}:breaker:{self._group(deployment)}{deployment}:failures"

    def limit(self, scope: str) -> str:
        """Hash: a limit scope's pacing state (theoretical arrival times, ms)."""
        return f"{self.prefix}:limit:{self._group(scope)}{scope}"

    def in_flight(self, scope: str) -> str:
        """Sorted set: job ids calling within a limit scope, by lease expiry (ms)."""
        return f"{self.prefix}:inflight:{self._group(scope)}{scope}"

    def line(self, scope: str) -> str:
        """Sorted set: jobs waiting for a limit scope without a turn, by submit time (ms)."""
        return f"{self.prefix}:line:{self._group(scope)}{scope}"

    def line_until(self, scope: str) -> str:
        """Sorted set: when each job in a scope's line leaves it unless it asks again (ms)."""
        return f"{self.prefix}:line:{self._group(scope)}{scope}:until"

    def line_costs(self, scope: str) -> str:
        """Hash: the token cost of each job in a scope's line (what its head needs kept)."""
        return f"{self.prefix}:line:{self._group(scope)}{scope}:costs"

    def delayed(self, shard: int) -> str:
        """Sorted set: jobs waiting (for a limit) outside any worker, by due time (ms)."""
        return f"{self.prefix}:delayed{self._at(shard)}"

    def delayed_messages(self, shard: int) -> str:
        """Hash: the task message of each delayed job, sent again when it is due."""
        return f"{self.prefix}:delayed:messages{self._at(shard)}"

    def delayed_wake(self) -> str:
        """List: at most one token, left by whatever adds a delayed job, for the sweeping
        scheduler, which waits on it until the next due job it knows of (``background.Sweep``)."""
        return f"{self.prefix}:delayed:wake"

    def running(self, shard: int) -> str:
        """Sorted set: jobs a worker claimed, by when their lease lapses (ms)."""
        return f"{self.prefix}:running{self._at(shard)}"

    def running_messages(self, shard: int) -> str:
        """Hash: the task message of each claimed job, to send it again if it is lost."""
        return f"{self.prefix}:running:messages{self._at(shard)}"

    def sweeper(self) -> str:
        """String: the token of the one worker that sweeps for the cluster (sends due jobs,
        steps batches, sends webhooks); it lapses when not renewed."""
        return f"{self.prefix}:sweeper"

    def sweeper_stand_ins(self) -> list[str]:
        """Strings: the sweeper role's stand-ins, one in each job shard's slot, taken in
        order while the role's own node is out of reach (on a Redis Cluster); none with one
        shard."""
        return [f"{self.prefix}:sweeper:{{s{n}}}" for n in range(self.shards)] \
            if self.shards > 1 else []

    def batch(self, batch_id: str) -> str:
        """Hash: a detached batch's state, counts and summed usage (``usage.<name>``)."""
        return f"{self.prefix}:batch:{self._tag(batch_id)}{batch_id}"

    def batch_staged(self, batch_id: str, token: str) -> str:
        """List: the checked lines of a batch's input file, staged by one validation before
        they become its input (expires with the upload window)."""
        return f"{self.prefix}:batch:{self._tag(batch_id)}{batch_id}:staged:{token}"

    def owned_batches(self, owner: str) -> str:
        """Sorted set: a gateway key's batches, by creation time (us), for ``GET
        /v1/batches``."""
        return f"{self.prefix}:owner:{owner}:batches"

    def batch_input(self, batch_id: str) -> str:
        """List: the batch's input lines, as uploaded (deleted when the batch ends)."""
        return f"{self.prefix}:batch:{self._tag(batch_id)}{batch_id}:input"

    def batch_jobs(self, batch_id: str) -> str:
        """Hash: the batch's jobs sent and not yet recorded, job id -> custom_id."""
        return f"{self.prefix}:batch:{self._tag(batch_id)}{batch_id}:jobs"

    def batch_output(self, batch_id: str) -> str:
        """List: the batch's output lines (OpenAI Batch format), in the order they ended."""
        return f"{self.prefix}:batch:{self._tag(batch_id)}{batch_id}:output"

    def batch_errors(self, batch_id: str) -> str:
        """List: the batch's error-file lines."""
        return f"{self.prefix}:batch:{self._tag(batch_id)}{batch_id}:errors"

    def batches(self, shard: int) -> str:
        """Set: the ids of a shard's batches still sending or waiting for jobs."""
        return f"{self.prefix}:batches{self._at(shard)}"

    def batches_wake(self) -> str:
        """List: at most one token, left when a batch starts, for the sweeping batch pump,
        which waits on it while no batch is active."""
        return f"{self.prefix}:batches:wake"

    def batch_lock(self, batch_id: str) -> str:
        """String: held by the one worker stepping this batch right now."""
        return f"{self.prefix}:batch:{self._tag(batch_id)}{batch_id}:lock"

    def worker(self, worker_id: str) -> str:
        """String: a worker process's liveness record (JSON); expires unless renewed. All on
        one slot (``{w}``), so that one MGET reads them on a Redis Cluster."""
        return f"{self.prefix}:worker:{'{w}:' if self.shards > 1 else ''}{worker_id}"

    def workers(self) -> str:
        """Sorted set: worker ids, by when each was last heard of (ms)."""
        return f"{self.prefix}:workers"

    def idempotency(self, owner: str, digest: str) -> str:
        """String: the job an ``Idempotency-Key`` (its SHA-256) of a gateway key maps to."""
        return f"{self.prefix}:idempotency:{owner}:{digest}"

    def owned(self, owner: str) -> str:
        """Sorted set: a gateway key's jobs, by submit time (us), for ``GET /v1/jobs``."""
        return f"{self.prefix}:owner:{owner}:jobs"

    def file(self, file_id: str) -> str:
        """Hash: an uploaded file's name, size, purpose, owner and times."""
        return f"{self.prefix}:file:{self._file_tag(file_id)}{file_id}"

    def file_data(self, file_id: str) -> str:
        """List: an uploaded file's bytes, in pieces of at most 1 MiB."""
        return f"{self.prefix}:file:{self._file_tag(file_id)}{file_id}:data"

    def owned_files(self, owner: str) -> str:
        """Sorted set: a gateway key's files, by upload time (us), for ``GET /v1/files``."""
        return f"{self.prefix}:owner:{owner}:files"

    def webhooks(self, shard: int) -> str:
        """Sorted set: a shard's webhook deliveries by when each is due (ms), for the workers
        to send."""
        return f"{self.prefix}:webhooks{self._at(shard)}"

    @staticmethod
    def _subject(delivery_id: str) -> str:
        """What a webhook delivery (``evt_<subject>-<endpoint>``) is about, as far as its
        shard goes: its subject's id, or that id without its dashes."""
        return delivery_id.rsplit("-", 1)[0].removeprefix("evt_")

    def webhooks_wake(self) -> str:
        """List: at most one token, left when a delivery is queued, for the sweeping webhook
        sender, which waits on it until the next delivery it knows of is due."""
        return f"{self.prefix}:webhooks:wake"

    def webhook(self, delivery_id: str) -> str:
        """Hash: one webhook delivery: its event, owner and endpoint, status and attempts."""
        return f"{self.prefix}:webhook:{self._tag(self._subject(delivery_id))}{delivery_id}"

    def owned_webhooks(self, owner: str) -> str:
        """Sorted set: a gateway key's webhook deliveries, by when each was queued (us), for
        ``GET /v1/webhooks/deliveries``."""
        return f"{self.prefix}:owner:{owner}:webhooks"

    def gateway_secret(self) -> str:
        """String: the stream-token secret the gateways share when none is configured."""
        return f"{self.prefix}:gateway:secret"

    def celery_prefix(self) -> str:
        """Prefix for the broker's own keys (queues, unacked messages)."""
        return f"{self.prefix}:celery:"

    def unacked(self) -> str:
        """Hash (kombu's): each delivered, unacked message by its delivery tag."""
        return self.celery_prefix() + "unacked"

    def unacked_index(self) -> str:
        """Sorted set (kombu's): the unacked messages' delivery tags, by when delivered."""
        return self.celery_prefix() + "unacked_index"

    def queue(self, lane: str) -> str:
        """List: a lane's task messages, as kombu's Redis transport keeps them (no TTL: the
        workers empty it)."""
        return f"{self.celery_prefix()}{lane}"


def hash_tag(key: str) -> str:
    """A key's hash tag (its first ``{...}``, what a Redis Cluster places it by): "" for
    none (one shard, one Redis)."""
    start = key.find("{")
    end = key.find("}", start + 1)
    return key[start + 1:end] if start >= 0 and end > start + 1 else ""
