#!/usr/bin/env python3
"""Runs the pg_regress suite in tests/pg_regress against a temporary PostgreSQL instance.

pg_regress builds the instance itself (--temp-instance), as the non-root OS user that
PostgreSQL requires, with twotier preloaded and no Redis: the SQL surface must behave the
same without L2. Expected files live in tests/pg_regress/expected; `--update` rewrites them
from the results (review the diff before committing).
"""
import argparse
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "tests" / "pg_regress"
PG_CONFIG = os.environ.get("TWOTIER_PG_CONFIG", "/usr/lib/postgresql/15/bin/pg_config")


def pg_config(option: str) -> Path:
    return Path(subprocess.run([PG_CONFIG, option], capture_output=True, text=True, check=True).stdout.strip())


BINDIR = pg_config("--bindir")
PG_REGRESS = pg_config("--pkglibdir") / "pgxs" / "src" / "test" / "regress" / "pg_regress"
RUN_AS = "postgres"

TEMP_CONFIG = """
shared_preload_libraries = 'twotier'
twotier.redis_url = ''
twotier.l1_size_mb = 8
fsync = off
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--update", action="store_true", help="copy results over expected files")
    ap.add_argument("--port", type=int, help="run against a server already running on 127.0.0.1:PORT (as the"
                    " upgrade test does) instead of a temporary instance; it must be set up as TEMP_CONFIG says")
    ap.add_argument("tests", nargs="*", help="test names (default: every tests/pg_regress/sql/*.sql)")
    args = ap.parse_args()

    tests = args.tests or sorted(p.stem for p in (SUITE / "sql").glob("*.sql"))
    if not tests:
        print("regress: no tests in tests/pg_regress/sql", file=sys.stderr)
        return 1
    user = pwd.getpwnam(RUN_AS)
    work = Path(tempfile.mkdtemp(prefix="twotier-regress-"))
    try:
        shutil.copytree(SUITE / "sql", work / "sql")
        shutil.copytree(SUITE / "expected", work / "expected")
        for t in tests:
            # pg_regress stops the whole run when an expected file is missing.
            (work / "expected" / f"{t}.out").touch()
        (work / "temp.conf").write_text(TEMP_CONFIG)
        for dirpath, dirnames, filenames in os.walk(work):
            for name in [dirpath] + [os.path.join(dirpath, f) for f in dirnames + filenames]:
                os.chown(name, user.pw_uid, user.pw_gid)
        cmd = [
            "runuser", "-u", RUN_AS, "--",
            str(PG_REGRESS),
            f"--bindir={BINDIR}",
            f"--inputdir={work}",
            f"--outputdir={work}",
            *([f"--temp-instance={work / 'instance'}", f"--temp-config={work / 'temp.conf'}",
               f"--port={free_port()}"] if args.port is None else
              ["--use-existing", "--host=127.0.0.1", f"--port={args.port}", "--user=postgres"]),
            "--dbname=twotier_regress",
            *tests,
        ]
        proc = subprocess.run(cmd, cwd=work, text=True, capture_output=True)
        print(proc.stdout, end="")
        if args.update:
            for t in tests:
                out = work / "results" / f"{t}.out"
                if out.exists():
                    shutil.copy(out, SUITE / "expected" / f"{t}.out")
            print(f"regress: expected files updated for {len(tests)} test(s); review `git diff tests/pg_regress`")
            return 0
        if proc.returncode != 0:
            diffs = work / "regression.diffs"
            if diffs.exists():
                print(diffs.read_text()[:20000])
            print(proc.stderr, file=sys.stderr)
            return proc.returncode
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
