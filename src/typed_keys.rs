//! Typed and composite keys. Every tier stores a key as text; a typed key's text is its
//! canonical form: each part rendered by its type's output function with the settings that
//! shape text pinned (`spi::PINNED`), several parts joined by `keys::compose`. The app's
//! call (`cached_x(uuid)`, through `twotier.key_text` or a plain cast), the source query's
//! parameters and the triggers' keys all go through the same rendering, so they agree.

use crate::error::{CallError, Raise};
use crate::keys;
use pgrx::pg_sys::{self, Datum, Oid};
use pgrx::prelude::*;
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{CStr, CString};

/// One part of a key: its type and the I/O functions that render and read it.
#[derive(Debug, Clone, Copy)]
pub struct KeyType {
    pub oid: Oid,
    input: Oid,
    ioparam: Oid,
    output: Oid,
    /// Its text depends on settings (DateStyle, TimeZone): rendered under `spi::PINNED`.
    pub pinned: bool,
}

/// Types whose output reads no setting and whose equal values have one text.
const STABLE: [Oid; 10] = [
    pg_sys::INT2OID,
    pg_sys::INT4OID,
    pg_sys::INT8OID,
    pg_sys::OIDOID,
    pg_sys::TEXTOID,
    pg_sys::VARCHAROID,
    pg_sys::NAMEOID,
    pg_sys::UUIDOID,
    pg_sys::BOOLOID,
    pg_sys::UNKNOWNOID,
];

/// Types with one text per value once DateStyle, TimeZone and IntervalStyle are pinned.
const PINNED_OUTPUT: [Oid; 3] = [
    pg_sys::DATEOID,
    pg_sys::TIMESTAMPOID,
    pg_sys::TIMESTAMPTZOID,
];

/// Why values of `typ` cannot be keys, if they cannot: a key must have exactly one text per
/// value (equal values, equal keys), or a trigger's key would miss the app's.
pub fn problem(typ: Oid) -> Option<&'static str> {
    let base = unsafe { pg_sys::getBaseType(typ) };
    if STABLE.contains(&base) || PINNED_OUTPUT.contains(&base) {
        return None;
    }
    if unsafe { pg_sys::type_is_enum(base) } {
        return None;
    }
    Some(match base {
        pg_sys::NUMERICOID => "equal numerics can have different text (1.0 and 1.00)",
        pg_sys::FLOAT4OID | pg_sys::FLOAT8OID => "equal floats can have different text (0 and -0)",
        pg_sys::BPCHAROID => "equal character(n) values can have different text (trailing blanks)",
        pg_sys::INTERVALOID => "equal intervals can have different text ('1 day' and '24 hours')",
        pg_sys::JSONOID | pg_sys::JSONBOID => "json values have no canonical text as keys",
        _ => "twotier knows no canonical text form for this type",
    })
}

pub fn pinned(typ: Oid) -> bool {
    PINNED_OUTPUT.contains(&unsafe { pg_sys::getBaseType(typ) })
}

thread_local! {
    static TYPES: RefCell<HashMap<Oid, KeyType>> = RefCell::new(HashMap::new());
}

impl KeyType {
    pub fn of(oid: Oid) -> KeyType {
        if let Some(kt) = TYPES.with(|t| t.borrow().get(&oid).copied()) {
            return kt;
        }
        let kt = unsafe {
            let (mut input, mut ioparam, mut output, mut varlena) =
                (Oid::INVALID, Oid::INVALID, Oid::INVALID, false);
            pg_sys::getTypeInputInfo(oid, &mut input, &mut ioparam);
            pg_sys::getTypeOutputInfo(oid, &mut output, &mut varlena);
            KeyType {
                oid,
                input,
                ioparam,
                output,
                pinned: pinned(oid),
            }
        };
        TYPES.with(|t| t.borrow_mut().insert(oid, kt));
        kt
    }

    /// The text of `value`; the caller pins the settings when `self.pinned`.
    pub fn render(&self, value: Datum) -> String {
        unsafe {
            let text = pg_sys::OidOutputFunctionCall(self.output, value);
            let out = crate::server_text::from_server_cstr(text);
            pg_sys::pfree(text.cast());
            out
        }
    }

    /// The value whose text is `part` (raises the type's own input ERROR for bad text).
    fn read(&self, part: &str) -> Datum {
        let server = crate::server_text::to_server(part);
        if self.oid == pg_sys::TEXTOID {
            return Datum::from(unsafe {
                pg_sys::cstring_to_text_with_len(server.as_ptr().cast(), server.len() as i32)
            });
        }
        let c = CString::new(server.into_owned()).unwrap_or_else(|_| {
            CallError::KeyNotCanonical {
                key: part.replace('\0', "\\0"),
                canonical: None,
            }
            .raise()
        });
        unsafe { pg_sys::OidInputFunctionCall(self.input, c.as_ptr().cast_mut(), self.ioparam, -1) }
    }
}

/// The values `key` spells, one per part, and the canonical text of those values. The caller
/// pins the settings.
fn read_key(types: &[KeyType], key: &str) -> (Vec<Datum>, String) {
    let parts = keys::split(key, types.len()).unwrap_or_else(|| {
        CallError::KeyParts {
            key: key.to_string(),
            parts: types.len(),
        }
        .raise()
    });
    let mut values = Vec::with_capacity(parts.len());
    let mut canonical = Vec::with_capacity(parts.len());
    for (kt, part) in types.iter().zip(&parts) {
        let value = kt.read(part);
        if kt.oid != pg_sys::TEXTOID {
            canonical.push(kt.render(value));
        } else {
            canonical.push(part.clone());
        }
        values.push(value);
    }
    (values, keys::compose(&canonical))
}

/// The source query's parameters for `key` (canonical text), with the settings pinned by the
/// caller. A text that is not the canonical form of its value is refused: filled under it, an
/// entry would never be invalidated (the triggers render the canonical form).
pub fn parameters(types: &[KeyType], key: &str) -> Vec<Datum> {
    let (values, canonical) = read_key(types, key);
    if canonical != key {
        CallError::KeyNotCanonical {
            key: key.to_string(),
            canonical: Some(canonical),
        }
        .raise();
    }
    values
}

/// The canonical text of the key that `key` spells (`007` → `7`, an upper-case uuid → lower
/// case), for the calls that name a key to act on it (invalidate, set, exists): acting on a
/// spelling no trigger or fill uses would silently do nothing. Raises the type's input ERROR
/// for a text that is no value of it.
pub fn canonical(types: &[KeyType], key: &str) -> String {
    if let [only] = types {
        if only.oid == pg_sys::TEXTOID {
            return key.to_string();
        }
    }
    crate::spi::with_settings(&crate::spi::PINNED, || read_key(types, key).1)
}

#[no_mangle]
pub extern "C" fn pg_finfo_twotier_key_text() -> &'static pg_sys::Pg_finfo_record {
    static V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

/// `twotier.key_text(VARIADIC "any")`: the canonical text of a key of one or more parts;
/// NULL if any part is NULL (which the cache call then refuses).
///
/// # Safety
/// Called by the fmgr.
#[no_mangle]
#[pg_guard]
pub unsafe extern "C-unwind" fn twotier_key_text(fcinfo: pg_sys::FunctionCallInfo) -> Datum {
    unsafe {
        let flinfo = (*fcinfo).flinfo;
        if pg_sys::get_fn_expr_variadic(flinfo) {
            CallError::KeyTextArray.raise();
        }
        let n = (*fcinfo).nargs as usize;
        let args = (*fcinfo).args.as_slice(n);
        let mut types = Vec::with_capacity(n);
        for (i, arg) in args.iter().enumerate() {
            if arg.isnull {
                (*fcinfo).isnull = true;
                return Datum::from(0);
            }
            let typ = pg_sys::get_fn_expr_argtype(flinfo, i as i32);
            if let Some(why) = problem(typ) {
                CallError::KeyType {
                    typ: type_name(typ),
                    why,
                }
                .raise();
            }
            types.push(KeyType::of(typ));
        }
        let render = || -> Vec<String> {
            types
                .iter()
                .zip(args)
                .map(|(kt, arg)| kt.render(arg.value))
                .collect()
        };
        let parts = if types.iter().any(|t| t.pinned) {
            crate::spi::with_settings(&crate::spi::PINNED, render)
        } else {
            render()
        };
        let key = keys::compose(&parts);
        Datum::from(pg_sys::cstring_to_text_with_len(
            key.as_ptr().cast(),
            key.len() as i32,
        ))
    }
}

pub fn type_name(typ: Oid) -> String {
    unsafe {
        CStr::from_ptr(pg_sys::format_type_be(typ))
            .to_string_lossy()
            .into_owned()
    }
}

/// `key_types` as define() was given them, resolved as the cache's owner on its path.
#[pg_extern(volatile, parallel_unsafe)]
fn _resolve_key_types(names: Vec<Option<String>>, owner: Oid, search_path: &str) -> Vec<Oid> {
    let path = CString::new(search_path).unwrap_or_default();
    names
        .iter()
        .map(|name| {
            let Some(name) = name else {
                CallError::UnknownKeyType("NULL".into()).raise();
            };
            let found = crate::spi::as_owner(owner, &path, || {
                Spi::get_one_with_args::<Oid>(
                    "SELECT pg_catalog.to_regtype($1)::oid",
                    &[name.as_str().into()],
                )
            });
            match found {
                Ok(Some(oid)) if oid != Oid::INVALID => oid,
                _ => CallError::UnknownKeyType(name.clone()).raise(),
            }
        })
        .collect()
}

/// Why values of `typ` cannot be keys (NULL if they can).
#[pg_extern(immutable, parallel_safe)]
fn _key_type_problem(typ: Oid) -> Option<&'static str> {
    problem(typ)
}

/// Whether a key of type `typ` renders through key_text (its text depends on settings).
#[pg_extern(immutable, parallel_safe)]
fn _key_type_pinned(typ: Oid) -> bool {
    pinned(typ)
}

extern "C-unwind" {
    // parser/parse_param.h: lets the parser assign each $n the type its use implies.
    fn setup_parse_variable_parameters(
        pstate: *mut pg_sys::ParseState,
        param_types: *mut *mut Oid,
        num_params: *mut i32,
    );
}

struct Inferred {
    types: *mut Oid,
    n: i32,
}

unsafe extern "C-unwind" fn infer_setup(
    pstate: *mut pg_sys::ParseState,
    arg: *mut std::ffi::c_void,
) {
    unsafe {
        let state = arg as *mut Inferred;
        setup_parse_variable_parameters(pstate, &mut (*state).types, &mut (*state).n);
    }
}

/// The types the query gives `$1`, `$2`, ... by how it uses them, parsed as the owner on the
/// cache's path (`WHERE domain_id = $1` makes $1 a uuid). A parameter the query leaves
/// untyped (`SELECT $1`) is text; one it does not use at all is an ERROR.
#[pg_extern(volatile, parallel_unsafe)]
fn _infer_key_types(query: &str, owner: Oid, search_path: &str) -> Vec<Oid> {
    let path = CString::new(search_path).unwrap_or_default();
    let sql = CString::new(query).unwrap_or_default();
    crate::spi::as_owner(owner, &path, || unsafe {
        pg_sys::SPI_connect();
        let mut state = Inferred {
            types: std::ptr::null_mut(),
            n: 0,
        };
        let plan = pg_sys::SPI_prepare_params(
            sql.as_ptr(),
            Some(infer_setup),
            (&mut state as *mut Inferred).cast(),
            0,
        );
        let mut out = Vec::new();
        if !plan.is_null() && !state.types.is_null() {
            for i in 0..state.n as usize {
                let t = *state.types.add(i);
                out.push(match t {
                    pg_sys::UNKNOWNOID => pg_sys::TEXTOID,
                    t if t == Oid::INVALID => {
                        pg_sys::SPI_finish();
                        CallError::UnusedParameter(i + 1).raise();
                    }
                    t => t,
                });
            }
        }
        pg_sys::SPI_finish();
        out
    })
}

/// The query that renders a watch entry's key from `from` (the changed row, or the table
/// when define() checks the entry): the expression list, each part cast to its key type.
pub fn key_select(expression: &str, types: &[Oid], from: &str) -> String {
    let columns: Vec<String> = (1..=types.len()).map(|i| format!("c{i}")).collect();
    let casts: Vec<String> = types
        .iter()
        .zip(&columns)
        .map(|(t, c)| {
            let name = unsafe { CStr::from_ptr(pg_sys::format_type_be_qualified(*t)) };
            format!("(k.{c})::{}", name.to_string_lossy())
        })
        .collect();
    format!(
        "SELECT DISTINCT {} FROM (SELECT {expression} FROM {from}) AS k({})",
        casts.join(", "),
        columns.join(", ")
    )
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use super::*;

    #[pg_test]
    fn only_types_with_one_text_per_value_can_be_keys() {
        Spi::run(
            "CREATE TYPE tk_mood AS ENUM ('a', 'b');
             CREATE DOMAIN tk_id AS int CHECK (VALUE > 0);
             CREATE DOMAIN tk_money AS numeric;",
        )
        .unwrap();
        let oid = |t: &str| {
            Spi::get_one::<Oid>(&format!("SELECT '{t}'::regtype::oid"))
                .unwrap()
                .unwrap()
        };
        for ok in [
            "int",
            "bigint",
            "text",
            "uuid",
            "timestamptz",
            "date",
            "tk_mood",
            "tk_id",
        ] {
            assert_eq!(problem(oid(ok)), None, "{ok}");
        }
        for bad in [
            "numeric", "float8", "interval", "jsonb", "char(3)", "tk_money", "int[]", "point",
        ] {
            assert!(problem(oid(bad)).is_some(), "{bad}");
        }
        assert!(pinned(oid("timestamptz")) && !pinned(oid("uuid")));
    }

    #[pg_test]
    fn key_text_does_not_depend_on_the_callers_settings() {
        Spi::run("SET TimeZone = 'Asia/Tokyo'; SET DateStyle = 'SQL, DMY'").unwrap();
        let text = Spi::get_one::<String>(
            "SELECT twotier.key_text('2024-01-02 12:04:05.5+09'::timestamptz, 'a,b'::text, 7)",
        )
        .unwrap()
        .unwrap();
        assert_eq!(text, "2024-01-02 03:04:05.5+00,\"a,b\",7");
        let date = Spi::get_one::<String>("SELECT twotier.key_text('2024-03-01'::date)")
            .unwrap()
            .unwrap();
        assert_eq!(date, "2024-03-01");
        let zone = Spi::get_one::<String>("SELECT current_setting('TimeZone')")
            .unwrap()
            .unwrap();
        assert_eq!(zone, "Asia/Tokyo", "the session's settings come back");
    }

    #[pg_test]
    fn parameters_read_each_part_and_check_its_text() {
        let types = [KeyType::of(pg_sys::INT4OID), KeyType::of(pg_sys::TEXTOID)];
        let values =
            crate::spi::with_settings(&crate::spi::PINNED, || parameters(&types, "42,\"x,y\""));
        assert_eq!(values.len(), 2);
        assert_eq!(
            unsafe { i32::from_datum(values[0], false) },
            Some(42),
            "the int part"
        );
        assert_eq!(
            unsafe { String::from_datum(values[1], false) }.as_deref(),
            Some("x,y")
        );
    }

    #[pg_test(
        error = "twotier: key \"007\" is not the canonical text of its value (that is \"7\")"
    )]
    fn a_key_text_that_is_not_canonical_is_refused() {
        parameters(&[KeyType::of(pg_sys::INT4OID)], "007");
    }

    #[pg_test]
    fn typed_composite_and_json_caches_answer_through_their_functions() {
        Spi::run(
            "CREATE TABLE tk_faq(tenant int, locale text, q text);
             INSERT INTO tk_faq VALUES (1, 'en', 'How?'), (1, 'de', 'Wie?');
             SELECT twotier.define('tk_faq', $q$SELECT jsonb_agg(q) FROM tk_faq WHERE tenant = $1 AND locale = $2$q$,
                                   '1 min', ARRAY['tk_faq(tenant, locale)'], returns => 'json')",
        )
        .unwrap();
        let sig = Spi::get_one::<String>(
            "SELECT function::text || ' ' || many_function::text FROM twotier.caches WHERE name = 'tk_faq'",
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            sig,
            "cached_tk_faq(integer,text) cached_tk_faq_many(integer[],text[])"
        );
        let one = Spi::get_one::<String>("SELECT cached_tk_faq(1, 'de')::text")
            .unwrap()
            .unwrap();
        assert_eq!(one, "[\"Wie?\"]");
        let many = Spi::get_one::<String>(
            "SELECT string_agg(key1 || '/' || key2 || '=' || coalesce(value::text, 'NULL'), ' ')
               FROM cached_tk_faq_many(ARRAY[1, 2, 1], ARRAY['en', 'en', 'de'])",
        )
        .unwrap()
        .unwrap();
        assert_eq!(many, "1/en=[\"How?\"] 2/en=NULL 1/de=[\"Wie?\"]");
    }
}
