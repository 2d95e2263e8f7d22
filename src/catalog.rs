//! Cache definitions: rows of `twotier.caches`, read once per backend and kept until a
//! relcache invalidation of the catalog says they changed. `define`, `drop`, `flush` and a
//! TRUNCATE of a watched table all send that invalidation in their own transaction, so every
//! backend of the server switches to the new definition (and version) exactly at its commit.

use crate::error::{CatalogError, InternalError, Raise};
use crate::keys;
use crate::stats::{self, CacheStats};
use crate::typed_keys::KeyType;
use crate::vary::VaryBy;
use pgrx::pg_sys::{self, Datum, Oid};
use pgrx::prelude::*;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::rc::Rc;

pub struct CacheDef {
    pub name: String,
    pub query: String,
    pub ttl_s: i64,
    pub negative_ttl_s: i64,
    pub owner: Oid,
    /// The path pinned at define time, always ending in pg_temp.
    pub search_path: CString,
    /// What the answer depends on besides the key: part of every key, and the query then runs
    /// as the caller (`twotier.caches.vary_by`).
    pub vary_by: Vec<VaryBy>,
    /// The entry of `vary_by` that watch entries are declared `per`: then a key's variants
    /// are grouped by that entry's value, and a write reaches one group (`twotier.caches.per`).
    pub per: Option<usize>,
    /// `<prefix>:<cluster>.<db oid>:<name>:v<version>:`, the start of every key of this
    /// definition (L2 adds the Redis incarnation after the prefix).
    pub key_prefix: String,
    pub stats: &'static CacheStats,
    /// `cached_<name>(text)`: its EXECUTE privilege is the right to read the cache.
    pub function: Oid,
    /// The last role checked against `function`'s ACL, the ACL generation, and the answer.
    pub allowed: Cell<Option<(Oid, u64, bool)>>,
    /// The source query, prepared once per backend on first miss.
    pub plan: Cell<Option<pg_sys::SPIPlanPtr>>,
    /// The relations the prepared query reads directly (checked for row-level security).
    pub relations: RefCell<Vec<Oid>>,
    /// The types of the key's parts, `$1`, `$2`, ... of the query.
    pub key_types: Vec<KeyType>,
    /// `returns => 'json'`: every tier holds the value's canonical JSON text, and a hit hands
    /// it over as it is.
    pub returns_json: bool,
}

/// The tier key of the entry answering the current caller for `key`: the key's own tier key,
/// followed by the caller's variant for a vary_by cache. Every variant of a key begins with
/// the key's tier key, which is what invalidations name.
pub fn entry_key(def: &CacheDef, key: &str) -> String {
    let tier_key = keys::full_key(&def.key_prefix, key);
    if def.vary_by.is_empty() {
        return tier_key;
    }
    crate::vary::variant_key(&tier_key, &def.vary_by, def.per)
}

thread_local! {
    static DEFS: RefCell<HashMap<String, Rc<CacheDef>>> = RefCell::new(HashMap::new());
    static DATABASE: RefCell<Option<String>> = const { RefCell::new(None) };
}
/// Bumped by any change to roles or memberships: every cached ACL answer is then re-checked.
static ACL_GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// Moved by every relcache invalidation this backend receives: a column may have been dropped,
/// renamed or retyped, so whatever was planned against a table may be stale.
static RELCACHE_GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

pub fn relcache_generation() -> u64 {
    RELCACHE_GENERATION.load(std::sync::atomic::Ordering::Relaxed)
}
static DEFS_STALE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static CATALOG_OID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

// utils/inval.h, which pgrx does not bind; every call goes through the FFI guard so that an
// ERROR raised inside becomes a Rust unwind instead of a longjmp over Rust frames.
extern "C-unwind" {
    fn AcceptInvalidationMessages();
    fn CacheInvalidateRelcacheByRelid(relid: Oid);
    fn CacheRegisterRelcacheCallback(
        func: Option<unsafe extern "C-unwind" fn(arg: Datum, relid: Oid)>,
        arg: Datum,
    );
    fn CacheRegisterSyscacheCallback(
        cacheid: i32,
        func: Option<unsafe extern "C-unwind" fn(arg: Datum, cacheid: i32, hashvalue: u32)>,
        arg: Datum,
    );
}

unsafe extern "C-unwind" fn on_proc_invalidation(_arg: Datum, _cacheid: i32, _hash: u32) {
    // A GRANT or REVOKE on a cached function changes who may read the cache.
    DEFS_STALE.store(true, std::sync::atomic::Ordering::Relaxed);
}

unsafe extern "C-unwind" fn on_role_invalidation(_arg: Datum, _cacheid: i32, _hash: u32) {
    // REVOKE of a membership, NOINHERIT, DROP ROLE: who holds the right to read has changed.
    ACL_GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

fn guarded<T>(f: impl FnOnce() -> T) -> T {
    unsafe { pg_sys::submodules::ffi::pg_guard_ffi_boundary(f) }
}

unsafe extern "C-unwind" fn on_relcache_invalidation(_arg: Datum, relid: Oid) {
    // Only flags and counters: an invalidation callback must not touch catalogs or free plans
    // in use. Modules above read the generation (the triggers' key plans).
    RELCACHE_GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let catalog = CATALOG_OID.load(std::sync::atomic::Ordering::Relaxed);
    if relid == Oid::INVALID || (catalog != 0 && relid.to_u32() == catalog) {
        DEFS_STALE.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

pub fn init() {
    guarded(|| unsafe {
        CacheRegisterRelcacheCallback(Some(on_relcache_invalidation), Datum::from(0))
    });
    guarded(|| unsafe {
        CacheRegisterSyscacheCallback(
            pg_sys::SysCacheIdentifier::PROCOID as i32,
            Some(on_proc_invalidation),
            Datum::from(0),
        )
    });
    for cache in [
        pg_sys::SysCacheIdentifier::AUTHMEMROLEMEM,
        pg_sys::SysCacheIdentifier::AUTHOID,
    ] {
        guarded(|| unsafe {
            CacheRegisterSyscacheCallback(cache as i32, Some(on_role_invalidation), Datum::from(0))
        });
    }
}

/// Applies pending shared invalidations now, so a definition changed by a transaction that
/// committed a moment ago is seen even in the middle of this session's transaction. Cheap
/// when there are none: one unlocked read of a flag in shared memory.
pub fn accept_invalidations() {
    guarded(|| unsafe { AcceptInvalidationMessages() });
}

/// `<system identifier>.<database oid>`: the part of every key that names this database. A
/// standby shares it with its primary (same system identifier); another cluster, or another
/// database of this one, never does, whatever its name.
pub fn database_scope() -> &'static str {
    static SCOPE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SCOPE.get_or_init(|| unsafe {
        format!(
            "{:016x}.{}",
            pg_sys::GetSystemIdentifier(),
            pg_sys::MyDatabaseId.to_u32()
        )
    })
}

pub fn database_name() -> String {
    DATABASE.with(|d| {
        d.borrow_mut()
            .get_or_insert_with(|| unsafe {
                let name = pg_sys::get_database_name(pg_sys::MyDatabaseId);
                if name.is_null() {
                    String::from("?")
                } else {
                    CStr::from_ptr(name).to_string_lossy().into_owned()
                }
            })
            .clone()
    })
}

fn catalog_oid() -> Oid {
    let known = CATALOG_OID.load(std::sync::atomic::Ordering::Relaxed);
    if known != 0 {
        return Oid::from(known);
    }
    let oid = unsafe {
        let ns = pg_sys::get_namespace_oid(c"twotier".as_ptr(), true);
        if ns == Oid::INVALID {
            Oid::INVALID
        } else {
            pg_sys::get_relname_relid(c"caches".as_ptr(), ns)
        }
    };
    CATALOG_OID.store(oid.to_u32(), std::sync::atomic::Ordering::Relaxed);
    oid
}

/// The definition of cache `name`; raises an ERROR if there is none.
pub fn lookup(name: &str) -> Rc<CacheDef> {
    lookup_fresh(name).unwrap_or_else(|| CatalogError::UnknownCache(name.to_string()).raise())
}

/// The definition of cache `name` as last committed (or as changed by this transaction), or
/// None. Kept per backend until a relcache invalidation of the catalog says it changed.
pub fn lookup_fresh(name: &str) -> Option<Rc<CacheDef>> {
    if DEFS_STALE.swap(false, std::sync::atomic::Ordering::Relaxed) {
        DEFS.with(|d| d.borrow_mut().clear());
    }
    if let Some(def) = DEFS.with(|d| d.borrow().get(name).cloned()) {
        return Some(def);
    }
    let def = Rc::new(load(name)?);
    DEFS.with(|d| d.borrow_mut().insert(name.to_string(), def.clone()));
    Some(def)
}

fn load(name: &str) -> Option<CacheDef> {
    catalog_oid();
    warn_once_if_not_preloaded();
    // The latest committed row, never one seen through an old snapshot (REPEATABLE READ, or
    // a statement that started before a flush committed): a backend must not keep using a
    // version that a flush, TRUNCATE or redefinition has already left.
    let rows = crate::spi::query_latest(
        c"SELECT query, extract(epoch FROM ttl)::bigint, extract(epoch FROM negative_ttl)::bigint,
                 version, owner::oid, search_path, function::oid, array_to_string(vary_by, ','),
                 array_to_string(key_types::oid[], ','), returns, per
            FROM twotier.caches WHERE name = $1",
        &[name],
    );
    let row = rows.into_iter().next()?;
    let text = |i: usize| row.get(i).cloned().flatten();
    let int = |i: usize| text(i).and_then(|v| v.parse::<i64>().ok());
    let oid = |i: usize| {
        text(i)
            .and_then(|v| v.parse::<u32>().ok())
            .map(Oid::from)
            .unwrap_or(Oid::INVALID)
    };
    let version = int(3).unwrap_or(0);
    let mut key_types: Vec<KeyType> = text(8)
        .unwrap_or_default()
        .split(',')
        .filter_map(|t| t.parse::<u32>().ok())
        .map(|t| KeyType::of(Oid::from(t)))
        .collect();
    if key_types.is_empty() {
        key_types.push(KeyType::of(pg_sys::TEXTOID));
    }
    let key_prefix = keys::cache_prefix(crate::gucs::key_prefix(), database_scope(), name, version);
    let vary_entries: Vec<(String, VaryBy)> = text(7)
        .unwrap_or_default()
        .split(',')
        .filter_map(|e| VaryBy::parse(e).map(|v| (e.to_string(), v)))
        .collect();
    // pg_temp last, whatever the row says (rows written before define pinned it there).
    let mut search_path = text(5).unwrap_or_default();
    if !search_path.trim_end().ends_with("pg_temp") {
        search_path = if search_path.trim().is_empty() {
            "pg_temp".into()
        } else {
            format!("{search_path}, pg_temp")
        };
    }
    Some(CacheDef {
        name: name.to_string(),
        query: text(0).unwrap_or_default(),
        ttl_s: int(1).unwrap_or(1),
        negative_ttl_s: int(2).unwrap_or_else(crate::gucs::negative_ttl_s),
        owner: oid(4),
        search_path: CString::new(search_path).unwrap_or_default(),
        per: text(10).and_then(|per| vary_entries.iter().position(|(e, _)| *e == per)),
        vary_by: vary_entries.into_iter().map(|(_, v)| v).collect(),
        key_prefix,
        stats: stats::for_cache(name),
        function: oid(6),
        allowed: Cell::new(None),
        plan: Cell::new(None),
        relations: RefCell::new(Vec::new()),
        key_types,
        returns_json: text(9).as_deref() == Some("json"),
    })
}

/// The lock tag of one cache: an object lock on (twotier.caches, hash of the name).
fn cache_lock(name: &str, mode: u32) {
    let oid = catalog_oid();
    if oid == Oid::INVALID {
        return;
    }
    // FNV-1a: the same number in every backend, for the same name.
    let hash = name.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ b as u32).wrapping_mul(0x0100_0193)
    });
    guarded(|| unsafe {
        pg_sys::LockDatabaseObject(oid, Oid::from(hash), 0, mode as pg_sys::LOCKMODE)
    });
}

/// Taken by a writer at PRE_COMMIT before it resolves the version its keys belong to, and held
/// until its commit is visible. RowExclusiveLock: writers never wait for one another, and
/// whatever moves the version (ExclusiveLock) waits for every writer that resolved the old
/// one, and they for it. AccessShareLock, which it was, conflicts with nothing but
/// AccessExclusiveLock: a flush could commit between a writer's PRE_COMMIT and its commit, a
/// reader then filled the new version with the old row, and the writer's invalidation went to
/// the old version.
pub fn lock_for_invalidation(name: &str) {
    let mode = if crate::gucs::test_weak_cache_lock() {
        pg_sys::AccessShareLock
    } else {
        pg_sys::RowExclusiveLock
    };
    cache_lock(name, mode);
}

/// Taken by whatever moves a cache to a new version (flush, TRUNCATE, define, drop): it waits
/// for writers that resolved the old version to commit, and they wait for it.
#[pg_extern(volatile, parallel_unsafe)]
fn _lock_cache(name: &str) {
    cache_lock(name, pg_sys::ExclusiveLock);
}

/// Flushes cache `name` when this transaction commits (TRUNCATE, or a bulk change at
/// PRE_COMMIT): `twotier._new_version`, as the bootstrap superuser.
pub fn move_to_new_version(name: &str) {
    // PRE_COMMIT runs after the last statement's snapshot is gone; SPI needs one.
    unsafe { pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot()) };
    let moved = crate::spi::as_owner(
        Oid::from(pg_sys::BOOTSTRAP_SUPERUSERID),
        c"pg_catalog, pg_temp",
        || Spi::run_with_args("SELECT twotier._new_version($1)", &[name.into()]),
    );
    unsafe { pg_sys::PopActiveSnapshot() };
    moved.unwrap_or_else(|e| {
        InternalError::NewVersion {
            cache: name.to_string(),
            detail: e.to_string(),
        }
        .raise()
    });
}

/// Whether `user` has EXECUTE on function `function` (PostgreSQL 16 folded the per-catalog ACL
/// checks into object_aclcheck).
fn may_execute(function: Oid, user: Oid) -> bool {
    let mode = pg_sys::ACL_EXECUTE as pg_sys::AclMode;
    #[cfg(feature = "pg15")]
    let result = unsafe { pg_sys::pg_proc_aclcheck(function, user, mode) };
    #[cfg(not(feature = "pg15"))]
    let result =
        unsafe { pg_sys::object_aclcheck(pg_sys::ProcedureRelationId, function, user, mode) };
    result == pg_sys::AclResult::ACLCHECK_OK
}

/// Raises an ERROR unless the current role may execute the cache's function: reading a
/// cache, through `cached_<name>` or the generic calls, needs an explicit GRANT.
pub fn require_read(def: &CacheDef) {
    let user = unsafe { pg_sys::GetUserId() };
    let generation = ACL_GENERATION.load(std::sync::atomic::Ordering::Relaxed);
    let allowed = match def.allowed.get() {
        Some((u, g, ok)) if u == user && g == generation => ok,
        _ => {
            let ok = may_execute(def.function, user);
            def.allowed.set(Some((user, generation, ok)));
            ok
        }
    };
    if !allowed {
        pg_sys::panic::ErrorReport::new(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("twotier: permission denied for cache \"{}\"", def.name),
            "twotier",
        )
        .set_hint(format!(
            "Its owner can GRANT EXECUTE ON FUNCTION {} TO the role.",
            unsafe { CStr::from_ptr(pg_sys::format_procedure(def.function)).to_string_lossy() }
        ))
        .report(PgLogLevel::ERROR);
    }
}

fn warn_once_if_not_preloaded() {
    static TOLD: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !crate::gucs::preloaded() && !TOLD.swap(true, std::sync::atomic::Ordering::Relaxed) {
        pg_sys::panic::ErrorReport::new(
            PgSqlErrorCode::ERRCODE_WARNING,
            "twotier is not in shared_preload_libraries: L1 and L2 are off (only the source answers) and twotier.stats counts this session only",
            "twotier",
        )
        .set_hint("Add twotier to shared_preload_libraries and restart; twotier.status() shows the state.")
        .report(PgLogLevel::NOTICE);
    }
}

/// 0.2.0's `twotier._outer_user()` (GetOuterUserId), which decided rights and was wrong to:
/// 0.3.0 has no such SQL function. The symbol stays for the upgrade chain from 0.1.0, whose
/// step to 0.2.0 runs 0.2.0's define (which calls it) with this library.
#[no_mangle]
pub extern "C" fn pg_finfo__outer_user_wrapper() -> &'static pg_sys::Pg_finfo_record {
    static V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

/// # Safety
/// Called by the fmgr, without arguments.
#[no_mangle]
#[pg_guard]
pub unsafe extern "C-unwind" fn _outer_user_wrapper(_fcinfo: pg_sys::FunctionCallInfo) -> Datum {
    Datum::from(unsafe { pg_sys::GetOuterUserId() })
}

/// Queues a relcache invalidation of the catalog: every backend drops its definitions when
/// (and only if) the calling transaction commits, this one immediately at its next command.
#[pg_extern(volatile, parallel_unsafe)]
fn _catalog_changed() {
    let oid = catalog_oid();
    if oid != Oid::INVALID {
        guarded(|| unsafe { CacheInvalidateRelcacheByRelid(oid) });
    }
    DEFS_STALE.store(true, std::sync::atomic::Ordering::Relaxed);
}

thread_local! {
    /// Set by twotier's own internals around DDL of their own (define attaching triggers and
    /// granting its functions, drop, recording a query's dependencies), for the event triggers,
    /// which must not flush for those. A backend-local flag: no session can set it, as it could
    /// a placeholder setting. Cleared when the admin call or the transaction ends.
    static DEFINING: Cell<bool> = const { Cell::new(false) };
}

pub fn set_defining(on: bool) {
    DEFINING.with(|d| d.set(on));
}

/// `twotier._set_defining(on)`: executable by the extension's owner only (its internals).
#[pg_extern(volatile, parallel_unsafe)]
fn _set_defining(on: bool) {
    set_defining(on);
}

/// Whether the DDL running now is twotier's own (see `_set_defining`).
#[pg_extern(volatile, parallel_unsafe)]
fn _defining() -> bool {
    DEFINING.with(|d| d.get())
}
