//! What twotier keeps in Redis and under which names: the key layout (the Redis server's
//! incarnation after the prefix, the stampede lease beside each key), the encodings of a
//! value, a negative entry, a tombstone and an in-flight marker, and the fill script that
//! compares and sets them.

/// What a GET found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// JSON text of a cached value.
    Value(Vec<u8>),
    /// A cached "no row".
    Negative,
    /// A writer is committing a change to this key: read the source, fill nothing.
    InFlight,
    /// Nothing usable; `seen` is the exact raw content (absent or a tombstone) that a fill
    /// must still find in place to be allowed.
    Absent { seen: Option<Vec<u8>> },
}

pub const NEGATIVE: &[u8] = b"!none";
pub const TOMBSTONE_PREFIX: &[u8] = b"!inval:";
pub const INFLIGHT_PREFIX: &[u8] = b"!inflight:";

/// Compare-and-set fill: writes only if the key still holds exactly what the reader saw
/// before querying the source, and only if that read is at most `twotier.tombstone_ttl_s`
/// old by Redis's own clock. An invalidation in between replaced the value with a fresh
/// tombstone, so a reader holding pre-commit data can never put it back; and because no fill
/// can follow an older read, a tombstone only has to live that long, not the cache TTL.
/// Returns 1 (stored), 0 (invalidated meanwhile) or -1 (read too old).
pub const FILL_SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
if now - tonumber(ARGV[5]) > tonumber(ARGV[6]) then
  return -1
end
local cur = redis.call('GET', KEYS[1])
if (ARGV[1] == '0' and cur == false) or (ARGV[1] == '1' and cur == ARGV[2]) then
  redis.call('SET', KEYS[1], ARGV[3], 'EX', ARGV[4])
  redis.call('DEL', KEYS[2])
  return 1
end
redis.call('DEL', KEYS[2])
return 0
"#;

/// A variant (vary_by) is stored as `<token>\n<value>`, valid only while its key's own Redis
/// key holds exactly `<token>`: one tombstone on the key reaches every variant without
/// listing them. The token is a generation (`!gen:...`) that the first fill after an absence
/// or a tombstone puts on the key, derived from that tombstone so that fills racing after
/// the same tombstone agree on it. Compare-and-set on the key as the reader saw it (absent,
/// a tombstone or a generation), with the same age limit as [`FILL_SCRIPT`]; ARGV[1] = '2'
/// is an unconditional `twotier.set`. The key's generation lives at least as long as the
/// variant written under it; if it goes sooner (evicted, flushed), its variants are misses.
/// Returns 1, 0 or -1 as [`FILL_SCRIPT`].
pub const VARIANT_FILL_SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
if ARGV[1] ~= '2' and now - tonumber(ARGV[5]) > tonumber(ARGV[6]) then
  return -1
end
local cur = redis.call('GET', KEYS[1])
local ok = ARGV[1] == '2'
  or (ARGV[1] == '0' and cur == false)
  or (ARGV[1] == '1' and (cur == ARGV[2] or cur == '!gen:' .. ARGV[2]))
if not ok then
  redis.call('DEL', KEYS[3])
  return 0
end
local token
if cur == false then
  token = ARGV[7]
elseif string.sub(cur, 1, 5) == '!gen:' then
  token = cur
else
  token = '!gen:' .. cur
end
local ms = tonumber(ARGV[4]) * 1000
local left = redis.call('PTTL', KEYS[1])
if cur ~= token or left < ms then
  redis.call('SET', KEYS[1], token, 'PX', math.max(left, ms))
end
redis.call('SET', KEYS[2], token .. '\n' .. ARGV[3], 'PX', ms)
redis.call('DEL', KEYS[3])
return 1
"#;

pub const GENERATION_PREFIX: &[u8] = b"!gen:";

/// What a variant's GET found, given what its key holds (`base`): a value or "no row" only
/// if it was written under the key's present generation.
pub fn classify_variant(base: &Option<Vec<u8>>, raw: Option<Vec<u8>>) -> Lookup {
    let absent = || Lookup::Absent { seen: base.clone() };
    let (Some(token), Some(raw)) = (base, raw) else {
        return absent();
    };
    if !token.starts_with(GENERATION_PREFIX) {
        return absent();
    }
    match raw.strip_prefix(token.as_slice()) {
        Some([b'\n', value @ ..]) => match classify(Some(value.to_vec())) {
            found @ (Lookup::Value(_) | Lookup::Negative) => found,
            _ => absent(),
        },
        _ => absent(),
    }
}

const LEASE_SUFFIX: &str = "~lease";

/// The stampede lease of a key: `~` never occurs in an escaped key, so no entry has this name.
pub fn lease_key(l2: &str) -> String {
    format!("{l2}{LEASE_SUFFIX}")
}

/// Whether a name read back from Redis (a SCAN) is a stampede lease rather than an entry.
pub fn is_lease(l2: &str) -> bool {
    l2.ends_with(LEASE_SUFFIX)
}

/// Where a tier key lives in this Redis: the server's incarnation (the first 12 characters of
/// its `run_id`, new at every Redis start) follows the key prefix. A Redis restarted from an
/// old RDB or AOF file holds values older than tombstones it lost; under a new incarnation
/// nothing written before the restart is ever read again.
pub fn l2_key(incarnation: &str, tier_key: &str) -> String {
    let cut = tier_key.find(':').unwrap_or(0);
    let mut out = String::with_capacity(tier_key.len() + incarnation.len() + 1);
    out.push_str(&tier_key[..cut]);
    out.push(':');
    out.push_str(incarnation);
    if cut == 0 {
        out.push(':');
    }
    out.push_str(&tier_key[cut..]);
    out
}

/// Inverse of [`l2_key`]; None for a key of another incarnation.
pub fn tier_key_of(incarnation: &str, l2: &str) -> Option<String> {
    let cut = l2.find(':')?;
    let rest = l2[cut + 1..].strip_prefix(incarnation)?;
    rest.starts_with(':')
        .then(|| format!("{}{rest}", &l2[..cut]))
}

/// [`l2_key`] on a Redis Cluster: the part of the tier key after its prefix, up to its first
/// `~` (a variant, a group's token, a lease), is the hash tag, so everything one read, fill
/// or invalidation of one key touches shares a slot, and a cache's keys spread over every
/// slot. `{` and `}` never occur in an escaped key, nor in the prefix.
pub fn l2_key_tagged(namespace: &str, tier_key: &str) -> String {
    let cut = tier_key.find(':').map_or(0, |c| c + 1);
    let (prefix, rest) = tier_key.split_at(cut);
    let tag_end = rest.find('~').unwrap_or(rest.len());
    let mut out = String::with_capacity(tier_key.len() + namespace.len() + 4);
    out.push_str(prefix);
    if cut == 0 {
        out.push(':');
    }
    out.push_str(namespace);
    out.push_str(":{");
    out.push_str(&rest[..tag_end]);
    out.push('}');
    out.push_str(&rest[tag_end..]);
    out
}

/// A SCAN pattern for the tier-key glob `pattern` on a cluster: the tag's closing `}` comes
/// somewhere after the glob's end, so the pattern ends in `*` and callers keep only the names
/// their own test accepts.
pub fn l2_pattern_tagged(namespace: &str, pattern: &str) -> String {
    let mut out = l2_key_tagged(namespace, pattern);
    if let Some(close) = out.rfind('}') {
        out.truncate(close);
    }
    out.push('*');
    out
}

/// Inverse of [`l2_key_tagged`]; None for a name of another namespace.
pub fn tier_key_of_tagged(namespace: &str, l2: &str) -> Option<String> {
    let cut = l2.find(':')?;
    let rest = l2[cut + 1..].strip_prefix(namespace)?.strip_prefix(":{")?;
    let close = rest.find('}')?;
    Some(format!(
        "{}{}{}",
        &l2[..cut + 1],
        &rest[..close],
        &rest[close + 1..]
    ))
}

pub fn classify(raw: Option<Vec<u8>>) -> Lookup {
    match raw {
        Some(v) if v == NEGATIVE => Lookup::Negative,
        Some(v) if v.starts_with(TOMBSTONE_PREFIX) => Lookup::Absent { seen: Some(v) },
        Some(v) if v.starts_with(INFLIGHT_PREFIX) => Lookup::InFlight,
        Some(v) if v.first() == Some(&b'!') => Lookup::Absent { seen: Some(v) },
        Some(v) => Lookup::Value(v),
        None => Lookup::Absent { seen: None },
    }
}
