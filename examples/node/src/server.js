// One of the two apps on PORT: APP=twotier (default) or APP=appcache (which also needs REDIS_URL).
import http from 'node:http';
import pg from 'pg';
import { createClient } from 'redis';
import { createApp as createTwotierApp } from './twotier-app.js';
import { createApp as createAppcacheApp } from './appcache-app.js';

const { DATABASE_URL, REDIS_URL, PORT = '3000', APP = 'twotier' } = process.env;
if (!DATABASE_URL) throw new Error('DATABASE_URL is not set');

const pool = new pg.Pool({ connectionString: DATABASE_URL, max: Number(process.env.PG_POOL_MAX || 10) });
let redis = null;
let app;
if (APP === 'twotier') {
  // No Redis client: twotier talks to Redis from inside PostgreSQL (twotier.redis_url).
  app = createTwotierApp({ pool });
} else if (APP === 'appcache') {
  if (!REDIS_URL) throw new Error('REDIS_URL is not set (APP=appcache)');
  redis = createClient({ url: REDIS_URL });
  redis.on('error', (err) => console.warn(`[Redis] ${err.message}`));
  await redis.connect();
  app = createAppcacheApp({ pool, redis, forgetInvalidation: process.env.FORGET_INVALIDATION === '1' });
} else {
  throw new Error(`APP must be twotier or appcache, not ${APP}`);
}

const server = http.createServer(app);
server.listen(Number(PORT), () => console.log(`${APP} app listening on port ${server.address().port}`));

async function shutdown() {
  server.close();
  await pool.end();
  if (redis) await redis.quit();
}
process.once('SIGINT', shutdown);
process.once('SIGTERM', shutdown);
