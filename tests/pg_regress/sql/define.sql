-- The SQL surface of define / drop / flush and the catalog, with no Redis configured
-- (twotier.redis_url = ''): every call is answered by L1 or the source.
CREATE EXTENSION twotier;
SET client_min_messages = notice;
\set SHOW_CONTEXT never

CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL, price numeric NOT NULL);
INSERT INTO items VALUES (1, 'apple', 0.5), (2, 'pear', 0.75);
CREATE TABLE tags (item_id int REFERENCES items, tag text);
INSERT INTO tags VALUES (1, 'fruit'), (2, 'fruit'), (2, 'green');

SELECT twotier.define('item',
    $q$SELECT jsonb_build_object('name', i.name, 'price', i.price,
                                 'tags', (SELECT jsonb_agg(t.tag ORDER BY t.tag) FROM tags t WHERE t.item_id = i.id))
         FROM items i WHERE i.id = $1::int$q$,
    interval '5 minutes', ARRAY['items(id)', 'tags(item_id)']);

-- the generated function and its triggers
SELECT p.oid::regprocedure, p.provolatile, p.proisstrict, pg_get_userbyid(p.proowner) = current_user AS owned_by_definer
  FROM pg_proc p WHERE p.proname = 'cached_item';
SELECT tgname, tgrelid::regclass FROM pg_trigger WHERE tgname LIKE 'twotier_item_%' ORDER BY tgname;
SELECT name, ttl, negative_ttl, watch, owner = current_user::regrole AS owner_ok, search_path, function
  FROM twotier.caches;

-- answers, NULL for an unknown key, the same through twotier.get
SELECT cached_item('1'), cached_item('2'), cached_item('3') IS NULL AS unknown_is_null;
SELECT twotier.get('item', '2') = cached_item('2') AS same;
-- the planner inlines the wrapper: no SQL-function call per row
EXPLAIN (VERBOSE, COSTS OFF) SELECT cached_item('1');

-- changes are seen (the cache is invalidated at commit; here each statement commits)
UPDATE items SET price = 0.55 WHERE id = 1;
SELECT cached_item('1')->>'price' AS price;
INSERT INTO tags VALUES (1, 'red');
SELECT cached_item('1')->'tags' AS tags;
INSERT INTO items VALUES (3, 'plum', 1.2);
SELECT cached_item('3')->>'name' AS new_item;

-- a writing transaction reads its own writes
BEGIN;
UPDATE items SET name = 'green apple' WHERE id = 1;
SELECT cached_item('1')->>'name' AS inside;
ROLLBACK;
SELECT cached_item('1')->>'name' AS after_rollback;

-- TRUNCATE empties the cache (by moving it to a new version)
SELECT version AS v1 FROM twotier.caches WHERE name = 'item' \gset
TRUNCATE tags;
SELECT version > :v1 AS version_moved FROM twotier.caches WHERE name = 'item';
SELECT cached_item('2')->'tags' AS tags_after_truncate;

-- flush is O(1): a new version
SELECT version AS v2 FROM twotier.caches WHERE name = 'item' \gset
SELECT twotier.flush('item');
SELECT version > :v2 AS flushed FROM twotier.caches WHERE name = 'item';

-- redefine replaces (same function, new query and version)
SELECT twotier.define('item', $q$SELECT jsonb_build_object('n', name) FROM items WHERE id = $1::int$q$,
                      interval '1 minute', ARRAY['items(id)'], negative_ttl => interval '5 seconds');
SELECT cached_item('2');
SELECT ttl, negative_ttl, watch FROM twotier.caches WHERE name = 'item';
SELECT count(*) AS triggers FROM pg_trigger WHERE tgname LIKE 'twotier_item_%';

-- drop removes the function, the triggers and the row
SELECT twotier.drop('item');
SELECT count(*) AS functions FROM pg_proc WHERE proname = 'cached_item';
SELECT count(*) AS triggers FROM pg_trigger WHERE tgname LIKE 'twotier_item_%';
SELECT count(*) AS caches FROM twotier.caches;

-- leave nothing behind: the next test creates the extension again
DROP EXTENSION twotier CASCADE;
DROP SCHEMA twotier;
