"""Bad input gets a clear ERROR with a deliberate SQLSTATE (never XX000, internal_error) and
changes nothing: the catalog, the functions and the triggers are as they were."""
import psycopg
import pytest

from conftest import simple_cache

DEFINE = "SELECT twotier.define({name}, {query}, {ttl}, {watch})"


def define(name="'bad_x'", query="$q$SELECT jsonb_build_object('v', v) FROM bad_src WHERE k = $1::int$q$",
           ttl="'5 min'", watch="ARRAY['bad_src(k)']", extra=""):
    return DEFINE.format(name=name, query=query, ttl=ttl, watch=watch)[:-1] + extra + ")"


# (what, statement, expected SQLSTATE)
CASES = [
    ("query that does not parse", define(query="'SELEC 1'"), "42601"),
    ("query that does not use $1", define(query="$q$SELECT jsonb_build_object('v', 1)$q$"), "22023"),
    ("query of the wrong shape", define(query="$q$SELECT v FROM bad_src WHERE k = $1::int$q$"), "42804"),
    ("two statements", define(query="$q$SELECT '{}'::jsonb WHERE $1 = 'a'; SELECT '{}'::jsonb$q$"), "42804"),
    ("not a SELECT", define(query="$q$DELETE FROM bad_src WHERE k = $1::int$q$"), "42804"),
    ("missing table in watch", define(watch="ARRAY['no_such_table(k)']"), "42P01"),
    ("missing column in watch", define(watch="ARRAY['bad_src(no_such_column)']"), "42703"),
    ("malformed watch entry", define(watch="ARRAY['bad_src']"), "22023"),
    ("watch expression that escapes", define(watch="ARRAY['bad_src(k); DROP TABLE bad_src)']"), "22023"),
    ("watch of a view", define(watch="ARRAY['bad_view(k)']"), "42809"),
    ("invalid name", define(name="'Bad Name'"), "42602"),
    ("NULL name", define(name="NULL"), "42602"),
    ("too long a name", define(name="repeat('x', 49)"), "42602"),
    ("name of a function that is not ours", define(name="'taken'"), "42723"),
    ("zero ttl", define(ttl="'0 s'"), "22023"),
    ("negative ttl", define(ttl="'-5 min'"), "22023"),
    ("absurd ttl", define(ttl="'1000 years'"), "22023"),
    ("absurd negative_ttl", define(extra=", negative_ttl => '0 s'"), "22023"),
    ("bad vary_by", define(extra=", negative_ttl => NULL, vary_by => ARRAY['nope']"), "22023"),
    ("unknown cache", "SELECT twotier.get('no_such_cache', '1')", "42704"),
    ("NULL key", "SELECT cached_bad_ok(NULL)", "22004"),
    ("empty key", "SELECT cached_bad_text('')", "22023"),
    ("oversized key", "SELECT cached_bad_text(repeat('k', 2000))", "54000"),
    ("key that is not of the key's type", "SELECT cached_bad_ok('one')", "22P02"),
    ("key text that is not canonical", "SELECT twotier.get('bad_ok', '01')", "22P02"),
    ("composite key with too few parts", "SELECT twotier.get('bad_pair', '1')", "22P02"),
    ("NULL part of a composite key", "SELECT cached_bad_pair(1, NULL)", "22004"),
    ("many keys with a NULL", "SELECT * FROM cached_bad_ok_many(ARRAY[1, NULL])", "22004"),
    ("many keys with a duplicate", "SELECT * FROM cached_bad_ok_many(ARRAY[1, 1])", "22023"),
    ("more keys than max_many_keys", "SELECT * FROM cached_bad_ok_many(ARRAY(SELECT generate_series(1, 1001)))", "54000"),
    ("key type without a canonical text", define(extra=", key_types => ARRAY['numeric']"), "0A000"),
    ("key type that does not exist", define(extra=", key_types => ARRAY['no_such_type']"), "42704"),
    ("query types that disagree with key_types", define(extra=", key_types => ARRAY['uuid']"), "42804"),
    ("query that does not use a key part", define(extra=", key_types => ARRAY['int', 'text']"), "22023"),
    ("watch expression of the wrong arity",
     define(query="$q$SELECT jsonb_build_object('v', v) FROM bad_src WHERE k = $1 AND v = $2$q$"), "42804"),
    ("key_text of a float", "SELECT twotier.key_text(0.5::float8)", "0A000"),
    ("unknown return mode", define(extra=", returns => 'xml'"), "22023"),
    ("schema that cannot hold cache functions", define(extra=", schema => 'pg_catalog'"), "3F000"),
    ("several rows for one key", "SELECT cached_bad_many('1')", "21000"),
    ("empty pattern", "SELECT twotier.invalidate_pattern('bad_ok', '')", "22023"),
    ("flush of an unknown cache", "SELECT twotier.flush('no_such_cache')", "42704"),
    ("drop of an unknown cache", "SELECT twotier.drop('no_such_cache')", "42704"),
    ("negative timeout", "SET twotier.read_timeout_ms = -5", "22023"),
    ("zero key size", "SET twotier.max_key_bytes = 0", "22023"),
    ("absurd jitter", "SET twotier.ttl_jitter_pct = 500", "22023"),
    ("unknown boolean", "SET twotier.enabled = 'maybe'", "22023"),
    ("redis_url per database", "ALTER DATABASE postgres SET twotier.redis_url = ''", "42501"),
]


@pytest.fixture(scope="module")
def bad_db(cluster):
    cluster.sql("CREATE TABLE bad_src(k int PRIMARY KEY, v text)")
    cluster.sql("INSERT INTO bad_src VALUES (1, 'one'), (2, 'two')")
    cluster.sql("CREATE VIEW bad_view AS SELECT * FROM bad_src")
    cluster.sql("CREATE FUNCTION cached_taken(key text) RETURNS jsonb LANGUAGE sql AS 'SELECT NULL::jsonb'")
    simple_cache(cluster, "bad_ok", rows=2)
    cluster.sql("""SELECT twotier.define('bad_text', $q$SELECT jsonb_build_object('v', v) FROM bad_src WHERE k::text = $1$q$,
                                          '5 min', ARRAY['bad_src(k)'], key_types => ARRAY['text'])""")
    cluster.sql("""SELECT twotier.define('bad_pair', $q$SELECT jsonb_build_object('v', v) FROM bad_src WHERE k = $1 AND v = $2$q$,
                                          '5 min', ARRAY['bad_src(k, v)'])""")
    cluster.sql("CREATE TABLE bad_many(k int, v text)")
    cluster.sql("INSERT INTO bad_many VALUES (1, 'a'), (1, 'b')")
    cluster.sql("""SELECT twotier.define('bad_many', $q$SELECT jsonb_build_object('v', v) FROM bad_many
                   WHERE k = $1::int$q$, '5 min', ARRAY['bad_many(k)'])""")
    return cluster


def snapshot(cluster):
    return cluster.sql("""SELECT (SELECT array_agg(row(c.*)::text ORDER BY name) FROM twotier.caches c),
                                 (SELECT array_agg(oid::regprocedure::text ORDER BY oid) FROM pg_proc
                                   WHERE proname LIKE 'cached\\_%'),
                                 (SELECT array_agg(tgname ORDER BY tgname) FROM pg_trigger
                                   WHERE tgname LIKE 'twotier\\_%')""")


@pytest.mark.parametrize("what,statement,sqlstate", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_a_clear_error_that_changes_nothing(bad_db, what, statement, sqlstate):
    before = snapshot(bad_db)
    with bad_db.connect() as c:
        with pytest.raises(psycopg.Error) as err:
            c.execute(statement)
    e = err.value
    assert e.sqlstate != "XX000", f"{what}: internal error {e}"
    assert e.sqlstate == sqlstate, f"{what}: {e.sqlstate} {e}"
    assert e.diag.message_primary, what
    assert snapshot(bad_db) == before, f"{what} changed something"


def test_oversized_values_are_answered_not_stored_and_counted(bad_db, redis_server):
    bad_db.sql("CREATE TABLE bad_big(k int PRIMARY KEY, v text)")
    bad_db.sql("INSERT INTO bad_big VALUES (1, repeat('x', 600 * 1024))")
    bad_db.sql("""SELECT twotier.define('bad_big', $q$SELECT jsonb_build_object('v', v) FROM bad_big
                  WHERE k = $1::int$q$, '5 min', ARRAY['bad_big(k)'])""")
    with bad_db.connect() as c:
        c.execute("SET twotier.l1_enabled = off")
        for _ in range(2):
            assert len(c.execute("SELECT cached_bad_big('1')->>'v'").fetchone()[0]) == 600 * 1024
    (too_large, fills), = bad_db.sql("SELECT too_large, fills FROM twotier.stats WHERE cache = 'bad_big'")
    assert too_large == 2 and fills == 0
    assert not any(True for _ in redis_server.client().scan_iter(match="twotier:*:bad_big:*"))


def test_a_pattern_reaches_no_other_cache(bad_db, redis_server):
    """`*` in one cache; keys of a cache whose name starts the same are untouched."""
    simple_cache(bad_db, "bad_pa", rows=2)
    simple_cache(bad_db, "bad_pa_x", rows=2)
    with bad_db.connect() as c:
        for name in ("bad_pa", "bad_pa_x"):
            for k in ("1", "2"):
                c.execute(f"SELECT cached_{name}(%s)", (k,))
        assert c.execute("SELECT twotier.invalidate_pattern('bad_pa', '*')").fetchone()[0] == 2
    r = redis_server.client()
    left = [k for k in r.scan_iter(match="twotier:*:bad_pa_x:*") if not r.get(k).startswith(b"!")]
    assert len(left) == 2
