//! The trigger behind every watched table: `twotier._trigger(cache, table, key_expression)`.
//!
//! One C function, attached by `define` as an AFTER ROW trigger for INSERT, UPDATE and DELETE
//! (PostgreSQL clones row triggers onto every partition, present and future, so DML aimed at
//! a partition is seen) and as an AFTER STATEMENT trigger for TRUNCATE on the table and each
//! of its partitions. All are `ENABLE ALWAYS`: logical replication apply and
//! `session_replication_role = replica` change tables too.
//!
//! It only collects keys (see `invalidation`). A key expression that is a plain column is read
//! straight from the row; anything else runs as a prepared query over the row, as the cache's
//! owner with the cache's search_path. Either way the key text is rendered under pinned
//! settings (DateStyle ISO, TimeZone UTC, ...), never the writer's: the key an app passes is
//! the same whoever wrote the row.

use crate::catalog;
use crate::invalidation;
use crate::source;
use crate::typed_keys::{self, KeyType};
use pgrx::pg_sys::{self, Datum, Oid};
use pgrx::prelude::*;
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::rc::Rc;

enum KeyPlan {
    Column {
        attnum: i32,
        typoutput: Oid,
        pinned: bool,
        /// An integer column: rendered here, as int2out/int4out/int8out would (no setting
        /// changes their text), without a guarded call into PostgreSQL and a palloc per row.
        integer: Option<IntWidth>,
        typlen: i16,
        typbyval: bool,
    },
    Expression {
        plan: pg_sys::SPIPlanPtr,
        owner: Oid,
        search_path: CString,
        key_types: Vec<KeyType>,
    },
}

#[derive(Clone, Copy)]
enum IntWidth {
    I2,
    I4,
    I8,
}

impl IntWidth {
    fn of(typ: Oid) -> Option<IntWidth> {
        match typ {
            pg_sys::INT2OID => Some(IntWidth::I2),
            pg_sys::INT4OID => Some(IntWidth::I4),
            pg_sys::INT8OID => Some(IntWidth::I8),
            _ => None,
        }
    }

    fn render(self, value: Datum) -> String {
        match self {
            IntWidth::I2 => (value.value() as i16).to_string(),
            IntWidth::I4 => (value.value() as i32).to_string(),
            IntWidth::I8 => (value.value() as i64).to_string(),
        }
    }
}

impl Drop for KeyPlan {
    fn drop(&mut self) {
        if let KeyPlan::Expression { plan, .. } = self {
            unsafe { pg_sys::SPI_freeplan(*plan) };
        }
    }
}

struct Fired {
    cache: String,
    plan: KeyPlan,
    /// The watch entry's `per` expression (rendered as text), if it has one.
    per: Option<KeyPlan>,
}

thread_local! {
    /// Per trigger (and relation: a cloned trigger on a partition has its own oid).
    static PLANS: RefCell<HashMap<(Oid, Oid), Rc<Fired>>> = RefCell::new(HashMap::new());
    /// `catalog::relcache_generation()` when PLANS were last known good.
    static PLANS_GENERATION: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

fn refuse(message: String) -> ! {
    pg_sys::panic::ErrorReport::new(
        PgSqlErrorCode::ERRCODE_TRIGGERED_ACTION_EXCEPTION,
        message,
        "twotier",
    )
    .set_hint("twotier's triggers are created by twotier.define() and fire only on the tables it watches.")
    .report(PgLogLevel::ERROR);
    unreachable!("ERROR does not return")
}

/// Output functions of these types do not read any setting: no pinning needed.
fn output_is_stable(typ: Oid) -> bool {
    [
        pg_sys::INT2OID,
        pg_sys::INT4OID,
        pg_sys::INT8OID,
        pg_sys::TEXTOID,
        pg_sys::VARCHAROID,
        pg_sys::BPCHAROID,
        pg_sys::NAMEOID,
        pg_sys::UUIDOID,
        pg_sys::BOOLOID,
        pg_sys::OIDOID,
        pg_sys::NUMERICOID,
    ]
    .contains(&typ)
}

/// Runs `f` with the settings that shape a value's text pinned to fixed values.
pub fn with_pinned_output<R>(f: impl FnOnce() -> R) -> R {
    crate::spi::with_settings(&crate::spi::PINNED, f)
}

unsafe fn trigger_args(trigger: *const pg_sys::Trigger) -> Vec<String> {
    unsafe {
        (0..(*trigger).tgnargs as usize)
            .map(|i| {
                CStr::from_ptr(*(*trigger).tgargs.add(i))
                    .to_string_lossy()
                    .into_owned()
            })
            .collect()
    }
}

fn is_plain_column(expression: &str) -> Option<String> {
    let e = expression.trim();
    if e.starts_with('"') && e.ends_with('"') && e.len() > 2 && !e[1..e.len() - 1].contains('"') {
        return Some(e[1..e.len() - 1].to_string());
    }
    let plain = !e.is_empty()
        && e.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !e.as_bytes()[0].is_ascii_digit();
    plain.then(|| e.to_string())
}

unsafe fn plan_for(td: *const pg_sys::TriggerData) -> Rc<Fired> {
    unsafe {
        // Any relcache invalidation since the plans were made: a column may have been
        // dropped, renamed or retyped.
        let generation = catalog::relcache_generation();
        if PLANS_GENERATION.with(|g| g.replace(generation)) != generation {
            PLANS.with(|p| p.borrow_mut().clear());
        }
        let trigger = (*td).tg_trigger;
        let rel = (*td).tg_relation;
        let relid = (*rel).rd_id;
        let tag = ((*trigger).tgoid, relid);
        if let Some(f) = PLANS.with(|p| p.borrow().get(&tag).cloned()) {
            return f;
        }
        let args = trigger_args(trigger);
        let (cache, table, expression, per) = match args.as_slice() {
            [cache, table, expression] => (cache, table, expression, None),
            [cache, table, expression, per] => (cache, table, expression, Some(per)),
            _ => refuse(
                "twotier._trigger needs (cache, table oid, key expression[, per expression])"
                    .into(),
            ),
        };
        let Some(def) = catalog::lookup_fresh(cache) else {
            refuse(format!("twotier: cache \"{cache}\" does not exist"));
        };
        let mut watched = Oid::from(table.parse::<u32>().unwrap_or(0));
        if relid != watched && !is_partition_of(relid, watched) {
            // A dump restored elsewhere carries the old table oid in the trigger's arguments:
            // the cache's own watch list, resolved by name, decides then.
            match watched_by_name(&def, relid) {
                Some(table) => watched = table,
                None => refuse(format!(
                    "twotier: trigger for cache \"{cache}\" fired on a table it does not watch"
                )),
            }
        }
        let plan = key_plan(&def, rel, watched, expression, &def.key_types);
        let per = per.map(|per| key_plan(&def, rel, watched, per, &[KeyType::of(pg_sys::TEXTOID)]));
        let fired = Rc::new(Fired {
            cache: cache.clone(),
            plan,
            per,
        });
        PLANS.with(|p| p.borrow_mut().insert(tag, fired.clone()));
        fired
    }
}

/// How to render `expression` over a row of `rel` (a table `watched` is, or a partition of
/// it) as a key of `key_types`: straight from a column where no cast is needed, else by a
/// prepared query as the cache's owner.
unsafe fn key_plan(
    def: &catalog::CacheDef,
    rel: pg_sys::Relation,
    watched: Oid,
    expression: &str,
    key_types: &[KeyType],
) -> KeyPlan {
    unsafe {
        let cache = &def.name;
        let desc = (*rel).rd_att;
        let key_type = match key_types {
            [one] => Some(one.oid),
            _ => None,
        };
        let column = is_plain_column(expression).and_then(|name| {
            let attrs = source::tuple_attrs(desc);
            attrs
                .iter()
                .position(|a| {
                    !a.attisdropped
                        && CStr::from_ptr(a.attname.data.as_ptr()).to_bytes() == name.as_bytes()
                })
                .map(|i| (i as i32 + 1, attrs[i].atttypid))
                // Read straight from the row only if no cast to the key's type is needed.
                .filter(|(_, typ)| key_type == Some(pg_sys::TEXTOID) || key_type == Some(*typ))
        });
        match column {
            Some((attnum, typ)) => {
                let mut typoutput = Oid::INVALID;
                let mut varlena = false;
                pg_sys::getTypeOutputInfo(typ, &mut typoutput, &mut varlena);
                let mut typlen = 0i16;
                let mut typbyval = false;
                pg_sys::get_typlenbyval(typ, &mut typlen, &mut typbyval);
                KeyPlan::Column {
                    attnum,
                    typoutput,
                    pinned: !output_is_stable(typ),
                    integer: IntWidth::of(typ),
                    typlen,
                    typbyval,
                }
            }
            None => {
                // The row becomes $1 of its own row type; the expression sees its columns
                // under the table's name, as in the watch entry.
                let table_name = CStr::from_ptr(pg_sys::get_rel_name(watched))
                    .to_string_lossy()
                    .into_owned();
                let types: Vec<Oid> = key_types.iter().map(|t| t.oid).collect();
                let sql = typed_keys::key_select(
                    expression,
                    &types,
                    &format!("(SELECT ($1).*) AS {}", quote_ident(&table_name)),
                );
                let sql = CString::new(sql).unwrap_or_default();
                let mut types = [(*(*rel).rd_rel).reltype];
                let plan = crate::spi::as_owner(def.owner, &def.search_path, || {
                    pg_sys::SPI_connect();
                    let plan = pg_sys::SPI_prepare(sql.as_ptr(), 1, types.as_mut_ptr());
                    if !plan.is_null() {
                        pg_sys::SPI_keepplan(plan);
                    }
                    pg_sys::SPI_finish();
                    plan
                });
                if plan.is_null() {
                    refuse(format!(
                        "twotier: the key expression {expression} of cache \"{cache}\" does not apply to this table"
                    ));
                }
                KeyPlan::Expression {
                    plan,
                    owner: def.owner,
                    search_path: def.search_path.clone(),
                    key_types: key_types.to_vec(),
                }
            }
        }
    }
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The watched table (of `def`'s watch list, resolved with its search_path) that `relid` is,
/// or is a partition of.
fn watched_by_name(def: &catalog::CacheDef, relid: Oid) -> Option<Oid> {
    let rows = crate::spi::as_owner(def.owner, &def.search_path, || {
        crate::spi::query_latest(
            c"SELECT t::oid FROM twotier.caches c, unnest(c.watch) AS w,
                    to_regclass(substring(w FROM '^\\s*([^(]+?)\\s*\\(')) AS t
              WHERE c.name = $1 AND t IS NOT NULL",
            &[&def.name],
        )
    });
    rows.into_iter()
        .filter_map(|r| r.into_iter().next().flatten())
        .filter_map(|t| t.parse::<u32>().ok().map(Oid::from))
        .find(|t| *t == relid || is_partition_of(relid, *t))
}

fn is_partition_of(relid: Oid, ancestor: Oid) -> bool {
    let rows = crate::spi::query_latest(
        c"SELECT 1 FROM pg_catalog.pg_partition_ancestors($1::text::oid) WHERE relid = $2::text::oid",
        &[&relid.to_u32().to_string(), &ancestor.to_u32().to_string()],
    );
    !rows.is_empty()
}

/// The key of the row in `slot`, or None for a NULL key.
unsafe fn key_of(plan: &KeyPlan, slot: *mut pg_sys::TupleTableSlot, out: &mut Vec<String>) {
    unsafe {
        match plan {
            KeyPlan::Column {
                attnum,
                typoutput,
                pinned,
                integer,
                ..
            } => {
                pg_sys::slot_getsomeattrs_int(slot, *attnum);
                let i = (*attnum - 1) as usize;
                if *(*slot).tts_isnull.add(i) {
                    return;
                }
                let value = *(*slot).tts_values.add(i);
                if let Some(width) = integer {
                    out.push(width.render(value));
                    return;
                }
                let render = || {
                    let text = pg_sys::OidOutputFunctionCall(*typoutput, value);
                    crate::server_text::from_server_cstr(text)
                };
                out.push(if *pinned {
                    with_pinned_output(render)
                } else {
                    render()
                });
            }
            KeyPlan::Expression {
                plan,
                owner,
                search_path,
                key_types,
            } => {
                let row = pg_sys::ExecFetchSlotHeapTupleDatum(slot);
                crate::spi::as_owner(*owner, search_path, || {
                    with_pinned_output(|| {
                        pg_sys::SPI_connect();
                        let mut values = [row];
                        let nulls = [b' ' as std::ffi::c_char, 0];
                        let rc = pg_sys::SPI_execute_plan(
                            *plan,
                            values.as_mut_ptr(),
                            nulls.as_ptr(),
                            true,
                            0,
                        );
                        if rc == pg_sys::SPI_OK_SELECT as i32 {
                            let table = pg_sys::SPI_tuptable;
                            'rows: for r in 0..pg_sys::SPI_processed as usize {
                                let tuple = *(*table).vals.add(r);
                                let mut parts = Vec::with_capacity(key_types.len());
                                for (i, kt) in key_types.iter().enumerate() {
                                    let mut isnull = false;
                                    let v = pg_sys::SPI_getbinval(
                                        tuple,
                                        (*table).tupdesc,
                                        i as i32 + 1,
                                        &mut isnull,
                                    );
                                    // A key with a NULL part names no entry.
                                    if isnull {
                                        continue 'rows;
                                    }
                                    parts.push(kt.render(v));
                                }
                                out.push(crate::keys::compose(&parts));
                            }
                        }
                        pg_sys::SPI_finish();
                    })
                });
            }
        }
    }
}

/// Whether an UPDATE left the row's keys as they were: only a plan that reads a column can
/// tell without rendering (the same bytes render the same text); an expression is rendered.
unsafe fn same_column(
    plan: &KeyPlan,
    old: *mut pg_sys::TupleTableSlot,
    new: *mut pg_sys::TupleTableSlot,
) -> bool {
    unsafe {
        let KeyPlan::Column {
            attnum,
            typlen,
            typbyval,
            ..
        } = plan
        else {
            return false;
        };
        pg_sys::slot_getsomeattrs_int(old, *attnum);
        pg_sys::slot_getsomeattrs_int(new, *attnum);
        let i = (*attnum - 1) as usize;
        match (*(*old).tts_isnull.add(i), *(*new).tts_isnull.add(i)) {
            (true, true) => true,
            (false, false) => same_bytes(
                *(*old).tts_values.add(i),
                *(*new).tts_values.add(i),
                *typlen,
                *typbyval,
            ),
            _ => false,
        }
    }
}

/// Whether two values of one type are stored as the same bytes (PostgreSQL's datumIsEqual,
/// which pgrx does not bind). A toasted value equals only the same toast pointer: false
/// where it could have been true costs one rendering, never a missed key.
unsafe fn same_bytes(a: Datum, b: Datum, typlen: i16, typbyval: bool) -> bool {
    unsafe {
        if typbyval {
            return a == b;
        }
        let (pa, pb) = (a.cast_mut_ptr::<u8>(), b.cast_mut_ptr::<u8>());
        let len = match typlen {
            n if n > 0 => n as usize,
            -1 => {
                let la = pgrx::varlena::varsize_any(pa.cast());
                if la != pgrx::varlena::varsize_any(pb.cast()) {
                    return false;
                }
                la
            }
            _ => return false,
        };
        std::slice::from_raw_parts(pa, len) == std::slice::from_raw_parts(pb, len)
    }
}

/// Whether the old and the new row of an UPDATE have the same keys (and per values).
unsafe fn keys_unchanged(
    fired: &Fired,
    old: *mut pg_sys::TupleTableSlot,
    new: *mut pg_sys::TupleTableSlot,
) -> bool {
    unsafe {
        same_column(&fired.plan, old, new)
            && fired
                .per
                .as_ref()
                .is_none_or(|per| same_column(per, old, new))
    }
}

/// The keys of the row in `slot`, each with the row's per value when the entry has one.
unsafe fn keys_of(fired: &Fired, slot: *mut pg_sys::TupleTableSlot, out: &mut Vec<String>) {
    unsafe {
        let Some(per) = &fired.per else {
            key_of(&fired.plan, slot, out);
            return;
        };
        let mut keys = Vec::with_capacity(1);
        key_of(&fired.plan, slot, &mut keys);
        let mut value = Vec::with_capacity(1);
        key_of(per, slot, &mut value);
        for key in keys {
            out.push(invalidation::scoped_key(
                &key,
                value.first().map(String::as_str),
            ));
        }
    }
}

#[no_mangle]
pub extern "C" fn pg_finfo_twotier_trigger() -> &'static pg_sys::Pg_finfo_record {
    static V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

/// # Safety
/// Called by the trigger manager with a `TriggerData` context.
#[no_mangle]
#[pg_guard]
pub unsafe extern "C-unwind" fn twotier_trigger(fcinfo: pg_sys::FunctionCallInfo) -> Datum {
    unsafe {
        let context = (*fcinfo).context;
        if context.is_null() || (*context).type_ != pg_sys::NodeTag::T_TriggerData {
            refuse("twotier._trigger can only be called as a trigger".into());
        }
        let td = context as *const pg_sys::TriggerData;
        let fired = plan_for(td);
        let event = (*td).tg_event & pg_sys::TRIGGER_EVENT_OPMASK;
        if event == pg_sys::TRIGGER_EVENT_TRUNCATE {
            // The whole cache goes: a new version when this transaction commits, and the
            // transaction becomes a writer of it.
            catalog::move_to_new_version(&fired.cache);
            invalidation::collect(&fired.cache, std::iter::empty());
            return Datum::from(0);
        }
        if (*td).tg_event & pg_sys::TRIGGER_EVENT_ROW == 0 {
            return Datum::from(0);
        }
        // A bulk change already past twotier.flush_above_keys moves the cache at commit:
        // another row's keys would change nothing.
        if invalidation::absorbed_by_flush(&fired.cache) {
            return Datum::from(0);
        }
        let mut keys = Vec::with_capacity(2);
        // INSERT and DELETE: the one row; UPDATE: the old row here, the new one below, so a
        // row whose key changed invalidates both keys (and a row that changed hands, both
        // callers' groups).
        keys_of(&fired, (*td).tg_trigslot, &mut keys);
        // Most UPDATEs leave the key column alone: its new value need not be rendered again.
        if event == pg_sys::TRIGGER_EVENT_UPDATE
            && !keys_unchanged(&fired, (*td).tg_trigslot, (*td).tg_newslot)
        {
            keys_of(&fired, (*td).tg_newslot, &mut keys);
        }
        invalidation::collect(&fired.cache, keys.iter().map(String::as_str));
        Datum::from(0)
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use super::*;

    #[pg_test]
    fn plain_columns_are_read_from_the_row() {
        assert_eq!(is_plain_column("domain_id").as_deref(), Some("domain_id"));
        assert_eq!(is_plain_column(" k ").as_deref(), Some("k"));
        assert_eq!(
            is_plain_column("\"Mixed Case\"").as_deref(),
            Some("Mixed Case")
        );
        assert_eq!(is_plain_column("lower(domain)"), None);
        assert_eq!(is_plain_column("a || b"), None);
        assert_eq!(is_plain_column("1abc"), None);
        assert_eq!(
            is_plain_column("Domain"),
            None,
            "unquoted capitals fold: the query path handles them"
        );
    }

    #[pg_test]
    fn integer_keys_render_as_their_output_functions_do() {
        let cases: [(Oid, Datum); 9] = [
            (pg_sys::INT2OID, Datum::from(i16::MIN)),
            (pg_sys::INT2OID, Datum::from(-1i16)),
            (pg_sys::INT2OID, Datum::from(i16::MAX)),
            (pg_sys::INT4OID, Datum::from(i32::MIN)),
            (pg_sys::INT4OID, Datum::from(0i32)),
            (pg_sys::INT4OID, Datum::from(i32::MAX)),
            (pg_sys::INT8OID, Datum::from(i64::MIN)),
            (pg_sys::INT8OID, Datum::from(-42i64)),
            (pg_sys::INT8OID, Datum::from(i64::MAX)),
        ];
        for (typ, value) in cases {
            let mut typoutput = Oid::INVALID;
            let mut varlena = false;
            let expected = unsafe {
                pg_sys::getTypeOutputInfo(typ, &mut typoutput, &mut varlena);
                crate::server_text::from_server_cstr(pg_sys::OidOutputFunctionCall(
                    typoutput, value,
                ))
            };
            let width = IntWidth::of(typ).expect("an integer type");
            assert_eq!(width.render(value), expected);
        }
    }

    #[pg_test]
    fn key_text_ignores_the_writers_date_settings() {
        Spi::run("SET DateStyle = 'German'; SET TimeZone = 'Asia/Tokyo'").unwrap();
        let text = with_pinned_output(|| {
            Spi::get_one::<String>("SELECT '2024-01-02 03:04:05+00'::timestamptz::text")
                .unwrap()
                .unwrap()
        });
        assert_eq!(text, "2024-01-02 03:04:05+00");
        let after = Spi::get_one::<String>("SELECT current_setting('TimeZone')")
            .unwrap()
            .unwrap();
        assert_eq!(after, "Asia/Tokyo", "the session's own settings come back");
    }
}
