-- The report's three caches, with its TTLs. Run after schema.sql and CREATE EXTENSION twotier.

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
                 WHERE w.domain_id = $1::uuid$q$,
    ttl   => interval '300 seconds',
    watch => ARRAY['widget_configs(domain_id)', 'domains(id)', 'customer_configs(domain_id)']);

-- Once per conversation: the business profile. 10 minutes.
SELECT twotier.define(
    name  => 'customer_profile',
    query => $q$SELECT jsonb_build_object(
                    'domain_id', c.domain_id, 'domain', d.domain, 'business_name', c.business_name,
                    'description', c.description, 'contact_email', c.contact_email,
                    'locale', c.locale, 'timezone', c.timezone, 'version', c.version)
                  FROM customer_configs c
                  JOIN domains d ON d.id = c.domain_id
                 WHERE c.domain_id = $1::uuid$q$,
    ttl   => interval '600 seconds',
    watch => ARRAY['customer_configs(domain_id)', 'domains(id)']);
