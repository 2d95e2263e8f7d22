"""The shared-memory L1, the listener worker and the stats (issue 3), against real servers."""
import os
import signal
import threading
import time

import pytest

from servers import PgCluster, RedisServer
from conftest import simple_cache, wait_for  # noqa: E402


def call(conn, cache, key):
    return conn.execute(f"SELECT cached_{cache.name}(%s)", (key,)).fetchone()[0]


def l1_status(conn):
    return conn.execute("SELECT twotier.status()->'l1'").fetchone()[0]


def test_l1_answers_with_redis_stopped(cluster, redis_server, cache):
    c = cluster.connect()
    assert call(c, cache, "1")["n"] == 1
    redis_server.stop()
    try:
        # Losing the invalidation channel flushes L1 (it may have missed invalidations)...
        assert wait_for(lambda: not l1_status(c)["worker"]["subscribed"])
        hits = cache.stats()["l1_hits"]
        # ...so one call goes to the source and fills L1 again, and then L1 answers alone.
        value = call(c, cache, "1")
        assert value["n"] == 2
        for _ in range(20):
            assert call(c, cache, "1") == value
        assert cache.fetches() == 2
        assert cache.stats()["l1_hits"] == hits + 20
    finally:
        redis_server.start()


def test_stats_match_concurrent_calls_exactly(cluster, make_cache):
    cache = make_cache()
    cluster.sql("SELECT twotier.reset_stats()")
    per_session, sessions = 150, 4

    def run():
        conn = cluster.connect()
        for i in range(per_session):
            call(conn, cache, str(i % 7 + 1))  # keys 6 and 7 do not exist: negative entries
        conn.close()

    threads = [threading.Thread(target=run) for _ in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    s = cache.stats()
    assert s["calls"] == per_session * sessions
    assert s["l1_hits"] + s["l2_hits"] + s["negative_hits"] + s["misses"] == s["calls"]
    assert cache.fetches() <= s["misses"] <= 7 * sessions
    assert s["l1_hit_mean_us"] is not None and s["l1_hit_p99_us"] >= s["l1_hit_mean_us"] * 0.5


def test_status_reports_the_tiers(db):
    st = db.execute("SELECT twotier.status()").fetchone()[0]
    assert st["preloaded"] is True
    assert st["l2"]["reachable"] is True
    assert st["l1"]["available"] is True and st["l1"]["worker"]["alive"] is True
    # A test before this one may have restarted Redis: the worker re-subscribes on its own.
    assert wait_for(lambda: l1_status(db)["worker"]["subscribed"], timeout=10)


def test_subscription_loss_flushes_l1(cluster, redis_server, cache):
    c = cluster.connect()
    call(c, cache, "1")
    before = l1_status(c)
    assert before["entries"] >= 1
    redis_server.kill()
    try:
        assert wait_for(lambda: l1_status(c)["worker"]["subscription_losses"] > before["worker"]["subscription_losses"])
        after = l1_status(c)
        assert after["flushes"] > before["flushes"]
        assert after["worker"]["subscribed"] is False
    finally:
        redis_server.start()
    assert wait_for(lambda: l1_status(c)["worker"]["subscribed"], timeout=10)


def test_l1_stays_bounded_under_ten_times_its_size():
    redis = RedisServer().start()
    pg = PgCluster(name="small", settings={"twotier.redis_url": redis.url, "twotier.l1_size_mb": 4}).start()
    try:
        pg.sql("CREATE EXTENSION twotier")
        pg.sql("CREATE TABLE big(k int PRIMARY KEY, pad text)")
        # 20 000 values of about 2 kB: about ten times the 4 MB L1.
        pg.sql("INSERT INTO big SELECT g, repeat(md5(g::text), 64) FROM generate_series(1, 20000) g")
        pg.sql("""SELECT twotier.define('big', $q$SELECT jsonb_build_object('k', k, 'pad', pad)
                                                   FROM big WHERE k = $1::int$q$, '5 min', ARRAY['big(k)'])""")
        (loaded,), = pg.sql("SELECT twotier.warm('big', 'SELECT k::text FROM big')")
        assert loaded == 20000
        with pg.connect() as c:
            st = l1_status(c)
            assert st["evictions"] > 0
            assert 0 < st["used_bytes"] <= st["ring_bytes"] <= 4 * 1024 * 1024
            # Entries that were evicted are read again correctly, from L2.
            for k in (1, 2, 3, 19999, 20000):
                v = c.execute("SELECT cached_big(%s)", (str(k),)).fetchone()[0]
                assert v["k"] == k and len(v["pad"]) == 2048
    finally:
        pg.destroy()
        redis.stop()


def test_invalidation_reaches_the_l1_of_a_replica():
    redis = RedisServer().start()
    settings = {"twotier.redis_url": redis.url, "wal_level": "replica"}
    primary = PgCluster(name="primary", settings=settings).start()
    try:
        primary.sql("CREATE EXTENSION twotier")
        simple_cache(primary, "rep")
        cache = type("C", (), {"name": "rep"})
        replica = primary.replica()
        replica.start()
        p, r = primary.connect(), replica.connect()
        assert wait_for(lambda: r.execute(f"SELECT to_regproc('cached_{cache.name}')").fetchone()[0] is not None)
        assert call(r, cache, "1")["v"] == "v1"
        assert call(r, cache, "1")["v"] == "v1"
        hits = r.execute("SELECT l1_hits FROM twotier.stats WHERE cache = %s", (cache.name,)).fetchone()[0]
        assert hits >= 1, "the replica answers from its own L1"
        p.execute(f"UPDATE {cache.name} SET v = 'changed on the primary' WHERE k = 1")
        t0 = time.time()
        assert wait_for(lambda: call(r, cache, "1")["v"] == "changed on the primary", timeout=1.0, step=0.01), \
            "the replica's L1 still serves the old value a second after the commit"
        print(f"replica saw the change after {time.time() - t0:.3f}s")
        replica.destroy()
    finally:
        primary.destroy()
        redis.stop()


def test_an_l1_copy_never_outlives_its_l2_entry(cluster, redis_server, make_cache):
    cache = make_cache()
    c = cluster.connect()
    # An entry that Redis will drop in 2 s, although the cache's TTL is 5 minutes.
    redis_server.client().set(cache.redis_key("1"), b'{"v": "from redis"}', ex=2)
    assert call(c, cache, "1") == {"v": "from redis"}
    assert call(c, cache, "1") == {"v": "from redis"}
    assert cache.stats()["l1_hits"] == 1, "the L2 value was copied into L1"
    time.sleep(2.5)
    assert call(c, cache, "1")["v"] == "v1", "the L1 copy expired with its L2 original"


def _listener_stack(name):
    redis = RedisServer().start()
    pg = PgCluster(name=name, settings={"twotier.redis_url": redis.url, "twotier.read_timeout_ms": 100,
                                        "twotier.connect_timeout_ms": 100, "twotier.retry_interval_ms": 200}).start()
    pg.sql("CREATE EXTENSION twotier")
    simple_cache(pg, "ls")
    return redis, pg


def test_a_half_open_subscription_is_noticed():
    """Redis paused: the socket stays open and silent, which a read timeout alone takes for a
    quiet channel. The listener PINGs after a quiet second; no answer is a lost subscription,
    and L1 is flushed (it may hold entries the channel would have invalidated)."""
    redis, pg = _listener_stack("halfopen")
    try:
        with pg.connect() as c:
            assert wait_for(lambda: l1_status(c)["worker"]["subscribed"], timeout=10)
            c.execute("SELECT cached_ls('1')")
            before = l1_status(c)
            assert before["entries"] >= 1
            redis.pause()
            t0 = time.time()
            try:
                assert wait_for(lambda: not l1_status(c)["worker"]["subscribed"], timeout=5, step=0.05), \
                    "the listener still believes it is subscribed to a paused Redis"
                noticed = time.time() - t0
                after = l1_status(c)
                assert after["worker"]["subscription_losses"] > before["worker"]["subscription_losses"]
                assert after["flushes"] > before["flushes"]
                print(f"half-open subscription noticed after {noticed:.2f}s")
            finally:
                redis.resume()
            assert wait_for(lambda: l1_status(c)["worker"]["subscribed"], timeout=10)
    finally:
        pg.destroy()
        redis.destroy()


def test_a_terminated_listener_comes_back_and_flushes():
    redis, pg = _listener_stack("relisten")
    try:
        with pg.connect() as c:
            assert wait_for(lambda: l1_status(c)["worker"]["subscribed"], timeout=10)
            c.execute("SELECT cached_ls('1')")
            assert c.execute("SELECT cached_ls('1')").fetchone()[0] == {"v": "v1"}
            before = l1_status(c)
            old = before["worker"]["pid"]
            # Not in the proc array (no database connection): pg_terminate_backend refuses it.
            # SIGTERM is what it would send; the cluster is this test's own.
            os.kill(old, signal.SIGTERM)
            assert wait_for(lambda: (l1_status(c)["worker"]["pid"] not in (None, old)
                                     and l1_status(c)["worker"]["subscribed"]), timeout=10), \
                "no new listener after the old one was terminated"
            after = l1_status(c)
            assert after["flushes"] > before["flushes"], "L1 kept entries across the listener's absence"
    finally:
        pg.destroy()
        redis.destroy()


def test_a_stampede_on_one_key_runs_the_query_once(cluster, make_cache):
    """Six sessions miss the same key at the same moment; its query takes 0.3 s. One runs it,
    the others wait for its L1 fill (twotier.stampede_wait_ms). With the wait off, all six
    run it."""
    def stampede(cache, wait_ms):
        cluster.sql(f"ALTER TABLE {cache.name} ADD COLUMN slow float8 NOT NULL DEFAULT 0.3")
        cluster.sql(f"""SELECT twotier.define('{cache.name}',
             $q$SELECT jsonb_build_object('v', v, 'n', nextval('{cache.name}_fetches'), 'z', pg_sleep(slow)::text)
                  FROM {cache.name} WHERE k = $1::int$q$, '5 min', ARRAY['{cache.name}(k)'])""")
        barrier = threading.Barrier(6)
        answers, errors = [], []

        def reader():
            try:
                with cluster.connect() as c:
                    c.execute(f"SET twotier.stampede_wait_ms = {wait_ms}")
                    barrier.wait()
                    answers.append(c.execute(f"SELECT cached_{cache.name}('1')->>'v'").fetchone()[0])
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(repr(e))

        threads = [threading.Thread(target=reader) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors, errors
        assert answers == ["v1"] * 6
        return cache.fetches()

    protected = stampede(make_cache(), 2000)
    unprotected = stampede(make_cache(), 0)
    print(f"source queries for one key missed by 6 sessions at once: {protected} with the wait, "
          f"{unprotected} without")
    assert protected <= 2, f"{protected} source queries for one key"
    assert unprotected >= 4, "without the wait every session runs the query (the test's premise)"
