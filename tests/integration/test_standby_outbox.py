"""A streaming standby sharing the Redis sees the primary's outbox through replication (issue 7,
point 2): while an invalidation is undelivered it neither reads L2 nor keeps the key in its L1,
within the bound docs/design.md states (the standby's worker polls every 100 ms)."""
import time

from conftest import simple_cache, wait_for
from servers import PgCluster, RedisServer

# The stated bound is 100 ms of polling after replay; replay itself and a loaded 2-core CI
# machine get the rest.
BOUND_S = 1.0


def call(conn, key):
    return conn.execute("SELECT cached_sb(%s)", (key,)).fetchone()[0]


def outbox(conn) -> dict:
    return conn.execute("SELECT twotier.status()->'outbox'").fetchone()[0]


def test_a_standby_stops_using_l2_and_its_l1_for_undelivered_keys():
    redis = RedisServer().start()
    settings = {"twotier.redis_url": redis.url, "wal_level": "replica",
                "twotier.read_timeout_ms": 100, "twotier.connect_timeout_ms": 100,
                "twotier.retry_interval_ms": 200}
    primary = PgCluster(name="primary", settings=settings).start()
    replica = None
    try:
        primary.sql("CREATE EXTENSION twotier")
        simple_cache(primary, "sb", rows=3)
        replica = primary.replica()
        replica.start()
        p, r = primary.connect(), replica.connect()
        assert wait_for(lambda: r.execute("SELECT to_regproc('cached_sb')").fetchone()[0] is not None)
        # Key 1 in every tier (the primary fills L2; the standby fills its own L1).
        assert call(p, "1")["v"] == "v1"
        assert wait_for(lambda: outbox(r)["l2_trusted"], timeout=5), outbox(r)
        assert call(r, "1")["v"] == "v1"
        assert call(r, "1")["v"] == "v1"
        assert r.execute("SELECT l1_hits FROM twotier.stats WHERE cache = 'sb'").fetchone()[0] >= 1

        # Redis stops answering: the primary's commit puts the key in its outbox, which the
        # standby replays. Redis comes back at once, still holding the old value under the
        # same incarnation, but the outbox has not been delivered: the standby must not read it.
        redis.pause()
        p.execute("UPDATE sb SET v = 'new' WHERE k = 1")
        assert p.execute("SELECT count(*) FROM twotier.outbox").fetchone()[0] >= 1
        committed = time.time()
        assert wait_for(lambda: not outbox(r)["l2_trusted"], timeout=BOUND_S, step=0.01), \
            f"the standby still trusts L2 {BOUND_S}s after the primary recorded an undelivered invalidation"
        assert wait_for(lambda: call(r, "1")["v"] == "new", timeout=BOUND_S, step=0.01), \
            "the standby still serves the old value from its L1"
        seen_after = time.time() - committed
        r.execute("SET twotier.l1_enabled = off")
        assert call(r, "1")["v"] == "new", "the standby read the old value from L2"
        r.execute("SET twotier.l1_enabled = on")
        skips = r.execute("SELECT l2_skips FROM twotier.stats WHERE cache = 'sb'").fetchone()[0]
        assert skips >= 1
        print(f"standby saw the undelivered invalidation after {seen_after:.3f}s; l2_skips={skips}")

        # Redis back: the primary's worker delivers, the standby sees an empty outbox and
        # trusts L2 again, and the new value is what everyone reads.
        redis.resume()
        assert wait_for(lambda: p.execute("SELECT count(*) FROM twotier.outbox").fetchone()[0] == 0, timeout=15)
        assert wait_for(lambda: outbox(r)["l2_trusted"], timeout=5), outbox(r)
        r.execute("SET twotier.l1_enabled = off")
        assert call(r, "1")["v"] == "new"
        before = r.execute("SELECT l2_hits FROM twotier.stats WHERE cache = 'sb'").fetchone()[0]
        assert call(p, "2")["v"] == "v2"   # the primary fills L2; the standby then hits it
        assert wait_for(lambda: call(r, "2")["v"] == "v2" and
                        r.execute("SELECT l2_hits FROM twotier.stats WHERE cache = 'sb'").fetchone()[0] > before,
                        timeout=5), "the standby does not use L2 again after delivery"
    finally:
        if replica is not None:
            replica.destroy()
        primary.destroy()
        redis.destroy()
