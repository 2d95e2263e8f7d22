// The report's chat app with twotier doing the caching inside PostgreSQL. There is no cache
// code here: the reads call the cached_* functions that caches.sql defines, and the write is
// a plain UPDATE. twotier watches the tables behind each cache and drops the affected
// entries when the transaction commits, in its shared-memory L1 and in Redis, so the next
// read on any connection sees the new row.
import { router } from './http.js';

export function createApp({ pool }) {
  async function chat(domain) {
    // Typed keys: domain_lookup takes text, the other two a uuid, passed straight from the tenant.
    const { rows: [{ d: tenant }] } = await pool.query('SELECT cached_domain_lookup($1) AS d', [domain]);
    if (!tenant) return null;
    const { rows: [{ widget, profile }] } = await pool.query(
      'SELECT cached_widget_config($1) AS widget, cached_customer_profile($1) AS profile', [tenant.id]);
    return { tenant, widget, profile };
  }

  async function updateWidget(domainId, { greeting }) {
    const { rows } = await pool.query(
      `UPDATE widget_configs SET greeting = $2, version = version + 1, updated_at = now()
        WHERE domain_id = $1 RETURNING version`, [domainId, greeting]);
    return rows.length ? Number(rows[0].version) : null;
  }

  return router({ chat, updateWidget });
}
