//! What a `vary_by` cache's entries vary by, and the variant of the current caller: `role`
//! (`current_user`), a whole setting, or a JSON path into a setting
//! (`request.jwt.claims->>sub`), so that a JWT's `iat` and `exp` do not give every token
//! entries of its own.
//!
//! A path's setting is parsed once per distinct text (a backend-local memo), not per call:
//! behind PostgREST every request sets the claims again, usually to the same text.

use crate::error::{CallError, Raise};
use crate::keys;
use pgrx::pg_sys;
use serde_json::value::RawValue;
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{CStr, CString};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VaryBy {
    /// The current role (`current_user`), which also runs the query.
    Role,
    /// The whole value of a setting, such as `request.jwt.claims`.
    Setting(CString),
    /// One value inside a setting holding JSON.
    Path(JsonPath),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonPath {
    pub setting: CString,
    /// The object keys (or array indexes) stepped through, in order.
    pub steps: Vec<String>,
    /// `->>` at the end: a string is its text (as SQL's `->>` gives it); `->`: the JSON text.
    pub as_text: bool,
    /// The entry as the definer wrote it, for messages.
    pub written: String,
}

impl VaryBy {
    /// One entry of `twotier.caches.vary_by`, as `_define` accepted it.
    pub fn parse(entry: &str) -> Option<VaryBy> {
        match entry {
            "" => None,
            "role" => Some(VaryBy::Role),
            other => match other.find("->") {
                None => CString::new(other).ok().map(VaryBy::Setting),
                Some(cut) => parse_path(other, cut).map(VaryBy::Path),
            },
        }
    }
}

/// `setting(->step)*(->>step)?`, a step being a bare word or a single-quoted one.
fn parse_path(entry: &str, cut: usize) -> Option<JsonPath> {
    let setting = CString::new(&entry[..cut]).ok()?;
    let mut rest = &entry[cut..];
    let mut steps = Vec::new();
    let mut as_text = false;
    while !rest.is_empty() {
        if as_text {
            // `->>` only at the end: its result is text, not JSON to step into.
            return None;
        }
        rest = rest.strip_prefix("->")?;
        if let Some(r) = rest.strip_prefix('>') {
            as_text = true;
            rest = r;
        }
        let (step, r) = if let Some(r) = rest.strip_prefix('\'') {
            let end = r.find('\'')?;
            (&r[..end], &r[end + 1..])
        } else {
            let end = rest.find("->").unwrap_or(rest.len());
            if end == 0 || rest[..end].contains('\'') {
                return None;
            }
            (&rest[..end], &rest[end..])
        };
        steps.push(step.to_string());
        rest = r;
    }
    Some(JsonPath {
        setting,
        steps,
        as_text,
        written: entry.to_string(),
    })
}

/// What a path found in one setting text: `None` is SQL's NULL (no such key, or JSON null).
fn extract(text: &str, path: &JsonPath) -> Result<Option<String>, ()> {
    let mut raw: &RawValue = serde_json::from_str(text).map_err(|_| ())?;
    for step in &path.steps {
        let t = raw.get().trim_start();
        // Duplicate keys: the last one wins, as in jsonb, which is what a policy reads.
        let next = if t.starts_with('{') {
            let map: HashMap<String, &RawValue> =
                serde_json::from_str(raw.get()).map_err(|_| ())?;
            map.get(step).copied()
        } else if t.starts_with('[') {
            let items: Vec<&RawValue> = serde_json::from_str(raw.get()).map_err(|_| ())?;
            step.parse::<usize>()
                .ok()
                .and_then(|i| items.get(i).copied())
        } else {
            None
        };
        match next {
            Some(v) => raw = v,
            None => return Ok(None),
        }
    }
    let t = raw.get().trim();
    if t == "null" {
        return Ok(None);
    }
    if path.as_text && t.starts_with('"') {
        return serde_json::from_str::<String>(t).map(Some).map_err(|_| ());
    }
    // Numbers, booleans, objects and arrays as written: two values jsonb tells apart (1.0 and
    // 1.00) never share a variant; two it equates may get two (only a lower hit ratio).
    // A string reached by `->` keeps its quotes, so it never equals a number's text.
    Ok(Some(t.to_string()))
}

/// One setting's last text, and what each path (by its entry) found in it.
type Found = (Vec<u8>, HashMap<String, Option<String>>);

thread_local! {
    /// Per setting name.
    static MEMO: RefCell<HashMap<CString, Found>> = RefCell::new(HashMap::new());
}

fn path_value(path: &JsonPath) -> Option<String> {
    let value = unsafe { pg_sys::GetConfigOption(path.setting.as_ptr(), true, false) };
    // Unset, or reset to '' at the end of a SET LOCAL in a pooled session: a policy reading
    // it as JSON would fail, and no variant may stand for "no caller".
    if value.is_null() || unsafe { *value } == 0 {
        CallError::VaryUnset(path.written.clone()).raise();
    }
    let bytes = unsafe { CStr::from_ptr(value) }.to_bytes();
    let memo = MEMO.with(|m| {
        let m = m.borrow();
        m.get(&path.setting)
            .filter(|(text, _)| text == bytes)
            .and_then(|(_, found)| found.get(&path.written).cloned())
    });
    if let Some(found) = memo {
        return found;
    }
    // Exactly, or an ERROR: a lossy conversion would give two callers one variant.
    let text = unsafe { crate::server_text::from_server_cstr(value) };
    let found = match extract(&text, path) {
        Ok(found) => found,
        Err(()) => CallError::VaryNotJson(path.written.clone()).raise(),
    };
    MEMO.with(|m| {
        let mut m = m.borrow_mut();
        let entry = m
            .entry(path.setting.clone())
            .or_insert_with(|| (Vec::new(), HashMap::new()));
        if entry.0 != bytes {
            entry.0 = bytes.to_vec();
            entry.1.clear();
        }
        entry.1.insert(path.written.clone(), found.clone());
    });
    found
}

/// The tier key of the current caller's variant of `tier_key` (grouped by the `per` entry).
pub fn variant_key(tier_key: &str, vary_by: &[VaryBy], per: Option<usize>) -> String {
    let parts: Vec<Option<String>> = vary_by
        .iter()
        .map(|part| match part {
            VaryBy::Role => Some(unsafe { pg_sys::GetUserId() }.to_u32().to_string()),
            VaryBy::Setting(name) => {
                let value = unsafe { pg_sys::GetConfigOption(name.as_ptr(), true, false) };
                // Exactly, or an ERROR: a lossy conversion would give two callers one key.
                (!value.is_null()).then(|| unsafe { crate::server_text::from_server_cstr(value) })
            }
            VaryBy::Path(path) => path_value(path),
        })
        .collect();
    keys::with_variant(tier_key, &parts, per)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(entry: &str) -> JsonPath {
        match VaryBy::parse(entry) {
            Some(VaryBy::Path(p)) => p,
            other => panic!("{entry} parsed as {other:?}"),
        }
    }

    #[test]
    fn entries_parse_as_written() {
        assert_eq!(VaryBy::parse("role"), Some(VaryBy::Role));
        assert_eq!(
            VaryBy::parse("request.jwt.claims"),
            Some(VaryBy::Setting(c"request.jwt.claims".into()))
        );
        let p = path("request.jwt.claims->>sub");
        assert_eq!(p.setting.as_c_str(), c"request.jwt.claims");
        assert_eq!(p.steps, vec!["sub"]);
        assert!(p.as_text);
        let p = path("request.jwt.claims->app_metadata->>'tenant id'");
        assert_eq!(p.steps, vec!["app_metadata", "tenant id"]);
        assert!(p.as_text);
        let p = path("a.b->x");
        assert!(!p.as_text);
        assert_eq!(VaryBy::parse("a.b->>x->y"), None, "->> ends a path");
        assert_eq!(VaryBy::parse("a.b->"), None);
        assert_eq!(VaryBy::parse("a.b->'x"), None);
    }

    #[test]
    fn a_path_reads_what_sqls_arrows_read() {
        let sub = path("c.x->>sub");
        let claims = r#"{"sub": "u1", "iat": 1700000000, "role": "authenticated"}"#;
        assert_eq!(extract(claims, &sub), Ok(Some("u1".into())));
        // A token re-issued: another iat, the same variant.
        let again = r#"{"role": "authenticated", "iat": 1700000999, "sub": "u1"}"#;
        assert_eq!(extract(again, &sub), extract(claims, &sub));
        assert_eq!(extract(r#"{"iat": 1}"#, &sub), Ok(None));
        assert_eq!(extract(r#"{"sub": null}"#, &sub), Ok(None));
        // Escapes in keys and values are read as jsonb reads them; the last duplicate wins.
        assert_eq!(
            extract(r#"{"\u0073ub": "a\"b", "sub": "c"}"#, &sub),
            Ok(Some("c".into()))
        );
        assert_eq!(extract(r#"{"sub": "a\"b"}"#, &sub), Ok(Some("a\"b".into())));
        // Numbers as written: 1.0 and 1.00 differ as text in SQL too.
        assert_eq!(extract(r#"{"sub": 1.0}"#, &sub), Ok(Some("1.0".into())));
        assert_eq!(extract(r#"{"sub": 1.00}"#, &sub), Ok(Some("1.00".into())));
        let nested = path("c.x->app->>'tenant'");
        assert_eq!(
            extract(r#"{"app": {"tenant": "t9"}}"#, &nested),
            Ok(Some("t9".into()))
        );
        assert_eq!(extract(r#"{"app": "t9"}"#, &nested), Ok(None));
        let first = path("c.x->roles->>0");
        assert_eq!(
            extract(r#"{"roles": ["a", "b"]}"#, &first),
            Ok(Some("a".into()))
        );
        // `->` keeps a string's quotes: "1" and 1 are two variants.
        let json = path("c.x->sub");
        assert_eq!(extract(r#"{"sub": "1"}"#, &json), Ok(Some("\"1\"".into())));
        assert_eq!(extract(r#"{"sub": 1}"#, &json), Ok(Some("1".into())));
        assert_eq!(extract("not json", &sub), Err(()));
        assert_eq!(extract("", &sub), Err(()));
    }
}
