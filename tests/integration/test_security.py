"""Attacks, run as the roles a real deployment has: a reader that was only granted EXECUTE on
one cached function, a member of twotier_admin, a member of pg_read_all_settings. Each test
is an attack that worked against an earlier version; docs/security.md is the model they check.
"""
import psycopg
import pytest

from conftest import simple_cache, wait_for


def role(cluster, name: str, *attrs: str, member_of: tuple = ()) -> None:
    """A LOGIN role (created once per cluster; roles outlive tests)."""
    opts = " ".join(attrs or ("LOGIN",))
    cluster.sql(f"""DO $$ BEGIN
        IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{name}') THEN
            CREATE ROLE "{name}" {opts};
        END IF; END $$""")
    for group in member_of:
        cluster.sql(f'GRANT "{group}" TO "{name}"')


def login(cluster, user: str, **kw) -> psycopg.Connection:
    return psycopg.connect(cluster.dsn(), user=user, autocommit=True, **kw)


def answer(conn, cache: str, key: str):
    return conn.execute(f"SELECT cached_{cache}(%s)", (key,)).fetchone()[0]


def fresh_answer(cluster, cache: str, key: str):
    """What an uninvolved superuser session with L1 off is served."""
    with cluster.connect() as c:
        c.execute("SET twotier.l1_enabled = off")
        return answer(c, cache, key)


# 1. Poisoning by a reader -------------------------------------------------------------------

def test_a_reader_cannot_poison_the_cache_with_its_own_temp_table(cluster):
    """The reader shadows the source table with a TEMP table of its own. The cache's query runs
    in the reader's session, but with pg_temp last on its pinned path: it reads the real
    table, and what goes into the shared tiers is the real row."""
    simple_cache(cluster, "sec_poison", rows=3)
    role(cluster, "sec_reader")
    cluster.sql("GRANT EXECUTE ON FUNCTION cached_sec_poison TO sec_reader")
    with login(cluster, "sec_reader") as c:
        c.execute("CREATE TEMP TABLE sec_poison(k int, v text)")
        c.execute("INSERT INTO sec_poison VALUES (1, 'evil'), (2, 'evil'), (3, 'evil')")
        c.execute("GRANT SELECT ON sec_poison TO PUBLIC")
        # Temp functions and operators are never found without a schema; shadowing them too.
        c.execute("CREATE FUNCTION pg_temp.jsonb_build_object(text, text) RETURNS jsonb "
                  "LANGUAGE sql AS $$ SELECT '{\"v\": \"evil\"}'::jsonb $$")
        # Key 2 has never been read: this call is the one that fills it, for everyone.
        assert answer(c, "sec_poison", "2") == {"v": "v2"}
        # Invalidating and refilling key 1 is refused: invalidation needs a grant of its own.
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("SELECT twotier.invalidate('sec_poison', '1')")
        assert answer(c, "sec_poison", "1") == {"v": "v1"}
    assert fresh_answer(cluster, "sec_poison", "2") == {"v": "v2"}
    assert fresh_answer(cluster, "sec_poison", "1") == {"v": "v1"}


def test_a_readers_session_settings_do_not_change_what_is_cached(cluster):
    """TimeZone and DateStyle change how a timestamptz is rendered into jsonb. The cache's query
    runs with pinned settings, so the value in the shared tiers is the same whoever filled it."""
    cluster.sql("CREATE TABLE sec_tz(k int PRIMARY KEY, at timestamptz)")
    cluster.sql("INSERT INTO sec_tz VALUES (1, '2026-01-01 00:00+00'), (2, '2026-01-01 00:00+00')")
    cluster.sql("""SELECT twotier.define('sec_tz', $q$SELECT jsonb_build_object('at', at, 'txt', at::text)
                   FROM sec_tz WHERE k = $1::int$q$, '5 min', ARRAY['sec_tz(k)'])""")
    role(cluster, "sec_reader")
    cluster.sql("GRANT EXECUTE ON FUNCTION cached_sec_tz TO sec_reader")
    with login(cluster, "sec_reader") as c:
        c.execute("SET TimeZone = 'Asia/Tokyo'")
        c.execute("SET DateStyle = 'German'")
        tokyo = answer(c, "sec_tz", "1")
    with cluster.connect() as c:
        c.execute("SET TimeZone = 'America/New_York'")
        c.execute("SET twotier.l1_enabled = off")
        new_york = answer(c, "sec_tz", "2")
    assert tokyo == new_york == {"at": "2026-01-01T00:00:00+00:00", "txt": "2026-01-01 00:00:00+00"}


# 2. twotier_admin to superuser -------------------------------------------------------------

EVIL_SCHEMA = """
CREATE SCHEMA IF NOT EXISTS {s};
CREATE TABLE IF NOT EXISTS {s}.log(who text);
GRANT INSERT ON {s}.log TO PUBLIC;
GRANT USAGE ON SCHEMA {s} TO PUBLIC;
CREATE OR REPLACE FUNCTION {s}.f(anyelement) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO {s}.log VALUES (current_user);
    IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        EXECUTE 'ALTER ROLE sec_admin SUPERUSER';
    END IF;
    RETURN true;
END $$;
"""


def test_a_twotier_admin_cannot_run_code_as_the_extension_owner(cluster):
    """The admin puts a schema of its own first on its search_path, with domains named like the
    catalog types that define() casts to (regclass, regprocedure, regrole, text, interval,
    oid), whose CHECK calls a function that makes its caller SUPERUSER, then defines a cache
    watching its own table. define() must never resolve a name under that path with its owner's
    rights: the function runs as sec_admin or not at all."""
    role(cluster, "sec_admin", member_of=("twotier_admin",))
    cluster.sql("GRANT CREATE ON DATABASE postgres TO sec_admin")
    cluster.sql("GRANT CREATE ON SCHEMA public TO sec_admin")
    with login(cluster, "sec_admin") as c:
        c.execute(EVIL_SCHEMA.format(s="sec_evil"))
        for typ in ("regclass", "regprocedure", "regrole", "regnamespace", "text", "interval", "oid", "name"):
            c.execute(f"DROP DOMAIN IF EXISTS sec_evil.{typ} CASCADE")
            c.execute(f"CREATE DOMAIN sec_evil.{typ} AS pg_catalog.text CHECK (sec_evil.f(VALUE))")
        c.execute("CREATE TABLE IF NOT EXISTS public.sec_admin_t(k int PRIMARY KEY, v text)")
        c.execute("SET search_path = sec_evil, public, pg_catalog")
        try:
            c.execute("""SELECT twotier.define('sec_escalate', $q$SELECT jsonb_build_object('v', v)
                         FROM sec_admin_t WHERE k = $1::int$q$, '5 min', ARRAY['sec_admin_t(k)'])""")
        except psycopg.Error:
            pass  # refusing is fine too; running evil code as the owner is not
        c.execute("SET search_path = sec_evil, public, pg_catalog")
        c.execute("SELECT twotier.drop('sec_escalate') FROM twotier.caches WHERE name = 'sec_escalate'")
    (sup,), = cluster.sql("SELECT rolsuper FROM pg_roles WHERE rolname = 'sec_admin'")
    who = {r[0] for r in cluster.sql("SELECT who FROM sec_evil.log")}
    cluster.sql("ALTER ROLE sec_admin NOSUPERUSER")
    assert not sup, "sec_admin became SUPERUSER through define()"
    assert who <= {"sec_admin"}, f"the admin's code ran as {who}"


def test_a_role_whose_name_needs_quoting_can_define(cluster):
    role(cluster, "Sec Admin-2", member_of=("twotier_admin",))
    cluster.sql('GRANT CREATE ON SCHEMA public TO "Sec Admin-2"')
    with login(cluster, "Sec Admin-2") as c:
        c.execute("CREATE TABLE IF NOT EXISTS sec_quoted(k int PRIMARY KEY, v text)")
        c.execute("INSERT INTO sec_quoted VALUES (1, 'one') ON CONFLICT DO NOTHING")
        c.execute("""SELECT twotier.define('sec_quoted', $q$SELECT jsonb_build_object('v', v)
                     FROM sec_quoted WHERE k = $1::int$q$, '5 min', ARRAY['sec_quoted(k)'])""")
        assert answer(c, "sec_quoted", "1") == {"v": "one"}
    (owner,), = cluster.sql("SELECT owner::text FROM twotier.caches WHERE name = 'sec_quoted'")
    assert owner == '"Sec Admin-2"'


# 3. Redefinition --------------------------------------------------------------------------

def test_only_the_owner_redefines_and_grants_survive_redefinition(cluster):
    """A twotier_admin member with TRIGGER on the table tries to redefine a cache a superuser
    made, with a query that calls its own function: refused, because the query would run as the
    superuser. The owner's own redefinition keeps the GRANTs on the cached function."""
    simple_cache(cluster, "sec_redef", rows=2)
    role(cluster, "sec_admin", member_of=("twotier_admin",))
    role(cluster, "sec_app")
    cluster.sql("GRANT TRIGGER, SELECT ON sec_redef TO sec_admin")
    cluster.sql("GRANT EXECUTE ON FUNCTION cached_sec_redef TO sec_app")
    cluster.sql(EVIL_SCHEMA.format(s="sec_evil2").replace("CREATE SCHEMA IF NOT EXISTS sec_evil2;",
                "CREATE SCHEMA IF NOT EXISTS sec_evil2 AUTHORIZATION sec_admin;"))
    cluster.sql("ALTER FUNCTION sec_evil2.f(anyelement) OWNER TO sec_admin")
    with login(cluster, "sec_admin") as c:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("""SELECT twotier.define('sec_redef', $q$SELECT jsonb_build_object('v', v)
                         FROM sec_redef WHERE k = $1::int AND sec_evil2.f(k)$q$, '5 min',
                         ARRAY['sec_redef(k)'])""")
    assert cluster.sql("SELECT who FROM sec_evil2.log") == []
    # The owner redefines (a new TTL): the app keeps its grant.
    cluster.sql("""SELECT twotier.define('sec_redef', $q$SELECT jsonb_build_object('v', v)
                   FROM sec_redef WHERE k = $1::int$q$, '10 min', ARRAY['sec_redef(k)'])""")
    with login(cluster, "sec_app") as c:
        assert answer(c, "sec_redef", "1") == {"v": "v1"}


# 4. Internal functions and triggers ---------------------------------------------------------

PUBLIC_FUNCTIONS = {"get(text,text)", "get_json(text,text)", "get_many(text,keys text[])",
                    "get_many_json(text,keys text[])", 'key_text(VARIADIC parts "any")', "status()",
                    "exists(text,text)", "_stats()"}


def test_no_internal_function_is_executable_by_public(cluster):
    role(cluster, "sec_nobody")
    rows = cluster.sql("""SELECT p.proname || '(' || coalesce(pg_get_function_identity_arguments(p.oid), '') || ')',
                                 has_function_privilege('sec_nobody', p.oid, 'EXECUTE')
                            FROM pg_proc p WHERE p.pronamespace = 'twotier'::regnamespace""")
    callable_ = {name.replace(" ", "").replace("cache", "").replace("key", "") for name, ok in rows if ok}
    normalized = {n.replace(" ", "") for n in PUBLIC_FUNCTIONS}
    assert callable_ <= {n.replace("cache", "").replace("key", "") for n in normalized}, callable_
    # twotier_admin gets the administrative calls, and nothing that switches roles.
    rows = cluster.sql("""SELECT p.proname FROM pg_proc p
                           WHERE p.pronamespace = 'twotier'::regnamespace
                             AND has_function_privilege('twotier_admin', p.oid, 'EXECUTE')""")
    admin = {r[0] for r in rows}
    assert {"define", "drop", "flush", "invalidate", "invalidate_pattern", "set", "warm",
            "reset_stats"} <= admin
    assert not admin & {"_check_query", "_check_watch_expression", "_catalog_changed", "_lock_cache",
                        "_new_version", "_watch_truncate", "_drop_objects", "_trigger",
                        "_infer_key_types", "_resolve_key_types"}


def test_the_trigger_refuses_a_table_it_was_not_made_for(cluster):
    """Even a superuser attaching twotier._trigger to another table (copying a cache's
    arguments) gets an ERROR on the first write there, and the cache is not flushed."""
    simple_cache(cluster, "sec_trig", rows=2)
    (tbl,), = cluster.sql("SELECT 'sec_trig'::regclass::oid")
    cluster.sql("CREATE TABLE sec_other(k int)")
    cluster.sql(f"""CREATE TRIGGER x AFTER TRUNCATE ON sec_other FOR EACH STATEMENT
                    EXECUTE FUNCTION twotier._trigger('sec_trig', '{tbl}', 'k')""")
    cluster.sql(f"""CREATE TRIGGER y AFTER INSERT ON sec_other FOR EACH ROW
                    EXECUTE FUNCTION twotier._trigger('sec_trig', '{tbl}', 'k')""")
    (before,), = cluster.sql("SELECT version FROM twotier.caches WHERE name = 'sec_trig'")
    for q in ("TRUNCATE sec_other", "INSERT INTO sec_other VALUES (1)"):
        with pytest.raises(psycopg.errors.TriggeredActionException):
            cluster.sql(q)
    (after,), = cluster.sql("SELECT version FROM twotier.caches WHERE name = 'sec_trig'")
    assert before == after


# 5. Role changes reach the read ACL at once -------------------------------------------------

def test_revoking_a_role_membership_takes_effect_in_open_sessions(cluster):
    simple_cache(cluster, "sec_member", rows=1)
    role(cluster, "sec_readers", "NOLOGIN")
    role(cluster, "sec_m", member_of=("sec_readers",))
    cluster.sql("GRANT EXECUTE ON FUNCTION cached_sec_member TO sec_readers")
    # The generic call, which twotier checks itself (cached_x is also checked by the planner).
    get = "SELECT twotier.get('sec_member', '1')"
    with login(cluster, "sec_m") as c:
        assert c.execute(get).fetchone()[0] == {"v": "v1"}
        cluster.sql("REVOKE sec_readers FROM sec_m")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute(get)
        cluster.sql("GRANT sec_readers TO sec_m")
        assert c.execute(get).fetchone()[0] == {"v": "v1"}
        cluster.sql("ALTER ROLE sec_m NOINHERIT")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute(get)
    cluster.sql("ALTER ROLE sec_m INHERIT")


# 6. Row-level security: vary_by ------------------------------------------------------------

RLS_SETUP = """
CREATE TABLE sec_docs(id int PRIMARY KEY, topic text, owner_name text, sub text, body text);
INSERT INTO sec_docs VALUES
    (1, 't', 'sec_alice', NULL, 'alice doc'), (2, 't', 'sec_bob', NULL, 'bob doc'),
    (3, 't', 'sec_auth', 'u1', 'u1 doc'), (4, 't', 'sec_auth', 'u2', 'u2 doc');
ALTER TABLE sec_docs ENABLE ROW LEVEL SECURITY;
CREATE POLICY by_role ON sec_docs USING (owner_name = current_user AND sub IS NULL);
CREATE POLICY by_claim ON sec_docs
    USING (sub = (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub'));
"""
RLS_QUERY = ("$q$SELECT coalesce(jsonb_agg(body ORDER BY id), '[]') FROM sec_docs "
             "WHERE topic = $1$q$")


def test_without_vary_by_a_cache_over_rls_is_refused(cluster):
    cluster.sql(RLS_SETUP.replace("sec_docs", "sec_docs0"))
    with pytest.raises(psycopg.errors.FeatureNotSupported):
        cluster.sql(f"SELECT twotier.define('sec_docs0', {RLS_QUERY.replace('sec_docs', 'sec_docs0')}, "
                    "'5 min', ARRAY['sec_docs0(topic)'])")


def test_vary_by_role_and_claims_keeps_each_callers_rows_apart(cluster):
    cluster.sql(RLS_SETUP)
    cluster.sql(f"SELECT twotier.define('sec_docs', {RLS_QUERY}, '5 min', ARRAY['sec_docs(topic)'], "
                "vary_by => ARRAY['role', 'request.jwt.claims'])")
    for r in ("sec_alice", "sec_bob", "sec_auth"):
        role(cluster, r)
        cluster.sql(f"GRANT SELECT ON sec_docs TO {r}")
        cluster.sql(f"GRANT EXECUTE ON FUNCTION cached_sec_docs TO {r}")
    for _ in range(2):  # the second round is answered by the tiers
        with login(cluster, "sec_alice") as a, login(cluster, "sec_bob") as b:
            assert answer(a, "sec_docs", "t") == ["alice doc"]
            assert answer(b, "sec_docs", "t") == ["bob doc"]
        with login(cluster, "sec_auth") as u1, login(cluster, "sec_auth") as u2:
            u1.execute("""SET request.jwt.claims = '{"sub": "u1", "role": "authenticated"}'""")
            u2.execute("""SET request.jwt.claims = '{"sub": "u2", "role": "authenticated"}'""")
            assert answer(u1, "sec_docs", "t") == ["u1 doc"]
            assert answer(u2, "sec_docs", "t") == ["u2 doc"]
            u2.execute("RESET request.jwt.claims")
            assert answer(u2, "sec_docs", "t") == []
    s = dict(zip(("hits",), cluster.sql("SELECT l1_hits + l2_hits FROM twotier.stats WHERE cache = 'sec_docs'")[0]))
    assert s["hits"] >= 4, "the second round should be served by the cache"
    # SET ROLE in one session switches to the role's own entries.
    with cluster.connect() as c:
        c.execute("SET ROLE sec_alice")
        assert answer(c, "sec_docs", "t") == ["alice doc"]
        c.execute("SET ROLE sec_bob")
        assert answer(c, "sec_docs", "t") == ["bob doc"]
        c.execute("RESET ROLE")
        # A SECURITY DEFINER function owned by bob reads as bob, whoever calls it.
        c.execute("""CREATE OR REPLACE FUNCTION sec_as_bob() RETURNS jsonb LANGUAGE sql SECURITY DEFINER
                     AS $$ SELECT cached_sec_docs('t') $$""")
        c.execute("ALTER FUNCTION sec_as_bob() OWNER TO sec_bob")
        c.execute("GRANT EXECUTE ON FUNCTION sec_as_bob() TO sec_alice")
        c.execute("SET ROLE sec_alice")
        assert c.execute("SELECT sec_as_bob()").fetchone()[0] == ["bob doc"]
        assert answer(c, "sec_docs", "t") == ["alice doc"]
    # A change reaches every variant at commit.
    cluster.sql("UPDATE sec_docs SET body = 'alice doc v2' WHERE id = 1")
    with login(cluster, "sec_alice") as a:
        assert answer(a, "sec_docs", "t") == ["alice doc v2"]


def test_rls_enabled_after_define_or_inside_a_function_is_an_error_not_a_leak(cluster):
    """A cache defined over a table without RLS; RLS is then enabled on it. And a cache whose
    query reads an RLS table (owned by someone else) through a function. Neither may answer
    every caller with the owner's rows."""
    role(cluster, "sec_owner", member_of=("twotier_admin",))
    cluster.sql("GRANT CREATE ON SCHEMA public TO sec_owner")
    cluster.sql("CREATE TABLE sec_later(k int PRIMARY KEY, v text, who text)")
    cluster.sql("INSERT INTO sec_later VALUES (1, 'mine', 'sec_owner'), (2, 'other', 'x')")
    cluster.sql("GRANT SELECT, TRIGGER ON sec_later TO sec_owner")
    cluster.sql("CREATE TABLE sec_hidden(k int PRIMARY KEY, v text)")
    cluster.sql("INSERT INTO sec_hidden VALUES (1, 'hidden')")
    cluster.sql("ALTER TABLE sec_hidden ENABLE ROW LEVEL SECURITY")
    cluster.sql("CREATE POLICY none ON sec_hidden USING (false)")
    cluster.sql("GRANT SELECT ON sec_hidden TO sec_owner")
    cluster.sql("CREATE FUNCTION sec_read_hidden(int) RETURNS text LANGUAGE sql STABLE "
                "AS $$ SELECT v FROM sec_hidden WHERE k = $1 $$")
    with login(cluster, "sec_owner") as o:
        o.execute("""SELECT twotier.define('sec_later', $q$SELECT jsonb_build_object('v', v) FROM sec_later
                     WHERE k = $1::int$q$, '5 min', ARRAY['sec_later(k)'])""")
        o.execute("""SELECT twotier.define('sec_fn', $q$SELECT jsonb_build_object('v', sec_read_hidden($1::int))$q$,
                     '5 min', '{}')""")
        assert answer(o, "sec_later", "1") == {"v": "mine"}
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            answer(o, "sec_fn", "1")
    cluster.sql("ALTER TABLE sec_later ENABLE ROW LEVEL SECURITY")
    cluster.sql("CREATE POLICY own ON sec_later USING (who = current_user)")
    with login(cluster, "sec_owner") as o:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            answer(o, "sec_later", "2")


# 7. Secrets -------------------------------------------------------------------------------

def test_redis_url_cannot_be_stored_per_role_database_or_function(cluster):
    role(cluster, "sec_someone")
    for q in ("ALTER ROLE sec_someone SET twotier.redis_url = 'redis://u:p@127.0.0.1:1'",
              "ALTER DATABASE postgres SET twotier.redis_url = 'redis://u:p@127.0.0.1:1'",
              "CREATE FUNCTION sec_f() RETURNS int LANGUAGE sql SET twotier.redis_url = 'redis://u:p@h' "
              "AS 'SELECT 1'"):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            cluster.sql(q)
    assert cluster.sql("SELECT count(*) FROM pg_db_role_setting "
                       "WHERE array_to_string(setconfig, ',') LIKE '%redis_url%'") == [(0,)]


# 8. Isolation -----------------------------------------------------------------------------

def test_two_databases_with_the_same_cache_never_share_entries(cluster, redis_server):
    for db in ("sec_iso_a", "sec_iso_b"):
        cluster.createdb(db)
        cluster.sql("CREATE EXTENSION twotier", dbname=db)
        cluster.sql("CREATE TABLE t(k int PRIMARY KEY, v text)", dbname=db)
        cluster.sql(f"INSERT INTO t VALUES (1, '{db}')", dbname=db)
        cluster.sql("""SELECT twotier.define('iso', $q$SELECT jsonb_build_object('v', v) FROM t
                       WHERE k = $1::int$q$, '5 min', ARRAY['t(k)'])""", dbname=db)
    # The same version too, as a restored dump would have: only the database tells them apart.
    (v,), = cluster.sql("SELECT version FROM twotier.caches WHERE name = 'iso'", dbname="sec_iso_a")
    cluster.sql(f"UPDATE twotier.caches SET version = {v}", dbname="sec_iso_b")
    with cluster.connect("sec_iso_a") as a, cluster.connect("sec_iso_b") as b:
        assert answer(a, "iso", "1") == {"v": "sec_iso_a"}
        b.execute("SET twotier.l1_enabled = off")
        assert answer(b, "iso", "1") == {"v": "sec_iso_b"}
    scopes = {k.decode().split(":")[2] for k in redis_server.client().scan_iter(match="twotier:*:iso:*")}
    assert len(scopes) == 2, scopes


def test_two_clusters_sharing_a_redis_never_share_entries(cluster, redis_server):
    """Same database name, same cache, same version (as a restored dump would have): only the
    clusters' system identifiers tell their keys apart."""
    from conftest import twotier_settings
    from servers import PgCluster

    other = PgCluster(settings=twotier_settings(redis_server.url), name="other").start()
    try:
        for pg, v in ((cluster, "first cluster"), (other, "second cluster")):
            if pg is other:
                pg.sql("CREATE EXTENSION twotier")
            pg.sql("CREATE TABLE sec_twins(k int PRIMARY KEY, v text)")
            pg.sql(f"INSERT INTO sec_twins VALUES (1, '{v}')")
            pg.sql("""SELECT twotier.define('sec_twins', $q$SELECT jsonb_build_object('v', v) FROM sec_twins
                      WHERE k = $1::int$q$, '5 min', ARRAY['sec_twins(k)'])""")
        (v,), = cluster.sql("SELECT version FROM twotier.caches WHERE name = 'sec_twins'")
        other.sql(f"UPDATE twotier.caches SET version = {v} WHERE name = 'sec_twins'")
        assert fresh_answer(cluster, "sec_twins", "1") == {"v": "first cluster"}
        assert fresh_answer(other, "sec_twins", "1") == {"v": "second cluster"}
        assert fresh_answer(cluster, "sec_twins", "1") == {"v": "first cluster"}
    finally:
        other.destroy()


# 7b. Redis AUTH with an ACL user ----------------------------------------------------------

def own_cluster(request, redis, url: str, cache: str, rows: int, name: str, **settings):
    """A cluster of the test's own on `redis` (reached at `url`), with twotier and
    `simple_cache(cache)`; both are destroyed after the test."""
    from conftest import twotier_settings
    from servers import PgCluster

    pg = PgCluster(settings={**twotier_settings(url), **settings}, name=name).start()
    request.addfinalizer(pg.destroy)
    request.addfinalizer(redis.destroy)
    pg.sql("CREATE EXTENSION twotier")
    simple_cache(pg, cache, rows=rows)
    return pg


def collect_notices(conn) -> list:
    notices = []
    conn.add_notice_handler(lambda d: notices.append(d.message_primary))
    return notices


def test_redis_acl_user_works_and_its_password_is_never_shown(request):
    from servers import RedisServer

    redis = RedisServer(user="twotier_app", password="s3cret-pw").start()
    secret = redis.password_file()
    pg = own_cluster(request, redis, redis.url, "sec_auth_c", 2, "auth",
                     **{"twotier.redis_password_file": str(secret)})
    with pg.connect() as c:
        c.execute("SET twotier.l1_enabled = off")
        assert answer(c, "sec_auth_c", "1") == {"v": "v1"}
    assert wait_for(lambda: any(True for _ in redis.client().scan_iter(match="twotier:*:sec_auth_c:*")))
    # A member of pg_read_all_settings reads settings that SUPERUSER_ONLY does not hide.
    role(pg, "sec_monitor", member_of=("pg_read_all_settings", "pg_monitor"))
    with login(pg, "sec_monitor") as m:
        shown = [m.execute("SHOW twotier.redis_url").fetchone()[0],
                 m.execute("SELECT current_setting('twotier.redis_url')").fetchone()[0],
                 m.execute("SELECT setting FROM pg_settings WHERE name = 'twotier.redis_url'").fetchone()[0],
                 str(m.execute("SELECT twotier.status()").fetchone()[0])]
    with pg.connect() as c:
        shown.append(c.execute("SHOW twotier.redis_url").fetchone()[0])
        shown.append(str(c.execute("SELECT twotier.status()").fetchone()[0]))
    assert all("s3cret" not in s for s in shown), shown
    assert "s3cret" not in pg.log_text()
    # A wrong password: a WARNING that says so, and the source answers.
    secret.write_text("wrong\n")
    with pg.connect() as c:
        notices = collect_notices(c)
        c.execute(f"SET twotier.redis_url = 'redis://twotier_app@127.0.0.1:{redis.port}/1'")
        c.execute("SET twotier.l1_enabled = off")
        assert answer(c, "sec_auth_c", "2") == {"v": "v2"}
        assert any("WRONGPASS" in n or "auth" in n.lower() for n in notices), notices
        assert all("wrong" not in n for n in notices), notices


# 7c. TLS ----------------------------------------------------------------------------------

def test_rediss_with_a_ca_and_a_client_certificate_and_an_untrusted_server(request):
    """A real redis-server with --tls-port and certificates made for the test. With the CA,
    entries reach Redis over TLS; with a CA that did not sign the server's certificate, the
    connection is refused with a WARNING that says why, and the calls answer from the source."""
    from servers import RedisServer, TlsFiles

    tls = TlsFiles()
    redis = RedisServer(tls=tls).start()
    pg = own_cluster(request, redis, redis.tls_url, "sec_tls", 3, "tls", **{
        "twotier.redis_tls_ca_file": str(tls.ca_cert),
        "twotier.redis_tls_cert_file": str(tls.client_cert),
        "twotier.redis_tls_key_file": str(tls.client_key),
        "twotier.connect_timeout_ms": 2000, "twotier.read_timeout_ms": 1000})
    with pg.connect() as c:
        c.execute("SET twotier.l1_enabled = off")
        assert answer(c, "sec_tls", "1") == {"v": "v1"}
        assert answer(c, "sec_tls", "1") == {"v": "v1"}
    assert wait_for(lambda: any(True for _ in redis.client().scan_iter(match="twotier:*:sec_tls:*")))
    (hits,), = pg.sql("SELECT l2_hits FROM twotier.stats WHERE cache = 'sec_tls'")
    assert hits >= 1
    clients = redis.client().client_list()
    assert any(int(cl.get("fd", -1)) >= 0 for cl in clients)
    # An untrusted server certificate.
    pg.set({"twotier.redis_tls_ca_file": str(tls.other_ca_cert)})
    pg.reload()
    with pg.connect() as c:
        notices = collect_notices(c)
        c.execute("SET twotier.l1_enabled = off")
        assert answer(c, "sec_tls", "2") == {"v": "v2"}
        assert any("certificate" in n.lower() or "tls" in n.lower() for n in notices), notices
    (errors, l2_hits), = pg.sql("SELECT redis_errors, l2_hits FROM twotier.stats WHERE cache = 'sec_tls'")
    assert errors >= 1 and l2_hits == hits
