// Drives both apps over HTTP with the same request mix and reports throughput, latency,
// database queries per request and stale reads. Needs DATABASE_URL and REDIS_URL with the
// example app loaded (tools/node_bench.py sets them up). The apps run in this process, next
// to the load generator: absolute numbers are of one Node event loop doing both jobs.
//
// Options (env): BENCH_REQUESTS (measured requests per scenario, default 20000),
// BENCH_WARMUP (reads before that, default 2000), BENCH_CONCURRENCY (default 16),
// BENCH_TENANTS (default 200), BENCH_WRITE_PCT (default 1), BENCH_ZIPF_S (default 1.1).
import http from 'node:http';
import { createHash } from 'node:crypto';
import pg from 'pg';
import { createClient } from 'redis';
import { createApp as createTwotierApp } from './src/twotier-app.js';
import { createApp as createAppcacheApp } from './src/appcache-app.js';

const env = process.env;
const REQUESTS = Number(env.BENCH_REQUESTS || 20000);
const WARMUP = Number(env.BENCH_WARMUP || 2000);
const CONCURRENCY = Number(env.BENCH_CONCURRENCY || 16);
const TENANTS = Number(env.BENCH_TENANTS || 200);
const WRITE_PCT = Number(env.BENCH_WRITE_PCT || 1);
const ZIPF_S = Number(env.BENCH_ZIPF_S || 1.1);
if (!env.DATABASE_URL || !env.REDIS_URL) throw new Error('DATABASE_URL and REDIS_URL must be set');

const domainOf = (rank) => `shop-${String(rank).padStart(5, '0')}.example.com`;
// The same id example_generate() gives: md5(domain)::uuid.
const idOf = (domain) => createHash('md5').update(domain).digest('hex')
  .replace(/^(.{8})(.{4})(.{4})(.{4})(.{12})$/, '$1-$2-$3-$4-$5');

function mulberry32(seed) {
  return () => {
    seed = (seed + 0x6d2b79f5) | 0;
    let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Like pgbench's random_zipfian(1, TENANTS, s): rank k with probability ∝ 1/k^s. Seeded, so
 * every scenario gets the very same sequence. */
function requestMix(n, writePct, seed) {
  const rand = mulberry32(seed);
  const cdf = [];
  let sum = 0;
  for (let k = 1; k <= TENANTS; k++) cdf.push((sum += 1 / k ** ZIPF_S));
  const pick = () => {
    const x = rand() * sum;
    let lo = 0, hi = cdf.length - 1;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (cdf[mid] < x) lo = mid + 1; else hi = mid;
    }
    return lo + 1;
  };
  return Array.from({ length: n }, () => ({ write: rand() * 100 < writePct, rank: pick() }));
}

const agent = new http.Agent({ keepAlive: true, maxSockets: CONCURRENCY });

function request(base, method, path, body) {
  return new Promise((resolve, reject) => {
    const data = body ? JSON.stringify(body) : null;
    const req = http.request(`${base}${path}`, {
      method, agent, headers: data ? { 'content-type': 'application/json', 'content-length': Buffer.byteLength(data) } : {},
    }, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode, body: JSON.parse(Buffer.concat(chunks).toString()) }));
    });
    req.on('error', reject);
    req.end(data);
  });
}

async function serve(handler) {
  const server = http.createServer({ keepAlive: true }, handler);
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  return { server, base: `http://127.0.0.1:${server.address().port}` };
}

const pct = (sorted, p) => sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];

async function committedVersions(db) {
  const { rows } = await db.query('SELECT domain_id::text AS id, version FROM widget_configs');
  return new Map(rows.map((r) => [r.id, Number(r.version)]));
}

async function twotierMisses(db) {
  const { rows: [r] } = await db.query(
    `SELECT coalesce(sum(misses), 0)::bigint AS misses FROM twotier.stats
      WHERE cache IN ('domain_lookup', 'widget_config', 'customer_profile')`);
  return Number(r.misses);
}

async function dropAppcacheKeys(redis) {
  for (const pattern of ['widget-config:*', 'customer-profile:*', 'domain-lookup:*']) {
    for await (const key of redis.scanIterator({ MATCH: pattern, COUNT: 1000 })) await redis.del(key);
  }
}

/**
 * One scenario: `instances` app objects (each standing for a Node process with its own pool
 * and, for appcache, its own L1), requests spread round-robin over them.
 */
async function runScenario({ name, kind, forgetInvalidation = false, instances = 1 }, db, redis) {
  // Every scenario starts cold: an earlier one's entries (stale ones too) would count for it.
  await dropAppcacheKeys(redis);
  await db.query(`SELECT twotier.flush(c) FROM unnest(ARRAY['domain_lookup', 'widget_config', 'customer_profile']) c`);
  const apps = [];
  for (let i = 0; i < instances; i++) {
    const pool = new pg.Pool({ connectionString: env.DATABASE_URL, max: Math.ceil(CONCURRENCY / instances) });
    const app = kind === 'twotier' ? createTwotierApp({ pool }) : createAppcacheApp({ pool, redis, forgetInvalidation });
    apps.push({ pool, app, ...(await serve(app)) });
  }

  async function drive(ops, measure) {
    let next = 0;
    const committed = measure ? await committedVersions(db) : null;
    const reads = [], stale = { count: 0, ofUpdated: 0 }, updated = new Set();
    let writes = 0;
    const worker = async () => {
      while (next < ops.length) {
        const i = next++;
        const { write, rank } = ops[i];
        const { base } = apps[i % apps.length];
        const domain = domainOf(rank), id = idOf(domain);
        const t0 = process.hrtime.bigint();
        if (write) {
          const { status, body } = await request(base, 'POST', `/admin/widget-config/${id}`, { greeting: `bench ${i}` });
          if (status !== 200) throw new Error(`admin update: ${status}`);
          writes++;
          if (committed) {
            committed.set(id, Math.max(committed.get(id), body.version));
            updated.add(id);
          }
        } else {
          // The version committed before this read was sent: anything older is stale.
          const expected = committed?.get(id);
          const { status, body } = await request(base, 'GET', `/chat/${domain}`);
          if (status !== 200) throw new Error(`chat: ${status}`);
          if (measure) {
            reads.push(Number(process.hrtime.bigint() - t0) / 1e6);
            if (body.widget.version < expected) stale.count++;
            if (updated.has(id)) stale.ofUpdated++;
          }
        }
      }
    };
    const t0 = performance.now();
    await Promise.all(Array.from({ length: CONCURRENCY }, worker));
    return { seconds: (performance.now() - t0) / 1000, reads, writes, stale, updated: updated.size };
  }

  await drive(requestMix(WARMUP, 0, 7), false);
  const queriesBefore = kind === 'twotier' ? await twotierMisses(db) : apps.reduce((s, a) => s + a.app.stats.dbQueries, 0);
  const r = await drive(requestMix(REQUESTS, WRITE_PCT, 42), true);
  const queriesAfter = kind === 'twotier' ? await twotierMisses(db) : apps.reduce((s, a) => s + a.app.stats.dbQueries, 0);

  for (const a of apps) {
    a.server.closeAllConnections();
    a.server.close();
    await a.pool.end();
  }
  const sorted = r.reads.sort((a, b) => a - b);
  return {
    name,
    requests: r.reads.length + r.writes,
    writes: r.writes,
    rps: (r.reads.length + r.writes) / r.seconds,
    p50: pct(sorted, 50),
    p99: pct(sorted, 99),
    queriesPerRead: (queriesAfter - queriesBefore) / r.reads.length,
    stale: r.stale.count,
    readsOfUpdated: r.stale.ofUpdated,
  };
}

const db = new pg.Client({ connectionString: env.DATABASE_URL });
await db.connect();
const redis = createClient({ url: env.REDIS_URL });
await redis.connect();

console.log(`${TENANTS} tenants, Zipf s=${ZIPF_S}; per scenario ${WARMUP} warm-up reads, then ${REQUESTS} requests` +
  ` (${WRITE_PCT}% admin updates), ${CONCURRENCY} concurrent clients`);
const scenarios = [
  { name: 'appcache, invalidateWidgetConfig()', kind: 'appcache' },
  { name: 'appcache, invalidation forgotten', kind: 'appcache', forgetInvalidation: true },
  { name: 'appcache, invalidate, 2 instances', kind: 'appcache', instances: 2 },
  { name: 'twotier', kind: 'twotier' },
  { name: 'twotier, 2 instances', kind: 'twotier', instances: 2 },
];
const results = [];
for (const s of scenarios) results.push(await runScenario(s, db, redis));

const head = ['scenario', 'requests', 'updates', 'req/s', 'p50 ms', 'p99 ms', 'db q/read', 'stale reads', 'reads of upd.'];
const rows = results.map((r) => [r.name, r.requests, r.writes, r.rps.toFixed(0), r.p50.toFixed(2), r.p99.toFixed(2),
  r.queriesPerRead.toFixed(3), r.stale, r.readsOfUpdated]);
const widths = head.map((h, i) => Math.max(h.length, ...rows.map((row) => String(row[i]).length)));
const line = (cells) => cells.map((c, i) => (i ? String(c).padStart(widths[i]) : String(c).padEnd(widths[i]))).join('  ');
console.log(line(head));
for (const row of rows) console.log(line(row));
console.log('latency: chat reads only, measured at the client. db q/read: appcache, the raw queries its cache let' +
  ' through; twotier, the growth of sum(misses) in twotier.stats (each read is still one statement to PostgreSQL).' +
  ' stale reads: reads answering a widget version older than one committed before the read was sent.' +
  ' reads of upd.: reads of a tenant after it was updated in the measured run.');

await db.end();
await redis.quit();
agent.destroy();
