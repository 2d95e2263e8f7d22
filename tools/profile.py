"""Where an L1 hit's time goes (issue 21): the bench's app and widget_config cache on a
throwaway cluster, `SELECT cached_widget_config(...)` from 8 pgbench clients with every key in
L1, and `perf record` over the whole machine meanwhile. Writes the folded stacks of the server's
processes (`bench/profile/<name>.folded`, one line per stack with its sample count, the input of
any flame graph tool) and prints the share of samples per part of the work.

Usage: ./run install, then `.venv/bin/python tools/profile.py [--seconds 8] [--name l1_hit_8_clients]`, as
root (perf). Needs Debian's linux-perf."""
import argparse
import collections
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import KEY, PG_BIN, Bench  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

# The first match from the leaf up names the part of the work a sample belongs to.
PARTS = [
    ("twotier: stats counters", re.compile(r"twotier::stats::")),
    ("twotier: L1 lookup and copy", re.compile(r"twotier::l1::")),
    ("twotier: key rendering", re.compile(r"twotier::(typed_keys|keys|server_text)::|catalog::effective_key")),
    ("twotier: catalog lookup", re.compile(r"twotier::catalog::")),
    ("twotier: Redis wait (poll)", re.compile(r"twotier::l2::link::Link::wait_readable|__x64_sys_poll|do_sys_poll")),
    ("twotier: Redis exchange (send, parse replies)", re.compile(r"twotier::l2::|redis::")),
    ("twotier: value from L2 (jsonb_in / text)", re.compile(r"jsonb_from_text|json_from_text|jsonb_in|pg_parse_json")),
    ("twotier: ledger checks", re.compile(r"twotier::invalidation::")),
    ("twotier: rest of the call", re.compile(r"twotier::")),
    ("value out (jsonb_out, printtup)", re.compile(r"jsonb_out|JsonbToCString|printtup|pq_send|OutputFunctionCall")),
    ("executor and fmgr", re.compile(r"Exec|fmgr|FunctionCall|ExecInterp|standard_ExecutorRun|PortalRun")),
    ("parse/plan/bind (prepared)", re.compile(r"exec_bind_message|exec_execute_message|GetCachedPlan|pg_plan|pg_analyze")),
    ("client protocol and kernel", re.compile(r"secure_read|secure_write|pq_getbyte|__x64_sys|tcp_|unix_|do_syscall|entry_SYSCALL")),
    ("memory contexts", re.compile(r"palloc|AllocSet|MemoryContext")),
]


def fold(script_out: str) -> collections.Counter:
    """`perf script` output to folded stacks (root first, `;`-separated) of postgres processes."""
    stacks: collections.Counter = collections.Counter()
    comm, frames = None, []
    for line in script_out.splitlines():
        if not line.strip():
            if comm is not None and frames and comm.startswith("postgres"):
                stacks[";".join(reversed(frames))] += 1
            comm, frames = None, []
            continue
        if comm is None:
            comm = line.split()[0]
            continue
        parts = line.strip().split(maxsplit=1)
        if len(parts) == 2:
            sym = re.sub(r"\+0x[0-9a-f]+$", "", parts[1].split(" (")[0])
            frames.append(sym.replace(";", ":"))
    return stacks


def breakdown(stacks: collections.Counter) -> list:
    total = sum(stacks.values()) or 1
    parts: collections.Counter = collections.Counter()
    for stack, n in stacks.items():
        frames = stack.split(";")
        for name, rx in PARTS:
            if any(rx.search(f) for f in reversed(frames)):
                parts[name] += n
                break
        else:
            parts["other"] += n
    return [(name, n, 100.0 * n / total) for name, n in parts.most_common()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--name", default="l1_hit_8_clients")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--workload", choices=["l1_hit", "l2_hit", "writer", "writer_unwatched"], default="l1_hit",
                    help="l2_hit: the L1 hit's statement with twotier.l1_enabled off; writer: single-row"
                         " UPDATEs of a watched 10,000-row table (synchronous_commit off); writer_unwatched:"
                         " the same table with no cache watching it, the writer's baseline")
    args = ap.parse_args()
    b = Bench(quick=True)
    b.start()
    try:
        options = ""
        if args.workload.startswith("writer"):
            b.sql("CREATE TABLE wt (k int PRIMARY KEY, v bigint NOT NULL)")
            b.sql("INSERT INTO wt SELECT g, 0 FROM generate_series(1, 10000) g")
            if args.workload == "writer":
                b.sql("SELECT twotier.define('wt', $q$SELECT jsonb_build_object('v', v) FROM wt WHERE k = $1::int$q$,"
                      " '5 minutes', ARRAY['wt(k)'])")
            hit = b.script("update_wt", "\\set k random(1, 10000)\nUPDATE wt SET v = v + 1 WHERE k = :k;\n")
            options = "-c synchronous_commit=off"
        else:
            if args.workload == "l2_hit":
                options = "-c twotier.l1_enabled=off"
            b.warm("widget_config", b.tenants)
            pick = f"\\set i random(1, {b.tenants})\n"
            hit = b.script("hit_widget_config", pick + f"SELECT cached_widget_config({KEY['widget_config']});\n")
        b.pgbench([hit], args.clients, duration=2, options=options)  # warm: every key in L1, plans cached
        data = b.work / "perf.data"
        result = {}
        load = threading.Thread(target=lambda: result.update(
            b.pgbench([hit], args.clients, duration=int(args.seconds) + 2, options=options)))
        load.start()
        time.sleep(1)
        subprocess.run(["perf", "record", "-F", "499", "--call-graph", "dwarf,16384", "-a", "-o", str(data),
                        "--", "sleep", str(args.seconds)], check=True, capture_output=True)
        load.join()
        out = subprocess.run(["perf", "script", "-i", str(data), "-F", "comm,ip,sym"],
                             check=True, capture_output=True, text=True).stdout
        stacks = fold(out)
        dest = ROOT / "bench" / "profile"
        dest.mkdir(parents=True, exist_ok=True)
        folded = dest / f"{args.name}.folded"
        folded.write_text("".join(f"{s} {n}\n" for s, n in stacks.most_common()))
        print(f"{args.clients} clients, {args.workload}: {result.get('tps', 0):.0f} TPS while profiled;"
              f" {sum(stacks.values())} samples of postgres processes -> {folded.relative_to(ROOT)}")
        for name, n, pct in breakdown(stacks):
            print(f"  {pct:5.1f} %  {n:7d}  {name}")
    finally:
        b.pg.destroy()
        b.redis.destroy()


if __name__ == "__main__":
    main()
