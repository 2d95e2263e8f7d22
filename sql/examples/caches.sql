-- The report's three caches, with its TTLs, plus the FAQ of a tenant in one language (a key
-- of two parts) and a json-mode widget config. Run after schema.sql and CREATE EXTENSION
-- twotier. Each key's type comes from how the query uses $1 (and $2): domain_lookup takes a
-- text, the others a uuid, so SELECT cached_widget_config(w.domain_id) needs no cast.

-- Every request: domain name -> tenant. 15 minutes.
SELECT twotier.define(
    name  => 'domain_lookup',
    query => $q$SELECT jsonb_build_object('id', d.id, 'domain', d.domain, 'customer_id', d.customer_id,
                                          'status', d.status, 'plan', d.plan)
                  FROM domains d WHERE d.domain = $1$q$,
    ttl   => interval '900 seconds',
    watch => ARRAY['domains(domain)']);

-- Every chat widget load: the widget config, assembled from three tables. 5 minutes.
SELECT twotier.define(
    name  => 'widget_config',
    query => $q$SELECT jsonb_build_object(
                    'domain_id', w.domain_id, 'domain', d.domain, 'status', d.status,
                    'theme', w.theme || jsonb_build_object('brand_color', c.brand_color, 'logo', c.logo_url),
                    'position', w.position, 'greeting', w.greeting, 'features', w.features,
                    'languages', to_jsonb(w.languages), 'version', w.version)
                  FROM widget_configs w
                  JOIN domains d ON d.id = w.domain_id
                  JOIN customer_configs c ON c.domain_id = w.domain_id
                 WHERE w.domain_id = $1$q$,
    ttl   => interval '300 seconds',
    watch => ARRAY['widget_configs(domain_id)', 'domains(id)', 'customer_configs(domain_id)'],
    key_types => ARRAY['uuid'], key_names => ARRAY['domain_id']);

-- Once per conversation: the business profile. 10 minutes.
SELECT twotier.define(
    name  => 'customer_profile',
    query => $q$SELECT jsonb_build_object(
                    'domain_id', c.domain_id, 'domain', d.domain, 'business_name', c.business_name,
                    'description', c.description, 'contact_email', c.contact_email,
                    'locale', c.locale, 'timezone', c.timezone, 'version', c.version)
                  FROM customer_configs c
                  JOIN domains d ON d.id = c.domain_id
                 WHERE c.domain_id = $1$q$,
    ttl   => interval '600 seconds',
    watch => ARRAY['customer_configs(domain_id)', 'domains(id)'],
    key_types => ARRAY['uuid'], key_names => ARRAY['domain_id']);

-- The widget's FAQ in the visitor's language: a key of two parts, (domain_id, locale). 10 minutes.
SELECT twotier.define(
    name  => 'faq',
    query => $q$SELECT jsonb_agg(jsonb_build_object('q', f.question, 'a', f.answer) ORDER BY f.position)
                  FROM faq_entries f WHERE f.domain_id = $1 AND f.locale = $2
                HAVING count(*) > 0$q$,
    ttl   => interval '600 seconds',
    watch => ARRAY['faq_entries(domain_id, locale)'],
    key_names => ARRAY['domain_id', 'locale']);

-- The widget config again, handed to the client as json text: a hit returns the stored text
-- without rendering jsonb, for apps that pass the value straight through.
SELECT twotier.define(
    name  => 'widget_config_json',
    query => (SELECT query FROM twotier.caches WHERE name = 'widget_config'),
    ttl   => interval '300 seconds',
    watch => ARRAY['widget_configs(domain_id)', 'domains(id)', 'customer_configs(domain_id)'],
    key_names => ARRAY['domain_id'],
    returns => 'json');
