-- The same queries without a cache, as the app would run them: the baselines of the demo and
-- the benchmark. Plus a heavier widget config (FAQ and activity aggregated per tenant), as
-- real widget configs tend to be, and its cache.

CREATE OR REPLACE FUNCTION raw_domain_lookup(key text) RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object('id', d.id, 'domain', d.domain, 'customer_id', d.customer_id,
                              'status', d.status, 'plan', d.plan)
      FROM domains d WHERE d.domain = key
$$;

CREATE OR REPLACE FUNCTION raw_widget_config(key text) RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
               'domain_id', w.domain_id, 'domain', d.domain, 'status', d.status,
               'theme', w.theme || jsonb_build_object('brand_color', c.brand_color, 'logo', c.logo_url),
               'position', w.position, 'greeting', w.greeting, 'features', w.features,
               'languages', to_jsonb(w.languages), 'version', w.version)
      FROM widget_configs w
      JOIN domains d ON d.id = w.domain_id
      JOIN customer_configs c ON c.domain_id = w.domain_id
     WHERE w.domain_id = key::uuid
$$;

CREATE OR REPLACE FUNCTION raw_customer_profile(key text) RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
               'domain_id', c.domain_id, 'domain', d.domain, 'business_name', c.business_name,
               'description', c.description, 'contact_email', c.contact_email,
               'locale', c.locale, 'timezone', c.timezone, 'version', c.version)
      FROM customer_configs c
      JOIN domains d ON d.id = c.domain_id
     WHERE c.domain_id = key::uuid
$$;

CREATE OR REPLACE FUNCTION raw_widget_config_heavy(key text) RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
               'domain_id', w.domain_id, 'domain', d.domain,
               'theme', w.theme || jsonb_build_object('brand_color', c.brand_color, 'logo', c.logo_url),
               'greeting', w.greeting, 'features', w.features, 'version', w.version,
               'faq', (SELECT jsonb_agg(jsonb_build_object('q', f.question, 'a', f.answer) ORDER BY f.position)
                         FROM faq_entries f WHERE f.domain_id = w.domain_id AND f.locale = 'en'),
               'activity', (SELECT jsonb_object_agg(kind, n) FROM (
                                SELECT e.kind, count(*) AS n FROM widget_events e
                                 WHERE e.domain_id = w.domain_id GROUP BY e.kind) k))
      FROM widget_configs w
      JOIN domains d ON d.id = w.domain_id
      JOIN customer_configs c ON c.domain_id = w.domain_id
     WHERE w.domain_id = key::uuid
$$;

SELECT twotier.define(
    name  => 'widget_config_heavy',
    query => 'SELECT raw_widget_config_heavy($1)',
    ttl   => interval '300 seconds',
    watch => ARRAY['widget_configs(domain_id)', 'domains(id)', 'customer_configs(domain_id)',
                   'faq_entries(domain_id)', 'widget_events(domain_id)']);
