-- twotier catalog and SQL surface. Everything a DBA can read or call lives in schema twotier.

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'twotier_admin') THEN
        -- Roles are cluster-wide and outlive the extension; created once, never dropped by us.
        CREATE ROLE twotier_admin NOLOGIN;
    END IF;
END
$$;

-- Every role may call what it has been granted in here (cached functions inline to
-- twotier.get, and the view); the functions themselves carry the real privileges.
GRANT USAGE ON SCHEMA twotier TO PUBLIC;

CREATE TABLE twotier.caches (
    name text PRIMARY KEY
        CHECK (name ~ '^[a-z_][a-z0-9_]*$' AND length(name) <= 48),
    query text NOT NULL,
    ttl interval NOT NULL CHECK (ttl >= interval '1 second'),
    negative_ttl interval CHECK (negative_ttl >= interval '1 second'),
    watch text[] NOT NULL DEFAULT '{}',
    -- What the answer depends on besides the key ('role', setting names): part of every key,
    -- and the query runs as the caller. Empty: one answer per key, computed as the owner.
    vary_by text[] NOT NULL DEFAULT '{}',
    -- The vary_by entry (a path such as request.jwt.claims->>sub) that watch entries declared
    -- `per`: a row of such a table is visible only to callers whose entry equals the row's
    -- per expression, and its change invalidates the key in their variants only.
    per text,
    -- The types of the key's parts ($1, $2, ... of the query) and the names the generated
    -- functions give them. A key is stored as its canonical text: each part rendered by its
    -- type's output function under pinned settings, several parts joined by twotier.key_text.
    key_types regtype[] NOT NULL DEFAULT '{text}' CHECK (cardinality(key_types) BETWEEN 1 AND 8),
    key_names text[] NOT NULL DEFAULT '{key}' CHECK (cardinality(key_names) BETWEEN 1 AND 8),
    -- What cached_<name> returns: jsonb, or json (the canonical text, passed through as is).
    returns text NOT NULL DEFAULT 'jsonb' CHECK (returns IN ('jsonb', 'json')),
    -- Part of every Redis key: bumping it is an O(1) flush, and because it is a clock reading
    -- (strictly increasing) a dropped-and-recreated cache never meets its predecessor's keys.
    version bigint NOT NULL,
    owner regrole NOT NULL,
    search_path text NOT NULL,
    function regprocedure NOT NULL,
    -- cached_<name>_many(keys[]): many keys in one call.
    many_function regprocedure,
    trigger_functions regprocedure[] NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    updated_at timestamptz NOT NULL DEFAULT pg_catalog.now()
);
SELECT pg_catalog.pg_extension_config_dump('twotier.caches', '');
COMMENT ON TABLE twotier.caches IS 'One row per cache created by twotier.define(); change it only through define, drop and flush.';
GRANT SELECT ON twotier.caches TO PUBLIC;

-- The trigger of every watched table. C, not SECURITY DEFINER: it only collects keys, and
-- evaluates a key expression as the cache's owner. Only define() attaches it.
CREATE FUNCTION twotier._trigger() RETURNS trigger
    LANGUAGE c AS 'MODULE_PATHNAME', 'twotier_trigger';
REVOKE ALL ON FUNCTION twotier._trigger() FROM PUBLIC;

CREATE FUNCTION twotier._next_version(old bigint DEFAULT 0) RETURNS bigint
LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
    SELECT greatest(coalesce(old, 0) + 1,
                    (extract(epoch FROM clock_timestamp()) * 1000)::bigint)
$$;

-- Moves `cache` to a new key version when this transaction commits: flush, TRUNCATE, an
-- ALTER TABLE no trigger sees, a bulk change. Under the cache's lock, which writers take to
-- resolve their keys' version at PRE_COMMIT.
CREATE FUNCTION twotier._new_version(cache text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM twotier._lock_cache(cache);
    UPDATE twotier.caches SET version = twotier._next_version(version), updated_at = now() WHERE name = cache;
    PERFORM twotier._catalog_changed();
END
$$;

-- Whether `caller` (the role current when twotier.flush/drop was called) may administer a
-- cache owned by `owner`.
CREATE FUNCTION twotier._may_administer(caller oid, owner oid) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT pg_has_role(caller, owner, 'USAGE')
        OR pg_has_role(caller, 'twotier_admin', 'USAGE')
        OR (SELECT rolsuper FROM pg_roles WHERE oid = caller)
$$;

-- The triggers define() made for cache `name` (not their clones on partitions, which go with
-- them): the first trigger argument is the cache's name.
CREATE FUNCTION twotier._triggers_of(name text) RETURNS TABLE (tgname name, tgrelid regclass)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT t.tgname, t.tgrelid::regclass
      FROM pg_trigger t
     WHERE t.tgfoid = 'twotier._trigger()'::regprocedure AND t.tgparentid = 0
       AND (string_to_array(encode(t.tgargs, 'escape'), '\000'))[1] = name
$$;

CREATE FUNCTION twotier._drop_objects(c twotier.caches, drop_function boolean DEFAULT true) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
DECLARE
    f regprocedure;
    t record;
BEGIN
    FOR t IN SELECT * FROM twotier._triggers_of(c.name) LOOP
        EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', t.tgname, t.tgrelid);
    END LOOP;
    FOREACH f IN ARRAY c.trigger_functions LOOP
        -- CASCADE takes the triggers that call it; nothing else depends on these functions.
        EXECUTE format('DROP FUNCTION IF EXISTS %s CASCADE', f);
    END LOOP;
    IF drop_function AND c.many_function IS NOT NULL AND to_regprocedure(c.many_function::text) IS NOT NULL THEN
        EXECUTE format('DROP FUNCTION %s', c.many_function);
    END IF;
    IF drop_function AND to_regprocedure(c.function::text) IS NOT NULL THEN
        EXECUTE format('DROP FUNCTION %s', c.function);
    END IF;
END
$$;

-- What each cache's query depends on, as PostgreSQL's pg_depend says (recorded by
-- twotier._record_dependencies): DDL on any of these moves the cache to a new version. A
-- cache with no row here (not recorded yet, or what it depended on was dropped) counts as
-- depending on everything: any DDL moves it and records it again. Not dumped: OIDs do not
-- survive pg_dump, and a restored cache is recorded again at the first DDL.
CREATE TABLE twotier.dependencies (
    cache text NOT NULL,
    classid oid NOT NULL,
    objid oid NOT NULL,
    PRIMARY KEY (cache, classid, objid)
);
COMMENT ON TABLE twotier.dependencies IS 'What each cache''s query depends on (pg_depend''s classid, objid; 0, 0 marks a recorded cache). Managed by twotier.';
GRANT SELECT ON twotier.dependencies TO PUBLIC;

-- Records what cache `name`'s query depends on: PostgreSQL parses the query as the body of a
-- SQL-standard function made as the owner in the session's temporary schema
-- (twotier._dependency_probe), pg_depend lists what it names, and that is followed to what
-- those objects are built on (a table's columns to their types and domains, a view through its
-- rewrite rule to its tables, a composite type to its relation and attributes, a SQL-standard
-- function to what its body names: every normal, automatic and internal dependency forward,
-- and internal ones backward, since an internal part of an object is the object). The probe
-- is then dropped. Run with the "defining" flag set.
CREATE FUNCTION twotier._record_dependencies(name text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
DECLARE
    c twotier.caches;
    probe oid;
BEGIN
    SELECT * INTO c FROM twotier.caches k WHERE k.name = _record_dependencies.name;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    DELETE FROM twotier.dependencies d WHERE d.cache = c.name;
    probe := twotier._dependency_probe(c.query, c.owner, c.search_path,
                                       (SELECT string_agg(t::text, ', ') FROM unnest(c.key_types) t));
    INSERT INTO twotier.dependencies (cache, classid, objid)
    WITH RECURSIVE d(classid, objid) AS (
        SELECT 'pg_proc'::regclass::oid, probe
      UNION
        SELECT CASE WHEN dep.classid = d.classid AND dep.objid = d.objid THEN dep.refclassid ELSE dep.classid END,
               CASE WHEN dep.classid = d.classid AND dep.objid = d.objid THEN dep.refobjid ELSE dep.objid END
          FROM d JOIN pg_depend dep
            ON (dep.classid = d.classid AND dep.objid = d.objid AND dep.deptype IN ('n', 'a', 'i'))
            OR (dep.refclassid = d.classid AND dep.refobjid = d.objid AND dep.deptype = 'i')
    )
    SELECT c.name, d.classid, d.objid FROM d
     WHERE NOT (d.classid = 'pg_proc'::regclass AND d.objid = probe)
       AND NOT (d.classid = 'pg_namespace'::regclass AND d.objid = pg_my_temp_schema())
    UNION SELECT c.name, 0, 0
    ON CONFLICT DO NOTHING;
    EXECUTE format('DROP FUNCTION %s', probe::regprocedure);
END
$$;

-- The table a watch entry names, resolved without any cast under a caller's search_path:
-- parse_ident splits the name, and an unqualified one is looked up in `schemas` (the caller's
-- search_path as define() saw it), in order. NULL if there is no such table.
CREATE FUNCTION twotier._resolve_table(name text, schemas name[]) RETURNS oid
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    parts text[];
    found oid;
BEGIN
    BEGIN
        parts := parse_ident(name);
    EXCEPTION WHEN OTHERS THEN
        RETURN NULL;
    END;
    IF array_length(parts, 1) = 2 THEN
        SELECT c.oid INTO found FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = parts[1] AND c.relname = parts[2];
        RETURN found;
    ELSIF array_length(parts, 1) = 1 THEN
        SELECT c.oid INTO found
          FROM unnest(schemas) WITH ORDINALITY AS s(nspname, pos)
          JOIN pg_namespace n ON n.nspname = s.nspname
          JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = parts[1]
         ORDER BY s.pos LIMIT 1;
        RETURN found;
    END IF;
    RETURN NULL;
END
$$;

-- What the row-level security policies of `tables` read besides the row, for define's check
-- that vary_by covers it: each setting named in a current_setting(...) call in a policy
-- expression or one level down, in an SQL or PL/pgSQL function the expression calls (such as
-- Supabase's auth.uid()); 'role' where a policy applies to chosen roles or reads the current
-- role; and what cannot be told (a setting named by an expression, dynamic SQL, a function in
-- another language), for a WARNING.
CREATE FUNCTION twotier._policy_inputs(tables oid[])
RETURNS TABLE (kind text, name text, origin text)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $inputs$
WITH policy AS (
    SELECT p.oid, p.polroles,
           format('policy %I on %s', p.polname, p.polrelid::regclass) AS origin,
           concat_ws(' ', pg_get_expr(p.polqual, p.polrelid), pg_get_expr(p.polwithcheck, p.polrelid)) AS body
      FROM pg_policy p JOIN pg_class c ON c.oid = p.polrelid
     WHERE p.polrelid = ANY (tables) AND c.relrowsecurity
), called AS (
    SELECT DISTINCT pol.origin, f.oid AS fn, l.lanname
      FROM policy pol
      JOIN pg_depend d ON d.classid = 'pg_policy'::regclass AND d.objid = pol.oid
                      AND d.refclassid = 'pg_proc'::regclass
      JOIN pg_proc f ON f.oid = d.refobjid
      JOIN pg_language l ON l.oid = f.prolang
), source AS (
    SELECT origin, body, false AS plpgsql FROM policy
    UNION ALL
    SELECT format('%s, in %s', origin, fn::regprocedure), pg_get_functiondef(fn), lanname = 'plpgsql'
      FROM called WHERE lanname IN ('sql', 'plpgsql')
)
SELECT 'setting', m[1], origin
  FROM source, regexp_matches(body, 'current_setting\(\s*''([^'']+)''', 'g') AS m
UNION
SELECT 'role', NULL, origin FROM policy WHERE polroles <> '{0}'
UNION
SELECT 'role', NULL, origin FROM source
 WHERE body ~* '\m(current_user|current_role|session_user|pg_has_role|has_[a-z_]+_privilege)\M'
UNION
SELECT 'unknown', 'a setting named by an expression', origin FROM source
 WHERE body ~ 'current_setting\(\s*[^''\s]'
UNION
SELECT 'unknown', 'dynamic SQL', origin FROM source WHERE plpgsql AND body ~* '\mEXECUTE\M'
UNION
SELECT 'unknown', format('%s, in language %s', fn::regprocedure, lanname), origin
  FROM called WHERE lanname NOT IN ('sql', 'plpgsql')
$inputs$;
REVOKE ALL ON FUNCTION twotier._policy_inputs(oid[]) FROM PUBLIC;

-- define()'s work, as the extension's owner. `caller` is the role that was current when
-- twotier.define was called (never an outer or session user: inside ANALYZE or a SECURITY
-- DEFINER function those can be a superuser that never asked for this), and only the C entry
-- twotier.define passes it: no role but the extension's owner may execute this function.
-- Everything the caller named is resolved here under this function's own pinned search_path
-- (catalog lookups, never casts under the caller's path), and everything that parses the
-- caller's SQL does so as the cache's owner.
CREATE FUNCTION twotier._define(
    caller oid, caller_schemas name[],
    name text, query text, ttl interval, watch text[], negative_ttl interval, vary_by text[],
    key_types text[], key_names text[], returns text, schema name
) RETURNS regprocedure
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $define$
DECLARE
    owner_oid oid;
    pinned_path text;
    old twotier.caches;
    entry text;
    parts text[];
    tbl oid;
    expr text;
    fn regprocedure;
    many regprocedure;
    i int := 0;
    tables oid[] := '{}';
    exprs text[] := '{}';
    pers text[] := '{}';
    per_expr text;
    scope text;
    entries text[] := '{}';
    reads oid[];
    rls_tables text;
    unwatched text;
    v text;
    types oid[];
    names text[];
    n int;
    problem text;
    fn_schema name := coalesce(_define.schema, 'public');
    fn_name text := 'cached_' || _define.name;
    args text;
    many_args text;
    key_expr text;
    many_keys text;
    out_cols text;
    getter text;
    acl aclitem[];
    grant_row record;
BEGIN
    IF name IS NULL OR name !~ '^[a-z_][a-z0-9_]*$' OR length(name) > 48 THEN
        RAISE EXCEPTION 'twotier: invalid cache name %', coalesce(quote_literal(name), 'NULL')
            USING ERRCODE = 'invalid_name',
                  HINT = 'Use 1 to 48 lowercase letters, digits and underscores, starting with a letter or underscore.';
    END IF;
    IF query IS NULL OR ttl IS NULL OR ttl < interval '1 second' OR ttl > interval '365 days' THEN
        RAISE EXCEPTION 'twotier: cache % needs a query and a ttl between 1 second and 365 days', name
            USING ERRCODE = 'invalid_parameter_value', HINT = 'For example ttl => interval ''5 minutes''.';
    END IF;
    IF negative_ttl IS NOT NULL AND (negative_ttl < interval '1 second' OR negative_ttl > interval '365 days') THEN
        RAISE EXCEPTION 'twotier: negative_ttl of cache % must be between 1 second and 365 days', name
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOREACH v IN ARRAY coalesce(vary_by, '{}') LOOP
        IF v IS NULL OR (v <> 'role' AND v !~ '^[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*)+(->([A-Za-z0-9_$-]+|''[^'',]*''))*(->>([A-Za-z0-9_$-]+|''[^'',]*''))?$') THEN
            RAISE EXCEPTION 'twotier: vary_by entry % is neither ''role'', a setting name nor a JSON path into one', coalesce(quote_literal(v), 'NULL')
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'For example vary_by => ARRAY[''role'', ''request.jwt.claims->>sub''] (steps with -> and a last one with ->>, as in SQL).';
        END IF;
    END LOOP;
    IF returns IS NULL OR returns NOT IN ('jsonb', 'json') THEN
        RAISE EXCEPTION 'twotier: returns must be ''jsonb'' or ''json'', not %', coalesce(quote_literal(returns), 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'json hands the cached text to the client as it is; jsonb suits callers that use -> and ->> in SQL.';
    END IF;
    IF NOT EXISTS (SELECT FROM pg_namespace WHERE nspname = fn_schema)
       OR fn_schema IN ('pg_catalog', 'information_schema', 'twotier') OR fn_schema ~ '^pg_(toast|temp|toast_temp)' THEN
        RAISE EXCEPTION 'twotier: cannot create cache functions in schema %', quote_ident(fn_schema)
            USING ERRCODE = 'invalid_schema_name', HINT = 'Name an existing schema of your own, such as public or api.';
    END IF;

    SELECT * INTO old FROM twotier.caches c WHERE c.name = _define.name FOR UPDATE;
    IF FOUND THEN
        -- The query will run as the cache's owner: only a role holding the owner's rights (or
        -- a superuser) may change what runs. twotier_admin alone may drop it, not redefine it.
        IF NOT (pg_has_role(caller, old.owner, 'USAGE') OR (SELECT rolsuper FROM pg_roles WHERE oid = caller)) THEN
            RAISE EXCEPTION 'twotier: cache % belongs to %', name, old.owner
                USING ERRCODE = 'insufficient_privilege',
                      HINT = 'Only its owner (or a superuser) can redefine it; twotier.drop() it first to make it yours.';
        END IF;
        owner_oid := old.owner;
    ELSE
        owner_oid := caller;
    END IF;
    -- Every schema, public included, takes the right to create in it: the functions made
    -- here are the caller's and the owner's as much as a CREATE FUNCTION of their own would be
    -- (an admin without CREATE on public could otherwise shadow an app's functions there).
    IF NOT (has_schema_privilege(caller, fn_schema, 'CREATE')
            AND has_schema_privilege(owner_oid, fn_schema, 'CREATE')) THEN
        RAISE EXCEPTION 'twotier: permission denied to create cache functions in schema %', quote_ident(fn_schema)
            USING ERRCODE = 'insufficient_privilege', HINT = 'The schema''s owner can GRANT CREATE ON SCHEMA to the cache''s owner.';
    END IF;

    -- The path the query and the key expressions run with: the caller's schemas as they are
    -- now (no "$user" resolved later, no temp schema), then pg_temp, last, so that no session's
    -- temporary objects can stand in for the source's tables.
    SELECT coalesce(string_agg(quote_ident(s), ', ' ORDER BY pos) || ', ', '') || 'pg_temp'
      INTO pinned_path
      FROM unnest(caller_schemas) WITH ORDINALITY AS t(s, pos)
     WHERE s !~ '^pg_(toast_)?temp';

    -- The key's types: as given (resolved as the owner, on the pinned path), or as the query
    -- uses its parameters. An inferred single type without a canonical text form (float8,
    -- numeric, ...) leaves the key text, as it was before keys had types.
    IF key_types IS NOT NULL THEN
        IF cardinality(key_types) NOT BETWEEN 1 AND 8 THEN
            RAISE EXCEPTION 'twotier: cache % needs 1 to 8 key types, not %', name, cardinality(key_types)
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        types := twotier._resolve_key_types(key_types, owner_oid, pinned_path);
    ELSE
        BEGIN
            types := twotier._infer_key_types(query, owner_oid, pinned_path);
        EXCEPTION WHEN OTHERS THEN
            types := NULL;
        END;
        IF coalesce(cardinality(types), 0) NOT BETWEEN 1 AND 8
           OR (cardinality(types) = 1 AND twotier._key_type_problem(types[1]) IS NOT NULL) THEN
            types := ARRAY['text'::regtype::oid];
        END IF;
    END IF;
    n := cardinality(types);
    FOR i IN 1 .. n LOOP
        problem := twotier._key_type_problem(types[i]);
        IF problem IS NOT NULL THEN
            RAISE EXCEPTION 'twotier: key type % of cache % cannot be a key: %', types[i]::regtype, name, problem
                USING ERRCODE = 'feature_not_supported',
                      HINT = 'Keys can be int, bigint, smallint, oid, text, varchar, name, uuid, boolean, date, timestamp, timestamptz, an enum, or a domain over one of these; pass others as text you normalize yourself.';
        END IF;
    END LOOP;
    names := coalesce(key_names, CASE WHEN n = 1 THEN ARRAY['key']
                                      ELSE (SELECT array_agg('key' || g ORDER BY g) FROM generate_series(1, n) g) END);
    IF cardinality(names) <> n OR EXISTS (SELECT FROM unnest(names) k WHERE k IS NULL OR k !~ '^[a-z_][a-z0-9_]*$' OR k = 'value')
       OR (SELECT count(DISTINCT k) FROM unnest(names) k) <> n THEN
        RAISE EXCEPTION 'twotier: cache % needs % distinct key names (lowercase identifiers, not "value")', name, n
            USING ERRCODE = 'invalid_parameter_value', HINT = 'For example key_names => ARRAY[''tenant'', ''locale''].';
    END IF;

    -- Parsed as the owner, with the pinned path and the key's types: one jsonb column.
    BEGIN
        reads := twotier._check_query(query, owner_oid, pinned_path, types);
    EXCEPTION
        WHEN datatype_mismatch OR undefined_table OR undefined_column OR syntax_error OR insufficient_privilege THEN
            RAISE;
        WHEN OTHERS THEN
            IF key_types IS NULL THEN
                RAISE;
            END IF;
            RAISE EXCEPTION 'twotier: the query of cache % does not take its key as (%): %', name,
                    (SELECT string_agg(t::regtype::text, ', ') FROM unnest(types) t), SQLERRM
                USING ERRCODE = 'datatype_mismatch',
                      HINT = 'key_types must match how the query uses $1, $2, ...: e.g. key_types => ARRAY[''uuid''] for WHERE domain_id = $1.';
    END;
    -- A query that ignores (the last part of) the key would answer many keys alike: a mistake.
    BEGIN
        PERFORM twotier._check_query(query, owner_oid, pinned_path, types[1:n - 1]);
        RAISE EXCEPTION 'twotier: the query of cache % does not use $%, the key''s last part', name, n
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Refer to the key as $1 (and its other parts as $2, ...), e.g. WHERE id = $1.';
    EXCEPTION WHEN undefined_parameter THEN
        NULL;
    END;
    -- Every caller would get the owner's rows: with row-level security that is a leak, unless
    -- the entries vary by what the policies read.
    IF coalesce(array_length(vary_by, 1), 0) = 0 THEN
        SELECT string_agg(c.oid::regclass::text, ', ') INTO rls_tables
          FROM pg_class c WHERE c.oid = ANY (reads) AND c.relrowsecurity;
        IF rls_tables IS NOT NULL THEN
            RAISE EXCEPTION 'twotier: cache % reads %, which has row-level security', name, rls_tables
                USING ERRCODE = 'feature_not_supported',
                      HINT = 'Declare what the policies depend on, e.g. vary_by => ARRAY[''role'', ''request.jwt.claims->>sub''], so that each caller gets its own entries.';
        END IF;
    END IF;

    -- With vary_by the query runs under the caller's policies: entries that vary by less than
    -- the policies read would serve one caller's rows to another.
    IF coalesce(array_length(vary_by, 1), 0) > 0 THEN
        SELECT string_agg(DISTINCT format('%s (%s)', i.name, i.origin), ', ') INTO problem
          FROM twotier._policy_inputs(reads) i
         WHERE i.kind = 'setting'
           AND NOT EXISTS (SELECT FROM unnest(vary_by) e WHERE e = i.name OR starts_with(e, i.name || '->'));
        IF problem IS NOT NULL THEN
            RAISE EXCEPTION 'twotier: cache % reads under policies that depend on %, which vary_by does not name', name, problem
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'Add each setting, or the path into it that the policies use (e.g. ''request.jwt.claims->>sub''), to vary_by.';
        END IF;
        SELECT string_agg(DISTINCT i.origin, ', ') INTO problem
          FROM twotier._policy_inputs(reads) i
         WHERE i.kind = 'role' AND NOT 'role' = ANY (vary_by);
        IF problem IS NOT NULL THEN
            RAISE EXCEPTION 'twotier: cache % reads under policies that depend on the current role (%), and vary_by does not name "role"', name, problem
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'Add ''role'' to vary_by.';
        END IF;
        FOR problem IN SELECT DISTINCT format('%s (%s)', i.origin, i.name)
                         FROM twotier._policy_inputs(reads) i WHERE i.kind = 'unknown' ORDER BY 1 LOOP
            RAISE WARNING 'twotier: cannot tell which settings % reads: make sure vary_by of cache % names them', problem, name;
        END LOOP;
    END IF;

    FOREACH entry IN ARRAY coalesce(watch, '{}') LOOP
        -- `table(key) per <vary_by entry> = <expression>`: a row of this table is visible only
        -- to callers whose entry equals the expression, so a change to it reaches the key in
        -- their variants only. The definer's declaration, like the key expression.
        per_expr := NULL;
        parts := regexp_match(entry, '^(.*\))\s+per\s+(\S+?)\s*=\s*(.+?)\s*$');
        IF parts IS NOT NULL THEN
            SELECT e INTO v FROM unnest(coalesce(vary_by, '{}')) e
             WHERE e = parts[2] OR right(e, length(parts[2]) + 3) = '->>' || parts[2]
                OR right(e, length(parts[2]) + 5) = '->>''' || parts[2] || ''''
             LIMIT 1;
            IF v IS NULL OR v = 'role' THEN
                RAISE EXCEPTION 'twotier: watch entry % is per %, which names no JSON path or setting of vary_by', quote_literal(entry), parts[2]
                    USING ERRCODE = 'invalid_parameter_value',
                          HINT = 'Name a vary_by entry, or the last step of its path: vary_by => ARRAY[''role'', ''request.jwt.claims->>sub''] and ''orders(status) per sub = owner''.';
            END IF;
            IF scope IS NOT NULL AND scope <> v THEN
                RAISE EXCEPTION 'twotier: watch entries of cache % are per % and per %: one cache has one', name, scope, v
                    USING ERRCODE = 'invalid_parameter_value';
            END IF;
            scope := v;
            per_expr := btrim(parts[3]);
            IF per_expr ~ '(\$|;|--|/\*)' THEN
                RAISE EXCEPTION 'twotier: watch expression % may not contain $, ;, -- or /*', quote_literal(per_expr)
                    USING ERRCODE = 'invalid_parameter_value',
                          HINT = 'Use a plain expression over the table''s columns, e.g. owner.';
            END IF;
            entry := parts[1];
        END IF;
        parts := regexp_match(entry, '^\s*([^(]+?)\s*\((.*)\)\s*$');
        IF parts IS NULL OR btrim(parts[2]) = '' THEN
            RAISE EXCEPTION 'twotier: malformed watch entry %', quote_literal(entry)
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'Write table(key_expression), e.g. ''widget_configs(domain_id)'' or ''public.domains(lower(domain))''.';
        END IF;
        tbl := twotier._resolve_table(parts[1], caller_schemas);
        IF tbl IS NULL THEN
            RAISE EXCEPTION 'twotier: table % of watch entry % does not exist', parts[1], quote_literal(entry)
                USING ERRCODE = 'undefined_table', HINT = 'Name a table on your search_path, or qualify it with its schema.';
        END IF;
        IF (SELECT relkind FROM pg_class WHERE oid = tbl) NOT IN ('r', 'p')
           OR (SELECT relpersistence FROM pg_class WHERE oid = tbl) = 't' THEN
            RAISE EXCEPTION 'twotier: % is not a table that can be watched', tbl::regclass
                USING ERRCODE = 'wrong_object_type', HINT = 'Only permanent tables and partitioned tables can be watched.';
        END IF;
        IF NOT has_table_privilege(caller, tbl, 'TRIGGER') OR NOT has_table_privilege(owner_oid, tbl, 'TRIGGER') THEN
            RAISE EXCEPTION 'twotier: permission denied to watch %', tbl::regclass
                USING ERRCODE = 'insufficient_privilege', HINT = 'The table owner can GRANT TRIGGER on it.';
        END IF;
        expr := btrim(parts[2]);
        -- The expression is spliced into a query over the row: nothing that could end a
        -- quote, a statement or the line early is accepted.
        IF expr ~ '(\$|;|--|/\*)' THEN
            RAISE EXCEPTION 'twotier: watch expression % may not contain $, ;, -- or /*', quote_literal(expr)
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'Use a plain expression over the table''s columns, e.g. lower(domain).';
        END IF;
        PERFORM twotier._check_watch_expression(tbl, expr, owner_oid, pinned_path, types);
        IF per_expr IS NOT NULL THEN
            PERFORM twotier._check_watch_expression(tbl, per_expr, owner_oid, pinned_path, ARRAY['text'::regtype::oid]);
        END IF;
        tables := tables || tbl;
        exprs := exprs || expr;
        pers := pers || coalesce(per_expr, '');
        -- Stored schema-qualified (regclass output under this function's path), so that a
        -- dump restored elsewhere resolves the same table.
        entries := entries || (format('%s(%s)', tbl::regclass, expr)
                               || CASE WHEN per_expr IS NULL THEN '' ELSE format(' per %s = %s', scope, per_expr) END);
    END LOOP;

    SELECT string_agg(c.oid::regclass::text, ', ') INTO unwatched
      FROM pg_class c
     WHERE c.oid = ANY (reads) AND c.relkind IN ('r', 'p')
       AND c.relnamespace <> 'pg_catalog'::regnamespace
       AND c.oid <> ALL (tables);
    IF unwatched IS NOT NULL THEN
        RAISE NOTICE 'twotier: cache % reads % without watching it', name, unwatched
            USING HINT = 'Changes there reach the cache only when entries expire (ttl); add them to watch to invalidate at commit.';
    END IF;

    IF old.name IS NOT NULL THEN
        -- Triggers only: the functions stay, with their owner and every GRANT on them, unless
        -- their signature changes below.
        PERFORM twotier._drop_objects(old, false);
    END IF;

    -- The generated functions. Types print schema-qualified where they need it (regtype
    -- output under this function's path).
    SELECT string_agg(format('%I %s', names[k], types[k]::regtype), ', ' ORDER BY k),
           string_agg(format('%I %s[]', CASE WHEN n = 1 THEN 'keys' ELSE names[k] || 's' END, types[k]::regtype), ', ' ORDER BY k),
           string_agg(format('%I %s', names[k], types[k]::regtype), ', ' ORDER BY k)
      INTO args, many_args, out_cols
      FROM generate_series(1, n) k;
    -- Settings-free types render with their own cast; the others (and several parts) go
    -- through key_text, which pins what their text depends on.
    IF n = 1 AND NOT twotier._key_type_pinned(types[1]) THEN
        key_expr := format('%I::text', names[1]);
        many_keys := format('%s.keys::text[]', quote_ident(fn_name || '_many'));
    ELSE
        key_expr := format('twotier.key_text(%s)', (SELECT string_agg(quote_ident(x), ', ') FROM unnest(names) x));
        many_keys := format('ARRAY(SELECT twotier.key_text(%s) FROM unnest(%s) WITH ORDINALITY AS u(%s, ord) ORDER BY ord)',
                            (SELECT string_agg(format('u.c%s', k), ', ') FROM generate_series(1, n) k),
                            (SELECT string_agg(format('%I.%I', fn_name || '_many', CASE WHEN n = 1 THEN 'keys' ELSE names[k] || 's' END), ', ')
                               FROM generate_series(1, n) k),
                            (SELECT string_agg(format('c%s', k), ', ') FROM generate_series(1, n) k));
    END IF;
    getter := CASE _define.returns WHEN 'json' THEN 'twotier.get_json' ELSE 'twotier.get' END;

    -- Any function of these names in the schema that is not this cache's: even with other
    -- argument types it would make calls with untyped literals ambiguous.
    SELECT p.oid::regprocedure INTO fn FROM pg_proc p
     WHERE p.pronamespace = fn_schema::regnamespace AND p.proname IN (fn_name, fn_name || '_many')
       AND (old.name IS NULL OR p.oid NOT IN (old.function, coalesce(old.many_function, 0)))
     LIMIT 1;
    IF fn IS NOT NULL THEN
        RAISE EXCEPTION 'twotier: function % already exists and is not a twotier cache', fn
            USING ERRCODE = 'duplicate_function', HINT = 'Drop or rename it, or choose another cache name.';
    END IF;
    fn := to_regprocedure(format('%I.%I(%s)', fn_schema, fn_name,
                                 (SELECT string_agg(t::regtype::text, ', ') FROM unnest(types) t)));
    many := to_regprocedure(format('%I.%I(%s)', fn_schema, fn_name || '_many',
                                   (SELECT string_agg(t::regtype::text || '[]', ', ') FROM unnest(types) t)));
    -- From here on only DDL of define's own runs (no code of the caller's or the owner's): the
    -- ALTER TABLEs that attach triggers and the GRANTs on the new functions must not make the
    -- event triggers flush. A backend-local flag of the library's, which no session can set
    -- (a placeholder setting could be).
    PERFORM twotier._set_defining(true);
    IF old.name IS NOT NULL AND (fn IS NULL OR old.returns <> _define.returns) THEN
        -- Another signature, schema or return type: the old functions go, their grants come
        -- over to the new ones. A view using the old function stops this (DROP without CASCADE).
        SELECT proacl INTO acl FROM pg_proc WHERE oid = old.function;
        PERFORM twotier._drop_objects(old, true);
        fn := NULL;
        many := NULL;
    END IF;
    IF fn IS NULL THEN
        -- An inlinable SQL wrapper: the planner replaces cached_x(k) by twotier.get('x', k::text),
        -- so the wrapper costs nothing per call.
        EXECUTE format('CREATE FUNCTION %I.%I(%s) RETURNS %s LANGUAGE sql STABLE PARALLEL UNSAFE AS %L',
                       fn_schema, fn_name, args, _define.returns, format('SELECT %s(%L, %s)', getter, name, key_expr));
        fn := to_regprocedure(format('%I.%I(%s)', fn_schema, fn_name,
                                     (SELECT string_agg(t::regtype::text, ', ') FROM unnest(types) t)));
        -- Not an extension member (pg_dump must keep it), but gone with DROP EXTENSION ... CASCADE.
        EXECUTE format('ALTER FUNCTION %s DEPENDS ON EXTENSION twotier', fn);
        EXECUTE format('ALTER FUNCTION %s OWNER TO %s', fn, owner_oid::regrole);
        -- The query runs with the owner's rights: reading the cache is granted explicitly.
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', fn);
        FOR grant_row IN SELECT a.grantee, a.is_grantable FROM aclexplode(acl) a
                          WHERE a.privilege_type = 'EXECUTE' AND a.grantee <> owner_oid LOOP
            EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %s%s', fn,
                           CASE WHEN grant_row.grantee = 0 THEN 'PUBLIC' ELSE grant_row.grantee::regrole::text END,
                           CASE WHEN grant_row.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END);
        END LOOP;
    END IF;
    IF many IS NULL THEN
        -- get_many checks EXECUTE on cached_<name> itself: one GRANT governs both functions.
        -- One key part: get_many's rows come back in the order given, and the canonical text
        -- reads back as the same value. Several parts: the rows are joined to the arguments.
        EXECUTE format('CREATE FUNCTION %I.%I(%s) RETURNS TABLE (%s, value %s) LANGUAGE sql STABLE PARALLEL UNSAFE ROWS 10 AS %L',
                       fn_schema, fn_name || '_many', many_args, out_cols, _define.returns,
                       CASE WHEN n = 1 THEN
                           format('SELECT m.key::%s, m.value FROM %s(%L, %s) AS m', types[1]::regtype,
                                  CASE _define.returns WHEN 'json' THEN 'twotier.get_many_json' ELSE 'twotier.get_many' END,
                                  name, many_keys)
                       ELSE
                           format('SELECT %s, m.value FROM unnest(%s) WITH ORDINALITY AS u(%s, ord) JOIN %s(%L, %s) WITH ORDINALITY AS m(key, value, ord) USING (ord) ORDER BY ord',
                              (SELECT string_agg(format('u.c%s', k), ', ') FROM generate_series(1, n) k),
                              (SELECT string_agg(format('%I.%I', fn_name || '_many', CASE WHEN n = 1 THEN 'keys' ELSE names[k] || 's' END), ', ')
                                 FROM generate_series(1, n) k),
                              (SELECT string_agg(format('c%s', k), ', ') FROM generate_series(1, n) k),
                              CASE _define.returns WHEN 'json' THEN 'twotier.get_many_json' ELSE 'twotier.get_many' END,
                              name, many_keys)
                       END);
        many := to_regprocedure(format('%I.%I(%s)', fn_schema, fn_name || '_many',
                                       (SELECT string_agg(t::regtype::text || '[]', ', ') FROM unnest(types) t)));
        EXECUTE format('ALTER FUNCTION %s DEPENDS ON EXTENSION twotier', many);
        EXECUTE format('ALTER FUNCTION %s OWNER TO %s', many, owner_oid::regrole);
    END IF;
    EXECUTE format('COMMENT ON FUNCTION %s IS %L', fn, format('twotier cache %s (ttl %s): %s', name, ttl, query));
    EXECUTE format('COMMENT ON FUNCTION %s IS %L', many,
                   format('twotier cache %s, many keys in one call (reading needs EXECUTE on %s)', name, fn));

    FOR i IN 1 .. coalesce(array_length(tables, 1), 0) LOOP
        -- Row triggers are cloned onto every partition, present and future, so DML aimed at a
        -- partition is seen. ENABLE ALWAYS: logical replication apply (and any session with
        -- session_replication_role = replica) changes rows too.
        EXECUTE format('CREATE TRIGGER %I AFTER INSERT OR UPDATE OR DELETE ON %s
                        FOR EACH ROW EXECUTE FUNCTION twotier._trigger(%L, %L, %L%s)',
                       format('twotier_%s_%s', name, i), tables[i]::regclass, name, tables[i], exprs[i],
                       CASE WHEN pers[i] <> '' THEN format(', %L', pers[i]) ELSE '' END);
        EXECUTE format('ALTER TABLE %s ENABLE ALWAYS TRIGGER %I', tables[i]::regclass, format('twotier_%s_%s', name, i));
        PERFORM twotier._watch_truncate(tables[i]::regclass, format('twotier_%s_%s_trunc', name, i), name, exprs[i]);
    END LOOP;

    PERFORM twotier._set_defining(false);

    -- Writers resolve their keys' version at PRE_COMMIT under this cache's lock; taking it
    -- last keeps define from waiting on a writer that waits on define.
    PERFORM twotier._lock_cache(name);
    IF old.name IS NOT NULL THEN
        UPDATE twotier.caches c SET query = _define.query, ttl = _define.ttl, negative_ttl = _define.negative_ttl,
               watch = entries, vary_by = coalesce(_define.vary_by, '{}'), per = scope,
               key_types = types::regtype[], key_names = names, returns = _define.returns,
               version = twotier._next_version(c.version), search_path = pinned_path, function = fn,
               many_function = many, trigger_functions = '{}', updated_at = now()
         WHERE c.name = _define.name;
    ELSE
        INSERT INTO twotier.caches (name, query, ttl, negative_ttl, watch, vary_by, per, key_types, key_names, returns,
                                    version, owner, search_path, function, many_function)
        VALUES (name, query, ttl, negative_ttl, entries, coalesce(vary_by, '{}'), scope, types::regtype[], names, _define.returns,
                twotier._next_version(), owner_oid, pinned_path, fn, many);
    END IF;
    -- What the query depends on, as PostgreSQL says: DDL on any of it moves the cache to a new
    -- version (twotier._on_dependency_change). The probe is define's own DDL.
    PERFORM twotier._set_defining(true);
    BEGIN
        PERFORM twotier._record_dependencies(name);
    EXCEPTION WHEN OTHERS THEN
        -- (the owner may not create temporary objects): unknown, so any DDL moves the cache.
        RAISE NOTICE 'twotier: the dependencies of cache % cannot be recorded: %', name, SQLERRM
            USING HINT = 'Every DDL statement will flush this cache; GRANT TEMPORARY ON DATABASE to its owner and define it again to flush it only when what it reads changes.';
    END;
    PERFORM twotier._set_defining(false);
    PERFORM twotier._catalog_changed();
    RETURN fn;
END
$define$;

CREATE FUNCTION twotier.define(name text, query text, ttl interval, watch text[],
                               negative_ttl interval DEFAULT NULL, vary_by text[] DEFAULT NULL,
                               key_types text[] DEFAULT NULL, key_names text[] DEFAULT NULL,
                               returns text DEFAULT 'jsonb', schema name DEFAULT 'public')
-- A C entry (twotier.flush and twotier.drop too): it refuses to run inside a
-- security-restricted operation (ANALYZE, VACUUM, REINDEX, CREATE INDEX, REFRESH MATERIALIZED
-- VIEW, where user code runs with a superuser as session user), takes the role current at the
-- call and its search_path's schemas (what the cache pins, with pg_temp last), and runs
-- twotier._define as the extension's owner with them.
RETURNS regprocedure LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'twotier_admin_call';
COMMENT ON FUNCTION twotier.define(text, text, interval, text[], interval, text[], text[], text[], text, name) IS
    'Create or replace cache NAME: SCHEMA.cached_NAME(key) runs QUERY ($1 = key; $1, $2, ... for a key of several KEY_TYPES) through the cache and returns RETURNS (jsonb or json); SCHEMA.cached_NAME_many(keys[]) reads many keys at once. Entries live TTL, changes to WATCH tables (''table(key_expression)'') invalidate them at commit, and VARY_BY (''role'' and setting names) gives each caller its own entries, with the query run as the caller. KEY_TYPES default to how the query uses its parameters.';

-- drop()'s and flush()'s work, for `caller` (the role current at the call), as the
-- extension's owner: only the C entries twotier.drop and twotier.flush call these.
CREATE FUNCTION twotier._drop(caller oid, name text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    c twotier.caches;
BEGIN
    SELECT * INTO c FROM twotier.caches WHERE caches.name = _drop.name FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'twotier: cache "%" does not exist', name
            USING ERRCODE = 'undefined_object', HINT = 'SELECT name FROM twotier.caches lists the caches.';
    END IF;
    IF NOT twotier._may_administer(caller, c.owner) THEN
        RAISE EXCEPTION 'twotier: cache % belongs to %', name, c.owner
            USING ERRCODE = 'insufficient_privilege', HINT = 'Only its owner or a member of twotier_admin can drop it.';
    END IF;
    PERFORM twotier._drop_objects(c);
    DELETE FROM twotier.dependencies d WHERE d.cache = c.name;
    PERFORM twotier._lock_cache(name);
    DELETE FROM twotier.caches WHERE caches.name = _drop.name;
    PERFORM twotier._catalog_changed();
END
$$;

CREATE FUNCTION twotier.drop(name text) RETURNS void
    LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'twotier_admin_call';
COMMENT ON FUNCTION twotier.drop(text) IS 'Drop cache NAME: its functions, triggers and catalog row; its entries are never read again.';

CREATE FUNCTION twotier._flush(caller oid, cache text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    c twotier.caches;
BEGIN
    SELECT * INTO c FROM twotier.caches WHERE name = cache FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'twotier: cache "%" does not exist', cache
            USING ERRCODE = 'undefined_object', HINT = 'SELECT name FROM twotier.caches lists the caches.';
    END IF;
    IF NOT twotier._may_administer(caller, c.owner) THEN
        RAISE EXCEPTION 'twotier: cache % belongs to %', cache, c.owner
            USING ERRCODE = 'insufficient_privilege', HINT = 'Only its owner or a member of twotier_admin can flush it.';
    END IF;
    -- O(1): readers move to new keys once this commits; the old ones expire on their TTL.
    PERFORM twotier._new_version(cache);
END
$$;

CREATE FUNCTION twotier.flush(cache text) RETURNS void
    LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'twotier_admin_call';
COMMENT ON FUNCTION twotier.flush(text) IS 'Empty a cache in O(1) by moving it to a new key version, effective at commit.';


CREATE VIEW twotier.stats AS
    SELECT s.*,
           CASE WHEN s.calls - s.bypasses > 0
                THEN round((s.l1_hits + s.l2_hits + s.negative_hits)::numeric / (s.calls - s.bypasses), 4)
           END AS hit_ratio
      FROM twotier._stats() s;
COMMENT ON VIEW twotier.stats IS 'Per-cache counters and latencies (microseconds) of every backend since the server started or twotier.reset_stats().';
GRANT SELECT ON twotier.stats TO PUBLIC;

CREATE FUNCTION twotier.get(cache text, key text) RETURNS jsonb
    LANGUAGE c STABLE PARALLEL UNSAFE AS 'MODULE_PATHNAME', 'twotier_get';
COMMENT ON FUNCTION twotier.get(text, text) IS 'Read KEY (canonical text) of cache CACHE through the tiers; what every cached_<name>(key) calls.';

CREATE FUNCTION twotier.get_json(cache text, key text) RETURNS json
    LANGUAGE c STABLE PARALLEL UNSAFE AS 'MODULE_PATHNAME', 'twotier_get_json';
COMMENT ON FUNCTION twotier.get_json(text, text) IS 'Read KEY of cache CACHE as json text, the form a json-mode cache stores: what cached_<name>(key) of such a cache calls.';

CREATE FUNCTION twotier.get_many(cache text, keys text[]) RETURNS TABLE (key text, value jsonb)
    LANGUAGE c STABLE PARALLEL UNSAFE ROWS 10 AS 'MODULE_PATHNAME', 'twotier_get_many';
COMMENT ON FUNCTION twotier.get_many(text, text[]) IS 'Read many KEYS of cache CACHE: L1 first, one pipelined Redis round trip for the rest, the source for what is left; one row per key, in order.';

CREATE FUNCTION twotier.get_many_json(cache text, keys text[]) RETURNS TABLE (key text, value json)
    LANGUAGE c STABLE PARALLEL UNSAFE ROWS 10 AS 'MODULE_PATHNAME', 'twotier_get_many_json';
COMMENT ON FUNCTION twotier.get_many_json(text, text[]) IS 'get_many, with values as json text.';

-- The canonical text of a key: each part by its type's output function with the settings
-- that shape text pinned (DateStyle ISO, TimeZone UTC, ...), several parts joined with
-- commas, a part quoted ("...") when it holds a comma, a quote or a backslash.
CREATE FUNCTION twotier.key_text(VARIADIC parts "any") RETURNS text
    LANGUAGE c STABLE PARALLEL SAFE AS 'MODULE_PATHNAME', 'twotier_key_text';

-- TRUNCATE fires statement triggers only on the tables it names, and row triggers are not
-- cloned for it: the TRUNCATE trigger goes on the table and on each of its partitions, and
-- the event trigger below adds it to partitions created or attached later.
CREATE FUNCTION twotier._watch_truncate(tbl regclass, trigger_name text, cache text, expr text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
DECLARE
    part regclass;
BEGIN
    FOR part IN SELECT tbl UNION SELECT relid FROM pg_partition_tree(tbl) LOOP
        IF NOT EXISTS (SELECT FROM pg_trigger WHERE tgrelid = part AND tgname = trigger_name) THEN
            EXECUTE format('CREATE TRIGGER %I AFTER TRUNCATE ON %s
                            FOR EACH STATEMENT EXECUTE FUNCTION twotier._trigger(%L, %L, %L)',
                           trigger_name, part, cache, tbl::oid, expr);
            EXECUTE format('ALTER TABLE %s ENABLE ALWAYS TRIGGER %I', part, trigger_name);
        END IF;
    END LOOP;
END
$$;

CREATE FUNCTION twotier._on_ddl() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t record;
    args text[];
BEGIN
    IF NOT EXISTS (SELECT FROM pg_event_trigger_ddl_commands() c
                    WHERE c.object_type IN ('table', 'table column')) THEN
        RETURN;
    END IF;
    FOR t IN SELECT tg.tgrelid::regclass AS rel, tg.tgname, tg.tgargs
               FROM pg_trigger tg JOIN pg_class c ON c.oid = tg.tgrelid
              WHERE tg.tgfoid = 'twotier._trigger()'::regprocedure AND tg.tgparentid = 0
                AND c.relkind = 'p' AND (tg.tgtype & 1) = 1 LOOP
        args := string_to_array(encode(t.tgargs, 'escape'), '\000');
        PERFORM twotier._watch_truncate(t.rel, t.tgname || '_trunc', args[1], args[3]);
    END LOOP;
    -- ALTER TABLE changes rows that no trigger sees: ATTACH and DETACH PARTITION bring rows in
    -- and take them out, ALTER COLUMN ... TYPE ... USING rewrites them. The caches watching
    -- the table are flushed when this transaction commits (define's own ALTERs excepted).
    IF twotier._defining() THEN
        RETURN;
    END IF;
    FOR t IN SELECT DISTINCT (string_to_array(encode(tg.tgargs, 'escape'), '\000'))[1] AS cache
               FROM pg_event_trigger_ddl_commands() d
               JOIN pg_trigger tg ON tg.tgrelid = d.objid
              WHERE d.command_tag = 'ALTER TABLE' AND d.object_type = 'table'
                AND tg.tgfoid = 'twotier._trigger()'::regprocedure LOOP
        IF EXISTS (SELECT FROM twotier.caches WHERE name = t.cache) THEN
            PERFORM twotier._new_version(t.cache);
        END IF;
    END LOOP;
END
$$;
CREATE EVENT TRIGGER twotier_partitions ON ddl_command_end
    WHEN TAG IN ('CREATE TABLE', 'ALTER TABLE')
    EXECUTE FUNCTION twotier._on_ddl();
ALTER EVENT TRIGGER twotier_partitions ENABLE ALWAYS;

-- Migrations. DDL on anything a cache's query depends on (twotier.dependencies: an ALTER
-- TABLE such as RENAME COLUMN or ALTER COLUMN ... TYPE, ALTER TYPE ... RENAME VALUE or RENAME
-- ATTRIBUTE, CREATE OR REPLACE VIEW or FUNCTION, ALTER DOMAIN, ALTER SEQUENCE, ...) moves the
-- cache to a new version when it commits, so old-shaped values are never read again, and
-- records its dependencies again (the DDL may have changed them). A cache whose dependencies
-- are unknown moves at every DDL. twotier's own DDL is excepted.
CREATE FUNCTION twotier._on_dependency_change() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    c text;
BEGIN
    IF twotier._defining() THEN
        RETURN;
    END IF;
    FOR c IN SELECT k.name FROM twotier.caches k
              WHERE NOT EXISTS (SELECT FROM twotier.dependencies d WHERE d.cache = k.name)
                 OR EXISTS (SELECT FROM twotier.dependencies d
                              JOIN pg_event_trigger_ddl_commands() e ON e.classid = d.classid AND e.objid = d.objid
                             WHERE d.cache = k.name)
              ORDER BY 1 LOOP
        PERFORM twotier._new_version(c);
        PERFORM twotier._set_defining(true);
        BEGIN
            PERFORM twotier._record_dependencies(c);
        EXCEPTION WHEN OTHERS THEN
            -- The query does not parse now (a migration half done): unknown until it does.
            DELETE FROM twotier.dependencies d WHERE d.cache = c;
        END;
        PERFORM twotier._set_defining(false);
    END LOOP;
END
$$;
CREATE EVENT TRIGGER twotier_dependencies ON ddl_command_end
    EXECUTE FUNCTION twotier._on_dependency_change();
ALTER EVENT TRIGGER twotier_dependencies ENABLE ALWAYS;

-- A DROP of something a cache depends on (a column, a view, a function, a type): the cache
-- moves to a new version and its dependencies become unknown (recorded again at the next DDL
-- that leaves its query parseable). Its calls raise the source query's own ERROR meanwhile.
CREATE FUNCTION twotier._on_dependency_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    c text;
BEGIN
    IF twotier._defining() THEN
        RETURN;
    END IF;
    FOR c IN SELECT DISTINCT d.cache
               FROM pg_event_trigger_dropped_objects() o
               JOIN twotier.dependencies d ON d.classid = o.classid AND d.objid = o.objid
               JOIN twotier.caches k ON k.name = d.cache
              ORDER BY 1 LOOP
        PERFORM twotier._new_version(c);
        DELETE FROM twotier.dependencies d WHERE d.cache = c;
    END LOOP;
END
$$;
CREATE EVENT TRIGGER twotier_dependency_drops ON sql_drop
    EXECUTE FUNCTION twotier._on_dependency_drop();
ALTER EVENT TRIGGER twotier_dependency_drops ENABLE ALWAYS;

-- Who may read which rows changed. A cache whose entries vary by role or setting holds answers
-- computed under the old rights: GRANT and REVOKE (which name no object to event triggers) and
-- CREATE/ALTER/DROP POLICY move every such cache to a new version when they commit. define's
-- own GRANTs on the functions it makes are excepted. Role membership (GRANT role TO role)
-- reaches no event trigger: see docs/security.md for its bound.
CREATE FUNCTION twotier._on_rights_change() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    c text;
BEGIN
    IF twotier._defining() THEN
        RETURN;
    END IF;
    FOR c IN SELECT name FROM twotier.caches WHERE vary_by <> '{}' ORDER BY name LOOP
        PERFORM twotier._new_version(c);
    END LOOP;
END
$$;

CREATE EVENT TRIGGER twotier_rights ON ddl_command_end
    WHEN TAG IN ('GRANT', 'REVOKE', 'CREATE POLICY', 'ALTER POLICY', 'DROP POLICY')
    EXECUTE FUNCTION twotier._on_rights_change();
ALTER EVENT TRIGGER twotier_rights ENABLE ALWAYS;

-- Privileges, all in one place. Nothing in this schema is callable by PUBLIC but reading:
-- get() (whose caller needs EXECUTE on the cache's cached_<name> function), exists() (the
-- same), status() and the stats view. Administrative calls go to twotier_admin, and each still
-- checks the caller against the cache's owner. Internal functions stay with the extension's
-- owner: several switch to a role given as an argument.
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA twotier FROM PUBLIC;
GRANT EXECUTE ON FUNCTION twotier.get(text, text), twotier.get_json(text, text),
                          twotier.get_many(text, text[]), twotier.get_many_json(text, text[]),
                          twotier.key_text("any"), twotier.exists(text, text), twotier.status(),
                          twotier._stats() TO PUBLIC;
GRANT EXECUTE ON FUNCTION
    twotier.define(text, text, interval, text[], interval, text[], text[], text[], text, name),
    twotier.flush(text), twotier.drop(text), twotier.invalidate(text, text),
    twotier.invalidate_pattern(text, text), twotier.set(text, text, jsonb), twotier.warm(text, text),
    twotier.reset_stats()
    TO twotier_admin;
