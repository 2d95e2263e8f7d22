"""Typed and composite keys, json pass-through and many-key calls against a real Redis and
PostgreSQL, with Redis up and down: every tier answers them, the triggers invalidate exactly
the keys the app passes (whatever the writer's settings), json mode hands out the text jsonb
mode prints, and a many-key call costs one Redis round trip for what L1 lacks."""
import itertools
import time
import uuid

import pytest
from conftest import wait_for  # noqa: E402

_names = itertools.count(1)
DOMAINS = [uuid.UUID(int=(i + 1) * 0x1111_0000_0000_0000_0000_0000_0001) for i in range(6)]


def subscribed(stack) -> bool:
    with stack.cluster.connect() as c:
        return c.execute("SELECT (twotier.status()->'l1'->'worker'->>'subscribed')::bool").fetchone()[0]


@pytest.fixture(autouse=True)
def healthy(own_stack):
    own_stack.heal()
    # After a Redis restart the L1 listener flushes L1 when it subscribes again (it may have
    # missed invalidations): a test that counts L1 hits starts after that.
    assert wait_for(lambda: subscribed(own_stack), timeout=15)
    time.sleep(0.3)  # the flush follows the subscription's switch within microseconds
    yield
    own_stack.heal()


@pytest.fixture(scope="module")
def app(own_stack):
    """widgets (uuid key), faq (tenant int, locale text) and events (timestamptz, enum), with a
    jsonb and a json-mode cache over widgets, a composite FAQ cache and an event cache."""
    c = own_stack.cluster
    c.sql("CREATE TABLE widgets (domain_id uuid PRIMARY KEY, theme text, ver int NOT NULL DEFAULT 0)")
    for i, d in enumerate(DOMAINS):
        c.sql("INSERT INTO widgets VALUES (%s, %s)", d, f"theme{i}")
    c.sql("CREATE TABLE faq (tenant_id int, locale text, question text, ver int NOT NULL DEFAULT 0,"
          " PRIMARY KEY (tenant_id, locale, question))")
    c.sql("""INSERT INTO faq VALUES (1, 'en', 'How?', 0), (1, 'de', 'Wie?', 0), (2, 'en', 'a,"b"', 0),
                                    (2, 'a,"b"', 'odd locale', 0)""")
    c.sql("CREATE TYPE mood AS ENUM ('sad', 'ok')")
    c.sql("CREATE TABLE events (at timestamptz, mood mood, ver int NOT NULL DEFAULT 0, PRIMARY KEY (at, mood))")
    c.sql("INSERT INTO events VALUES ('2024-01-02 03:04:05.25+00', 'ok', 0)")
    widget_q = "$q$SELECT jsonb_build_object('theme', theme, 'ver', ver, 'nested', jsonb_build_object('b', 2, 'a', 1)) FROM widgets WHERE domain_id = $1$q$"
    c.sql(f"SELECT twotier.define('widget', {widget_q}, '5 min', ARRAY['widgets(domain_id)'])")
    c.sql(f"SELECT twotier.define('widget_json', {widget_q}, '5 min', ARRAY['widgets(domain_id)'], returns => 'json')")
    c.sql("""SELECT twotier.define('faqs', $q$SELECT jsonb_build_object('q', jsonb_agg(question ORDER BY question),
                                                                     'ver', max(ver))
                                            FROM faq WHERE tenant_id = $1 AND locale = $2 HAVING count(*) > 0$q$,
                                 '5 min', ARRAY['faq(tenant_id, locale)'], key_names => ARRAY['tenant', 'locale'])""")
    c.sql("""SELECT twotier.define('event', $q$SELECT jsonb_build_object('ver', ver) FROM events
                                            WHERE at = $1 AND mood = $2$q$, '5 min', ARRAY['events(at, mood)'])""")
    return own_stack


def call(stack, sql, *args, l1=True):
    with stack.cluster.connect() as c:
        if not l1:
            c.execute("SET twotier.l1_enabled = off")
        return c.execute(sql, args or None).fetchone()[0]


def stats(stack, cache):
    with stack.cluster.connect() as c:
        cur = c.execute("SELECT * FROM twotier.stats WHERE cache = %s", (cache,))
        row = cur.fetchone()
        names = [d.name for d in cur.description]
        return dict(zip(names, row)) if row else {n: 0 for n in names}


def round_trips(c) -> int:
    """Redis requests this session has waited on; the first call connects (and that handshake
    is a round trip of its own), so a session is connected before it counts."""
    c.execute("SELECT twotier.exists('probe', '1')")
    return c.execute("SELECT (twotier.status()->'l2'->>'round_trips_in_session')::int").fetchone()[0]


CALLS = {
    "widget": ("SELECT cached_widget(%s)", (DOMAINS[0],),
               "UPDATE widgets SET ver = ver + 1 WHERE domain_id = %s", (DOMAINS[0],)),
    "widget_json": ("SELECT cached_widget_json(%s)", (DOMAINS[0],),
                    "UPDATE widgets SET ver = ver + 1 WHERE domain_id = %s", (DOMAINS[0],)),
    "faqs": ("SELECT cached_faqs(%s, %s)", (2, 'a,"b"'),
             "UPDATE faq SET ver = ver + 1 WHERE tenant_id = %s AND locale = %s", (2, 'a,"b"')),
    "event": ("SELECT cached_event(%s::timestamptz, 'ok')", ("2024-01-02 12:04:05.25+09",),
              "UPDATE events SET ver = ver + 1 WHERE mood = 'ok' AND at = %s::timestamptz", ("2024-01-02 03:04:05.25+00",)),
}


@pytest.mark.parametrize("redis", ["up", "down"])
@pytest.mark.parametrize("cache", list(CALLS))
def test_fill_hit_and_invalidate_at_commit(app, cache, redis):
    """Miss, L1 hit, L2 hit (L1 off, Redis up), then a writer with other DateStyle/TimeZone
    commits: the next read in a new session, L1 on and off, is the new row."""
    stack = app
    read, args, write, wargs = CALLS[cache]
    if redis == "down":
        stack.redis.stop()
    try:
        before = stats(stack, cache)
        first = call(stack, read, *args)
        assert call(stack, read, *args) == first
        assert call(stack, read, *args, l1=False) == first
        after = stats(stack, cache)
        assert after["l1_hits"] > before["l1_hits"], (before, after)
        if redis == "up":
            assert after["l2_hits"] > before["l2_hits"], (before, after)
        with stack.cluster.connect() as w:
            w.execute("SET DateStyle = 'German, DMY'")
            w.execute("SET TimeZone = 'America/New_York'")
            assert w.execute(write, wargs).rowcount == 1
        for l1 in (True, False):
            got = call(stack, read, *args, l1=l1)
            assert got["ver"] == first["ver"] + 1, (cache, l1, first, got)
    finally:
        if redis == "down":
            stack.redis.start()


def test_json_mode_is_the_text_jsonb_prints_from_every_tier(app):
    """The client sees the same bytes from a json-mode cache as from jsonb mode: filled from
    the source, from L1, and from L2."""
    stack = app
    d = DOMAINS[1]
    with stack.cluster.connect() as c:
        want = c.execute("SELECT cached_widget(%s)::text", (d,)).fetchone()[0]
    texts = [call(stack, "SELECT cached_widget_json(%s)::text", d)]  # source
    texts.append(call(stack, "SELECT cached_widget_json(%s)::text", d))  # L1
    texts.append(call(stack, "SELECT cached_widget_json(%s)::text", d, l1=False))  # L2
    assert texts == [want] * 3, (want, texts)
    assert '"nested": {"a": 1, "b": 2}' in want
    s = stats(stack, "widget_json")
    assert s["l1_hits"] >= 1 and s["l2_hits"] >= 1, s


def l2_only(stack, sql, *args):
    """Fills L2 but not L1: a session with L1 off stores nothing in L1."""
    call(stack, sql, *args, l1=False)


@pytest.mark.parametrize("cache", ["widget", "widget_json"])
def test_many_reads_l1_then_one_round_trip_to_l2_then_the_source(app, cache):
    stack = app
    stack.cluster.sql(f"SELECT twotier.flush('{cache}')")
    in_l1, in_l2, cold = DOMAINS[0:2], DOMAINS[2:4], DOMAINS[4:6]
    for d in in_l1:
        call(stack, f"SELECT cached_{cache}(%s)", d)
    for d in in_l2:
        l2_only(stack, f"SELECT cached_{cache}(%s)", d)
    keys = [cold[0], in_l2[0], in_l1[0], cold[1], in_l2[1], in_l1[1]]
    before = stats(stack, cache)
    with stack.cluster.connect() as c:
        rt0 = round_trips(c)
        rows = c.execute(f"SELECT key, value FROM cached_{cache}_many(%s::uuid[])", ([str(k) for k in keys],)).fetchall()
        rt1 = round_trips(c) - 1
    after = stats(stack, cache)
    truth = dict(stack.cluster.sql("SELECT domain_id, theme FROM widgets"))
    assert [r[0] for r in rows] == keys
    assert [r[1]["theme"] for r in rows] == [truth[k] for k in keys]
    assert after["l1_hits"] - before["l1_hits"] == 2, (before, after)
    assert after["l2_hits"] - before["l2_hits"] == 2, (before, after)
    assert after["misses"] - before["misses"] == 2, (before, after)
    # One pipelined read for the four keys L1 lacked, then per missed key: its lease and its fill.
    assert rt1 - rt0 == 1 + 2 * 2, (rt0, rt1)


def test_many_from_l2_costs_one_round_trip(app):
    """100 keys, all in L2 and none in L1: one Redis round trip."""
    stack = app
    c = stack.cluster
    c.sql("CREATE TABLE many_src (k int PRIMARY KEY, v text)")
    c.sql("INSERT INTO many_src SELECT g, 'v' || g FROM generate_series(1, 100) g")
    c.sql("""SELECT twotier.define('many_src', $q$SELECT jsonb_build_object('v', v) FROM many_src WHERE k = $1$q$,
                                   '5 min', ARRAY['many_src(k)'])""")
    with c.connect() as s:
        s.execute("SET twotier.l1_enabled = off")
        s.execute("SELECT count(*) FROM cached_many_src_many(ARRAY(SELECT generate_series(1, 100)))")
    with c.connect() as s:
        rt0 = round_trips(s)
        rows = s.execute("SELECT key, value->>'v' FROM cached_many_src_many(ARRAY(SELECT generate_series(1, 100)))").fetchall()
        rt1 = round_trips(s) - 1
    assert rows == [(k, f"v{k}") for k in range(1, 101)]
    assert rt1 - rt0 == 1, (rt0, rt1)
    # ... and then from L1, with no round trip at all.
    with c.connect() as s:
        rt0 = round_trips(s)
        s.execute("SELECT count(*) FROM cached_many_src_many(ARRAY(SELECT generate_series(1, 100)))")
        rt1 = round_trips(s) - 1
    assert rt1 - rt0 == 0, (rt0, rt1)


@pytest.mark.parametrize("redis", ["up", "down"])
def test_many_is_fresh_after_each_commit(app, redis):
    """Composite keys through _many: every tier warm, a writer changes two of the keys, the
    next _many (L1 on and off) returns the new rows for those and the old for the rest."""
    stack = app
    keys = [(1, "en"), (1, "de"), (2, "en"), (2, 'a,"b"'), (3, "none")]
    tenants, locales = [k[0] for k in keys], [k[1] for k in keys]
    q = "SELECT tenant, locale, value FROM cached_faqs_many(%s::int[], %s::text[])"

    def read(l1=True):
        with stack.cluster.connect() as c:
            if not l1:
                c.execute("SET twotier.l1_enabled = off")
            return {(t, lo): (v["ver"] if v else None) for t, lo, v in c.execute(q, (tenants, locales)).fetchall()}

    def truth():
        rows = dict(((t, lo), v) for t, lo, v in stack.cluster.sql(
            "SELECT tenant_id, locale, max(ver) FROM faq GROUP BY 1, 2"))
        return {k: rows.get(k) for k in keys}

    if redis == "down":
        stack.redis.stop()
    try:
        read(), read(), read(l1=False)
        assert read() == truth() and read(l1=False) == truth()
        with stack.cluster.connect() as w:
            w.execute("UPDATE faq SET ver = ver + 1 WHERE (tenant_id, locale) IN ((1, 'de'), (2, 'a,\"b\"'))")
        want = truth()
        assert read() == want and read(l1=False) == want, want
    finally:
        if redis == "down":
            stack.redis.start()


def test_a_writer_in_the_same_transaction_reads_its_own_rows_through_many(app):
    stack = app
    with stack.cluster.connect(autocommit=False) as c:
        c.execute("UPDATE widgets SET theme = 'mine' WHERE domain_id = %s", (DOMAINS[5],))
        rows = c.execute("SELECT value->>'theme' FROM cached_widget_many(%s::uuid[])",
                         ([str(DOMAINS[5]), str(DOMAINS[4])],)).fetchall()
        assert rows[0][0] == "mine"
        c.rollback()
    assert call(stack, "SELECT cached_widget(%s)->>'theme'", DOMAINS[5]) == "theme5"


def test_redefinition_keeps_grants_and_drops_the_old_signature(app):
    """A reader granted on cached_x(int) keeps reading after x becomes a text-keyed json
    cache in another schema; the int function is gone."""
    stack = app
    c = stack.cluster
    n = f"redef{next(_names)}"
    c.sql(f"CREATE TABLE {n} (k int PRIMARY KEY, v text)")
    c.sql(f"INSERT INTO {n} VALUES (1, 'one')")
    c.sql(f"SELECT twotier.define('{n}', $q$SELECT jsonb_build_object('v', v) FROM {n} WHERE k = $1$q$, '1 min', ARRAY['{n}(k)'])")
    c.sql(f"DROP ROLE IF EXISTS {n}_reader")
    c.sql(f"CREATE ROLE {n}_reader LOGIN")
    c.sql(f"GRANT SELECT ON {n} TO {n}_reader")
    c.sql(f"GRANT EXECUTE ON FUNCTION cached_{n}(int) TO {n}_reader")
    c.sql("CREATE SCHEMA IF NOT EXISTS api")
    c.sql(f"GRANT USAGE ON SCHEMA api TO {n}_reader")
    c.sql(f"""SELECT twotier.define('{n}', $q$SELECT jsonb_build_object('v', v) FROM {n} WHERE k = $1::int$q$, '1 min',
                                   ARRAY['{n}(k::text)'], key_types => ARRAY['text'], returns => 'json', schema => 'api')""")
    assert c.sql(f"SELECT oid::regprocedure::text FROM pg_proc WHERE proname LIKE 'cached_{n}%' ORDER BY 1") == [
        (f"api.cached_{n}(text)",), (f"api.cached_{n}_many(text[])",)]
    with c.connect(user=f"{n}_reader") as r:
        assert r.execute(f"SELECT api.cached_{n}('1')::text").fetchone()[0] == '{"v": "one"}'
        assert r.execute(f"SELECT value::text FROM api.cached_{n}_many(ARRAY['1'])").fetchone()[0] == '{"v": "one"}'
    c.sql(f"UPDATE {n} SET v = 'uno'")
    assert wait_for(lambda: call(stack, f"SELECT api.cached_{n}('1')->>'v'") == "uno", timeout=0.5)


def test_a_key_spelled_another_way_is_refused_not_left_stale(app):
    """Why typed keys render one canonical text: with a text key (as every cache had before
    key types), '007' and '7' are two entries of one row and the trigger invalidates only the
    one its row renders, so '007' stays stale until its TTL. A typed key turns every spelling
    into '7' at the call, and the generic call refuses a spelling that is not canonical."""
    stack = app
    c = stack.cluster
    n = f"spell{next(_names)}"
    c.sql(f"CREATE TABLE {n} (k int PRIMARY KEY, ver int NOT NULL DEFAULT 0)")
    c.sql(f"INSERT INTO {n} VALUES (7, 0)")
    c.sql(f"""SELECT twotier.define('{n}_text', $q$SELECT jsonb_build_object('ver', ver) FROM {n} WHERE k = $1::int$q$,
                                   '5 min', ARRAY['{n}(k)'], key_types => ARRAY['text'])""")
    c.sql(f"""SELECT twotier.define('{n}_int', $q$SELECT jsonb_build_object('ver', ver) FROM {n} WHERE k = $1$q$,
                                   '5 min', ARRAY['{n}(k)'])""")
    for spelling in ("007", "7"):
        call(stack, f"SELECT cached_{n}_text(%s)", spelling)
        call(stack, f"SELECT cached_{n}_int(%s)", spelling)
    c.sql(f"UPDATE {n} SET ver = 1")
    # The hazard, with text keys: the other spelling is served stale.
    assert call(stack, f"SELECT cached_{n}_text('007')->>'ver'") == "0"
    assert call(stack, f"SELECT cached_{n}_text('7')->>'ver'") == "1"
    # Typed: every spelling is the one key the trigger invalidated.
    for spelling in ("007", "7", "+7"):
        for l1 in (True, False):
            assert call(stack, f"SELECT cached_{n}_int(%s)->>'ver'", spelling, l1=l1) == "1"
    with c.connect() as s:
        try:
            s.execute(f"SELECT twotier.get('{n}_int', '007')")
            raise AssertionError("a non-canonical key text was accepted")
        except Exception as e:  # noqa: BLE001
            assert getattr(e, "sqlstate", None) == "22P02", e
        # Acting on a key accepts any spelling and acts on the canonical one.
        s.execute(f"SELECT twotier.invalidate('{n}_int', '007')")


@pytest.mark.parametrize("kind", ["text", "uuid", "timestamptz"])
def test_an_update_that_moves_a_row_invalidates_its_old_and_its_new_key(app, kind):
    """The trigger renders an UPDATE's new key only when the key column's bytes changed (most
    UPDATEs leave it alone). For variable-length (text), fixed-length by-reference
    (uuid) and by-value (timestamptz) columns: a row moved to another key leaves its old key
    empty and fills its new one, in L1 and in L2, and an UPDATE of another column still
    invalidates the unchanged key."""
    stack = app
    c = stack.cluster
    n = f"moves{next(_names)}"
    old, new = {"text": ("a-long-key-" + "x" * 200, "b"),
                "uuid": (str(DOMAINS[0]), str(DOMAINS[1])),
                "timestamptz": ("2024-01-02 03:04:05+00", "2024-01-02 03:04:05.000001+00")}[kind]
    c.sql(f"CREATE TABLE {n} (id int PRIMARY KEY, k {kind} UNIQUE, v text)")
    c.sql(f"INSERT INTO {n} VALUES (1, %s, 'first')", old)
    c.sql(f"""SELECT twotier.define('{n}', $q$SELECT jsonb_build_object('v', v) FROM {n} WHERE k = $1$q$,
                                   '5 min', ARRAY['{n}(k)'], key_types => ARRAY['{kind}'])""")
    read = f"SELECT cached_{n}(%s::{kind})->>'v'"
    for l1 in (True, False):
        assert call(stack, read, old, l1=l1) == "first"
        assert call(stack, read, new, l1=l1) is None
    c.sql(f"UPDATE {n} SET v = 'second'")
    for l1 in (True, False):
        assert call(stack, read, old, l1=l1) == "second", l1
    c.sql(f"UPDATE {n} SET k = %s::{kind}", new)
    for l1 in (True, False):
        assert call(stack, read, old, l1=l1) is None, l1
        assert call(stack, read, new, l1=l1) == "second", l1
