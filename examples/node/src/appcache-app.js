// The same app built the way the report built it: a TwoTierCache per kind of data (an
// in-process Map as L1, Redis as L2), the raw queries on a miss, and invalidation helpers
// that every write path has to remember to call. Kept as the baseline that twotier replaces.
import { router } from './http.js';

// The report's lib/cache/cache-config.ts.
export const CACHE_TTL = {
  WIDGET_CONFIG: 300, // 5 minutes
  CUSTOMER_PROFILE: 600, // 10 minutes
  DOMAIN_LOOKUP: 900, // 15 minutes
};

export class TwoTierCache {
  constructor({ redis, prefix, ttl, verbose = false }) {
    this.redis = redis;
    this.prefix = prefix;
    this.ttl = ttl;
    this.verbose = verbose;
    this.l1 = new Map(); // key -> { value, expires }: private to this process
  }

  key(key) {
    return `${this.prefix}:${key}`;
  }

  log(msg) {
    if (this.verbose) console.log(`[Cache] ${msg}`);
  }

  async get(key, dbFetcher) {
    const k = this.key(key);
    const hit = this.l1.get(k);
    if (hit && hit.expires > Date.now()) return hit.value;
    if (hit) this.l1.delete(k);
    try {
      const text = await this.redis.get(k);
      if (text !== null) {
        const value = JSON.parse(text);
        this.log(`HIT: ${k}`);
        this.l1.set(k, { value, expires: Date.now() + this.ttl * 1000 });
        return value;
      }
    } catch (err) {
      // As in the report: a cache failure must not fail the request, the database answers.
      console.warn(`[Cache] Failed to read cache (${k}): ${err.message}`);
    }
    this.log(`MISS: ${k}`);
    const value = await dbFetcher();
    // Absent rows are not cached: an unknown domain would otherwise stay unknown for 15 minutes.
    if (value != null) await this.set(key, value);
    return value;
  }

  async set(key, value) {
    const k = this.key(key);
    this.l1.set(k, { value, expires: Date.now() + this.ttl * 1000 });
    try {
      await this.redis.set(k, JSON.stringify(value), { EX: this.ttl });
      this.log(`SET: ${k} TTL: ${this.ttl}s`);
    } catch (err) {
      console.warn(`[Cache] Failed to set cache (${k}): ${err.message}`);
    }
  }

  // Reaches this process's L1 and Redis only: other processes keep their L1 copy until its
  // TTL runs out (the report's "distributed invalidation" is left as a future enhancement).
  async invalidate(key) {
    const k = this.key(key);
    this.l1.delete(k);
    this.log(`INVALIDATE: ${k}`);
    try {
      await this.redis.del(k);
    } catch (err) {
      console.warn(`[Cache] Failed to invalidate (${k}): ${err.message}`);
    }
  }

  async invalidatePattern(pattern) {
    const full = this.key(pattern);
    const re = new RegExp('^' + full.split('*').map((s) => s.replace(/[.+?^${}()|[\]\\]/g, '\\$&')).join('.*') + '$');
    for (const k of this.l1.keys()) if (re.test(k)) this.l1.delete(k);
    try {
      for await (const keys of this.redis.scanIterator({ MATCH: full, COUNT: 500 })) {
        // node-redis 4 yields one key at a time; later versions yield batches.
        const batch = Array.isArray(keys) ? keys : [keys];
        if (batch.length) await this.redis.del(batch);
      }
    } catch (err) {
      console.warn(`[Cache] Failed to invalidate pattern (${full}): ${err.message}`);
    }
  }

  async exists(key) {
    const k = this.key(key);
    const hit = this.l1.get(k);
    if (hit && hit.expires > Date.now()) return true;
    try {
      return (await this.redis.exists(k)) === 1;
    } catch {
      return false;
    }
  }
}

/**
 * `redis`: a connected node-redis v4 client, owned by the caller.
 * `forgetInvalidation`: the admin route skips invalidateWidgetConfig(), the mistake the
 * report's rollout plan ("Phase 2: add invalidation hooks") leaves room for.
 */
export function createApp({ pool, redis, forgetInvalidation = false, verbose = false }) {
  const stats = { dbQueries: 0, dbWrites: 0 };
  const widgetConfigCache = new TwoTierCache({ redis, prefix: 'widget-config', ttl: CACHE_TTL.WIDGET_CONFIG, verbose });
  const customerProfileCache = new TwoTierCache({
    redis, prefix: 'customer-profile', ttl: CACHE_TTL.CUSTOMER_PROFILE, verbose,
  });
  const domainLookupCache = new TwoTierCache({ redis, prefix: 'domain-lookup', ttl: CACHE_TTL.DOMAIN_LOOKUP, verbose });

  // Every statement the cache lets through to PostgreSQL goes by here, so a bench can tell
  // how much of the database load the cache really removed.
  async function readOne(sql, param) {
    stats.dbQueries++;
    const { rows } = await pool.query(sql, [param]);
    return rows[0].v;
  }

  const lookupDomain = (domain) =>
    domainLookupCache.get(domain, () => readOne('SELECT raw_domain_lookup($1) AS v', domain));
  const loadWidgetConfig = (domainId) =>
    widgetConfigCache.get(domainId, () => readOne('SELECT raw_widget_config($1) AS v', domainId));
  const loadCustomerProfile = (domainId) =>
    customerProfileCache.get(domainId, () => readOne('SELECT raw_customer_profile($1) AS v', domainId));

  // The report's invalidation helpers.
  const invalidateWidgetConfig = (domainId) => widgetConfigCache.invalidate(domainId);
  const invalidateCustomerProfile = (domainId) => customerProfileCache.invalidate(domainId);
  const invalidateDomainLookup = (domain) => domainLookupCache.invalidate(domain);

  async function chat(domain) {
    const tenant = await lookupDomain(domain);
    if (!tenant) return null;
    const [widget, profile] = await Promise.all([loadWidgetConfig(tenant.id), loadCustomerProfile(tenant.id)]);
    return { tenant, widget, profile };
  }

  async function updateWidget(domainId, { greeting }) {
    stats.dbWrites++;
    const { rows } = await pool.query(
      `UPDATE widget_configs SET greeting = $2, version = version + 1, updated_at = now()
        WHERE domain_id = $1 RETURNING version`, [domainId, greeting]);
    if (!rows.length) return null;
    if (!forgetInvalidation) await invalidateWidgetConfig(domainId);
    return Number(rows[0].version);
  }

  const handler = router({ chat, updateWidget });
  return Object.assign(handler, {
    stats,
    caches: { widgetConfigCache, customerProfileCache, domainLookupCache },
    invalidateWidgetConfig,
    invalidateCustomerProfile,
    invalidateDomainLookup,
  });
}
