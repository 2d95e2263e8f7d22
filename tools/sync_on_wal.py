"""Where `synchronous_commit = on` loses its share (issue 18; bench/ANALYSIS.md, "Where 'sync on'
loses its tenth"): the bench's writer tables on a throwaway server with fsync on and
`track_wal_io_timing = on`, single-row UPDATEs from 4 clients, and per transaction the deltas
of `pg_stat_wal` (records, bytes, fsyncs, µs per fsync) and the CPU of each kind of process.
Three kinds of run, in the order given: `wu` (unwatched), `wt` (watched by a cache) and
`wu+msg` (unwatched, plus a 40-byte `pg_logical_emit_message` in the same statement: about the
WAL bytes the invalidation record adds, without twotier). Ends with Redis's
`INFO commandstats` and the ledger's status (exchanges per commit).

Usage: ./run install, then `.venv/bin/python tools/sync_on_wal.py [--seconds 6] [wu wt wu+msg ...]`."""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import Bench  # noqa: E402

COLS = "wal_records, wal_bytes, wal_write, wal_sync, wal_write_time, wal_sync_time"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=int, default=6)
    ap.add_argument("runs", nargs="*", default=["wu", "wt", "wu+msg", "wt", "wu", "wu+msg"])
    args = ap.parse_args()
    b = Bench(quick=False)
    b.duration = args.seconds
    b.start()
    try:
        b.writer_result = {}
        b.writer_tables()
        b.pg.set({"track_wal_io_timing": "on"})
        b.durable(True)
        n = b.WRITER_ROWS
        pick = f"\\set k random(1, {n})\n"
        scripts = {
            "wu": b.script("sync_wu", pick + "UPDATE wu SET v = v + 1 WHERE k = :k;\n"),
            "wt": b.script("sync_wt", pick + "UPDATE wt SET v = v + 1 WHERE k = :k;\n"),
            "wu+msg": b.script("sync_msg", pick + "WITH m AS (SELECT pg_logical_emit_message(false, 'x', repeat('a', 40)) l)"
                               " UPDATE wu SET v = v + 1 WHERE k = :k AND (SELECT l FROM m) IS NOT NULL;\n"),
        }
        for run in args.runs:
            b.sql(f"VACUUM {run[:2]}")
            w0 = b.sql(f"SELECT {COLS} FROM pg_stat_wal")[0]
            r = b.pgbench_with_cpu(scripts[run], 4, "-c synchronous_commit=on")
            w1 = b.sql(f"SELECT {COLS} FROM pg_stat_wal")[0]
            tx = max(r["tps"] * b.duration, 1)
            d = [float(y) - float(x) for x, y in zip(w0, w1)]
            print(f"{run:7} {r['tps']:7.0f} TPS  per tx: records {d[0] / tx:.2f}, bytes {d[1] / tx:.0f},"
                  f" fsyncs {d[3] / tx:.3f}; µs per fsync {1000 * d[5] / max(d[3], 1):.0f};"
                  f" CPU µs per tx {r['cpu_us_per_tx']}", flush=True)
        stats = b.redis.client().info("commandstats")
        print("Redis:", {k: (v["calls"], v["usec_per_call"]) for k, v in stats.items()})
        d = b.sql("SELECT twotier.status()->'delivery'")[0][0]
        print(f"ledger: {d['delivered']} keys delivered in {d['exchanges']} exchanges, lag p99 {d['lag_p99_ms']} ms")
    finally:
        b.pg.destroy()
        b.redis.destroy()


if __name__ == "__main__":
    main()
