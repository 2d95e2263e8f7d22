-- The generic API without Redis: get reads through L1 and the source, set / invalidate /
-- patterns touch only what exists (L1), exists answers about L2 (absent), stats and status.
CREATE EXTENSION twotier;
CREATE TABLE users (id text PRIMARY KEY, name text);
INSERT INTO users VALUES ('user-1', 'Ada'), ('user-2', 'Grace'), ('product-1', 'Widget');
CREATE SEQUENCE fetches;
SELECT twotier.define('users', $q$SELECT jsonb_build_object('name', name, 'fetch', nextval('fetches'))
                                   FROM users WHERE id = $1$q$, '10 min', ARRAY['users(id)']);
SELECT twotier.reset_stats();

SELECT twotier.get('users', 'user-1'), twotier.get('users', 'user-1');
SELECT twotier.get('users', 'user-2'), twotier.get('users', 'product-1');
SELECT twotier.get('users', 'nobody'), twotier.get('users', 'nobody');
SELECT last_value AS source_runs FROM fetches;

-- without Redis there is no L2 entry
SELECT twotier.exists('users', 'user-1');
SELECT twotier.set('users', 'user-9', '{"name": "set by hand"}');
-- patterns: L1 entries of this cache matching the glob
SELECT twotier.invalidate_pattern('users', 'user-*');
SELECT twotier.get('users', 'user-1')->>'name' AS refetched, twotier.get('users', 'product-1')->>'name' AS kept;
SELECT last_value AS source_runs FROM fetches;
SELECT twotier.invalidate('users', 'product-1');
SELECT twotier.get('users', 'product-1')->>'name';
SELECT last_value AS source_runs FROM fetches;

SELECT cache, calls, l1_hits, l2_hits, misses, negative_hits, bypasses, fills, invalidations, redis_errors, hit_ratio
  FROM twotier.stats;
SELECT l1_hit_mean_us > 0 AS timed, miss_p99_us >= miss_mean_us AS p99_ge_mean FROM twotier.stats;

SELECT s->'l2'->>'configured' AS l2_configured, s->'l1'->>'available' AS l1, s->>'preloaded' AS preloaded,
       s->'l1'->'worker'->>'alive' AS worker_alive
  FROM twotier.status() s;

-- warm loads every key its query returns
SELECT twotier.flush('users');
SELECT twotier.warm('users', 'SELECT id FROM users');
SELECT misses FROM twotier.stats WHERE cache = 'users';

-- leave nothing behind: the next test creates the extension again
DROP EXTENSION twotier CASCADE;
DROP SCHEMA twotier;
