// End to end: both apps over HTTP against a real PostgreSQL with twotier and a real Redis.
// Needs DATABASE_URL (example schema, caches and raw queries loaded, >= 4 tenants) and
// REDIS_URL; tools/node_e2e.py sets both up.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import { readFile } from 'node:fs/promises';
import pg from 'pg';
import { createClient } from 'redis';
import { createApp as createTwotierApp } from '../src/twotier-app.js';
import { createApp as createAppcacheApp } from '../src/appcache-app.js';

const { DATABASE_URL, REDIS_URL } = process.env;
const cleanups = [];

before(() => {
  assert.ok(DATABASE_URL, 'DATABASE_URL must be set (tools/node_e2e.py sets it)');
  assert.ok(REDIS_URL, 'REDIS_URL must be set (tools/node_e2e.py sets it)');
});

after(async () => {
  for (const fn of cleanups.reverse()) await fn();
});

function newPool() {
  const pool = new pg.Pool({ connectionString: DATABASE_URL, max: 4 });
  cleanups.push(() => pool.end());
  return pool;
}

async function newRedis() {
  const redis = createClient({ url: REDIS_URL });
  await redis.connect();
  cleanups.push(() => redis.quit());
  return redis;
}

/** Serves `handler` on a free port; returns its base URL. */
async function serve(handler) {
  const server = http.createServer(handler);
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  cleanups.push(() => new Promise((resolve) => {
    server.closeAllConnections();
    server.close(resolve);
  }));
  return `http://127.0.0.1:${server.address().port}`;
}

async function chat(base, domain) {
  const res = await fetch(`${base}/chat/${domain}`);
  return { status: res.status, body: await res.json() };
}

async function setGreeting(base, domainId, greeting) {
  const res = await fetch(`${base}/admin/widget-config/${domainId}`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ greeting }),
  });
  assert.equal(res.status, 200, `admin update answered ${res.status}`);
  return (await res.json()).version;
}

async function committed(pool, domainId) {
  const { rows: [row] } = await pool.query(
    'SELECT greeting, version FROM widget_configs WHERE domain_id = $1', [domainId]);
  return { greeting: row.greeting, version: Number(row.version) };
}

async function cacheHits(pool, cache) {
  const { rows: [row] } = await pool.query(
    'SELECT coalesce(sum(l1_hits + l2_hits), 0)::bigint AS hits FROM twotier.stats WHERE cache = $1', [cache]);
  return Number(row.hits);
}

test('twotier app: chat, unknown domain, and an admin update served at once from two pools', async () => {
  const pool = newPool();
  const base = await serve(createTwotierApp({ pool }));
  // A second pool: other PostgreSQL backends, as a second app instance would use.
  const pool2 = newPool();
  const base2 = await serve(createTwotierApp({ pool: pool2 }));
  const domain = 'shop-00001.example.com';

  const first = await chat(base, domain);
  assert.equal(first.status, 200);
  assert.equal(first.body.tenant.domain, domain);
  assert.equal(typeof first.body.widget.greeting, 'string');
  assert.ok(first.body.widget.greeting.length > 0);
  assert.equal(first.body.profile.domain, domain);
  const id = first.body.tenant.id;

  assert.equal((await chat(base, 'no-such-shop.example.com')).status, 404);

  // Fresh answers must come from the cache, not from bypassing it.
  await chat(base2, domain);
  const hitsBefore = await cacheHits(pool, 'widget_config');
  await chat(base, domain);
  await chat(base2, domain);
  assert.ok(await cacheHits(pool, 'widget_config') >= hitsBefore + 2, 'widget_config reads were not cache hits');

  for (let i = 1; i <= 5; i++) {
    const greeting = `twotier e2e update ${i} (${Date.now()})`;
    const version = await setGreeting(base, id, greeting);
    for (const [name, b] of [['same pool', base], ['second pool', base2]]) {
      const { status, body } = await chat(b, domain);
      assert.equal(status, 200);
      assert.equal(body.widget.greeting, greeting, `update ${i}: stale greeting from the ${name}`);
      assert.equal(body.widget.version, version, `update ${i}: stale version from the ${name}`);
    }
  }
  assert.deepEqual(await committed(pool, id), {
    greeting: (await chat(base, domain)).body.widget.greeting,
    version: (await chat(base2, domain)).body.widget.version,
  });
});

test('twotier app source calls no invalidation function', async () => {
  const src = await readFile(new URL('../src/twotier-app.js', import.meta.url), 'utf8');
  assert.doesNotMatch(src, /invalidat\w*\s*\(/i);
  assert.doesNotMatch(src, /twotier\.(invalidate|invalidate_pattern|flush|flush_above_keys)\b/i);
  assert.doesNotMatch(src, /from\s+['"]redis['"]/);
  assert.doesNotMatch(src, /\.del\s*\(/);
});

test('appcache app without the invalidation call: the old greeting is still served', async () => {
  const pool = newPool();
  const app = createAppcacheApp({ pool, redis: await newRedis(), forgetInvalidation: true });
  const base = await serve(app);
  const domain = 'shop-00002.example.com';

  const before = await chat(base, domain);
  assert.equal(before.status, 200);
  const queries = app.stats.dbQueries;
  await chat(base, domain);
  assert.equal(app.stats.dbQueries, queries, 'a warm read went to the database');

  const greeting = `appcache forgot ${Date.now()}`;
  const version = await setGreeting(base, before.body.tenant.id, greeting);
  assert.deepEqual(await committed(pool, before.body.tenant.id), { greeting, version });

  const afterUpdate = await chat(base, domain);
  assert.equal(afterUpdate.status, 200);
  // The hazard: the committed row is newer than what the app serves, for up to 300 s.
  assert.equal(afterUpdate.body.widget.greeting, before.body.widget.greeting);
  assert.notEqual(afterUpdate.body.widget.greeting, greeting);
  assert.ok(afterUpdate.body.widget.version < version);
});

test('appcache app with invalidateWidgetConfig(): the same process serves the new greeting', async () => {
  const pool = newPool();
  const app = createAppcacheApp({ pool, redis: await newRedis(), forgetInvalidation: false });
  const base = await serve(app);
  const domain = 'shop-00003.example.com';

  const before = await chat(base, domain);
  assert.equal(before.status, 200);
  for (let i = 1; i <= 3; i++) {
    const greeting = `appcache invalidated ${i} (${Date.now()})`;
    const version = await setGreeting(base, before.body.tenant.id, greeting);
    const { body } = await chat(base, domain);
    assert.equal(body.widget.greeting, greeting);
    assert.equal(body.widget.version, version);
  }
});

test('appcache app with invalidateWidgetConfig(): a second instance keeps its L1 copy', async () => {
  // Two app objects stand for two Node processes: each has its own L1 Map.
  const pool = newPool();
  const redis = await newRedis();
  const baseA = await serve(createAppcacheApp({ pool, redis }));
  const baseB = await serve(createAppcacheApp({ pool, redis }));
  const domain = 'shop-00004.example.com';

  const before = await chat(baseA, domain);
  await chat(baseB, domain);
  const greeting = `appcache instance A ${Date.now()}`;
  await setGreeting(baseA, before.body.tenant.id, greeting);

  assert.equal((await chat(baseA, domain)).body.widget.greeting, greeting);
  // The helper cleared A's Map and Redis; nothing reaches B's Map until its TTL expires.
  assert.equal((await chat(baseB, domain)).body.widget.greeting, before.body.widget.greeting);
});
