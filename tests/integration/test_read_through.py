"""The read-through core against a real PostgreSQL and a real Redis (issue 2)."""
import json
import math
import threading
import time

import psycopg
import pytest


def call(conn, cache, key):
    return conn.execute(f"SELECT cached_{cache.name}(%s)", (key,)).fetchone()[0]


def test_hit_after_miss_fills_both_tiers(db, cache):
    first = call(db, cache, "1")
    assert first["v"] == "v1"
    assert call(db, cache, "1") == first
    assert cache.fetches() == 1
    # L2 holds the JSON text under a readable, namespaced key.
    assert json.loads(cache.redis_value("1")) == first
    # With L1 off for this session the same entry comes from Redis.
    db.execute("SET twotier.l1_enabled = off")
    assert call(db, cache, "1") == first
    assert cache.fetches() == 1
    s = cache.stats()
    assert (s["calls"], s["misses"], s["l1_hits"], s["l2_hits"]) == (3, 1, 1, 1)


def test_commit_invalidates_for_another_session_at_once(cluster, cache):
    a, b = cluster.connect(), cluster.connect()
    assert call(b, cache, "2")["v"] == "v2"
    assert call(b, cache, "2")["v"] == "v2"
    a.execute(f"UPDATE {cache.name} SET v = 'new' WHERE k = 2")
    assert call(b, cache, "2")["v"] == "new"
    # INSERT of a key that was cached as "no row", DELETE of a cached key.
    assert call(b, cache, "50") is None
    a.execute(f"INSERT INTO {cache.name}(k, v) VALUES (50, 'fifty')")
    assert call(b, cache, "50")["v"] == "fifty"
    a.execute(f"DELETE FROM {cache.name} WHERE k = 50")
    assert call(b, cache, "50") is None
    # An UPDATE that moves a row to another key invalidates both keys.
    assert call(b, cache, "3")["v"] == "v3"
    assert call(b, cache, "30") is None
    a.execute(f"UPDATE {cache.name} SET k = 30 WHERE k = 3")
    assert call(b, cache, "3") is None
    assert call(b, cache, "30")["v"] == "v3"


def test_rollback_invalidates_and_fills_nothing(cluster, cache):
    a, b = cluster.connect(), cluster.connect()
    before = call(b, cache, "1")
    stored = cache.redis_value("1")
    fetches = cache.fetches()
    with a.transaction(force_rollback=True):
        a.execute(f"UPDATE {cache.name} SET v = 'rolled back' WHERE k = 1")
        assert call(a, cache, "1")["v"] == "rolled back"
    assert call(b, cache, "1") == before
    assert cache.redis_value("1") == stored
    assert cache.fetches() == fetches + 1, "only the writer's own read went to the source"


def test_writer_reads_its_writes_and_publishes_nothing(cluster, cache):
    a, b = cluster.connect(), cluster.connect()
    assert call(b, cache, "4")["v"] == "v4"
    a.execute("BEGIN")
    a.execute(f"UPDATE {cache.name} SET v = 'mine' WHERE k = 4")
    for _ in range(3):
        assert call(a, cache, "4")["v"] == "mine"
    # Another key of the same cache also comes from the source for the writer.
    assert call(a, cache, "5")["v"] == "v5"
    assert call(b, cache, "4")["v"] == "v4"
    assert "mine" not in (cache.redis_value("4") or "")
    a.execute("COMMIT")
    assert call(b, cache, "4")["v"] == "mine"
    assert cache.stats()["bypasses"] == 4


def test_repeatable_read_bypasses(cluster, cache):
    a = cluster.connect()
    call(a, cache, "1")
    fetches = cache.fetches()
    a.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
    call(a, cache, "1")
    a.execute("COMMIT")
    assert cache.fetches() == fetches + 1


def test_truncate_invalidates_the_whole_cache(cluster, cache):
    a, b = cluster.connect(), cluster.connect()
    for k in ("1", "2", "3"):
        assert call(b, cache, k) is not None
    a.execute(f"TRUNCATE {cache.name}")
    for k in ("1", "2", "3"):
        assert call(b, cache, k) is None


def test_negative_entries(cluster, cache):
    a, b = cluster.connect(), cluster.connect()
    assert call(b, cache, "99") is None
    assert call(b, cache, "99") is None
    s = cache.stats()
    assert (s["misses"], s["negative_hits"]) == (1, 1)
    assert cache.redis_value("99") == "!none"
    a.execute(f"INSERT INTO {cache.name}(k, v) VALUES (99, 'late')")
    assert call(b, cache, "99")["v"] == "late"


def test_generic_api_and_patterns_stay_inside_their_cache(cluster, make_cache):
    # Text keys: set() stores under any key text, patterns match app keys of any shape.
    one, two = make_cache(key_type="text"), make_cache(key_type="text")
    c = cluster.connect()
    keys = ["user-1", "user-2", "a:b", "x*y", "with space", "product-1"]
    for cache in (one, two):
        for k in keys:
            c.execute("SELECT twotier.set(%s, %s, %s)", (cache.name, k, json.dumps({"key": k})))
    assert c.execute("SELECT twotier.get(%s, 'a:b')", (one.name,)).fetchone()[0] == {"key": "a:b"}
    assert one.fetches() == 0, "set entries are served without the source"
    # Escaped in Redis: no raw ':' '*' or ' ' after the cache prefix.
    raw = [k.decode() for k in one.redis.client().scan_iter(match=one.redis_pattern())]
    assert any(k.endswith("a%3Ab") for k in raw) and any(k.endswith("x%2Ay") for k in raw)
    assert c.execute("SELECT twotier.invalidate_pattern(%s, 'user-*')", (one.name,)).fetchone()[0] == 2
    exists = lambda cache, k: c.execute("SELECT twotier.exists(%s, %s)", (cache.name, k)).fetchone()[0]
    assert not exists(one, "user-1") and not exists(one, "user-2")
    assert exists(one, "product-1") and exists(one, "a:b")
    assert all(exists(two, k) for k in keys), "the other cache is untouched"
    # '*' and ':' in a pattern are the app's characters, not a way out of the cache.
    assert c.execute("SELECT twotier.invalidate_pattern(%s, 'x\\*y')", (one.name,)).fetchone()[0] == 1
    assert c.execute("SELECT twotier.invalidate_pattern(%s, '*')", (one.name,)).fetchone()[0] == 3
    assert all(exists(two, k) for k in keys)
    # invalidate, then flush (a new version: every key of the cache is gone, O(1)).
    c.execute("SELECT twotier.invalidate(%s, 'user-1')", (two.name,))
    assert not exists(two, "user-1")
    (v1,), = cluster.sql("SELECT version FROM twotier.caches WHERE name = %s", two.name)
    c.execute("SELECT twotier.flush(%s)", (two.name,))
    (v2,), = cluster.sql("SELECT version FROM twotier.caches WHERE name = %s", two.name)
    assert v2 > v1
    assert not any(exists(two, k) for k in keys)


def test_bad_input_is_a_clear_error(db, cache):
    with pytest.raises(psycopg.errors.UndefinedObject):
        db.execute("SELECT twotier.get('no_such_cache', 'k')")
    with pytest.raises(psycopg.errors.ProgramLimitExceeded):
        db.execute(f"SELECT twotier.get('{cache.name}', repeat('x', 5000))")


def hammer(cluster, cache, stop, errors, calls, keys=("1", "2", "3")):
    conn = cluster.connect()
    # L1 off: these sessions exercise Redis and the fallback to the source, not L1.
    conn.execute("SET twotier.l1_enabled = off")
    warnings = []
    conn.add_notice_handler(lambda d: warnings.append(d.message_primary))
    n = 0
    try:
        while not stop.is_set():
            k = keys[n % len(keys)]
            t0 = time.monotonic()
            v = call(conn, cache, k)
            elapsed = time.monotonic() - t0
            if v is None or v["v"] != f"v{k}":
                errors.append(f"wrong value for {k}: {v}")
            if elapsed > 1.0:
                errors.append(f"call took {elapsed:.2f}s")
            n += 1
    except Exception as e:  # any ERROR reaching a caller fails the test
        errors.append(repr(e))
    calls.append((n, warnings))
    conn.close()


def run_sessions(cluster, cache, during, sessions=4):
    stop, errors, calls = threading.Event(), [], []
    threads = [threading.Thread(target=hammer, args=(cluster, cache, stop, errors, calls)) for _ in range(sessions)]
    for t in threads:
        t.start()
    try:
        during()
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors, errors[:5]
    return calls


def test_redis_killed_mid_run_and_restarted(cluster, redis_server, cache):
    def during():
        time.sleep(0.5)
        redis_server.kill()
        time.sleep(1.0)
        redis_server.start()
        time.sleep(1.0)

    calls = run_sessions(cluster, cache, during)
    assert all(n > 0 for n, _ in calls)
    # After the restart the tiers fill again.
    c = cluster.connect()
    c.execute("SET twotier.l1_enabled = off")
    deadline = time.time() + 5
    while cache.redis_value("1") is None and time.time() < deadline:
        call(c, cache, "1")
        time.sleep(0.1)
    assert cache.redis_value("1") is not None


def test_redis_paused_answers_within_timeout_and_warns_rarely(cluster, redis_server, cache):
    def during():
        time.sleep(0.3)
        redis_server.pause()
        time.sleep(1.5)
        redis_server.resume()
        time.sleep(0.3)

    calls = run_sessions(cluster, cache, during)
    total = sum(n for n, _ in calls)
    warnings = sum(len(w) for _, w in calls)
    assert total > 20
    assert warnings >= 1, "the pause was noticed"
    assert warnings <= 4 * 3, f"{warnings} warnings for {total} calls"


def test_no_stale_read_after_commit_under_concurrency(cluster, cache):
    """A writer bumps `ver` and records it once COMMIT has returned; readers that start a
    call after that must never see an older `ver`, from any tier."""
    committed = [0]
    stop = threading.Event()
    stale = []

    def writer():
        w = cluster.connect()
        for i in range(1, 201):
            w.execute(f"UPDATE {cache.name} SET ver = %s WHERE k = 1", (i,))
            committed[0] = i
        stop.set()

    def reader(l1):
        r = cluster.connect()
        if not l1:
            r.execute("SET twotier.l1_enabled = off")
        while not stop.is_set():
            floor = committed[0]
            ver = call(r, cache, "1")["ver"]
            if ver < floor:
                stale.append((floor, ver))

    threads = [threading.Thread(target=reader, args=(i % 2 == 0,)) for i in range(3)]
    for t in threads:
        t.start()
    writer()
    for t in threads:
        t.join(30)
    assert not stale, stale[:5]
    s = cache.stats()
    assert s["l1_hits"] + s["l2_hits"] > 0, "the readers did use the cache"


def test_garbage_in_redis_is_replaced_from_the_source(cluster, redis_server, cache):
    c = cluster.connect()
    c.execute("SET twotier.l1_enabled = off")
    warnings = []
    c.add_notice_handler(lambda d: warnings.append(d.message_primary))
    good = call(c, cache, "1")
    redis_server.client().set(cache.redis_key("1"), b'{"broken": ')
    assert call(c, cache, "1")["v"] == good["v"], "garbage is not an ERROR: the source answers"
    assert any("unreadable value" in w for w in warnings)
    assert json.loads(cache.redis_value("1"))["v"] == good["v"], "and the garbage was replaced"
    assert cache.stats()["redis_errors"] >= 1


def test_full_redis_still_answers(cluster, redis_server, cache):
    r = redis_server.client()
    used = int(r.info("memory")["used_memory"])
    r.config_set("maxmemory-policy", "noeviction")
    r.config_set("maxmemory", used + 1024)
    try:
        c = cluster.connect()
        c.execute("SET twotier.l1_enabled = off")
        for k in ("1", "2", "3", "4", "5"):
            assert call(c, cache, k)["v"] == f"v{k}"
        s = cache.stats()
        assert s["misses"] == 5 and s["fills"] == 0, "nothing could be stored, everything answered"
        assert s["redis_errors"] >= 1
    finally:
        r.config_set("maxmemory", 0)


def test_reading_a_cache_needs_an_explicit_grant(cluster, cache):
    cluster.sql("DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'app_reader') "
                "THEN CREATE ROLE app_reader; END IF; END $$")
    c = cluster.connect()
    c.execute("SET ROLE app_reader")
    fn = f"cached_{cache.name}(int)"
    for q in (f"SELECT cached_{cache.name}('1')", f"SELECT twotier.get('{cache.name}', '1')"):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute(q)
    cluster.sql(f"GRANT EXECUTE ON FUNCTION {fn} TO app_reader")
    # The role cannot read the table, but the cache answers with its definer's rights.
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        c.execute(f"SELECT v FROM {cache.name} WHERE k = 1")
    assert call(c, cache, "1")["v"] == "v1"
    assert c.execute(f"SELECT twotier.get('{cache.name}', '1')->>'v'").fetchone()[0] == "v1"
    # Administrative calls stay with the owner and twotier_admin.
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        c.execute(f"SELECT twotier.set('{cache.name}', '1', '{{}}')")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        c.execute(f"SELECT twotier.flush('{cache.name}')")
    cluster.sql(f"REVOKE EXECUTE ON FUNCTION {fn} FROM app_reader")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        c.execute(f"SELECT twotier.get('{cache.name}', '1')")


def test_ttls_are_jittered_so_entries_filled_together_expire_apart(cluster, make_cache):
    """Fifty keys filled in one go: with twotier.ttl_jitter_pct (5 % by default) their TTLs
    spread over the last 5 % of the cache TTL instead of all ending in the same second."""
    cache = make_cache(rows=50, ttl="100 s")
    r = cache.redis.client()
    started = time.monotonic()
    with cluster.connect() as c:
        c.execute("SET twotier.l1_enabled = off")
        for k in range(1, 51):
            call(c, cache, str(k))
    ttls = [r.ttl(cache.redis_key(str(k))) for k in range(1, 51)]
    # 95-100 s when filled, less the seconds this took. A fill that met a Redis timeout on a
    # busy machine stored nothing (-2): the call answered from the source, as it should.
    low = 95 - math.ceil(time.monotonic() - started)
    stored = [t for t in ttls if t != -2]
    assert len(stored) >= 45, f"fills missing: {ttls}"
    assert all(low <= t <= 100 for t in stored), (low, ttls)
    assert max(stored) - min(stored) >= 2, f"every entry expires in the same second: {ttls}"
    other = make_cache(rows=20, ttl="100 s")
    started = time.monotonic()
    with cluster.connect() as c:
        c.execute("SET twotier.l1_enabled = off")
        c.execute("SET twotier.ttl_jitter_pct = 0")
        for k in range(1, 21):
            call(c, other, str(k))
    ttls = [r.ttl(other.redis_key(str(k))) for k in range(1, 21)]
    stored = [t for t in ttls if t != -2]
    assert len(stored) >= 18, f"fills missing: {ttls}"
    # All 100 s when filled: apart only by the whole seconds the fills took.
    spread = 1 + math.ceil(time.monotonic() - started)
    assert max(stored) - min(stored) <= spread, f"without jitter the TTLs are the cache's: {ttls}"


def test_a_bulk_change_stays_a_flush_when_the_limit_moves_before_commit(cluster, cache):
    """Past twotier.flush_above_keys a transaction stops collecting keys (its triggers no longer
    render them): the cache moves to a new version at commit even if the limit was raised, or
    turned off, in between. Otherwise the keys dropped at that point would stay cached."""
    with cluster.connect() as c:
        for k in cache.keys:
            cache.call(c, k)
    version = cache.version()
    with cluster.connect() as w:
        w.execute("BEGIN")
        w.execute("SET LOCAL twotier.flush_above_keys = 2")
        w.execute(f"UPDATE {cache.name} SET ver = ver + 1 WHERE k <= 4")
        w.execute("SET LOCAL twotier.flush_above_keys = 0")
        w.execute(f"UPDATE {cache.name} SET ver = ver + 1 WHERE k = 5")
        w.execute("COMMIT")
    assert cache.version() > version, "the bulk change did not move the cache to a new version"
    assert cache.stale_keys(l1=True) == [] and cache.stale_keys(l1=False) == []
