// The report's chat app with twotier doing the caching inside PostgreSQL. There is no cache
// code here: the reads call the cached_* functions that caches.sql defines, and the write is
// a plain UPDATE. twotier watches the tables behind each cache and drops the affected
// entries when the transaction commits, in its shared-memory L1 and in Redis, so the next
// read on any connection sees the new row.
import { router } from './http.js';

export function createApp({ pool }) {
  async function chat(domain) {
    // One round trip for the three lookups: the tenant's id feeds the two uuid-keyed caches
    // inside the statement (domain_lookup takes text, the other two a uuid).
    // An unknown domain is no row (a NULL key would be an ERROR, not a miss).
    const { rows } = await pool.query(
      `SELECT d AS tenant, cached_widget_config((d->>'id')::uuid) AS widget,
              cached_customer_profile((d->>'id')::uuid) AS profile
         FROM cached_domain_lookup($1) AS d WHERE d IS NOT NULL`, [domain]);
    return rows[0] ?? null;
  }

  async function updateWidget(domainId, { greeting }) {
    const { rows } = await pool.query(
      `UPDATE widget_configs SET greeting = $2, version = version + 1, updated_at = now()
        WHERE domain_id = $1 RETURNING version`, [domainId, greeting]);
    return rows.length ? Number(rows[0].version) : null;
  }

  return router({ chat, updateWidget });
}
