"""Exactly one outcome per job: claims, leases, and the fenced finish.

A worker claims a job before calling the upstream: the claim writes a fresh
attempt token into the job record with a lease (``lease_until``, by Redis's
clock) that lapses unless the worker renews it. Then:

- a second delivery of a finished job is dropped; one of a job whose lease
  another token holds is deferred by its claim until that lease would lapse
  (never acked while it may be the job's only message, as after a failed
  give-back);
- only the attempt whose token is in the record may finish the job, so a
  worker that lost its job to a new attempt can't write a second result;
- a claim retried after a lost reply finds its own token and goes on;
- the reaper (``api_tasks.execution.reaper``) gives back the unacked messages of jobs
  whose lease lapsed: their worker is gone; and a running job whose lease
  and message are both gone is sent again from the copy its claim kept;
- a job whose worker died ``jobs.max_crashes`` times is a poison job.

All of it is Lua, so it holds across any number of processes and machines.
Every script checks its inputs before its first write: Redis does not undo
a script that fails halfway.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Any

import redis

from api_tasks.connections import text
from api_tasks.record.calls import Call, Failed, SyncShell, command, lua
from api_tasks.record.exchange import Command
from api_tasks.record.job_record import TERMINAL
from api_tasks.record.keys import Keys
from api_tasks.record.scripts import script, sha
from api_tasks.record.webhooks import NO_WEBHOOKS, Webhooks

__all__ = ["Claim", "LeaseStore", "Parked", "Requeue", "Verdict"]

log = logging.getLogger(__name__)

_DEFER_MARGIN_MS = 250  # a deferred delivery looks again this long after the lease would lapse
_HOLD_MS = 30_000  # a due job being sent is due again after this, should its sender die
_RETRY_MS = 1_000  # a due job whose send failed is due again after this

# each script's KEYS, ARGV and replies are described at the top of its file
_RELEASE, _RESTORE, _PARK, _HELD = (script(name) for name in (
    "release", "restore", "park", "held"))
_DUE, _SENT, _RECOVER = (script(name) for name in ("due", "sent", "recover"))


class Parked(IntEnum):
    """What parking a job came to (``park.lua``'s reply)."""

    LOST = 0  # another attempt holds the job: nothing done
    PARKED = 1  # it waits outside its worker, sent again when due
    CANCELLED = 2  # it was cancelled meanwhile: its worker ends it instead


class Verdict(StrEnum):
    """What a claim found."""

    RUN = "run"  # this attempt holds the job now: call the upstream
    CANCEL = "cancel"  # this attempt holds it, and it was cancelled before it started
    POISON = "poison"  # this attempt holds it, and its workers died max_crashes times
    BUSY = "busy"  # another attempt holds its lease, and this delivery kept no message
    DEFERRED = "deferred"  # another attempt holds it: its message waits for that lease
    ENDED = "ended"  # it has ended (``Claim.ended`` says how)

    @property
    def owned(self) -> bool:
        """Whether this attempt now holds the job (and must end or give it back)."""
        return self in (Verdict.RUN, Verdict.CANCEL, Verdict.POISON)


class Requeue(StrEnum):
    """What giving back (``restore``) or sending again (``recover``) a job's message found."""

    RESTORED = "restored"  # queued again: its unacked message goes back on its queue
    RECOVERED = "recovered"  # its kept message is due to be sent again
    ALIVE = "alive"  # a live lease says it is still running: left alone
    LAPSING = "lapsing"  # its lease lapsed lately: left to its worker a lease period more
    WAITING = "waiting"  # it waits for a limit: the delayed set holds its message to send
    GONE = "gone"  # nothing to send again (its record ended, expired or moved on)
    ENDED = "ended"  # it ended: its message is dropped


@dataclass(frozen=True)
class Claim:
    """What a worker learned when it claimed a job."""

    verdict: Verdict
    attempt: int  # the attempt this claim opened (or found its own)
    created_at: float
    cooldown: float = 0.0  # seconds the job's upstream is still cooling down (429)
    turn: float | None = None  # seconds to the turn it reserved under its limits, if any
    has_events: bool = False  # an earlier attempt wrote to the job's stream
    ended: str | None = None  # the final status, for ``Verdict.ENDED``
    turn_on: tuple[str, str | None] | None = None  # that turn's deployment and model
    uncounted: bool = False  # an end no worker counted (cancelled while queued): count it


class LeaseStore:
    """The worker side of a job's record: claim, renew, release, restore, finish."""

    def __init__(self, client: redis.Redis, keys: Keys, queued_ttl: int,
                 lease_ms: int, max_crashes: int) -> None:
        self.redis = client
        self.keys = keys
        self.queued_ttl = queued_ttl
        self.lease_ms = lease_ms
        self.max_crashes = max_crashes
        self._release = client.register_script(_RELEASE)
        self._restore = client.register_script(_RESTORE)
        self._park = client.register_script(_PARK)
        self._held = client.register_script(_HELD)
        self._due = client.register_script(_DUE)
        self._sent = client.register_script(_SENT)
        self._recover = client.register_script(_RECOVER)
        self._shell = SyncShell(client)

    def claim(self, job_id: str, token: str, fields: dict[str, str], now: float,
              upstream: str = "", message: str = "") -> Claim:
        """Take the job for attempt ``token``, unless it is finished or held.

        ``message`` (the task message as JSON, "" for none) is kept beside the record while
        the job runs, so the job can be sent again if its own message is lost; for a job held
        by another attempt, it waits in the delayed set until that lease would lapse.
        """
        keys, shard = self.keys, self.keys.shard(job_id)
        flat = [item for pair in fields.items() for item in pair]
        # the upstream's cool-down is read beside the claim, not in it: on a Redis Cluster
        # it lives on another slot than the job's keys, maybe on a node out of reach (then
        # it is taken as none)
        cooled, replies = self._shell.run_groups([
            [command("PTTL", keys.cooldown(upstream))],
            [lua("claim", [keys.job(job_id), keys.cancel(job_id), keys.events(job_id),
                           keys.running(shard), keys.running_messages(shard),
                           keys.delayed(shard), keys.delayed_messages(shard)],
                 [repr(now), self.queued_ttl, token, self.lease_ms, self.max_crashes, message,
                  job_id, _DEFER_MARGIN_MS, *flat])]])
        if isinstance(replies, Failed):
            raise replies.error
        cool = 0 if isinstance(cooled, Failed) else cooled[0]
        [(verdict, delivery, created, turn, shown, on, *uncounted)] = replies
        found = text(verdict)
        if found == Verdict.DEFERRED:
            self.wake()
        ended = found if found in TERMINAL else None
        return Claim(Verdict.ENDED if ended else Verdict(found), int(delivery), float(created),
                     max(int(cool), 0) / 1000, None if not turn else float(turn) / 1000,
                     text(shown) == "1", ended, tuple(json.loads(on)) if on else None,
                     bool(uncounted) and text(uncounted[0]) == "1")

    def renew(self, shell: SyncShell, held: list[tuple[str, str, list[str]]]
              ) -> list[tuple[str, str]]:
        """Renew leases (and slots in flight) of (job id, token, in-flight keys), on the
        caller's shell (the watchdog's quick client); return the (job id, token) of the
        attempts another attempt took over (not those that just ended the job)."""
        keys = self.keys
        renewed = shell.run_groups([[lua("renew", [keys.job(job_id),
                                                   keys.running(keys.shard(job_id))],
                                         [token, self.lease_ms, job_id])]
                                    for job_id, token, _ in held])
        lost: list[tuple[str, str]] = []
        flights: list[Call[Any]] = []
        failed = [reply for reply in renewed if isinstance(reply, Failed)]
        if failed:  # (on a Redis Cluster, the jobs of a node out of reach: the rest go on)
            log.warning("%d of %d leases not renewed (%s)", len(failed), len(held),
                        failed[0].error)
        for (job_id, token, held_flights), reply in zip(held, renewed, strict=True):
            if isinstance(reply, Failed):
                continue
            [until] = reply
            if until == -1:
                lost.append((job_id, token))
            elif until:  # the slots in flight live as long as the lease: on
                # other slots than the job's on a Redis Cluster, so apart from its script
                flights += [command("ZADD", flight, "XX", until, job_id)
                            for flight in held_flights]
        shell.follow(flights)  # (on other slots: one out of reach costs no renewal)
        return lost

    def release(self, job_id: str, token: str) -> bool:
        """Give a job back (the worker is stopping); True if it was still ours."""
        keys, shard = self.keys, self.keys.shard(job_id)
        return bool(self._release(keys=[keys.job(job_id), keys.running(shard),
                                        keys.running_messages(shard)], args=[token, job_id]))

    def held(self, job_id: str) -> bool:
        """Whether an attempt holds the job now (its lease has not lapsed)."""
        return bool(self._held(keys=[self.keys.job(job_id)]))

    def restore(self, job_id: str) -> Requeue:
        """Take a dead worker's job back if its lease lapsed a lease period ago or more, as
        a sweep saw it: ``RESTORED`` (its message is to go back on its queue), ``ENDED`` or
        ``WAITING`` (to be dropped), or ``ALIVE`` or ``LAPSING`` (left alone)."""
        keys, shard = self.keys, self.keys.shard(job_id)
        return Requeue(text(self._restore(
            keys=[keys.job(job_id), keys.running(shard), keys.running_messages(shard)],
            args=[job_id, self.lease_ms])))

    def park(self, job_id: str, token: str, wait: float, reason: str,
             message: str, turn: float | None = None, lead: float = 0.0,
             turn_on: tuple[str, str | None] | None = None) -> Parked:
        """Take the job out of its worker until a limit lets it run (not if it is not ours,
        or was cancelled meanwhile).

        ``turn``: seconds to the turn it reserved (kept in the record, with ``turn_on``: the
        deployment and model it is under); it is sent again ``lead`` seconds before it.
        """
        keys, shard = self.keys, self.keys.shard(job_id)
        parked = Parked(int(self._park(
            keys=[keys.job(job_id), keys.delayed(shard), keys.delayed_messages(shard),
                  keys.running(shard), keys.running_messages(shard), keys.cancel(job_id)],
            args=[token, job_id, max(int(wait * 1000), 1), reason, message,
                  self.queued_ttl,
                  "" if turn is None else int(turn * 1000), int(lead * 1000),
                  "" if turn_on is None else json.dumps(turn_on)])))
        if parked is Parked.PARKED:
            self.wake()
        return parked

    def wake(self) -> None:
        """Leave the sweeping scheduler a token: a job waits now (after the script that
        made it wait, as the wake list lives on another slot on a Redis Cluster). Lost, it
        delays the scheduler's look by its idle period at most: logged, not raised."""
        self._shell.follow([lua("wake", [self.keys.delayed_wake()], [self.queued_ttl])])

    def due(self, shard: int, limit: int = 500) -> tuple[list[tuple[str, dict[str, Any], str]],
                                                         float | None]:
        """A shard's waiting jobs whose wait is over: (job id, message to send, the score it
        is held at until ``sent``); and in how many seconds the shard's next waiting job is
        due (None: none waits)."""
        *flat, upcoming = self._due(keys=[self.keys.delayed(shard),
                                          self.keys.delayed_messages(shard)],
                                    args=[limit, _HOLD_MS])
        triples = zip(flat[::3], flat[1::3], flat[2::3], strict=True)
        return ([(text(job_id), json.loads(raw), text(held)) for job_id, raw, held in triples],
                float(upcoming) / 1000 if upcoming not in (b"", "", None) else None)

    def sent(self, job_id: str, held: str, ok: bool = True) -> None:
        """A due job's message went out again (or, if not ``ok``, it is due again soon)."""
        shard = self.keys.shard(job_id)
        again = self._sent(keys=[self.keys.delayed(shard), self.keys.delayed_messages(shard)],
                           args=[job_id, held, "" if ok else _RETRY_MS])
        if int(again) == 2:  # due again soon: whoever sweeps next knows of it
            self.wake()

    def finish_command(self, job_id: str, token: str, ttl: int, event: str, event_id: str,
                       result: str | None, fields: list[str],
                       webhooks: Webhooks = NO_WEBHOOKS, delivery_tag: str = "") -> Command:
        """The one atomic write that ends a job, refused unless ``token`` still owns it (and
        queueing the ``webhooks`` of its end if it is not); with ``delivery_tag`` (the broker
        on the state's Redis), it takes that delivery's unacked entry out too, as kombu's ack
        would (``record.acks``)."""
        keys, shard = self.keys, self.keys.shard(job_id)
        acks = [keys.unacked_index(), keys.unacked()] if delivery_tag else []
        # by its SHA1: the writer sends it whole only to a Redis that lacks it; the channel
        # is no key (on a Redis Cluster a PUBLISH reaches every node from any)
        return ("EVALSHA", sha("finish"), 5 + len(acks) + len(webhooks[0]), keys.job(job_id),
                keys.result(job_id), keys.events(job_id), keys.running(shard),
                keys.running_messages(shard), *acks, *webhooks[0],
                token, ttl, event, event_id, result or "", job_id, keys.channel(job_id),
                delivery_tag, len(fields), *fields, *webhooks[1])

    def recover(self, shard: int, cutoff_ms: int, limit: int = 500) -> list[str]:
        """Send again a shard's jobs orphaned before ``cutoff_ms`` (see ``_RECOVER``); their
        ids."""
        keys = self.keys
        # no TTL set here: every claim sets both keys' again
        ids = [text(i) for i in self.redis.zrangebyscore(keys.running(shard), "-inf",
                                                         cutoff_ms, 0, limit)]
        recovered = []
        for job_id in ids:
            outcome = Requeue(text(self._recover(
                keys=[keys.running(shard), keys.job(job_id), keys.delayed(shard),
                      keys.delayed_messages(shard), keys.running_messages(shard)],
                args=[job_id, self.queued_ttl, self.lease_ms])))
            if outcome is Requeue.RECOVERED:
                recovered.append(job_id)
        if recovered:
            self.wake()  # the sweeping scheduler sends them now
        return recovered

