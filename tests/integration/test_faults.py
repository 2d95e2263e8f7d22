"""The fault matrix: every way Redis fails, each under 2 writers bumping `ver` and 3 readers
calling the cached function, against a Redis and a PostgreSQL cluster of this module's own.

For each fault: every call answers the right row within 2 s and no ERROR reaches a caller
(the deliberate statement_timeout and cancel excepted, which must be the ordinary
query_canceled and leave the session usable); no reader ever gets a ver older than one whose
COMMIT had returned when the call was sent; the stats count the fault; commits that could
not mark Redis wait in the ledger; once they are delivered (L2 trusted again)
every key reads its latest ver from a fresh session with L1 on and off; and the same
sessions use L2 again without being told (l2_hits grows).
"""
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import psycopg
import pytest
from conftest import wait_for  # noqa: E402

HOLD_S = 1.0  # how long each fault lasts: ten times the read timeout
CALL_LIMIT_S = 2.0


@dataclass
class Ctx:
    stack: object
    cache: object
    workload: object = None
    notes: dict = field(default_factory=dict)

    @property
    def redis(self):
        return self.stack.redis


@dataclass
class Fault:
    name: str
    run: Callable  # makes the fault and ends it; returns when Redis is back
    prepare: Callable | None = None  # before the sessions start
    cleanup: Callable | None = None  # after the checks, also when they failed
    # Commits during the fault cannot mark their keys in Redis: the ledger must carry them.
    queues: bool = True


# -- the faults ---------------------------------------------------------------------------

def killed(ctx):
    ctx.redis.kill()
    time.sleep(HOLD_S)
    ctx.redis.start()


def paused(ctx):
    ctx.redis.pause()
    time.sleep(HOLD_S)
    ctx.redis.resume()


def slowed(ctx):
    ctx.redis.debug_sleep(HOLD_S).join(HOLD_S + 10)


def full(ctx):
    ctx.redis.fill_memory()
    time.sleep(HOLD_S)
    ctx.redis.free_memory()


def readonly(ctx):
    ctx.redis.make_readonly(True)
    time.sleep(HOLD_S)
    ctx.redis.make_readonly(False)


def through_proxy(ctx):
    ctx.stack.use_redis_url(ctx.stack.proxy.url)


def direct(ctx):
    ctx.stack.use_redis_url(ctx.redis.url)


def reset_mid_reply(ctx):
    ctx.stack.proxy.reset_replies(2)
    time.sleep(HOLD_S)
    ctx.stack.proxy.reset_replies(None)


def restarted_empty(ctx):
    # Down for a moment, so that commits surely meet the outage.
    ctx.redis.restart(down_s=0.3)


def snapshot(ctx):
    # Every key in L2 first, so that the snapshot holds values that the writers then outdate.
    with ctx.stack.cluster.connect() as c:
        c.execute("SET twotier.l1_enabled = off")
        for k in ctx.cache.keys:
            ctx.cache.call(c, k)
    ctx.notes["rdb"] = ctx.redis.save_rdb()
    ctx.notes["old_keys"] = {k: ctx.cache.redis_key(str(k)) for k in ctx.cache.keys}


def restarted_from_old_rdb(ctx):
    time.sleep(HOLD_S)  # the writers move every key past the snapshot
    ctx.redis.restart_from_rdb(ctx.notes["rdb"], down_s=0.3)
    # The scenario is real only if the snapshot brought the outdated values back.
    r = ctx.redis.client()
    assert any(r.get(key) for key in ctx.notes["old_keys"].values()), "the snapshot holds no entry"


def garbage(ctx):
    r = ctx.redis.client()
    keys = {k: ctx.cache.redis_key(str(k)) for k in ctx.cache.keys}
    n = 0
    deadline = time.time() + HOLD_S
    while time.time() < deadline:
        for key in keys.values():
            n += 1
            # Never the same bytes twice: garbage identical to what a reader saw earlier
            # would let that reader's compare-and-set fill through, a fault of this test.
            r.set(key, b'{"broken": %d' % n, ex=60)
        time.sleep(0.01)
    ctx.notes["garbage"] = n


def victim(ctx):
    """A session that waits on Redis for as long as 5 s: its call can be canceled while it
    waits. L1 off, so that its call goes to Redis; one call first, so that its connection
    is open and the next call waits on a reply rather than on a connect."""
    v = ctx.stack.cluster.connect()
    v.execute("SET twotier.read_timeout_ms = 5000")
    v.execute("SET twotier.l1_enabled = off")
    ctx.cache.call(v, 1)
    ctx.notes["victim"] = v


def canceled(how):
    def run(ctx):
        v = ctx.notes["victim"]
        if how == "statement_timeout":
            v.execute("SET statement_timeout = 300")
        # No invalidation may be undelivered while the victim's call starts: no backend reads
        # L2 for such a key, and the victim would not wait on Redis at all. So the writers
        # pause, and the ledger empties, before Redis does.
        ctx.workload.hold_writes()
        assert wait_for(lambda: ctx.stack.delivery()["undelivered"] == 0, timeout=10)
        ctx.redis.pause()
        try:
            pid = v.info.backend_pid
            cancel = threading.Timer(0.3, lambda: ctx.stack.cluster.sql("SELECT pg_cancel_backend(%s)", pid))
            if how == "cancel":
                cancel.start()
            t0 = time.monotonic()
            with pytest.raises(psycopg.errors.QueryCanceled) as err:
                ctx.cache.call(v, 1)
            elapsed = time.monotonic() - t0
            # Had the call returned early, a late cancel must not hit the statements below.
            cancel.cancel()
            ctx.notes["canceled_after_s"] = elapsed
            assert err.value.sqlstate == "57014"
            assert ("statement timeout" if how == "statement_timeout" else "user request") in str(err.value)
            assert elapsed < CALL_LIMIT_S, f"the {how} took {elapsed:.2f}s to end the call"
            v.execute("SET statement_timeout = 0")
            assert v.execute("SELECT 1").fetchone() == (1,), "the session is usable at once"
        finally:
            ctx.workload.release_writes()
            time.sleep(HOLD_S / 2)  # the writers meet the paused Redis too
            ctx.redis.resume()
    return run


def victim_recovers(ctx):
    v = ctx.notes.pop("victim", None)
    if v is None:
        return
    try:
        if ctx.notes.get("checks") == "passed":
            truth = ctx.cache.truth()
            for k, ver in truth.items():
                t0 = time.monotonic()
                got = ctx.cache.call(v, k)
                assert time.monotonic() - t0 < CALL_LIMIT_S
                assert got["ver"] == ver, f"the canceled session reads key {k} as {got}, the table has ver {ver}"
    finally:
        v.close()


FAULTS = [
    Fault("killed", killed),
    Fault("paused", paused),
    Fault("slowed (DEBUG SLEEP)", slowed),
    Fault("full (noeviction)", full),
    Fault("readonly replica", readonly),
    Fault("reset mid-reply", reset_mid_reply, prepare=through_proxy, cleanup=direct),
    Fault("restarted empty", restarted_empty),
    Fault("restarted from old RDB", restarted_from_old_rdb, prepare=snapshot),
    Fault("garbage value", garbage, queues=False),
    Fault("statement_timeout", canceled("statement_timeout"), prepare=victim, cleanup=victim_recovers),
    Fault("pg_cancel_backend", canceled("cancel"), prepare=victim, cleanup=victim_recovers),
]


def counters(cache) -> dict:
    s = cache.stats()
    return {k: s.get(k) or 0 for k in ("calls", "l2_hits", "redis_errors", "l2_skips")}


@pytest.mark.parametrize("fault", FAULTS, ids=[f.name for f in FAULTS])
def test_fault(own_stack, fault):
    stack = own_stack
    stack.heal()
    cache = stack.cache(rows=8)
    ctx = Ctx(stack, cache)
    try:
        if fault.prepare:
            fault.prepare(ctx)
        delivery_before = stack.delivery()
        wl = ctx.workload = stack.workload(cache, writers=2, readers=3, l1_readers=1,
                                                limit_s=CALL_LIMIT_S, write_pause_s=0.002)
        fault_error = None
        with wl:
            time.sleep(0.5)  # every tier in use before the fault
            before = counters(cache)
            try:
                fault.run(ctx)
            except AssertionError as e:  # reported after the summary line
                fault_error = e
            stack.wait_trusted(timeout=30)
            # The same sessions, never reconnected, go back to L2 on their own.
            back = counters(cache)["l2_hits"]
            recovered = wait_for(lambda: counters(cache)["l2_hits"] > back, timeout=10)
        after = counters(cache)
        delivery_after = stack.delivery()
        print(f"fault={fault.name!r} reads={wl.reads} writes={wl.writes} stale={len(wl.stale)} "
              f"errors={len(wl.errors)} redis_errors+={after['redis_errors'] - before['redis_errors']} "
              f"l2_skips+={after['l2_skips'] - before['l2_skips']} "
              f"delivered+={delivery_after['delivered'] - delivery_before['delivered']} "
              f"max_read={wl.max_read_s:.3f}s warnings={wl.warnings}"
              + (f" canceled_after={ctx.notes['canceled_after_s']:.3f}s" if "canceled_after_s" in ctx.notes else ""))

        if fault_error is not None:
            raise fault_error
        assert not wl.errors, wl.errors[:5]
        assert not wl.stale, wl.stale[:5]
        assert wl.reads > 100 and wl.writes > 10, "the sessions kept working through the fault"
        assert (after["redis_errors"] + after["l2_skips"]) > (before["redis_errors"] + before["l2_skips"]), \
            "the stats did not count the fault"
        if fault.queues:
            assert delivery_after["delivered"] > delivery_before["delivered"], \
                "commits during the fault did not go through the ledger"
        assert recovered, "the sessions did not use L2 again after the fault"

        # Nothing stale is left in any tier: fresh sessions, L1 on and off.
        truth = cache.truth()
        assert truth == {k: ver for k, (ver, _) in wl.committed.items()}, "every commit was recorded"
        assert cache.stale_keys(l1=True) == []
        assert cache.stale_keys(l1=False) == []
        ctx.notes["checks"] = "passed"
    finally:
        try:
            if fault.cleanup:
                fault.cleanup(ctx)
        finally:
            stack.heal()
