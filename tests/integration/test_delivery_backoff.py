"""Redis down while writers commit (issue 18): the delivery worker retries at a growing pause
(50 ms, doubling up to `twotier.retry_interval_ms`), not once per COMMIT. Every commit sets
the worker's latch; a worker that waited on it during the pause made a connection attempt per
commit, taking CPU from the writers for the whole outage. Once Redis is back, the keys go out
within one pause."""
import time

from conftest import Stack, wait_for

OUTAGE_S = 3.0


def test_a_redis_outage_costs_a_few_attempts_not_one_per_commit():
    stack = Stack(name="backoff", settings={"twotier.retry_interval_ms": 1000})
    try:
        cache = stack.cache(rows=50)
        before = stack.delivery()
        stack.redis.stop()
        commits = 0
        try:
            with stack.cluster.connect() as w:
                t0 = time.monotonic()
                while time.monotonic() - t0 < OUTAGE_S:
                    w.execute(f"UPDATE {cache.name} SET ver = ver + 1 WHERE k = %s", (1 + commits % 50,))
                    commits += 1
            during = stack.delivery()
        finally:
            stack.redis.start()
        attempts = during["delivery_failures"] - before["delivery_failures"]
        print(f"{commits} commits in {OUTAGE_S} s with Redis down: {attempts} failed deliveries,"
              f" {during['undelivered']} keys undelivered")
        assert commits > 100, "too few commits to tell a retry per commit from a paced one"
        # 50 + 100 + 200 + 400 + 800 + 1000 ms: 6 attempts fit in 3 s, and the first comes at once.
        assert attempts <= 10, f"{attempts} delivery attempts for {commits} commits in {OUTAGE_S} s"
        assert during["undelivered"] > 0
        t_back = time.monotonic()
        assert wait_for(lambda: stack.delivery()["undelivered"] == 0, timeout=10), stack.delivery()
        print(f"delivered {time.monotonic() - t_back:.2f} s after Redis came back")
        assert cache.stale_keys(l1=True) == [] and cache.stale_keys(l1=False) == []
    finally:
        stack.close()
