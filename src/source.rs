//! The source tier: running a cache's query through SPI with the rights of the cache's owner
//! and the search_path pinned at define time, so every caller gets the same answer and no
//! caller can redirect the query with their own search_path.

use crate::catalog::CacheDef;
use crate::error::{CallError, CatalogError, InternalError, Raise};
use crate::spi::{as_owner, with_settings, SpiConnection, PINNED};
use pgrx::pg_sys::{self, Datum, Oid};
use pgrx::prelude::*;

extern "C-unwind" {
    // The fmgr entry point itself (pg_sys wraps it in a Rust fn), for DirectFunctionCall.
    #[link_name = "jsonb_out"]
    fn raw_jsonb_out(fcinfo: pg_sys::FunctionCallInfo) -> Datum;
}
use std::ffi::{CStr, CString};

/// A row fetched from the source: the value as the cache hands it out (a flat jsonb, or for
/// a json-mode cache the json text, in the caller's memory context) and its canonical JSON
/// text, which is what L2 stores.
pub struct SourceValue {
    pub datum: Datum,
    pub json: String,
}

fn single_plan_source(plan: pg_sys::SPIPlanPtr) -> Option<*mut pg_sys::CachedPlanSource> {
    unsafe {
        let list = pg_sys::SPI_plan_get_plan_sources(plan);
        if list.is_null() || (*list).length != 1 {
            return None;
        }
        Some((*(*list).elements).ptr_value as *mut pg_sys::CachedPlanSource)
    }
}

/// The attributes of a tuple descriptor. PostgreSQL 18 keeps a compact array first and the
/// full ones after it (what TupleDescAttr() reads).
///
/// # Safety
/// `desc` must be a valid tuple descriptor that outlives the slice.
pub unsafe fn tuple_attrs<'a>(desc: pg_sys::TupleDesc) -> &'a [pg_sys::FormData_pg_attribute] {
    unsafe {
        let natts = (*desc).natts as usize;
        #[cfg(not(feature = "pg18"))]
        let first = (*desc).attrs.as_ptr();
        #[cfg(feature = "pg18")]
        let first =
            (*desc).compact_attrs.as_ptr().add(natts) as *const pg_sys::FormData_pg_attribute;
        std::slice::from_raw_parts(first, natts)
    }
}

fn describe_result(desc: pg_sys::TupleDesc) -> Result<(), String> {
    unsafe {
        if desc.is_null() {
            return Err("no rows (it is not a SELECT)".into());
        }
        let natts = (*desc).natts as usize;
        let attrs = tuple_attrs(desc);
        let types: Vec<String> = attrs
            .iter()
            .map(|a| {
                let name = pg_sys::format_type_be(a.atttypid);
                CStr::from_ptr(name).to_string_lossy().into_owned()
            })
            .collect();
        if natts == 1 && attrs[0].atttypid == pg_sys::JSONBOID {
            Ok(())
        } else {
            Err(format!("{} column(s): {}", natts, types.join(", ")))
        }
    }
}

fn prepare(query: &str, argtypes: &mut [Oid]) -> pg_sys::SPIPlanPtr {
    let q = CString::new(query).unwrap_or_default();
    unsafe {
        let plan = pg_sys::SPI_prepare(q.as_ptr(), argtypes.len() as i32, argtypes.as_mut_ptr());
        if plan.is_null() {
            let code = pg_sys::SPI_result;
            InternalError::Spi {
                what: "preparing a query",
                code,
            }
            .raise();
        }
        plan
    }
}

/// Parses `query` as the cache owner would run it, with `$1`, `$2`, ... of `key_types`,
/// checks that it yields one jsonb column, and returns the relations it reads (through views
/// too), for `define` to check. A query using a `$n` past `key_types` fails (42P02): that is
/// how define() tells that it uses the key's last part.
pub fn check_query(query: &str, owner: Oid, search_path: &CStr, key_types: &[Oid]) -> Vec<Oid> {
    let _spi = SpiConnection::open();
    as_owner(owner, search_path, || {
        let plan = prepare(query, &mut key_types.to_vec());
        let Some(src) = single_plan_source(plan) else {
            CatalogError::QueryShape("more than one statement".into()).raise();
        };
        if let Err(found) = describe_result(unsafe { (*src).resultDesc }) {
            CatalogError::QueryShape(found).raise();
        }
        unsafe { relation_oids(src) }
    })
}

/// Parses a watch entry's key expression against its table, as the owner, without running
/// it: it must give as many values as the key has parts, each castable to its part's type.
pub fn check_watch_expression(
    table: Oid,
    expression: &str,
    owner: Oid,
    search_path: &CStr,
    key_types: &[Oid],
) {
    let _spi = SpiConnection::open();
    as_owner(owner, search_path, || {
        let table_name = unsafe {
            let qualified = pg_sys::quote_qualified_identifier(
                pg_sys::get_namespace_name(pg_sys::get_rel_namespace(table)),
                pg_sys::get_rel_name(table),
            );
            CStr::from_ptr(qualified).to_string_lossy().into_owned()
        };
        let from = format!("ONLY {table_name}");
        let plan = prepare(&format!("SELECT {expression} FROM {from}"), &mut []);
        let Some(src) = single_plan_source(plan) else {
            CatalogError::QueryShape("a watch expression with several statements".into()).raise();
        };
        let found = unsafe { (*(*src).resultDesc).natts } as usize;
        if found != key_types.len() {
            CatalogError::WatchArity {
                expression: expression.to_string(),
                found,
                parts: key_types.len(),
            }
            .raise();
        }
        prepare(
            &crate::typed_keys::key_select(expression, key_types, &from),
            &mut [],
        );
    });
}

/// What makes a relation unfit for an answer: row-level security when the answer is shared
/// (a table may get it after define), or being a temporary table (a session's own, found on
/// the pinned path only when the real table is gone: dropped or renamed).
fn check_relations(def: &CacheDef, shared: bool) {
    for relid in def.relations.borrow().iter() {
        let (rls, temp) = rel_flags(*relid);
        let (cache, table) = (def.name.clone(), unsafe { rel_name(*relid) });
        if temp {
            CallError::TempRelation { cache, table }.raise();
        } else if rls && shared {
            CallError::RowSecurity { cache, table }.raise();
        }
    }
}

/// (relrowsecurity, temporary) of `relid`.
fn rel_flags(relid: Oid) -> (bool, bool) {
    unsafe {
        let tuple = pg_sys::SearchSysCache1(
            pg_sys::SysCacheIdentifier::RELOID as i32,
            Datum::from(relid),
        );
        if tuple.is_null() {
            return (false, false);
        }
        let data = (*tuple).t_data;
        let form =
            (data as *const u8).add((*data).t_hoff as usize) as *const pg_sys::FormData_pg_class;
        let flags = (
            (*form).relrowsecurity,
            (*form).relpersistence == pg_sys::RELPERSISTENCE_TEMP as std::ffi::c_char,
        );
        pg_sys::ReleaseSysCache(tuple);
        flags
    }
}

/// Runs the cache's query for `key`. `None` when it returns no row or a NULL.
///
/// Without vary_by it runs as the cache's owner, with row_security off: a policy that would
/// filter what the owner reads (in a table read directly or inside a function) is an ERROR,
/// not an answer that other callers would then be served. With vary_by it runs as the
/// current role, under its policies, and the key carries what they depend on.
pub fn fetch(def: &CacheDef, key: &str) -> Option<SourceValue> {
    let _spi = SpiConnection::open();
    let shared = def.vary_by.is_empty();
    let runner = if shared {
        def.owner
    } else {
        unsafe { pg_sys::GetUserId() }
    };
    let row_security: &CStr = if shared { c"off" } else { c"on" };
    let mut settings = PINNED.to_vec();
    settings.push((c"row_security", row_security));
    as_owner(runner, &def.search_path, || {
        with_settings(&settings, || unsafe {
            let plan = match def.plan.get() {
                Some(plan) => plan,
                None => {
                    let mut types: Vec<Oid> = def.key_types.iter().map(|t| t.oid).collect();
                    let plan = prepare(&def.query, &mut types);
                    pg_sys::SPI_keepplan(plan);
                    def.plan.set(Some(plan));
                    plan
                }
            };
            let mut values = crate::typed_keys::parameters(&def.key_types, key);
            let mut nulls = vec![b' ' as std::ffi::c_char; values.len()];
            nulls.push(0);
            // read_only = false: in READ COMMITTED that takes a fresh snapshot, which is what makes a
            // fill reflect every commit that happened before the L2 read preceding it.
            let rc = pg_sys::SPI_execute_plan(plan, values.as_mut_ptr(), nulls.as_ptr(), false, 2);
            // The relations as planned for this execution (a replan after DDL updates them):
            // checked before the answer is returned or stored anywhere.
            if let Some(src) = single_plan_source(plan) {
                *def.relations.borrow_mut() = relation_oids(src);
                check_relations(def, shared);
            }
            if rc != pg_sys::SPI_OK_SELECT as i32 {
                CatalogError::QueryShape(format!(
                    "a statement that is not a SELECT (SPI code {rc})"
                ))
                .raise();
            }
            let processed = pg_sys::SPI_processed;
            if processed > 1 {
                CallError::TooManyRows(def.name.clone()).raise();
            }
            if processed == 0 {
                return None;
            }
            let table = pg_sys::SPI_tuptable;
            if let Err(found) = describe_result((*table).tupdesc) {
                CatalogError::QueryShape(found).raise();
            }
            let tuple = *(*table).vals;
            let mut isnull = false;
            let raw = pg_sys::SPI_getbinval(tuple, (*table).tupdesc, 1, &mut isnull);
            if isnull {
                return None;
            }
            let flat = pg_sys::pg_detoast_datum(raw.cast_mut_ptr());
            let out = pg_sys::DirectFunctionCall1Coll(
                Some(raw_jsonb_out),
                Oid::INVALID,
                Datum::from(flat),
            );
            let json = CStr::from_ptr(out.cast_mut_ptr())
                .to_string_lossy()
                .into_owned();
            let datum = if def.returns_json {
                // In the caller's context (SPI_palloc): SPI's own goes with SPI_finish.
                let size = json.len() + pg_sys::VARHDRSZ;
                let text = pg_sys::SPI_palloc(size) as *mut pg_sys::varlena;
                pgrx::set_varsize_4b(text, size as i32);
                std::ptr::copy_nonoverlapping(
                    json.as_ptr(),
                    (text as *mut u8).add(pg_sys::VARHDRSZ),
                    json.len(),
                );
                Datum::from(text)
            } else {
                pg_sys::SPI_datumTransfer(Datum::from(flat), false, -1)
            };
            Some(SourceValue { datum, json })
        })
    })
}

unsafe fn relation_oids(src: *mut pg_sys::CachedPlanSource) -> Vec<Oid> {
    unsafe {
        let list = (*src).relationOids;
        if list.is_null() {
            return Vec::new();
        }
        (0..(*list).length as usize)
            .map(|i| (*(*list).elements.add(i)).oid_value)
            .collect()
    }
}

unsafe fn rel_name(relid: Oid) -> String {
    unsafe {
        let name = pg_sys::get_rel_name(relid);
        if name.is_null() {
            relid.to_u32().to_string()
        } else {
            CStr::from_ptr(name).to_string_lossy().into_owned()
        }
    }
}

/// `define`'s checks, as SQL functions (executable by the extension's owner only).
/// Checks a cache query's shape; returns the relations it reads.
#[pg_extern(volatile, parallel_unsafe)]
fn _check_query(query: &str, owner: Oid, search_path: &str, key_types: Vec<Oid>) -> Vec<Oid> {
    let path = CString::new(search_path).unwrap_or_default();
    check_query(query, owner, &path, &key_types)
}

#[pg_extern(volatile, parallel_unsafe)]
fn _check_watch_expression(
    table: Oid,
    expression: &str,
    owner: Oid,
    search_path: &str,
    key_types: Vec<Oid>,
) {
    let path = CString::new(search_path).unwrap_or_default();
    check_watch_expression(table, expression, owner, &path, &key_types);
}

/// Has PostgreSQL say what a cache's query depends on: creates a SQL-standard function
/// (`BEGIN ATOMIC`, PostgreSQL 14+) in the session's temporary schema whose body is the query,
/// as the cache's owner on the pinned path, and returns it. Its body is parsed once, here, and
/// every table, column, view, function, type and sequence it names goes into `pg_depend`, as
/// for a view; `twotier._record_dependencies` reads them and drops the function. It is not
/// kept: a function using a column would forbid `ALTER COLUMN ... TYPE` on it. Created as the
/// owner, not the extension's owner: the query text is the owner's, and nothing spliced from
/// it can run with rights the owner does not have.
#[pg_extern(volatile, parallel_unsafe)]
fn _dependency_probe(query: &str, owner: Oid, search_path: &str, argument_types: &str) -> Oid {
    let path = CString::new(search_path).unwrap_or_default();
    // One statement (define prepared it); a trailing `;` or comment must not meet the END.
    let body = query.trim_end().trim_end_matches(';');
    let name = "pg_temp.\"twotier dependency probe\"";
    let sql = format!(
        "CREATE FUNCTION {name}({argument_types}) RETURNS jsonb LANGUAGE sql STABLE\nBEGIN ATOMIC\n{body}\n;\nEND"
    );
    as_owner(owner, &path, || {
        Spi::run(&sql).unwrap_or_else(|e| CatalogError::Dependencies(e.to_string()).raise())
    });
    let signature = format!("{name}({argument_types})");
    Spi::get_one_with_args::<Oid>(
        "SELECT pg_catalog.to_regprocedure($1)::pg_catalog.oid",
        &[signature.as_str().into()],
    )
    .ok()
    .flatten()
    .unwrap_or_else(|| {
        CatalogError::Dependencies("the probe function was not created".into()).raise()
    })
}
