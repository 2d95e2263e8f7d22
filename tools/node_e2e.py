#!/usr/bin/env python3
"""End-to-end test of examples/node: the report's chat app as a Node client of twotier.

Starts a throwaway PostgreSQL (twotier preloaded, twotier.redis_url set) and Redis, loads the
example app with 200 tenants as `./run demo` does, installs the Node dependencies if they are
missing (npm ci, output in target/logs/npm.log), runs `npm test` against both servers, and
exits with npm's exit code. Run from anywhere: .venv/bin/python tools/node_e2e.py
"""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

from demo import load_app  # noqa: E402
from servers import PgCluster, RedisServer  # noqa: E402

NODE_DIR = ROOT / "examples/node"
TENANTS = 200


def npm_ci() -> None:
    """Installs from package-lock.json when node_modules is missing; quiet unless it fails."""
    if (NODE_DIR / "node_modules").is_dir():
        return
    log = ROOT / "target/logs/npm.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        rc = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, stdout=out,
                            stderr=subprocess.STDOUT).returncode
    if rc != 0:
        print(log.read_text(errors="replace")[-4000:], file=sys.stderr)
        raise SystemExit(f"npm ci failed ({rc}); full log in {log}")


def start_servers(name: str):
    redis = RedisServer().start()
    pg = PgCluster(name=name, settings={"twotier.redis_url": redis.url}).start()
    load_app(pg, TENANTS)
    env = dict(os.environ, DATABASE_URL=f"postgresql://postgres@127.0.0.1:{pg.port}/postgres", REDIS_URL=redis.url)
    return pg, redis, env


def main() -> int:
    npm_ci()
    pg, redis, env = start_servers("node-e2e")
    try:
        print(f"PostgreSQL 15 on 127.0.0.1:{pg.port}, Redis on 127.0.0.1:{redis.port}, {TENANTS} tenants loaded",
              flush=True)
        proc = subprocess.run(["npm", "test"], cwd=NODE_DIR, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
        print(proc.stdout, end="", flush=True)
        return proc.returncode
    finally:
        pg.destroy()
        redis.destroy()


if __name__ == "__main__":
    sys.exit(main())
