"""Fixtures: one real Redis and one real PostgreSQL cluster (twotier preloaded) per test
session; tests use their own tables and caches so that they do not interfere. Test modules
that break Redis or restart PostgreSQL take `own_stack` instead: a Redis and a cluster of
their own, so that the session-wide pair stays healthy for everyone else."""
import itertools
import random
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

from servers import PgCluster, RedisProxy, RedisServer  # noqa: E402

_names = itertools.count(1)


def twotier_settings(redis_url: str) -> dict:
    """What every test cluster runs with: short timeouts, so that faults cost little time."""
    return {
        "twotier.redis_url": redis_url,
        "twotier.retry_interval_ms": 200,
        "twotier.read_timeout_ms": 100,
        "twotier.connect_timeout_ms": 100,
        "twotier.l1_size_mb": 16,
    }


def wait_for(predicate, timeout: float = 5.0, step: float = 0.05) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def simple_cache(pg, name: str, rows: int = 1) -> None:
    """Table `name` (k int, v text) with rows k = 1..rows, v = 'v' || k, and cache `name`
    returning {"v": v}, watching it. No sequence in the query: a standby cannot run nextval()."""
    pg.sql(f"CREATE TABLE {name}(k int PRIMARY KEY, v text)")
    pg.sql(f"INSERT INTO {name} SELECT g, 'v' || g FROM generate_series(1, {rows}) g")
    pg.sql(f"""SELECT twotier.define('{name}', $q$SELECT jsonb_build_object('v', v) FROM {name}
                                      WHERE k = $1::int$q$, '5 min', ARRAY['{name}(k)'])""")


@pytest.fixture(scope="session")
def redis_server():
    r = RedisServer().start()
    yield r
    r.destroy()


@pytest.fixture(scope="session")
def cluster(redis_server):
    pg = PgCluster(settings=twotier_settings(redis_server.url)).start()
    pg.sql("CREATE EXTENSION twotier")
    yield pg
    pg.destroy()


@pytest.fixture
def db(cluster):
    """A session on the cluster (autocommit)."""
    conn = cluster.connect()
    yield conn
    conn.close()


def delivery_of(cluster) -> dict:
    """`twotier.status()->'delivery'`: the ledger (undelivered keys, l2_trusted, delivered,
    delivery_failures, epoch, worker_pid)."""
    with cluster.connect() as c:
        return c.execute("SELECT twotier.status()->'delivery'").fetchone()[0]


def redis_incarnation(redis_server, cluster=None) -> str:
    """The part of every Redis key that names the Redis server's life (the first 12
    characters of its run_id, which a restart changes) and, once the cluster moved it, the
    cluster's L2 epoch (every start without a complete ledger moves it)."""
    inc = redis_server.run_id()[:12]
    epoch = delivery_of(cluster)["epoch"] if cluster is not None else 0
    return f"{inc}-{epoch:x}" if epoch else inc


def database_scope(cluster, dbname: str = "postgres") -> str:
    """The part of every key that names one database of one cluster: the system identifier
    (16 hex digits) and the database's OID."""
    (scope,), = cluster.sql("""SELECT lpad(to_hex(system_identifier), 16, '0') || '.' ||
                                      (SELECT oid FROM pg_database WHERE datname = current_database())
                                 FROM pg_control_system()""", dbname=dbname)
    return scope


class Cache:
    """A table `name` (k int, v text, ver int) and a cache `name` over it whose query counts
    its own executions in sequence `<name>_fetches`. Rows are k = 1..rows, v = 'v<k>'."""

    def __init__(self, cluster, redis_server, rows=5, ttl="5 min", returns="jsonb", key_type=None):
        self.name = f"t{next(_names)}"
        self.returns = returns
        # The key's type is inferred from `$1::int` (int) unless given.
        key_types = f"ARRAY['{key_type}']" if key_type else "NULL"
        self.cluster = cluster
        self.redis = redis_server
        self.dbname = "postgres"
        self.scope = database_scope(cluster, self.dbname)
        self.keys = list(range(1, rows + 1))
        n = self.name
        cluster.sql(f"CREATE TABLE {n}(k int PRIMARY KEY, v text, ver int NOT NULL DEFAULT 0)")
        cluster.sql(f"INSERT INTO {n}(k, v) SELECT g, 'v' || g FROM generate_series(1, {rows}) g")
        cluster.sql(f"CREATE SEQUENCE {n}_fetches")
        cluster.sql(
            f"""SELECT twotier.define('{n}',
                 $q$SELECT jsonb_build_object('k', k, 'v', v, 'ver', ver, 'n', nextval('{n}_fetches'))
                      FROM {n} WHERE k = $1::int$q$, '{ttl}', ARRAY['{n}(k)'], returns => '{returns}',
                      key_types => {key_types})"""
        )

    def fetches(self) -> int:
        (last, called), = self.cluster.sql(f"SELECT last_value, is_called FROM {self.name}_fetches")
        return last if called else 0

    def version(self) -> int:
        (version,), = self.cluster.sql("SELECT version FROM twotier.caches WHERE name = %s", self.name)
        return version

    def redis_key(self, key: str, incarnation: str | None = None) -> str:
        """`<prefix>:<incarnation>:<cluster>.<database oid>:<cache>:v<version>:<key>`; the
        incarnation of the Redis running now unless another one is given."""
        inc = incarnation or redis_incarnation(self.redis, self.cluster)
        return f"twotier:{inc}:{self.scope}:{self.name}:v{self.version()}:{key}"

    def redis_pattern(self) -> str:
        """A SCAN pattern for every key of this cache (any version) in the running Redis."""
        return f"twotier:{redis_incarnation(self.redis, self.cluster)}:{self.scope}:{self.name}:*"

    def redis_value(self, key: str, incarnation: str | None = None):
        v = self.redis.client().get(self.redis_key(key, incarnation))
        return v.decode() if v is not None else None

    def call(self, conn, key):
        return conn.execute(f"SELECT cached_{self.name}(%s)", (str(key),)).fetchone()[0]

    def truth(self) -> dict:
        """What the table holds: {k: ver}."""
        return dict(self.cluster.sql(f"SELECT k, ver FROM {self.name} ORDER BY k"))

    def stale_keys(self, l1: bool = True) -> list:
        """Reads every row's key from a fresh session (L1 on or off) and returns the keys
        whose answer differs from the table, as (key, got, expected ver)."""
        truth = self.truth()
        bad = []
        with self.cluster.connect() as c:
            if not l1:
                c.execute("SET twotier.l1_enabled = off")
            for k, ver in truth.items():
                got = self.call(c, k)
                if got is None or got.get("ver") != ver or got.get("k") != k:
                    bad.append((k, got, ver))
        return bad

    def stats(self) -> dict:
        with self.cluster.connect() as c:
            cur = c.execute("SELECT * FROM twotier.stats WHERE cache = %s", (self.name,))
            row = cur.fetchone()
            return dict(zip([d.name for d in cur.description], row)) if row else {}


@pytest.fixture
def cache(cluster, redis_server):
    return Cache(cluster, redis_server)


@pytest.fixture
def make_cache(cluster, redis_server):
    return lambda **kw: Cache(cluster, redis_server, **kw)


class Workload:
    """Concurrent sessions (one thread each, autocommit, prepared statements) against one
    Cache. Writers bump `ver` of random rows and record, per key, the highest ver whose
    COMMIT has returned and when. Readers call the cached function and compare the ver they
    get with the highest ver committed before the call was sent: anything lower is a stale
    read. An ERROR, a wrong row or a call slower than `limit_s` is recorded as an error.

    `l1_readers` of the readers keep L1 on; the others set `twotier.l1_enabled = off`, so
    that every one of their calls goes through L2 (or past it) and L2 faults show. Each
    writer rests `write_pause_s` between writes: entries then live long enough between two
    invalidations to be served from L1 and L2, not only from the source.
    """

    def __init__(self, cache: Cache, writers=2, readers=3, read_keys=None, write_keys=None,
                 l1_readers=1, limit_s=2.0, write_pause_s=0.0, many_per_kind=0, many_keys=5):
        self.cache = cache
        self.read_keys = list(read_keys or cache.keys)
        self.write_keys = list(write_keys or cache.keys)
        self.limit_s = limit_s
        self.write_pause_s = write_pause_s
        now = time.monotonic()
        # key -> (ver, monotonic time its COMMIT returned); replaced whole, so that a reader
        # never sees a ver paired with another ver's time.
        self.committed = {k: (ver, now) for k, ver in cache.truth().items()}
        self._commit_lock = threading.Lock()
        self._stop = threading.Event()
        self._hold = threading.Event()
        self._write_locks = [threading.Lock() for _ in range(writers)]
        self._reads = [0] * readers
        self._writes = [0] * writers
        self.stale: list = []
        self.errors: list = []
        self.warnings = 0
        self.max_read_s = 0.0
        # `many_per_kind` readers with L1 and as many without read `many_keys` keys per call
        # through cached_<name>_many, each key judged as if it had been read alone.
        self.many_keys = many_keys

        def many(i: int) -> bool:
            return i >= (l1_readers if i < l1_readers else readers) - many_per_kind

        self._threads = [threading.Thread(target=self._reader, args=(i, i < l1_readers, many(i)), daemon=True)
                         for i in range(readers)]
        self._threads += [threading.Thread(target=self._writer, args=(i,), daemon=True) for i in range(writers)]

    @property
    def reads(self) -> int:
        return sum(self._reads)

    @property
    def writes(self) -> int:
        return sum(self._writes)

    def note_commit(self, key: int, ver: int) -> None:
        """Records a COMMIT that returned (also for writers outside this workload)."""
        with self._commit_lock:
            if ver > self.committed[key][0]:
                self.committed[key] = (ver, time.monotonic())

    def _connect(self) -> psycopg.Connection:
        conn = self.cache.cluster.connect()
        conn.add_notice_handler(self._notice)
        return conn

    def _notice(self, diag) -> None:
        self.warnings += 1

    def _error(self, what: str) -> None:
        if len(self.errors) < 100:
            self.errors.append(what)

    def _reader(self, i: int, l1: bool, many: bool = False) -> None:
        rnd = random.Random(f"reader{i}")
        if many:
            query = f"SELECT key, value FROM cached_{self.cache.name}_many(%s::int[])"
        else:
            query = f"SELECT cached_{self.cache.name}(%s)"
        conn = None
        while not self._stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = self._connect()
                    if not l1:
                        conn.execute("SET twotier.l1_enabled = off")
                    cur = conn.cursor()
                keys = rnd.sample(self.read_keys, min(self.many_keys, len(self.read_keys))) if many \
                    else [rnd.choice(self.read_keys)]
                floors = {k: self.committed[k] for k in keys}  # before the call is sent
                t0 = time.monotonic()
                if many:
                    cur.execute(query, ([str(k) for k in keys],), prepare=True)
                    rows = cur.fetchall()
                else:
                    cur.execute(query, (str(keys[0]),), prepare=True)
                    rows = [(keys[0], cur.fetchone()[0])]
                elapsed = time.monotonic() - t0
            except psycopg.Error as e:
                self._error(f"reader {i}: {e!r}")
                if conn is not None and conn.broken:
                    conn = None
                continue
            self._reads[i] += len(keys)
            self.max_read_s = max(self.max_read_s, elapsed)
            if elapsed > self.limit_s:
                self._error(f"reader {i}: call for keys {keys} took {elapsed:.2f}s")
            if [r[0] for r in rows] != keys:
                self._error(f"reader {i}: rows for keys {[r[0] for r in rows]}, asked {keys}")
                continue
            for k, value in rows:
                floor, committed_at = floors[k]
                if not isinstance(value, dict) or value.get("k") != k or value.get("v") != f"v{k}":
                    self._error(f"reader {i}: wrong value for key {k}: {value!r}")
                elif value["ver"] < floor:
                    self.stale.append({"key": k, "got": value["ver"], "committed": floor, "l1": l1,
                                       "many": many, "after_commit_s": round(t0 - committed_at, 4)})
        if conn is not None:
            conn.close()

    def _writer(self, i: int) -> None:
        rnd = random.Random(f"writer{i}")
        query = f"UPDATE {self.cache.name} SET ver = ver + 1 WHERE k = %s RETURNING ver"
        conn = None
        while not self._stop.is_set():
            if self._hold.is_set():
                time.sleep(0.005)
                continue
            with self._write_locks[i]:
                if self._hold.is_set():
                    continue
                try:
                    if conn is None or conn.closed:
                        conn = self._connect()
                        cur = conn.cursor()
                    k = rnd.choice(self.write_keys)
                    t0 = time.monotonic()
                    cur.execute(query, (k,), prepare=True)  # autocommit: COMMIT has returned
                    ver = cur.fetchone()[0]
                    elapsed = time.monotonic() - t0
                except psycopg.Error as e:
                    self._error(f"writer {i}: {e!r}")
                    if conn is not None and conn.broken:
                        conn = None
                    continue
                self.note_commit(k, ver)
                self._writes[i] += 1
                if elapsed > self.limit_s:
                    self._error(f"writer {i}: UPDATE of key {k} took {elapsed:.2f}s")
            if self.write_pause_s:
                time.sleep(self.write_pause_s)
        if conn is not None:
            conn.close()

    def hold_writes(self) -> None:
        """Returns once no writer is inside a write, and none will start one until
        release_writes()."""
        self._hold.set()
        for lock in self._write_locks:
            with lock:
                pass

    def release_writes(self) -> None:
        self._hold.clear()

    def start(self) -> "Workload":
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._hold.clear()
        for t in self._threads:
            t.join(30)
            if t.is_alive():
                self._error(f"{t.name} did not stop: a call hangs")

    def __enter__(self) -> "Workload":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class Stack:
    """A Redis, a proxy in front of it (passing bytes through until told otherwise) and a
    PostgreSQL cluster using that Redis directly, all of one test module's own."""

    def __init__(self, name: str, settings: dict | None = None):
        self.redis = RedisServer().start()
        self.proxy = RedisProxy(self.redis.port).start()
        self.cluster = PgCluster(name=name, settings={**twotier_settings(self.redis.url), **(settings or {})})
        self.cluster.start()
        self.cluster.sql("CREATE EXTENSION twotier")
        self.cluster.sql("CREATE TABLE probe(k int PRIMARY KEY)")
        self.cluster.sql("""SELECT twotier.define('probe', $q$SELECT to_jsonb(k) FROM probe WHERE k = $1::int$q$,
                                                  '1 min', ARRAY['probe(k)'])""")

    def cache(self, **kw) -> Cache:
        return Cache(self.cluster, self.redis, **kw)

    def workload(self, cache: Cache, **kw) -> Workload:
        return Workload(cache, **kw)

    def delivery(self) -> dict:
        """`twotier.status()->'delivery'` from a fresh session."""
        return delivery_of(self.cluster)

    def trusted(self) -> bool:
        """Whether every invalidation reached Redis and L2 is in use."""
        o = self.delivery()
        return bool(o["l2_trusted"]) and o["undelivered"] == 0

    def wait_trusted(self, timeout: float = 30.0) -> None:
        """Waits until the ledger is delivered and L2 trusted (the worker backs off)."""
        if not wait_for(self.trusted, timeout=timeout, step=0.05):
            raise AssertionError(f"invalidations not delivered after {timeout}s: {self.delivery()}")

    def use_redis_url(self, url: str) -> None:
        """Points the whole server (backends and workers) at another Redis URL."""
        self.cluster.set({"twotier.redis_url": url})
        self.cluster.reload()

    def heal(self, timeout: float = 30.0) -> None:
        """Ends any fault a test left behind and waits for the ledger to drain."""
        self.proxy.reset_replies(None)
        self.redis.heal()
        self.wait_trusted(timeout)

    def close(self) -> None:
        self.cluster.destroy()
        self.proxy.stop()
        self.redis.destroy()


@pytest.fixture(scope="module")
def own_stack(request):
    """A Stack for the requesting test module alone."""
    stack = Stack(name=request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_"))
    yield stack
    stack.close()
