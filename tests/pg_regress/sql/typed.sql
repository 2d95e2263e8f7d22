-- Typed and composite keys, json pass-through, many keys in one call, the schema of the
-- generated functions, and redefinitions that change their signature.
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS twotier;
RESET client_min_messages;
\set VERBOSITY terse

CREATE TABLE widgets (domain_id uuid PRIMARY KEY, theme text, version int NOT NULL DEFAULT 1);
INSERT INTO widgets VALUES ('a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'dark'),
                           ('b1eebc99-9c0b-4ef8-bb6d-6bb9bd380a22', 'light');
CREATE TABLE faq (tenant_id int, locale text, question text, PRIMARY KEY (tenant_id, locale, question));
INSERT INTO faq VALUES (1, 'en', 'How?'), (1, 'en', 'Why?'), (1, 'de', 'Wie?'), (2, 'en', 'What, "exactly"?');
CREATE TYPE mood AS ENUM ('sad', 'ok');
CREATE TABLE events (at timestamptz, mood mood, n int, PRIMARY KEY (at, mood));
INSERT INTO events VALUES ('2024-01-02 03:04:05+00', 'ok', 1);

-- the key's type is inferred from the query ($1 compared with a uuid column) ...
SELECT twotier.define('widget', $$SELECT jsonb_build_object('theme', theme, 'version', version)
                                    FROM widgets WHERE domain_id = $1$$, '5 min', ARRAY['widgets(domain_id)']);
-- ... or given, with names for the parts of a composite key
SELECT twotier.define('faqs', $$SELECT jsonb_agg(question ORDER BY question) FROM faq
                                 WHERE tenant_id = $1 AND locale = $2$$, '5 min', ARRAY['faq(tenant_id, locale)'],
                      key_types => ARRAY['int', 'text'], key_names => ARRAY['tenant', 'locale']);
-- json pass-through
SELECT twotier.define('widget_json', $$SELECT jsonb_build_object('theme', theme, 'version', version)
                                         FROM widgets WHERE domain_id = $1$$, '5 min', ARRAY['widgets(domain_id)'],
                      returns => 'json');
-- types whose text depends on settings (timestamptz) and user types (an enum)
SELECT twotier.define('event', $$SELECT jsonb_build_object('n', n) FROM events WHERE at = $1 AND mood = $2$$,
                      '5 min', ARRAY['events(at, mood)']);
SELECT name, key_types, key_names, returns, function, many_function FROM twotier.caches ORDER BY name;
SELECT p.oid::regprocedure, pg_get_function_result(p.oid) AS returns
  FROM pg_proc p WHERE proname LIKE 'cached\_%' ORDER BY 1::text;

-- calls: typed arguments, untyped literals, and the generic call with the canonical text
SELECT cached_widget('a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11');
SELECT cached_widget('A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11'::uuid);
SELECT twotier.get('widget', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11');
SELECT cached_faqs(1, 'en'), cached_faqs(2, 'en'), cached_faqs(3, 'en');
SELECT twotier.key_text(1, 'en'), twotier.key_text(2, 'a,"b"'), twotier.key_text('x'::text);
SET TimeZone = 'Asia/Tokyo';
SET DateStyle = 'German';
SELECT cached_event('2024-01-02 12:04:05+09', 'ok');
SELECT twotier.key_text('2024-01-02 12:04:05+09'::timestamptz, 'ok'::mood);
RESET TimeZone;
RESET DateStyle;

-- json mode returns the very text jsonb mode prints
SELECT cached_widget_json('a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11')::text
     = cached_widget('a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11')::text AS same_text;
SELECT pg_typeof(cached_widget_json('a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'));
SELECT twotier.get_json('widget', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11');
SELECT twotier.get('widget_json', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11') ->> 'theme';

-- many keys: one row per key, in the order given, NULL for "no row"
SELECT * FROM cached_widget_many(ARRAY['b1eebc99-9c0b-4ef8-bb6d-6bb9bd380a22',
                                       'ffffffff-9c0b-4ef8-bb6d-6bb9bd380a11',
                                       'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11']::uuid[]);
SELECT * FROM cached_faqs_many(ARRAY[2, 1, 1], ARRAY['en', 'de', 'en']);
SELECT * FROM cached_widget_json_many(ARRAY['a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11']::uuid[]);
SELECT * FROM twotier.get_many('faqs', ARRAY['1,en', '2,en']);
SELECT count(*) FROM cached_widget_many('{}');

-- invalidation by the triggers reaches composite keys
UPDATE faq SET question = 'How come?' WHERE tenant_id = 1 AND locale = 'en' AND question = 'How?';
SELECT cached_faqs(1, 'en');

-- bad input
SELECT cached_widget('not a uuid');
SELECT twotier.get('widget', 'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11');
SELECT twotier.get('faqs', '1');
SELECT cached_faqs(NULL, 'en');
SELECT * FROM cached_widget_many(ARRAY['a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', NULL]::uuid[]);
SELECT * FROM cached_widget_many(ARRAY['a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
                                       'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11']::uuid[]);
SELECT * FROM cached_faqs_many(ARRAY[1, 2], ARRAY['en']);
SET twotier.max_many_keys = 2;
SELECT * FROM twotier.get_many('faqs', ARRAY['1,en', '2,en', '3,en']);
RESET twotier.max_many_keys;
SELECT twotier.key_text(1.5::numeric);
SELECT twotier.key_text(VARIADIC ARRAY[1, 2]);
SELECT twotier.define('bad', $$SELECT to_jsonb(w) FROM widgets w WHERE domain_id = $1$$, '1 min', '{}',
                      key_types => ARRAY['int']);
SELECT twotier.define('bad', $$SELECT to_jsonb(w) FROM widgets w WHERE version = $1$$, '1 min', '{}',
                      key_types => ARRAY['numeric']);
SELECT twotier.define('bad', $$SELECT to_jsonb(w) FROM widgets w WHERE version = $1$$, '1 min', '{}',
                      key_types => ARRAY['float8']);
SELECT twotier.define('bad', $$SELECT to_jsonb(w) FROM widgets w WHERE version = $1$$, '1 min', '{}',
                      key_types => ARRAY['jsonb']);
SELECT twotier.define('bad', $$SELECT to_jsonb(w) FROM widgets w WHERE version = $1$$, '1 min', '{}',
                      key_types => ARRAY['nosuchtype']);
SELECT twotier.define('bad', $$SELECT to_jsonb(f) FROM faq f WHERE tenant_id = $1$$, '1 min', '{}',
                      key_types => ARRAY['int', 'text']);
SELECT twotier.define('bad', $$SELECT to_jsonb(f) FROM faq f WHERE tenant_id = $1 AND locale = $3$$, '1 min', '{}',
                      key_types => ARRAY['int', 'text']);
SELECT twotier.define('bad', $$SELECT jsonb_agg(f) FROM faq f WHERE tenant_id = $1 AND locale = $2$$, '1 min',
                      ARRAY['faq(tenant_id)']);
SELECT twotier.define('bad', $$SELECT jsonb_agg(f) FROM faq f WHERE tenant_id = $1 AND locale = $2$$, '1 min',
                      ARRAY['faq(tenant_id, locale)'], key_names => ARRAY['value', 'x']);
SELECT twotier.define('bad', $$SELECT to_jsonb(w) FROM widgets w WHERE domain_id = $1$$, '1 min', '{}', returns => 'text');
SELECT twotier.define('bad', $$SELECT to_jsonb(w) FROM widgets w WHERE domain_id = $1$$, '1 min', '{}', schema => 'pg_catalog');
SELECT twotier.define('bad', $$SELECT to_jsonb(w) FROM widgets w WHERE domain_id = $1$$, '1 min', '{}', schema => 'nosuch');
-- an inferred type without a canonical text leaves the key text, as before keys had types
SELECT twotier.define('by_float', $$SELECT to_jsonb(w) FROM widgets w WHERE version = $1::float8$$, '1 min', '{}');
SELECT twotier.drop('by_float');

-- redefinition with another key type, return mode and schema: the old functions go, the
-- grants come over
CREATE ROLE typed_reader;
GRANT EXECUTE ON FUNCTION cached_widget(uuid) TO typed_reader;
CREATE SCHEMA api;
GRANT USAGE ON SCHEMA api TO typed_reader;
SELECT twotier.define('widget', $$SELECT jsonb_build_object('theme', theme, 'version', version)
                                    FROM widgets WHERE domain_id = $1::uuid$$, '5 min', ARRAY['widgets(domain_id::text)'],
                      key_types => ARRAY['text'], returns => 'json', schema => 'api');
SELECT p.oid::regprocedure, pg_get_function_result(p.oid) AS returns, p.proacl
  FROM pg_proc p WHERE proname LIKE 'cached\_widget%' AND proname NOT LIKE '%json%' ORDER BY 1::text;
SET ROLE typed_reader;
SELECT api.cached_widget('b1eebc99-9c0b-4ef8-bb6d-6bb9bd380a22');
SELECT * FROM api.cached_widget_many(ARRAY['b1eebc99-9c0b-4ef8-bb6d-6bb9bd380a22']);
SELECT * FROM cached_widget_json_many(ARRAY['a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11']::uuid[]);
RESET ROLE;
-- a function of the same name that is not ours, even with other arguments, is not replaced
CREATE FUNCTION cached_other(key int) RETURNS jsonb LANGUAGE sql AS 'SELECT NULL::jsonb';
SELECT twotier.define('other', $$SELECT to_jsonb(w) FROM widgets w WHERE domain_id = $1$$, '1 min', '{}');

-- leave nothing behind
SELECT twotier.drop(name) FROM twotier.caches ORDER BY name;
SELECT count(*) AS functions_left FROM pg_proc WHERE proname LIKE 'cached\_%' AND proname <> 'cached_other';
DROP FUNCTION cached_other(int);
REVOKE USAGE ON SCHEMA api FROM typed_reader;
DROP SCHEMA api;
DROP ROLE typed_reader;
DROP TABLE widgets, faq, events;
DROP TYPE mood;
DROP EXTENSION twotier CASCADE;
DROP SCHEMA IF EXISTS twotier;
