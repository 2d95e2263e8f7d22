"""The same-statement check of issue 8, on a primary and a streaming standby sharing one Redis:
each read runs `SELECT cached_x(k), (SELECT ver FROM x WHERE k = ...)` in one statement, and
the cached version must never be older than the one the statement's own snapshot sees. On the
standby that holds only because the writer's invalidation is in the WAL, replayed before its
commit (src/wal.rs); with the test-only `twotier.test_no_wal` the check finds older reads."""
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
    assert wait_for(lambda: replica.sql("SELECT to_regprocedure('cached_ss(text)')")[0][0] is not None, 10)
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


def test_without_the_wal_records_the_standby_serves_older_values(request):
    """The same check with the records turned off on the primary (test-only setting): the
    standby's listener alone cannot keep up with replay, and older reads appear."""
    redis, primary, replica = make_stack(request, {"twotier.test_no_wal": "on"})
    check = SameStatementCheck(primary, replica, redis, writers=2, readers=3)
    summary = check.run(max(SECONDS, 8))
    assert check.older["standby"], f"expected older reads without the WAL records: {summary}"
