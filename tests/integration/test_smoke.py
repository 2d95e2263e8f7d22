"""The smoke test every supported PostgreSQL runs (./run test runs it on 16, 17 and 18 too, with
TWOTIER_PG_CONFIG pointing at their pg_config; the whole suite runs on 15): a typed cache is
filled and hit in both tiers, a commit invalidates it, and with Redis down calls still answer
and commits still invalidate, through the ledger once Redis is back."""
import os
import subprocess

import pytest
from conftest import wait_for


@pytest.fixture
def stack(cluster, redis_server, make_cache):
    cache = make_cache(rows=3)
    yield cluster, redis_server, cache
    if not redis_server.running():
        redis_server.start()


def read(cluster, cache, key, l1=True):
    with cluster.connect() as c:
        if not l1:
            c.execute("SET twotier.l1_enabled = off")
        v = c.execute(f"SELECT cached_{cache.name}(%s)", (key,)).fetchone()[0]
        return v["ver"]


def test_fill_hit_invalidate_and_redis_down(stack):
    cluster, redis, cache = stack
    version = cluster.sql("SHOW server_version_num")[0][0]
    if os.environ.get("TWOTIER_PG_CONFIG"):
        wanted = subprocess.run([os.environ["TWOTIER_PG_CONFIG"], "--version"], capture_output=True,
                                text=True).stdout.split()[1].split(".")[0]
        assert version.startswith(wanted), (version, wanted)
    assert read(cluster, cache, 1) == 0
    assert read(cluster, cache, 1) == 0 and read(cluster, cache, 1, l1=False) == 0
    s = cache.stats()
    assert s["misses"] == 1 and s["l1_hits"] == 1 and s["l2_hits"] == 1, (version, s)

    cluster.sql(f"UPDATE {cache.name} SET ver = ver + 1 WHERE k = 1")
    assert read(cluster, cache, 1) == 1 and read(cluster, cache, 1, l1=False) == 1

    read(cluster, cache, 2)
    redis.stop()
    try:
        assert read(cluster, cache, 2) == 0  # L1 answers
        cluster.sql(f"UPDATE {cache.name} SET ver = ver + 1 WHERE k = 2")
        assert read(cluster, cache, 2) == 1 and read(cluster, cache, 2, l1=False) == 1
        assert cluster.sql("SELECT (twotier.status()->'delivery'->>'undelivered')::int")[0][0] >= 1
    finally:
        redis.start()

    def delivered():
        with cluster.connect() as c:
            c.execute("SELECT twotier.exists('probe_smoke', '1')")
            return c.execute("SELECT (twotier.status()->'delivery'->>'undelivered')::int").fetchone()[0] == 0

    cluster.sql("CREATE TABLE IF NOT EXISTS probe_smoke (k int PRIMARY KEY)")
    cluster.sql("""SELECT twotier.define('probe_smoke', $q$SELECT to_jsonb(k) FROM probe_smoke WHERE k = $1$q$,
                                       '1 min', ARRAY['probe_smoke(k)'])""")
    assert wait_for(delivered, timeout=30), "the ledger was not delivered once Redis was back"
    assert read(cluster, cache, 2, l1=False) == 1 and read(cluster, cache, 2) == 1
