"""Consistency under faults, one deterministic sequence per point of the contract: durable
invalidation through the ledger, no L2 for a key while its invalidation is undelivered, Redis keys tied
to the Redis server's incarnation, no fill from a transaction that wrote, and triggers that
see every write (partitions, replication apply, any DateStyle/TimeZone). Against a Redis and
a PostgreSQL cluster of this module's own: the tests pause and restart both."""
import itertools
import json
import os
import signal
import threading
import time

import pytest
from conftest import database_scope, redis_incarnation, wait_for  # noqa: E402

CALL_LIMIT_S = 2.0
_names = itertools.count(1)


@pytest.fixture(autouse=True)
def healthy(own_stack):
    own_stack.heal()
    yield
    own_stack.heal()


def new_name(prefix: str) -> str:
    return f"{prefix}{next(_names)}"


def cached(stack, name, key, l1=True, fields=("k", "v", "ver")):
    """cached_<name>(key) from a fresh session, L1 on or off, within CALL_LIMIT_S; only
    `fields` of the answer (the test caches also return a fetch counter)."""
    with stack.cluster.connect() as c:
        if not l1:
            c.execute("SET twotier.l1_enabled = off")
        t0 = time.monotonic()
        v = c.execute(f"SELECT cached_{name}(%s)", (str(key),)).fetchone()[0]
        elapsed = time.monotonic() - t0
    assert elapsed < CALL_LIMIT_S, f"cached_{name}({key!r}) took {elapsed:.2f}s"
    return {f: v.get(f) for f in fields} if v is not None else None


def row(stack, table, key):
    """The truth, straight from the table."""
    r = stack.cluster.sql(f"SELECT k, v, ver FROM {table} WHERE k = %s", int(key))
    return dict(zip(("k", "v", "ver"), r[0])) if r else None


def assert_fresh(stack, name, key, table=None):
    want = row(stack, table or name, key)
    for l1 in (True, False):
        got = cached(stack, name, key, l1=l1)
        assert got == want, f"cache {name} key {key} (L1 {'on' if l1 else 'off'}): got {got}, the table has {want}"


def fill(stack, cache, key):
    """Puts `key` in L1 and L2 and checks that Redis holds it; returns the value."""
    with stack.cluster.connect() as c:
        v = cache.call(c, key)
        assert cache.call(c, key) == v
    raw = cache.redis_value(str(key))
    assert raw is not None and json.loads(raw)["ver"] == v["ver"], f"L2 was not filled: {raw!r}"
    return v


def redis_key(stack, name, key):
    """The Redis key of a cache made here rather than through conftest's Cache."""
    (version,), = stack.cluster.sql("SELECT version FROM twotier.caches WHERE name = %s", name)
    return f"twotier:{redis_incarnation(stack.redis, stack.cluster)}:{database_scope(stack.cluster)}:{name}:v{version}:{key}"


def update(conn, cache, key=1):
    conn.execute(f"UPDATE {cache.name} SET ver = ver + 1 WHERE k = %s", (key,))


# -- durable invalidation ---------------------------------------------------------------------

@pytest.mark.parametrize("ledger", [True, False], ids=["ledger", "test_no_ledger"])
def test_commit_while_redis_is_paused(own_stack, ledger):
    """Key 1 in every tier; Redis stopped (SIGSTOP); another session commits an UPDATE of
    key 1, without waiting for Redis; Redis resumed; a new session must read the new row,
    and again once the worker delivered. With the ledger switched off for the writer the
    same sequence serves the old row from L2: this shows that the test can fail."""
    stack = own_stack
    cache = stack.cache()
    old = fill(stack, cache, 1)
    w = stack.cluster.connect()
    try:
        if not ledger:
            w.execute("SET twotier.test_no_ledger = on")
        stack.redis.pause()
        try:
            t0 = time.monotonic()
            update(w, cache)
            took = time.monotonic() - t0
            print(f"COMMIT with Redis paused returned after {took:.3f}s")
            assert took < 0.5, "the commit does not wait for Redis"
            ob = stack.delivery()
            if ledger:
                assert ob["undelivered"] >= 1 and ob["l2_trusted"] is True, ob
            else:
                assert ob["undelivered"] == 0, ob
        finally:
            stack.redis.resume()
        want = old["ver"] + 1 if ledger else old["ver"]
        assert cached(stack, cache.name, 1, l1=False)["ver"] == want
        assert cached(stack, cache.name, 1, l1=True)["ver"] == want
        if ledger:
            stack.wait_trusted()
            assert_fresh(stack, cache.name, 1)
    finally:
        w.close()


def test_writer_disconnecting_right_after_commit(own_stack):
    stack = own_stack
    cache = stack.cache()
    fill(stack, cache, 1)
    stack.redis.pause()
    try:
        w = stack.cluster.connect()
        update(w, cache)
        w.close()  # whatever the backend kept in memory dies with it
    finally:
        stack.redis.resume()
    assert_fresh(stack, cache.name, 1)
    stack.wait_trusted()
    assert_fresh(stack, cache.name, 1)


def test_session_without_redis_invalidates_through_the_ledger(own_stack):
    stack = own_stack
    cache = stack.cache()
    fill(stack, cache, 1)
    delivered = stack.delivery()["delivered"]
    with stack.cluster.connect() as w:
        w.execute("SET twotier.redis_url = ''")
        update(w, cache)
    assert_fresh(stack, cache.name, 1)
    stack.wait_trusted()
    assert stack.delivery()["delivered"] > delivered, "the keys went through the ledger"
    raw = cache.redis_value("1")
    # Gone, or filled again from the source after the delivery: never the old row.
    assert raw is None or raw.startswith("!") or json.loads(raw)["ver"] == 1, \
        f"Redis still holds the old value for key 1: {raw}"
    assert_fresh(stack, cache.name, 1)


def test_status_reports_the_ledger(own_stack):
    stack = own_stack
    cache = stack.cache()
    fill(stack, cache, 1)
    before = stack.delivery()
    stack.redis.pause()
    try:
        with stack.cluster.connect() as w:
            update(w, cache)
        ob = stack.delivery()
        assert ob["undelivered"] >= 1 and ob["bytes_used"] > 0, ob
        assert isinstance(ob["worker_pid"], int), ob
        with open(f"/proc/{ob['worker_pid']}/cmdline", "rb") as f:
            assert b"twotier delivery" in f.read()
        assert cached(stack, cache.name, 1, l1=False) == row(stack, cache.name, 1)
        assert wait_for(lambda: stack.delivery()["delivery_failures"] > before["delivery_failures"], timeout=10)
    finally:
        stack.redis.resume()
    stack.wait_trusted()
    ob = stack.delivery()
    assert ob["undelivered"] == 0 and ob["l2_trusted"] is True and ob["delivered"] > before["delivered"], ob


def test_no_backend_reads_l2_for_a_key_whose_invalidation_is_undelivered(own_stack):
    """A full Redis (noeviction) answers reads but takes no write: the worker cannot deliver
    key 1's tombstone, while the old value sits in Redis, readable. Only not reading L2 for
    that key keeps it from being served; key 2, untouched, is still served from L2."""
    stack = own_stack
    cache = stack.cache()
    with stack.cluster.connect() as c:
        c.execute("SET twotier.l1_enabled = off")
        for k in (1, 2):
            cache.call(c, k)
    stack.redis.fill_memory()
    try:
        with stack.cluster.connect() as w:
            update(w, cache)
        assert json.loads(cache.redis_value("1"))["ver"] == 0, "the old value is still in Redis"
        assert stack.delivery()["undelivered"] >= 1
        before = cache.stats()
        assert cached(stack, cache.name, 1, l1=False)["ver"] == 1
        assert cache.stats()["l2_hits"] == before["l2_hits"], "L2 was read for an undelivered key"
        assert cached(stack, cache.name, 2, l1=False) == row(stack, cache.name, 2)
        assert cache.stats()["l2_hits"] == before["l2_hits"] + 1, "key 2 is still served from L2"
    finally:
        stack.redis.free_memory()
    stack.wait_trusted()
    hits = cache.stats()["l2_hits"]
    for _ in range(2):  # the first refills, the second must hit
        assert cached(stack, cache.name, 1, l1=False)["ver"] == 1
    assert cache.stats()["l2_hits"] > hits, "L2 is used for key 1 again once it is delivered"


def test_tombstones_live_tombstone_ttl_not_the_cache_ttl(own_stack):
    stack = own_stack
    cache = stack.cache(ttl="5 min")
    (ttl_setting, unit), = stack.cluster.sql(
        "SELECT setting, unit FROM pg_settings WHERE name = 'twotier.tombstone_ttl_s'")
    assert (ttl_setting, unit) == ("30", "s")
    fill(stack, cache, 1)
    with stack.cluster.connect() as w:
        update(w, cache)
    r = stack.redis.client()
    key = cache.redis_key("1")
    raw = r.get(key)
    assert raw is not None and raw.startswith(b"!inval"), raw
    assert 0 < r.ttl(key) <= 30, "the tombstone lives tombstone_ttl_s, not the cache's 5 minutes"


def test_a_fill_after_a_read_older_than_tombstone_ttl_is_refused(own_stack):
    """What lets tombstones live seconds: a fill whose L2 read is older than
    twotier.tombstone_ttl_s is refused by Redis's clock. A cache query that sleeps past it
    (1 s here) answers but stores nothing in L2; a fast one stores as usual."""
    stack = own_stack
    n = new_name("age")
    stack.cluster.sql(f"CREATE TABLE {n} (k int PRIMARY KEY, v text)")
    stack.cluster.sql(f"INSERT INTO {n} VALUES (1, 'slow'), (2, 'fast')")
    stack.cluster.sql(f"""SELECT twotier.define('{n}', $q$SELECT jsonb_build_object('v', v,
                              'slept', CASE WHEN k = 1 THEN pg_sleep(1.5)::text END)
                            FROM {n} WHERE k = $1::int$q$, '5 min', ARRAY['{n}(k)'])""")
    stack.cluster.set({"twotier.tombstone_ttl_s": 1})
    stack.cluster.reload()
    try:
        with stack.cluster.connect() as c:
            c.execute("SET twotier.l1_enabled = off")
            assert c.execute(f"SELECT cached_{n}('1')->>'v'").fetchone()[0] == "slow"
            assert c.execute(f"SELECT cached_{n}('2')->>'v'").fetchone()[0] == "fast"
            fills, rejected = c.execute(
                "SELECT fills, fills_rejected FROM twotier.stats WHERE cache = %s", (n,)).fetchone()
        r = stack.redis.client()
        assert r.get(redis_key(stack, n, 1)) is None, "a fill 1.5 s after its read went through"
        assert r.get(redis_key(stack, n, 2)) is not None
        assert (fills, rejected) == (1, 1)
    finally:
        stack.cluster.set({"twotier.tombstone_ttl_s": 30})
        stack.cluster.reload()


# -- Redis incarnations and PostgreSQL restarts -----------------------------------------------

def test_redis_restored_from_an_older_snapshot_serves_nothing_older(own_stack):
    stack = own_stack
    cache = stack.cache()
    old = fill(stack, cache, 1)
    old_key = cache.redis_key("1")
    old_run = stack.redis.run_id()
    snap = stack.redis.save_rdb()
    with stack.cluster.connect() as w:
        update(w, cache)
    stack.redis.restart_from_rdb(snap)
    # The scenario is real: the outdated value is back in Redis, under the old incarnation.
    assert json.loads(stack.redis.client().get(old_key))["ver"] == old["ver"]
    assert stack.redis.run_id()[:12] != old_run[:12]
    assert_fresh(stack, cache.name, 1)
    stack.wait_trusted()
    assert_fresh(stack, cache.name, 1)


@pytest.mark.parametrize("how", ["clean", "immediate", "immediate_after_checkpoint", "kill_worker",
                                 "clean_without_ledger"])
def test_postgres_restart_with_undelivered_invalidations(own_stack, how):
    """Redis paused, a commit: its key waits in the ledger. A clean restart keeps it (the
    postmaster writes the ledger's file last) and the epoch stays; an immediate stop rebuilds
    it from the WAL (crash recovery replays the writer's record), or, when a checkpoint
    passed the record, from the worker's file or by moving L2 to a new epoch. Either way no
    old value. Without the ledger (`twotier.test_no_ledger` for the writer) the same clean
    restart leaves the old value in L2, served afterwards: the test can fail."""
    stack = own_stack
    cache = stack.cache()
    old = fill(stack, cache, 1)
    stack.cluster.sql("CHECKPOINT")  # the test cluster commits asynchronously: keep the cache
    epoch = stack.delivery()["epoch"]
    stack.redis.pause()
    try:
        with stack.cluster.connect() as w:
            w.execute("SET synchronous_commit = on")
            if how == "clean_without_ledger":
                w.execute("SET twotier.test_no_ledger = on")
            update(w, cache)
        if how == "clean_without_ledger":
            stack.cluster.restart()
            stack.redis.resume()
            assert cached(stack, cache.name, 1, l1=False)["ver"] == old["ver"], "the old value should be served"
            return
        assert stack.delivery()["undelivered"] >= 1
        if how == "immediate_after_checkpoint":
            time.sleep(1.2)
            stack.cluster.sql("CHECKPOINT")
        if how == "clean":
            stack.cluster.restart()
            ob = stack.delivery()
            assert ob["undelivered"] >= 1 and ob["epoch"] == epoch, ob
        elif how == "kill_worker":
            # SIGKILL of a child: the postmaster resets shared memory and runs crash
            # recovery; it writes the ledger's file before the reset.
            os.kill(stack.delivery()["worker_pid"], signal.SIGKILL)
            time.sleep(0.5)
            assert wait_for(lambda: _answers(stack), timeout=30)
            ob = stack.delivery()
            assert ob["undelivered"] >= 1 or ob["epoch"] != epoch, ob
        else:
            stack.cluster.crash()
            stack.cluster.start()
            ob = stack.delivery()
            assert ob["undelivered"] >= 1 or ob["epoch"] != epoch, ob
        assert_fresh(stack, cache.name, 1)
    finally:
        stack.redis.resume()
    stack.wait_trusted()
    assert_fresh(stack, cache.name, 1)


def _answers(stack) -> bool:
    try:
        stack.cluster.sql("SELECT 1")
        return True
    except Exception:
        return False


# -- no fill from a transaction that wrote ---------------------------------------------------

WRITING_STATEMENTS = {
    "INSERT RETURNING": "INSERT INTO {t}(k, v) VALUES ({k}, 'ghost') RETURNING cached_{t}('{k}')",
    "data-modifying CTE": "WITH ins AS (INSERT INTO {t}(k, v) VALUES ({k}, 'ghost') RETURNING k) "
                          "SELECT cached_{t}(k) FROM ins",
}


@pytest.mark.parametrize("statement", WRITING_STATEMENTS.values(), ids=WRITING_STATEMENTS.keys())
def test_a_writing_statement_publishes_nothing(own_stack, statement):
    """The statement's triggers have not run when its own call reads the cache: only the
    transaction's xid tells that what the source shows is uncommitted."""
    stack = own_stack
    cache = stack.cache()
    a = stack.cluster.connect()
    try:
        a.execute("BEGIN")
        mine = a.execute(statement.format(t=cache.name, k=42)).fetchone()[0]
        assert mine is not None and mine["v"] == "ghost", "the writer sees its own row"
        for l1 in (True, False):
            assert cached(stack, cache.name, 42, l1=l1) is None
        assert "ghost" not in (cache.redis_value("42") or "")
        a.execute("ROLLBACK")
        for l1 in (True, False):
            assert cached(stack, cache.name, 42, l1=l1) is None
        assert "ghost" not in (cache.redis_value("42") or "")
    finally:
        a.close()


# -- triggers see every write ----------------------------------------------------------------

@pytest.fixture
def partitioned(own_stack):
    """A cache over a range-partitioned table with one partition (k 1..99), rows 1..5."""
    n = new_name("part")
    stack = own_stack
    stack.cluster.sql(f"CREATE TABLE {n} (k int NOT NULL, v text, ver int NOT NULL DEFAULT 0) PARTITION BY RANGE (k)")
    stack.cluster.sql(f"CREATE TABLE {n}_a PARTITION OF {n} FOR VALUES FROM (1) TO (100)")
    stack.cluster.sql(f"INSERT INTO {n}(k, v) SELECT g, 'v' || g FROM generate_series(1, 5) g")
    stack.cluster.sql(f"""SELECT twotier.define('{n}', $q$SELECT jsonb_build_object('k', k, 'v', v, 'ver', ver)
                                                      FROM {n} WHERE k = $1::int$q$, '5 min', ARRAY['{n}(k)'])""")
    return n


def writes_reach_the_cache(stack, n, table, keys):
    """UPDATE, DELETE and INSERT aimed at `table` (a partition of `n`), each after the keys
    were read into every tier (an absent key as a negative entry)."""
    update_key, delete_key, insert_key = keys
    for sql, key in ((f"UPDATE {table} SET ver = ver + 1 WHERE k = {update_key}", update_key),
                     (f"DELETE FROM {table} WHERE k = {delete_key}", delete_key),
                     (f"INSERT INTO {table}(k, v) VALUES ({insert_key}, 'v{insert_key}')", insert_key)):
        for l1 in (True, False):
            cached(stack, n, key, l1=l1)
        stack.cluster.sql(sql)
        assert_fresh(stack, n, key, table=n)


def test_dml_aimed_at_a_partition_invalidates(own_stack, partitioned):
    writes_reach_the_cache(own_stack, partitioned, f"{partitioned}_a", (1, 2, 7))


def test_dml_on_a_partition_created_after_define_invalidates(own_stack, partitioned):
    n = partitioned
    own_stack.cluster.sql(f"CREATE TABLE {n}_b PARTITION OF {n} FOR VALUES FROM (100) TO (200)")
    own_stack.cluster.sql(f"INSERT INTO {n}(k, v) VALUES (150, 'v150'), (151, 'v151')")
    writes_reach_the_cache(own_stack, n, f"{n}_b", (150, 151, 152))


def test_dml_on_a_partition_attached_after_define_invalidates(own_stack, partitioned):
    n = partitioned
    own_stack.cluster.sql(f"CREATE TABLE {n}_c (k int NOT NULL, v text, ver int NOT NULL DEFAULT 0)")
    own_stack.cluster.sql(f"INSERT INTO {n}_c(k, v) VALUES (250, 'v250'), (251, 'v251')")
    # Keys 250..252 are read only after the ATTACH: whether attaching (or detaching) a
    # partition must invalidate what was cached before is not part of this test.
    own_stack.cluster.sql(f"ALTER TABLE {n} ATTACH PARTITION {n}_c FOR VALUES FROM (200) TO (300)")
    writes_reach_the_cache(own_stack, n, f"{n}_c", (250, 251, 252))


def test_attach_detach_and_alter_type_flush_what_they_change(own_stack, partitioned):
    """Rows that arrive or leave, or change, without any row trigger: ATTACH PARTITION of a
    table holding a key cached as "no row", DETACH of a partition holding a cached key, and
    ALTER COLUMN ... TYPE ... USING rewriting a cached value."""
    n, stack = partitioned, own_stack
    stack.cluster.sql(f"CREATE TABLE {n}_d (k int NOT NULL, v text, ver int NOT NULL DEFAULT 0)")
    stack.cluster.sql(f"INSERT INTO {n}_d(k, v) VALUES (300, 'v300')")
    for l1 in (True, False):
        assert cached(stack, n, 300, l1=l1) is None
    stack.cluster.sql(f"ALTER TABLE {n} ATTACH PARTITION {n}_d FOR VALUES FROM (300) TO (400)")
    assert_fresh(stack, n, 300)
    for l1 in (True, False):
        assert cached(stack, n, 300, l1=l1)["v"] == "v300"
    stack.cluster.sql(f"ALTER TABLE {n} DETACH PARTITION {n}_d")
    for l1 in (True, False):
        assert cached(stack, n, 300, l1=l1) is None, "a detached row is still served"
    for l1 in (True, False):
        assert cached(stack, n, 2, l1=l1)["v"] == "v2"
    stack.cluster.sql(f"ALTER TABLE {n} ALTER COLUMN v TYPE text USING upper(v)")
    assert_fresh(stack, n, 2)
    assert cached(stack, n, 2)["v"] == "V2"


def test_truncate_of_a_partition_invalidates(own_stack, partitioned):
    n = partitioned
    for k in (1, 2, 3):
        for l1 in (True, False):
            assert cached(own_stack, n, k, l1=l1) is not None
    own_stack.cluster.sql(f"TRUNCATE {n}_a")
    for k in (1, 2, 3):
        assert_fresh(own_stack, n, k)


def test_triggers_fire_under_session_replication_role_replica(own_stack):
    """Logical replication applies changes with session_replication_role = replica, where
    ordinary triggers do not fire."""
    stack = own_stack
    cache = stack.cache()
    for k in (1, 2, 99):
        for l1 in (True, False):
            cached(stack, cache.name, k, l1=l1)
    with stack.cluster.connect() as w:
        w.execute("SET session_replication_role = replica")
        update(w, cache, 1)
        w.execute(f"DELETE FROM {cache.name} WHERE k = 2")
        w.execute(f"INSERT INTO {cache.name}(k, v) VALUES (99, 'v99')")
    for k in (1, 2, 99):
        assert_fresh(stack, cache.name, k)
    for l1 in (True, False):
        assert cached(stack, cache.name, 3, l1=l1) is not None
    with stack.cluster.connect() as w:
        w.execute("SET session_replication_role = replica")
        w.execute(f"TRUNCATE {cache.name}")
    assert_fresh(stack, cache.name, 3)


def test_keys_do_not_depend_on_the_writers_datestyle_timezone_or_float_digits(own_stack):
    """The app passes keys in ISO/UTC and shortest-exact float form; a writer with other
    settings must invalidate those same keys."""
    stack = own_stack
    n = new_name("ts")
    stack.cluster.sql(f"CREATE TABLE {n} (at timestamptz PRIMARY KEY, x float8 UNIQUE, ver int NOT NULL DEFAULT 0)")
    stack.cluster.sql(f"INSERT INTO {n} VALUES ('2024-01-02 03:04:05+00', 0.1::float8 + 0.2::float8, 0)")
    for cache_name, column, cast in ((f"{n}_at", "at", "timestamptz"), (f"{n}_x", "x", "float8")):
        stack.cluster.sql(f"""SELECT twotier.define('{cache_name}', $q$SELECT jsonb_build_object('ver', ver)
                                FROM {n} WHERE {column} = $1::{cast}$q$, '5 min', ARRAY['{n}({column})'])""")
    keys = {f"{n}_at": "2024-01-02 03:04:05+00", f"{n}_x": "0.30000000000000004"}
    for cache_name, key in keys.items():
        for l1 in (True, False):
            assert cached(stack, cache_name, key, l1=l1, fields=("ver",)) == {"ver": 0}
    with stack.cluster.connect() as w:
        w.execute("SET DateStyle = 'German'")
        w.execute("SET TimeZone = 'Asia/Tokyo'")
        w.execute("SET extra_float_digits = 0")
        # The writer's own text forms differ from the keys: otherwise this test proves nothing.
        at_text, x_text = w.execute(f"SELECT at::text, x::text FROM {n}").fetchone()
        assert at_text != keys[f"{n}_at"] and x_text != keys[f"{n}_x"], (at_text, x_text)
        w.execute(f"UPDATE {n} SET ver = ver + 1")
    for cache_name, key in keys.items():
        for l1 in (True, False):
            assert cached(stack, cache_name, key, l1=l1, fields=("ver",)) == {"ver": 1}, (cache_name, l1)


# -- versions resolved at commit --------------------------------------------------------------

@pytest.mark.parametrize("how", ["flush", "truncate"])
def test_flush_or_truncate_while_a_writer_is_open(own_stack, how):
    """A cache over `n` and `n_side`. A writer updates key 1 of `n` and stays open; a flush
    (or a TRUNCATE of `n_side`, which flushes too) commits; a reader fills the new version's
    key 1 from the source, which still shows the old row; then the writer commits. Had it
    invalidated the keys of the version it saw when it wrote, the new version's entry would
    stay old."""
    stack = own_stack
    n = new_name("fl")
    stack.cluster.sql(f"CREATE TABLE {n} (k int PRIMARY KEY, v text, ver int NOT NULL DEFAULT 0)")
    stack.cluster.sql(f"INSERT INTO {n}(k, v) SELECT g, 'v' || g FROM generate_series(1, 3) g")
    stack.cluster.sql(f"CREATE TABLE {n}_side (k int)")
    stack.cluster.sql(f"""SELECT twotier.define('{n}', $q$SELECT jsonb_build_object('k', t.k, 'v', t.v, 'ver', t.ver,
                              'side', (SELECT count(*) FROM {n}_side s WHERE s.k = t.k))
                            FROM {n} t WHERE t.k = $1::int$q$, '5 min', ARRAY['{n}(k)', '{n}_side(k)'])""")
    flush = f"SELECT twotier.flush('{n}')" if how == "flush" else f"TRUNCATE {n}_side"

    # The flush commits while the writer is open.
    for l1 in (True, False):
        cached(stack, n, 1, l1=l1)
    a = stack.cluster.connect()
    try:
        a.execute("BEGIN")
        a.execute(f"UPDATE {n} SET ver = ver + 1 WHERE k = 1")
        stack.cluster.sql(flush)
        for l1 in (True, False):
            assert cached(stack, n, 1, l1=l1)["ver"] == 0, "the writer has not committed yet"
        raw = stack.redis.client().get(redis_key(stack, n, 1))
        assert raw is not None and json.loads(raw)["ver"] == 0, "the reader filled the new version"
        a.execute("COMMIT")
    finally:
        a.close()
    assert_fresh(stack, n, 1)

    # The other way round: the flush still open when the writer commits (which may wait for
    # it: versions are resolved under a lock).
    for l1 in (True, False):
        cached(stack, n, 2, l1=l1)
    a, f = stack.cluster.connect(), stack.cluster.connect()
    try:
        a.execute("BEGIN")
        a.execute(f"UPDATE {n} SET ver = ver + 1 WHERE k = 2")
        f.execute("BEGIN")
        f.execute(flush)
        committed = threading.Thread(target=a.execute, args=("COMMIT",))
        committed.start()
        time.sleep(0.2)
        f.execute("COMMIT")
        committed.join(10)
        assert not committed.is_alive(), "the writer's COMMIT hangs"
    finally:
        a.close()
        f.close()
    assert row(stack, n, 2)["ver"] == 1, "the writer committed"
    assert_fresh(stack, n, 2)
    assert_fresh(stack, n, 1)


def test_a_definition_read_in_repeatable_read_is_not_an_old_version(own_stack):
    """A backend that first meets a cache inside a REPEATABLE READ transaction whose snapshot
    predates a flush must still load the version the flush made: read under that snapshot, the
    definition would stay cached with the old version, whose keys no writer invalidates any
    more, and the session would go on reading old entries after its transaction ended."""
    stack = own_stack
    n = new_name("rr")
    stack.cluster.sql(f"CREATE TABLE {n} (k int PRIMARY KEY, v text, ver int NOT NULL DEFAULT 0)")
    stack.cluster.sql(f"INSERT INTO {n}(k, v) VALUES (1, 'v1')")
    stack.cluster.sql(f"""SELECT twotier.define('{n}', $q$SELECT jsonb_build_object('k', k, 'v', v, 'ver', ver)
                            FROM {n} WHERE k = $1::int$q$, '5 min', ARRAY['{n}(k)'])""")
    a = stack.cluster.connect()
    try:
        # The old version's key 1 is in both tiers.
        for l1 in (True, False):
            assert cached(stack, n, 1, l1=l1)["ver"] == 0
        a.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        a.execute("SELECT 1")  # the snapshot is taken here, before the flush
        stack.cluster.sql(f"SELECT twotier.flush('{n}')")
        assert a.execute(f"SELECT cached_{n}('1')->>'ver'").fetchone()[0] == "0"
        a.execute("COMMIT")
        # A write now invalidates the new version's key only.
        stack.cluster.sql(f"UPDATE {n} SET ver = 1 WHERE k = 1")
        for _ in range(3):
            assert a.execute(f"SELECT cached_{n}('1')->>'ver'").fetchone()[0] == "1", \
                "the session kept the version its REPEATABLE READ snapshot showed"
    finally:
        a.close()
