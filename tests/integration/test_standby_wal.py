"""The same-statement check of issue 8, on a primary and a streaming standby sharing one Redis:
each read runs `SELECT cached_x(k), (SELECT ver FROM x WHERE k = ...)` in one statement, and
the cached version must never be older than the one the statement's own snapshot sees. On the
standby that holds only because the writer's invalidation is in the WAL, replayed before its
commit (src/invalidation/wal.rs); with the test-only `twotier.test_no_wal` the check finds older reads."""
import os
import random
import threading
import time

import psycopg

from servers import PgCluster, RedisServer
from conftest import wait_for

SECONDS = float(os.environ.get("TWOTIER_STANDBY_CHECK_SECONDS", "6"))
KEYS = 20


class SameStatementCheck:
    def __init__(self, primary, replica, redis, writers=2, readers=2):
        self.primary, self.replica, self.redis = primary, replica, redis
        self.writers, self.readers = writers, readers
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.reads = {"primary": 0, "standby": 0}
        self.older = {"primary": [], "standby": []}
        self.writes = 0
        self.errors = []

    def _writer(self):
        with self.primary.connect() as c:
            while not self.stop.is_set():
                try:
                    c.execute("UPDATE ss SET ver = ver + 1 WHERE k = %s", (random.randint(1, KEYS),))
                    with self.lock:
                        self.writes += 1
                except psycopg.Error as e:
                    self.errors.append(f"writer: {e}")

    def _reader(self, server, name, l1=True):
        with server.connect() as c:
            if not l1:
                # Straight to L2: the standby's trust in Redis is what is checked then.
                c.execute("SET twotier.l1_enabled = off")
            while not self.stop.is_set():
                k = random.randint(1, KEYS)
                try:
                    cached, seen = c.execute(
                        "SELECT (cached_ss(%s)->>'ver')::int, (SELECT ver FROM ss WHERE k = %s)",
                        (str(k), k)).fetchone()
                except psycopg.Error as e:
                    self.errors.append(f"{name}: {e}")
                    continue
                with self.lock:
                    self.reads[name] += 1
                    if cached < seen:
                        self.older[name].append((k, cached, seen))

    def run(self, seconds, chaos=None):
        threads = [threading.Thread(target=self._writer) for _ in range(self.writers)]
        for i in range(self.readers):
            threads.append(threading.Thread(target=self._reader, args=(self.replica, "standby", i % 2 == 0)))
        threads.append(threading.Thread(target=self._reader, args=(self.primary, "primary")))
        for t in threads:
            t.start()
        deadline = time.time() + seconds
        while time.time() < deadline:
            if chaos:
                chaos()
            else:
                time.sleep(0.2)
        self.stop.set()
        for t in threads:
            t.join(30)
        summary = (f"reads={self.reads} writes={self.writes} "
                   f"older={{primary: {len(self.older['primary'])}, standby: {len(self.older['standby'])}}}")
        print(f"same-statement check: {summary}")
        return summary


def make_stack(request, settings=None):
    redis = RedisServer().start()
    conf = {"twotier.redis_url": redis.url, "wal_level": "replica", "twotier.read_timeout_ms": 100,
            "twotier.connect_timeout_ms": 100, "twotier.retry_interval_ms": 200, **(settings or {})}
    primary = PgCluster(name="primary", settings=conf).start()
    request.addfinalizer(redis.destroy)
    request.addfinalizer(primary.destroy)
    primary.sql("CREATE EXTENSION twotier")
    primary.sql("CREATE TABLE ss(k int PRIMARY KEY, ver int NOT NULL DEFAULT 0)")
    primary.sql(f"INSERT INTO ss(k) SELECT generate_series(1, {KEYS})")
    primary.sql("""SELECT twotier.define('ss', $q$SELECT jsonb_build_object('ver', ver) FROM ss
                   WHERE k = $1::int$q$, '5 min', ARRAY['ss(k)'])""")
    replica = primary.replica()
    request.addfinalizer(replica.destroy)
    replica.start()
    assert wait_for(lambda: replica.sql("SELECT to_regproc('cached_ss')")[0][0] is not None, 10)
    return redis, primary, replica


def test_no_read_older_than_its_own_statement_on_either_server(request):
    redis, primary, replica = make_stack(request)
    healthy = SameStatementCheck(primary, replica, redis)
    summary = healthy.run(SECONDS)
    assert not healthy.errors[:5], healthy.errors[:5]
    assert healthy.reads["standby"] > 100 and healthy.writes > 100, summary
    assert healthy.older == {"primary": [], "standby": []}, f"Redis healthy: {summary}"

    faults = iter(["kill", "pause", "restart"] * 100)

    def chaos():
        fault = next(faults)
        if fault == "kill":
            redis.kill()
            time.sleep(0.5)
            redis.start()
        elif fault == "pause":
            redis.pause()
            time.sleep(0.5)
            redis.resume()
        else:
            redis.restart(down_s=0.2)
        time.sleep(0.5)

    faulty = SameStatementCheck(primary, replica, redis, readers=3)
    summary = faulty.run(SECONDS, chaos=chaos)
    assert faulty.reads["standby"] > 50 and faulty.writes > 50, summary
    assert faulty.older == {"primary": [], "standby": []}, f"Redis killed, paused, restarted: {summary}"

    # A standby whose replay lags: paused for 0.7 s at a time while the primary writes and the
    # channel delivers. It answers as of its own tables, and catches up when replay resumes.
    def lag():
        replica.sql("SELECT pg_wal_replay_pause()")
        time.sleep(0.7)
        replica.sql("SELECT pg_wal_replay_resume()")
        time.sleep(0.3)

    lagging = SameStatementCheck(primary, replica, redis, readers=3)
    summary = lagging.run(SECONDS, chaos=lag)
    assert lagging.reads["standby"] > 50, summary
    assert lagging.older == {"primary": [], "standby": []}, f"replay paused and resumed: {summary}"


OUTAGE_S = float(os.environ.get("TWOTIER_OUTAGE_SECONDS", "60"))


def test_a_long_redis_outage_with_writers_and_readers_on_both_servers(request):
    """Issue 18: Redis paused (the worst kind: sockets open, nothing answered) for a minute,
    then full (noeviction) and then stopped for a quarter of that each, while 2 writers commit
    thousands of transactions without waiting for Redis and readers read on the primary and
    the standby. Then Redis is back: every key is delivered (both ledgers empty), nothing
    read was older than its own statement, and no tier holds an old value."""
    redis, primary, replica = make_stack(request)
    check = SameStatementCheck(primary, replica, redis, writers=2, readers=2)
    phases = iter([("pause", OUTAGE_S), ("full", OUTAGE_S / 4), ("stop", OUTAGE_S / 4)])
    state = {"phase": None}

    def outage():
        phase = next(phases, None)
        if phase is None:
            time.sleep(0.2)
            return
        name, secs = phase
        state["phase"] = name
        if name == "pause":
            redis.pause()
            time.sleep(secs)
            redis.resume()
        elif name == "full":
            redis.fill_memory()
            time.sleep(secs)
            redis.free_memory()
        else:
            redis.stop()
            time.sleep(secs)
            redis.start()
        time.sleep(1)

    summary = check.run(OUTAGE_S * 1.5 + 6, chaos=outage)
    assert not check.errors[:5], check.errors[:5]
    assert check.writes > 1000 and check.reads["standby"] > 100 and check.reads["primary"] > 100, summary
    assert check.older == {"primary": [], "standby": []}, f"Redis paused, full and stopped: {summary}"

    def delivery(server):
        return server.sql("SELECT twotier.status()->'delivery'")[0][0]

    assert wait_for(lambda: delivery(primary)["undelivered"] == 0, timeout=60), delivery(primary)
    assert wait_for(lambda: delivery(replica)["undelivered"] == 0, timeout=30), delivery(replica)
    d = delivery(primary)
    print(f"outage: delivered={d['delivered']} failures={d['delivery_failures']} epoch_moves={d['epoch_moves']}")
    assert d["delivered"] >= 1000 and d["delivery_failures"] >= 1, d
    truth = dict(primary.sql("SELECT k, ver FROM ss"))
    lsn = primary.sql("SELECT pg_current_wal_insert_lsn()")[0][0]
    assert wait_for(lambda: replica.sql("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", str(lsn))[0][0], 10)
    for server in (primary, replica):
        for l1 in ("on", "off"):
            with server.connect() as c:
                c.execute(f"SET twotier.l1_enabled = {l1}")
                got = {k: c.execute("SELECT (cached_ss(%s)->>'ver')::int", (str(k),)).fetchone()[0] for k in truth}
            assert got == truth, f"stale after the outage (L1 {l1}): " + str(
                {k: (got[k], truth[k]) for k in truth if got[k] != truth[k]})


def test_without_the_wal_records_the_standby_serves_older_values(request):
    """The same check with the records turned off on the primary (test-only setting): the
    standby's listener alone cannot keep up with replay, and older reads appear."""
    redis, primary, replica = make_stack(request, {"twotier.test_no_wal": "on"})
    check = SameStatementCheck(primary, replica, redis, writers=2, readers=3)
    summary = check.run(max(SECONDS, 8))
    assert check.older["standby"], f"expected older reads without the WAL records: {summary}"


def test_a_standby_uses_no_l1_while_its_listener_is_not_subscribed(request):
    """What a standby learns only through the channel (`invalidate_pattern`, `set` on the
    primary) could be missed while its listener is not subscribed: it then answers without
    L1, and uses L1 again once subscribed (after the flush that comes with subscribing)."""
    redis, primary, replica = make_stack(request)

    def l1_hits(c):
        return c.execute("SELECT l1_hits FROM twotier.stats WHERE cache = 'ss'").fetchone()[0]

    def subscribed(c):
        return c.execute("SELECT (twotier.status()->'l1'->'worker'->>'subscribed')::bool").fetchone()[0]

    with replica.connect() as c:
        assert wait_for(lambda: subscribed(c), 10)
        for _ in range(3):
            c.execute("SELECT cached_ss('1')")
        assert l1_hits(c) >= 1
        redis.kill()
        assert wait_for(lambda: not subscribed(c), 10)
        before = l1_hits(c)
        for _ in range(5):
            assert c.execute("SELECT (cached_ss('1')->>'ver')::int").fetchone()[0] == 0
        assert l1_hits(c) == before, "L1 served while the channel was lost"
        redis.start()
        assert wait_for(lambda: subscribed(c), 15)
        for _ in range(3):
            c.execute("SELECT cached_ss('1')")
        assert l1_hits(c) > before


def test_a_standby_missing_a_key_waits_for_the_primarys_fill(request):
    """Stampede protection across servers: the primary's fetch of a missing key takes a short
    lease in Redis; a standby missing the same key meanwhile waits for the fill (bounded by
    twotier.stampede_wait_ms) instead of running the query on its own tables too. Without the
    wait it runs the query. A backend killed while it holds the lease leaves it to expire."""
    redis, primary, replica = make_stack(request)
    primary.sql("""CREATE FUNCTION slow_ver(int) RETURNS int LANGUAGE sql STABLE AS
                   $$ SELECT pg_sleep(0.6); SELECT ver FROM ss WHERE k = $1 $$""")
    primary.sql("""SELECT twotier.define('sl', $q$SELECT jsonb_build_object('ver', slow_ver($1::int))$q$,
                   '5 min', ARRAY['ss(k)'])""")
    assert wait_for(lambda: replica.sql("SELECT count(*) FROM twotier.caches WHERE name = 'sl'")[0][0] == 1, 10)

    def stats(c):
        return c.execute("SELECT misses, stampede_waits FROM twotier.stats WHERE cache = 'sl'").fetchone() or (0, 0)

    def primary_call(key, box):
        with primary.connect() as c:
            c.execute("SET twotier.stampede_wait_ms = 3000")
            box["pid"] = c.info.backend_pid
            try:
                box["v"] = c.execute("SELECT cached_sl(%s)", (key,)).fetchone()[0]
            except psycopg.Error as e:
                box["error"] = e

    def leased(key):
        """The primary's fetch of `key` holds its lease: a fixed sleep would race a loaded machine."""
        return wait_for(lambda: any(True for _ in redis.client().scan_iter(match=f"twotier:*:sl:*:{key}~lease")), 5)

    with replica.connect() as r:
        assert wait_for(lambda: r.execute(
            "SELECT (twotier.status()->'delivery'->>'l2_trusted')::bool").fetchone()[0], 10)
        r.execute("SET twotier.stampede_wait_ms = 3000")
        # 1. With the wait: the standby is answered by the primary's fill.
        box = {}
        t = threading.Thread(target=primary_call, args=("1", box))
        t.start()
        assert leased("1")
        m0, w0 = stats(r)
        assert r.execute("SELECT cached_sl('1')").fetchone()[0] == {"ver": 0}
        t.join()
        m1, w1 = stats(r)
        assert (m1 - m0, w1 - w0) == (0, 1), "the standby ran the query instead of waiting"
        # 2. Without it: the standby runs the query itself.
        box = {}
        t = threading.Thread(target=primary_call, args=("2", box))
        t.start()
        assert leased("2")
        r.execute("SET twotier.stampede_wait_ms = 0")
        assert r.execute("SELECT cached_sl('2')").fetchone()[0] == {"ver": 0}
        t.join()
        m2, w2 = stats(r)
        assert (m2 - m1, w2 - w1) == (1, 0)
        # 3. The primary's backend is killed holding the lease: the standby waits no longer
        #    than the lease and its own bound, then answers from its tables.
        r.execute("SET twotier.stampede_wait_ms = 1000")
        box = {}
        t = threading.Thread(target=primary_call, args=("3", box))
        t.start()
        assert leased("3")
        primary.sql("SELECT pg_terminate_backend(%s)", box["pid"])
        started = time.time()
        assert r.execute("SELECT cached_sl('3')").fetchone()[0] == {"ver": 0}
        assert time.time() - started < 3.0
        t.join()
        assert "error" in box
