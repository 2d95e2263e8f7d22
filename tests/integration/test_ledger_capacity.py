"""The ledger full (issue 18): with `twotier.ledger_mb = 1` (about 10,000 keys) and Redis paused,
writers keep committing without waiting. The first commit whose keys no longer fit moves L2 to
a new epoch and retires every committed undelivered key (nothing stored under the old epoch is
read again), then records its own keys: no cache moves to a new version, no commit after it
pays for one, and no read is ever old."""
import time

from conftest import Stack, wait_for

ROWS = 900        # per transaction: under twotier.flush_above_keys (1000)
TRANSACTIONS = 20  # 18,000 keys: more than 1 MB of ledger


def test_a_full_ledger_moves_l2_to_a_new_epoch_instead_of_making_writers_wait():
    stack = Stack(name="capacity", settings={"twotier.ledger_mb": 1})
    try:
        cache = stack.cache(rows=ROWS * 2)
        with stack.cluster.connect() as c:
            c.execute("SET twotier.l1_enabled = off")
            for k in (1, 2):
                cache.call(c, k)
        version = cache.version()
        moves = stack.delivery()["epoch_moves"]
        stack.redis.pause()
        slowest = 0.0
        try:
            with stack.cluster.connect() as w:
                for i in range(TRANSACTIONS):
                    lo = 1 + (i % 2) * ROWS
                    t0 = time.monotonic()
                    w.execute(f"UPDATE {cache.name} SET ver = ver + 1 WHERE k BETWEEN %s AND %s", (lo, lo + ROWS - 1))
                    slowest = max(slowest, time.monotonic() - t0)
            d = stack.delivery()
            print(f"slowest commit {slowest:.3f}s; ledger {d['bytes_used']} of {d['bytes']} bytes,"
                  f" {d['undelivered']} keys; cache version {version} -> {cache.version()};"
                  f" epoch moves {moves} -> {d['epoch_moves']}, {d.get('retired_by_epoch_moves')} keys retired")
            assert slowest < 1.0, f"a writer waited {slowest:.2f}s with the ledger full"
            assert d["bytes_used"] <= d["bytes"] and d["undelivered"] < ROWS * TRANSACTIONS, d
            assert d["epoch_moves"] > moves and d["retired_by_epoch_moves"] > 0, \
                ("the ledger was full and L2 did not move to a new epoch", d)
            assert cache.version() == version, "a commit moved the cache to a new version: the epoch's move is enough"
            truth = cache.truth()
            with stack.cluster.connect() as c:
                c.execute("SET twotier.l1_enabled = off")
                for k in (1, 2, ROWS + 1):
                    assert cache.call(c, k)["ver"] == truth[k]
        finally:
            stack.redis.resume()
        assert wait_for(lambda: stack.delivery()["undelivered"] == 0, timeout=60), stack.delivery()
        assert cache.stale_keys(l1=True) == [] and cache.stale_keys(l1=False) == []
    finally:
        stack.close()
