"""One worker process of a cluster sweeps at a time: the holder of the sweeper role.

The scheduler, the batch pump and the webhook sender look at Redis several times a second.
Run by every worker, they cost Redis tens of commands a second for each idle process, and
the batch pump's per-batch locks grow with workers times batches. A process takes the role
with ``SET NX`` and keeps it by renewing it; the others ask again every ``_EVERY`` seconds, a
command each, so that when the holder dies another takes over within the role's TTL, and when
it stops it hands the role back at once. On a Redis Cluster, while the node serving the role
is out of reach, the processes ask for the first of its stand-ins (``Keys.sweeper_stand_ins``)
whose node answers, so that the sweeping of the other shards goes on; once an earlier one
answers again, a stand-in's holder hands it back.

Each part of the sweeping is a ``background.Sweep``: in the holder it sleeps between rounds on
a blocking pop of its own wake list, where whatever gives it work leaves a token
(``leave_wake`` in the Lua prelude), so an idle cluster costs Redis a command every ten
seconds per part.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import redis
from redis.exceptions import RedisClusterException

from api_tasks.background import Loop
from api_tasks.connections import UNAVAILABLE, is_cluster
from api_tasks.record.keys import Keys
from api_tasks.record.scripts import script

__all__ = ["SweeperRole"]

log = logging.getLogger(__name__)
_EVERY = 3.0  # seconds between two asks (or renewals)
_TTL = 9.0  # seconds the role outlives its holder's last renewal
_MARGIN = 1.0  # the holder stops sweeping this long before its role could lapse


class SweeperRole(Loop):
    """A thread that takes the sweeper role when nobody holds it, and keeps it."""

    def __init__(self, client: redis.Redis, keys: Keys, token: str) -> None:
        super().__init__("api-tasks-sweeper", _EVERY, log)
        self._redis = client
        self._roles = [keys.sweeper(), *keys.sweeper_stand_ins()] if is_cluster(client) \
            else [keys.sweeper()]
        self._key = self._roles[0]  # the one this process holds or asked for last
        self._token = token
        self._keep = client.register_script(script("sweeper_keep"))
        self._release = client.register_script(script("unlock"))
        self._until = 0.0  # monotonic time until which the role is this process's
        self._ours_at = -_TTL  # when this process last had it confirmed
        # (on a Redis Cluster) the nodes found out of reach, passed over until a probe of its
        # own hears one again (a node that stops answering costs one wait, not one a tick),
        # and when each was heard again
        self._down: dict[str, threading.Thread | None] = {}
        self._back: dict[str, float] = {}
        self._lock = threading.Lock()  # a tick, or the hand-back at stop
        self._refused_at: float | None = None  # when the role, back, was first refused

    @property
    def held(self) -> bool:
        """Whether this process sweeps now."""
        return time.monotonic() < self._until

    def start(self) -> None:
        """Ask at once (a lone worker sweeps from its start), then every few seconds."""
        try:
            self.tick()
        except redis.RedisError as err:  # the thread asks again
            log.warning("sweeper role: not asked for at start (%s)", err)
        super().start()

    def tick(self) -> None:
        with self._lock:
            if not self.stopping:
                self._tick()

    def _tick(self) -> None:
        error: Exception | None = None
        for key in self._roles:
            node = self._node(key)
            if node is None:
                continue  # a slot no node serves now
            if node in self._down:
                self._probe(node)
                continue
            if time.monotonic() - self._back.get(node, -_TTL) < _TTL and not self._may_hold():
                # its node is back: a stand-in's holder takes the role again first
                self._until = 0.0
                return
            if self.stopping:  # (stop gave up waiting for this tick: take nothing more)
                return
            asked = time.monotonic()
            try:
                ours = self._ask(key, asked)
            except UNAVAILABLE as err:
                if len(self._roles) > 1:
                    self._down[node] = None
                error = err
                continue
            if key != self._key:
                if self._roles.index(key) > self._roles.index(self._key):
                    # (the one before is out of reach: it lapses there on its own)
                    log.warning("sweeper role: asked for its stand-in %s, the role's node "
                                "being out of reach (%s)", key, error)
                elif not ours and self._may_hold() and self._keep_stand_in(asked):
                    return  # another token holds the role there: lapsing, or a holder
                else:
                    self._hand_back()  # an earlier one answers again: the later one goes
                self._key = key
            self._refused_at = None
            if ours:
                self._ours_at = asked
            if ours and not self.held:
                log.info("sweeper role taken: this worker sends due jobs, steps batches and "
                         "sends webhooks for the cluster")
            self._until = asked + _TTL - _MARGIN if ours else 0.0
            return
        raise error or redis.ConnectionError("no node serving the sweeper role answers")

    def _keep_stand_in(self, asked: float) -> bool:
        """The role answers again but another token holds it: keep the stand-in this
        process holds until that token has held it for a role's TTL (one left behind lapses
        sooner; a live holder's renewals outlast it), then leave the sweeping to its holder.
        True while the stand-in is kept."""
        if self._refused_at is None:
            self._refused_at = asked
        if asked - self._refused_at >= _TTL:
            return False
        ours = self._ask(self._key, asked)
        if ours:
            self._ours_at = asked
        self._until = asked + _TTL - _MARGIN if ours else 0.0
        return True

    def _may_hold(self) -> bool:
        return self.held or time.monotonic() - self._ours_at < _TTL

    def _probe(self, node: str) -> None:
        """Ask a node out of reach whether it answers, on a thread of its own (one at a
        time): once it does, the next tick asks for its role again."""
        if self._down.get(node) is not None:
            return

        def probe() -> None:
            try:
                cluster: Any = self._redis
                cluster.get_node(node_name=node).redis_connection.ping()
            except (redis.RedisError, RedisClusterException, AttributeError):
                self._down[node] = None  # the next tick probes again
                return
            self._back[node] = time.monotonic()
            self._down.pop(node, None)

        thread = threading.Thread(target=probe, name="api-tasks-sweeper-probe", daemon=True)
        self._down[node] = thread
        thread.start()

    def _ask(self, key: str, asked: float) -> bool:
        """Keep the role ``key`` if this process may hold it, else ask for it."""
        ttl = int(_TTL * 1000)
        if asked - self._ours_at < _TTL:  # it (or a stand-in) may still be ours: keep it
            return bool(self._keep(keys=[key], args=[self._token, ttl]))
        # a plain ask, the one command the processes that do not sweep send
        return bool(self._redis.set(key, self._token, nx=True, px=ttl))

    def _node(self, key: str) -> str | None:
        """The node serving ``key`` ("" on one Redis), None if none serves it now."""
        if len(self._roles) == 1:
            return ""
        cluster: Any = self._redis
        try:
            return str(cluster.get_node_from_key(key).name)
        except (redis.RedisError, RedisClusterException):
            return None

    def _hand_back(self) -> None:
        """Hand back the role (or stand-in) this process holds, or may, if it does."""
        if not self._may_hold():
            return
        self._until = 0.0
        try:
            self._release(keys=[self._key], args=[self._token])
        except (redis.RedisError, RedisClusterException) as err:  # it lapses within its TTL
            log.warning("sweeper role: %s not handed back (%s)", self._key, err)

    def stop(self, timeout: float = 2.0) -> None:
        """Stop asking, and hand the role back if held, for another process to take (a
        tick still waiting on a node out of reach leaves it to lapse)."""
        super().stop(timeout)
        if self._lock.acquire(timeout=timeout):
            try:
                self._hand_back()
            finally:
                self._lock.release()
