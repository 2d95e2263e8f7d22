#!/usr/bin/env python3
"""The upgrade test: a server running the previous release, with caches in use, moves to this
build and `ALTER EXTENSION twotier UPDATE`.

1. The previous release is built from git history (its commit below; cached under
   target/upgrade/, so only the first run pays the build) and its library is put in a
   directory of its own, which the test server reads first (`dynamic_library_path`): the
   system's library stays this build's.
2. A cluster and a Redis start with that library; `CREATE EXTENSION twotier VERSION '<old>'`;
   caches are defined as the old release defines them, granted to a reader role, filled in L1
   and L2. One row is then changed with the triggers disabled, so that the old entries are
   stale on purpose.
3. The server restarts on this build's library; `ALTER EXTENSION twotier UPDATE`.
4. Checked: the version; every cache still defined, with its function, owner and GRANTs (the
   reader calls it); no entry of before the upgrade is served (the stale one included); a
   write invalidates at commit, with Redis up and with L1 on and off; stats count; drop works.
5. The pg_regress suite runs against the upgraded server.
"""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

from servers import PgCluster, RedisServer  # noqa: E402

PREVIOUS = {"version": "0.1.0", "commit": "1c0398b"}
PG_CONFIG = "/usr/lib/postgresql/15/bin/pg_config"
WORK = ROOT / "target" / "upgrade" / PREVIOUS["version"]
LIBDIR = Path(f"/tmp/twotier-upgrade-{PREVIOUS['version']}")


def say(msg):
    print(f"upgrade: {msg}", flush=True)


def build_previous() -> Path:
    """The previous release's library, built from git history once."""
    pkg = WORK / "pkg"
    lib = next(pkg.glob("**/lib/postgresql/15/lib/twotier.so"), None) if pkg.exists() else None
    if lib is None:
        src = WORK / "src"
        shutil.rmtree(src, ignore_errors=True)
        src.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", PREVIOUS["commit"]], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
        say(f"building {PREVIOUS['version']} ({PREVIOUS['commit']}) from git history (once; a few minutes)")
        log = WORK / "build.log"
        with open(log, "w") as out:
            r = subprocess.run(["cargo", "pgrx", "package", "--pg-config", PG_CONFIG, "--out-dir", str(pkg)],
                               cwd=src, stdout=out, stderr=subprocess.STDOUT,
                               env=dict(os.environ, CARGO_TARGET_DIR=str(WORK / "target")))
        if r.returncode != 0:
            raise SystemExit(f"upgrade: building {PREVIOUS['version']} failed; see {log}")
        lib = next(pkg.glob("**/lib/postgresql/15/lib/twotier.so"))
    script = next(pkg.glob(f"**/extension/twotier--{PREVIOUS['version']}.sql"))
    released = ROOT / "sql" / "released" / script.name
    if script.read_bytes() != released.read_bytes():
        raise SystemExit(f"upgrade: the install script built from {PREVIOUS['commit']} differs from {released}")
    LIBDIR.mkdir(exist_ok=True)
    shutil.copy(lib, LIBDIR / "twotier.so")
    os.chmod(LIBDIR, 0o755)
    os.chmod(LIBDIR / "twotier.so", 0o755)
    return LIBDIR


def one(c, q, *args):
    return c.execute(q, args or None).fetchone()[0]


def main() -> int:
    libdir = build_previous()
    redis = RedisServer().start()
    pg = PgCluster(name="upgrade", settings={
        "twotier.redis_url": redis.url,
        "dynamic_library_path": f"{libdir}:$libdir",
    })
    pg.start()
    try:
        old = PREVIOUS["version"]
        with pg.connect() as c:
            c.execute(f"CREATE EXTENSION twotier VERSION '{old}'")
            assert one(c, "SELECT extversion FROM pg_extension WHERE extname = 'twotier'") == old
            c.execute("CREATE TABLE items (id int PRIMARY KEY, name text, ver int NOT NULL DEFAULT 0)")
            c.execute("INSERT INTO items SELECT g, 'item ' || g, 0 FROM generate_series(1, 20) g")
            c.execute("CREATE TABLE tags (item_id int, tag text)")
            c.execute("INSERT INTO tags VALUES (1, 'a'), (2, 'b')")
            c.execute("""SELECT twotier.define('item', $q$SELECT jsonb_build_object('name', i.name, 'ver', i.ver,
                             'tags', (SELECT jsonb_agg(tag ORDER BY tag) FROM tags t WHERE t.item_id = i.id))
                             FROM items i WHERE i.id = $1::int$q$, interval '5 minutes',
                             ARRAY['items(id)', 'tags(item_id)'])""")
            c.execute("""SELECT twotier.define('by_name', $q$SELECT jsonb_build_object('id', id, 'ver', ver)
                             FROM items WHERE name = $1$q$, interval '5 minutes', ARRAY['items(name)'])""")
            c.execute("DROP ROLE IF EXISTS upgrade_reader")
            c.execute("CREATE ROLE upgrade_reader LOGIN")
            c.execute("GRANT EXECUTE ON FUNCTION cached_item(text) TO upgrade_reader")
            for k in range(1, 6):
                c.execute("SELECT cached_item(%s)", (str(k),))
                c.execute("SELECT cached_by_name(%s)", (f"item {k}",))
            assert one(c, "SELECT cached_item('1')->>'ver'") == "0"
            # Stale on purpose: the old release's entries for key 1 now disagree with the table.
            c.execute("ALTER TABLE items DISABLE TRIGGER USER")
            c.execute("UPDATE items SET ver = 7 WHERE id = 1")
            c.execute("ALTER TABLE items ENABLE TRIGGER USER")
            assert one(c, "SELECT cached_item('1')->>'ver'") == "0", "the old entry is served before the upgrade"
        keys_before = len(list(redis.client().scan_iter(match="twotier:*")))
        say(f"{old}: 2 caches defined and filled ({keys_before} keys in Redis), one entry made stale")

        pg.set({"dynamic_library_path": "$libdir"})
        pg.restart()
        with pg.connect() as c:
            c.execute("ALTER EXTENSION twotier UPDATE")
            new = one(c, "SELECT extversion FROM pg_extension WHERE extname = 'twotier'")
            assert new != old, new
            say(f"ALTER EXTENSION twotier UPDATE: {old} -> {new}")
            rows = c.execute("SELECT name, key_types::text, function::text, owner::text FROM twotier.caches ORDER BY name").fetchall()
            assert rows == [("by_name", "{text}", "cached_by_name(text)", "postgres"),
                            ("item", "{text}", "cached_item(text)", "postgres")], rows
            acl = one(c, "SELECT proacl::text FROM pg_proc WHERE oid = 'cached_item(text)'::regprocedure")
            assert "upgrade_reader=X" in acl, acl
            # No extension member left behind but the extension's own: the cached functions stay
            # the user's (pg_dump dumps them), depending on the extension.
            members = one(c, """SELECT count(*) FROM pg_depend d JOIN pg_proc p ON p.oid = d.objid
                                 WHERE d.classid = 'pg_proc'::regclass AND d.deptype = 'e'
                                   AND d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'twotier')
                                   AND p.proname LIKE 'cached\\_%'""")
            assert members == 0, members
            triggers = [r[0] for r in c.execute("SELECT tgname FROM pg_trigger WHERE tgname LIKE 'twotier\\_%' ORDER BY 1")]
            assert not any(t.endswith(("_ins", "_upd", "_del")) for t in triggers), triggers
            assert one(c, "SELECT count(*) FROM pg_proc WHERE proname LIKE '\\_inv\\_%'") == 0
        for l1 in ("on", "off"):
            with pg.connect() as c:
                c.execute(f"SET twotier.l1_enabled = {l1}")
                assert one(c, "SELECT cached_item('1')->>'ver'") == "7", "an entry of before the upgrade was served"
                assert one(c, "SELECT cached_item('1')->>'ver'") == "7"
        with pg.connect(user="upgrade_reader") as r:
            assert one(r, "SELECT cached_item('2')->>'name'") == "item 2"
            assert one(r, "SELECT count(*) FROM cached_item_many(ARRAY['2', '3'])") == 2
        with pg.connect() as c:
            c.execute("SELECT cached_item('3'), cached_by_name('item 3')")
            c.execute("UPDATE items SET ver = ver + 1, name = 'renamed' WHERE id = 3")
            c.execute("INSERT INTO tags VALUES (2, 'c')")
        for l1 in ("on", "off"):
            with pg.connect() as c:
                c.execute(f"SET twotier.l1_enabled = {l1}")
                assert one(c, "SELECT cached_item('3')->>'ver'") == "1"
                assert one(c, "SELECT cached_by_name('item 3')") is None
                assert one(c, "SELECT cached_by_name('renamed')->>'ver'") == "1"
                assert one(c, "SELECT cached_item('2')->'tags'") == ["b", "c"]
        with pg.connect() as c:
            st = dict(c.execute("SELECT cache, calls FROM twotier.stats").fetchall())
            assert st.get("item", 0) > 0, st
            assert one(c, "SELECT twotier.status()->'l2'->>'reachable'") == "true"
            c.execute("SELECT twotier.drop('by_name')")
            assert one(c, "SELECT to_regproc('cached_by_name')") is None
        say("caches, grants, triggers, stats and drop work; no entry of before the upgrade was served")

        # The suite expects the server it runs on to be set up as its temporary instance is
        # (no Redis, 8 MB of L1): the upgraded server, restarted so.
        pg.set({"twotier.redis_url": "", "twotier.l1_size_mb": 8})
        pg.restart()
        # pg_regress --use-existing uses the database as it finds it: made here as pg_regress
        # makes its own.
        pg.sql("CREATE DATABASE twotier_regress TEMPLATE template0")
        for setting, value in (("lc_messages", "C"), ("lc_monetary", "C"), ("lc_numeric", "C"),
                               ("lc_time", "C"), ("bytea_output", "hex"), ("timezone_abbreviations", "Default")):
            pg.sql(f"ALTER DATABASE twotier_regress SET {setting} TO '{value}'")
        say("pg_regress against the upgraded server")
        r = subprocess.run([sys.executable, str(ROOT / "tools" / "regress.py"), "--port", str(pg.port)])
        if r.returncode != 0:
            return r.returncode
        say("passed")
        return 0
    finally:
        pg.destroy()
        redis.destroy()


if __name__ == "__main__":
    sys.exit(main())
