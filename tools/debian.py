"""The Debian package of twotier (`./run package --deb <major>`, through tools/package.py).

Laid out as Debian's own PostgreSQL extension packages are (postgresql-15-pgvector and
the like): the library in /usr/lib/postgresql/<major>/lib, the control file and the SQL
scripts in /usr/share/postgresql/<major>/extension, the copyright and a Debian changelog in
/usr/share/doc/<package>, and Depends on postgresql-<major> plus what dpkg-shlibdeps finds the
library needs. Built with dpkg-deb from a staged tree (no debian/ source package: the build
is cargo pgrx's), checked with lintian.
"""
import gzip
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import package

ROOT = package.ROOT
OUT = package.OUT
MAINTAINER = "twotier developers <twotier@users.noreply.github.com>"
HOMEPAGE = "https://github.com/twotier/twotier"
# Debian revision of the packaging itself: a new one only when the packaging changes.
REVISION = "1"

CONTROL = """Package: {package}
Source: twotier
Version: {version}
Architecture: {arch}
Maintainer: {maintainer}
Installed-Size: {size_kb}
Depends: postgresql-{major}, {shlibs}
Section: database
Priority: optional
Homepage: {homepage}
Description: cached SQL functions for PostgreSQL {major}
 twotier gives applications cached SQL functions: SELECT cached_<name>(key)
 answers from shared memory (L1) or Redis (L2) and runs the real query only
 on a miss. Triggers on the source tables invalidate entries when the
 writing transaction commits.
 .
 This package contains the extension for PostgreSQL {major}. Add twotier to
 shared_preload_libraries, set twotier.redis_url, restart PostgreSQL and run
 CREATE EXTENSION twotier in each database that uses it.
"""

CHANGELOG = """twotier ({version}) unstable; urgency=medium

  * Upstream release {upstream}: see CHANGELOG.md in the source repository.

 -- {maintainer}  {date}
"""


def arch() -> str:
    return subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                          check=True).stdout.strip() or platform.machine()


def shlibs(lib: Path) -> str:
    """What dpkg-shlibdeps says the library needs (libc6, libgcc-s1...). The symbols it takes
    from the postgres binary itself have no shared-library dependency to record."""
    work = Path(tempfile.mkdtemp(prefix="twotier-shlibs-"))
    try:
        (work / "debian").mkdir()
        (work / "debian" / "control").write_text("Source: twotier\n\nPackage: twotier\nArchitecture: any\n")
        r = subprocess.run(["dpkg-shlibdeps", "-O", "--warnings=0", str(lib)], cwd=work,
                           capture_output=True, text=True, check=True)
        for line in r.stdout.splitlines():
            if line.startswith("shlibs:Depends="):
                return line.split("=", 1)[1]
        raise SystemExit(f"package: dpkg-shlibdeps printed no dependencies: {r.stdout} {r.stderr}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def source_date() -> int:
    """The last commit's time: the same tree builds the same package."""
    r = subprocess.run(["git", "log", "-1", "--format=%ct"], cwd=ROOT, capture_output=True, text=True)
    return int(r.stdout.strip() or time.time())


def build(major: str) -> Path:
    upstream = package.version()
    version = f"{upstream}-{REVISION}"
    name = f"postgresql-{major}-twotier"
    stage, lib, ext = package.compile_for(major)
    tree = OUT / f"deb-{name}"
    shutil.rmtree(tree, ignore_errors=True)
    libdir = tree / f"usr/lib/postgresql/{major}/lib"
    extdir = tree / f"usr/share/postgresql/{major}/extension"
    docdir = tree / f"usr/share/doc/{name}"
    for d in (libdir, extdir, docdir, tree / "DEBIAN"):
        d.mkdir(parents=True)
    # A shared object is not executable in a Debian package (0644), and is stripped: the
    # debug symbols are pgrx's business at build time, not the server's.
    shutil.copy(lib, libdir / "twotier.so")
    subprocess.run(["strip", "--strip-unneeded", "--remove-section=.comment", "--remove-section=.note",
                    str(libdir / "twotier.so")], check=True)
    scripts = [*ext.glob("twotier*"), *(ROOT / "sql" / "released").glob("twotier--*.sql")]
    for f in scripts:
        shutil.copy(f, extdir / f.name)
    shutil.copy(ROOT / "LICENSE", docdir / "copyright")
    date = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime(source_date()))
    changelog = CHANGELOG.format(version=version, upstream=upstream, maintainer=MAINTAINER, date=date)
    with open(docdir / "changelog.Debian.gz", "wb") as raw:
        # mtime 0 and no file name: the same changelog compresses to the same bytes.
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as gz:
            gz.write(changelog.encode())
    for path in tree.rglob("*"):
        if path.is_dir():
            os.chmod(path, 0o755)
        else:
            os.chmod(path, 0o644)
    sums = []
    size = 0
    for path in sorted(p for p in tree.rglob("*") if p.is_file() and "DEBIAN" not in p.parts):
        size += path.stat().st_size
        sums.append(f"{hashlib.md5(path.read_bytes()).hexdigest()}  {path.relative_to(tree)}")
    (tree / "DEBIAN" / "md5sums").write_text("\n".join(sums) + "\n")
    (tree / "DEBIAN" / "control").write_text(CONTROL.format(
        package=name, version=version, arch=arch(), maintainer=MAINTAINER, size_kb=(size + 1023) // 1024,
        major=major, shlibs=shlibs(libdir / "twotier.so"), homepage=HOMEPAGE))
    for f in (tree / "DEBIAN").iterdir():
        os.chmod(f, 0o644)
    deb = OUT / f"{name}_{version}_{arch()}.deb"
    env = dict(os.environ, SOURCE_DATE_EPOCH=str(source_date()))
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zxz", "--build", str(tree), str(deb)],
                   check=True, capture_output=True, env=env)
    shutil.rmtree(stage, ignore_errors=True)
    shutil.rmtree(tree, ignore_errors=True)
    return deb


# What lintian reports for this package and why it stays (docs/release.md repeats these).
LINTIAN_EXPLAINED = {
    # The only tag lintian (Debian 12) reports for this package. Not in Debian's archive, so no
    # bug of Debian's is closed by its changelog entry. A new tag fails the build until it is
    # fixed or explained here and in docs/release.md.
    "initial-upload-closes-no-bugs": "not uploaded to Debian",
}


def lintian(deb: Path) -> list[str]:
    """Runs lintian; an error is a failure, every other tag must be one explained above."""
    if not shutil.which("lintian"):
        raise SystemExit("package: lintian is not installed (./run setup installs it)")
    r = subprocess.run(["lintian", "--no-tag-display-limit", str(deb)], capture_output=True, text=True)
    tags = [ln for ln in r.stdout.splitlines() if ln[:2] in ("E:", "W:", "I:", "X:")]
    unexplained = []
    for t in tags:
        tag = t.split(": ", 2)[-1].split()[0] if ": " in t else t
        why = LINTIAN_EXPLAINED.get(tag)
        print(f"  lintian {t}" + (f"  ({why})" if why else ""))
        if why is None or t.startswith("E:"):
            unexplained.append(t)
    if unexplained:
        raise SystemExit("package: lintian tags with no explanation in tools/debian.py:\n  " + "\n  ".join(unexplained))
    print(f"package: lintian: {len(tags)} tag(s), each explained" if tags else "package: lintian: clean")
    return tags


def test(deb: Path) -> int:
    """apt-get install of the package on this machine's PostgreSQL 15, a cached call against a
    real Redis in a throwaway cluster, an extension created at the previous release updated,
    then apt-get remove and nothing of the package left.

    `./run install` puts a development build into the same directories; it is moved aside
    first (so that "nothing left" means something) and put back at the end."""
    name = deb.name.split("_")[0]
    major = name.split("-")[1]
    libdir = Path(f"/usr/lib/postgresql/{major}/lib")
    extdir = Path(f"/usr/share/postgresql/{major}/extension")
    if subprocess.run(["dpkg-query", "-W", name], capture_output=True).returncode == 0:
        raise SystemExit(f"package: {name} is installed on this machine already; remove it first")
    aside = Path(tempfile.mkdtemp(prefix="twotier-dev-build-"))
    moved = []
    for f in [*libdir.glob("twotier*"), *extdir.glob("twotier*")]:
        dest = aside / f.parent.name / f.name
        dest.parent.mkdir(exist_ok=True)
        shutil.move(f, dest)
        moved.append((dest, f))
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        r = subprocess.run(["apt-get", "install", "-y", str(deb.resolve())], env=env,
                           capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stdout, r.stderr, file=sys.stderr)
            return 1
        listed = subprocess.run(["dpkg-query", "-L", name], capture_output=True, text=True, check=True).stdout.split()
        files = [Path(p) for p in listed if Path(p).is_file()]
        assert libdir / "twotier.so" in files and extdir / "twotier.control" in files, files
        print(f"package: apt-get installed {deb.name} ({len(files)} files)")
        use(major)
        r = subprocess.run(["apt-get", "remove", "-y", "--purge", name], env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        status = subprocess.run(["dpkg-query", "-W", "-f=${Status}", name], capture_output=True, text=True).stdout
        left = [str(f) for f in files if f.exists()] + [str(f) for f in [*libdir.glob("twotier*"), *extdir.glob("twotier*")]]
        assert "installed" not in status.replace("not-installed", ""), status
        assert not left, f"left behind after removal: {left}"
        print(f"package: apt-get remove --purge {name}: none of its {len(files)} files is left")
        return 0
    finally:
        if subprocess.run(["dpkg-query", "-W", "-f=${Status}", name], capture_output=True, text=True).stdout.startswith("install ok"):
            subprocess.run(["apt-get", "remove", "-y", "--purge", name], env=env, capture_output=True)
        for dest, original in moved:
            shutil.move(dest, original)
        shutil.rmtree(aside, ignore_errors=True)


def use(major: str) -> None:
    """The installed package at work: a new extension, and one created at the previous
    release and updated (the upgrade a DBA runs after installing the new package)."""
    sys.path.insert(0, str(ROOT / "tools"))
    os.environ["TWOTIER_PG_CONFIG"] = f"/usr/lib/postgresql/{major}/bin/pg_config"
    from servers import PgCluster, RedisServer  # noqa: E402  (reads TWOTIER_PG_CONFIG)

    previous = sorted(p.name.removeprefix("twotier--").removesuffix(".sql")
                      for p in (ROOT / "sql" / "released").glob("twotier--*.sql"))[-1]
    current = package.version()
    redis = RedisServer().start()
    cluster = PgCluster(name="deb", settings={"twotier.redis_url": redis.url}).start()
    try:
        with cluster.connect() as c:
            c.execute("CREATE DATABASE upgraded")
            c.execute("CREATE EXTENSION twotier")
            key = package.probe_cache(c, "from the deb")
            for _ in range(2):
                assert c.execute("SELECT cached_t(%s)->>'v'", (key,)).fetchone()[0] == "from the deb"
            c.execute("UPDATE t SET v = 'changed' WHERE id = %s", (key,))
            assert c.execute("SELECT cached_t(%s)->>'v'", (key,)).fetchone()[0] == "changed"
            hits = c.execute("SELECT l1_hits FROM twotier.stats WHERE cache = 't'").fetchone()[0]
            reachable = c.execute("SELECT twotier.status()->'l2'->>'reachable'").fetchone()[0]
            assert hits >= 1 and reachable == "true", (hits, reachable)
        with cluster.connect(dbname="upgraded") as c:
            c.execute("CREATE EXTENSION twotier VERSION %s" % quote(previous))
            c.execute("ALTER EXTENSION twotier UPDATE")
            ver = c.execute("SELECT extversion FROM pg_extension WHERE extname = 'twotier'").fetchone()[0]
            assert ver == current, (ver, current)
            c.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
            c.execute("INSERT INTO t VALUES (1, 'upgraded')")
            c.execute("""SELECT twotier.define('t', $q$SELECT jsonb_build_object('v', v) FROM t WHERE id = $1$q$,
                                              '1 min', ARRAY['t(id)'])""")
            assert c.execute("SELECT cached_t(1)->>'v'").fetchone()[0] == "upgraded"
        print(f"package: CREATE EXTENSION twotier {current}, cached calls and an invalidation work; an extension"
              f" created at {previous} updates to {current} and caches")
    finally:
        cluster.destroy()
        redis.destroy()


def quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
