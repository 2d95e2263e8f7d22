"""Fixtures: one real Redis and one real PostgreSQL cluster (twotier preloaded) per test
session; tests use their own tables and caches so that they do not interfere."""
import itertools
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

from servers import PgCluster, RedisServer  # noqa: E402

_names = itertools.count(1)


@pytest.fixture(scope="session")
def redis_server():
    r = RedisServer().start()
    yield r
    r.stop()


@pytest.fixture(scope="session")
def cluster(redis_server):
    pg = PgCluster(
        settings={
            "twotier.redis_url": redis_server.url,
            "twotier.retry_interval_ms": 200,
            "twotier.read_timeout_ms": 100,
            "twotier.connect_timeout_ms": 100,
            "twotier.l1_size_mb": 16,
        }
    ).start()
    pg.sql("CREATE EXTENSION twotier")
    yield pg
    pg.destroy()


@pytest.fixture
def db(cluster):
    """A session on the cluster (autocommit)."""
    conn = cluster.connect()
    yield conn
    conn.close()


class Cache:
    """A table `name` (k int, v text, ver int) and a cache `name` over it whose query counts
    its own executions in sequence `<name>_fetches`."""

    def __init__(self, cluster, redis_server, rows=5, ttl="5 min"):
        self.name = f"t{next(_names)}"
        self.cluster = cluster
        self.redis = redis_server
        n = self.name
        cluster.sql(f"CREATE TABLE {n}(k int PRIMARY KEY, v text, ver int NOT NULL DEFAULT 0)")
        cluster.sql(f"INSERT INTO {n}(k, v) SELECT g, 'v' || g FROM generate_series(1, {rows}) g")
        cluster.sql(f"CREATE SEQUENCE {n}_fetches")
        cluster.sql(
            f"""SELECT twotier.define('{n}',
                 $q$SELECT jsonb_build_object('k', k, 'v', v, 'ver', ver, 'n', nextval('{n}_fetches'))
                      FROM {n} WHERE k = $1::int$q$, '{ttl}', ARRAY['{n}(k)'])"""
        )

    def fetches(self) -> int:
        (last, called), = self.cluster.sql(f"SELECT last_value, is_called FROM {self.name}_fetches")
        return last if called else 0

    def redis_key(self, key: str) -> str:
        (version,), = self.cluster.sql("SELECT version FROM twotier.caches WHERE name = %s", self.name)
        return f"twotier:postgres:{self.name}:v{version}:{key}"

    def redis_value(self, key: str):
        v = self.redis.client().get(self.redis_key(key))
        return v.decode() if v is not None else None

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
