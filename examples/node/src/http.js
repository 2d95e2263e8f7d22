// The plumbing both apps share, so that the two app files differ only in how they get data.

export function sendJson(res, status, body) {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
  res.end(text);
}

export async function readJson(req, limit = 64 * 1024) {
  let size = 0;
  const chunks = [];
  for await (const chunk of req) {
    size += chunk.length;
    if (size > limit) throw new HttpError(413, 'body too large');
    chunks.push(chunk);
  }
  if (!chunks.length) return {};
  try {
    return JSON.parse(Buffer.concat(chunks).toString('utf8'));
  } catch {
    throw new HttpError(400, 'body is not JSON');
  }
}

export class HttpError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

// Checked before it reaches SQL: a malformed uuid would otherwise come back as a 500.
export function requireUuid(value) {
  if (!UUID.test(value)) throw new HttpError(400, 'not a uuid');
  return value;
}

/** The two routes of the report's app; `handlers` supplies chat(domain) and updateWidget(id, body). */
export function router(handlers) {
  return async function handle(req, res) {
    try {
      const { pathname } = new URL(req.url, 'http://localhost');
      const parts = pathname.split('/').filter(Boolean).map(decodeURIComponent);
      if (req.method === 'GET' && parts.length === 2 && parts[0] === 'chat') {
        const body = await handlers.chat(parts[1]);
        return body ? sendJson(res, 200, body) : sendJson(res, 404, { error: 'unknown domain' });
      }
      if (req.method === 'POST' && parts.length === 3 && parts[0] === 'admin' && parts[1] === 'widget-config') {
        const id = requireUuid(parts[2]);
        const body = await readJson(req);
        if (typeof body.greeting !== 'string') throw new HttpError(400, 'greeting (a string) is required');
        const version = await handlers.updateWidget(id, body);
        return version == null
          ? sendJson(res, 404, { error: 'unknown domain id' })
          : sendJson(res, 200, { domainId: id, version });
      }
      sendJson(res, 404, { error: 'not found' });
    } catch (err) {
      if (err instanceof HttpError) return sendJson(res, err.status, { error: err.message });
      console.error(err);
      sendJson(res, 500, { error: 'internal error' });
    }
  };
}
