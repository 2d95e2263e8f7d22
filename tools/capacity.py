"""Capacity of L2 on a Redis Cluster (issue 23): how many PostgreSQL servers, backends and
Redis masters the design holds, and what gives out first.

Two parts.

`--measure` (after `./run install`, as root): Redis's CPU per operation, read from the
redis-server process's CPU time (/proc, user + system: command work and socket I/O) around
workloads run through twotier on a throwaway PostgreSQL and Redis with the bench's app:
- an L2 hit (`twotier.l1_enabled = off`, every key filled);
- a miss on a primary (the read, the stampede lease, the fill), 5,000 distinct keys once each;
- a committed single-row write of a watched table (the delivery worker's tombstones and channel
  messages, with one listener subscribed), per commit, and per channel message;
- Redis memory per cached entry (`used_memory` over 20,000 widget configs).
Written to bench/results/capacity_costs.json; the model reads that file.

The model (default): a deployment of S PostgreSQL servers, each with B backends using L2 and C
cached calls a second over K keys of Zipf popularity, TTL T and W single-row commits a second,
on a cluster of M masters. Per key, an L1 entry lives until its TTL or the key's next write; a
server's L1 misses on a key are r / (1 + r E[life]) for a key read at rate r (a renewal
argument), L2 sees the sum over servers and the source L2's own misses the same way. The
formula is checked against a discrete-event simulation of request and write streams (printed
first). Keys go to masters by the real slot function (CRC16 of the `{...}` tag that
src/l2/layout.rs puts in every name; slots split evenly, as `redis-cli --cluster create` does),
each master's CPU is the sum of its keys' operations at the measured costs, plus the channel:
a PUBLISH in a cluster reaches every node, so every master pays for every server's messages.

It does not model: L1 running out of memory (L1 is assumed to hold every key read within its
TTL), replicas' CPU (they replay the masters' writes), network bandwidth, or bursts."""
import argparse
import json
import math
import os
import random
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COSTS = ROOT / "bench" / "results" / "capacity_costs.json"
SLOTS = 16384
CORE_LIMIT = 0.7      # a master's main thread busier than this has no room for bursts
MAX_CLIENTS = 10_000  # Redis's default maxclients


def crc16(data: bytes) -> int:
    """CRC16-CCITT (XMODEM), the Redis Cluster key slot checksum."""
    crc = 0
    for b in data:
        crc ^= b << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def slot_of_tag(tag: str) -> int:
    return crc16(tag.encode()) % SLOTS


# -- measuring -------------------------------------------------------------------------------

def redis_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure() -> dict:
    sys.path.insert(0, str(ROOT / "tools"))
    from bench import KEY, Bench  # noqa: E402

    b = Bench(quick=False)
    b.start()
    try:
        pid = b.redis.proc.pid
        r = b.redis.client()
        n = b.tenants
        costs: dict = {"redis": r.info("server").get("redis_version"), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

        # Memory per entry: the widget configs filled into an empty Redis.
        r.flushall()
        mem0 = r.info("memory")["used_memory"]
        b.warm("widget_config", n)
        keys = r.dbsize()
        costs["bytes_per_entry"] = (r.info("memory")["used_memory"] - mem0) / max(keys, 1)

        # L2 hits: every key in Redis, L1 off.
        pick = f"\\set i random(1, {n})\n"
        hit = b.script("cap_hit", pick + f"SELECT cached_widget_config({KEY['widget_config']});\n")
        b.pgbench([hit], 2, duration=2, options="-c twotier.l1_enabled=off")
        c0 = redis_cpu_s(pid)
        res = b.pgbench([hit], 4, duration=6, options="-c twotier.l1_enabled=off")
        costs["hit_us"] = (redis_cpu_s(pid) - c0) / (res["tps"] * 6) * 1e6

        # Misses on a primary: a flushed cache, each of 5,000 keys read once.
        b.sql("SELECT twotier.flush('widget_config')")
        misses = 5000
        key = KEY["widget_config"].replace(":i", "g")
        c0 = redis_cpu_s(pid)
        with b.pg.connect() as c:
            c.execute("SET twotier.l1_enabled = off")
            c.execute(f"SELECT count(cached_widget_config({key})) FROM generate_series(1, {misses}) g")
        costs["miss_us"] = (redis_cpu_s(pid) - c0) / misses * 1e6

        # Writes: single-row UPDATEs of a watched table, until every key is delivered.
        b.writer_result = {}
        b.writer_tables()
        upd = b.script("cap_update", "\\set k random(1, 10000)\nUPDATE wt SET v = v + 1 WHERE k = :k;\n")
        d0 = b.sql("SELECT twotier.status()->'delivery'")[0][0]
        r.config_resetstat()
        c0 = redis_cpu_s(pid)
        res = b.pgbench([upd], 4, duration=6, options="-c synchronous_commit=off")
        b.wait_delivered(30)
        used = redis_cpu_s(pid) - c0
        d1 = b.sql("SELECT twotier.status()->'delivery'")[0][0]
        commits = res["tps"] * 6
        exchanges = d1["exchanges"] - d0["exchanges"]
        stats = r.info("commandstats")
        pub = stats.get("cmdstat_publish", {})
        sets = stats.get("cmdstat_set", {})
        pub_share = pub.get("usec", 0) / max(pub.get("usec", 0) + sets.get("usec", 0), 1)
        costs["write_us"] = used / commits * 1e6
        costs["messages_per_commit"] = exchanges / commits
        # Under load the worker sends at most this many batches a second (2 ms of gathering
        # and an exchange each); an idle server sends one per commit.
        costs["max_messages_per_s"] = exchanges / 6
        # The channel message's share of that CPU, per message (the rest is the tombstones).
        costs["publish_us"] = used * pub_share / max(exchanges, 1) * 1e6
        costs["tombstone_us"] = used * (1 - pub_share) / commits * 1e6
        COSTS.parent.mkdir(parents=True, exist_ok=True)
        COSTS.write_text(json.dumps(costs, indent=2) + "\n")
        print(json.dumps(costs, indent=2))
        return costs
    finally:
        b.stop()


# -- the model -------------------------------------------------------------------------------

def mean_life(ttl: float, write_rate: float) -> float:
    """E[min(TTL, time to the key's next write)] for Poisson writes."""
    if write_rate <= 0:
        return ttl
    return (1 - math.exp(-write_rate * ttl)) / write_rate


def miss_rate(read_rate: float, life: float) -> float:
    """Misses per second of a key read at `read_rate` whose entry lives `life` on average from
    the miss that fills it (renewal: a miss, a life, then the wait for the next read)."""
    return read_rate / (1 + read_rate * life) if read_rate > 0 else 0.0


def simulate_misses(read_rate: float, write_rate: float, ttl: float, horizon: float, rng: random.Random) -> float:
    """Discrete events: Poisson reads and writes of one key over `horizon` seconds; an entry
    filled by a miss lives until its TTL or the next write. Returns misses per second."""
    t, valid_until, next_write, misses = 0.0, -1.0, rng.expovariate(write_rate) if write_rate else math.inf, 0
    while True:
        t += rng.expovariate(read_rate)
        if t > horizon:
            return misses / horizon
        while next_write <= t:
            valid_until = min(valid_until, next_write)
            next_write += rng.expovariate(write_rate)
        if t >= valid_until:
            misses += 1
            valid_until = min(t + ttl, next_write)


def check_model() -> None:
    rng = random.Random(7)
    print("renewal model against a discrete-event simulation (misses/s of one key):")
    print(f"  {'reads/s':>8} {'writes/s':>9} {'TTL s':>6} {'model':>9} {'simulated':>10}")
    for r, w, ttl in ((0.01, 0, 300), (1, 0, 60), (50, 0.01, 300), (200, 1, 300), (5, 2, 30), (1000, 20, 300)):
        model = miss_rate(r, mean_life(ttl, w))
        # Long enough for about 1,000 misses, at most 3 million reads.
        sim = simulate_misses(r, w, ttl, horizon=min(1000 / model, 3e6 / r), rng=rng)
        print(f"  {r:>8g} {w:>9g} {ttl:>6g} {model:>9.4f} {sim:>10.4f}")


def deployment(costs: dict, servers: int, masters: int, backends: int, calls: float, keys: int, zipf: float,
               ttl: float, commits: float, slot_of: list[int]) -> dict:
    """Per-master load of one deployment, from per-key rates."""
    h = sum(1 / (k ** zipf) for k in range(1, keys + 1))
    write_rate = commits * servers / keys  # single-row commits, uniform over keys
    life = mean_life(ttl, write_rate)
    cpu = [0.0] * masters
    resident = [0.0] * masters
    source = 0.0
    per = SLOTS / masters
    for k in range(keys):
        p = 1 / ((k + 1) ** zipf) / h
        l1_misses = miss_rate(calls * p, life)            # per server
        l2_reads = servers * l1_misses
        l2_misses = miss_rate(l2_reads, life)
        m = min(int(slot_of[k] / per), masters - 1)
        cpu[m] += ((l2_reads - l2_misses) * costs["hit_us"] + l2_misses * costs["miss_us"]
                   + write_rate * costs["tombstone_us"]) / 1e6
        resident[m] += l2_reads * life / (1 + l2_reads * life)
        source += l2_misses
    # Every server's channel messages reach every node of the cluster.
    messages = servers * min(commits, costs["max_messages_per_s"])
    channel = messages * costs["publish_us"] / 1e6
    cpu = [c + channel for c in cpu]
    connections = servers * (backends + 1) + math.ceil(servers / masters)
    return {"servers": servers, "masters": masters, "hottest_cpu": max(cpu), "mean_cpu": sum(cpu) / masters,
            "channel_cpu": channel, "connections": connections, "source_qps": source,
            "l2_mb": max(resident) * costs["bytes_per_entry"] / 2**20, "messages": messages}


def limit_of(d: dict) -> str:
    hit = []
    if d["hottest_cpu"] > CORE_LIMIT:
        hit.append("a master's CPU" + (" (the channel)" if d["channel_cpu"] > d["hottest_cpu"] / 2 else ""))
    if d["connections"] > MAX_CLIENTS:
        hit.append("connections")
    return ", ".join(hit) or "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--measure", action="store_true", help="measure Redis's costs first (needs ./run install)")
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--zipf", type=float, default=1.0)
    ap.add_argument("--calls", type=float, default=20_000, help="cached calls per second per server")
    ap.add_argument("--commits", type=float, default=500, help="single-row commits per second per server")
    ap.add_argument("--backends", type=int, default=200, help="backends per server that use L2")
    ap.add_argument("--ttl", type=float, default=300)
    args = ap.parse_args()
    costs = measure() if args.measure else json.loads(COSTS.read_text())
    print(f"costs (Redis {costs['redis']}, measured {costs['measured_at']}): L2 hit {costs['hit_us']:.1f} µs,"
          f" miss {costs['miss_us']:.1f} µs, commit {costs['write_us']:.1f} µs (tombstones"
          f" {costs['tombstone_us']:.1f} µs, a channel message {costs['publish_us']:.1f} µs,"
          f" {costs['messages_per_commit']:.3f} messages per commit under load, at most"
          f" {costs['max_messages_per_s']:.0f} a second per server), {costs['bytes_per_entry']:.0f} bytes per entry\n")
    check_model()
    print(f"\n{args.keys} keys (Zipf {args.zipf}), {args.calls:g} cached calls/s and {args.commits:g} commits/s per"
          f" server, {args.backends} backends per server, TTL {args.ttl:g} s; a master is full at"
          f" {CORE_LIMIT:.0%} of a core or {MAX_CLIENTS} connections\n")
    slot_of = [slot_of_tag(f"0123456789abcdef.16384:widget_config:v1:{k}") for k in range(args.keys)]
    print(f"| masters | servers | hottest master CPU | mean | of which channel | connections per master"
          f" | L2 MB per master | source queries/s | full first |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for masters in (1, 3, 6, 12):
        for servers in (1, 5, 10, 25, 50, 100):
            d = deployment(costs, servers, masters, args.backends, args.calls, args.keys, args.zipf, args.ttl,
                           args.commits, slot_of)
            print(f"| {masters} | {servers} | {d['hottest_cpu']:.0%} | {d['mean_cpu']:.0%} | {d['channel_cpu']:.0%}"
                  f" | {d['connections']} | {d['l2_mb']:.0f} | {d['source_qps']:.0f} | {limit_of(d)} |")


if __name__ == "__main__":
    main()
