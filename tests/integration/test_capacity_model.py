"""tools/capacity.py's model (no servers): the slot function is Redis Cluster's, and the
per-key miss rate it uses agrees with a discrete-event simulation of the request streams."""
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import capacity  # noqa: E402


def test_slots_are_redis_clusters():
    # The cluster specification's reference value, and slots as redis-server 7.0's
    # CLUSTER KEYSLOT gives them.
    assert capacity.crc16(b"123456789") == 0x31C3
    for key, slot in (("foo", 12182), ("bar", 5061), ("123456789", 12739), ("user1000", 3443)):
        assert capacity.slot_of_tag(key) == slot, key


def test_the_miss_rate_formula_matches_a_simulation():
    rng = random.Random(11)
    for reads, writes, ttl in ((1, 0, 60), (5, 2, 30), (200, 1, 300)):
        model = capacity.miss_rate(reads, capacity.mean_life(ttl, writes))
        simulated = capacity.simulate_misses(reads, writes, ttl, horizon=3000 / model, rng=rng)
        assert abs(simulated - model) / model < 0.08, (reads, writes, ttl, model, simulated)


def test_a_deployment_adds_up():
    costs = {"hit_us": 20.0, "miss_us": 150.0, "tombstone_us": 4.0, "publish_us": 6.0, "max_messages_per_s": 300.0,
             "bytes_per_entry": 700.0}
    keys = 2000
    slot_of = [capacity.slot_of_tag(f"s:c:v1:{k}") for k in range(keys)]
    one = capacity.deployment(costs, 1, 3, 10, 1000, keys, 1.0, 300, 10, slot_of)
    many = capacity.deployment(costs, 10, 3, 10, 1000, keys, 1.0, 300, 10, slot_of)
    # Writes on every server invalidate every server's L1: more than ten times the load.
    assert many["hottest_cpu"] > 10 * one["hottest_cpu"]
    assert many["connections"] == 10 * 11 + 4
