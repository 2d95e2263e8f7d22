//! Per-cache counters and latency histograms. With the library preloaded they live in shared
//! memory, so `twotier.stats` is exact across sessions; without it each backend counts for
//! itself. A cache's counters are kept in STRIPES copies, each on cache lines of its own, and a
//! backend adds to the copy of its process: a hit then writes no cache line that every other
//! backend's hits write too. Readers sum the copies.

use pgrx::pg_sys;
use pgrx::prelude::*;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::time::Duration;

const NAME_LEN: usize = 64;
/// The last slot counts every cache that found no slot of its own.
const OVERFLOW_NAME: &str = "(overflow)";
/// Four buckets per power of two of microseconds, from 1 us to about 2^20 us: p99 is
/// reported within 19 % of the truth, in a fixed 80 words per path.
const BUCKETS: usize = 80;
/// Copies of each cache's counters (about 2 KB each). Backends share a copy only when more than
/// this many run hits at the same moment, and then only with a few others.
const STRIPES: usize = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    L1Hit = 0,
    L2Hit = 1,
    Miss = 2,
}

#[derive(Clone, Copy, Debug)]
pub enum Counter {
    Calls,
    L1Hits,
    L2Hits,
    Misses,
    NegativeHits,
    Bypasses,
    Fills,
    FillsRejected,
    Invalidations,
    RedisErrors,
    /// Calls that left L2 alone because this server has invalidations not yet in Redis.
    L2Skips,
    /// Misses answered by waiting for another backend's fetch of the same key.
    StampedeWaits,
    /// Values over twotier.max_value_kb: answered, not stored in L2.
    TooLarge,
}
const COUNTERS: usize = 13;

#[repr(C)]
pub struct Latency {
    count: AtomicU64,
    sum_ns: AtomicU64,
    hist: [AtomicU64; BUCKETS],
}

/// One copy of a cache's counters, aligned so that no two copies share a cache line.
#[repr(C, align(64))]
struct Stripe {
    counters: [AtomicU64; COUNTERS],
    latency: [Latency; 3],
}

#[repr(C)]
pub struct CacheStats {
    /// 0 free, 1 being claimed, 2 in use.
    state: AtomicU32,
    database: AtomicU32,
    name: [AtomicU8; NAME_LEN],
    stripes: [Stripe; STRIPES],
}

thread_local! {
    /// This backend's stripe: its pid spreads backends over the copies.
    static STRIPE: usize = std::process::id() as usize % STRIPES;
}

fn own_stripe() -> usize {
    STRIPE.with(|s| *s)
}

impl CacheStats {
    fn mine(&self) -> &Stripe {
        &self.stripes[own_stripe()]
    }

    pub fn add(&self, c: Counter, n: u64) {
        self.mine().counters[c as usize].fetch_add(n, Relaxed);
    }

    pub fn bump(&self, c: Counter) {
        self.add(c, 1)
    }

    pub fn record(&self, path: Path, elapsed: Duration) {
        let l = &self.mine().latency[path as usize];
        let ns = elapsed.as_nanos().min(u64::MAX as u128) as u64;
        l.count.fetch_add(1, Relaxed);
        l.sum_ns.fetch_add(ns, Relaxed);
        l.hist[bucket_of(ns)].fetch_add(1, Relaxed);
    }

    /// Counter `c` summed over the copies.
    fn counter(&self, c: Counter) -> u64 {
        self.stripes
            .iter()
            .map(|s| s.counters[c as usize].load(Relaxed))
            .fold(0, u64::wrapping_add)
    }

    fn name_matches(&self, database: u32, name: &str) -> bool {
        if self.state.load(Relaxed) != 2 || self.database.load(Relaxed) != database {
            return false;
        }
        let bytes = name.as_bytes();
        (0..NAME_LEN).all(|i| self.name[i].load(Relaxed) == bytes.get(i).copied().unwrap_or(0))
    }

    fn name(&self) -> String {
        let bytes: Vec<u8> = self
            .name
            .iter()
            .map(|b| b.load(Relaxed))
            .take_while(|b| *b != 0)
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    fn reset(&self) {
        for stripe in &self.stripes {
            for c in &stripe.counters {
                c.store(0, Relaxed);
            }
            for l in &stripe.latency {
                l.count.store(0, Relaxed);
                l.sum_ns.store(0, Relaxed);
                for h in &l.hist {
                    h.store(0, Relaxed);
                }
            }
        }
    }
}

/// floor(4 * log2(us)), in integers: 4 * log2(us) >= m exactly when us^4 >= 2^m. Clamped to
/// 2^20 us first, where the last bucket starts, so that us^4 fits in 128 bits.
fn bucket_of(ns: u64) -> usize {
    let us = (ns / 1000).clamp(1, 1 << 20) as u128;
    let log2_of_fourth_power = 127 - us.pow(4).leading_zeros() as usize;
    log2_of_fourth_power.min(BUCKETS - 1)
}

/// Upper bound in microseconds of bucket `b`.
fn bucket_upper_us(b: usize) -> f64 {
    2f64.powf((b + 1) as f64 / 4.0)
}

static mut TABLE: *const CacheStats = std::ptr::null();
static mut HEADER_PTR: *const Header = std::ptr::null();
const HEADER: usize = 64;

/// The start of the region: the claim lock, the slot count fixed at server start, and whether
/// a cache has been counted under "(overflow)" since.
#[repr(C)]
struct Header {
    /// Serialises slot claims and reclaims, so that two backends meeting a cache for the first
    /// time at the same moment cannot give it two slots (and split its counters).
    claim: AtomicU32,
    slots: AtomicU32,
    overflowed: AtomicU32,
}

pub fn shmem_size() -> usize {
    // Room to move the slots to a cache-line boundary, wherever the region starts.
    HEADER + SLOT_ALIGN + std::mem::size_of::<CacheStats>() * crate::gucs::stats_slots()
}

const SLOT_ALIGN: usize = std::mem::align_of::<CacheStats>();

/// # Safety
/// `ptr` must point at `shmem_size()` bytes that live as long as the process.
pub unsafe fn attach(ptr: *mut u8, fresh: bool) {
    unsafe {
        if fresh {
            std::ptr::write_bytes(ptr, 0, shmem_size());
        }
        HEADER_PTR = ptr as *const Header;
        let slots = ptr.add(HEADER);
        TABLE = slots.add(slots.align_offset(SLOT_ALIGN)) as *const CacheStats;
        if fresh {
            (*HEADER_PTR)
                .slots
                .store(crate::gucs::stats_slots() as u32, Relaxed);
            let overflow = &*TABLE.add(crate::gucs::stats_slots() - 1);
            for (i, b) in overflow.name.iter().enumerate() {
                b.store(
                    OVERFLOW_NAME.as_bytes().get(i).copied().unwrap_or(0),
                    Relaxed,
                );
            }
            overflow.state.store(2, Relaxed);
        }
    }
}

fn header() -> &'static Header {
    table();
    unsafe { &*HEADER_PTR }
}

fn table() -> &'static [CacheStats] {
    unsafe {
        if TABLE.is_null() {
            // Not preloaded: counters for this backend only, in memory that lives as long as it.
            let local = Box::leak(vec![0u64; shmem_size() / 8 + 1].into_boxed_slice()).as_mut_ptr();
            attach(local as *mut u8, true);
        }
        std::slice::from_raw_parts(TABLE, (*HEADER_PTR).slots.load(Relaxed) as usize)
    }
}

struct ClaimGuard(&'static AtomicU32);

impl ClaimGuard {
    fn acquire() -> Self {
        let lock = &header().claim;
        // Held for a few hundred instructions (a scan of the slots), never across anything
        // that can raise an ERROR.
        while lock
            .compare_exchange_weak(0, 1, std::sync::atomic::Ordering::Acquire, Relaxed)
            .is_err()
        {
            std::hint::spin_loop();
        }
        ClaimGuard(lock)
    }
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        self.0.store(0, std::sync::atomic::Ordering::Release);
    }
}

fn database() -> u32 {
    unsafe { pg_sys::MyDatabaseId.to_u32() }
}

/// Claims a free slot (not the overflow slot) for `name` in `db`, under the claim lock.
fn claim(slots: &'static [CacheStats], db: u32, name: &str) -> Option<&'static CacheStats> {
    let _claim = ClaimGuard::acquire();
    if let Some(s) = slots.iter().find(|s| s.name_matches(db, name)) {
        return Some(s);
    }
    for s in &slots[..slots.len() - 1] {
        if s.state.compare_exchange(0, 1, Relaxed, Relaxed).is_ok() {
            s.reset();
            s.database.store(db, Relaxed);
            for (i, b) in s.name.iter().enumerate() {
                b.store(name.as_bytes().get(i).copied().unwrap_or(0), Relaxed);
            }
            s.state.store(2, std::sync::atomic::Ordering::Release);
            return Some(s);
        }
    }
    None
}

/// Frees the slots of caches that no longer exist: dropped caches of this database, and every
/// cache of a database that was dropped. What exists is read first, without the claim lock
/// (reading it can raise an ERROR); a slot is freed under the lock only if it still holds the
/// name that was found to be gone.
fn reclaim(slots: &'static [CacheStats], db: u32) -> usize {
    let caches: std::collections::HashSet<String> =
        crate::spi::query_latest(c"SELECT name FROM twotier.caches", &[])
            .into_iter()
            .filter_map(|r| r.into_iter().next().flatten())
            .collect();
    let databases: std::collections::HashSet<u32> =
        crate::spi::query_latest(c"SELECT oid::int8 FROM pg_catalog.pg_database", &[])
            .into_iter()
            .filter_map(|r| r.into_iter().next().flatten())
            .filter_map(|v| v.parse::<u32>().ok())
            .collect();
    let gone: Vec<(usize, u32, String)> = slots[..slots.len() - 1]
        .iter()
        .enumerate()
        .filter(|(_, s)| s.state.load(Relaxed) == 2)
        .map(|(i, s)| (i, s.database.load(Relaxed), s.name()))
        .filter(|(_, d, n)| !databases.contains(d) || (*d == db && !caches.contains(n)))
        .collect();
    let _claim = ClaimGuard::acquire();
    let mut freed = 0;
    for (i, d, n) in gone {
        if slots[i].name_matches(d, &n) {
            slots[i].state.store(0, Relaxed);
            freed += 1;
        }
    }
    freed
}

thread_local! {
    static WARNED: std::cell::RefCell<std::collections::HashSet<String>> =
        std::cell::RefCell::new(std::collections::HashSet::new());
}

/// The slot of cache `name` in this database, claimed on first use. When every slot is in
/// use, the slots of caches that no longer exist are reclaimed; when none is left, the cache
/// is counted under "(overflow)" (a WARNING once per backend and cache says so, and status()).
pub fn for_cache(name: &str) -> &'static CacheStats {
    let db = database();
    let slots = table();
    if let Some(s) = slots.iter().find(|s| s.name_matches(db, name)) {
        return s;
    }
    if let Some(s) = claim(slots, db, name) {
        return s;
    }
    if reclaim(slots, db) > 0 {
        if let Some(s) = claim(slots, db, name) {
            return s;
        }
    }
    header().overflowed.store(1, Relaxed);
    let first = WARNED.with(|w| w.borrow_mut().insert(name.to_string()));
    if first {
        pgrx::pg_sys::panic::ErrorReport::new(
            PgSqlErrorCode::ERRCODE_WARNING,
            format!(
                "twotier: all {} twotier.stats_slots are in use: cache \"{name}\" is counted under \"{OVERFLOW_NAME}\" in twotier.stats",
                slots.len()
            ),
            "twotier",
        )
        .set_hint("Raise twotier.stats_slots (it takes a restart), or drop caches that are no longer used.")
        .report(PgLogLevel::WARNING);
    }
    &slots[slots.len() - 1]
}

/// `twotier.status()->'stats'`.
pub fn status() -> serde_json::Value {
    let slots = table();
    let in_use = slots[..slots.len() - 1]
        .iter()
        .filter(|s| s.state.load(Relaxed) == 2)
        .count();
    serde_json::json!({
        "slots": slots.len(),
        "in_use": in_use,
        // One slot is the overflow's own.
        "full": in_use >= slots.len() - 1,
        "overflowed": header().overflowed.load(Relaxed) != 0,
    })
}

/// Mean and p99 of `path` over every copy of the counters.
fn latency_summary(s: &CacheStats, path: Path) -> (Option<f64>, Option<f64>) {
    let copies = s.stripes.iter().map(|st| &st.latency[path as usize]);
    let count: u64 = copies.clone().map(|l| l.count.load(Relaxed)).sum();
    if count == 0 {
        return (None, None);
    }
    let sum_ns: u64 = copies.clone().map(|l| l.sum_ns.load(Relaxed)).sum();
    let mean = sum_ns as f64 / count as f64 / 1000.0;
    let target = (count as f64 * 0.99).ceil() as u64;
    let mut seen = 0;
    let mut p99 = bucket_upper_us(BUCKETS - 1);
    for b in 0..BUCKETS {
        seen += copies.clone().map(|l| l.hist[b].load(Relaxed)).sum::<u64>();
        if seen >= target {
            p99 = bucket_upper_us(b);
            break;
        }
    }
    // A bucket bound can exceed the true maximum for tiny samples; the mean cannot.
    (
        Some((mean * 10.0).round() / 10.0),
        Some((p99.max(mean) * 10.0).round() / 10.0),
    )
}

#[pg_extern(volatile, parallel_safe)]
#[allow(clippy::type_complexity)]
fn _stats() -> TableIterator<
    'static,
    (
        name!(cache, String),
        name!(calls, i64),
        name!(l1_hits, i64),
        name!(l2_hits, i64),
        name!(misses, i64),
        name!(negative_hits, i64),
        name!(bypasses, i64),
        name!(fills, i64),
        name!(fills_rejected, i64),
        name!(invalidations, i64),
        name!(redis_errors, i64),
        name!(l2_skips, i64),
        name!(stampede_waits, i64),
        name!(too_large, i64),
        name!(l1_hit_mean_us, Option<f64>),
        name!(l1_hit_p99_us, Option<f64>),
        name!(l2_hit_mean_us, Option<f64>),
        name!(l2_hit_p99_us, Option<f64>),
        name!(miss_mean_us, Option<f64>),
        name!(miss_p99_us, Option<f64>),
    ),
> {
    let db = database();
    let mut rows = Vec::new();
    let slots = table();
    let overflow = &slots[slots.len() - 1];
    for s in slots.iter().filter(|s| {
        (s.state.load(Relaxed) == 2 && s.database.load(Relaxed) == db)
            || (std::ptr::eq(*s, overflow) && s.counter(Counter::Calls) > 0)
    }) {
        let c = |k: Counter| s.counter(k) as i64;
        let (l1m, l1p) = latency_summary(s, Path::L1Hit);
        let (l2m, l2p) = latency_summary(s, Path::L2Hit);
        let (mm, mp) = latency_summary(s, Path::Miss);
        rows.push((
            s.name(),
            c(Counter::Calls),
            c(Counter::L1Hits),
            c(Counter::L2Hits),
            c(Counter::Misses),
            c(Counter::NegativeHits),
            c(Counter::Bypasses),
            c(Counter::Fills),
            c(Counter::FillsRejected),
            c(Counter::Invalidations),
            c(Counter::RedisErrors),
            c(Counter::L2Skips),
            c(Counter::StampedeWaits),
            c(Counter::TooLarge),
            l1m,
            l1p,
            l2m,
            l2p,
            mm,
            mp,
        ));
    }
    TableIterator::new(rows)
}

/// Zeroes the counters of every cache of this database (all backends, when preloaded).
#[pg_extern(volatile, parallel_unsafe)]
fn reset_stats() {
    crate::error::refuse_restricted("twotier.reset_stats");
    let db = database();
    for s in table()
        .iter()
        .filter(|s| s.state.load(Relaxed) == 2 && s.database.load(Relaxed) == db)
    {
        s.reset();
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use super::*;

    #[pg_test]
    fn buckets_are_monotonic_and_bounded() {
        let mut last = 0;
        for us in [1u64, 2, 3, 10, 50, 100, 1000, 10_000, 500_000] {
            let b = bucket_of(us * 1000);
            assert!(b >= last && b < BUCKETS);
            assert!(bucket_upper_us(b) >= us as f64, "{us} us in bucket {b}");
            last = b;
        }
        // Beyond the range everything lands in the last bucket rather than out of bounds.
        assert_eq!(bucket_of(100_000_000_000_000), BUCKETS - 1);
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
        // The integer form agrees with 4 * log2(us) wherever floating point is exact enough
        // to judge (away from the bucket bounds themselves).
        for us in (1u64..(1 << 21)).step_by(7) {
            let exact = ((us as f64).log2() * 4.0).min((BUCKETS - 1) as f64);
            if (exact - exact.round()).abs() > 1e-9 {
                assert_eq!(bucket_of(us * 1000), exact as usize, "{us} us");
            }
        }
        assert_eq!(bucket_of(0), 0);
    }

    #[pg_test]
    fn slots_are_per_cache_and_counted() {
        let a = for_cache("stats_test_a");
        let b = for_cache("stats_test_b");
        assert!(!std::ptr::eq(a, b));
        assert!(std::ptr::eq(a, for_cache("stats_test_a")));
        assert_eq!(
            (a as *const CacheStats as usize) % 64,
            0,
            "slots on cache lines"
        );
        // Another backend's copy counts too.
        let other = (own_stripe() + 1) % STRIPES;
        a.stripes[other].counters[Counter::Calls as usize].fetch_add(5, Relaxed);
        let theirs = &a.stripes[other].latency[Path::L2Hit as usize];
        theirs.count.fetch_add(1, Relaxed);
        theirs.sum_ns.fetch_add(100_000, Relaxed);
        theirs.hist[bucket_of(100_000)].fetch_add(1, Relaxed);
        assert_eq!(a.counter(Counter::Calls), 5);
        a.bump(Counter::Calls);
        a.bump(Counter::Calls);
        a.record(Path::L2Hit, Duration::from_micros(100));
        assert_eq!(a.counter(Counter::Calls), 7);
        let (mean, p99) = latency_summary(a, Path::L2Hit);
        assert_eq!(mean, Some(100.0));
        assert!(p99.unwrap() >= 100.0 && p99.unwrap() < 120.0);
    }
}
