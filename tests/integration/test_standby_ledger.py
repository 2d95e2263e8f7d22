"""A streaming standby sharing the Redis learns the primary's undelivered invalidations from the
WAL (the writer's record puts the key in the standby's ledger, the delivery worker's DELIVERED
record takes it out): while a key is undelivered the standby reads it from its own tables, never
from L2, with no polling bound; once delivered it uses L2 again. A standby promoted while keys
are undelivered delivers them itself."""
import pytest
from conftest import simple_cache, wait_for
from servers import PgCluster, RedisServer


def call(conn, key):
    return conn.execute("SELECT cached_sb(%s)", (key,)).fetchone()[0]


def delivery(conn) -> dict:
    return conn.execute("SELECT twotier.status()->'delivery'").fetchone()[0]


def l2_hits(conn) -> int:
    row = conn.execute("SELECT l2_hits FROM twotier.stats WHERE cache = 'sb'").fetchone()
    return row[0] if row else 0   # no row before this server's first call


def replayed(primary_conn, replica_conn) -> bool:
    lsn = primary_conn.execute("SELECT pg_current_wal_insert_lsn()").fetchone()[0]
    return wait_for(lambda: replica_conn.execute(
        "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (str(lsn),)).fetchone()[0], timeout=10, step=0.01)


def started_pair(extra_settings: dict, caches: dict):
    """A Redis, a primary with `caches` (name: rows, through simple_cache) and its streaming
    standby; everything destroyed after."""
    redis = RedisServer().start()
    settings = {"twotier.redis_url": redis.url, "wal_level": "replica",
                "twotier.read_timeout_ms": 100, "twotier.connect_timeout_ms": 100,
                "twotier.retry_interval_ms": 200, **extra_settings}
    primary = PgCluster(name="primary", settings=settings).start()
    replica = None
    try:
        primary.sql("CREATE EXTENSION twotier")
        for name, rows in caches.items():
            simple_cache(primary, name, rows=rows)
        replica = primary.replica()
        replica.start()
        yield redis, primary, replica
    finally:
        if replica is not None:
            replica.destroy()
        primary.destroy()
        redis.destroy()


@pytest.fixture
def pair():
    yield from started_pair({}, {"sb": 3})


def test_a_standby_keeps_undelivered_keys_out_of_l2(pair):
    redis, primary, replica = pair
    p, r = primary.connect(), replica.connect()
    assert wait_for(lambda: r.execute("SELECT to_regproc('cached_sb')").fetchone()[0] is not None)
    # Key 1 in every tier (the primary fills L2; the standby fills its own L1).
    assert call(p, "1")["v"] == "v1"
    assert wait_for(lambda: delivery(r)["l2_trusted"], timeout=10), delivery(r)
    assert call(r, "1")["v"] == "v1"
    assert call(r, "1")["v"] == "v1"
    assert r.execute("SELECT l1_hits FROM twotier.stats WHERE cache = 'sb'").fetchone()[0] >= 1

    # Redis stops answering: the primary's commit leaves the key in its ledger, and the
    # standby replays it into its own. Redis still holds the old value under the same
    # incarnation: the standby must not read it, from the moment it replayed the commit.
    redis.pause()
    try:
        p.execute("UPDATE sb SET v = 'new' WHERE k = 1")
        assert delivery(p)["undelivered"] >= 1
        assert replayed(p, r)
        assert delivery(r)["undelivered"] >= 1, delivery(r)
        assert call(r, "1")["v"] == "new", "the standby served the old value from its L1"
        r.execute("SET twotier.l1_enabled = off")
        before = l2_hits(r)
        assert call(r, "1")["v"] == "new", "the standby read the old value from L2"
        assert l2_hits(r) == before
        r.execute("SET twotier.l1_enabled = on")
    finally:
        redis.resume()

    # Redis back: the primary's worker delivers and says so in the WAL; the standby's ledger
    # empties and it uses L2 again.
    assert wait_for(lambda: delivery(p)["undelivered"] == 0, timeout=15), delivery(p)
    assert wait_for(lambda: delivery(r)["undelivered"] == 0, timeout=10), [(k, delivery(r)[k], delivery(p)[k]) for k in ("undelivered", "delivered_up_to", "delivered", "recorded")]
    r.execute("SET twotier.l1_enabled = off")
    assert call(r, "1")["v"] == "new"
    before = l2_hits(r)
    assert call(p, "2")["v"] == "v2"   # the primary fills L2; the standby then hits it
    assert wait_for(lambda: call(r, "2")["v"] == "v2" and l2_hits(r) > before, timeout=5), \
        "the standby does not use L2 again after delivery"


def test_a_standby_promoted_with_keys_undelivered_delivers_them(pair):
    redis, primary, replica = pair
    p, r = primary.connect(), replica.connect()
    assert wait_for(lambda: r.execute("SELECT to_regproc('cached_sb')").fetchone()[0] is not None)
    p.execute("SET twotier.l1_enabled = off")
    assert call(p, "1")["v"] == "v1" and call(p, "1")["v"] == "v1"   # in L2
    redis.pause()
    try:
        p.execute("UPDATE sb SET v = 'new' WHERE k = 1")
        assert replayed(p, r)
        assert delivery(r)["undelivered"] >= 1
        p.close()
        primary.crash()   # the old primary never delivers
    finally:
        redis.resume()
    r.close()
    replica.sql("SELECT pg_promote()")
    with replica.connect() as n:
        assert wait_for(lambda: not n.execute("SELECT pg_is_in_recovery()").fetchone()[0], timeout=30)
        n.execute("SET twotier.l1_enabled = off")
        assert call(n, "1")["v"] == "new", "the promoted standby served the old value"
        assert wait_for(lambda: delivery(n)["undelivered"] == 0 and delivery(n)["l2_trusted"], timeout=15), \
            delivery(n)
        assert call(n, "1")["v"] == "new" and call(n, "1")["v"] == "new"


@pytest.fixture
def small_ledger_pair():
    """The pair above with `twotier.ledger_mb = 1` (about 10,000 keys) and a 2,000-row cache
    whose bulk updates fill it."""
    yield from started_pair({"twotier.ledger_mb": 1}, {"sb": 3, "big": 2000})


def test_a_full_ledger_moves_the_epoch_and_no_tier_serves_a_retired_key(small_ledger_pair):
    """Redis paused while the ledger fills: the commit that does not fit moves L2 to a new
    epoch and retires every committed undelivered key, among them key 1's, whose tombstone
    never reaches Redis. Redis still holds key 1's old value under the old epoch: once it is
    back, neither the primary nor the standby may read it. (With the retirement but without
    the epoch's move, both read 'v1'.)"""
    redis, primary, replica = small_ledger_pair
    p, r = primary.connect(), replica.connect()
    assert wait_for(lambda: r.execute("SELECT to_regproc('cached_sb')").fetchone()[0] is not None)
    p.execute("SET twotier.l1_enabled = off")
    r.execute("SET twotier.l1_enabled = off")
    assert call(p, "1")["v"] == "v1"   # in L2 under the current epoch
    assert wait_for(lambda: delivery(r)["l2_trusted"], timeout=10), delivery(r)
    hits = l2_hits(r)
    assert wait_for(lambda: call(r, "1")["v"] == "v1" and l2_hits(r) > hits, timeout=5), "the standby does not read L2"
    before = delivery(p)
    (version,), = primary.sql("SELECT version FROM twotier.caches WHERE name = 'big'")
    redis.pause()
    try:
        p.execute("UPDATE sb SET v = 'new' WHERE k = 1")
        for i in range(20):   # 900 keys each: 18,000 keys, more than 1 MB of ledger
            lo = 1 + (i % 2) * 900
            p.execute("UPDATE big SET v = v || '+' WHERE k BETWEEN %s AND %s", (lo, lo + 899))
        d = delivery(p)
        assert d["epoch_moves"] > before["epoch_moves"] and d["retired_by_epoch_moves"] > 0, d
        (after,), = primary.sql("SELECT version FROM twotier.caches WHERE name = 'big'")
        assert after == version, "a commit moved its cache to a new version"
        assert replayed(p, r)
    finally:
        redis.resume()
    assert wait_for(lambda: delivery(p)["undelivered"] == 0, timeout=30), delivery(p)
    assert wait_for(lambda: delivery(r)["undelivered"] == 0 and delivery(r)["l2_trusted"], timeout=15), delivery(r)
    got = {"primary": call(p, "1")["v"], "standby": call(r, "1")["v"]}
    assert got == {"primary": "new", "standby": "new"}, f"a retired key's old value was read from L2: {got}"
    # L2 works again under the new epoch, on both.
    assert call(p, "2")["v"] == "v2"
    hits = l2_hits(r)
    assert wait_for(lambda: call(r, "2")["v"] == "v2" and l2_hits(r) > hits, timeout=5), \
        "the standby does not use L2 under the new epoch"
