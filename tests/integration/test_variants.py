"""vary_by variants (issue 22): tokens of one user share their entries, a write invalidates its
key in every variant (L1 and L2) and leaves other keys alone, and what Redis forgets costs
misses, never stale answers. `twotier.test_variants_ignore_key` turns off what carries a key's
invalidation to its variants: the tests then see the stale answer they exist to catch."""
import itertools
import json
import threading
import time

import psycopg
import pytest

from conftest import database_scope, delivery_of, redis_incarnation, wait_for

_names = itertools.count(1)


class VaryCache:
    """Table `name` (k int, v text) with rows 1..3 and a cache varying by the claims' `sub`,
    whose answer names the sub it was computed for and counts its executions."""

    def __init__(self, cluster, redis_server):
        self.cluster = cluster
        self.redis = redis_server
        self.name = n = f"var{next(_names)}"
        cluster.sql(f"CREATE TABLE {n}(k int PRIMARY KEY, v text)")
        cluster.sql(f"INSERT INTO {n} SELECT g, 'v' || g FROM generate_series(1, 3) g")
        cluster.sql(f"CREATE SEQUENCE {n}_fetches")
        # `slow` in the claims makes one fill slow without changing the variant.
        cluster.sql(f"""SELECT twotier.define('{n}',
            $q$SELECT jsonb_build_object('v', v, 'sub', current_setting('request.jwt.claims')::jsonb ->> 'sub',
                                         'n', nextval('{n}_fetches'),
                                         'slept', (SELECT true FROM pg_sleep(coalesce((current_setting('request.jwt.claims')::jsonb ->> 'slow')::float8, 0))))
                 FROM {n} WHERE k = $1::int$q$,
            '5 min', ARRAY['{n}(k)'], vary_by => ARRAY['request.jwt.claims->>sub'])""")

    def fetches(self) -> int:
        (last, called), = self.cluster.sql(f"SELECT last_value, is_called FROM {self.name}_fetches")
        return last if called else 0

    def read(self, conn, key, sub, **claims):
        payload = json.dumps({"sub": sub, "role": "authenticated", "iat": int(time.time() * 1000), **claims})
        conn.execute("SELECT set_config('request.jwt.claims', %s, false)", (payload,))
        got = conn.execute(f"SELECT cached_{self.name}(%s)", (str(key),)).fetchone()[0]
        assert got is None or got["sub"] == sub, f"{sub} was served {got}"
        return got

    def session(self, l1=True, ignore_key=False):
        c = self.cluster.connect()
        if not l1:
            c.execute("SET twotier.l1_enabled = off")
        if ignore_key:
            c.execute("SET twotier.test_variants_ignore_key = on")
        return c

    def wait_delivered(self):
        assert wait_for(lambda: delivery_of(self.cluster)["undelivered"] == 0, timeout=10)

    def redis_base(self, key) -> str:
        (version,), = self.cluster.sql("SELECT version FROM twotier.caches WHERE name = %s", self.name)
        inc = redis_incarnation(self.redis, self.cluster)
        return f"twotier:{inc}:{database_scope(self.cluster)}:{self.name}:v{version}:{key}"


@pytest.fixture
def vc(cluster, redis_server):
    return VaryCache(cluster, redis_server)


@pytest.mark.parametrize("l1", [True, False], ids=["l1", "l2"])
def test_every_token_of_a_user_shares_its_entries(vc, l1):
    with vc.session(l1) as a, vc.session(l1) as b:
        assert vc.read(a, 1, "u1")["v"] == "v1"
        before = vc.fetches()
        # Another session, another token (iat) of the same user: a hit.
        assert vc.read(b, 1, "u1")["v"] == "v1"
        assert vc.fetches() == before, "a re-issued token missed"
        # Another user has an entry of its own.
        assert vc.read(b, 1, "u2")["sub"] == "u2"
        assert vc.fetches() == before + 1


@pytest.mark.parametrize("l1", [True, False], ids=["l1", "l2"])
@pytest.mark.parametrize("protected", [True, False], ids=["protected", "test_variants_ignore_key"])
def test_a_write_reaches_every_variant_of_its_key_and_no_other_key(vc, l1, protected):
    with vc.session(l1, ignore_key=not protected) as c:
        for key in (1, 2):
            for sub in ("u1", "u2", "u3"):
                vc.read(c, key, sub)
        before = vc.fetches()
        vc.cluster.sql(f"UPDATE {vc.name} SET v = 'new' WHERE k = 1")
        vc.wait_delivered()
        # Key 2 is untouched: every variant still hits.
        for sub in ("u1", "u2", "u3"):
            assert vc.read(c, 2, sub)["v"] == "v2"
        assert vc.fetches() == before, "a write to key 1 cost key 2 its entries"
        got = {sub: vc.read(c, 1, sub)["v"] for sub in ("u1", "u2", "u3")}
    if protected:
        assert got == {"u1": "new", "u2": "new", "u3": "new"}
        assert vc.fetches() == before + 3
    else:
        # Without the key's generation in the variants, the old answers are served.
        assert set(got.values()) == {"v1"}, got


def test_a_lost_token_costs_misses_never_stale_answers(vc):
    r = vc.redis.client()
    with vc.session(l1=False) as c:
        vc.read(c, 1, "u1")
        vc.read(c, 1, "u2")
        base = vc.redis_base(1)
        assert r.get(base).startswith(b"!gen:"), "the key holds its variants' token"
        variant = [k for k in r.scan_iter(match=base + "~v*") if not k.endswith(b"~lease")]
        assert len(variant) == 2
        # The token evicted (or flushed) alone: its variants are misses, then filled again.
        r.delete(base)
        before = vc.fetches()
        assert vc.read(c, 1, "u1")["v"] == "v1"
        assert vc.fetches() == before + 1
        # A write while the key has no token at all still reaches every variant.
        vc.cluster.sql(f"UPDATE {vc.name} SET v = 'newer' WHERE k = 1")
        vc.wait_delivered()
        assert vc.read(c, 1, "u1")["v"] == "newer"
        assert vc.read(c, 1, "u2")["v"] == "newer"


def test_a_slow_fill_that_read_before_a_write_stores_nothing(vc):
    """The variant fill compares its key's content in Redis: a fill whose read came before a
    write's tombstone is refused there (the ledger's check is turned off for this session, so
    Redis's compare-and-set alone decides)."""
    result = {}

    def slow_reader():
        with vc.session(l1=False) as c:
            c.execute("SET twotier.test_fill_trusts_redis = on")
            result["slow"] = vc.read(c, 1, "u1", slow=1.5)

    with vc.session(l1=False) as c:
        vc.read(c, 1, "u2")  # the key has a token; u1's variant does not exist yet
    t = threading.Thread(target=slow_reader)
    t.start()
    time.sleep(0.5)
    vc.cluster.sql(f"UPDATE {vc.name} SET v = 'after' WHERE k = 1")
    vc.wait_delivered()
    t.join()
    assert result["slow"]["v"] == "v1", "the slow read began before the write"
    with vc.session(l1=False) as c:
        assert vc.read(c, 1, "u1")["v"] == "after", "the slow fill put back what it read before the write"


class PerCache(VaryCache):
    """Rows (k, owner, v), visible to the caller whose sub is the row's owner (the query
    filters as a policy would), and a watch entry declared `per sub = owner`."""

    def __init__(self, cluster, redis_server):
        self.cluster = cluster
        self.redis = redis_server
        self.name = n = f"per{next(_names)}"
        cluster.sql(f"CREATE TABLE {n}(id int PRIMARY KEY, k int, owner text, v text)")
        cluster.sql(f"INSERT INTO {n} VALUES (1, 1, 'u1', 'a'), (2, 1, 'u2', 'b'), (3, 2, 'u1', 'c')")
        cluster.sql(f"CREATE SEQUENCE {n}_fetches")
        cluster.sql(f"""SELECT twotier.define('{n}',
            $q$SELECT jsonb_build_object('v', coalesce(jsonb_agg(v ORDER BY id), '[]'),
                                         'sub', current_setting('request.jwt.claims')::jsonb ->> 'sub',
                                         'n', nextval('{n}_fetches'))
                 FROM {n} WHERE k = $1::int AND owner = current_setting('request.jwt.claims')::jsonb ->> 'sub'$q$,
            '5 min', ARRAY['{n}(k) per sub = owner'], vary_by => ARRAY['request.jwt.claims->>sub'])""")


@pytest.mark.parametrize("l1", [True, False], ids=["l1", "l2"])
def test_a_write_per_owner_reaches_only_that_owners_variant(cluster, redis_server, l1):
    pc = PerCache(cluster, redis_server)
    (watch,), = cluster.sql("SELECT watch FROM twotier.caches WHERE name = %s", pc.name)
    assert watch == [f"public.{pc.name}(k) per request.jwt.claims->>sub = owner"]
    with pc.session(l1) as c:
        assert pc.read(c, 1, "u1")["v"] == ["a"]
        assert pc.read(c, 1, "u2")["v"] == ["b"]
        before = pc.fetches()
        cluster.sql(f"UPDATE {pc.name} SET v = 'a2' WHERE id = 1")
        pc.wait_delivered()
        assert pc.read(c, 1, "u2")["v"] == ["b"]
        assert pc.fetches() == before, "u1's write cost u2 its entry"
        assert pc.read(c, 1, "u1")["v"] == ["a2"]
        assert pc.fetches() == before + 1
        # A row that changes hands reaches both owners' groups.
        cluster.sql(f"UPDATE {pc.name} SET owner = 'u2' WHERE id = 1")
        pc.wait_delivered()
        assert pc.read(c, 1, "u1")["v"] == []
        assert pc.read(c, 1, "u2")["v"] == ["a2", "b"]
        # twotier.invalidate names no group: the whole cache moves at commit.
        (version,), = cluster.sql("SELECT version FROM twotier.caches WHERE name = %s", pc.name)
        cluster.sql(f"SELECT twotier.invalidate('{pc.name}', '2')")
        (after,), = cluster.sql("SELECT version FROM twotier.caches WHERE name = %s", pc.name)
        assert after != version


def test_per_must_name_a_vary_by_entry(cluster):
    cluster.sql("CREATE TABLE per_bad(id int PRIMARY KEY, k int, owner text)")
    for watch, vary in (("per_bad(k) per tenant = owner", "ARRAY['request.jwt.claims->>sub']"),
                        ("per_bad(k) per role = owner", "ARRAY['role']")):
        with pytest.raises(psycopg.errors.InvalidParameterValue):
            cluster.sql(f"""SELECT twotier.define('per_bad', $q$SELECT to_jsonb(p) FROM per_bad p WHERE k = $1::int$q$,
                            '1 min', ARRAY['{watch}'], vary_by => {vary})""")
