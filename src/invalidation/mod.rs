//! Invalidation at commit. Triggers only collect keys here. At PRE_COMMIT they leave L1 and
//! enter the ledger (shared memory) and the WAL; the delivery worker takes them to Redis after
//! the commit. The writer does no network I/O for the cache. ROLLBACK publishes nothing. A transaction that collected keys for a cache is a writer of that cache: it reads
//! it from the source until it ends (read-your-writes without publishing uncommitted data).

pub mod delivery;
pub mod ledger;
pub mod listener;
pub mod triggers;
pub mod wal;

use crate::catalog;
use crate::error::{CallError, Raise};
use crate::gucs;
use crate::keys;
use crate::l1;
use crate::stats::{CacheStats, Counter};
use pgrx::pg_sys;
use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};

thread_local! {
    /// Raw keys per cache name, as the triggers saw them. They are turned into tier keys only
    /// at PRE_COMMIT, under the cache's lock: a flush or TRUNCATE that commits while this
    /// transaction is open moves the cache to a new version, and the keys must be invalidated
    /// where readers will look for them after this commit.
    static PENDING: RefCell<HashMap<String, Pending>> = RefCell::new(HashMap::new());
    /// What PRE_COMMIT took out of L1: released at COMMIT or ABORT.
    static ANNOUNCED: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
    /// Per cache, for counting and logging at COMMIT.
    static RESOLVED: RefCell<Vec<Resolved>> = const { RefCell::new(Vec::new()) };
}

#[derive(Default)]
struct Pending {
    keys: BTreeSet<String>,
    /// More keys than `twotier.flush_above_keys` were collected: the cache moves to a new
    /// version at commit, whatever the setting says by then, so the keys are no longer kept
    /// and the triggers stop rendering them (a bulk change costs the trigger little per row).
    saturated: bool,
    /// Keys collected: distinct until saturated, every row's after.
    count: u64,
}

struct Resolved {
    name: String,
    stats: &'static CacheStats,
    raw_keys: Vec<String>,
    count: u64,
    /// Too many keys: the cache moved to a new version instead (`twotier.flush_above_keys`).
    flushed: bool,
}

pub fn init() {
    unsafe { pg_sys::RegisterXactCallback(Some(on_xact_event), std::ptr::null_mut()) };
}

/// Whether the current transaction changed a table watched by `cache`.
pub fn wrote(cache: &str) -> bool {
    PENDING.with(|p| {
        let p = p.borrow();
        !p.is_empty() && p.contains_key(cache)
    })
}

/// Separates a key from its `per` value in the keys collected for a commit: no text value in
/// PostgreSQL holds a NUL.
const SCOPE_MARK: char = '\0';

/// A key collected for a commit together with the value of its row's `per` expression (None:
/// NULL), as the trigger of a watch entry declared `per` collects it.
pub fn scoped_key(key: &str, per: Option<&str>) -> String {
    let mut out = String::with_capacity(key.len() + 2 + per.map_or(0, str::len));
    out.push_str(key);
    out.push(SCOPE_MARK);
    match per {
        Some(v) => {
            out.push('s');
            out.push_str(v);
        }
        None => out.push('n'),
    }
    out
}

/// The tier key a collected key names: the key's, or the group of its variants whose `per`
/// value the row had (a scope is dropped if the cache no longer groups its variants).
fn tier_key(def: &catalog::CacheDef, raw: &str) -> String {
    let Some((key, scope)) = raw.split_once(SCOPE_MARK) else {
        return keys::full_key(&def.key_prefix, raw);
    };
    let mut out = keys::full_key(&def.key_prefix, key);
    if def.per.is_some() {
        keys::push_scope(&mut out, scope.strip_prefix('s'));
    }
    out
}

/// A collected key as a log line shows it.
fn shown(raw: &str) -> String {
    match raw.split_once(SCOPE_MARK) {
        None => raw.to_string(),
        Some((key, scope)) => match scope.strip_prefix('s') {
            Some(v) => format!("{key} (per {v})"),
            None => format!("{key} (per NULL)"),
        },
    }
}

/// Records keys of `cache` to invalidate when this transaction commits.
pub fn collect<'a>(cache: &str, raw_keys: impl IntoIterator<Item = &'a str>) {
    PENDING.with(|p| {
        let mut p = p.borrow_mut();
        let entry = match p.get_mut(cache) {
            Some(e) => e,
            None => p.entry(cache.to_string()).or_default(),
        };
        if entry.saturated {
            entry.count += raw_keys.into_iter().count() as u64;
            return;
        }
        for k in raw_keys {
            if !entry.keys.contains(k) {
                entry.keys.insert(k.to_string());
                entry.count += 1;
            }
        }
        if gucs::flush_above_keys().is_some_and(|max| entry.keys.len() > max) {
            entry.saturated = true;
            entry.keys = BTreeSet::new();
        }
    });
}

/// Whether this transaction already changed so many keys of `cache` that it will move the
/// cache to a new version: a trigger need not render the row's keys, counted here as one.
pub fn absorbed_by_flush(cache: &str) -> bool {
    PENDING.with(|p| match p.borrow_mut().get_mut(cache) {
        Some(e) if e.saturated => {
            e.count += 1;
            true
        }
        _ => false,
    })
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_xact_event(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    use pg_sys::XactEvent::*;
    match event {
        // The last moment an ERROR is allowed; a prepared transaction would commit later in
        // another session that knows nothing of these keys.
        XACT_EVENT_PRE_PREPARE if PENDING.with(|p| !p.borrow().is_empty()) => {
            CallError::PrepareWithInvalidations.raise();
        }
        XACT_EVENT_PRE_COMMIT => announce(),
        XACT_EVENT_COMMIT | XACT_EVENT_PARALLEL_COMMIT => {
            catalog::set_defining(false);
            PENDING.with(|p| p.borrow_mut().clear());
            let resolved = RESOLVED.with(|r| std::mem::take(&mut *r.borrow_mut()));
            let announced = ANNOUNCED.with(|a| std::mem::take(&mut *a.borrow_mut()));
            if !resolved.is_empty() || !announced.is_empty() {
                // An ERROR here would be promoted to PANIC; nothing below raises one, and a
                // Rust panic is contained rather than let out.
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    count_and_log(&resolved);
                    release(&announced);
                    ledger::end_own(true);
                }));
            }
            ledger::release_reservation();
        }
        XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT | XACT_EVENT_PREPARE => {
            catalog::set_defining(false);
            PENDING.with(|p| p.borrow_mut().clear());
            RESOLVED.with(|r| r.borrow_mut().clear());
            // Aborted after PRE_COMMIT: release L1, drop the ledger's entries.
            let announced = ANNOUNCED.with(|a| std::mem::take(&mut *a.borrow_mut()));
            if !announced.is_empty() {
                let _ = std::panic::catch_unwind(|| release(&announced));
            }
            let _ = std::panic::catch_unwind(|| ledger::end_own(false));
            ledger::release_reservation();
        }
        _ => {}
    }
}

/// PRE_COMMIT: before the new rows become visible, take the keys out of play. In L1 they are
/// dropped and their slots held until COMMIT ends; in the ledger they stay undelivered (no
/// L2 read, no L2 fill on this server) until Redis has their tombstones; the WAL record
/// does the same on standbys. Nothing here waits on Redis.
fn announce() {
    // Taken, not copied: nothing after PRE_COMMIT asks what this transaction wrote, and
    // COMMIT and ABORT clear it anyway.
    let mut pending: Vec<(String, Vec<String>, bool, u64)> = PENDING.with(|p| {
        std::mem::take(&mut *p.borrow_mut())
            .into_iter()
            .filter(|(_, e)| !e.keys.is_empty() || e.saturated)
            .map(|(name, e)| (name, e.keys.into_iter().collect(), e.saturated, e.count))
            .collect()
    });
    if pending.is_empty() {
        return;
    }
    // Locks in one order, so that two writers never wait on each other in a cycle.
    pending.sort_by(|a, b| a.0.cmp(&b.0));
    let max_keys = gucs::flush_above_keys();
    let use_ledger = ledger::available() && !gucs::test_no_ledger();
    // Versions are read under the caches' locks, which flush, TRUNCATE and define take
    // exclusively: none of them can commit between this read and this commit. A bulk change
    // takes it exclusively itself, and moves the cache to a new version: O(1) in Redis.
    let mut flushed = Vec::with_capacity(pending.len());
    for (name, raw_keys, saturated, _) in &pending {
        // The variants of a key (vary_by) need no listing: they hang on the key's own
        // generation in L1 and its own Redis key in L2. Keys that do not fit in the ledger
        // (Redis away for long) are a flush: a new version needs nothing delivered.
        // A cache whose watch entries are declared `per` groups a key's variants by a caller's
        // value: a key without a group (from an entry not declared per, or
        // twotier.invalidate) would have to reach every group, which cannot be listed.
        let bulk = catalog::lookup_fresh(name).is_some_and(|def| {
            *saturated
                || max_keys.is_some_and(|max| raw_keys.len() > max)
                || (def.per.is_some() && raw_keys.iter().any(|k| !k.contains(SCOPE_MARK)))
                || (use_ledger && {
                    let bytes = ledger::bytes_for(
                        raw_keys.iter().map(|k| k.as_str()),
                        def.key_prefix.len() + 24,
                    );
                    // Full: one epoch move for the database, not a version move per commit.
                    !(ledger::reserve(bytes) || (ledger::make_room() && ledger::reserve(bytes)))
                })
        });
        if bulk {
            catalog::move_to_new_version(name);
        } else {
            catalog::lock_for_invalidation(name);
        }
        flushed.push(bulk);
    }
    catalog::accept_invalidations();
    let mut batch: Vec<String> = Vec::new();
    let mut resolved = Vec::new();
    for ((name, raw_keys, _, count), flushed) in pending.into_iter().zip(flushed) {
        // A cache dropped meanwhile has nothing left to invalidate; its triggers are gone.
        let Some(def) = catalog::lookup_fresh(&name) else {
            continue;
        };
        if !flushed {
            for k in &raw_keys {
                batch.push(tier_key(&def, k));
            }
        }
        resolved.push(Resolved {
            name,
            stats: def.stats,
            raw_keys,
            count,
            flushed,
        });
    }
    RESOLVED.with(|r| *r.borrow_mut() = resolved);
    if batch.is_empty() {
        return;
    }
    let announced: Vec<u64> = batch.iter().map(|k| l1::begin_invalidation(k)).collect();
    // Before anything below can raise an ERROR: ABORT must release exactly these.
    ANNOUNCED.with(|a| *a.borrow_mut() = announced);
    let refs: Vec<&str> = batch.iter().map(String::as_str).collect();
    if use_ledger && !ledger::record(&refs) {
        // The reservation makes this rare: every cache of this commit moves instead.
        RESOLVED.with(|r| {
            for res in r.borrow_mut().iter_mut().filter(|res| !res.flushed) {
                catalog::move_to_new_version(&res.name);
                res.flushed = true;
            }
        });
    }
    // After the ledger, before the commit record: a standby replays this first, keeps the
    // keys out of its L1 until it replays the commit and out of L2 until they are delivered.
    wal::log_invalidation(refs.into_iter());
}

fn count_and_log(resolved: &[Resolved]) {
    let log = gucs::log_events();
    for r in resolved {
        r.stats.add(Counter::Invalidations, r.count);
        if log && r.flushed {
            pgrx::log!(
                "twotier FLUSH: {} ({} keys changed in one transaction)",
                r.name,
                r.count
            );
        } else if log {
            for k in &r.raw_keys {
                pgrx::log!("twotier INVALIDATE: {}:{}", r.name, shown(k));
            }
        }
    }
}

/// The end of a commit's hold on L1: exactly what PRE_COMMIT took (the in-flight counters
/// are shared, so releasing a key this transaction did not announce would release
/// another writer's). L2 is the ledger's business from here.
fn release(announced: &[u64]) {
    for hash in announced {
        l1::end_invalidation(*hash);
    }
}
