"""Migrations never leave old-shaped values in the cache (issue 20). Each DDL that can change
what a cache's query returns moves the cache to a new version when it commits; PostgreSQL's
own pg_depend says what the query depends on (a SQL-standard function holding the query,
twotier.dependencies, read from a SQL-standard function holding the query). Each form is
checked with L1 on and off, and on a streaming standby.
"""
import psycopg
import pytest

from conftest import twotier_settings, wait_for
from test_security import login, role


def fresh(pg, sql, l1=True, dbname="postgres"):
    with pg.connect(dbname) as c:
        if not l1:
            c.execute("SET twotier.l1_enabled = off")
        return c.execute(sql).fetchone()[0]


def served_twice(pg, sql):
    """What a caller is served, twice (the second from a tier), with L1 on and off."""
    return [fresh(pg, sql, l1) for l1 in (True, True, False, False)]


# Each case: setup SQL, the cache's define arguments, the migration, the call, and what every
# caller must be served after the migration.
CASES = {
    "rename_column": (
        "CREATE TABLE m_rc(id int PRIMARY KEY, v int); INSERT INTO m_rc VALUES (1, 1)",
        # Not watched: only the recorded dependencies can see the rename.
        "'m_rc', 'SELECT to_jsonb(t) FROM m_rc t WHERE id = $1::int', '5 min', '{}'",
        "ALTER TABLE m_rc RENAME COLUMN v TO w",
        "SELECT cached_m_rc(1)",
        {"id": 1, "w": 1},
    ),
    "alter_column_type": (
        "CREATE TABLE m_ty(id int PRIMARY KEY, v int); INSERT INTO m_ty VALUES (1, 1)",
        "'m_ty', 'SELECT jsonb_build_object(''v'', v) FROM m_ty WHERE id = $1::int', '5 min', '{}'",
        "ALTER TABLE m_ty ALTER COLUMN v TYPE text USING 'v' || (v + 1000)",
        "SELECT cached_m_ty(1)",
        {"v": "v1001"},
    ),
    "enum_rename_value": (
        "CREATE TYPE m_mood AS ENUM ('happy', 'sad'); CREATE TABLE m_en(id int PRIMARY KEY, mood m_mood);"
        "INSERT INTO m_en VALUES (1, 'happy')",
        "'m_en', 'SELECT jsonb_build_object(''mood'', mood) FROM m_en WHERE id = $1::int', '5 min', ARRAY['m_en(id)']",
        "ALTER TYPE m_mood RENAME VALUE 'happy' TO 'glad'",
        "SELECT cached_m_en(1)",
        {"mood": "glad"},
    ),
    "replace_view": (
        "CREATE TABLE m_vt(id int PRIMARY KEY, v int); INSERT INTO m_vt VALUES (1, 10);"
        "CREATE VIEW m_v AS SELECT id, v FROM m_vt",
        "'m_v', 'SELECT jsonb_build_object(''v'', v) FROM m_v WHERE id = $1::int', '5 min', ARRAY['m_vt(id)']",
        "CREATE OR REPLACE VIEW m_v AS SELECT id, v * 2 AS v FROM m_vt",
        "SELECT cached_m_v(1)",
        {"v": 20},
    ),
    "replace_function": (
        "CREATE TABLE m_ft(id int PRIMARY KEY, v int); INSERT INTO m_ft VALUES (1, 10);"
        "CREATE FUNCTION m_price(int) RETURNS int LANGUAGE sql IMMUTABLE RETURN $1 + 1",
        "'m_f', 'SELECT jsonb_build_object(''p'', m_price(v)) FROM m_ft WHERE id = $1::int', '5 min', ARRAY['m_ft(id)']",
        "CREATE OR REPLACE FUNCTION m_price(int) RETURNS int LANGUAGE sql IMMUTABLE RETURN $1 + 100",
        "SELECT cached_m_f(1)",
        {"p": 110},
    ),
    "rename_attribute": (
        "CREATE TYPE m_pair AS (a int, b int); CREATE TABLE m_at(id int PRIMARY KEY, p m_pair);"
        "INSERT INTO m_at VALUES (1, ROW(1, 2))",
        "'m_at', 'SELECT to_jsonb(p) FROM m_at WHERE id = $1::int', '5 min', ARRAY['m_at(id)']",
        "ALTER TYPE m_pair RENAME ATTRIBUTE a TO x",
        "SELECT cached_m_at(1)",
        {"x": 1, "b": 2},
    ),
    "domain_constraint": (
        "CREATE DOMAIN m_pos AS int CHECK (VALUE > 0); CREATE TABLE m_dt(id int PRIMARY KEY, v m_pos);"
        "INSERT INTO m_dt VALUES (1, 5)",
        "'m_dt', 'SELECT jsonb_build_object(''ok'', (v::int)::m_pos IS NOT NULL) FROM m_dt WHERE id = $1::int', "
        "'5 min', ARRAY['m_dt(id)']",
        "ALTER DOMAIN m_pos DROP CONSTRAINT m_pos_check",
        "SELECT cached_m_dt(1)",
        {"ok": True},
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_migration_moves_the_cache_to_a_new_version(cluster, case):
    setup, define, migration, call, expected = CASES[case]
    with cluster.connect() as c:
        c.execute(setup)
        c.execute(f"SELECT twotier.define({define})")
        (v0,), = c.execute("SELECT version FROM twotier.caches WHERE name = %s",
                           (define.split("'")[1],)).fetchall()
    before = served_twice(cluster, call)
    assert len({str(b) for b in before}) == 1
    cluster.sql(migration)
    (v1,), = cluster.sql("SELECT version FROM twotier.caches WHERE name = %s", define.split("'")[1])
    assert v1 > v0, f"{case}: the migration did not move the cache to a new version"
    assert served_twice(cluster, call) == [expected] * 4, case


def test_unrelated_ddl_does_not_flush(cluster):
    cluster.sql("CREATE TABLE m_keep(id int PRIMARY KEY, v int); INSERT INTO m_keep VALUES (1, 1)")
    cluster.sql("""SELECT twotier.define('m_keep', 'SELECT to_jsonb(t) FROM m_keep t WHERE id = $1::int',
                   '5 min', ARRAY['m_keep(id)'])""")
    (v0,), = cluster.sql("SELECT version FROM twotier.caches WHERE name = 'm_keep'")[0:1]
    cluster.sql("CREATE TABLE m_other(id int)")
    cluster.sql("ALTER TABLE m_other ADD COLUMN w int")
    cluster.sql("CREATE INDEX ON m_keep (v)")
    (v1,), = cluster.sql("SELECT version FROM twotier.caches WHERE name = 'm_keep'")[0:1]
    assert v0 == v1


def test_a_migration_with_data_changes_in_one_transaction_leaves_nothing_old(cluster):
    cluster.sql("CREATE TABLE m_tx(id int PRIMARY KEY, v int); INSERT INTO m_tx SELECT g, g FROM generate_series(1, 5) g")
    cluster.sql("""SELECT twotier.define('m_tx', 'SELECT to_jsonb(t) FROM m_tx t WHERE id = $1::int',
                   '5 min', ARRAY['m_tx(id)'])""")
    for k in range(1, 6):
        served_twice(cluster, f"SELECT cached_m_tx({k})")
    with cluster.connect(autocommit=False) as c:
        c.execute("ALTER TABLE m_tx RENAME COLUMN v TO amount")
        c.execute("UPDATE m_tx SET amount = amount * 10 WHERE id <= 2")
        c.execute("ALTER TABLE m_tx ADD COLUMN note text DEFAULT 'n'")
        c.commit()
    for k in range(1, 6):
        want = {"id": k, "amount": k * 10 if k <= 2 else k, "note": "n"}
        assert served_twice(cluster, f"SELECT cached_m_tx({k})") == [want] * 4


def test_a_dropped_dependency_flushes_the_cache_and_it_recovers_when_the_query_parses_again(cluster):
    """DROP is not refused (nothing of twotier's holds the objects): the cache is flushed, its
    calls raise the source query's own ERROR, and once a later migration makes the query valid
    again it caches again, without being defined again."""
    cluster.sql("CREATE TABLE m_dr(id int PRIMARY KEY, v int); INSERT INTO m_dr VALUES (1, 1)")
    cluster.sql("""SELECT twotier.define('m_dr', 'SELECT jsonb_build_object(''v'', v) FROM m_dr WHERE id = $1::int',
                   '5 min', '{}')""")
    assert served_twice(cluster, "SELECT cached_m_dr(1)") == [{"v": 1}] * 4
    cluster.sql("ALTER TABLE m_dr DROP COLUMN v")
    assert cluster.sql("SELECT count(*) FROM twotier.dependencies WHERE cache = 'm_dr'") == [(0,)]
    for l1 in (True, False):
        with pytest.raises(psycopg.errors.UndefinedColumn):
            fresh(cluster, "SELECT cached_m_dr(1)", l1)
    cluster.sql("ALTER TABLE m_dr ADD COLUMN v int DEFAULT 7")
    assert cluster.sql("SELECT count(*) > 0 FROM twotier.dependencies WHERE cache = 'm_dr'") == [(True,)]
    assert served_twice(cluster, "SELECT cached_m_dr(1)") == [{"v": 7}] * 4
    # A view dropped and created again (a new OID) is followed too.
    cluster.sql("CREATE VIEW m_drv AS SELECT id, v FROM m_dr")
    cluster.sql("""SELECT twotier.define('m_drv', 'SELECT jsonb_build_object(''v'', v) FROM m_drv WHERE id = $1::int',
                   '5 min', '{}')""")
    assert served_twice(cluster, "SELECT cached_m_drv(1)") == [{"v": 7}] * 4
    with cluster.connect(autocommit=False) as c:
        c.execute("DROP VIEW m_drv")
        c.execute("CREATE VIEW m_drv AS SELECT id, v + 1 AS v FROM m_dr")
        c.commit()
    assert served_twice(cluster, "SELECT cached_m_drv(1)") == [{"v": 8}] * 4
    cluster.sql("CREATE OR REPLACE VIEW m_drv AS SELECT id, v + 2 AS v FROM m_dr")
    assert served_twice(cluster, "SELECT cached_m_drv(1)") == [{"v": 9}] * 4
    cluster.sql("SELECT twotier.drop('m_drv')")
    cluster.sql("SELECT twotier.drop('m_dr')")
    assert cluster.sql("SELECT count(*) FROM twotier.dependencies WHERE cache IN ('m_dr', 'm_drv')") == [(0,)]


def test_the_defining_exception_cannot_be_forged(cluster):
    """0.2.0 skipped the flush when a session had set twotier_internal.defining = on."""
    role(cluster, "m_forger")
    cluster.sql("CREATE TABLE m_fg(id int PRIMARY KEY, v int); INSERT INTO m_fg VALUES (1, 1)")
    cluster.sql("ALTER TABLE m_fg OWNER TO m_forger")
    cluster.sql("""SELECT twotier.define('m_fg', 'SELECT jsonb_build_object(''v'', v) FROM m_fg WHERE id = $1::int',
                   '5 min', ARRAY['m_fg(id)'])""")
    assert served_twice(cluster, "SELECT cached_m_fg(1)") == [{"v": 1}] * 4
    with login(cluster, "m_forger") as c:
        c.execute("SET twotier_internal.defining = 'on'")
        c.execute("SELECT set_config('twotier_internal.defining', 'on', false)")
        c.execute("ALTER TABLE m_fg ALTER COLUMN v TYPE bigint USING v + 1000")
    assert served_twice(cluster, "SELECT cached_m_fg(1)") == [{"v": 1001}] * 4


def test_a_migration_reaches_a_streaming_standby(request, redis_server):
    from servers import PgCluster

    primary = PgCluster(settings={**twotier_settings(redis_server.url), "wal_level": "replica"},
                        name="mig-primary").start()
    request.addfinalizer(primary.destroy)
    primary.sql("CREATE EXTENSION twotier")
    primary.sql("CREATE TABLE m_sb(id int PRIMARY KEY, v int); INSERT INTO m_sb VALUES (1, 1)")
    primary.sql("""SELECT twotier.define('m_sb', 'SELECT to_jsonb(t) FROM m_sb t WHERE id = $1::int',
                   '5 min', ARRAY['m_sb(id)'])""")
    standby = primary.replica("mig-standby")
    request.addfinalizer(standby.destroy)
    standby.start()
    assert wait_for(lambda: standby.sql("SELECT count(*) FROM m_sb") == [(1,)], timeout=20)
    assert wait_for(lambda: fresh(standby, "SELECT cached_m_sb(1)") == {"id": 1, "v": 1}, timeout=20)
    served_twice(primary, "SELECT cached_m_sb(1)")
    served_twice(standby, "SELECT cached_m_sb(1)")
    primary.sql("ALTER TABLE m_sb RENAME COLUMN v TO w")
    # Replayed once the standby's catalog has the new column (a replayed ALTER may wait for
    # the standby's own queries, up to max_standby_streaming_delay).
    assert wait_for(lambda: standby.sql("SELECT count(*) FROM pg_attribute WHERE attrelid = 'm_sb'::regclass "
                                        "AND attname = 'w'") == [(1,)], timeout=60)
    assert served_twice(standby, "SELECT cached_m_sb(1)") == [{"id": 1, "w": 1}] * 4
    assert served_twice(primary, "SELECT cached_m_sb(1)") == [{"id": 1, "w": 1}] * 4
