//! Redis key layout: `<prefix>:<database>:<cache>:v<version>:<key>`, each free-form part
//! percent-encoded so that no key can contain `:` or a glob metacharacter. That is what
//! keeps one cache's keys (and one database's) out of reach of another's patterns.

use std::fmt::Write;

fn is_plain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'@')
}

pub fn escape_into(out: &mut String, raw: &str) {
    // Ids, uuids and domain names need no escaping: one copy instead of a loop per byte.
    if raw.bytes().all(is_plain) {
        out.push_str(raw);
        return;
    }
    for &b in raw.as_bytes() {
        if is_plain(b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
}

pub fn escape(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len() + 8);
    escape_into(&mut out, raw);
    out
}

/// Inverse of [`escape`]; `None` for anything `escape` cannot have produced.
pub fn unescape(escaped: &str) -> Option<String> {
    let bytes = escaped.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = escaped.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The part of every key of one cache version that precedes the app's key, ending in `:`.
pub fn cache_prefix(prefix: &str, database: &str, cache: &str, version: i64) -> String {
    let mut out = String::with_capacity(prefix.len() + database.len() + cache.len() + 16);
    escape_into(&mut out, prefix);
    out.push(':');
    escape_into(&mut out, database);
    out.push(':');
    escape_into(&mut out, cache);
    let _ = write!(out, ":v{version}:");
    out
}

/// Marks where a variant begins in an entry's tier key: `~` never occurs in an escaped key.
pub const VARIANT_MARK: &str = "~v";

/// The tier key of one variant (vary_by) of the key `tier_key`: `~v`, then each part escaped
/// (so none holds a `|`) or `~` for NULL or an unset setting (escape never yields a bare `~`),
/// each followed by `|`. The key comes first, so every variant of a key starts with its tier
/// key and the key is what precedes `~v` ([`base_of`]). With a `per` part (the cache's watch
/// entries are declared per one of its vary_by entries), `~p` and that part's value come
/// between: the variants of one key are then grouped by it, and a write names one group.
pub fn with_variant(tier_key: &str, parts: &[Option<String>], per: Option<usize>) -> String {
    let mut out = String::with_capacity(tier_key.len() + 32);
    out.push_str(tier_key);
    if let Some(i) = per {
        push_scope(&mut out, parts.get(i).and_then(|p| p.as_deref()));
    }
    out.push_str(VARIANT_MARK);
    for part in parts {
        match part {
            Some(value) => escape_into(&mut out, value),
            None => out.push('~'),
        }
        out.push('|');
    }
    out
}

/// Appends `~p` and a per value (`~` for NULL): the group of a key's variants a write names.
pub fn push_scope(out: &mut String, value: Option<&str>) {
    out.push_str("~p");
    match value {
        Some(v) => escape_into(out, v),
        None => out.push('~'),
    }
}

/// The tier key of the app's key an entry, a group's token or a lease belongs to: what
/// precedes the first `~` (escape never yields one). Unlike `base_of`, it also cuts a `per`
/// group's `~p` part and a lease's suffix.
pub fn key_of_entry(tier_key: &str) -> &str {
    match tier_key.find('~') {
        Some(cut) => &tier_key[..cut],
        None => tier_key,
    }
}

/// The tier key of the key an entry's tier key belongs to (itself without a variant), keeping
/// a `per` group's `~p` part, which the variant's token lives under; `key_of_entry` cuts it.
pub fn base_of(entry_key: &str) -> &str {
    match entry_key.find(VARIANT_MARK) {
        Some(cut) => &entry_key[..cut],
        None => entry_key,
    }
}

/// The canonical text of a key of several parts (each already its type's canonical text):
/// the parts joined by `,`, a part quoted (`"..."`, with `"` doubled) when it holds a `,` or a
/// `"`. A key of one part is that part, unchanged, so a text key stays what the app passed.
/// Several parts of a fixed count never share a text: see [`split`].
pub fn compose<S: AsRef<str>>(parts: &[S]) -> String {
    if let [only] = parts {
        return only.as_ref().to_string();
    }
    let mut out = String::with_capacity(parts.iter().map(|p| p.as_ref().len() + 1).sum());
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let part = part.as_ref();
        if part.contains([',', '"']) {
            out.push('"');
            out.push_str(&part.replace('"', "\"\""));
            out.push('"');
        } else {
            out.push_str(part);
        }
    }
    out
}

/// Inverse of [`compose`] for `n` parts; None for a text that `compose` cannot have made.
pub fn split(key: &str, n: usize) -> Option<Vec<String>> {
    if n == 1 {
        return Some(vec![key.to_string()]);
    }
    let mut parts = Vec::with_capacity(n);
    let mut rest = key;
    loop {
        let part;
        if let Some(quoted) = rest.strip_prefix('"') {
            let mut value = String::new();
            let mut chars = quoted.char_indices();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                if c == '"' {
                    if quoted[i + 1..].starts_with('"') {
                        value.push('"');
                        chars.next();
                    } else {
                        end = Some(i + 1);
                        break;
                    }
                } else {
                    value.push(c);
                }
            }
            let end = end?;
            // Quoted only when it had to be: otherwise compose would not have quoted it.
            if !value.contains([',', '"']) {
                return None;
            }
            part = value;
            rest = &quoted[end..];
        } else {
            let cut = rest.find(',').unwrap_or(rest.len());
            if rest[..cut].contains('"') {
                return None;
            }
            part = rest[..cut].to_string();
            rest = &rest[cut..];
        }
        parts.push(part);
        match rest.strip_prefix(',') {
            Some(r) => rest = r,
            None if rest.is_empty() => break,
            None => return None,
        }
    }
    (parts.len() == n).then_some(parts)
}

pub fn full_key(cache_prefix: &str, key: &str) -> String {
    let mut out = String::with_capacity(cache_prefix.len() + key.len() + 8);
    out.push_str(cache_prefix);
    escape_into(&mut out, key);
    out
}

/// An app-level glob (`*` any run, `?` one character, `\` quotes the next character)
/// compiled to a Redis SCAN pattern that cannot match outside `cache_prefix`, plus an exact
/// matcher: `?` has to become `*` in Redis because one character may be escaped to several
/// bytes, so every SCAN result is re-checked against the original glob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyGlob {
    tokens: Vec<GlobToken>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum GlobToken {
    Literal(char),
    AnyOne,
    AnyRun,
}

impl KeyGlob {
    pub fn parse(glob: &str) -> Self {
        let mut tokens = Vec::new();
        let mut chars = glob.chars();
        while let Some(c) = chars.next() {
            tokens.push(match c {
                '*' => GlobToken::AnyRun,
                '?' => GlobToken::AnyOne,
                '\\' => GlobToken::Literal(chars.next().unwrap_or('\\')),
                other => GlobToken::Literal(other),
            });
        }
        KeyGlob { tokens }
    }

    pub fn redis_pattern(&self, cache_prefix: &str) -> String {
        let mut out = String::from(cache_prefix);
        let mut buf = [0u8; 4];
        for t in &self.tokens {
            match t {
                GlobToken::Literal(c) => escape_into(&mut out, c.encode_utf8(&mut buf)),
                GlobToken::AnyOne | GlobToken::AnyRun => {
                    if !out.ends_with('*') {
                        out.push('*')
                    }
                }
            }
        }
        out
    }

    pub fn matches(&self, key: &str) -> bool {
        let chars: Vec<char> = key.chars().collect();
        // Iterative glob match with single-star backtracking: linear in practice and never
        // recursive, so a hostile pattern cannot blow the stack.
        let (mut p, mut k) = (0usize, 0usize);
        let mut star: Option<(usize, usize)> = None;
        while k < chars.len() {
            match self.tokens.get(p) {
                Some(GlobToken::AnyRun) => {
                    star = Some((p, k));
                    p += 1;
                }
                Some(GlobToken::AnyOne) => {
                    p += 1;
                    k += 1;
                }
                Some(GlobToken::Literal(c)) if *c == chars[k] => {
                    p += 1;
                    k += 1;
                }
                _ => match star {
                    Some((sp, sk)) => {
                        p = sp + 1;
                        k = sk + 1;
                        star = Some((sp, sk + 1));
                    }
                    None => return false,
                },
            }
        }
        self.tokens[p..].iter().all(|t| *t == GlobToken::AnyRun)
    }
}

/// Properties of the layout, over arbitrary strings: no two distinct (scope, cache, version,
/// key) tuples share a key, no pattern of one cache matches another's key, and no two
/// variants of a key coincide.
#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    /// Redis's glob, as far as our patterns use it: `*`, `?` and `\` quoting.
    fn redis_glob(pattern: &[u8], s: &[u8]) -> bool {
        match pattern.split_first() {
            None => s.is_empty(),
            Some((b'*', rest)) => (0..=s.len()).any(|i| redis_glob(rest, &s[i..])),
            Some((b'?', rest)) => !s.is_empty() && redis_glob(rest, &s[1..]),
            Some((b'\\', rest)) if !rest.is_empty() => {
                s.first() == Some(&rest[0]) && redis_glob(&rest[1..], &s[1..])
            }
            Some((c, rest)) => s.first() == Some(c) && redis_glob(rest, &s[1..]),
        }
    }

    /// Splits a full key back into its parts: possible only because no part holds a `:`.
    fn parse(full: &str) -> Option<(String, String, String, i64, String)> {
        let parts: Vec<&str> = full.split(':').collect();
        let [prefix, scope, cache, version, key] = parts.as_slice() else {
            return None;
        };
        Some((
            unescape(prefix)?,
            unescape(scope)?,
            unescape(cache)?,
            version.strip_prefix('v')?.parse().ok()?,
            unescape(key)?,
        ))
    }

    fn tuple() -> impl Strategy<Value = (String, String, i64, String)> {
        (".{0,12}", ".{0,12}", any::<i64>(), ".{0,24}")
    }

    proptest! {
        #[test]
        fn every_key_names_exactly_one_tuple((scope, cache, version, key) in tuple()) {
            let full = full_key(&cache_prefix("twotier", &scope, &cache, version), &key);
            prop_assert_eq!(parse(&full), Some(("twotier".into(), scope, cache, version, key)));
        }

        #[test]
        fn distinct_tuples_never_share_a_key(a in tuple(), b in tuple()) {
            prop_assume!(a != b);
            let ka = full_key(&cache_prefix("twotier", &a.0, &a.1, a.2), &a.3);
            let kb = full_key(&cache_prefix("twotier", &b.0, &b.1, b.2), &b.3);
            prop_assert_ne!(ka, kb);
        }

        #[test]
        fn a_pattern_never_reaches_another_caches_key(
            a in tuple(), b in tuple(), glob in "[a-z*?:%\\\\]{0,10}",
        ) {
            prop_assume!((&a.0, &a.1, a.2) != (&b.0, &b.1, b.2));
            let pa = cache_prefix("twotier", &a.0, &a.1, a.2);
            let pb = cache_prefix("twotier", &b.0, &b.1, b.2);
            let pattern = KeyGlob::parse(&glob).redis_pattern(&pa);
            let other = full_key(&pb, &b.3);
            prop_assert!(!redis_glob(pattern.as_bytes(), other.as_bytes()), "{} matched {}", pattern, other);
        }

        #[test]
        fn variants_of_keys_never_coincide(
            a in proptest::collection::vec(proptest::option::of(".{0,8}"), 2),
            b in proptest::collection::vec(proptest::option::of(".{0,8}"), 2),
            ka in ".{0,12}", kb in ".{0,12}",
        ) {
            prop_assume!((&a, &ka) != (&b, &kb));
            let va = with_variant(&full_key("p:d:c:v1:", &ka), &a, None);
            let vb = with_variant(&full_key("p:d:c:v1:", &kb), &b, None);
            prop_assert_ne!(&va, &vb);
            prop_assert_eq!(base_of(&va), full_key("p:d:c:v1:", &ka));
            prop_assert!(!va.ends_with("~lease"), "no variant is named like a stampede lease");
            // Grouped per the second part: the group is what precedes `~v`, and names the key
            // and the part's value exactly.
            let pa = with_variant(&full_key("p:d:c:v1:", &ka), &a, Some(1));
            let pb = with_variant(&full_key("p:d:c:v1:", &kb), &b, Some(1));
            prop_assert_ne!(&pa, &pb);
            let mut group = full_key("p:d:c:v1:", &ka);
            push_scope(&mut group, a[1].as_deref());
            prop_assert_eq!(base_of(&pa), group.as_str());
            if (&ka, &a[1]) != (&kb, &b[1]) {
                prop_assert_ne!(base_of(&pa), base_of(&pb));
            }
        }

        #[test]
        fn composite_keys_split_back_into_their_parts(
            parts in proptest::collection::vec("[a,\"x ]{0,6}|.{0,6}", 1..5),
        ) {
            let key = compose(&parts);
            prop_assert_eq!(split(&key, parts.len()), Some(parts));
        }

        #[test]
        fn distinct_composite_keys_never_coincide(
            a in proptest::collection::vec("[a,\"]{0,4}", 2),
            b in proptest::collection::vec("[a,\"]{0,4}", 2),
        ) {
            prop_assume!(a != b);
            prop_assert_ne!(compose(&a), compose(&b));
        }
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use super::*;
    use pgrx::prelude::*;

    #[pg_test]
    fn escape_round_trips_and_hides_separators() {
        for raw in [
            "abc",
            "a:b",
            "x*y?z",
            "with space",
            "100%",
            "ünï",
            "",
            "a\\b[c]",
        ] {
            let e = escape(raw);
            assert!(
                !e.contains(':') && !e.contains('*') && !e.contains(' '),
                "{e}"
            );
            assert!(
                !e.contains('[') && !e.contains('?') && !e.contains('\\'),
                "{e}"
            );
            assert_eq!(unescape(&e).as_deref(), Some(raw));
        }
        assert_eq!(escape("a:b c"), "a%3Ab%20c");
    }

    #[pg_test]
    fn keys_of_different_caches_cannot_collide() {
        let a = cache_prefix("twotier", "app", "users", 1);
        let b = cache_prefix("twotier", "app", "users_x", 1);
        assert_eq!(a, "twotier:app:users:v1:");
        // a key of cache `users` that looks like the start of another cache's key
        assert_ne!(full_key(&a, "x:v1:k"), full_key(&b, "k"));
        assert!(!full_key(&a, "x:v1:k").starts_with(&b));
        let db = cache_prefix("twotier", "my:db", "c", 3);
        assert_eq!(db, "twotier:my%3Adb:c:v3:");
    }

    #[pg_test]
    fn glob_stays_inside_its_cache() {
        let p = cache_prefix("twotier", "app", "users", 2);
        let g = KeyGlob::parse("user-*");
        assert_eq!(g.redis_pattern(&p), "twotier:app:users:v2:user-*");
        let g = KeyGlob::parse("*");
        assert_eq!(g.redis_pattern(&p), "twotier:app:users:v2:*");
        // glob metacharacters meant literally are escaped, never passed to Redis raw
        let g = KeyGlob::parse("a:\\*[x]");
        assert_eq!(g.redis_pattern(&p), "twotier:app:users:v2:a%3A%2A%5Bx%5D");
    }

    #[pg_test]
    fn glob_matches_exactly() {
        let g = KeyGlob::parse("user-?");
        assert!(g.matches("user-1"));
        assert!(g.matches("user-ü"));
        assert!(!g.matches("user-12"));
        let g = KeyGlob::parse("*a*b");
        assert!(g.matches("xxaxxb"));
        assert!(g.matches("ab"));
        assert!(!g.matches("ba"));
        let g = KeyGlob::parse("lit\\*");
        assert!(g.matches("lit*"));
        assert!(!g.matches("litx"));
        assert!(KeyGlob::parse("").matches(""));
        assert!(!KeyGlob::parse("").matches("a"));
    }
}
