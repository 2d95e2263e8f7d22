#!/usr/bin/env python3
"""./run bench: twotier measured against the floor, the raw queries and an app-side Redis GET,
all in one run on one machine, with pgbench in prepared mode.

Every ratio printed is between two figures of the same run. Targets are printed as PASS or
SHORT and never fail the command: these machines are shared and noisy. `--quick` is a smoke
run of the runner itself (small data, short runs, one client) for `./run test`.

Readers are one half of the bill; "what it costs a writer" is the other: UPDATE throughput on a
watched table against the same table unwatched (Redis up and down), a bulk UPDATE, and the
Redis memory and L1 entries that invalidating never-read keys leaves behind.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

from servers import PG_BIN, PgBouncer, PgCluster, RedisCluster, RedisServer  # noqa: E402

RESULTS = ROOT / "bench" / "results"
SCRIPTS = ROOT / "bench"

# The key of tenant :i, computed the same way in every script (and by example_generate).
DOMAIN = "format('shop-%s.example.com', lpad(:i::text, greatest(5, length(:i::text)), '0'))"
ID = f"md5({DOMAIN})::uuid::text"
# The same key typed, as the uuid-keyed caches take it.
UID = f"md5({DOMAIN})::uuid"

RAW = {
    "domain_lookup": f"""SELECT jsonb_build_object('id', d.id, 'domain', d.domain, 'customer_id', d.customer_id,
                          'status', d.status, 'plan', d.plan) FROM domains d WHERE d.domain = {DOMAIN};""",
    "widget_config": f"""SELECT jsonb_build_object('domain_id', w.domain_id, 'domain', d.domain, 'status', d.status,
                          'theme', w.theme || jsonb_build_object('brand_color', c.brand_color, 'logo', c.logo_url),
                          'position', w.position, 'greeting', w.greeting, 'features', w.features,
                          'languages', to_jsonb(w.languages), 'version', w.version)
                     FROM widget_configs w JOIN domains d ON d.id = w.domain_id
                     JOIN customer_configs c ON c.domain_id = w.domain_id WHERE w.domain_id = ({ID})::uuid;""",
    "customer_profile": f"""SELECT jsonb_build_object('domain_id', c.domain_id, 'domain', d.domain,
                          'business_name', c.business_name, 'description', c.description,
                          'contact_email', c.contact_email, 'locale', c.locale, 'timezone', c.timezone,
                          'version', c.version)
                     FROM customer_configs c JOIN domains d ON d.id = c.domain_id WHERE c.domain_id = ({ID})::uuid;""",
    "widget_config_heavy": f"SELECT raw_widget_config_heavy({ID});",
}
KEY = {"domain_lookup": DOMAIN, "widget_config": UID, "customer_profile": UID, "widget_config_heavy": ID,
       "widget_config_json": UID}
# twotier.invalidate and twotier.warm take a key's canonical text.
TEXT_KEY = {"domain_lookup": DOMAIN, "widget_config": ID, "customer_profile": ID, "widget_config_heavy": ID,
            "widget_config_json": ID}


# The postgrest group: what the RLS cache varies by. Issue 22's JSON path into the claims (the
# user, whatever the token); before it, ARRAY['role', 'request.jwt.claims'] (the whole payload).
POSTGREST_VARY = "ARRAY['role', 'request.jwt.claims->>sub']"
# A row of pgr_orders is visible only to its owner (the policy): a write reaches the status in
# its owner's variants only.
POSTGREST_WATCH = "ARRAY['pgr_orders(status) per sub = owner']"
POSTGREST_STATUSES = ["pending", "paid", "shipped", "delivered", "cancelled"]
POSTGREST_USERS = 100
# A user's orders and what PostgREST would send for GET /orders?status=eq.<status>.
POSTGREST_RAW = ("SELECT coalesce(jsonb_agg(jsonb_build_object('id', id, 'amount', amount) ORDER BY id), '[]')"
                 " FROM {table} WHERE {where}")


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def lag_p99(before: dict, after: dict):
    """p99 of the delivery lag (COMMIT to Redis's acknowledgment, bucket bounds in ms) of the keys
    delivered between two `twotier.status()->'delivery'` readings."""
    hist = [(b, n1 - n0) for (b, n1), (_, n0) in zip(after.get("lag_histogram", []), before.get("lag_histogram", []))]
    total = sum(n for _, n in hist)
    seen = 0
    for bound, n in hist:
        seen += n
        if total and seen * 100 >= total * 99:
            return bound if bound is not None else after.get("max_lag_ms")
    return None


def judge(name, value, limit, higher_is_better=False, fmt="{:.2f}"):
    """A verdict row: (name, measured, limit, PASS / SHORT / NOT RUN)."""
    if value is None:
        return (name, "n/a", limit, "NOT RUN")
    ok = value >= limit if higher_is_better else value <= limit
    return (name, fmt.format(value), limit, "PASS" if ok else "SHORT")


class PostgrestChecker:
    """A reader thread through the bench's pgbouncer making the postgrest group's request for
    random users and statuses, checked: every row must be the token's user's (`owner`: id ->
    owner, fixed), and the cached answer must equal the raw query's in the same transaction
    whenever the status's version counter (bumped by every write in its own transaction) did
    not move between a read before and one after both answers. Unjudged reads are counted,
    never guessed at. It rests PAUSE_S between requests: a small load beside pgbench's."""

    PAUSE_S = 0.002

    def __init__(self, bench: "Bench", owner: dict, statuses: list, raw: str):
        self.bench, self.owner, self.statuses = bench, owner, statuses
        self.raw = raw.replace("$1", "%s")
        self.users = sorted(set(owner.values()))
        self.reads = self.judged = self.leaks = self.stale = self.errors = 0
        self.samples: list = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="postgrest-checker", daemon=True)

    def start(self):
        self._thread.start()

    def stop(self):
        self._stop.set()
        self._thread.join(30)

    def result(self) -> dict:
        return {"reads": self.reads, "judged": self.judged, "leaks": self.leaks, "stale": self.stale,
                "errors": self.errors}

    def _run(self):
        rnd = random.Random(22)
        conn = None
        while not self._stop.is_set():
            sub, status = rnd.choice(self.users), rnd.choice(self.statuses)
            iat = int(time.time()) // 3 * 3
            payload = json.dumps({"sub": sub, "role": "authenticated", "iat": iat, "exp": iat + 3600})
            try:
                if conn is None or conn.closed:
                    conn = self.bench.bouncer.connect(user="authenticator")
                with conn.transaction():
                    conn.execute("SET LOCAL ROLE authenticated")
                    conn.execute("SELECT set_config('request.jwt.claims', %s, true)", (payload,))
                    q = "SELECT ver FROM pgr_order_versions WHERE status = %s"
                    v0 = conn.execute(q, (status,)).fetchone()[0]
                    cached, raw = conn.execute(f"SELECT cached_pgr_my_orders(%s), ({self.raw})",
                                               (status, status)).fetchone()
                    v1 = conn.execute(q, (status,)).fetchone()[0]
            except Exception as e:  # noqa: BLE001 - counted; the run goes on
                self.errors += 1
                if len(self.samples) < 5:
                    self.samples.append(repr(e))
                if conn is not None and conn.broken:
                    conn = None
                time.sleep(0.01)
                continue
            self._stop.wait(self.PAUSE_S)
            self.reads += 1
            leaked = any(self.owner.get(r["id"]) != sub for r in cached)
            self.leaks += leaked
            if v0 == v1:
                self.judged += 1
                self.stale += (cached != raw and not leaked)
        if conn is not None:
            conn.close()


CPU_KINDS = (("backends", "postgres: postgres "), ("delivery worker", "twotier delivery"),
             ("listener", "twotier listener"), ("walwriter", "walwriter"), ("redis-server", "redis-server"),
             ("pgbench", "pgbench"))


def cpu_snapshot() -> dict:
    """CPU time (clock ticks) per process of the kinds the writer rows account for, by pid."""
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        kind = next((k for k, needle in CPU_KINDS if needle in cmd), None)
        if kind:
            out[pid] = (kind, int(fields[11]) + int(fields[12]))
    return out


def steal_ticks() -> int:
    """CPU time this virtual machine's hypervisor gave to others (/proc/stat's steal, in
    clock ticks, all CPUs): how noisy the machine was while a run measured it."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    return int(fields[8]) if len(fields) > 8 else 0


def paired(run, pairs: int) -> dict:
    """`pairs` runs of each side, a ("base") and b ("watched"), in pairs whose order alternates
    (a b, b a, ...), so that neither side always runs on a warmer or a quieter machine. Each
    pair's b/a TPS ratio is taken within the pair, seconds apart: the machine's drift over a
    run moves both sides of a pair alike. The verdict's ratio is the median of the pairs';
    the rows recorded are each side's median run. `run(side)` returns a pgbench result."""
    runs: dict = {"a": [], "b": []}
    ratios = []
    for i in range(pairs):
        got = {}
        for side in (("a", "b") if i % 2 == 0 else ("b", "a")):
            got[side] = run(side)
            runs[side].append(got[side])
        ratios.append(got["b"]["tps"] / got["a"]["tps"])

    def median_run(rs):
        return sorted(rs, key=lambda r: r["tps"])[(len(rs) - 1) // 2]
    return {"a": median_run(runs["a"]), "b": median_run(runs["b"]), "ratio": statistics.median(ratios),
            "ratios": [round(r, 3) for r in ratios], "tps_a": [round(r["tps"]) for r in runs["a"]],
            "tps_b": [round(r["tps"]) for r in runs["b"]]}


def cpu_per_tx(before: dict, after: dict, transactions: float) -> dict:
    """µs of CPU per transaction by kind of process between two snapshots (user + system;
    at the kernel's clock tick, so meaningful over runs of seconds)."""
    hz = os.sysconf("SC_CLK_TCK")
    used: dict = {k: 0 for k, _ in CPU_KINDS}
    for pid, (kind, ticks) in after.items():
        used[kind] += ticks - before.get(pid, (kind, 0))[1]
    return {k: round(v / hz / max(transactions, 1) * 1e6, 1) for k, v in used.items()}


class Bench:
    def __init__(self, quick: bool):
        self.quick = quick
        self.duration = 2 if quick else 5
        self.reps = 1 if quick else 2
        # The writer's ratios are the cost a DBA weighs; they get more runs than the paths.
        self.writer_pairs = 1 if quick else 5
        self.steal_at_start = steal_ticks()
        self.started_at = time.time()
        self.clients = [1] if quick else [1, 2, 8]
        self.tenants = 2000 if quick else 20000
        self.rows: list[dict] = []
        self.notes: list[str] = []
        self.work = Path(tempfile.mkdtemp(prefix="twotier-bench-"))
        os.chmod(self.work, 0o777)

    # -- servers -------------------------------------------------------------------------
    def start(self):
        self.redis = RedisServer().start()
        self.pg = PgCluster(name="bench", settings={
            "shared_preload_libraries": "twotier,pg_stat_statements",
            "twotier.redis_url": self.redis.url,
            "twotier.l1_size_mb": 64 if self.quick else 1024,
            "twotier.l1_max_age_s": 3600,
            "max_connections": 60,
            "shared_buffers": "512MB",
            "pg_stat_statements.track": "all",
            # Short, so that the writer's Redis memory measurement (which waits for the
            # tombstones of never-read keys to expire) takes seconds, not minutes. It is also
            # the oldest Redis read a fill may follow; every query here takes milliseconds.
            # A build without this setting ignores the placeholder.
            "twotier.tombstone_ttl_s": 5,
        }).start()
        c = self.pg.connect()
        c.execute("CREATE EXTENSION twotier")
        c.execute("CREATE EXTENSION pg_stat_statements")
        c.execute((ROOT / "sql/examples/schema.sql").read_text())
        t0 = time.time()
        c.execute("SELECT example_generate(%s)", (self.tenants,))
        c.execute((ROOT / "sql/examples/caches.sql").read_text())
        c.execute((ROOT / "sql/examples/raw_queries.sql").read_text())
        # The floor: what calling any SQL function with the same key costs. Inlined like the
        # cached_* wrappers are, so it is the cost of the statement around the call.
        c.execute("CREATE FUNCTION empty_fn(key text) RETURNS jsonb LANGUAGE sql STABLE AS 'SELECT NULL::jsonb'")
        c.execute("CREATE TABLE stale_reads (at timestamptz DEFAULT now(), cached bigint, committed bigint)")
        c.close()
        print(f"data: {self.tenants} tenants loaded in {time.time() - t0:.1f} s", flush=True)

    def stop(self):
        if getattr(self, "bouncer", None) is not None:
            self.bouncer.destroy()
        for s in ("pg", "redis"):
            if hasattr(self, s):
                getattr(self, s).destroy() if s == "pg" else self.redis.stop()
        shutil.rmtree(self.work, ignore_errors=True)

    # -- pgbench -------------------------------------------------------------------------
    def script(self, name: str, body: str) -> Path:
        p = self.work / f"{name}.sql"
        p.write_text(body)
        os.chmod(p, 0o644)
        return p

    def pgbench(self, scripts: list[Path], clients: int, duration: int | None = None, options: str = "",
                weights: list[int] | None = None, builtin: str | None = None, port: int | None = None,
                user: str = "postgres", mode: str = "prepared", variables: dict | None = None) -> dict:
        """`port`, `user`, `mode`: another server (a pgbouncer), login and protocol (pgbouncer
        in transaction mode keeps no prepared statements: `extended` or `simple`).
        `variables`: pgbench's `-D name=value`, sent as bound parameters where a script names
        them (`:name`)."""
        duration = duration or self.duration
        log_prefix = self.work / f"log{int(time.time() * 1e6)}"
        cmd = [str(PG_BIN / "pgbench"), "-n", "-M", mode, "-r", "-T", str(duration), "-c", str(clients),
               "-j", str(min(clients, 2)), "-h", "127.0.0.1", "-p", str(port or self.pg.port), "-U", user,
               "-l", "--log-prefix", str(log_prefix)]
        for i, s in enumerate(scripts):
            cmd += ["-f", f"{s}@{weights[i]}" if weights else str(s)]
        if builtin:
            cmd += ["-b", builtin]
        for name, value in (variables or {}).items():
            cmd += ["-D", f"{name}={value}"]
        env = dict(os.environ, PGOPTIONS=options) if options else None
        out = sh(cmd + ["postgres"], cwd=self.work, env=env).stdout
        tps = float(re.search(r"tps = ([\d.]+)", out).group(1))
        mean = float(re.search(r"latency average = ([\d.]+) ms", out).group(1)) * 1000
        lat = []
        for f in self.work.glob(log_prefix.name + "*"):
            for line in f.read_text().splitlines():
                parts = line.split()
                if len(parts) >= 3:
                    lat.append(int(parts[2]))
            f.unlink()
        lat.sort()
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else None
        statements = [float(m) * 1000 for m in re.findall(r"^\s+([\d.]+)\s+\d+\s+\d+\s+\S", out, re.M)]
        if not statements:
            statements = [float(m) * 1000 for m in re.findall(r"^\s+([\d.]+)\s+\S", out, re.M)]
        return {"tps": tps, "mean_us": mean, "p99_us": p99, "statements_us": statements, "out": out}

    def record(self, group, path, clients, r, note=""):
        row = {"group": group, "path": path, "clients": clients, "tps": round(r["tps"], 1),
               "mean_us": round(r["mean_us"], 1), "p99_us": r.get("p99_us"), "note": note}
        self.rows.append(row)
        p99 = "-" if row["p99_us"] is None else f"{row['p99_us']:.0f}"
        print(f"  {group:20} {path:34} c={clients:<2} {row['tps']:>9.0f} tps {row['mean_us']:>8.1f} µs"
              f"  p99 {p99:>6} µs  {note}", flush=True)

    def sql(self, q, *args):
        return self.pg.sql(q, *args)

    def warm(self, cache, n):
        self.sql(f"SELECT twotier.warm(%s, %s)", cache,
                 f"SELECT {TEXT_KEY[cache].replace(':i', 'g')} FROM generate_series(1, {n}) g")

    # -- the runs ------------------------------------------------------------------------
    def paths(self, focus: bool = False):
        """Every read path against its floors. `focus`: only what issue 21's targets read (the
        floors, widget_config's L1 and L2 hits in jsonb and json mode, a Redis GET)."""
        n = self.tenants
        pick = f"\\set i random(1, {n})\n"
        print(f"\n== paths (pgbench -M prepared, best of {self.reps} interleaved runs of {self.duration} s)", flush=True)
        caches = ["domain_lookup", "widget_config", "widget_config_json", "customer_profile", "widget_config_heavy"]
        if self.quick or focus:
            caches = ["widget_config", "widget_config_json"]
        for cache in caches:
            self.warm(cache, n)
        (value,), = self.sql("SELECT raw_widget_config(md5('shop-00001.example.com')::uuid::text)::text")[0:1]
        runs = [("floor", "SELECT 1", self.script("select1", "SELECT 1;\n"), ""),
                ("floor", "empty SQL function(key)", self.script("empty_fn", pick + f"SELECT empty_fn({ID});\n"), ""),
                # The floors that do the same work as a hit besides caching: compute the key and
                # send a widget config back, as jsonb (rendered by jsonb_out) or as json text.
                ("floor", "key expression + returning a widget config", self.script(
                    "fair_floor", pick + f"SELECT ({UID}) IS NULL, '{value}'::jsonb;\n"), ""),
                ("floor", "key expression + returning a widget config (json)", self.script(
                    "fair_floor_json", pick + f"SELECT ({UID}) IS NULL, '{value}'::json;\n"), "")]
        # The key as an app sends it: a bound parameter, one of 64 tenants' uuids (pgbench -D;
        # one script per key, chosen at random). The rows above compute the key in the server
        # (md5, format, uuid_in: about 12,000 instructions a call), which SELECT 1 does not.
        bound = {f"k{j}": k for j, (k,) in enumerate(self.sql(
            "SELECT md5(format('shop-%s.example.com', lpad(g::text, 5, '0')))::uuid::text"
            f" FROM generate_series(1, {min(n, 64)}) g"))}
        for cache in ("widget_config", "widget_config_json"):
            runs.append((cache, "cached, L1 hit, key bound by the client",
                         [self.script(f"bound_{cache}_{name}", f"SELECT cached_{cache}(:{name});\n") for name in bound],
                         ""))
        for cache in caches:
            hit = self.script(f"hit_{cache}", pick + f"SELECT cached_{cache}({KEY[cache]});\n")
            # A real miss: the key is invalidated by the statement before (its own transaction),
            # so the timed statement finds neither tier, runs the query and fills both.
            miss = self.script(f"miss_{cache}", pick + f"SELECT twotier.invalidate('{cache}', {TEXT_KEY[cache]});\n"
                               f"SELECT cached_{cache}({KEY[cache]});\n")
            raw = RAW["widget_config"] if cache == "widget_config_json" else RAW[cache]
            if focus:
                runs += [(cache, "cached, L1 hit", hit, ""),
                         (cache, "cached, L2 hit (L1 off)", hit, "-c twotier.l1_enabled=off")]
                continue
            runs += [(cache, "raw query", self.script(f"raw_{cache}", pick + raw + "\n"), ""),
                     (cache, "cached, L1 hit", hit, ""),
                     (cache, "cached, L2 hit (L1 off)", hit, "-c twotier.l1_enabled=off"),
                     (cache, "cached, miss (query + fills)", miss, "")]
        # Many keys: 100 consecutive tenants through one _many call, against 100 single calls in
        # one transaction (the way an app without _many loads a dashboard).
        many_pick = f"\\set i random(1, {max(n - 100, 1)})\n"
        keys = f"ARRAY(SELECT {UID.replace(':i', 'g')} FROM generate_series(:i, :i + 99) g)"
        many = self.script("many100", many_pick + f"SELECT count(value) FROM cached_widget_config_many({keys});\n")
        singles = self.script("single100", many_pick + "BEGIN;\n" + "".join(
            f"SELECT cached_widget_config({UID.replace(':i', f'(:i + {j})')});\n" for j in range(100)) + "COMMIT;\n")
        if not focus:
            runs += [("many keys", "100 keys, one _many call, L1", many, ""),
                     ("many keys", "100 keys, one _many call, L2 (L1 off)", many, "-c twotier.l1_enabled=off"),
                     ("many keys", "100 keys, 100 single calls in one transaction, L1", singles, "")]
        for c in self.clients:
            best: dict = {}
            for _ in range(self.reps):
                # Interleaved, so that a noisy minute on this shared machine hits every path alike.
                for group, path, script, options in runs:
                    if isinstance(script, list):
                        r = self.pgbench(script, c, options=options, variables=bound)
                    else:
                        r = self.pgbench([script], c, options=options)
                    if "miss" in path and len(r["statements_us"]) >= 2:
                        r = dict(r, mean_us=r["statements_us"][-1], tps=1e6 / r["statements_us"][-1] * c, p99_us=None)
                    key = (group, path)
                    if key not in best or r["mean_us"] < best[key]["mean_us"]:
                        best[key] = r
            for group, path, _, _ in runs:
                note = "the timed statement only (pgbench -r); TPS derived" if "miss" in path else ""
                if group == "many keys":
                    note = "TPS = calls of 100 keys per second"
                self.record(group, path, c, best[(group, path)], note)
            self.redis_get(c)
        if not focus:
            self.many_round_trips()

    def read_verdicts(self) -> list:
        """Issue 21's targets, from the rows of this run: a hit against its floor."""
        fair = "key expression + returning a widget config"
        c8 = max(self.clients)
        f = lambda g, p, c: self.find(g, p, c)  # noqa: E731
        floor, floor_json = f("floor", fair, 1), f("floor", fair + " (json)", 1)
        l2, l2j = f("widget_config", "cached, L2 hit (L1 off)", 1), f("widget_config_json", "cached, L2 hit (L1 off)", 1)
        get = f("app-side cache", "Redis GET from outside (redis-benchmark)", 1)
        l1_8, l1j_8 = f("widget_config", "cached, L1 hit", c8), f("widget_config_json", "cached, L1 hit", c8)
        floor_8, floor_json_8 = f("floor", fair, c8), f("floor", fair + " (json)", c8)
        select1_8 = f("floor", "SELECT 1", c8)
        bj_8 = f("widget_config_json", "cached, L1 hit, key bound by the client", c8)
        rows = [judge(f"{c8} clients: jsonb L1 hit TPS / floor returning the same value TPS >= 0.9",
                      l1_8 and floor_8 and l1_8["tps"] / floor_8["tps"], 0.9, True),
                judge(f"{c8} clients: json-mode L1 hit TPS / json floor TPS >= 0.9",
                      l1j_8 and floor_json_8 and l1j_8["tps"] / floor_json_8["tps"], 0.9, True),
                judge(f"{c8} clients: json-mode L1 hit, key bound by the client, TPS / SELECT 1 TPS >= 0.8",
                      bj_8 and select1_8 and bj_8["tps"] / select1_8["tps"], 0.8, True),
                judge(f"{c8} clients: json-mode L1 hit, key computed in the server (md5), TPS / SELECT 1 TPS >= 0.8",
                      l1j_8 and select1_8 and l1j_8["tps"] / select1_8["tps"], 0.8, True),
                judge("jsonb: (L2 hit - floor) / Redis GET round trip <= 1.3",
                      l2 and floor and get and (l2["mean_us"] - floor["mean_us"]) / get["mean_us"], 1.3),
                judge("json mode: (L2 hit - json floor) / Redis GET round trip <= 1.3",
                      l2j and floor_json and get and (l2j["mean_us"] - floor_json["mean_us"]) / get["mean_us"], 1.3)]
        return rows

    def many_round_trips(self):
        """Redis round trips of one 100-key _many call whose keys are all in L2 and none in L1,
        counted by the backend itself (twotier.status()->'l2'->'round_trips_in_session')."""
        with self.pg.connect() as c:
            c.execute("SET twotier.l1_enabled = off")
            rt = "SELECT (twotier.status()->'l2'->>'round_trips_in_session')::int"
            arr = "ARRAY(SELECT md5(format('shop-%s.example.com', lpad(g::text, 5, '0')))::uuid FROM generate_series(1, 100) g)"
            c.execute(f"SELECT count(*) FROM cached_widget_config_many({arr})")
            before = c.execute(rt).fetchone()[0]
            c.execute(f"SELECT count(*) FROM cached_widget_config_many({arr})")
            after = c.execute(rt).fetchone()[0]
        self.many_rt = after - before
        print(f"  one _many call of 100 keys from L2: {self.many_rt} Redis round trip(s)", flush=True)

    def redis_get(self, clients):
        # Keys carry the Redis incarnation (the first 12 characters of its run_id).
        inc = self.redis.client().info("server")["run_id"][:12]
        (value_key,), = self.sql(f"SELECT 'twotier:{inc}:' || (twotier.status()->>'key_scope') || ':widget_config:v' || version || ':' || "
                                 "md5('shop-00001.example.com')::uuid::text FROM twotier.caches WHERE name = 'widget_config'")[0:1]
        self.sql("SELECT cached_widget_config(md5('shop-00001.example.com')::uuid)")
        n = 20000 if self.quick else 200000
        out = sh(["redis-benchmark", "-h", "127.0.0.1", "-p", str(self.redis.port), "-c", str(clients),
                  "-n", str(n), "--csv", "GET", value_key]).stdout
        rows = list(csv.reader(out.strip().splitlines()))
        header, vals = rows[0], rows[-1]
        d = dict(zip(header, vals))
        r = {"tps": float(d["rps"]), "mean_us": float(d["avg_latency_ms"]) * 1000,
             "p99_us": float(d["p99_latency_ms"]) * 1000}
        self.record("app-side cache", "Redis GET from outside (redis-benchmark)", clients, r,
                    "no JSON parsing, no PostgreSQL round trip")

    def mixed(self):
        """The report's chat request over many tenants with Zipf popularity, plus a trickle of
        widget config updates through the real tables; fresh-checkers count stale reads."""
        print("\n== mixed workload", flush=True)
        n = self.tenants
        zipf = f"\\set i random_zipfian(1, {n}, 1.1)\n"
        request = self.script("request", zipf +
                              f"SELECT cached_domain_lookup({DOMAIN});\n"
                              f"SELECT cached_widget_config({UID});\n"
                              f"SELECT cached_customer_profile({UID});\n")
        check = self.script("check", zipf +
                            f"INSERT INTO stale_reads (cached, committed) SELECT c, w FROM "
                            f"(SELECT (cached_widget_config({UID})->>'version')::bigint AS c, "
                            f"(SELECT version FROM widget_configs WHERE domain_id = ({ID})::uuid) AS w) s WHERE c < w;\n")
        update = self.script("update", zipf +
                             f"UPDATE widget_configs SET version = version + 1, updated_at = now(), "
                             f"greeting = 'Hello #' || (version + 1) WHERE domain_id = ({ID})::uuid;\n")
        clients = 2 if self.quick else 8
        warm = 1 if self.quick else 5
        self.pgbench([request, check, update], clients, duration=warm, weights=[90, 9, 1])
        self.sql("SELECT twotier.reset_stats()")
        self.sql("SELECT pg_stat_statements_reset()")
        r = self.pgbench([request, check, update], clients, weights=[90, 9, 1])
        stats = {row[0]: [int(x) for x in row[1:]] for row in self.sql(
            "SELECT cache, calls, l1_hits, l2_hits, misses, negative_hits, bypasses FROM twotier.stats")}
        calls = sum(v[0] for v in stats.values())
        source = sum(v[3] + v[5] for v in stats.values())
        l1 = sum(v[1] for v in stats.values())
        l2 = sum(v[2] for v in stats.values())
        stale = int(self.sql("SELECT count(*) FROM stale_reads")[0][0])
        updates = int(self.sql("SELECT coalesce(sum(calls), 0) FROM pg_stat_statements WHERE query LIKE 'UPDATE widget_configs%'")[0][0])
        duration = self.duration
        res = {"calls_per_s": calls / duration, "l1_ratio": l1 / calls, "l2_ratio": l2 / calls,
               "source_per_100": 100 * source / calls, "stale": stale, "updates": updates}
        self.mixed_result = res
        print(f"  {calls / duration:.0f} cached calls/s with {clients} clients, {updates} updates;"
              f" L1 {res['l1_ratio']:.1%}, L2 {res['l2_ratio']:.1%} of calls;"
              f" {res['source_per_100']:.2f} source queries per 100 calls; stale reads: {stale}", flush=True)
        self.rows.append({"group": "mixed", "path": "chat requests (Zipf) + updates", "clients": clients,
                          "tps": round(r["tps"], 1), "mean_us": round(r["mean_us"], 1), "p99_us": r["p99_us"],
                          "note": json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()})})

    def scaling(self):
        print("\n== scaling: L1 hit latency against the number of keys", flush=True)
        sizes = [1000, 10000] if self.quick else [1000, 100_000, 1_000_000]
        c = self.pg.connect()
        c.execute("CREATE TABLE kv (k int PRIMARY KEY, v jsonb NOT NULL)")
        c.execute(f"INSERT INTO kv SELECT g, jsonb_build_object('k', g, 'name', 'item ' || g, 'tags', "
                  f"jsonb_build_array('a', 'b')) FROM generate_series(1, {max(sizes)}) g")
        c.execute("ANALYZE kv")
        c.execute("""SELECT twotier.define('kv', 'SELECT v FROM kv WHERE k = $1::int', '1 hour', ARRAY['kv(k)'])""")
        c.close()
        self.scale = []
        for size in sizes:
            t0 = time.time()
            with self.pg.connect() as w:
                # Warm L1 only (no Redis round trips): this measures L1 with `size` keys resident.
                w.execute("SET twotier.redis_url = ''")
                w.execute(f"SELECT twotier.warm('kv', 'SELECT g::text FROM generate_series(1, {size}) g')")
                st = w.execute("SELECT twotier.status()->'l1'").fetchone()[0]
            hit = self.script(f"kv{size}", f"\\set i random(1, {size})\nSELECT cached_kv(:i);\n")
            r = self.pgbench([hit], 1)
            self.record("scaling", f"L1 hit, {size} keys", 1, r,
                        f"L1 used {st['used_bytes'] / 2**20:.1f} MiB of {st['size_bytes'] / 2**20:.0f} MiB,"
                        f" {st['entries']} entries, {st['evictions']} evictions; warmed in {time.time() - t0:.0f} s")
            self.scale.append((size, r["mean_us"], st))
        # Invalidation of a big cache: a pattern SCANs Redis; a flush is O(1).
        size = 10000 if self.quick else 100_000
        with self.pg.connect() as w:
            w.execute("SELECT twotier.flush('kv')")
            w.execute(f"SELECT twotier.warm('kv', 'SELECT g::text FROM generate_series(1, {size}) g')")
            (in_redis,) = w.execute("SELECT count(*) FROM generate_series(1, 1)").fetchone()
            t0 = time.time()
            (n,) = w.execute("SELECT twotier.invalidate_pattern('kv', '*')").fetchone()
            pattern_s = time.time() - t0
            w.execute(f"SELECT twotier.warm('kv', 'SELECT g::text FROM generate_series(1, {size}) g')")
            t0 = time.time()
            w.execute("SELECT twotier.flush('kv')")
            flush_s = time.time() - t0
        self.invalidation = {"keys": size, "pattern_invalidated": n, "pattern_s": pattern_s, "flush_s": flush_s}
        print(f"  invalidate_pattern('kv', '*') over {size} keys: {n} keys in {pattern_s * 1000:.0f} ms;"
              f" flush: {flush_s * 1000:.1f} ms", flush=True)

    # -- L2 on a Redis Cluster (issue 23) ------------------------------------------------
    def _l2_mode(self, url: str, cluster: bool) -> None:
        """Switches this server's L2 (ALTER SYSTEM and a reload: the delivery worker reads
        postgresql.conf) and waits until a fresh session uses it (on a cluster: trusts its map)."""
        lit = url.replace("'", "''")
        self.sql(f"ALTER SYSTEM SET twotier.redis_url = '{lit}'")
        self.sql(f"ALTER SYSTEM SET twotier.redis_cluster = {'on' if cluster else 'off'}")
        self.sql("SELECT pg_reload_conf()")
        deadline = time.time() + 60
        while time.time() < deadline:
            (l2,), = self.sql("SELECT twotier.status()->'l2'")[0:1]
            ok = l2.get("reachable") and (not cluster or (l2.get("cluster") or {}).get("trusted"))
            if ok and l2.get("url") == url:
                return
            time.sleep(0.1)
        raise RuntimeError(f"L2 at {url} (cluster={cluster}) not in use after 60 s: {l2}")

    def redis_cluster(self):
        """The same L2 reads against the single Redis and a 3-master, 3-replica Redis Cluster on
        this machine, interleaved in one run: an L2 hit, a 100-key _many from L2, and L2 hits
        under 8 clients; then a master killed under readers: time until L2 hits again."""
        print("\n== redis cluster: L2 on one Redis and on 3 masters (+3 replicas)", flush=True)
        rc = RedisCluster().start()
        n = min(self.tenants, 5000)
        pick = f"\\set i random(1, {n})\n"
        hit = self.script("rc_hit", pick + f"SELECT cached_widget_config({UID});\n")
        many_pick = f"\\set i random(1, {max(n - 100, 1)})\n"
        keys = f"ARRAY(SELECT {UID.replace(':i', 'g')} FROM generate_series(:i, :i + 99) g)"
        many = self.script("rc_many", many_pick + f"SELECT count(value) FROM cached_widget_config_many({keys});\n")
        modes = [("one Redis", self.redis.url, False), ("3-master cluster", rc.url, True)]
        runs = [("L2 hit (L1 off)", hit, 1), ("100 keys, one _many call, L2 (L1 off)", many, 1),
                ("L2 hit (L1 off)", hit, 8)]
        best: dict = {}
        rt = {}
        try:
            for _ in range(self.reps):
                for label, url, cluster in modes:
                    self._l2_mode(url, cluster)
                    self.warm("widget_config", n)
                    for path, script, clients in runs:
                        r = self.pgbench([script], clients, options="-c twotier.l1_enabled=off")
                        k = (label, path, clients)
                        if k not in best or r["mean_us"] < best[k]["mean_us"]:
                            best[k] = r
                    with self.pg.connect() as c:
                        c.execute("SET twotier.l1_enabled = off")
                        arr = ("ARRAY(SELECT md5(format('shop-%s.example.com', lpad(g::text, 5, '0')))::uuid"
                               " FROM generate_series(1, 100) g)")
                        q = "SELECT (twotier.status()->'l2'->>'round_trips_in_session')::int"
                        c.execute(f"SELECT count(*) FROM cached_widget_config_many({arr})")
                        before = c.execute(q).fetchone()[0]
                        c.execute(f"SELECT count(*) FROM cached_widget_config_many({arr})")
                        rt[label] = c.execute(q).fetchone()[0] - before
            for label, _, _ in modes:
                for path, _, clients in runs:
                    self.record("redis cluster", f"{path}, {label}", clients, best[(label, path, clients)],
                                f"{rt[label]} Redis round trip(s) per 100-key _many" if "_many" in path else "")
            self.cluster_result = {"round_trips": rt, "failover": self._cluster_failover(rc, n)}
        finally:
            self._l2_mode(self.redis.url, False)
            rc.destroy()

    def _cluster_failover(self, rc, n) -> dict:
        """A master killed (SIGKILL) while a session reads with L1 off: when its replica took
        over, when the delivery worker moved L2 to the new map's epoch, and when the session's
        reads were L2 hits again; stale reads counted against a writer committing meanwhile."""
        key = "md5('shop-00001.example.com')::uuid"
        (name,), = self.sql(f"SELECT twotier.status()->>'key_scope'")[0:1]
        (version,), = self.sql("SELECT version FROM twotier.caches WHERE name = 'widget_config'")[0:1]
        (uid,), = self.sql(f"SELECT {key}::text")[0:1]
        victim = rc.node_of(f"{{{name}:widget_config:v{version}:{uid}}}")
        replica = rc.replica_of(victim)
        with self.pg.connect() as c:
            c.execute("SET twotier.l1_enabled = off")
            hits = "SELECT l2_hits FROM twotier.stats WHERE cache = 'widget_config'"
            c.execute(f"SELECT cached_widget_config({key})")
            t0 = time.time()
            victim.kill()
            promoted = back = None
            while time.time() - t0 < 60 and back is None:
                (before,) = c.execute(hits).fetchone()
                c.execute(f"SELECT cached_widget_config({key})")
                (after,) = c.execute(hits).fetchone()
                if promoted is None:
                    try:
                        if replica.client(timeout=0.05).info("replication")["role"] == "master":
                            promoted = time.time() - t0
                    except Exception:
                        pass
                if after > before and promoted is not None:
                    back = time.time() - t0
                time.sleep(0.02)
        out = {"promoted_s": promoted, "l2_hits_again_s": back}
        print(f"  master killed: replica promoted after {promoted:.1f} s, L2 hits again after "
              f"{back:.1f} s" if back is not None and promoted is not None else f"  failover: {out}", flush=True)
        return out

    # -- a hot key expiring under load ---------------------------------------------------
    def stampede(self):
        """One hot key with a 1 s TTL and a 20 ms query, read by 8 clients at once: every
        second the key expires and every client misses together. With the stampede wait one
        of them runs the query and the others take its L1 fill; without it (stampede_wait_ms
        = 0) each runs it. Counted from the query's own sequence."""
        print("\n== a hot key expiring every second under 8 clients (stampede protection)", flush=True)
        self.sql("CREATE TABLE hot (k int PRIMARY KEY, v text)")
        self.sql("INSERT INTO hot VALUES (1, 'hot')")
        self.sql("CREATE SEQUENCE hot_fetches")
        self.sql("SELECT twotier.define('hot', $q$SELECT jsonb_build_object('v', v, 'n', nextval('hot_fetches'),"
                 " 'z', pg_sleep(0.02)::text) FROM hot WHERE k = $1::int$q$, '1 second', ARRAY['hot(k)'])")
        script = self.script("hot", "SELECT cached_hot('1');\n")
        clients, duration = 8, (3 if self.quick else 10)
        out = {}
        for label, options in (("with the stampede wait", ""), ("without (stampede_wait_ms = 0)",
                                                                "-c twotier.stampede_wait_ms=0")):
            (before,), = self.sql("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM hot_fetches")[0:1]
            r = self.pgbench([script], clients, duration=duration, options=options)
            (after,), = self.sql("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM hot_fetches")[0:1]
            per_s = (after - before) / duration
            out[label] = per_s
            self.record("stampede", f"hot key, TTL 1 s, {label}", clients, r,
                        json.dumps({"source_queries": after - before, "per_second": round(per_s, 2)}))
        self.stampede_result = out

    # -- PostgREST through pgbouncer -----------------------------------------------------
    def postgrest(self):
        """The Supabase/PostgREST request through a real pgbouncer in transaction mode: one
        transaction per request as `authenticator`, `SET LOCAL ROLE authenticated`, the JWT's
        claims set LOCAL (the token re-issued every 3 s: its iat changes), then the orders of
        one status over a table with row-level security (`owner = auth.uid()`). Three runs, same
        clients and duration, 1 % of transactions updating a random user's order: (i) the RLS
        cache varying by POSTGREST_VARY, (ii) the raw query instead (uncached), (iii) a cache
        keyed by (user, status) over a copy of the table without RLS, the hit-ratio baseline.
        A Python checker thread through the same pgbouncer runs beside each run (the same extra
        load for all three) and counts leaks and stale reads during (i). A failure prints why and
        the rest of the bench goes on."""
        print(f"\n== postgrest: RLS through pgbouncer (transaction mode), vary_by {POSTGREST_VARY}", flush=True)
        self.postgrest_result = {}
        try:
            self._postgrest()
        except Exception as e:  # noqa: BLE001 - reported, never fatal to the rest of the run
            detail = (getattr(e, "stderr", None) or str(e) or type(e).__name__).strip().splitlines()
            msg = f"postgrest: failed: {detail[-1] if detail else type(e).__name__}"
            print(f"  {msg}", flush=True)
            self.notes.append(msg)

    def _postgrest(self):
        users, statuses = POSTGREST_USERS, POSTGREST_STATUSES
        per = 50 if self.quick else 300  # orders per user, spread over the statuses
        clients = 2 if self.quick else 8
        warm = 1 if self.quick else 3
        array = "ARRAY[" + ", ".join(f"'{x}'" for x in statuses) + "]"
        raw = POSTGREST_RAW.format(table="pgr_orders", where="status = $1")
        plain = POSTGREST_RAW.format(table="pgr_orders_plain", where="owner = $1 AND status = $2")
        with self.pg.connect() as c:
            c.execute("""DO $$ BEGIN
                IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'anon') THEN CREATE ROLE anon NOLOGIN; END IF;
                IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'authenticated') THEN
                    CREATE ROLE authenticated NOLOGIN; END IF;
                IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'authenticator') THEN
                    CREATE ROLE authenticator LOGIN NOINHERIT; END IF;
                END $$""")
            c.execute("GRANT anon, authenticated TO authenticator")
            c.execute("CREATE SCHEMA IF NOT EXISTS auth")
            c.execute("GRANT USAGE ON SCHEMA auth TO anon, authenticated")
            c.execute("""CREATE OR REPLACE FUNCTION auth.uid() RETURNS uuid LANGUAGE sql STABLE AS
                $$ SELECT nullif(current_setting('request.jwt.claims', true)::jsonb ->> 'sub', '')::uuid $$""")
            c.execute("SELECT setseed(0.22)")
            # User u owns ids (u - 1) * per + 1 .. u * per; its uuid is md5('user' || u).
            c.execute(f"""CREATE TABLE pgr_orders AS SELECT ((u - 1) * {per} + k)::bigint AS id,
                          md5('user' || u)::uuid AS owner, ({array})[1 + floor(random() * {len(statuses)})::int] AS status,
                          (random() * 1000)::int AS amount
                          FROM generate_series(1, {users}) u, generate_series(1, {per}) k""")
            c.execute("ALTER TABLE pgr_orders ADD PRIMARY KEY (id)")
            c.execute("CREATE TABLE pgr_orders_plain AS SELECT * FROM pgr_orders")
            c.execute("ALTER TABLE pgr_orders_plain ADD PRIMARY KEY (id)")
            for t in ("pgr_orders", "pgr_orders_plain"):
                c.execute(f"CREATE INDEX ON {t} (owner, status)")
                c.execute(f"ANALYZE {t}")
                c.execute(f"GRANT SELECT, UPDATE ON {t} TO authenticated")
            c.execute("ALTER TABLE pgr_orders ENABLE ROW LEVEL SECURITY")
            c.execute("CREATE POLICY own_orders ON pgr_orders TO authenticated USING (owner = auth.uid())")
            # One counter per status, bumped by each write in its own transaction: the checker
            # judges a read only if the counter did not move around it.
            c.execute("CREATE TABLE pgr_order_versions (status text PRIMARY KEY, ver bigint NOT NULL DEFAULT 0)")
            c.execute(f"INSERT INTO pgr_order_versions (status) SELECT unnest({array})")
            c.execute("GRANT SELECT, UPDATE ON pgr_order_versions TO authenticated")
            c.execute(f"""SELECT twotier.define('pgr_my_orders', $q${raw}$q$, '5 min', {POSTGREST_WATCH},
                          vary_by => {POSTGREST_VARY})""")
            c.execute(f"""SELECT twotier.define('pgr_orders_by_user', $q${plain}$q$, '5 min',
                          ARRAY['pgr_orders_plain(owner, status)'], key_types => ARRAY['uuid', 'text'],
                          key_names => ARRAY['owner', 'status'])""")
            c.execute("GRANT EXECUTE ON FUNCTION cached_pgr_my_orders, cached_pgr_orders_by_user TO authenticated")
            owner = {i: str(o) for i, o in c.execute("SELECT id, owner FROM pgr_orders")}
        self.bouncer = PgBouncer(self.pg, users=["authenticator"], default_pool_size=clients + 2).start()

        # The token: iat (and exp) change every 3 s, as when clients refresh their JWTs.
        def claims(var):
            iat = "(extract(epoch from clock_timestamp())::int / 3 * 3)"
            return (f"json_build_object('sub', md5('user' || :{var}::text)::uuid, 'role', 'authenticated',"
                    f" 'iat', {iat}, 'exp', {iat} + 3600)::text")

        status = f"({array})[:s]"
        head = f"\\set uid random(1, {users})\n\\set s random(1, {len(statuses)})\n"
        begin = "BEGIN;\nSET LOCAL ROLE authenticated;\n"

        def request(name, call):
            return self.script(f"pgr_{name}", head + begin + f"SELECT set_config('request.jwt.claims', {claims('uid')}, true);\n"
                               + call + ";\nCOMMIT;\n")

        def write(name, table, bump):
            oid = f"(:wu - 1) * {per} + :k"
            body = (f"\\set wu random(1, {users})\n\\set k random(1, {per})\n" + begin
                    + f"SELECT set_config('request.jwt.claims', {claims('wu')}, true);\n")
            if bump:
                body += (f"UPDATE pgr_order_versions SET ver = ver + 1 WHERE status ="
                         f" (SELECT status FROM pgr_orders WHERE id = {oid});\n")
            body += f"UPDATE {table} SET amount = amount + 1 WHERE id = {oid};\nCOMMIT;\n"
            return self.script(f"pgr_write_{name}", body)

        runs = {
            "i": ("pgr_my_orders", request("cached", f"SELECT cached_pgr_my_orders({status})"),
                  write("rls", "pgr_orders", True)),
            "ii": (None, request("raw", raw.replace("$1", status)), write("rls", "pgr_orders", True)),
            "iii": ("pgr_orders_by_user", request("plain", f"SELECT cached_pgr_orders_by_user(md5('user' || :uid::text)::uuid,"
                                                           f" {status})"), write("plain", "pgr_orders_plain", False)),
        }

        def stats(cache):
            rows = self.sql("SELECT calls, l1_hits, l2_hits FROM twotier.stats WHERE cache = %s", cache)
            return rows[0] if rows else (0, 0, 0)

        res = self.postgrest_result
        for run, (cache, read, wr) in runs.items():
            bench = dict(clients=clients, weights=[99, 1], port=self.bouncer.port, user="authenticator",
                         mode="extended")
            if cache:
                self.pgbench([read, wr], duration=warm, **bench)
            # The checker runs beside every run, so that each carries the same extra load; only
            # the RLS cache's run is judged by it.
            checker = PostgrestChecker(self, owner, statuses, raw)
            s0 = stats(cache) if cache else None
            checker.start()
            try:
                r = self.pgbench([read, wr], **bench)
            finally:
                checker.stop()
            if run != "i":
                checker = None
            res[f"tps_{run}"] = r["tps"]
            note = {"clients": clients, "users": users, "orders_per_user": per, "writes_pct": 1}
            if cache:
                calls, l1, l2 = (a - b for a, b in zip(stats(cache), s0))
                res[f"hit_{run}"] = (l1 + l2) / calls if calls else None
                note.update({"calls": calls, "l1_hits": l1, "l2_hits": l2,
                             "hit_ratio": None if not calls else round((l1 + l2) / calls, 4)})
            if checker:
                res.update(checker.result())
                note.update(checker.result())
                if checker.samples:
                    print(f"  checker errors, first ones: {checker.samples}", flush=True)
            path = {"i": f"RLS cache, vary_by {POSTGREST_VARY}, watch {POSTGREST_WATCH}",
                    "ii": "raw query",  # the name the CSV's x_raw column looks for
                    "iii": "cache keyed by (user, status), no RLS"}[run]
            if run == "ii":
                note["what"] = "the raw query under RLS, uncached, in the same transaction"
            self.record("postgrest", path, clients, r, json.dumps(note))
        hi, hiii = res.get("hit_i"), res.get("hit_iii")
        print(f"  requests/s: RLS cache {res['tps_i']:.0f}, raw {res['tps_ii']:.0f}, (user, status) cache"
              f" {res['tps_iii']:.0f}; hit ratio RLS cache {hi if hi is None else f'{hi:.3f}'}, (user, status)"
              f" cache {hiii if hiii is None else f'{hiii:.3f}'}; checker: {res.get('reads')} reads,"
              f" {res.get('judged')} judged, {res.get('leaks')} leaks, {res.get('stale')} stale,"
              f" {res.get('errors')} errors", flush=True)

    def postgrest_verdicts(self) -> list:
        res = getattr(self, "postgrest_result", {})
        hi, hiii, ti, tii = (res.get(k) for k in ("hit_i", "hit_iii", "tps_i", "tps_ii"))
        out = [judge(f"postgrest: hit ratio of the RLS cache (vary_by {POSTGREST_VARY}) / hit ratio of a cache"
                     " keyed by (user, status) without RLS >= 0.9", hi / hiii if hi is not None and hiii else None,
                     0.9, True),
               judge("postgrest: requests/s through pgbouncer, RLS cache / raw query under RLS >= 1.5",
                     ti and tii and ti / tii, 1.5, True)]
        name = "postgrest: 0 leaks, 0 stale (a checker thread through pgbouncer beside the RLS cache run)"
        if not res.get("judged") or res.get("errors"):
            out.append((name, f"{res.get('judged')} reads judged, {res.get('errors')} errors", 0, "NOT RUN"))
        else:
            out.append((name, f"{res['leaks']} leaks, {res['stale']} stale in {res['judged']} judged reads", 0,
                        "PASS" if res["leaks"] == res["stale"] == 0 else "SHORT"))
        return out

    # -- what it costs a writer ----------------------------------------------------------
    WRITER_ROWS = 10_000

    def writer(self):
        """What twotier costs the sessions that write the watched tables: the triggers collect
        keys and PRE_COMMIT puts them in the ledger and the WAL; the delivery worker sends the
        tombstones. Each measurement is on its own: one that fails prints why and the run goes on."""
        print("\n== what it costs a writer", flush=True)
        self.writer_result = {}
        for measure in (self.writer_tables, self.writer_single_row, self.writer_tpcb, self.writer_bulk,
                        self.writer_redis_memory, self.writer_instructions):
            try:
                measure()
            except Exception as e:  # noqa: BLE001 - reported, never fatal to the rest of the run
                detail = (getattr(e, "stderr", None) or str(e) or type(e).__name__).strip().splitlines()
                msg = f"writer: {measure.__name__} failed: {detail[-1] if detail else type(e).__name__}"
                print(f"  {msg}", flush=True)
                self.notes.append(msg)
                if measure == self.writer_tables:
                    return

    def writer_tables(self):
        """Two tables of the same shape, one watched by a cache and one not, so that the only
        difference between their UPDATEs is twotier; and a bigger watched table whose keys
        nobody ever reads, for the memory measurement."""
        n = self.WRITER_ROWS
        big = 10_000 if self.quick else 100_000
        with self.pg.connect() as c:
            for table, rows in (("wt", n), ("wu", n), ("wm", big)):
                c.execute(f"CREATE TABLE {table} (k int PRIMARY KEY, v bigint NOT NULL)")
                c.execute(f"INSERT INTO {table} SELECT g, 0 FROM generate_series(1, {rows}) g")
                c.execute(f"ANALYZE {table}")
            c.execute("SELECT twotier.define('wt', $q$SELECT jsonb_build_object('v', v) FROM wt WHERE k = $1::int$q$,"
                      " '5 minutes', ARRAY['wt(k)'])")
            # The long TTL is deliberate: if tombstones lived as long as the cache's entries
            # instead of twotier.tombstone_ttl_s, the memory measurement shows it.
            c.execute("SELECT twotier.define('wm', $q$SELECT jsonb_build_object('v', v) FROM wm WHERE k = $1::int$q$,"
                      " '1 hour', ARRAY['wm(k)'])")
            # Every watched key starts cached in both tiers, as in an app: the UPDATEs below
            # invalidate live entries, not absent ones.
            c.execute(f"SELECT twotier.warm('wt', 'SELECT g::text FROM generate_series(1, {n}) g')")
        self.writer_big = big

    def undelivered(self):
        """Keys in the ledger not yet acknowledged by Redis (twotier.status()->'delivery'), or
        None for a build without the ledger."""
        st = self.sql("SELECT twotier.status()->'delivery'")[0][0]
        return int(st["undelivered"]) if isinstance(st, dict) and "undelivered" in st else None

    def wait_delivered(self, timeout):
        """Polls the ledger until the delivery worker has taken every key to Redis, or gives up
        after `timeout` s; returns (keys left or None without a ledger, seconds waited)."""
        t0 = time.time()
        while True:
            n = self.undelivered()
            if n is None or n == 0 or time.time() - t0 > timeout:
                return n, time.time() - t0
            time.sleep(0.2)

    def tombstone_ttl(self):
        """twotier.tombstone_ttl_s as the extension defines it; None for a build without it
        (pg_settings lists no placeholders, current_setting() would show one)."""
        rows = self.sql("SELECT setting FROM pg_settings WHERE name = 'twotier.tombstone_ttl_s'")
        return int(rows[0][0]) if rows else None

    def l1_entries(self):
        """L1 entries from twotier.status(), read defensively: None when L1 is off or the
        status has another shape."""
        try:
            st = self.sql("SELECT twotier.status()")[0][0]
            l1 = st.get("l1") if isinstance(st, dict) else None
            v = l1.get("entries") if isinstance(l1, dict) else None
            return int(v) if v is not None else None
        except Exception:  # noqa: BLE001
            return None

    def durable(self, on: bool):
        """fsync as a production server has it, for the synchronous_commit = on runs (the
        bench's cluster runs with fsync off, as every test cluster does): a commit that waits
        for its WAL to reach the disk is what issue 18's "sync on" targets are about."""
        self.pg.set({"fsync": "on" if on else "off"})
        self.pg.reload()
        got = self.sql("SHOW fsync")[0][0]
        if got != ("on" if on else "off"):
            raise RuntimeError(f"fsync is {got} after asking for {'on' if on else 'off'}")

    def writer_single_row(self):
        """Single-row UPDATE TPS, watched against unwatched, with synchronous_commit off and on
        (on with fsync on), each with Redis up and with Redis down. The writer never waits for
        Redis either way: its keys go to the ledger (shared memory) and the delivery worker
        takes them to Redis. Down, the bench's Redis is stopped for those runs and restarted on
        the same port after them, and the worker must then drain the ledger."""
        n, clients = self.WRITER_ROWS, 4
        scripts = {t: self.script(f"update_{t}", f"\\set k random(1, {n})\nUPDATE {t} SET v = v + 1 WHERE k = :k;\n")
                   for t in ("wu", "wt")}

        def interleaved(options):
            def run(side):
                t = "wu" if side == "a" else "wt"
                # Each run starts from a vacuumed table, so that neither carries the
                # dead rows of the runs before it (the watched one would carry fewer).
                self.sql(f"VACUUM {t}")
                return self.pgbench_with_cpu(scripts[t], clients, options)
            return paired(run, self.writer_pairs)

        single = self.writer_result["single"] = {}
        queue = self.writer_result["ledger"] = {}
        for sync in ("off", "on"):
            single[sync] = {}
            if sync == "on":
                self.durable(True)
            try:
                for redis in ("up", "down"):
                    self._single_row_runs(sync, redis, interleaved, single[sync], queue, n, clients)
            finally:
                if sync == "on":
                    self.durable(False)

    def _single_row_runs(self, sync, redis, interleaved, out, queue, n, clients):
        """One (synchronous_commit, Redis) cell of writer_single_row."""
        options = f"-c synchronous_commit={sync}"
        label = f"synchronous_commit {sync}, Redis {redis}"
        if redis == "down":
            queue.setdefault(sync, {})["before"] = self.undelivered()
            self.redis.stop()
        d0 = self.sql("SELECT twotier.status()->'delivery'")[0][0]
        try:
            pair = interleaved(options)
            if redis == "down":
                queue[sync]["during"] = self.undelivered()
        finally:
            if not self.redis.running():
                self.redis.start()
        if redis == "down":
            q = queue[sync]
            q["after"], q["drain_s"] = self.wait_delivered(20 if self.quick else 60)
            print(f"  ledger ({label}): {q['before']} undelivered keys before the Redis-down runs,"
                  f" {q['during']} after them, {q['after']} after Redis came back"
                  f" (waited {q['drain_s']:.1f} s for the worker)", flush=True)
        best = {"wu": pair["a"], "wt": pair["b"]}
        ratio = pair["ratio"]
        out[redis] = {"unwatched": best["wu"], "watched": best["wt"], "ratio": ratio, "ratios": pair["ratios"]}
        print(f"  single-row UPDATE, {label}: unwatched {pair['tps_a']} tps, watched {pair['tps_b']};"
              f" watched / unwatched in each pair {pair['ratios']}, median x {ratio:.2f}", flush=True)
        for t, tl in (("wu", "unwatched"), ("wt", "watched")):
            cpu = best[t]["cpu_us_per_tx"]
            print(f"  CPU per transaction, {tl}, {label}: "
                  + ", ".join(f"{k} {v:.1f} µs" for k, v in cpu.items()), flush=True)
        if redis == "up" and sync == "off":
            d1 = self.sql("SELECT twotier.status()->'delivery'")[0][0]
            keys = d1["delivered"] - d0["delivered"]
            exchanges = d1["exchanges"] - d0["exchanges"]
            queue["up_keys_delivered"] = keys
            queue["up_exchanges_per_1000_keys"] = round(1000 * exchanges / keys, 1) if keys else None
            queue["up_lag_p99_ms"] = lag_p99(d0, d1)
            print(f"  delivery with Redis up: {keys} keys in {exchanges} Redis exchanges"
                  f" ({queue['up_exchanges_per_1000_keys']} per 1,000 commits); lag p99 <= {queue['up_lag_p99_ms']} ms",
                  flush=True)
        self.record("writer", f"UPDATE 1 row, unwatched table, {label}", clients, best["wu"],
                    json.dumps({"rows": n, "redis": redis, "synchronous_commit": sync}))
        note = {"rows": n, "redis": redis, "synchronous_commit": sync, "x_unwatched_tps": round(ratio, 3),
                "pair_ratios": pair["ratios"]}
        if redis == "down":
            note.update({f"ledger_{k}": (round(v, 1) if isinstance(v, float) else v) for k, v in queue[sync].items()})
        self.record("writer", f"UPDATE 1 row, watched table, {label}", clients, best["wt"], json.dumps(note))

    def pgbench_with_cpu(self, script: Path, clients: int, options: str) -> dict:
        """A pgbench run, and the CPU per transaction of each kind of process over its middle
        (pgbench's connections exist only while it runs, so the samples are taken inside it)."""
        out: dict = {}
        run = threading.Thread(target=lambda: out.update(self.pgbench([script], clients, options=options)))
        run.start()
        lead = min(1.0, self.duration / 4)
        time.sleep(lead)
        before, t0 = cpu_snapshot(), time.monotonic()
        time.sleep(max(self.duration - 2 * lead, 0.5))
        after, t1 = cpu_snapshot(), time.monotonic()
        run.join()
        out["cpu_us_per_tx"] = cpu_per_tx(before, after, out["tps"] * (t1 - t0))
        return out

    TPCB_CACHES = (("tpcb_accounts", "SELECT to_jsonb(a) FROM pgbench_accounts a WHERE aid = $1::int", "pgbench_accounts(aid)"),
                   ("tpcb_tellers", "SELECT to_jsonb(t) FROM pgbench_tellers t WHERE tid = $1::int", "pgbench_tellers(tid)"),
                   ("tpcb_branches", "SELECT to_jsonb(b) FROM pgbench_branches b WHERE bid = $1::int", "pgbench_branches(bid)"))

    def writer_tpcb(self):
        """pgbench's own tpcb-like (4 clients) with three caches watching pgbench_accounts(aid),
        pgbench_tellers(tid) and pgbench_branches(bid), against the same tables with no cache
        (the caches dropped, so no trigger either); synchronous_commit on (fsync on) and off;
        `writer_pairs` pairs of runs (see `paired`). Also the delivery worker's Redis exchanges per 1,000 commits
        and its lag, from twotier.status()->'delivery'."""
        scale = 1 if self.quick else 4
        sh([str(PG_BIN / "pgbench"), "-i", "-q", "-s", str(scale), "-h", "127.0.0.1", "-p", str(self.pg.port),
            "-U", "postgres", "postgres"], cwd=self.work)

        def cached(on: bool):
            for name, query, watch in self.TPCB_CACHES:
                exists = self.sql("SELECT count(*) FROM twotier.caches WHERE name = %s", name)[0][0]
                if on and not exists:
                    self.sql(f"SELECT twotier.define('{name}', $q${query}$q$, '5 min', ARRAY['{watch}'])")
                elif not on and exists:
                    self.sql(f"SELECT twotier.drop('{name}')")

        out = self.writer_result["tpcb"] = {"scale": scale}
        for sync in ("on", "off"):
            delivery: dict = {"keys": 0, "exchanges": 0, "lag_p99_ms": None}
            self.durable(sync == "on")

            def run(side):
                watched = side == "b"
                cached(watched)
                d0 = self.sql("SELECT twotier.status()->'delivery'")[0][0]
                r = self.pgbench([], 4, options=f"-c synchronous_commit={sync}", builtin="tpcb-like")
                d1 = self.sql("SELECT twotier.status()->'delivery'")[0][0]
                if watched:
                    delivery["keys"] += d1["delivered"] - d0["delivered"]
                    delivery["exchanges"] += d1["exchanges"] - d0["exchanges"]
                    lag = lag_p99(d0, d1)
                    if lag is not None:
                        delivery["lag_p99_ms"] = max(lag, delivery["lag_p99_ms"] or 0)
                return r
            try:
                pair = paired(run, self.writer_pairs)
            finally:
                cached(False)
                self.durable(False)
            best = {False: pair["a"], True: pair["b"]}
            ratio = pair["ratio"]
            out[sync] = {"unwatched": best[False]["tps"], "watched": best[True]["tps"], "ratio": ratio,
                         "ratios": pair["ratios"], "delivery": delivery}
            for watched, label in ((False, "no cache"), (True, "three caches")):
                note = {"scale": scale, "synchronous_commit": sync}
                if watched:
                    note.update({"x_unwatched_tps": round(ratio, 3), "pair_ratios": pair["ratios"],
                                 "delivery": delivery})
                self.record("writer", f"pgbench tpcb-like, {label}, synchronous_commit {sync}"
                            + (" (fsync on)" if sync == "on" else ""), 4, best[watched],
                            json.dumps(note))
            print(f"  tpcb-like, synchronous_commit {sync}: without caches {pair['tps_a']} tps, with three"
                  f" {pair['tps_b']}; in each pair {pair['ratios']}, median x {ratio:.2f}; delivery {delivery}",
                  flush=True)

    def writer_bulk(self):
        """One UPDATE of every row of the table in one statement: the triggers collect 10,000
        keys and the commit invalidates them all. Median of a few timed statements each, one
        session, autocommit (so the timed call includes COMMIT, where invalidation happens)."""
        n = self.WRITER_ROWS
        reps = 3 if self.quick else 5
        times: dict[str, list[float]] = {"wu": [], "wt": []}
        with self.pg.connect() as c:
            for i in range(reps):
                # Alternating which goes first, so that neither always runs on a warmer machine.
                for t in (("wu", "wt") if i % 2 == 0 else ("wt", "wu")):
                    c.execute(f"VACUUM {t}")
                    t0 = time.perf_counter()
                    c.execute(f"UPDATE {t} SET v = v + 1")
                    times[t].append(time.perf_counter() - t0)
        med = {t: statistics.median(v) * 1e6 for t, v in times.items()}
        ratio = med["wt"] / med["wu"]
        self.writer_result["bulk"] = {"rows": n, "reps": reps, "unwatched_us": med["wu"], "watched_us": med["wt"],
                                      "ratio": ratio}
        for t, label in (("wu", "unwatched"), ("wt", "watched")):
            note = {"rows": n, "median_of": reps, "runs_ms": [round(x * 1000, 1) for x in times[t]]}
            if t == "wt":
                note["x_unwatched_time"] = round(ratio, 3)
            self.record("writer", f"UPDATE all {n} rows, {label} table", 1,
                        {"tps": 1e6 / med[t], "mean_us": med[t], "p99_us": None}, json.dumps(note))

    def writer_instructions(self):
        """Instructions per write transaction, watched and unwatched (callgrind, postgres
        --single, one statement per transaction): what the TPS and time ratios measure, without
        this machine's noise and without the delivery worker's and Redis's share (a single-user
        server runs no background worker). The whole process is counted for N and for 2N
        statements: the difference over N is one transaction, start-up and exit cancel out.
        Single-row UPDATEs, and the UPDATE of every row (a bulk change past
        twotier.flush_above_keys)."""
        if not shutil.which("valgrind"):
            self.notes.append("valgrind not found: no writer instruction counts")
            return
        rows = self.WRITER_ROWS
        n = 300 if self.quick else 2000
        kinds = {"single": (n, lambda t, i: f"UPDATE {t} SET v = v + 1 WHERE k = {1 + (i * 7919) % rows};\n"),
                 "bulk": (1 if self.quick else 2, lambda t, i: f"UPDATE {t} SET v = v + 1;\n")}
        self.pg.stop()
        per_tx: dict = {}
        try:
            for kind, (count, statement) in kinds.items():
                for t in ("wu", "wt"):
                    total = {c: self.work_dir_run("".join(statement(t, i) for i in range(c)), whole_process=True)
                             for c in (count, 2 * count)}
                    per_tx[(kind, t)] = (total[2 * count] - total[count]) / count
        finally:
            self.pg.start()
        result = self.writer_result["instructions"] = {"statements": n, "rows": rows}
        for kind, label in (("single", "single-row UPDATE"), ("bulk", f"UPDATE of all {rows} rows")):
            wu, wt = per_tx[(kind, "wu")], per_tx[(kind, "wt")]
            result[kind] = {"unwatched": wu, "watched": wt, "ratio": wt / wu}
            print(f"  instructions per {label} transaction (callgrind, single-user): unwatched {wu:.0f},"
                  f" watched {wt:.0f} ({wt - wu:+.0f}, x {wt / wu:.3f})", flush=True)

    def writer_redis_memory(self):
        """What invalidating keys nobody cached leaves behind: Redis used_memory and DBSIZE,
        and L1 entries, before one UPDATE of every row of `wm` (whose keys were never read)
        and once twotier.tombstone_ttl_s plus 3 s has passed after its commit."""
        r = self.redis.client()
        ttl = self.tombstone_ttl()
        wait_s = (ttl if ttl is not None else 5) + 3
        if wait_s > 120:
            self.notes.append(f"writer: twotier.tombstone_ttl_s = {ttl}; the memory measurement waited 120 s only")
            wait_s = 120
        # A quiet baseline: the runs before left tombstones that expire on their own clock
        # (twotier.tombstone_ttl_s), so wait one such period, then until DBSIZE holds still.
        time.sleep(wait_s)
        last, still_since, t0 = r.dbsize(), time.time(), time.time()
        while time.time() - still_since < 2 and time.time() - t0 < 30:
            time.sleep(0.5)
            now = r.dbsize()
            if now != last:
                last, still_since = now, time.time()
        mem0, keys0, l1_0 = r.info("memory")["used_memory"], r.dbsize(), self.l1_entries()
        with self.pg.connect() as c:
            # Per-key tombstones, not the O(1) flush a bulk change gets by default: what is
            # measured is that tombstones leave once twotier.tombstone_ttl_s has passed.
            c.execute("SET twotier.flush_above_keys = 0")
            t0 = time.perf_counter()
            c.execute("UPDATE wm SET v = v + 1")
            update_us = (time.perf_counter() - t0) * 1e6
        committed = time.time()
        peak_mem, peak_keys = mem0, keys0
        while time.time() - committed < wait_s:
            peak_mem = max(peak_mem, r.info("memory")["used_memory"])
            peak_keys = max(peak_keys, r.dbsize())
            time.sleep(0.5)
        mem1, keys1, l1_1 = r.info("memory")["used_memory"], r.dbsize(), self.l1_entries()
        # Counted last: SCAN also drops the expired keys it visits.
        (version,), = self.sql("SELECT version FROM twotier.caches WHERE name = 'wm'")[0:1]
        inc = r.info("server")["run_id"][:12]
        (epoch,), = self.sql("SELECT (twotier.status()->'delivery'->>'epoch')::numeric")[0:1]
        if epoch:
            inc = f"{inc}-{int(epoch):x}"
        (scope,), = self.sql("SELECT twotier.status()->>'key_scope'")[0:1]
        left = sum(1 for _ in r.scan_iter(match=f"twotier:{inc}:{scope}:wm:v{version}:*", count=1000))
        res = {"rows": self.writer_big, "tombstone_ttl_s": ttl, "waited_s": round(time.time() - committed, 1),
               "update_ms": round(update_us / 1000, 1), "used_memory_before": mem0, "used_memory_peak": peak_mem,
               "used_memory_after": mem1, "delta_bytes": mem1 - mem0, "dbsize_before": keys0,
               "dbsize_peak": peak_keys, "dbsize_after": keys1, "cache_keys_left": left,
               "l1_entries_before": l1_0, "l1_entries_after": l1_1,
               "l1_growth": None if l1_0 is None or l1_1 is None else l1_1 - l1_0}
        self.writer_result["memory"] = res
        print(f"  Redis after invalidating {self.writer_big} never-read keys (twotier.tombstone_ttl_s ="
              f" {'n/a: not in this build' if ttl is None else ttl}): used_memory {mem0} -> peak {peak_mem}"
              f" -> {mem1} bytes ({mem1 - mem0:+d}) after {res['waited_s']} s; DBSIZE {keys0} -> peak {peak_keys}"
              f" -> {keys1}; keys of that cache left: {left}; L1 entries {l1_0} -> {l1_1}", flush=True)
        self.record("writer", f"UPDATE all {self.writer_big} never-read rows: Redis memory left", 1,
                    {"tps": 1e6 / update_us, "mean_us": update_us, "p99_us": None}, json.dumps(res))

    def instructions(self):
        """Instructions per call inside one backend (callgrind, single-user mode): repeatable
        on a noisy machine, unlike time. Each path runs N calls in one statement; the empty
        function's run is the floor."""
        if not shutil.which("valgrind"):
            self.notes.append("valgrind not found: no instruction counts")
            return
        print("\n== work per call (callgrind, instructions)", flush=True)
        n = 2000 if self.quick else 20000
        key = ID.replace(":i", "(1 + g % 1000)")
        ukey = UID.replace(":i", "(1 + g % 1000)")
        paths = {
            "empty SQL function(key)": f"SELECT count(empty_fn({key})) FROM generate_series(1, {n}) g;",
            "widget_config L1 hit": f"SELECT count(cached_widget_config({ukey})) FROM generate_series(1, {n}) g;",
            "widget_config raw query": f"SELECT count(raw_widget_config({key})) FROM generate_series(1, {n}) g;",
            # Rendered as the text a client receives: jsonb_out for jsonb, nothing for json.
            "widget_config L1 hit, as text": f"SELECT count(cached_widget_config({ukey})::text) FROM generate_series(1, {n}) g;",
            "widget_config_json L1 hit, as text": f"SELECT count(cached_widget_config_json({ukey})::text) FROM generate_series(1, {n}) g;",
        }
        self.pg.stop()
        self.instr = {}
        try:
            for name, q in paths.items():
                # Warm-up statement first (fills L1, plans), then the counted one.
                stmt = q.replace("SELECT count(", "SELECT count(") + "\n" + q + "\n"
                out = self.work_dir_run(stmt)
                self.instr[name] = out / n
            base = self.instr["empty SQL function(key)"]
            for name, v in self.instr.items():
                print(f"  {name:28} {v:10.0f} instructions per call ({v - base:+.0f} over the floor)", flush=True)
        finally:
            self.pg.start()

    def work_dir_run(self, statements: str, whole_process: bool = False) -> float:
        """Instructions, from a callgrind run of `postgres --single` over `statements`: those of
        the last statement (its PortalRun), or with `whole_process` those of the whole run, commits
        included (with synchronous_commit off, as the writer rows run)."""
        outfile = self.work / "cg.out"
        script = self.work / "cg.sql"
        script.write_text(statements)
        os.chmod(script, 0o644)
        if whole_process:
            counted, settings = [], ["-c", "synchronous_commit=off"]
        else:
            counted, settings = ["--collect-atstart=no", "--toggle-collect=PortalRun", "--dump-after=PortalRun"], []
        cmd = ["runuser", "-u", "postgres", "--", "valgrind", "--tool=callgrind", f"--callgrind-out-file={outfile}",
               *counted, str(PG_BIN / "postgres"), "--single", "-D", str(self.pg.data), *settings, "postgres"]
        with open(script) as stdin:
            subprocess.run(cmd, stdin=stdin, capture_output=True, text=True, check=True, cwd=self.work)
        totals = []
        for f in sorted(self.work.glob("cg.out*"), key=lambda p: int(p.name.rsplit(".", 1)[-1]) if p.name.rsplit(".", 1)[-1].isdigit() else 0):
            m = re.search(r"^summary:\s+(\d+)", f.read_text(errors="replace"), re.M)
            if m:
                totals.append(int(m.group(1)))
            f.unlink()
        return float(totals[-1]) if totals else float("nan")

    # -- verdicts ------------------------------------------------------------------------
    def find(self, group, path, clients):
        for r in self.rows:
            if r["group"] == group and r["path"] == path and r["clients"] == clients:
                return r
        return None

    def targets(self):
        print("\n== targets (ratios within this run)", flush=True)
        out = []

        def verdict(name, value, limit, higher_is_better=False, fmt="{:.2f}"):
            out.append(judge(name, value, limit, higher_is_better, fmt))

        # Every target is judged against the floor that does the same work besides caching:
        # computing the key and sending the widget config back (as jsonb, or as json text).
        fair = "key expression + returning a widget config"
        floor = self.find("floor", fair, 1)
        l1 = self.find("widget_config", "cached, L1 hit", 1)
        l2 = self.find("widget_config", "cached, L2 hit (L1 off)", 1)
        raw = self.find("widget_config", "raw query", 1)
        verdict("L1 hit latency / floor returning the same value (1 client) <= 1.15",
                l1 and floor and l1["mean_us"] / floor["mean_us"], 1.15)
        instr = getattr(self, "instr", {})
        if instr:
            base = instr["empty SQL function(key)"]
            verdict("work: (L1 hit - empty function) / (raw widget query - empty function) <= 0.2"
                    " (instructions, callgrind; neither renders the value)",
                    (instr["widget_config L1 hit"] - base) / (instr["widget_config raw query"] - base), 0.2)
        verdict("time: (L1 hit - floor) / (raw widget query - floor) <= 0.2",
                l1 and raw and floor and (l1["mean_us"] - floor["mean_us"]) / max(raw["mean_us"] - floor["mean_us"], 1e-9), 0.2)
        out += self.read_verdicts()
        c8 = max(self.clients)
        l1_8 = self.find("widget_config", "cached, L1 hit", c8)
        raw_8 = self.find("widget_config", "raw query", c8)
        verdict(f"{c8} clients: L1 hit TPS / raw TPS >= 1.5",
                l1_8 and raw_8 and l1_8["tps"] / raw_8["tps"], 1.5, True)
        many_1 = self.find("many keys", "100 keys, one _many call, L1", 1)
        singles_1 = self.find("many keys", "100 keys, 100 single calls in one transaction, L1", 1)
        verdict("100 keys from L1: one _many call TPS / 100 single calls in one transaction TPS >= 5",
                many_1 and singles_1 and many_1["tps"] / singles_1["tps"], 5, True)
        verdict("100 keys from L2 through _many: Redis round trips <= 3", getattr(self, "many_rt", None), 3,
                fmt="{:.0f}")
        if instr and "widget_config_json L1 hit, as text" in instr:
            self.notes.append(
                "Instructions per L1 hit rendered as the client's text: jsonb"
                f" {instr['widget_config L1 hit, as text']:.0f}, json mode {instr['widget_config_json L1 hit, as text']:.0f}"
                f" (the empty function: {instr['empty SQL function(key)']:.0f}).")
        hh = self.find("widget_config_heavy", "cached, L1 hit", c8)
        hr = self.find("widget_config_heavy", "raw query", c8)
        verdict("heavy widget config: hit TPS / raw TPS >= 3", hh and hr and hh["tps"] / hr["tps"], 3, True)
        mixed = getattr(self, "mixed_result", None)
        verdict("mixed workload: source queries per 100 calls <= 5", mixed and mixed["source_per_100"], 5)
        verdict("mixed workload: stale reads == 0", mixed and mixed["stale"], 0, fmt="{:.0f}")
        scale = getattr(self, "scale", [])
        verdict(f"L1 hit latency at {scale[-1][0] if scale else '?'} keys / at {scale[0][0] if scale else '?'} keys <= 1.2",
                scale and scale[-1][1] / scale[0][1], 1.2)
        out += self.cluster_verdicts()
        st = getattr(self, "stampede_result", {})
        verdict("hot key expiring every second under 8 clients: source queries per second with the"
                " stampede wait <= 1.5", st.get("with the stampede wait"), 1.5)
        out += self.writer_verdicts()
        # Where L2 starts to pay: a query must cost more than an L2 hit does over the floor.
        if l2 and floor:
            self.notes.append(f"An L2 hit costs {l2['mean_us'] - floor['mean_us']:.0f} µs over the floor: L2 alone pays"
                              f" only for source queries costing more than that (the raw widget query costs"
                              f" {raw['mean_us'] - floor['mean_us']:.0f} µs over the floor here).")
        out += self.postgrest_verdicts()
        for name, value, limit, v in out:
            print(f"  {v:7} {name}: {value}")
        self.verdicts = out

    def writer_verdicts(self) -> list:
        """Issue 18's targets, from the writer measurements of this run. A measurement that did
        not run (or a build without the ledger or the setting) shows as NOT RUN rather than
        failing the others."""
        out = []

        def verdict(name, value, limit, higher_is_better=False, fmt="{:.2f}"):
            out.append(judge(name, value, limit, higher_is_better, fmt))

        wr = getattr(self, "writer_result", {})
        single = wr.get("single", {})
        for sync, limit in (("off", 0.85), ("on", 0.9)):
            for redis in ("up", "down"):
                verdict(f"writer, 4 clients, synchronous_commit {sync}, Redis {redis}: single-row UPDATE TPS"
                        f" watched / unwatched >= {limit}", single.get(sync, {}).get(redis, {}).get("ratio"), limit, True)
        tpcb = wr.get("tpcb", {})
        verdict("writer: pgbench tpcb-like with three caches / without, synchronous_commit on >= 0.9",
                tpcb.get("on", {}).get("ratio"), 0.9, True)
        verdict("writer: pgbench tpcb-like with three caches / without, synchronous_commit off >= 0.8",
                tpcb.get("off", {}).get("ratio"), 0.8, True)
        lag = (tpcb.get("on", {}).get("delivery") or {}).get("lag_p99_ms")
        verdict("writer: delivery lag p99 (COMMIT to Redis's acknowledgment) at the tpcb-like rate <= 10 ms",
                lag, 10, fmt="{:.0f} ms")
        bulk = wr.get("bulk", {})
        verdict(f"writer: UPDATE of all {bulk.get('rows', self.WRITER_ROWS)} rows in one statement,"
                " time watched / unwatched <= 1.3", bulk.get("ratio"), 1.3)
        mem = wr.get("memory", {})
        verdict(f"writer: Redis memory left {mem.get('waited_s', '?')} s after invalidating {mem.get('rows', '?')}"
                " never-read keys <= 1 MB", None if "delta_bytes" not in mem else mem["delta_bytes"] / 1e6, 1,
                fmt="{:.2f} MB")
        verdict(f"writer: L1 entries after invalidating {mem.get('rows', '?')} never-read keys - before <= 0",
                mem.get("l1_growth"), 0, fmt="{:+.0f}")
        return out

    def cluster_verdicts(self) -> list:
        """Issue 23's targets, from the redis cluster rows of this run."""
        f = lambda p, c: self.find("redis cluster", p, c)  # noqa: E731
        one, many1 = f("L2 hit (L1 off), one Redis", 1), f("100 keys, one _many call, L2 (L1 off), one Redis", 1)
        rc, many3 = f("L2 hit (L1 off), 3-master cluster", 1), f("100 keys, one _many call, L2 (L1 off), 3-master cluster", 1)
        one8, rc8 = f("L2 hit (L1 off), one Redis", 8), f("L2 hit (L1 off), 3-master cluster", 8)
        fo = getattr(self, "cluster_result", {}).get("failover", {})
        return [judge("cluster: L2 hit TPS through 3 masters / on one Redis >= 0.9", one and rc and rc["tps"] / one["tps"], 0.9, True),
                judge("cluster: 100-key _many from L2, time on 3 masters / on one Redis <= 1.5",
                      many1 and many3 and many3["mean_us"] / many1["mean_us"], 1.5),
                ("cluster: 8-client L2 hit TPS, 3 masters / one Redis (reported: 2 cores, PostgreSQL saturates first)",
                 "n/a" if not (one8 and rc8) else f"{rc8['tps'] / one8['tps']:.2f}", None, "REPORTED"),
                ("cluster: a master killed: seconds until its replica is promoted / until L2 hits again (reported)",
                 "n/a" if not fo else f"{fo.get('promoted_s') or float('nan'):.1f} / {fo.get('l2_hits_again_s') or float('nan'):.1f}",
                 None, "REPORTED")]

    def show_targets(self, verdicts: list) -> None:
        """One section's verdicts alone, for the --only runs."""
        print("\n== targets (ratios within this run)", flush=True)
        for name, value, limit, v in verdicts:
            print(f"  {v:7} {name}: {value}")

    # -- output --------------------------------------------------------------------------
    def write(self):
        RESULTS.mkdir(parents=True, exist_ok=True)
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        floor = {c: self.find("floor", "key expression + returning a widget config", c) for c in self.clients}
        with open(RESULTS / "latest.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["group", "path", "clients", "tps", "mean_us", "p99_us", "x_floor_latency", "x_raw_latency", "note"])
            for r in self.rows:
                fl = floor.get(r["clients"]) if r["group"] not in ("writer", "postgrest") else None
                raw = self.find(r["group"], "raw query", r["clients"])
                w.writerow([r["group"], r["path"], r["clients"], r["tps"], r["mean_us"], r["p99_us"],
                            round(r["mean_us"] / fl["mean_us"], 3) if fl else "",
                            round(r["mean_us"] / raw["mean_us"], 3) if raw else "", r["note"]])
        shutil.copy(RESULTS / "latest.csv", RESULTS / f"run-{stamp}.csv")
        self.chart(RESULTS / "latency.png")
        self.markdown(ROOT / "BENCHMARKS.md", stamp)
        print(f"\nwrote bench/results/latest.csv, bench/results/latency.png and BENCHMARKS.md", flush=True)

    def chart(self, path):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [r for r in self.rows if r["clients"] == 1 and r["group"] not in ("mixed", "scaling", "writer", "postgrest")]
        labels = [f"{r['group']}: {r['path']}" for r in rows]
        fig, ax = plt.subplots(figsize=(11, 0.38 * len(rows) + 1.5))
        colors = ["#9ca3af" if r["group"] == "floor" else "#ef4444" if "raw" in r["path"] else
                  "#3b82f6" if "L2" in r["path"] else "#10b981" if "L1" in r["path"] else
                  "#f59e0b" if "miss" in r["path"] else "#6b7280" for r in rows]
        ax.barh(labels, [r["mean_us"] for r in rows], color=colors)
        for i, r in enumerate(rows):
            ax.text(r["mean_us"], i, f" {r['mean_us']:.0f} µs", va="center", fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("mean latency per call, 1 client, pgbench -M prepared (µs, lower is better)")
        ax.set_title("twotier latency per path: grey floor, red raw query, green L1, blue L2, amber miss", fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=110)

    def steal_sentence(self) -> str:
        """How much of the machine the hypervisor took during the run, as a sentence."""
        stolen = (steal_ticks() - self.steal_at_start) / os.sysconf("SC_CLK_TCK")
        wall = time.time() - self.started_at
        share = 100 * stolen / max(wall * (os.cpu_count() or 1), 1e-9)
        return (f" During this run the hypervisor took {stolen:.0f} s of CPU from this machine ({share:.1f} % of"
                f" its {os.cpu_count()} cores over {wall:.0f} s: /proc/stat's steal).")

    def markdown(self, path, stamp):
        mem = sh(["free", "-g"]).stdout.splitlines()[1].split()[1]
        (pgv,), = self.sql("SELECT version()")[0:1]
        lines = [
            "# Benchmarks", "",
            f"Latest full run: `./run bench` on {stamp} (UTC). Reproduce with `./run bench`; "
            "`./run bench --quick` is the two-minute smoke run that `./run test` uses.", "",
            f"Machine: {os.cpu_count()} cores, {mem} GiB RAM, {platform.platform()}; shared and noisy, so compare"
            " rows of the same run, not runs. PostgreSQL: " + pgv.split(",")[0] + ", Redis "
            + sh(["redis-server", "--version"]).stdout.split()[2].removeprefix("v=") + " on loopback."
            + self.steal_sentence(), "",
            f"Settings: pgbench -M prepared, best of {self.reps} interleaved runs of {self.duration} s per row,"
            " clients 1/2/8 (2 pgbench threads);"
            f" {self.tenants} tenants of the report's app (`sql/examples`); twotier.l1_size_mb = 1024;"
            " twotier.tombstone_ttl_s = 5;"
            " fsync off (on for the writer's synchronous_commit on runs). Keys are chosen uniformly over all tenants (Zipf in the mixed workload).", "",
            "× floor compares with the floor that does a hit's work besides caching: computing the key and"
            " returning a widget config (`SELECT (key) IS NULL, '<widget config>'::jsonb`), at the same"
            " number of clients. The many-key rows count one call of 100 keys as one transaction.", "",
            "![latency per path](bench/results/latency.png)", "",
            "| group | path | clients | TPS | mean µs | p99 µs | × floor | × raw |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in self.rows:
            if r["group"] in ("mixed", "writer", "postgrest"):
                continue
            fl = self.find("floor", "key expression + returning a widget config", r["clients"])
            raw = self.find(r["group"], "raw query", r["clients"])
            p99 = "" if r["p99_us"] is None else f"{r['p99_us']:.0f}"
            lines.append(f"| {r['group']} | {r['path']} | {r['clients']} | {r['tps']:.0f} | {r['mean_us']:.1f} | {p99} |"
                         f" {r['mean_us'] / fl['mean_us']:.2f} |" if fl else "|")
            if fl:
                lines[-1] += f" {r['mean_us'] / raw['mean_us']:.2f} |" if raw else " |"
        m = getattr(self, "mixed_result", None)
        if m:
            lines += ["", "## Mixed workload", "",
                      f"The report's chat request (domain lookup, widget config, customer profile) with Zipf-skewed"
                      f" tenants, 9 % fresh-checking reads and 1 % widget config updates, 8 clients:"
                      f" **{m['calls_per_s']:.0f} cached calls/s**, L1 answered {m['l1_ratio']:.1%} and L2"
                      f" {m['l2_ratio']:.1%} of calls, **{m['source_per_100']:.2f} source queries per 100 calls**,"
                      f" {m['updates']} updates, **{m['stale']} stale reads**."]
        lines += self.postgrest_markdown()
        inv = getattr(self, "invalidation", None)
        if inv:
            lines += ["", "## Invalidating a big cache", "",
                      f"`invalidate_pattern('kv', '*')` over {inv['keys']} keys (SCAN + tombstones in batches of 1000):"
                      f" {inv['pattern_s'] * 1000:.0f} ms for {inv['pattern_invalidated']} keys;"
                      f" `flush('kv')` (a version bump): {inv['flush_s'] * 1000:.1f} ms."]
        lines += self.writer_markdown()
        lines += ["", "## Targets", "", "| verdict | target | measured |", "|---|---|---|"]
        for name, value, limit, v in self.verdicts:
            lines.append(f"| {v} | {name} | {value} |")
        if self.notes:
            lines += ["", "## Notes", ""] + [f"- {n}" for n in self.notes]
        extra = ROOT / "bench" / "ANALYSIS.md"
        if extra.exists():
            lines += ["", extra.read_text().strip()]
        path.write_text("\n".join(lines) + "\n")

    def postgrest_markdown(self) -> list[str]:
        """The "PostgREST through pgbouncer" section of BENCHMARKS.md; empty if it did not run."""
        res = getattr(self, "postgrest_result", {})
        rows = [r for r in self.rows if r["group"] == "postgrest"]
        if not rows or "tps_i" not in res:
            return []
        lines = ["", "## PostgREST through pgbouncer", "",
                 "One transaction per request through pgbouncer 1.18 in transaction mode, as PostgREST makes it:"
                 " `BEGIN; SET LOCAL ROLE authenticated; SELECT set_config('request.jwt.claims', <token>, true);"
                 " <read>; COMMIT;` as `authenticator`, pgbench -M extended, for 100 users whose tokens are"
                 " re-issued every 3 s, orders of one of 5 statuses over a table with row-level security"
                 " (`owner = auth.uid()`); 1 % of transactions update a random user's order.", "",
                 "| read | clients | requests/s | mean µs | hit ratio |", "|---|---:|---:|---:|---:|"]
        for r in rows:
            hit = json.loads(r["note"]).get("hit_ratio") if r["note"].startswith("{") else None
            lines.append(f"| {r['path']} | {r['clients']} | {r['tps']:.0f} | {r['mean_us']:.1f} |"
                         f" {'' if hit is None else f'{hit:.3f}'} |")
        lines += ["", f"Checker beside the RLS cache run: {res.get('reads')} reads, {res.get('judged')} judged,"
                  f" **{res.get('leaks')} leaks, {res.get('stale')} stale**, {res.get('errors')} errors."]
        return lines

    def writer_markdown(self) -> list[str]:
        """The "what it costs a writer" section of BENCHMARKS.md; empty if it did not run."""
        wr = getattr(self, "writer_result", {})
        if not wr:
            return []
        lines = ["", "## What it costs a writer"]
        single = wr.get("single", {})
        if single:
            lines += ["", f"Single-row `UPDATE wt SET v = v + 1 WHERE k = :k` over a {self.WRITER_ROWS}-row table that one"
                      " cache watches, against the same-shaped table that none does; pgbench -M prepared, 4 clients,"
                      f" {self.writer_pairs} pairs of {self.duration} s runs, each pair unwatched and watched back to back"
                      " (the order alternating); the ratio is the median of the pairs' ratios and the TPS shown are"
                      " each side's median run. synchronous_commit on runs with"
                      " fsync on (the bench's server otherwise runs with fsync off). Redis down means the bench's Redis"
                      " stopped for those runs: commits leave their keys in the ledger either way, and the delivery"
                      " worker drains it once Redis is back.", "",
                      "| synchronous_commit | Redis | unwatched TPS | watched TPS | watched ÷ unwatched (median)"
                      " | each pair's ratio |", "|---|---|---:|---:|---:|---|"]
            cells = [(sync, redis, v) for sync, by_redis in single.items() for redis, v in by_redis.items()]
            for sync, redis, v in cells:
                lines.append(f"| {sync} | {redis} | {v['unwatched']['tps']:.0f} | {v['watched']['tps']:.0f}"
                             f" | {v['ratio']:.2f} | {', '.join(f'{r:.2f}' for r in v.get('ratios', []))} |")
            lines += ["", "CPU per transaction in those runs (µs, from /proc, user + system):", "",
                      "| synchronous_commit | Redis | table | " + " | ".join(k for k, _ in CPU_KINDS) + " |",
                      "|---|---|---|" + "---:|" * len(CPU_KINDS)]
            for sync, redis, v in cells:
                for t in ("unwatched", "watched"):
                    cpu = v[t].get("cpu_us_per_tx") or {}
                    lines.append(f"| {sync} | {redis} | {t} | "
                                 + " | ".join(f"{cpu.get(k, 0):.1f}" for k, _ in CPU_KINDS) + " |")
            for sync, ob in wr.get("ledger", {}).items():
                if not isinstance(ob, dict) or "after" not in ob:
                    continue
                drained = ob.get("after") == 0
                lines += ["", f"Ledger, synchronous_commit {sync}: {ob.get('before')} undelivered keys before the"
                          f" Redis-down runs, {ob.get('during')} after them, {ob.get('after')} "
                          + ("once Redis was back" if drained else "when the bench gave up")
                          + f" ({ob.get('drain_s') or 0:.1f} s after restarting it)."]
        tpcb = wr.get("tpcb", {})
        cells = [(sync, tpcb[sync]) for sync in ("on", "off") if sync in tpcb]
        if cells:
            lines += ["", f"pgbench's own tpcb-like (scale {tpcb.get('scale')}, 4 clients) with three caches watching"
                      " `pgbench_accounts(aid)`, `pgbench_tellers(tid)` and `pgbench_branches(bid)`, against no cache,"
                      f" in {self.writer_pairs} pairs as above:", "",
                      "| synchronous_commit | no cache TPS | three caches TPS | ratio (median) | each pair's ratio"
                      " | delivery: keys, Redis exchanges, lag p99 |", "|---|---:|---:|---:|---|---|"]
            for sync, v in cells:
                d = v.get("delivery") or {}
                lines.append(f"| {sync}{' (fsync on)' if sync == 'on' else ''} | {v['unwatched']:.0f} | {v['watched']:.0f}"
                             f" | {v['ratio']:.2f} | {', '.join(f'{r:.2f}' for r in v.get('ratios', []))}"
                             f" | {d.get('keys')}, {d.get('exchanges')}, {d.get('lag_p99_ms')} ms |")
        ins = wr.get("instructions")
        if ins:
            one, bulk = ins["single"], ins["bulk"]
            lines += ["", f"Instructions per write transaction (callgrind, `postgres --single`, the difference between"
                      f" N and 2N statements): single-row `UPDATE` unwatched {one['unwatched']:.0f}, watched"
                      f" {one['watched']:.0f} ({one['watched'] - one['unwatched']:+.0f}, × {one['ratio']:.3f});"
                      f" `UPDATE` of all {ins['rows']} rows unwatched {bulk['unwatched']:.0f}, watched"
                      f" {bulk['watched']:.0f} (× {bulk['ratio']:.3f}). This excludes the delivery worker and Redis,"
                      " which a single-user server does not run, and the client round trip, which pgbench adds to both."]
        bulk = wr.get("bulk")
        if bulk:
            lines += ["", f"`UPDATE` of all {bulk['rows']} rows in one statement, one session, median of {bulk['reps']}:"
                      f" unwatched {bulk['unwatched_us'] / 1000:.1f} ms, watched {bulk['watched_us'] / 1000:.1f} ms"
                      f" (× {bulk['ratio']:.2f})."]
        m = wr.get("memory")
        if m:
            ttl = "not in this build" if m["tombstone_ttl_s"] is None else f"{m['tombstone_ttl_s']} s"
            lines += ["", f"Invalidating keys nobody cached: one `UPDATE` of all {m['rows']} rows of a watched table whose"
                      f" keys were never read ({m['update_ms']:.0f} ms) left **{m['delta_bytes']:+d} bytes** of Redis"
                      f" `used_memory` {m['waited_s']} s after its commit (before {m['used_memory_before']}, peak"
                      f" {m['used_memory_peak']}, after {m['used_memory_after']}); DBSIZE {m['dbsize_before']} →"
                      f" peak {m['dbsize_peak']} → {m['dbsize_after']}, {m['cache_keys_left']} keys of that cache left;"
                      f" twotier.tombstone_ttl_s: {ttl}. L1 entries: {m['l1_entries_before']} before,"
                      f" {m['l1_entries_after']} after."]
        return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small and short: checks the runner, not the numbers")
    ap.add_argument("--no-write", action="store_true", help="print only; leave bench/results and BENCHMARKS.md alone")
    ap.add_argument("--chart-only", action="store_true", help="redraw bench/results/latency.png from latest.csv")
    ap.add_argument("--only", choices=["writer", "postgrest", "reads", "cluster"],
                    help="run one section and print it (implies --no-write); reads: issue 21's read floor")
    args = ap.parse_args()
    if args.chart_only:
        b = Bench(quick=False)
        with open(RESULTS / "latest.csv") as f:
            b.rows = [dict(r, clients=int(r["clients"]), mean_us=float(r["mean_us"])) for r in csv.DictReader(f)]
        b.chart(RESULTS / "latency.png")
        shutil.rmtree(b.work, ignore_errors=True)
        return
    b = Bench(args.quick)
    t0 = time.time()
    try:
        b.start()
        if args.only == "writer":
            b.writer()
            b.show_targets(b.writer_verdicts())
            return
        if args.only == "postgrest":
            b.postgrest()
            b.verdicts = b.postgrest_verdicts()
            b.show_targets(b.verdicts)
            return
        if args.only == "cluster":
            b.redis_cluster()
            b.show_targets(b.cluster_verdicts())
            return
        if args.only == "reads":
            b.clients = [1, 8]
            b.paths(focus=True)
            b.show_targets(b.read_verdicts())
            return
        b.paths()
        b.mixed()
        b.postgrest()
        b.scaling()
        b.stampede()
        b.redis_cluster()
        b.writer()
        b.instructions()
        b.targets()
        if not args.no_write:
            b.write()
    finally:
        b.stop()
    print(f"\nbench finished in {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
