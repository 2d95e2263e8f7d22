"""twotier.stats counts each cache in a slot of shared memory, `twotier.stats_slots` of them
per server (all databases together). Before, the 257th cache ever used silently shared the
last slot's counters with another cache, and slots were never freed. Now: slots of dropped
caches and of dropped databases are reclaimed when all are in use; a cache that still finds
none is counted under "(overflow)", with a WARNING, and status() says the table is full."""
import pytest
from conftest import twotier_settings
from servers import PgCluster

SLOTS = 16  # the smallest the setting allows; one of them is the overflow's


@pytest.fixture(scope="module")
def pg(redis_server):
    c = PgCluster(name="slots", settings={**twotier_settings(redis_server.url), "twotier.stats_slots": SLOTS}).start()
    c.sql("CREATE EXTENSION twotier")
    c.sql("CREATE TABLE src (k int PRIMARY KEY, v text)")
    c.sql("INSERT INTO src VALUES (1, 'one')")
    yield c
    c.destroy()


def define(pg, name):
    pg.sql(f"SELECT twotier.define('{name}', $q$SELECT jsonb_build_object('v', v) FROM src WHERE k = $1$q$,"
           " '5 min', ARRAY['src(k)'])")


def call_all(pg, names, times=1):
    """Calls each cache `times` times in one session; returns the session's WARNINGs."""
    with pg.connect() as c:
        warnings = []
        c.add_notice_handler(lambda d: warnings.append(d.message_primary) if d.severity == "WARNING" else None)
        for n in names:
            for _ in range(times):
                c.execute(f"SELECT cached_{n}(1)")
        return warnings


def stats(pg):
    return dict(pg.sql("SELECT cache, calls FROM twotier.stats"))


def status(pg):
    return pg.sql("SELECT twotier.status()->'stats'")[0][0]


def test_slots_are_counted_apart_reclaimed_and_never_silently_shared(pg):
    names = [f"s{i:02d}" for i in range(SLOTS + 4)]
    for n in names:
        define(pg, n)
    # Each cache called a different number of times: shared counters would show.
    with pg.connect() as c:
        warnings = []
        c.add_notice_handler(lambda d: warnings.append(d.message_primary) if d.severity == "WARNING" else None)
        for i, n in enumerate(names):
            for _ in range(i + 1):
                c.execute(f"SELECT cached_{n}(1)")
    st = stats(pg)
    counted = names[:SLOTS - 1]
    overflow = names[SLOTS - 1:]
    assert {n: st.get(n) for n in counted} == {n: i + 1 for i, n in enumerate(counted)}, st
    assert not any(n in st for n in overflow), st
    assert st["(overflow)"] == sum(names.index(n) + 1 for n in overflow), st
    assert len(warnings) == len(overflow) and all("stats_slots" in w for w in warnings), warnings
    s = status(pg)
    assert s["slots"] == SLOTS and s["in_use"] == SLOTS - 1 and s["full"] and s["overflowed"], s

    # Dropped caches give their slots back to the next cache that needs one.
    for n in counted[:3]:
        pg.sql(f"SELECT twotier.drop('{n}')")
    define(pg, "later")
    assert call_all(pg, ["later"], times=7) == []
    st = stats(pg)
    assert st.get("later") == 7 and not any(n in st for n in counted[:3]), st
    assert status(pg)["in_use"] == SLOTS - 1 - 3 + 1


def test_slots_of_a_dropped_database_are_reclaimed(pg):
    pg.sql("CREATE DATABASE slots_other")
    pg.sql("CREATE EXTENSION twotier", dbname="slots_other")
    pg.sql("CREATE TABLE src (k int PRIMARY KEY, v text)", dbname="slots_other")
    pg.sql("INSERT INTO src VALUES (1, 'one')", dbname="slots_other")
    free = SLOTS - 1 - status(pg)["in_use"]
    others = [f"o{i}" for i in range(free)]
    for n in others:
        pg.sql(f"SELECT twotier.define('{n}', $q$SELECT jsonb_build_object('v', v) FROM src WHERE k = $1$q$,"
               " '5 min', ARRAY['src(k)'])", dbname="slots_other")
    with pg.connect(dbname="slots_other") as c:
        for n in others:
            c.execute(f"SELECT cached_{n}(1)")
    assert status(pg)["full"]
    pg.sql("DROP DATABASE slots_other WITH (FORCE)")
    define(pg, "after_db")
    assert call_all(pg, ["after_db"]) == []
    assert stats(pg).get("after_db") == 1
