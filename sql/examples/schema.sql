-- The app of the two-tier cache report: multi-tenant chat widgets, one row per customer
-- domain. Plain PostgreSQL: nothing here needs twotier.

CREATE TABLE IF NOT EXISTS domains (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    domain      text NOT NULL UNIQUE,
    customer_id uuid NOT NULL,
    status      text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'suspended', 'trial')),
    plan        text NOT NULL DEFAULT 'starter' CHECK (plan IN ('starter', 'growth', 'enterprise')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS widget_configs (
    domain_id   uuid PRIMARY KEY REFERENCES domains(id) ON DELETE CASCADE,
    theme       jsonb NOT NULL DEFAULT '{"primary": "#3b82f6", "mode": "light"}',
    position    text NOT NULL DEFAULT 'bottom-right',
    greeting    text NOT NULL DEFAULT 'Hi! How can we help?',
    features    jsonb NOT NULL DEFAULT '{"file_upload": false, "voice": false, "handoff": true}',
    languages   text[] NOT NULL DEFAULT ARRAY['en'],
    version     bigint NOT NULL DEFAULT 1,   -- bumped by every update: lets tests spot stale reads
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS customer_configs (
    domain_id     uuid PRIMARY KEY REFERENCES domains(id) ON DELETE CASCADE,
    business_name text NOT NULL,
    description   text,
    contact_email text,
    locale        text NOT NULL DEFAULT 'en-US',
    timezone      text NOT NULL DEFAULT 'UTC',
    brand_color   text NOT NULL DEFAULT '#111827',
    logo_url      text,
    version       bigint NOT NULL DEFAULT 1,
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- For the heavier widget config (FAQ and recent activity shown in the widget).
CREATE TABLE IF NOT EXISTS faq_entries (
    id        bigserial PRIMARY KEY,
    domain_id uuid NOT NULL REFERENCES domains(id) ON DELETE CASCADE,
    locale    text NOT NULL DEFAULT 'en',   -- one of the widget's languages
    question  text NOT NULL,
    answer    text NOT NULL,
    position  int NOT NULL
);
CREATE INDEX IF NOT EXISTS faq_entries_domain ON faq_entries(domain_id, locale, position);

CREATE TABLE IF NOT EXISTS widget_events (
    id         bigserial PRIMARY KEY,
    domain_id  uuid NOT NULL REFERENCES domains(id) ON DELETE CASCADE,
    kind       text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS widget_events_domain ON widget_events(domain_id, created_at);

-- Adds n tenants (domains shop-00001.example.com, ...) with their configs, FAQ and events.
-- Deterministic names and ids, so demo and benchmark scripts can address them.
CREATE OR REPLACE FUNCTION example_generate(n int) RETURNS int
LANGUAGE plpgsql AS $$
DECLARE
    first int := coalesce((SELECT max(substring(domain FROM 'shop-(\d+)')::int) FROM domains), 0) + 1;
BEGIN
    -- Ids derive from the name (md5(domain)::uuid) so that scripts can compute them.
    INSERT INTO domains (id, domain, customer_id, status, plan, created_at)
    SELECT md5(format('shop-%s.example.com', lpad(g::text, greatest(5, length(g::text)), '0')))::uuid,
           format('shop-%s.example.com', lpad(g::text, greatest(5, length(g::text)), '0')), gen_random_uuid(),
           (ARRAY['active', 'active', 'active', 'trial', 'suspended'])[1 + g % 5],
           (ARRAY['starter', 'growth', 'enterprise'])[1 + g % 3],
           now() - (g % 900) * interval '1 day'
      FROM generate_series(first, first + n - 1) g;

    INSERT INTO widget_configs (domain_id, theme, position, greeting, features, languages)
    SELECT d.id,
           jsonb_build_object('primary', (ARRAY['#3b82f6', '#10b981', '#f59e0b', '#ef4444'])[1 + s.g % 4],
                              'mode', CASE WHEN s.g % 3 = 0 THEN 'dark' ELSE 'light' END,
                              'font', 'Inter', 'radius', 8 + s.g % 8),
           (ARRAY['bottom-right', 'bottom-left'])[1 + s.g % 2],
           format('Welcome to %s! Ask us anything.', initcap(split_part(d.domain, '.', 1))),
           jsonb_build_object('file_upload', s.g % 2 = 0, 'voice', s.g % 7 = 0, 'handoff', true,
                              'csat_survey', s.g % 4 = 0),
           CASE WHEN s.g % 5 = 0 THEN ARRAY['en', 'de', 'fr'] ELSE ARRAY['en'] END
      FROM domains d
      JOIN LATERAL (SELECT substring(d.domain FROM 'shop-(\d+)')::int AS g) s ON true
     WHERE s.g >= first;

    INSERT INTO customer_configs (domain_id, business_name, description, contact_email, locale, timezone, brand_color, logo_url)
    SELECT d.id,
           initcap(replace(split_part(d.domain, '.', 1), '-', ' ')) || ' Ltd',
           'Online shop number ' || s.g || ', selling things people like since ' || (2000 + s.g % 25) || '.',
           'support@' || d.domain,
           (ARRAY['en-US', 'en-GB', 'de-DE', 'fr-FR'])[1 + s.g % 4],
           (ARRAY['UTC', 'Europe/Berlin', 'America/New_York', 'Asia/Tokyo'])[1 + s.g % 4],
           (ARRAY['#111827', '#1f2937', '#7c3aed'])[1 + s.g % 3],
           'https://cdn.example.com/logos/' || s.g || '.png'
      FROM domains d
      JOIN LATERAL (SELECT substring(d.domain FROM 'shop-(\d+)')::int AS g) s ON true
     WHERE s.g >= first;

    -- 8 entries in each of the widget's languages.
    INSERT INTO faq_entries (domain_id, locale, question, answer, position)
    SELECT d.id, l.locale, format('[%s] Question %s about shipping?', l.locale, q),
           format('[%s] Answer %s: we ship within %s days.', l.locale, q, 1 + q % 5), q
      FROM domains d
      JOIN LATERAL (SELECT substring(d.domain FROM 'shop-(\d+)')::int AS g) s ON true
      JOIN widget_configs w ON w.domain_id = d.id
     CROSS JOIN LATERAL unnest(w.languages) AS l(locale)
     CROSS JOIN generate_series(1, 8) q
     WHERE s.g >= first;

    INSERT INTO widget_events (domain_id, kind, created_at)
    SELECT d.id, (ARRAY['open', 'message', 'handoff', 'csat'])[1 + e % 4], now() - e * interval '37 minutes'
      FROM domains d
      JOIN LATERAL (SELECT substring(d.domain FROM 'shop-(\d+)')::int AS g) s ON true
     CROSS JOIN generate_series(1, 20) e
     WHERE s.g >= first;

    ANALYZE domains;
    ANALYZE widget_configs;
    ANALYZE customer_configs;
    ANALYZE faq_entries;
    ANALYZE widget_events;
    RETURN n;
END
$$;
