//! Invalidation at commit. Triggers only collect keys here; they reach the tiers from the
//! COMMIT callback, after the new rows are visible to every new snapshot, and are dropped on
//! ROLLBACK. A transaction that collected keys for a cache is a writer of that cache: it reads
//! it from the source until it ends (read-your-writes without publishing uncommitted data).

use crate::catalog;
use crate::error::{CallError, Raise};
use crate::keys;
use crate::l1;
use crate::l2_redis;
use crate::stats::{CacheStats, Counter};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};

struct PendingCache {
    key_prefix: String,
    ttl_s: i64,
    keys: BTreeSet<String>,
    stats: &'static CacheStats,
}

thread_local! {
    static PENDING: RefCell<HashMap<String, PendingCache>> = RefCell::new(HashMap::new());
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

/// Records keys of `cache` to invalidate when this transaction commits.
pub fn collect<'a>(cache: &str, raw_keys: impl IntoIterator<Item = &'a str>) {
    let def = catalog::lookup(cache);
    PENDING.with(|p| {
        let mut p = p.borrow_mut();
        let entry = p.entry(def.name.clone()).or_insert_with(|| PendingCache {
            key_prefix: def.key_prefix.clone(),
            ttl_s: def.ttl_s,
            keys: BTreeSet::new(),
            stats: def.stats,
        });
        // A TRUNCATE or flush in this transaction may have moved the cache to a new version;
        // keys are addressed under the version current when they were collected.
        for k in raw_keys {
            entry.keys.insert(keys::full_key(&def.key_prefix, k));
        }
    });
}

thread_local! {
    /// Keys announced at PRE_COMMIT; they must be completed at COMMIT or ABORT.
    static ANNOUNCED: RefCell<Vec<(String, i64)>> = const { RefCell::new(Vec::new()) };
}

#[pg_guard]
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
            let pending = PENDING.with(|p| std::mem::take(&mut *p.borrow_mut()));
            if !pending.is_empty() {
                // An ERROR here would be promoted to PANIC; nothing below raises one, and a
                // Rust panic is contained rather than let out.
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| deliver(pending)));
            }
            ANNOUNCED.with(|a| a.borrow_mut().clear());
        }
        XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT | XACT_EVENT_PREPARE => {
            PENDING.with(|p| p.borrow_mut().clear());
            // Aborted after PRE_COMMIT: release the keys (invalidating them is harmless).
            let announced = ANNOUNCED.with(|a| a.borrow().clone());
            if !announced.is_empty() {
                let _ = std::panic::catch_unwind(|| complete(&announced, 0));
            }
            ANNOUNCED.with(|a| a.borrow_mut().clear());
        }
        _ => {}
    }
}

/// PRE_COMMIT: before the new rows become visible, take the keys out of play in both tiers
/// (L1 in-flight counters, L2 in-flight markers). Readers meanwhile go to the source and fill
/// nothing, so none of them can serve or store the old value once the commit is visible.
fn announce() {
    let batch: Vec<(String, i64)> = PENDING.with(|p| {
        p.borrow()
            .values()
            .flat_map(|c| c.keys.iter().map(move |k| (k.clone(), c.ttl_s)))
            .collect()
    });
    if batch.is_empty() {
        return;
    }
    for (key, _) in &batch {
        l1::begin_invalidation(key);
    }
    // Redis trouble must not fail the user's commit: it is counted at COMMIT, where the
    // tombstones are written (or kept for later delivery).
    let _ = l2_redis::mark_in_flight(&batch);
    ANNOUNCED.with(|a| *a.borrow_mut() = batch);
}

fn deliver(pending: HashMap<String, PendingCache>) {
    let log = crate::gucs::log_events();
    let mut batch: Vec<(String, i64)> = Vec::new();
    for (name, cache) in &pending {
        cache
            .stats
            .add(Counter::Invalidations, cache.keys.len() as u64);
        for k in &cache.keys {
            if log {
                let raw = keys::unescape(&k[cache.key_prefix.len()..]).unwrap_or_default();
                pgrx::log!("twotier INVALIDATE: {name}:{raw}");
            }
            batch.push((k.clone(), cache.ttl_s));
        }
    }
    if let Err(e) = complete(&batch, unsafe { pg_sys::XactLastCommitEnd }) {
        if e.is_fault() {
            for cache in pending.values() {
                cache.stats.bump(Counter::RedisErrors);
            }
        }
    }
}

/// The end of an invalidation in both tiers. L2 first, then L1: a reader that sees the L1
/// generation move has to find the L2 tombstone too, or it could refill L1 from the old L2
/// value.
fn complete(batch: &[(String, i64)], commit_lsn: u64) -> Result<(), l2_redis::L2Error> {
    let result = l2_redis::invalidate(batch, commit_lsn);
    // Release exactly what PRE_COMMIT took: the in-flight counters are shared, so releasing a
    // key this transaction did not announce would release another writer's.
    let announced = ANNOUNCED.with(|a| std::mem::take(&mut *a.borrow_mut()));
    for (key, _) in &announced {
        l1::end_invalidation(key);
    }
    if announced.is_empty() {
        for (key, _) in batch {
            l1::invalidate(key);
        }
    }
    result
}

/// Trigger entry point: keys of `cache` changed by the current statement.
#[pg_extern(volatile, parallel_unsafe)]
fn _collect(cache: &str, keys: Vec<Option<String>>) {
    let keys: Vec<String> = keys.into_iter().flatten().collect();
    collect(cache, keys.iter().map(String::as_str));
}

/// Marks the transaction as a writer of `cache` (TRUNCATE, which also bumps its version).
#[pg_extern(volatile, parallel_unsafe)]
fn _mark_written(cache: &str) {
    collect(cache, std::iter::empty());
}
