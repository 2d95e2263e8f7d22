#!/usr/bin/env python3
"""examples/node/bench.js on a throwaway PostgreSQL (twotier preloaded) and Redis with the
example app loaded (200 tenants), as tools/node_e2e.py sets them up. BENCH_* variables in the
environment pass through to bench.js. Run from anywhere: .venv/bin/python tools/node_bench.py
"""
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from node_e2e import NODE_DIR, TENANTS, npm_ci, start_servers  # noqa: E402


def main() -> int:
    npm_ci()
    pg, redis, env = start_servers("node-bench")
    try:
        print(f"PostgreSQL 15 on 127.0.0.1:{pg.port}, Redis on 127.0.0.1:{redis.port}, {TENANTS} tenants loaded",
              flush=True)
        return subprocess.run(["node", "bench.js"], cwd=NODE_DIR, env=env).returncode
    finally:
        pg.destroy()
        redis.destroy()


if __name__ == "__main__":
    sys.exit(main())
