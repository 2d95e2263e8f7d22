-- Bad input gets a clear ERROR with a SQLSTATE and a hint, and changes nothing.
CREATE EXTENSION twotier;
\set VERBOSITY default
\set SHOW_CONTEXT never
CREATE TABLE t (id int PRIMARY KEY, v text);
INSERT INTO t VALUES (1, 'one');

SELECT twotier.define('Bad Name', 'SELECT to_jsonb(t) FROM t WHERE id = $1::int', '1 min', '{}');
SELECT twotier.define('ok', 'SELECT to_jsonb(t) FROM t WHERE id = $1::int', '0 seconds', '{}');
SELECT twotier.define('ok', 'SELECT v FROM t WHERE id = $1::int', '1 min', '{}');
SELECT twotier.define('ok', 'SELECT to_jsonb(t), 1 FROM t WHERE id = $1::int', '1 min', '{}');
SELECT twotier.define('ok', 'SELECT to_jsonb(t) FROM t WHERE id = $1::int; SELECT 1', '1 min', '{}');
SELECT twotier.define('ok', 'SELECT to_jsonb(t) FROM nosuch t WHERE id = $1::int', '1 min', '{}');
SELECT twotier.define('ok', 'SELECT to_jsonb(t) FROM t WHERE id = $1::int', '1 min', ARRAY['t id']);
SELECT twotier.define('ok', 'SELECT to_jsonb(t) FROM t WHERE id = $1::int', '1 min', ARRAY['nosuch(id)']);
SELECT twotier.define('ok', 'SELECT to_jsonb(t) FROM t WHERE id = $1::int', '1 min', ARRAY['t(nocolumn)']);
SELECT twotier.define('ok', 'SELECT to_jsonb(t) FROM t WHERE id = $1::int', '1 min', ARRAY['t(id; DROP TABLE t)']);
CREATE VIEW tv AS SELECT * FROM t;
SELECT twotier.define('ok', 'SELECT to_jsonb(t) FROM t WHERE id = $1::int', '1 min', ARRAY['tv(id)']);
-- row-level security: every caller would get the definer's rows
CREATE TABLE secret (id int, v text);
ALTER TABLE secret ENABLE ROW LEVEL SECURITY;
SELECT twotier.define('ok', 'SELECT to_jsonb(s) FROM secret s WHERE id = $1::int', '1 min', '{}');
-- a name already taken by a function that is not ours
CREATE FUNCTION cached_taken(key text) RETURNS jsonb LANGUAGE sql AS 'SELECT NULL::jsonb';
SELECT twotier.define('taken', 'SELECT to_jsonb(t) FROM t WHERE id = $1::int', '1 min', '{}');
-- nothing was created by the failures above
SELECT count(*) AS caches FROM twotier.caches;
SELECT count(*) AS functions FROM pg_proc WHERE proname LIKE 'cached_%' AND proname <> 'cached_taken';

-- a table read but not watched: allowed, with a NOTICE
SELECT twotier.define('ok', 'SELECT to_jsonb(t) FROM t WHERE id = $1::int', '1 min', '{}');

-- calls
SELECT twotier.get('nosuch', 'k');
SELECT twotier.drop('nosuch');
SELECT twotier.flush('nosuch');
SELECT twotier.get('ok', repeat('x', 2000));
CREATE TABLE dup (k int, v text);
INSERT INTO dup VALUES (1, 'a'), (1, 'b');
SELECT twotier.define('dup', 'SELECT to_jsonb(d) FROM dup d WHERE k = $1::int', '1 min', ARRAY['dup(k)']);
SELECT cached_dup('1');
-- PREPARE TRANSACTION is refused for a writer of a cache (max_prepared_transactions is 0
-- here, so the refusal must come from twotier before PostgreSQL's own check)
BEGIN;
UPDATE t SET v = 'two' WHERE id = 1;
SELECT twotier.invalidate('ok', '1');
PREPARE TRANSACTION 'tx';

-- leave nothing behind: the next test creates the extension again
DROP EXTENSION twotier CASCADE;
DROP SCHEMA twotier;
