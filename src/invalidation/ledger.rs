//! The ledger: this server's own record of the invalidations Redis has not acknowledged yet.
//! It is where the truth about invalidations lives, in PostgreSQL rather than in Redis.
//!
//! A writer appends its keys here at PRE_COMMIT (shared memory, no I/O) and writes its WAL
//! record; the delivery worker sends them to Redis in batches once their transaction has ended
//! and removes them when Redis has acknowledged. Per hash slot of the key space the ledger
//! keeps a count of undelivered keys and a generation that every append and every delivery
//! moves. L2 is never read for a key with an undelivered invalidation, and a fill is stored
//! only if the generation it read before going to the source has not moved: whether Redis
//! kept its tombstones has no part in that proof.
//!
//! The ledger survives restarts through a file (`pg_twotier/ledger`, written by the worker
//! while keys wait and by the postmaster when it exits) and the WAL (each writer's record,
//! replayed by crash recovery and by standbys). When neither can prove that every
//! undelivered key is known, the primary moves L2 to a new *epoch*: a namespace in every
//! Redis key, so that nothing stored before is ever read again. Standbys learn deliveries
//! and epochs from the worker's "delivered up to" WAL records.

use crate::l1;
use pgrx::pg_sys;
use std::cell::Cell;
use std::ffi::CStr;
use std::io::{Read, Write};
use std::sync::atomic::{
    AtomicBool, AtomicI32, AtomicI64, AtomicPtr, AtomicU32, AtomicU64, Ordering::SeqCst,
};

const SLOTS: usize = 1 << 16;
const ALIGN: usize = 8;
const HDR: usize = std::mem::size_of::<EntryHeader>();
pub const LWLOCK_TRANCHE: &CStr = c"twotier_ledger";

/// Appended at PRE_COMMIT; its writer has not ended yet.
const PENDING: u32 = 0;
const DONE: u32 = 1;
/// Padding at the end of the arena: the next entry starts at its beginning.
const SKIP: u32 = 2;
/// Its writer committed (marked in the COMMIT callback, which runs once the commit is
/// visible), or it came from the file or the WAL: the worker delivers it.
const READY: u32 = 3;

/// Not known yet whether every undelivered key is in the ledger (after a start, until the
/// file, the WAL or an epoch move settles it): L2 is neither read nor filled.
const STATE_UNKNOWN: u32 = 0;
const STATE_COMPLETE: u32 = 1;

const LAG_BUCKETS: [i64; 10] = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000];
const DIR: &str = "pg_twotier";
const FILE: &str = "pg_twotier/ledger";
const MAGIC: &[u8; 8] = b"TTLEDG01";

#[repr(C)]
struct EntryHeader {
    total: u32,
    key_len: u32,
    db: u32,
    /// The writer's transaction; 0 for a key to deliver at once (a fill that raced a commit).
    xid: u32,
    /// On the primary, the WAL insert position when the key was appended (its record comes
    /// after); on a standby, its record's position.
    lsn: u64,
    /// When it was appended (ms since the epoch): for the delivery lag and the oldest age.
    at_ms: i64,
    /// Atomic: a committing writer marks its entries READY without the lock.
    state: AtomicU32,
    _pad: u32,
}

impl EntryHeader {
    /// Not done yet: PENDING or READY.
    fn live(&self) -> bool {
        matches!(self.state.load(SeqCst), PENDING | READY)
    }
}

#[repr(C)]
pub struct Shared {
    arena_bytes: u64,
    // Under the lock:
    head: u64,
    tail: u64,
    reserved: u64,
    undelivered: u64,
    /// `head - tail + reserved` as of the last change: read without the lock by writers.
    used: AtomicU64,
    /// Set while an append or removal is half done: a ledger left so by a killed process is
    /// not saved as complete by the postmaster.
    modifying: AtomicBool,
    epoch: AtomicU64,
    state: AtomicU32,
    redo_ran: AtomicBool,
    redo_start: AtomicU64,
    file_x: AtomicU64,
    file_clean: AtomicBool,
    /// A standby that could not keep a replayed key: untrusted until a delivery record says
    /// everything up to here was delivered.
    overflow_lsn: AtomicU64,
    /// The last "delivered up to" position written (primary) or replayed (standby).
    last_x: AtomicU64,
    recorded: AtomicU64,
    delivered: AtomicU64,
    dropped: AtomicU64,
    requeued: AtomicU64,
    failures: AtomicU64,
    epoch_moves: AtomicU64,
    /// Undelivered entries made moot by a full ledger's epoch move.
    retired: AtomicU64,
    /// A process is settling the state after a start (one at a time).
    resolving: AtomicBool,
    last_delivery_ms: AtomicI64,
    last_failure_ms: AtomicI64,
    /// From append to Redis's acknowledgment, for the last batch and the worst since start.
    last_lag_ms: AtomicI64,
    max_lag_ms: AtomicI64,
    /// Keys delivered, by lag from append to acknowledgment: up to 1, 2, 5, 10, 20, 50,
    /// 100, 200, 500, 1000 ms, and more.
    lag_buckets: [AtomicU64; LAG_BUCKETS.len() + 1],
    exchanges: AtomicU64,
    worker_pid: AtomicI32,
    worker_latch: AtomicPtr<pg_sys::Latch>,
    pending: [AtomicU32; SLOTS],
    gens: [AtomicU64; SLOTS],
}

static mut SHARED: *mut Shared = std::ptr::null_mut();
static mut ARENA: *mut u8 = std::ptr::null_mut();
static mut LOCK: *mut pg_sys::LWLock = std::ptr::null_mut();

thread_local! {
    /// Arena bytes this transaction reserved before taking its caches' locks.
    static RESERVED: Cell<u64> = const { Cell::new(0) };
    /// Offsets of the entries this transaction appended: marked READY at COMMIT, DONE at
    /// ABORT. The tail never passes an entry that is not DONE, so they stay valid.
    static OWN: std::cell::RefCell<Vec<u64>> = const { std::cell::RefCell::new(Vec::new()) };
}

pub fn shmem_size() -> usize {
    if !crate::gucs::preloaded() {
        return 0;
    }
    std::mem::size_of::<Shared>().next_multiple_of(ALIGN) + crate::gucs::ledger_bytes()
}

pub fn request_lock() {
    if shmem_size() > 0 {
        unsafe { pg_sys::RequestNamedLWLockTranche(LWLOCK_TRANCHE.as_ptr(), 1) };
    }
}

/// # Safety
/// `ptr` must point at `shmem_size()` bytes of shared memory that outlive the process.
pub unsafe fn attach(ptr: *mut u8, fresh: bool) {
    if ptr.is_null() || shmem_size() == 0 {
        return;
    }
    unsafe {
        if fresh {
            std::ptr::write_bytes(ptr, 0, std::mem::size_of::<Shared>());
            (*(ptr as *mut Shared)).arena_bytes = crate::gucs::ledger_bytes() as u64;
        }
        SHARED = ptr as *mut Shared;
        ARENA = ptr.add(std::mem::size_of::<Shared>().next_multiple_of(ALIGN));
        LOCK = &raw mut (*pg_sys::GetNamedLWLockTranche(LWLOCK_TRANCHE.as_ptr())).lock;
        crate::l2::set_epoch_source(&(*SHARED).epoch);
        if fresh {
            load_file();
        }
        if !pg_sys::IsUnderPostmaster {
            // Runs in the postmaster when it exits, and before it re-creates shared memory
            // after a crash: every child is gone, so the ledger is final.
            pg_sys::on_shmem_exit(Some(save_at_postmaster_exit), pg_sys::Datum::from(0));
        }
    }
}

fn shared() -> Option<&'static Shared> {
    unsafe { (SHARED as *const Shared).as_ref() }
}

pub fn available() -> bool {
    shared().is_some()
}

struct Guard;

impl Guard {
    fn take() -> Guard {
        unsafe { pg_sys::LWLockAcquire(LOCK, pg_sys::LWLockMode::LW_EXCLUSIVE) };
        Guard
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        unsafe { pg_sys::LWLockRelease(LOCK) };
    }
}

/// The shared state's fields that only the lock holder touches.
fn locked(_s: &Shared, _g: &Guard) -> &'static mut Shared {
    unsafe { &mut *SHARED }
}

fn slot(hash: u64) -> usize {
    (hash as usize) % SLOTS
}

fn entry_size(key_len: usize) -> u64 {
    (HDR + key_len).next_multiple_of(ALIGN) as u64
}

unsafe fn header_at(s: &Shared, off: u64) -> *mut EntryHeader {
    unsafe { ARENA.add((off % s.arena_bytes) as usize) as *mut EntryHeader }
}

unsafe fn key_at<'a>(s: &Shared, off: u64, len: usize) -> &'a str {
    unsafe {
        let p = ARENA.add((off % s.arena_bytes) as usize + HDR);
        std::str::from_utf8(std::slice::from_raw_parts(p, len)).unwrap_or("")
    }
}

/// Bytes `keys` need in the arena: what a writer reserves before it resolves versions.
/// `extra_per_key` is the tier key's prefix with room for a version that grows meanwhile.
pub fn bytes_for<'a>(keys: impl Iterator<Item = &'a str>, extra_per_key: usize) -> u64 {
    keys.map(|k| entry_size(k.len() + extra_per_key) + ALIGN as u64)
        .sum()
}

/// Takes `bytes` of arena for this transaction's keys. False when they do not fit: the
/// caller moves the cache to a new version instead, which needs no ledger.
pub fn reserve(bytes: u64) -> bool {
    let Some(s) = shared() else { return true };
    // Below half full no reservation is needed: a transaction brings at most
    // twotier.flush_above_keys keys per cache (about 100 kB), and the other half would take
    // a hundred such transactions appending at the same instant.
    if s.used.load(SeqCst) + bytes < s.arena_bytes / 2 {
        return true;
    }
    let g = Guard::take();
    let m = locked(s, &g);
    // The worst case of wrapping: one entry's worth of padding at the end.
    if m.head - m.tail + m.reserved + bytes + entry_size(4096) > m.arena_bytes {
        return false;
    }
    m.reserved += bytes;
    RESERVED.with(|r| r.set(r.get() + bytes));
    true
}

/// Gives back what this transaction reserved and did not use (its end, either way).
pub fn release_reservation() {
    let left = RESERVED.with(|r| r.replace(0));
    if left == 0 {
        return;
    }
    if let Some(s) = shared() {
        let g = Guard::take();
        let m = locked(s, &g);
        m.reserved = m.reserved.saturating_sub(left);
    }
}

/// Appends one entry; the caller holds the lock. False if the arena is full.
fn append(m: &mut Shared, db: u32, xid: u32, lsn: u64, key: &str, state: u32) -> bool {
    let size = entry_size(key.len());
    let phys = m.head % m.arena_bytes;
    let pad = if phys + size > m.arena_bytes {
        m.arena_bytes - phys
    } else {
        0
    };
    if m.head - m.tail + pad + size > m.arena_bytes - m.reserved {
        return false;
    }
    unsafe {
        if pad > 0 {
            let h = header_at(m, m.head);
            (*h).total = pad as u32;
            (*h).state.store(SKIP, SeqCst);
            m.head += pad;
        }
        let h = header_at(m, m.head);
        h.write(EntryHeader {
            total: size as u32,
            key_len: key.len() as u32,
            db,
            xid,
            lsn,
            at_ms: l1::now_ms(),
            state: AtomicU32::new(state),
            _pad: 0,
        });
        std::ptr::copy_nonoverlapping(key.as_ptr(), (h as *mut u8).add(HDR), key.len());
    }
    m.head += size;
    m.undelivered += 1;
    let i = slot(l1::hash_key(key));
    m.pending[i].fetch_add(1, SeqCst);
    m.gens[i].fetch_add(1, SeqCst);
    true
}

/// Marks the entry at `off` done (delivered, dropped or moot); the caller holds the lock.
fn finish(m: &mut Shared, off: u64) {
    unsafe {
        let h = header_at(m, off);
        if !(*h).live() {
            return;
        }
        (*h).state.store(DONE, SeqCst);
        let key = key_at(m, off, (*h).key_len as usize);
        let i = slot(l1::hash_key(key));
        // Generation first: a fill that saw the count at zero must also see the move.
        m.gens[i].fetch_add(1, SeqCst);
        let _ = m.pending[i].fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1));
    }
    m.undelivered = m.undelivered.saturating_sub(1);
}

/// The entries (padding included) from `from` to head, oldest first, with their offsets; the
/// caller holds the lock (or, in the postmaster, nothing else runs).
fn walk(m: &Shared, from: u64) -> impl Iterator<Item = (u64, &'static EntryHeader)> + '_ {
    let mut off = from;
    std::iter::from_fn(move || {
        if off >= m.head {
            return None;
        }
        let h = unsafe { &*header_at(m, off) };
        let at = off;
        off += h.total.max(ALIGN as u32) as u64;
        Some((at, h))
    })
}

/// Offsets of the entries not done yet, oldest first; the caller holds the lock.
fn offsets(m: &Shared) -> Vec<u64> {
    walk(m, m.tail)
        .filter(|(_, h)| h.live())
        .map(|(off, _)| off)
        .collect()
}

/// Moves `tail` past entries that are done; the caller holds the lock.
fn advance_tail(m: &mut Shared) {
    let next = walk(m, m.tail).find(|(_, h)| h.live()).map(|(off, _)| off);
    m.tail = next.unwrap_or(m.head);
}

/// Marks done every entry not done whose position is before `upto` (u64::MAX: all of them):
/// a delivery record passed them, or an epoch move made them moot. The caller holds the lock.
fn retire_before(m: &mut Shared, upto: u64) {
    for off in offsets(m) {
        if unsafe { (*header_at(m, off)).lsn } < upto {
            finish(m, off);
        }
    }
    advance_tail(m);
}

fn begin(m: &mut Shared) {
    m.modifying.store(true, SeqCst);
}

fn end_change(m: &mut Shared) {
    m.used.store(m.head - m.tail + m.reserved, SeqCst);
    m.modifying.store(false, SeqCst);
}

/// PRE_COMMIT of a writer: its tier keys enter the ledger before its WAL record is written
/// and before its commit is visible. No I/O. False if they did not fit (the reservation
/// makes that rare); the caller then moves the caches to new versions.
pub fn record(keys: &[&str]) -> bool {
    let Some(s) = shared() else { return true };
    let xid = unsafe { pg_sys::GetTopTransactionId() }.into_inner();
    let db = unsafe { pg_sys::MyDatabaseId }.to_u32();
    let ok = {
        let g = Guard::take();
        let m = locked(s, &g);
        let used = RESERVED.with(|r| r.replace(0));
        m.reserved = m.reserved.saturating_sub(used);
        // Under the lock: the worker's "delivered up to" position is read under it too, so no
        // record written after it can belong to a key appended before it.
        let lsn = unsafe { pg_sys::GetXLogInsertRecPtr() };
        begin(m);
        let mut ok = true;
        let mut own = Vec::with_capacity(keys.len());
        for k in keys {
            if !append(m, db, xid, lsn, k, PENDING) {
                ok = false;
                break;
            }
            // Any padding comes before the entry: it is the last bytes before head.
            own.push(m.head - entry_size(k.len()));
        }
        if ok {
            OWN.with(|o| o.borrow_mut().extend(own));
        } else {
            // All or nothing: finish what went in (they are moot once the caches move).
            for off in own {
                finish(m, off);
            }
            advance_tail(m);
        }
        end_change(m);
        ok
    };
    if ok {
        s.recorded.fetch_add(keys.len() as u64, SeqCst);
    }
    ok
}

/// COMMIT callback (the commit is visible): this transaction's entries may be delivered.
/// ABORT: they are dropped. Neither can fail.
pub fn end_own(committed: bool) {
    let own = OWN.with(|o| std::mem::take(&mut *o.borrow_mut()));
    if own.is_empty() {
        return;
    }
    let Some(s) = shared() else { return };
    if committed {
        // No lock: the state is atomic, and the tail never passes a PENDING entry, so these
        // offsets are still this transaction's entries.
        for off in own {
            let h = unsafe { &*header_at(s, off) };
            let _ = h.state.compare_exchange(PENDING, READY, SeqCst, SeqCst);
        }
        wake_worker();
        return;
    }
    s.dropped.fetch_add(own.len() as u64, SeqCst);
    let g = Guard::take();
    let m = locked(s, &g);
    begin(m);
    for off in own {
        finish(m, off);
    }
    advance_tail(m);
    end_change(m);
}

/// Wakes the delivery worker. Never fails.
pub fn wake_worker() {
    let Some(s) = shared() else { return };
    let latch = s.worker_latch.load(SeqCst);
    if !latch.is_null() {
        unsafe { pg_sys::SetLatch(latch) };
    }
}

/// A fill that may have raced a commit whose tombstone Redis has already lost: the key gets a
/// tombstone of its own, delivered at once, and stays out of L2 until then.
pub fn requeue(key: &str) {
    let Some(s) = shared() else { return };
    let db = unsafe { pg_sys::MyDatabaseId }.to_u32();
    {
        let g = Guard::take();
        let m = locked(s, &g);
        let lsn = unsafe { pg_sys::GetXLogInsertRecPtr() };
        begin(m);
        let ok = append(m, db, 0, lsn, key, READY);
        end_change(m);
        if !ok {
            // No room to remember it: nothing read from L2 can be trusted until an epoch move.
            s.state.store(STATE_UNKNOWN, SeqCst);
        }
    }
    s.requeued.fetch_add(1, SeqCst);
    wake_worker();
}

/// Invalidations were dropped undelivered (no Redis configured): whatever Redis comes next
/// may hold values they made old, so the ledger is no longer complete.
pub fn forget_undelivered() {
    if let Some(s) = shared() {
        s.state.store(STATE_UNKNOWN, SeqCst);
    }
}

/// What the ledger says about reading `hash`'s key from L2.
pub enum Guarded {
    /// Not known whether every undelivered invalidation is here (after a start): no L2.
    Untrusted,
    /// An invalidation of a key of this slot is not delivered yet: no L2 read, no L2 fill.
    Undelivered,
    /// Read L2; a fill must still find this generation.
    Clear(u64),
}

pub fn guard(hash: u64) -> Guarded {
    let Some(s) = shared() else {
        return Guarded::Untrusted;
    };
    if !trusted(s) {
        return Guarded::Untrusted;
    }
    let i = slot(hash);
    // Generation before the count: an append moves both (count first), a delivery both
    // (generation first); either way a change after this read shows in the generation.
    let gen = s.gens[i].load(SeqCst);
    if s.pending[i].load(SeqCst) > 0 {
        return Guarded::Undelivered;
    }
    Guarded::Clear(gen)
}

/// Whether a fill that read `hash`'s key under generation `gen` may still be stored.
pub fn still_clear(hash: u64, gen: u64) -> bool {
    let Some(s) = shared() else { return false };
    let i = slot(hash);
    trusted(s) && s.pending[i].load(SeqCst) == 0 && s.gens[i].load(SeqCst) == gen
}

/// Every undelivered key is known here (the state, and no replayed key dropped for room).
fn complete(s: &Shared) -> bool {
    s.state.load(SeqCst) == STATE_COMPLETE && s.overflow_lsn.load(SeqCst) == 0
}

fn trusted(s: &Shared) -> bool {
    if complete(s) {
        return true;
    }
    // A primary settles it at once, whoever asks first (the worker, or a reader that came
    // before it); a standby waits for the primary's DELIVERED record.
    !unsafe { pg_sys::RecoveryInProgress() } && settle_start()
}

pub fn l2_trusted() -> bool {
    shared().is_some_and(trusted)
}

/// The L2 namespace this server reads and writes (0 until the first epoch move).
pub fn epoch() -> u64 {
    shared().map_or(0, |s| s.epoch.load(SeqCst))
}

// ---------------------------------------------------------------------------------------
// Replay (the startup process: crash recovery and standbys)

/// At the start of redo: where replay begins. Every record from here on is replayed, so the
/// ledger is complete once it also knows every undelivered key from before this point.
pub fn replay_startup() {
    let Some(s) = shared() else { return };
    let redo = unsafe { pg_sys::GetRedoRecPtr() };
    s.redo_ran.store(true, SeqCst);
    s.redo_start.store(redo, SeqCst);
    if s.file_clean.load(SeqCst) || s.file_x.load(SeqCst) >= redo {
        s.state.store(STATE_COMPLETE, SeqCst);
    } else {
        s.state.store(STATE_UNKNOWN, SeqCst);
    }
}

/// A writer's record, replayed: its keys are undelivered until a delivery record passes it.
pub fn replay_record(db: u32, xid: u32, lsn: u64, keys: &[&str]) {
    let Some(s) = shared() else { return };
    let g = Guard::take();
    let m = locked(s, &g);
    begin(m);
    // Delivered only if this server is promoted: by then every replayed writer has ended (a
    // tombstone for one that aborted costs nothing).
    for k in keys {
        if !append(m, db, xid, lsn, k, READY) {
            m.overflow_lsn.fetch_max(lsn, SeqCst);
            break;
        }
    }
    end_change(m);
}

/// The primary's "delivered up to `x` in `epoch`" record, replayed.
pub fn replay_delivered(epoch: u64, x: u64) {
    let Some(s) = shared() else { return };
    let moved = s.epoch.load(SeqCst) != epoch;
    {
        let g = Guard::take();
        let m = locked(s, &g);
        begin(m);
        // Every record before `x` is delivered, whatever the epoch. (A start's epoch move
        // retired everything on the primary too; what lies between `x` and this record goes
        // with the next record. A cluster map's move keeps the writers in flight: their keys
        // are delivered under the new epoch.)
        retire_before(m, x);
        m.epoch.store(epoch, SeqCst);
        m.last_x.store(x, SeqCst);
        if moved || !s.redo_ran.load(SeqCst) || x >= s.redo_start.load(SeqCst) {
            m.state.store(STATE_COMPLETE, SeqCst);
        }
        let overflow = m.overflow_lsn.load(SeqCst);
        if overflow != 0 && (moved || x > overflow) {
            m.overflow_lsn.store(0, SeqCst);
        }
        end_change(m);
    }
    if moved {
        // The epoch must survive a crash of this standby before its next restartpoint.
        save_file(false);
    }
}

// ---------------------------------------------------------------------------------------
// The delivery worker's side

#[derive(Default)]
pub struct Batch {
    /// (offset, key, appended at ms) of committed invalidations to deliver.
    pub deliver: Vec<(u64, String, i64)>,
    /// The epoch when the batch was taken. An epoch move may retire its entries meanwhile and
    /// let others take their offsets: a batch of another epoch settles nothing.
    epoch: u64,
}

/// Up to `max` entries ready to deliver, oldest first.
pub fn take_batch(max: usize) -> Batch {
    let mut batch = Batch {
        deliver: Vec::new(),
        epoch: 0,
    };
    let Some(s) = shared() else { return batch };
    let g = Guard::take();
    let m = locked(s, &g);
    batch.epoch = m.epoch.load(SeqCst);
    // From the tail, stopping at `max`: with Redis away for long the ledger holds hundreds
    // of thousands of keys, and writers wait for this lock.
    batch.deliver = walk(m, m.tail)
        .filter(|(_, h)| h.state.load(SeqCst) == READY)
        .take(max)
        .map(|(off, h)| {
            let key = unsafe { key_at(m, off, h.key_len as usize) };
            (off, key.to_string(), h.at_ms)
        })
        .collect();
    batch
}

/// After Redis acknowledged (`delivered`) or not: removes what is settled.
pub fn settle(batch: &Batch, delivered: bool) {
    let Some(s) = shared() else { return };
    {
        let g = Guard::take();
        let m = locked(s, &g);
        begin(m);
        // Delivered under an epoch that has moved since: its entries may be gone (a full
        // ledger's move retires them) and their offsets another writer's. Anything left is
        // delivered again under the new epoch.
        if delivered && m.epoch.load(SeqCst) == batch.epoch {
            for (off, _, _) in &batch.deliver {
                finish(m, *off);
            }
        }
        advance_tail(m);
        end_change(m);
    }
    if !batch.deliver.is_empty() {
        s.exchanges.fetch_add(1, SeqCst);
    }
    if delivered {
        s.delivered.fetch_add(batch.deliver.len() as u64, SeqCst);
        let now = l1::now_ms();
        for d in &batch.deliver {
            let lag = now - d.2;
            let i = LAG_BUCKETS
                .iter()
                .position(|b| lag <= *b)
                .unwrap_or(LAG_BUCKETS.len());
            s.lag_buckets[i].fetch_add(1, SeqCst);
        }
        if let Some(oldest) = batch.deliver.iter().map(|d| d.2).min() {
            s.last_delivery_ms.store(now, SeqCst);
            s.last_lag_ms.store(now - oldest, SeqCst);
            s.max_lag_ms.fetch_max(now - oldest, SeqCst);
        }
    } else {
        s.failures.fetch_add(1, SeqCst);
        s.last_failure_ms.store(l1::now_ms(), SeqCst);
    }
}

/// "Every record before this position is delivered": the oldest undelivered entry's
/// position, or the WAL insert position when nothing waits. Read under the lock, so that a
/// key appended later has a record after it.
pub fn delivered_up_to() -> u64 {
    let Some(s) = shared() else { return 0 };
    let g = Guard::take();
    let m = locked(s, &g);
    match walk(m, m.tail).find(|(_, h)| h.live()) {
        Some((_, h)) => h.lsn,
        None => unsafe { pg_sys::GetXLogInsertRecPtr() },
    }
}

/// Tells standbys where delivery stands: a DELIVERED record with this epoch and
/// [`delivered_up_to`]. Returns the record's end.
pub fn log_progress() -> u64 {
    let x = delivered_up_to();
    let end = crate::invalidation::wal::log_delivered(epoch(), x);
    if let Some(s) = shared() {
        s.last_x.store(x, SeqCst);
    }
    end
}

pub fn last_x() -> u64 {
    shared().map_or(0, |s| s.last_x.load(SeqCst))
}

pub fn undelivered() -> u64 {
    shared().map_or(0, |s| {
        let g = Guard::take();
        locked(s, &g).undelivered
    })
}

pub fn register_worker(latch: *mut pg_sys::Latch) {
    if let Some(s) = shared() {
        s.worker_pid.store(unsafe { pg_sys::MyProcPid }, SeqCst);
        s.worker_latch.store(latch, SeqCst);
    }
}

pub fn unregister_worker() {
    if let Some(s) = shared() {
        s.worker_latch.store(std::ptr::null_mut(), SeqCst);
        s.worker_pid.store(0, SeqCst);
    }
}

/// The primary's first act after a start or a promotion: is every undelivered key known? If
/// not, L2 moves to a new epoch (its record flushed before anyone uses it, so a standby never
/// reads an epoch that a crash could take back). True once settled.
pub fn settle_start() -> bool {
    let Some(s) = shared() else { return false };
    if s.resolving
        .compare_exchange(false, true, SeqCst, SeqCst)
        .is_err()
    {
        return false;
    }
    let settled = (|| {
        if complete(s) {
            return true;
        }
        if unsafe { pg_sys::RecoveryInProgress() } {
            return false;
        }
        if !s.redo_ran.load(SeqCst) && s.file_clean.load(SeqCst) {
            s.state.store(STATE_COMPLETE, SeqCst);
            return true;
        }
        let x = unsafe { pg_sys::GetXLogInsertRecPtr() };
        let epoch = record_new_epoch(s, x);
        {
            let g = Guard::take();
            let m = locked(s, &g);
            begin(m);
            // Everything undelivered is moot: nothing it named is read again.
            retire_before(m, u64::MAX);
            m.epoch.store(epoch, SeqCst);
            m.overflow_lsn.store(0, SeqCst);
            m.last_x.store(x, SeqCst);
            end_change(m);
        }
        s.epoch_moves.fetch_add(1, SeqCst);
        save_file(false);
        s.state.store(STATE_COMPLETE, SeqCst);
        pgrx::log!(
            "twotier: L2 moves to epoch {epoch:x}: after a start without a complete record of undelivered invalidations (a crash, a lost pg_twotier/ledger, a first start) nothing stored before is read again"
        );
        true
    })();
    s.resolving.store(false, SeqCst);
    settled
}

/// The epoch after `old`, always past it. On one Redis, the time in µs. On a Redis Cluster
/// the low 32 bits are the fingerprint of the map L2's trust rests on, and a move that is not
/// about the map (a start, a full ledger) keeps them: only the high bits (the time in seconds)
/// move, and readers go on trusting the same masters under the new names. A new epoch with
/// other low bits would leave L2 untrusted until the worker read the map again.
fn next_epoch(old: u64, now: std::time::Duration, cluster: bool) -> u64 {
    if cluster {
        (now.as_secs().max((old >> 32) + 1) << 32) | (old & 0xffff_ffff)
    } else {
        (now.as_micros() as u64).max(old + 1)
    }
}

fn since_unix_epoch() -> std::time::Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
}

/// A DELIVERED record saying "`epoch` begins, delivered up to `x`", flushed before anyone
/// reads the epoch: a crash cannot take it back.
fn record_epoch(epoch: u64, x: u64) {
    let end = crate::invalidation::wal::log_delivered(epoch, x);
    unsafe { pg_sys::XLogFlush(end) };
}

/// A move that is not about the map: [`next_epoch`], recorded ([`record_epoch`]).
fn record_new_epoch(s: &Shared, x: u64) -> u64 {
    let epoch = next_epoch(
        s.epoch.load(SeqCst),
        since_unix_epoch(),
        crate::gucs::redis_cluster(),
    );
    record_epoch(epoch, x);
    epoch
}

/// A writer found the ledger full (Redis away for long, or more keys at once than the worker
/// takes): rather than each commit from here on moving its caches to new versions (a catalog
/// write under the cache's exclusive lock, which puts the writers of a cache in single file:
/// 0.09x the unwatched TPS in `./run bench` after 15 s of Redis down), L2 moves to a new epoch
/// once and every committed undelivered entry is retired: nothing they named is read again.
/// Entries of writers between PRE_COMMIT and COMMIT stay, and are delivered under the new
/// epoch. False if nothing was retired or another process is moving it; the caller then moves
/// its caches as before.
pub fn make_room() -> bool {
    let Some(s) = shared() else { return false };
    if !complete(s)
        || s.resolving
            .compare_exchange(false, true, SeqCst, SeqCst)
            .is_err()
    {
        return false;
    }
    let moved = (|| {
        // The record's "delivered up to": before every entry still PENDING. A writer appends
        // at the WAL insert position and writes its record after it, so an entry appended from
        // here on lies after this too; standbys keep those undelivered until a later record.
        let (x, ready) = {
            let g = Guard::take();
            let m = locked(s, &g);
            let mut x = None;
            let mut ready = 0usize;
            for (_, h) in walk(m, m.tail) {
                match h.state.load(SeqCst) {
                    PENDING if x.is_none() => x = Some(h.lsn),
                    READY => ready += 1,
                    _ => {}
                }
            }
            (
                x.unwrap_or_else(|| unsafe { pg_sys::GetXLogInsertRecPtr() }),
                ready,
            )
        };
        if ready == 0 {
            return false;
        }
        let epoch = record_new_epoch(s, x);
        let retired = {
            let g = Guard::take();
            let m = locked(s, &g);
            begin(m);
            let mut retired = 0u64;
            for off in offsets(m) {
                if unsafe { (*header_at(m, off)).state.load(SeqCst) } == READY {
                    finish(m, off);
                    retired += 1;
                }
            }
            advance_tail(m);
            m.epoch.store(epoch, SeqCst);
            m.last_x.store(x, SeqCst);
            end_change(m);
            retired
        };
        s.epoch_moves.fetch_add(1, SeqCst);
        s.retired.fetch_add(retired, SeqCst);
        save_file(false);
        pgrx::log!(
            "twotier: L2 moves to epoch {epoch:x}: the ledger is full ({retired} committed invalidations not delivered to Redis); nothing stored before is read again"
        );
        true
    })();
    s.resolving.store(false, SeqCst);
    moved
}

/// A Redis Cluster whose map changed (a failover, a master's restart, a resharding): L2 moves
/// to an epoch whose low 32 bits are the new map's fingerprint, so that this primary and its
/// standbys (through the DELIVERED record) read only from that map's masters (docs/design.md,
/// "Redis Cluster"). Unlike a start's move nothing undelivered is retired: writers in flight
/// have their keys here, and they are delivered under the new epoch.
pub fn move_epoch_to_map(fingerprint: u32) {
    let Some(s) = shared() else { return };
    let moved = next_epoch(s.epoch.load(SeqCst), since_unix_epoch(), true);
    let epoch = (moved & !0xffff_ffff) | fingerprint as u64;
    let x = delivered_up_to();
    record_epoch(epoch, x);
    {
        let g = Guard::take();
        let m = locked(s, &g);
        m.epoch.store(epoch, SeqCst);
        m.last_x.store(x, SeqCst);
    }
    s.epoch_moves.fetch_add(1, SeqCst);
    save_file(false);
    pgrx::log!(
        "twotier: L2 moves to epoch {epoch:x}: the Redis Cluster's map is {fingerprint:08x} now (a failover, a master's restart or a resharding); nothing stored under the earlier map is read again"
    );
}

pub fn status() -> serde_json::Value {
    let Some(s) = shared() else {
        return serde_json::json!({ "available": false, "l2_trusted": false });
    };
    let (undelivered, used, oldest_ms) = {
        let g = Guard::take();
        let m = locked(s, &g);
        // The tail is the oldest entry not done (advance_tail keeps it so).
        let oldest = (m.tail < m.head).then(|| unsafe { (*header_at(m, m.tail)).at_ms });
        (m.undelivered, m.head - m.tail, oldest)
    };
    let ms = |a: &AtomicI64| {
        let v = a.load(SeqCst);
        (v != 0).then_some(v)
    };
    let pid = s.worker_pid.load(SeqCst);
    serde_json::json!({
        "available": true,
        "l2_trusted": trusted(s),
        "complete": s.state.load(SeqCst) == STATE_COMPLETE,
        "undelivered": undelivered,
        "oldest_undelivered_age_ms": oldest_ms.map(|t| (l1::now_ms() - t).max(0)),
        "last_batch_lag_ms": s.last_lag_ms.load(SeqCst),
        "max_lag_ms": s.max_lag_ms.load(SeqCst),
        "lag_p99_ms": lag_p99(s),
        // [upper bound in ms (null: above the last), keys delivered within it] since the start.
        "lag_histogram": LAG_BUCKETS.iter().map(|b| Some(*b)).chain([None]).zip(s.lag_buckets.iter())
            .map(|(b, n)| serde_json::json!([b, n.load(SeqCst)])).collect::<Vec<_>>(),
        "exchanges": s.exchanges.load(SeqCst),
        "bytes_used": used,
        "bytes": s.arena_bytes,
        "recorded": s.recorded.load(SeqCst),
        "delivered": s.delivered.load(SeqCst),
        "dropped": s.dropped.load(SeqCst),
        "requeued": s.requeued.load(SeqCst),
        "delivery_failures": s.failures.load(SeqCst),
        "last_delivery_epoch_ms": ms(&s.last_delivery_ms),
        "last_failure_epoch_ms": ms(&s.last_failure_ms),
        "epoch": s.epoch.load(SeqCst),
        "epoch_moves": s.epoch_moves.load(SeqCst),
        "retired_by_epoch_moves": s.retired.load(SeqCst),
        "delivered_up_to": format_lsn(s.last_x.load(SeqCst)),
        "worker_pid": (pid != 0).then_some(pid),
    })
}

/// The bucket bound under which 99 % of the keys delivered since the start were (None before
/// the first delivery; beyond the last bucket, the worst lag seen).
fn lag_p99(s: &Shared) -> Option<i64> {
    let counts: Vec<u64> = s.lag_buckets.iter().map(|b| b.load(SeqCst)).collect();
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let mut seen = 0;
    for (i, n) in counts.iter().enumerate() {
        seen += n;
        if seen * 100 >= total * 99 {
            return Some(
                LAG_BUCKETS
                    .get(i)
                    .copied()
                    .unwrap_or(s.max_lag_ms.load(SeqCst)),
            );
        }
    }
    None
}

fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

// ---------------------------------------------------------------------------------------
// The file

/// Where "everything before here" stands now: the WAL insert position on a primary, the
/// replay position on a standby.
fn position() -> u64 {
    unsafe {
        if pg_sys::RecoveryInProgress() {
            pg_sys::GetXLogReplayRecPtr(std::ptr::null_mut())
        } else {
            pg_sys::GetXLogInsertRecPtr()
        }
    }
}

/// Writes the ledger to `pg_twotier/ledger` (a new file, fsynced, renamed over the old one).
/// `clean`: written when no process can append any more (the postmaster at exit) by a ledger
/// known complete, so it holds every undelivered key; otherwise it holds every undelivered
/// key whose record is before the position it records.
pub fn save_file(clean: bool) -> Option<u64> {
    let s = shared()?;
    let parsed = {
        let guard = (!clean).then(Guard::take);
        let m = unsafe { &*(s as *const Shared) };
        let entries = offsets(m)
            .into_iter()
            .map(|off| unsafe {
                let h = &*header_at(m, off);
                (
                    h.db,
                    h.xid,
                    h.lsn,
                    key_at(m, off, h.key_len as usize).to_string(),
                )
            })
            .collect();
        let parsed = Parsed {
            epoch: m.epoch.load(SeqCst),
            x: position(),
            clean,
            entries,
        };
        drop(guard);
        parsed
    };
    let x = parsed.x;
    write_file(&encode_file(&parsed)).ok().map(|_| x)
}

fn write_file(bytes: &[u8]) -> std::io::Result<()> {
    let tmp = format!("{FILE}.tmp.{}", std::process::id());
    let written = (|| {
        std::fs::create_dir_all(DIR)?;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, FILE)?;
        std::fs::File::open(DIR)?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn save_at_postmaster_exit(_code: i32, _arg: pg_sys::Datum) {
    let Some(s) = shared() else { return };
    // A process killed halfway through a change leaves the ledger unreliable: the file the
    // worker wrote last stands, with the WAL to complete it.
    if s.modifying.load(SeqCst) {
        return;
    }
    let _ = save_file(s.state.load(SeqCst) == STATE_COMPLETE);
}

/// At shared memory creation (postmaster): the entries and epoch of the last file.
fn load_file() {
    if !available() {
        return;
    }
    let Ok(mut f) = std::fs::File::open(FILE) else {
        return;
    };
    let mut data = Vec::new();
    if f.read_to_end(&mut data).is_err() {
        return;
    }
    let Some(mut parsed) = parse_file(&data) else {
        return;
    };
    // Nothing else runs yet: no lock is needed (nor available in the postmaster).
    let m = unsafe { &mut *SHARED };
    m.epoch.store(parsed.epoch, SeqCst);
    for (db, xid, lsn, key) in &parsed.entries {
        if !append(m, *db, *xid, *lsn, key, READY) {
            // Too many for this ledger_mb: unknown, so the primary moves to a new epoch.
            return;
        }
    }
    m.used.store(m.head - m.tail, SeqCst);
    m.file_x.store(parsed.x, SeqCst);
    m.file_clean.store(parsed.clean, SeqCst);
    if parsed.clean {
        m.state.store(STATE_COMPLETE, SeqCst);
    }
    // Written back as not clean at once: from now on writers append, and a crash before the
    // worker's first save must not find a file that claims to hold everything.
    parsed.clean = false;
    let _ = write_file(&encode_file(&parsed));
}

fn encode_file(p: &Parsed) -> Vec<u8> {
    let mut out = Vec::with_capacity(33 + p.entries.len() * 64);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&p.epoch.to_le_bytes());
    out.extend_from_slice(&p.x.to_le_bytes());
    out.push(p.clean as u8);
    out.extend_from_slice(&(p.entries.len() as u64).to_le_bytes());
    for (db, xid, lsn, key) in &p.entries {
        out.extend_from_slice(&db.to_le_bytes());
        out.extend_from_slice(&xid.to_le_bytes());
        out.extend_from_slice(&lsn.to_le_bytes());
        out.extend_from_slice(&(key.len() as u32).to_le_bytes());
        out.extend_from_slice(key.as_bytes());
    }
    out
}

struct Parsed {
    epoch: u64,
    x: u64,
    clean: bool,
    entries: Vec<(u32, u32, u64, String)>,
}

fn parse_file(data: &[u8]) -> Option<Parsed> {
    let mut at = 0usize;
    let mut take = |n: usize| -> Option<&[u8]> {
        let s = data.get(at..at + n)?;
        at += n;
        Some(s)
    };
    if take(8)? != MAGIC {
        return None;
    }
    let u64_of = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap_or([0; 8]));
    let u32_of = |b: &[u8]| u32::from_le_bytes(b.try_into().unwrap_or([0; 4]));
    let epoch = u64_of(take(8)?);
    let x = u64_of(take(8)?);
    let clean = take(1)?[0] == 1;
    let n = u64_of(take(8)?);
    let mut entries = Vec::new();
    for _ in 0..n {
        let db = u32_of(take(4)?);
        let xid = u32_of(take(4)?);
        let lsn = u64_of(take(8)?);
        let len = u32_of(take(4)?) as usize;
        let key = std::str::from_utf8(take(len)?).ok()?.to_string();
        entries.push((db, xid, lsn, key));
    }
    Some(Parsed {
        epoch,
        x,
        clean,
        entries,
    })
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_cluster_epoch_moves_its_time_and_keeps_its_map() {
        let at = |s: u64| std::time::Duration::from_secs(s);
        let old = (1_000u64 << 32) | 0xdead_beef;
        // Later: the time moves, the map's fingerprint stays.
        assert_eq!(
            next_epoch(old, at(2_000), true),
            (2_000 << 32) | 0xdead_beef
        );
        // A clock behind the epoch (or two moves in one second): still past it.
        assert_eq!(next_epoch(old, at(5), true), (1_001 << 32) | 0xdead_beef);
        // One Redis: µs, past the old one whatever the clock says.
        assert_eq!(next_epoch(7, at(1), false), 1_000_000);
        assert_eq!(
            next_epoch(u64::from(u32::MAX) << 20, at(1), false),
            (u64::from(u32::MAX) << 20) + 1
        );
        // From one Redis's µs to a cluster: past it, with the (unknown) map bits kept.
        let single = 1_796_000_000_000_000u64;
        assert!(next_epoch(single, at(1_796_000_000), true) > single);
    }

    proptest! {
        #[test]
        fn a_saved_ledger_reads_back(
            epoch in any::<u64>(), x in any::<u64>(), clean in any::<bool>(),
            entries in proptest::collection::vec((any::<u32>(), any::<u32>(), any::<u64>(), ".{0,40}"), 0..20),
        ) {
            let parsed = Parsed { epoch, x, clean, entries: entries.clone() };
            let out = encode_file(&parsed);
            let back = parse_file(&out).expect("parses");
            prop_assert_eq!((back.epoch, back.x, back.clean, back.entries), (epoch, x, clean, entries));
            // A truncated file is refused, never half read.
            prop_assert!(parse_file(&out[..out.len() - 1]).is_none());
        }
    }
}
