-- vary_by by a path into a setting, and define's check that vary_by covers what the policies
-- of the tables read (issue 22).
CREATE EXTENSION twotier;
\set VERBOSITY default
\set SHOW_CONTEXT never
CREATE SCHEMA auth;
CREATE FUNCTION auth.uid() RETURNS text LANGUAGE sql STABLE
    AS $$ SELECT nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub' $$;
CREATE TABLE orders (id int PRIMARY KEY, owner text, status text, amount int);
INSERT INTO orders VALUES (1, 'u1', 'open', 10), (2, 'u2', 'open', 20), (3, 'u1', 'paid', 30);
ALTER TABLE orders ENABLE ROW LEVEL SECURITY;
CREATE POLICY mine ON orders TO PUBLIC USING (owner = auth.uid());

-- Paths are checked as written: steps with ->, a last one with ->>.
SELECT twotier.define('o', $q$SELECT jsonb_agg(id ORDER BY id) FROM orders WHERE status = $1$q$,
       '1 min', ARRAY['orders(status)'], vary_by => ARRAY['request.jwt.claims->>sub->x']);
SELECT twotier.define('o', $q$SELECT jsonb_agg(id ORDER BY id) FROM orders WHERE status = $1$q$,
       '1 min', ARRAY['orders(status)'], vary_by => ARRAY['request.jwt.claims->']);
-- The policy reads request.jwt.claims through auth.uid(): varying by another setting is
-- refused, and so is varying by nothing but the role.
SELECT twotier.define('o', $q$SELECT jsonb_agg(id ORDER BY id) FROM orders WHERE status = $1$q$,
       '1 min', ARRAY['orders(status)'], vary_by => ARRAY['request.jwt.other->>sub']);
SELECT twotier.define('o', $q$SELECT jsonb_agg(id ORDER BY id) FROM orders WHERE status = $1$q$,
       '1 min', ARRAY['orders(status)'], vary_by => ARRAY['role']);
-- A path into the setting covers it.
SELECT twotier.define('o', $q$SELECT jsonb_agg(id ORDER BY id) FROM orders WHERE status = $1$q$,
       '1 min', ARRAY['orders(status)'], vary_by => ARRAY['request.jwt.claims->>sub']);

-- A policy for chosen roles needs 'role' too.
CREATE POLICY staff ON orders TO pg_monitor USING (status = 'paid');
SELECT twotier.define('o2', $q$SELECT jsonb_agg(id ORDER BY id) FROM orders WHERE status = $1$q$,
       '1 min', ARRAY['orders(status)'], vary_by => ARRAY['request.jwt.claims->>sub']);
SELECT twotier.define('o2', $q$SELECT jsonb_agg(id ORDER BY id) FROM orders WHERE status = $1$q$,
       '1 min', ARRAY['orders(status)'], vary_by => ARRAY['role', 'request.jwt.claims->>sub']);
DROP POLICY staff ON orders;

-- What cannot be told is a WARNING: a setting named by an expression.
CREATE FUNCTION auth.claim(name text) RETURNS text LANGUAGE plpgsql STABLE
    AS $$ BEGIN RETURN current_setting(name, true); END $$;
CREATE POLICY by_claim ON orders USING (owner = auth.claim('request.jwt.who'));
SELECT twotier.define('o3', $q$SELECT jsonb_agg(id ORDER BY id) FROM orders WHERE status = $1$q$,
       '1 min', ARRAY['orders(status)'], vary_by => ARRAY['request.jwt.claims->>sub']);
DROP POLICY by_claim ON orders;

-- `per`: a row is visible only to the caller whose sub is its owner, so a write reaches the
-- key in that caller's variants only. It must name a vary_by entry (or its path's last step).
SELECT twotier.define('o4', $q$SELECT jsonb_agg(id ORDER BY id) FROM orders WHERE status = $1$q$,
       '1 min', ARRAY['orders(status) per sub = owner'], vary_by => ARRAY['request.jwt.claims->>sub']);
SELECT watch, per FROM twotier.caches WHERE name = 'o4';
SELECT twotier.define('o5', $q$SELECT jsonb_agg(id ORDER BY id) FROM orders WHERE status = $1$q$,
       '1 min', ARRAY['orders(status) per tenant = owner'], vary_by => ARRAY['request.jwt.claims->>sub']);

-- A call needs the setting to be set, and JSON (as the policy itself would).
SELECT cached_o('open');
SET request.jwt.claims = '';
SELECT cached_o('open');
SET request.jwt.claims = 'not json';
SELECT cached_o('open');
-- Tokens re-issued (another iat) share the variant; another sub does not. (The superuser
-- running this test bypasses RLS: the rows are the same, the entries are not.)
SET request.jwt.claims = '{"sub": "u1", "iat": 1}';
SELECT cached_o('open');
SET request.jwt.claims = '{"sub": "u1", "iat": 2}';
SELECT cached_o('open');
SET request.jwt.claims = '{"sub": "u2", "iat": 2}';
SELECT cached_o('open');
SELECT calls, l1_hits + l2_hits AS hits, misses FROM twotier.stats WHERE cache = 'o';

DROP EXTENSION twotier CASCADE;
DROP SCHEMA twotier;
