//! The SQL-callable surface that is not catalog DDL: the generic get/set/invalidate calls of
//! the app-level API, and `twotier.status()`.

use crate::catalog::{self, CacheDef};
use crate::error::{refuse_restricted, CallError, Raise};
use crate::gucs;
use crate::invalidation;
use crate::keys::{self, KeyGlob};
use crate::l1;
use crate::l2;
use crate::read_through;
use crate::stats::Counter;
use pgrx::datum::DatumWithOid;
use pgrx::pg_sys::{self, Datum, Oid};
use pgrx::prelude::*;
use pgrx::{JsonB, PgSqlErrorCode};
use std::time::UNIX_EPOCH;

/// Owner of the cache, a member of its owning role, a member of twotier_admin, or superuser.
fn require_admin(def: &CacheDef, action: &str) {
    let allowed = unsafe {
        let me = pg_sys::GetUserId();
        let admin = pg_sys::get_role_oid(c"twotier_admin".as_ptr(), true);
        pg_sys::superuser()
            || pg_sys::has_privs_of_role(me, def.owner)
            || (admin != Oid::INVALID && pg_sys::has_privs_of_role(me, admin))
    };
    if !allowed {
        pgrx::pg_sys::panic::ErrorReport::new(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!(
                "twotier: permission denied to {action} cache \"{}\"",
                def.name
            ),
            "twotier",
        )
        .set_hint("Only the cache's owner or a member of twotier_admin can do this.")
        .report(PgLogLevel::ERROR);
    }
}

/// `twotier.get(cache, key)` and, inlined, every `cached_<name>(key)`. A bare V1 C function
/// rather than a `#[pg_extern]`, so that the jsonb datum goes back as it is, with no
/// conversion through serde on the hot path.
#[no_mangle]
pub extern "C" fn pg_finfo_twotier_get() -> &'static pg_sys::Pg_finfo_record {
    static V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

/// # Safety
/// Called by the fmgr with a valid `fcinfo` of two text arguments.
#[no_mangle]
#[pg_guard]
pub unsafe extern "C-unwind" fn twotier_get(fcinfo: pg_sys::FunctionCallInfo) -> Datum {
    unsafe { get_one(fcinfo, false) }
}

/// `twotier.get_json(cache, key)`: what a json-mode `cached_<name>(key)` calls.
#[no_mangle]
pub extern "C" fn pg_finfo_twotier_get_json() -> &'static pg_sys::Pg_finfo_record {
    static V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

/// # Safety
/// Called by the fmgr with a valid `fcinfo` of two text arguments.
#[no_mangle]
#[pg_guard]
pub unsafe extern "C-unwind" fn twotier_get_json(fcinfo: pg_sys::FunctionCallInfo) -> Datum {
    unsafe { get_one(fcinfo, true) }
}

unsafe fn get_one(fcinfo: pg_sys::FunctionCallInfo, want_json: bool) -> Datum {
    unsafe {
        refuse_restricted("twotier.get");
        let args = (*fcinfo).args.as_slice(2);
        let name = <&str as FromDatum>::from_datum(args[0].value, args[0].isnull);
        // Not STRICT, so that a NULL key is an ERROR rather than a silent NULL.
        let (Some(name), false) = (name, args[1].isnull) else {
            CallError::NullKey.raise();
        };
        // As UTF-8, converted exactly where the database is not UTF-8 (borrowed where it is).
        let key = crate::server_text::text_datum(args[1].value);
        match read_through::get(name, &key, want_json) {
            Some(d) => d,
            None => {
                (*fcinfo).isnull = true;
                Datum::from(0)
            }
        }
    }
}

#[no_mangle]
pub extern "C" fn pg_finfo_twotier_get_many() -> &'static pg_sys::Pg_finfo_record {
    static V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

/// `twotier.get_many(cache, keys)`: one row (key, value) per key, in order.
///
/// # Safety
/// Called by the fmgr as a set-returning function of (text, text[]).
#[no_mangle]
#[pg_guard]
pub unsafe extern "C-unwind" fn twotier_get_many(fcinfo: pg_sys::FunctionCallInfo) -> Datum {
    unsafe { get_many(fcinfo, false) }
}

#[no_mangle]
pub extern "C" fn pg_finfo_twotier_get_many_json() -> &'static pg_sys::Pg_finfo_record {
    static V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

/// # Safety
/// Called by the fmgr as a set-returning function of (text, text[]).
#[no_mangle]
#[pg_guard]
pub unsafe extern "C-unwind" fn twotier_get_many_json(fcinfo: pg_sys::FunctionCallInfo) -> Datum {
    unsafe { get_many(fcinfo, true) }
}

unsafe fn get_many(fcinfo: pg_sys::FunctionCallInfo, want_json: bool) -> Datum {
    unsafe {
        refuse_restricted("twotier.get_many");
        let args = (*fcinfo).args.as_slice(2);
        let name = <&str as FromDatum>::from_datum(args[0].value, args[0].isnull);
        let keys = <pgrx::Array<&str> as FromDatum>::from_datum(args[1].value, args[1].isnull);
        let (Some(name), Some(keys)) = (name, keys) else {
            CallError::NullKey.raise();
        };
        let keys: Vec<Option<&str>> = keys.iter().collect();
        let keys = read_through::check_many(&keys);
        let values = read_through::get_many(name, &keys, want_json);
        pg_sys::InitMaterializedSRF(fcinfo, 0);
        let rsinfo = (*fcinfo).resultinfo as *mut pg_sys::ReturnSetInfo;
        for (key, value) in keys.iter().zip(values) {
            let mut datums = [
                Datum::from(pg_sys::cstring_to_text_with_len(
                    key.as_ptr().cast(),
                    key.len() as i32,
                )),
                value.unwrap_or(Datum::from(0)),
            ];
            let mut nulls = [false, value.is_none()];
            pg_sys::tuplestore_putvalues(
                (*rsinfo).setResult,
                (*rsinfo).setDesc,
                datums.as_mut_ptr(),
                nulls.as_mut_ptr(),
            );
        }
        Datum::from(0)
    }
}

#[pg_extern(name = "set", volatile, parallel_unsafe)]
fn set_value(cache: &str, key: &str, value: JsonB) {
    refuse_restricted("twotier.set");
    let def = catalog::lookup(cache);
    require_admin(&def, "set entries of");
    // jsonb's own text, as a fill stores it: a json-mode cache hands these bytes out as they are.
    let json = Spi::get_one_with_args::<String>("SELECT $1::pg_catalog.text", &[value.into()])
        .ok()
        .flatten()
        .unwrap_or_default();
    let key = &crate::typed_keys::canonical(&def.key_types, key);
    let entry = catalog::entry_key(&def, key);
    match l2::set(keys::base_of(&entry), &entry, &json, def.ttl_s) {
        Ok(()) => {
            if gucs::log_events() {
                pgrx::log!("twotier SET: {}:{key} TTL: {}s", def.name, def.ttl_s);
            }
        }
        Err(e) if e.is_fault() => def.stats.bump(Counter::RedisErrors),
        Err(_) => {}
    }
}

/// Invalidates now and again at commit: the second pass closes the window in which another
/// session could refill the key from data this transaction has not committed yet. Needs
/// EXECUTE on this function (twotier_admin has it; a DBA grants it to writers) besides the
/// right to read the cache: reading alone must not let a role evict entries for everyone.
#[pg_extern(volatile, parallel_unsafe)]
fn invalidate(cache: &str, key: &str) {
    refuse_restricted("twotier.invalidate");
    let def = catalog::lookup(cache);
    catalog::require_read(&def);
    let key = &crate::typed_keys::canonical(&def.key_types, key);
    let l2_key = keys::full_key(&def.key_prefix, key);
    if let Err(e) = l2::invalidate(&[(l2_key.clone(), def.ttl_s)], 0) {
        if e.is_fault() {
            def.stats.bump(Counter::RedisErrors);
        }
    }
    l1::invalidate(&l2_key);
    invalidation::collect(cache, [key.as_str()]);
}

#[pg_extern(volatile, parallel_unsafe)]
fn invalidate_pattern(cache: &str, pattern: &str) -> i64 {
    refuse_restricted("twotier.invalidate_pattern");
    let def = catalog::lookup(cache);
    require_admin(&def, "invalidate patterns of");
    if pattern.is_empty() {
        CallError::EmptyPattern.raise();
    }
    let glob = KeyGlob::parse(pattern);
    let mut redis_pattern = glob.redis_pattern(&def.key_prefix);
    if !def.vary_by.is_empty() {
        // A key's variants (and their groups' tokens) follow its name; `matches` below keeps
        // exactly the ones whose key the glob matches.
        redis_pattern.push('*');
    }
    let prefix_len = def.key_prefix.len();
    let matches = |k: &str| {
        if l2::is_lease(k) {
            return false;
        }
        // A variant's entry (or its group's token) goes with its key.
        let k = keys::key_of_entry(k);
        // Only names escape() can produce.
        k.starts_with(&def.key_prefix)
            && keys::unescape(&k[prefix_len..])
                .is_some_and(|raw| keys::escape(&raw) == k[prefix_len..] && glob.matches(&raw))
    };
    // L1 too: an entry can outlive its L2 copy (Redis flushed or restarted).
    let in_l1 = l1::invalidate_matching(&def.key_prefix, matches);
    let result = l2::invalidate_matching(&redis_pattern, matches).map(|n| n.max(in_l1));
    match result {
        Ok(n) => {
            def.stats.add(Counter::Invalidations, n as u64);
            if gucs::log_events() {
                pgrx::log!("twotier INVALIDATE: {}:{pattern} ({n} keys)", def.name);
            }
            n
        }
        Err(e) => {
            if e.is_fault() {
                def.stats.bump(Counter::RedisErrors);
            }
            def.stats.add(Counter::Invalidations, in_l1 as u64);
            in_l1
        }
    }
}

#[pg_extern(name = "exists", volatile, parallel_unsafe)]
fn exists_entry(cache: &str, key: &str) -> bool {
    refuse_restricted("twotier.exists");
    let def = catalog::lookup(cache);
    catalog::require_read(&def);
    let key = &crate::typed_keys::canonical(&def.key_types, key);
    let entry = catalog::entry_key(&def, key);
    matches!(
        l2::read(keys::base_of(&entry), &entry).map(|r| r.lookup),
        Ok(l2::Lookup::Value(_) | l2::Lookup::Negative)
    )
}

/// Health of the tiers as this backend sees them.
#[pg_extern(volatile, parallel_unsafe)]
fn status() -> JsonB {
    refuse_restricted("twotier.status");
    let h = l2::health();
    let secs =
        |t: std::time::SystemTime| t.duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).ok();
    let is_super = unsafe { pg_sys::superuser() };
    JsonB(serde_json::json!({
        "database": catalog::database_name(),
        // `<system identifier>.<database oid>`: the part of every Redis key naming this database.
        "key_scope": catalog::database_scope(),
        "preloaded": crate::gucs::preloaded(),
        "stats_scope": if crate::gucs::preloaded() { "server" } else { "backend" },
        "l2": {
            "configured": h.configured,
            "url": if is_super { serde_json::Value::from(h.url) } else { serde_json::Value::Null },
            "reachable": h.reachable,
            "down_since_epoch": h.down_since.and_then(secs),
            "retry_in_ms": h.retry_in.map(|d| d.as_millis() as u64),
            "last_error": h.last_error,
            "undelivered_invalidations": h.undelivered,
            "incarnation": if h.incarnation.is_empty() { serde_json::Value::Null } else { h.incarnation.into() },
            "maxmemory_policy": h.maxmemory_policy,
            // On a Redis Cluster: this backend's map and whether the L2 epoch trusts it (when
            // not, L2 is left alone until the delivery worker moves to a new epoch).
            "cluster": h.cluster.map(|(fp, trusted)| serde_json::json!({
                "map_fingerprint": format!("{fp:08x}"),
                "trusted": trusted,
            })),
            // Requests this session sent to Redis (a pipeline of many commands counts once).
            "round_trips_in_session": l2::round_trips(),
            "connect_timeout_ms": gucs::connect_timeout().as_millis() as u64,
            "read_timeout_ms": gucs::read_timeout().as_millis() as u64,
            "retry_interval_ms": gucs::retry_interval().as_millis() as u64,
        },
        "l1": l1_status(),
        "delivery": crate::invalidation::ledger::status(),
        "stats": crate::stats::status(),
        "enabled": gucs::enabled(),
    }))
}

fn l1_status() -> serde_json::Value {
    use std::sync::atomic::Ordering::Relaxed;
    let Some(l1) = l1::shared() else {
        let why = if crate::gucs::preloaded() {
            "off: twotier.l1_size_mb = 0"
        } else {
            "off: twotier is not in shared_preload_libraries"
        };
        return serde_json::json!({ "available": false, "reason": why });
    };
    let pid = l1.worker_pid.load(Relaxed);
    let worker_alive = pid != 0 && unsafe { libc_kill0(pid) };
    serde_json::json!({
        "available": true,
        "enabled_in_session": gucs::l1_enabled(),
        "size_bytes": crate::l1::shmem_size(),
        "ring_bytes": l1.ring_bytes * crate::l1::PARTITIONS as u64,
        "used_bytes": l1.used_bytes.load(Relaxed).max(0),
        "entries": l1.live_entries.load(Relaxed).max(0),
        "inserts": l1.inserts.load(Relaxed),
        "evictions": l1.evictions.load(Relaxed),
        "invalidations": l1.invalidations.load(Relaxed),
        "flushes": l1.flushes.load(Relaxed),
        "worker": {
            "pid": if pid == 0 { serde_json::Value::Null } else { pid.into() },
            "alive": worker_alive,
            "subscribed": l1.subscribed.load(Relaxed),
            "subscription_state_since_epoch_ms": l1.subscribed_since_ms.load(Relaxed),
            "subscription_losses": l1.subscription_losses.load(Relaxed),
            "messages": l1.messages.load(Relaxed),
            "channel": crate::l2::channel::channel(),
        },
    })
}

/// Whether process `pid` exists (signal 0 probes without delivering anything).
unsafe fn libc_kill0(pid: i32) -> bool {
    extern "C" {
        fn kill(pid: i32, sig: i32) -> i32;
    }
    unsafe { kill(pid, 0) == 0 }
}

/// Loads every key returned by `keys_query` into the cache (through the tiers, so keys
/// already cached cost a hit); returns how many keys now have an entry.
#[pg_extern(volatile, parallel_unsafe)]
fn warm(cache: &str, keys_query: &str) -> i64 {
    refuse_restricted("twotier.warm");
    let def = catalog::lookup(cache);
    require_admin(&def, "warm");
    let keys: Vec<String> = Spi::connect(|client| {
        let table = client.select(keys_query, None, &[])?;
        let mut out = Vec::new();
        for row in table {
            if let Some(k) = row.get::<String>(1)? {
                out.push(k);
            }
        }
        Ok::<_, pgrx::spi::Error>(out)
    })
    .unwrap_or_else(|e| CallError::WarmQuery(e.to_string()).raise());
    for k in &keys {
        read_through::get(cache, k, def.returns_json);
    }
    keys.len() as i64
}

/// The scope of one admin entry: whatever ends it (return or ERROR) clears the "defining"
/// flag its internal function may have set.
struct AdminScope;

impl AdminScope {
    fn enter() -> AdminScope {
        catalog::set_defining(false);
        AdminScope
    }
}

impl Drop for AdminScope {
    fn drop(&mut self) {
        catalog::set_defining(false);
    }
}

#[no_mangle]
pub extern "C" fn pg_finfo_twotier_admin_call() -> &'static pg_sys::Pg_finfo_record {
    static V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

/// `twotier.define`, `twotier.flush` and `twotier.drop`: the role current at the call decides
/// what it may do, never an outer or session user. Inside ANALYZE, or a superuser's call of an
/// admin's SECURITY DEFINER function, the outer user is a superuser that never asked for a
/// cache; a cache created there was owned by it, and its watch expressions ran as it. The
/// entry refuses security-restricted operations, takes `GetUserId()` (and, for define, the
/// schemas of the caller's search_path), and runs `twotier._<name>(caller, ...)` as the
/// extension's owner: no other role may execute those, so no caller can name another.
///
/// # Safety
/// Called by the fmgr for one of the three functions, with their declared arguments.
#[no_mangle]
#[pg_guard]
pub unsafe extern "C-unwind" fn twotier_admin_call(fcinfo: pg_sys::FunctionCallInfo) -> Datum {
    unsafe {
        let fn_oid = (*(*fcinfo).flinfo).fn_oid;
        let proname = pg_sys::get_func_name(fn_oid);
        let entry: &'static str =
            match (!proname.is_null()).then(|| std::ffi::CStr::from_ptr(proname).to_bytes()) {
                Some(b"define") => "twotier.define",
                Some(b"flush") => "twotier.flush",
                Some(b"drop") => "twotier.drop",
                _ => pgrx::error!("twotier: twotier_admin_call serves define, flush and drop only"),
            };
        refuse_restricted(entry);
        let caller = pg_sys::GetUserId();
        let mut argtypes: *mut Oid = std::ptr::null_mut();
        let mut nargs: i32 = 0;
        pg_sys::get_func_signature(fn_oid, &mut argtypes, &mut nargs);
        let nargs = nargs.max(0) as usize;
        let types: Vec<Oid> = (0..nargs).map(|i| *argtypes.add(i)).collect();
        let values = (*fcinfo).args.as_slice(nargs);
        let owner = Spi::get_one::<Oid>(
            "SELECT extowner FROM pg_catalog.pg_extension WHERE extname = 'twotier'",
        )
        .ok()
        .flatten()
        .unwrap_or_else(|| pgrx::error!("twotier: the extension's owner cannot be found"));
        let mut args = vec![DatumWithOid::new(caller, pg_sys::OIDOID)];
        let mut placeholders = vec!["$1".to_string()];
        if entry == "twotier.define" {
            // The caller's path as the schemas it names now, resolved as the caller ("$user").
            let schemas = Spi::get_one::<Vec<String>>(
                "SELECT pg_catalog.current_schemas(false)::pg_catalog.text[]",
            )
            .ok()
            .flatten()
            .unwrap_or_default();
            args.push(DatumWithOid::new(schemas, pg_sys::TEXTARRAYOID));
            placeholders.push("$2::pg_catalog.name[]".into());
        }
        for (value, typ) in values.iter().zip(&types) {
            args.push(if value.isnull {
                DatumWithOid::null_oid(*typ)
            } else {
                DatumWithOid::new(value.value, *typ)
            });
            placeholders.push(format!("${}", args.len()));
        }
        let internal = &entry["twotier.".len()..];
        let query = format!("SELECT twotier._{internal}({})", placeholders.join(", "));
        let _scope = AdminScope::enter();
        let result = crate::spi::as_owner(owner, c"pg_catalog, pg_temp", || {
            if internal == "define" {
                Spi::get_one_with_args::<Oid>(&format!("{query}::pg_catalog.oid"), &args)
            } else {
                Spi::run_with_args(&query, &args).map(|_| None)
            }
        });
        match result {
            Ok(Some(function)) => Datum::from(function),
            Ok(None) => {
                (*fcinfo).isnull = internal == "define";
                Datum::from(0)
            }
            Err(e) => pgrx::error!("twotier: {entry} failed: {e}"),
        }
    }
}
