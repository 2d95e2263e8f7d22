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

/// The stampede lease of a key: `~` never occurs in an escaped key, so no entry has this name.
pub fn lease_key(l2: &str) -> String {
    format!("{l2}~lease")
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
