#!/usr/bin/env python3
"""./run demo: twotier at work on the report's app, on a throwaway PostgreSQL and Redis.

Starts both on free loopback ports, loads the example schema with a few thousand tenants and
the report's three caches, runs a short skewed workload, and shows hits per tier, measured
latencies, invalidation at commit and the fallback when Redis goes away. Everything it
started is stopped at the end, also on Ctrl-C.
"""
import argparse
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

from servers import PgCluster, RedisServer  # noqa: E402

CACHES = ("domain_lookup", "widget_config", "customer_profile")


def title(text):
    print(f"\n\033[1m== {text}\033[0m")


def show_log(notice):
    if notice.message_primary.startswith("twotier"):
        print(f"   {notice.severity:7} {notice.message_primary}")


def load_app(pg, tenants):
    with pg.connect() as c:
        c.execute("CREATE EXTENSION twotier")
        c.execute((ROOT / "sql/examples/schema.sql").read_text())
        c.execute("SELECT example_generate(%s)", (tenants,))
        c.execute((ROOT / "sql/examples/caches.sql").read_text())
        c.execute((ROOT / "sql/examples/raw_queries.sql").read_text())
        return c.execute("SELECT domain, id::text FROM domains ORDER BY domain").fetchall()


def workload(pg, tenants, requests, chunks=10):
    """Each request does what the report's chat endpoint does: tenant by domain, then its
    widget config and its customer profile. Popular tenants are far more frequent (Zipf).
    Returns the distinct tenants and, per tenth of the run, what twotier.stats says of it."""
    weights = [1 / (i + 1) ** 1.1 for i in range(len(tenants))]
    picks = random.Random(42).choices(tenants, weights=weights, k=requests)
    samples = [sample(pg)]
    with pg.connect() as c:
        for i, (domain, _) in enumerate(picks, 1):
            tenant = c.execute("SELECT cached_domain_lookup(%s)", (domain,), prepare=True).fetchone()[0]
            c.execute("SELECT cached_widget_config(%s)", (tenant["id"],), prepare=True).fetchone()
            c.execute("SELECT cached_customer_profile(%s)", (tenant["id"],), prepare=True).fetchone()
            if i % max(1, requests // chunks) == 0:
                samples.append(sample(pg))
    return len({d for d, _ in picks}), samples


def sample(pg):
    """Totals over the report's caches: calls and, per tier, answers and their summed latency."""
    with pg.connect() as c:
        rows = c.execute("""SELECT coalesce(sum(calls), 0), coalesce(sum(l1_hits), 0), coalesce(sum(l2_hits), 0),
                                   coalesce(sum(misses), 0),
                                   coalesce(sum(l1_hits * coalesce(l1_hit_mean_us, 0)), 0),
                                   coalesce(sum(l2_hits * coalesce(l2_hit_mean_us, 0)), 0),
                                   coalesce(sum(misses * coalesce(miss_mean_us, 0)), 0)
                              FROM twotier.stats WHERE cache = ANY(%s)""", (list(CACHES),)).fetchone()
    return [float(v) for v in rows]


def chart(samples, path):
    """Hit ratio and mean latency per tier, for each tenth of the workload, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = list(range(1, len(samples)))
    d = [[b - a for a, b in zip(samples[i - 1], samples[i])] for i in steps]
    ratio = {tier: [x[k] / x[0] if x[0] else 0 for x in d] for tier, k in (("L1", 1), ("L2", 2), ("source", 3))}
    latency = {tier: [x[s] / x[k] if x[k] else None for x in d] for tier, k, s in (("L1 hit", 1, 4), ("L2 hit", 2, 5),
                                                                                   ("miss", 3, 6))}
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    bottom = [0.0] * len(steps)
    for tier, color in (("L1", "#10b981"), ("L2", "#3b82f6"), ("source", "#f59e0b")):
        a.bar(steps, ratio[tier], bottom=bottom, color=color, label=tier)
        bottom = [x + y for x, y in zip(bottom, ratio[tier])]
    a.set_ylim(0, 1)
    a.set_xlabel("tenth of the workload")
    a.set_ylabel("share of calls answered")
    a.set_title("who answered (cold start, then L1)")
    a.legend(loc="lower right")
    for tier, color in (("L1 hit", "#10b981"), ("L2 hit", "#3b82f6"), ("miss", "#f59e0b")):
        pts = [(x, y) for x, y in zip(steps, latency[tier]) if y is not None]
        if pts:
            b.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=color, label=tier)
    b.set_yscale("log")
    b.set_xlabel("tenth of the workload")
    b.set_ylabel("mean latency inside the server (µs)")
    b.set_title("latency per tier")
    b.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


LOOP = """
DO $$
DECLARE t0 timestamptz; v jsonb;
BEGIN
    t0 := clock_timestamp();
    FOR i IN 1 .. %(n)s LOOP v := %(expr)s; END LOOP;
    PERFORM set_config('demo.us', (extract(epoch FROM clock_timestamp() - t0) * 1e6 / %(n)s)::numeric(10, 1)::text, false);
END $$
"""


def per_call_us(conn, expr, n=2000, as_text=False):
    """Mean time of one call measured inside the server (no client round trip). `as_text`:
    the value rendered as text, which is what a client that prints it receives."""
    loop = LOOP.replace("v jsonb", "v text") if as_text else LOOP
    conn.execute(loop % {"n": n, "expr": expr})
    return float(conn.execute("SELECT current_setting('demo.us')").fetchone()[0])


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--no-redis", action="store_true", help="run with L1 and the source only")
    ap.add_argument("--tenants", type=int, default=3000)
    ap.add_argument("--requests", type=int, default=3000)
    args = ap.parse_args()

    redis = None if args.no_redis else RedisServer().start()
    settings = {"twotier.redis_url": redis.url if redis else "", "twotier.l1_size_mb": 64,
                "twotier.retry_interval_ms": 1000}
    pg = PgCluster(name="demo", settings=settings).start()
    try:
        title("twotier demo")
        print(f"PostgreSQL 15 on 127.0.0.1:{pg.port}, " +
              (f"Redis on 127.0.0.1:{redis.port}" if redis else "no Redis (--no-redis): L1 and the source only"))
        t0 = time.time()
        tenants = load_app(pg, args.tenants)
        print(f"Loaded the report's app: {len(tenants)} tenants (domains, widget_configs, customer_configs)"
              f" and the caches domain_lookup (900 s), widget_config (300 s), customer_profile (600 s)"
              f" in {time.time() - t0:.1f} s.")

        title(f"A short workload: {args.requests} chat requests, Zipf-skewed over the tenants")
        t0 = time.time()
        distinct, samples = workload(pg, tenants, args.requests)
        took = time.time() - t0
        print(f"{args.requests * 3} cached calls for {distinct} distinct tenants in {took:.1f} s"
              f" ({args.requests * 3 / took:.0f} calls/s from one Python client).")

        with pg.connect() as c:
            rows = c.execute(
                """SELECT cache, calls, l1_hits, l2_hits, misses, negative_hits, hit_ratio,
                          l1_hit_mean_us, l2_hit_mean_us, miss_mean_us
                     FROM twotier.stats WHERE cache = ANY(%s) ORDER BY cache""", (list(CACHES),)).fetchall()
            print(f"\n{'cache':18} {'calls':>6} {'L1 hits':>8} {'L2 hits':>8} {'misses':>7} {'hit ratio':>9}"
                  f" {'L1 hit µs':>10} {'L2 hit µs':>10} {'miss µs':>8}")
            for r in rows:
                fmt = lambda v: "-" if v is None else f"{v:.1f}"
                print(f"{r[0]:18} {r[1]:6} {r[2]:8} {r[3]:8} {r[4]:7} {float(r[6] or 0):9.1%}"
                      f" {fmt(r[7]):>10} {fmt(r[8]):>10} {fmt(r[9]):>8}")
            print("(latencies from twotier.stats: each call timed inside the server, L1 → L2 → source)")

            title("Latency of one widget-config call, measured inside the server (2000 calls each)")
            _, hot = tenants[0]
            raw = per_call_us(c, f"raw_widget_config('{hot}')")
            l1 = per_call_us(c, f"cached_widget_config('{hot}')")
            print(f"  raw query (3-table join):       {raw:7.1f} µs")
            print(f"  cached, L1 hit (shared memory): {l1:7.1f} µs   {raw / l1:4.1f}x faster than the query")
            if redis:
                c.execute("SET twotier.l1_enabled = off")
                l2 = per_call_us(c, f"cached_widget_config('{hot}')")
                c.execute("RESET twotier.l1_enabled")
                print(f"  cached, L2 hit (Redis GET):     {l2:7.1f} µs   a network round trip: slower than this cheap query")
            miss = c.execute("SELECT miss_mean_us FROM twotier.stats WHERE cache = 'widget_config'").fetchone()[0]
            print(f"  cached, miss (query + fills):   {miss:7.1f} µs   (mean of the workload's misses)")
            heavy_raw = per_call_us(c, f"raw_widget_config_heavy('{hot}')", n=500)
            heavy_hit = per_call_us(c, f"cached_widget_config_heavy('{hot}')", n=500)
            print(f"  heavy widget config (FAQ + activity aggregates): raw {heavy_raw:.1f} µs,"
                  f" L1 hit {heavy_hit:.1f} µs ({heavy_raw / heavy_hit:.0f}x)")

            title("Typed keys, many keys in one call, json pass-through")
            print("  cached_widget_config takes a uuid, so it joins without a cast:")
            print("  SELECT d.domain, cached_widget_config(d.id)->>'position' FROM domains d LIMIT 2")
            for r in c.execute("SELECT d.domain, cached_widget_config(d.id)->>'position' FROM domains d"
                               " ORDER BY d.domain LIMIT 2").fetchall():
                print(f"   -> {r[0]}: {r[1]}")
            multi = next(t for d, t in tenants if c.execute(
                "SELECT 'de' = ANY(languages) FROM widget_configs WHERE domain_id = %s", (t,)).fetchone()[0])
            print("  A key of two parts, the FAQ of a tenant in one language: cached_faq(domain_id, locale)")
            first = c.execute("SELECT cached_faq(%s, 'de')->0->>'q'", (multi,)).fetchone()[0]
            print(f"   -> cached_faq('{multi[:8]}…', 'de')->0->>'q' = {first!r}")
            ids = [t for _, t in tenants[:20]]
            rows = c.execute("SELECT domain_id, value->>'greeting' FROM cached_widget_config_many(%s::uuid[])",
                             (ids,)).fetchall()
            print(f"  cached_widget_config_many(20 ids): {len(rows)} rows in the order given, e.g. {rows[0][1]!r}")
            # From the client, where an app pays a round trip per statement.
            rounds = 50
            t0 = time.perf_counter()
            for _ in range(rounds):
                c.execute("SELECT domain_id, value FROM cached_widget_config_many(%s::uuid[])", (ids,),
                          prepare=True).fetchall()
            many_ms = (time.perf_counter() - t0) * 1000 / rounds
            t0 = time.perf_counter()
            for _ in range(rounds):
                for t in ids:
                    c.execute("SELECT cached_widget_config(%s::uuid)", (t,), prepare=True).fetchone()
            singles_ms = (time.perf_counter() - t0) * 1000 / rounds
            print(f"  20 widget configs from L1, timed at the client: one _many call {many_ms:.2f} ms,"
                  f" 20 single calls {singles_ms:.2f} ms ({singles_ms / many_ms:.1f}x)")
            jb = per_call_us(c, f"cached_widget_config('{hot}')", as_text=True)
            js = per_call_us(c, f"cached_widget_config_json('{hot}')", as_text=True)
            print(f"  L1 hit handed over as text: jsonb {jb:.1f} µs, json mode {js:.1f} µs"
                  f" (json mode stores the text and skips rendering jsonb)")

        title("Invalidation at commit: an admin changes a widget greeting")
        domain, tid = tenants[1]
        reader, admin = pg.connect(), pg.connect()
        reader.add_notice_handler(show_log)
        admin.add_notice_handler(show_log)
        for conn in (reader, admin):
            conn.execute("SET client_min_messages = log")
            conn.execute("SET twotier.log_events = on")
        print(f"reader: SELECT cached_widget_config('{tid[:8]}…')->>'greeting'")
        print("   ->", reader.execute("SELECT cached_widget_config(%s)->>'greeting'", (tid,)).fetchone()[0])
        print("admin:  BEGIN; UPDATE widget_configs SET greeting = 'Hello from the new greeting!' ...")
        admin.execute("BEGIN")
        admin.execute("UPDATE widget_configs SET greeting = 'Hello from the new greeting!', version = version + 1,"
                      " updated_at = now() WHERE domain_id = %s", (tid,))
        print("admin (inside its transaction) reads its own write, from the source:")
        print("   ->", admin.execute("SELECT cached_widget_config(%s)->>'greeting'", (tid,)).fetchone()[0])
        print("reader, before the admin commits, still gets the committed value:")
        print("   ->", reader.execute("SELECT cached_widget_config(%s)->>'greeting'", (tid,)).fetchone()[0])
        print("admin:  COMMIT")
        admin.execute("COMMIT")
        print("reader, right after COMMIT returned:")
        print("   ->", reader.execute("SELECT cached_widget_config(%s)->>'greeting'", (tid,)).fetchone()[0])
        print("reader, again:")
        print("   ->", reader.execute("SELECT cached_widget_config(%s)->>'greeting'", (tid,)).fetchone()[0])
        admin.close()

        if redis:
            title("Fallback: Redis goes away")
            reader.execute("SET twotier.log_events = off")
            redis.stop()
            print(f"Redis on port {redis.port} stopped. The same calls keep answering:")
            t0 = time.time()
            n = 0
            for domain, tid in tenants[:200]:
                assert reader.execute("SELECT cached_domain_lookup(%s)", (domain,)).fetchone()[0]["domain"] == domain
                assert reader.execute("SELECT cached_widget_config(%s)", (tid,)).fetchone()[0] is not None
                n += 2
            print(f"  {n} calls in {time.time() - t0:.2f} s, none failed (L1 answers hot keys; the rest come"
                  " from the source; one WARNING per retry interval, not per call)")
            st = reader.execute("SELECT twotier.status()").fetchone()[0]
            print(f"  twotier.status(): Redis reachable = {st['l2']['reachable']}, last error: {st['l2']['last_error']!r},"
                  f" L1 entries = {st['l1']['entries']}, listener subscribed = {st['l1']['worker']['subscribed']}")
            # A write while Redis is gone: the commit does not wait for Redis; its keys wait in the
            # ledger (shared memory and the WAL), and nobody reads them from L2 until delivered.
            domain, tid = tenants[1]
            with pg.connect() as w:
                w.execute("UPDATE widget_configs SET greeting = 'Written while Redis was down' WHERE domain_id = %s", (tid,))
            st = reader.execute("SELECT twotier.status()->'delivery'").fetchone()[0]
            print(f"An admin update commits while Redis is down: the ledger holds {st['undelivered']} undelivered"
                  f" key(s) for the delivery worker; the reader gets "
                  f"{reader.execute('SELECT cached_widget_config(%s)->>%s', (tid, 'greeting')).fetchone()[0]!r}")
            redis.start()
            time.sleep(1.2)
            deadline = time.time() + 10
            while time.time() < deadline:
                st = reader.execute("SELECT twotier.status()->'delivery'").fetchone()[0]
                if st["undelivered"] == 0 and st["l2_trusted"]:
                    break
                time.sleep(0.2)
            print(f"Redis restarted (empty, under a new incarnation); the delivery worker has delivered"
                  f" {st['delivered']} invalidation(s) since the server started, undelivered now {st['undelivered']}.")
            print("After the retry interval calls fill it again:")
            reader.execute("SET twotier.l1_enabled = off")
            for domain, _ in tenants[:50]:
                reader.execute("SELECT cached_domain_lookup(%s)", (domain,))
            print(f"  keys in Redis now: {redis.client().dbsize()}")
        reader.close()
        png = ROOT / "target" / "demo" / "twotier-demo.png"
        chart(samples, png)
        print(f"Chart of the workload (who answered, latency per tier, per tenth of the run): {png}")
        title("Done: the servers are stopped. See README.md to define your own caches.")
    finally:
        pg.destroy()
        if redis:
            redis.stop()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("\ninterrupted; servers stopped")
        sys.exit(130)
