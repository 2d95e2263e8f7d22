//! L1: a cache in PostgreSQL shared memory, shared by every backend of the server.
//!
//! Keys hash to one of `PARTITIONS` partitions, each under its own LWLock, so backends only
//! queue when they touch the same partition. A partition is a log-structured ring: entries
//! (header, key, jsonb varlena) are appended at `head`; when the ring is full the oldest
//! entries at `tail` are evicted, FIFO. An open-addressing index maps key hashes to entries.
//! A hit copies the flat jsonb out under a shared lock: no JSON parsing, no network.
//!
//! Invalidation bumps a generation counter of the key's hash slot; a reader notes the
//! generation before it goes to L2 or the source and its fill is refused if it moved, so an
//! L1 fill can never put back a value older than an invalidation it raced with.

pub mod marks;

use crate::gucs;
use pgrx::pg_sys;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, AtomicU32, AtomicU64, Ordering};

pub const PARTITIONS: usize = 64;
const GEN_SLOTS: usize = 1 << 16;
const ALIGN: usize = 8;
const HDR: usize = std::mem::size_of::<EntryHeader>();
const FLAG_DEAD: u32 = 1;
const FLAG_NEGATIVE: u32 = 2;
const FLAG_SKIP: u32 = 4;
/// One variant of a key (vary_by): valid while its key's generation is still `gen`, so that
/// an invalidation of the key reaches every variant without finding them.
const FLAG_VARIANT: u32 = 8;
const SLOT_EMPTY: u64 = 0;
const SLOT_TOMB: u64 = 1;
/// Index slots per byte of ring: sized for entries of 64 bytes and up.
const BYTES_PER_SLOT: usize = 64;
pub const LWLOCK_TRANCHE: &std::ffi::CStr = c"twotier_l1";

#[repr(C)]
struct EntryHeader {
    total: u32,
    key_len: u32,
    val_len: u32,
    flags: u32,
    hash: u64,
    expires_ms: i64,
    /// For a variant: the generation slot of its key, and that slot's generation at the fill.
    gen_slot: u64,
    gen: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Slot {
    hash: u64,
    /// SLOT_EMPTY, SLOT_TOMB, or the entry's logical offset + 2.
    off: u64,
}

#[repr(C)]
struct PartitionHeader {
    head: u64,
    tail: u64,
    live: u64,
    tombs: u64,
}

/// Server-wide L1 state and counters, at the start of the region.
#[repr(C)]
pub struct L1Shared {
    pub ring_bytes: u64,
    pub index_slots: u64,
    pub evictions: AtomicU64,
    pub inserts: AtomicU64,
    pub invalidations: AtomicU64,
    pub flushes: AtomicU64,
    pub live_entries: AtomicI64,
    pub used_bytes: AtomicI64,
    pub worker_pid: AtomicI32,
    pub subscribed: AtomicBool,
    pub subscribed_since_ms: AtomicI64,
    pub subscription_losses: AtomicU64,
    pub messages: AtomicU64,
    gens: [AtomicU64; GEN_SLOTS],
    /// Commits in flight per generation slot: between a writer's PRE_COMMIT and the end of
    /// its COMMIT no backend reads or fills L1 for the slot's keys, so there is no moment at
    /// which the new rows are visible while L1 still serves the old value.
    inflight: [std::sync::atomic::AtomicU32; GEN_SLOTS],
    /// The backend (pid) running the source query for a key of this slot, if any: the other
    /// backends missing the same key wait for its fill instead of running the query too.
    fetching: [AtomicI32; GEN_SLOTS],
    /// On a standby: the transaction (xid) whose invalidation of a key of this slot was
    /// replayed from the WAL before its commit. Until the standby replays that commit, no
    /// backend reads or fills L1 (or reads L2) for the slot's keys. 0: none.
    replay_xid: [AtomicU32; GEN_SLOTS],
    /// Replayed xids that found their slot taken by another running xid: while any of these
    /// runs, L1 is out of play for every key.
    replay_overflow: [AtomicU32; REPLAY_OVERFLOW],
    /// Whether `replay_overflow` may hold a running xid: set and cleared by the startup
    /// process only, so that readers scan the overflow only when it is in use.
    replay_overflow_active: AtomicBool,
    /// Set if even the overflow was full: L1 then stays off on this server until a restart,
    /// rather than risk serving a value older than the standby's tables.
    pub replay_lost: AtomicBool,
}

const REPLAY_OVERFLOW: usize = 256;

struct Layout {
    partition_bytes: usize,
    ring_bytes: usize,
    index_slots: usize,
}

fn layout(total_bytes: usize) -> Layout {
    let per_part = (total_bytes / PARTITIONS).max(64 * 1024);
    // ring + index: ring_bytes + ring_bytes / BYTES_PER_SLOT * size_of::<Slot>() = per_part
    let slot = std::mem::size_of::<Slot>();
    let ring_bytes = ((per_part - std::mem::size_of::<PartitionHeader>()) * BYTES_PER_SLOT
        / (BYTES_PER_SLOT + slot))
        / ALIGN
        * ALIGN;
    let index_slots = ring_bytes / BYTES_PER_SLOT;
    let partition_bytes = std::mem::size_of::<PartitionHeader>() + index_slots * slot + ring_bytes;
    Layout {
        partition_bytes: partition_bytes.next_multiple_of(ALIGN),
        ring_bytes,
        index_slots,
    }
}

pub fn shmem_size() -> usize {
    if gucs::l1_size_mb() == 0 {
        return 0;
    }
    std::mem::size_of::<L1Shared>()
        + layout(gucs::l1_size_mb() * 1024 * 1024).partition_bytes * PARTITIONS
}

static mut SHARED: *mut L1Shared = std::ptr::null_mut();
static mut PARTS: *mut u8 = std::ptr::null_mut();
static mut LOCKS: *mut pg_sys::LWLockPadded = std::ptr::null_mut();
static mut PART_BYTES: usize = 0;

pub fn request_locks() {
    if shmem_size() > 0 {
        unsafe { pg_sys::RequestNamedLWLockTranche(LWLOCK_TRANCHE.as_ptr(), PARTITIONS as i32) };
    }
}

/// # Safety
/// `ptr` must point at `shmem_size()` bytes of shared memory that outlive the process.
pub unsafe fn attach(ptr: *mut u8, fresh: bool) {
    if ptr.is_null() || shmem_size() == 0 {
        return;
    }
    let l = layout(gucs::l1_size_mb() * 1024 * 1024);
    unsafe {
        if fresh {
            std::ptr::write_bytes(ptr, 0, shmem_size());
            let shared = &mut *(ptr as *mut L1Shared);
            shared.ring_bytes = l.ring_bytes as u64;
            shared.index_slots = l.index_slots as u64;
        }
        SHARED = ptr as *mut L1Shared;
        PARTS = ptr.add(std::mem::size_of::<L1Shared>());
        PART_BYTES = l.partition_bytes;
        LOCKS = pg_sys::GetNamedLWLockTranche(LWLOCK_TRANCHE.as_ptr());
    }
}

pub fn shared() -> Option<&'static L1Shared> {
    unsafe { (SHARED as *const L1Shared).as_ref() }
}

pub fn available() -> bool {
    shared().is_some()
}

/// The hash that places a key in L1's partitions and in the generation, in-flight and
/// ledger slots. Every process of the server must agree on it, and nothing outside the running
/// server keeps it. Speed over strength: std's SipHash cost about 500 instructions per tier key
/// (a tenth of an L1 hit, and three times per key at each commit), and with its fixed keys it
/// resisted crafted collisions no better than this does. A collision only shares a slot, which
/// makes the checks more careful, never less.
pub fn hash_key(key: &str) -> u64 {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    // A 128-bit product folded to 64 bits mixes every input bit into both halves.
    fn fold(a: u64, b: u64) -> u64 {
        let p = (a as u128).wrapping_mul(b as u128);
        (p as u64) ^ ((p >> 64) as u64)
    }
    let bytes = key.as_bytes();
    let mut h = (bytes.len() as u64) ^ K;
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        let mut word = [0u8; 8];
        word.copy_from_slice(w);
        h = fold(h ^ u64::from_le_bytes(word), K);
    }
    let rest = words.remainder();
    let mut tail = [0u8; 8];
    tail[..rest.len()].copy_from_slice(rest);
    h = fold(
        h ^ u64::from_le_bytes(tail),
        K ^ ((rest.len() as u64) << 56),
    );
    // MurmurHash3's finalizer: every output bit depends on every bit of `h`.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The generation and in-flight slot of a key hash.
fn gen_slot(hash: u64) -> usize {
    (hash as usize) % GEN_SLOTS
}

/// The generation of `hash`'s slot; read it before fetching a value that will be filled.
pub fn generation(hash: u64) -> u64 {
    shared()
        .map(|s| s.gens[gen_slot(hash)].load(Ordering::Acquire))
        .unwrap_or(0)
}

struct Partition {
    header: *mut PartitionHeader,
    index: *mut Slot,
    ring: *mut u8,
    slots: usize,
    ring_bytes: usize,
    lock: *mut pg_sys::LWLock,
}

struct Guard(*mut pg_sys::LWLock);
impl Drop for Guard {
    fn drop(&mut self) {
        unsafe { pg_sys::LWLockRelease(self.0) };
    }
}

fn partition(hash: u64) -> Option<Partition> {
    let shared = shared()?;
    let i = (hash >> 58) as usize % PARTITIONS;
    unsafe {
        let base = PARTS.add(i * PART_BYTES);
        let header = base as *mut PartitionHeader;
        let index = base.add(std::mem::size_of::<PartitionHeader>()) as *mut Slot;
        let slots = shared.index_slots as usize;
        let ring = (index as *mut u8).add(slots * std::mem::size_of::<Slot>());
        Some(Partition {
            header,
            index,
            ring,
            slots,
            ring_bytes: shared.ring_bytes as usize,
            lock: &raw mut (*LOCKS.add(i)).lock,
        })
    }
}

impl Partition {
    fn lock(&self, exclusive: bool) -> Guard {
        let mode = if exclusive {
            pg_sys::LWLockMode::LW_EXCLUSIVE
        } else {
            pg_sys::LWLockMode::LW_SHARED
        };
        unsafe { pg_sys::LWLockAcquire(self.lock, mode) };
        Guard(self.lock)
    }

    // Shared memory, not Rust-owned: exclusivity comes from the partition's LWLock, which
    // every mutating caller holds in exclusive mode.
    #[allow(clippy::mut_from_ref)]
    fn hdr(&self) -> &mut PartitionHeader {
        unsafe { &mut *self.header }
    }

    #[allow(clippy::mut_from_ref)]
    fn slot(&self, i: usize) -> &mut Slot {
        unsafe { &mut *self.index.add(i) }
    }

    fn entry(&self, logical: u64) -> *mut EntryHeader {
        unsafe { self.ring.add((logical % self.ring_bytes as u64) as usize) as *mut EntryHeader }
    }

    fn entry_key(&self, e: *mut EntryHeader) -> &[u8] {
        unsafe { std::slice::from_raw_parts((e as *mut u8).add(HDR), (*e).key_len as usize) }
    }

    fn is_live_offset(&self, off: u64) -> bool {
        off > SLOT_TOMB && off - 2 >= self.hdr().tail && off - 2 < self.hdr().head
    }

    /// Index position of `key`, if present and not dead.
    fn find(&self, key: &[u8], hash: u64) -> Option<usize> {
        let mut i = (hash as usize) % self.slots;
        for _ in 0..self.slots {
            let s = *self.slot(i);
            if s.off == SLOT_EMPTY {
                return None;
            }
            if s.off != SLOT_TOMB && s.hash == hash && self.is_live_offset(s.off) {
                let e = self.entry(s.off - 2);
                if unsafe { (*e).flags } & FLAG_DEAD == 0 && self.entry_key(e) == key {
                    return Some(i);
                }
            }
            i = (i + 1) % self.slots;
        }
        None
    }

    fn kill_slot(&self, i: usize) {
        let s = self.slot(i);
        unsafe { (*self.entry(s.off - 2)).flags |= FLAG_DEAD };
        s.off = SLOT_TOMB;
        let h = self.hdr();
        h.live -= 1;
        h.tombs += 1;
    }

    /// Removes the entry of index slot `i` and keeps the server-wide counters in step.
    fn remove(&self, i: usize, shared: &L1Shared) {
        let total = unsafe { (*self.entry(self.slot(i).off - 2)).total };
        self.kill_slot(i);
        shared.live_entries.fetch_sub(1, Ordering::Relaxed);
        shared.used_bytes.fetch_sub(total as i64, Ordering::Relaxed);
    }

    /// Evicts the oldest entries until `need` bytes fit contiguously at `head`.
    fn make_room(&self, need: usize, shared: &L1Shared) {
        let h = self.hdr();
        let rb = self.ring_bytes as u64;
        let phys = (h.head % rb) as usize;
        if phys + need > self.ring_bytes {
            // Not enough room before the end of the ring: waste the remainder.
            let skip = (self.ring_bytes - phys) as u64;
            self.evict_until(h.head + skip, shared);
            if skip as usize >= HDR {
                let e = self.entry(h.head);
                unsafe {
                    (*e).total = skip as u32;
                    (*e).flags = FLAG_SKIP | FLAG_DEAD;
                }
            }
            h.head += skip;
        }
        self.evict_until(h.head + need as u64, shared);
    }

    /// Advances `tail` until the window [tail, limit) is at most one ring long.
    fn evict_until(&self, limit: u64, shared: &L1Shared) {
        let h = self.hdr();
        let rb = self.ring_bytes as u64;
        while limit - h.tail > rb {
            if h.tail >= h.head {
                // Unreachable while entries are at most a quarter of the ring; never spin.
                h.tail = h.head;
                break;
            }
            let phys = (h.tail % rb) as usize;
            if phys + HDR > self.ring_bytes {
                h.tail += (self.ring_bytes - phys) as u64;
                continue;
            }
            let e = self.entry(h.tail);
            let (total, flags, hash) = unsafe { ((*e).total as u64, (*e).flags, (*e).hash) };
            if flags & FLAG_DEAD == 0 {
                if let Some(i) = self.slot_of(hash, h.tail) {
                    self.remove(i, shared);
                    shared.evictions.fetch_add(1, Ordering::Relaxed);
                }
            }
            h.tail += total.max(ALIGN as u64);
        }
    }

    fn slot_of(&self, hash: u64, logical: u64) -> Option<usize> {
        let mut i = (hash as usize) % self.slots;
        for _ in 0..self.slots {
            let s = *self.slot(i);
            if s.off == SLOT_EMPTY {
                return None;
            }
            if s.off == logical + 2 {
                return Some(i);
            }
            i = (i + 1) % self.slots;
        }
        None
    }

    /// Rebuilds the index from the live entries when tombstones make probes long.
    fn compact_index(&self) {
        let h = self.hdr();
        for i in 0..self.slots {
            *self.slot(i) = Slot {
                hash: 0,
                off: SLOT_EMPTY,
            };
        }
        h.tombs = 0;
        h.live = 0;
        let rb = self.ring_bytes as u64;
        let mut at = h.tail;
        while at < h.head {
            let phys = (at % rb) as usize;
            if phys + HDR > self.ring_bytes {
                at += (self.ring_bytes - phys) as u64;
                continue;
            }
            let e = self.entry(at);
            let (total, flags, hash) = unsafe { ((*e).total as u64, (*e).flags, (*e).hash) };
            if flags & FLAG_DEAD == 0 {
                self.place(hash, at);
            }
            at += total.max(ALIGN as u64);
        }
    }

    fn place(&self, hash: u64, logical: u64) {
        let mut i = (hash as usize) % self.slots;
        loop {
            let s = self.slot(i);
            if s.off == SLOT_EMPTY || s.off == SLOT_TOMB {
                if s.off == SLOT_TOMB {
                    self.hdr().tombs -= 1;
                }
                *s = Slot {
                    hash,
                    off: logical + 2,
                };
                self.hdr().live += 1;
                return;
            }
            i = (i + 1) % self.slots;
        }
    }
}

pub enum L1Value {
    /// A palloc'd copy of the flat jsonb, in the current memory context.
    Value(pg_sys::Datum),
    Negative,
}

/// Looks `key` up; copies the value out under a shared lock. `gen_hash` is the hash of the
/// key whose invalidations reach this entry: `hash` itself, or for a variant its key's.
pub fn get(key: &str, hash: u64, gen_hash: u64) -> Option<L1Value> {
    if in_flight(gen_hash) {
        return None;
    }
    let p = partition(hash)?;
    let _g = p.lock(false);
    let i = p.find(key.as_bytes(), hash)?;
    let e = p.entry(p.slot(i).off - 2);
    unsafe {
        if (*e).expires_ms <= now_ms() {
            return None;
        }
        if (*e).flags & FLAG_VARIANT != 0
            && shared()?.gens[(*e).gen_slot as usize].load(Ordering::Acquire) != (*e).gen
            && !gucs::test_variants_ignore_key()
        {
            return None;
        }
        if (*e).flags & FLAG_NEGATIVE != 0 {
            return Some(L1Value::Negative);
        }
        let len = (*e).val_len as usize;
        let copy = pg_sys::palloc(len) as *mut u8;
        std::ptr::copy_nonoverlapping((e as *const u8).add(HDR + (*e).key_len as usize), copy, len);
        Some(L1Value::Value(pg_sys::Datum::from(copy)))
    }
}

/// Stores `value` (a flat jsonb varlena, or None for "no row") unless the generation of
/// `gen_hash` (see [`get`]) moved since `seen_generation` was read. Returns whether it was
/// stored.
pub fn fill(
    key: &str,
    hash: u64,
    gen_hash: u64,
    seen_generation: u64,
    value: Option<&[u8]>,
    ttl_s: i64,
) -> bool {
    let Some(shared) = shared() else { return false };
    let Some(p) = partition(hash) else {
        return false;
    };
    let val = value.unwrap_or(&[]);
    let total = (HDR + key.len() + val.len()).next_multiple_of(ALIGN);
    if val.len() > gucs::l1_max_value_bytes()
        || total > p.ring_bytes / 4
        || total > u32::MAX as usize
    {
        return false;
    }
    let ttl_ms = ttl_s.min(gucs::l1_max_age_s()).max(1) * 1000;
    // Replay marks are checked outside the lock (it asks the proc array); one set after this
    // check moved the generation, which is checked under the lock.
    if in_flight(gen_hash) {
        return false;
    }
    let _g = p.lock(true);
    let slot = gen_slot(gen_hash);
    if shared.gens[slot].load(Ordering::Acquire) != seen_generation
        || shared.inflight[slot].load(Ordering::Acquire) > 0
    {
        return false;
    }
    if let Some(i) = p.find(key.as_bytes(), hash) {
        p.remove(i, shared);
    }
    p.make_room(total, shared);
    let h = p.hdr();
    if (h.live + h.tombs + 1) * 4 > p.slots as u64 * 3 {
        p.compact_index();
        // Still crowded with live entries: evict the oldest quarter of the ring.
        if (h.live + 1) * 4 > p.slots as u64 * 3 {
            p.evict_until(
                h.head + (p.ring_bytes as u64) * 3 / 4 + total as u64,
                shared,
            );
            p.compact_index();
        }
    }
    let at = h.head;
    let e = p.entry(at);
    unsafe {
        e.write(EntryHeader {
            total: total as u32,
            key_len: key.len() as u32,
            val_len: val.len() as u32,
            flags: if value.is_none() { FLAG_NEGATIVE } else { 0 }
                | if gen_hash != hash { FLAG_VARIANT } else { 0 },
            hash,
            expires_ms: now_ms() + ttl_ms,
            gen_slot: slot as u64,
            gen: seen_generation,
        });
        let body = (e as *mut u8).add(HDR);
        std::ptr::copy_nonoverlapping(key.as_ptr(), body, key.len());
        std::ptr::copy_nonoverlapping(val.as_ptr(), body.add(key.len()), val.len());
    }
    h.head += total as u64;
    p.place(hash, at);
    shared.inserts.fetch_add(1, Ordering::Relaxed);
    shared.live_entries.fetch_add(1, Ordering::Relaxed);
    shared.used_bytes.fetch_add(total as i64, Ordering::Relaxed);
    true
}

/// The right to run the source query for a key of one slot, released on drop (also when an
/// ERROR unwinds through the fetch). A backend killed while holding it leaves its pid behind,
/// which the next backend finds dead and takes over.
pub struct FetchLease {
    slot: usize,
    pid: i32,
}

impl Drop for FetchLease {
    fn drop(&mut self) {
        if let Some(shared) = shared() {
            let _ = shared.fetching[self.slot].compare_exchange(
                self.pid,
                0,
                Ordering::AcqRel,
                Ordering::Acquire,
            );
        }
    }
}

fn process_alive(pid: i32) -> bool {
    extern "C" {
        fn kill(pid: i32, sig: i32) -> i32;
    }
    unsafe { kill(pid, 0) == 0 }
}

/// Takes the fetch lease of `hash`'s slot, or says who holds it (Err(pid)).
pub fn begin_fetch(hash: u64) -> Result<FetchLease, i32> {
    let Some(shared) = shared() else {
        return Err(0);
    };
    let slot = gen_slot(hash);
    let me = unsafe { pg_sys::MyProcPid };
    loop {
        match shared.fetching[slot].compare_exchange(0, me, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return Ok(FetchLease { slot, pid: me }),
            Err(holder) if holder != me && !process_alive(holder) => {
                let _ = shared.fetching[slot].compare_exchange(
                    holder,
                    0,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                );
            }
            Err(holder) => return Err(holder),
        }
    }
}

/// Who holds the fetch lease of `hash`'s slot (0: nobody).
pub fn fetch_holder(hash: u64) -> i32 {
    shared().map_or(0, |s| s.fetching[gen_slot(hash)].load(Ordering::Acquire))
}

/// Whether L1 may be read and filled here as far as the invalidation channel goes. A standby
/// learns of the primary's `invalidate_pattern` and `set` only through the channel (its other
/// invalidations come with the WAL): while a server with a Redis is in recovery and its
/// listener is not subscribed, it uses no L1 (the listener flushes it when it subscribes).
pub fn channel_ok() -> bool {
    let Some(s) = shared() else { return false };
    s.subscribed.load(Ordering::Acquire)
        || !unsafe { pg_sys::RecoveryInProgress() }
        || !gucs::server_has_redis()
}

/// Whether a commit is changing a key of `hash`'s slot right now: on this server (between
/// PRE_COMMIT and the end of COMMIT), or, on a standby, in a transaction whose invalidation
/// was replayed and whose commit was not yet.
pub fn in_flight(hash: u64) -> bool {
    let Some(s) = shared() else { return false };
    if s.inflight[gen_slot(hash)].load(Ordering::Acquire) > 0 {
        return true;
    }
    if s.replay_lost.load(Ordering::Relaxed) {
        return true;
    }
    still_running(&s.replay_xid[gen_slot(hash)])
        || (s.replay_overflow_active.load(Ordering::Acquire)
            && s.replay_overflow.iter().any(still_running))
}

fn still_running(mark: &AtomicU32) -> bool {
    matches!(marks::read_mark(mark), marks::Mark::Running)
}

/// Replay (startup process) of an invalidation by transaction `xid`, read from the WAL before
/// its commit record: `key` leaves L1 now and stays out of play until `xid` ends here.
pub fn replay_invalidation(key: &str, xid: u32) {
    let Some(shared) = shared() else { return };
    let hash = hash_key(key);
    // The startup process is the only writer of marks; readers only clear finished ones.
    let slot = std::slice::from_ref(&shared.replay_xid[gen_slot(hash)]);
    let placed = marks::claim_mark(slot, xid).is_some();
    if shared.replay_overflow_active.load(Ordering::Acquire)
        && !shared.replay_overflow.iter().any(still_running)
    {
        shared
            .replay_overflow_active
            .store(false, Ordering::Release);
    }
    if !placed {
        match marks::claim_mark(&shared.replay_overflow, xid) {
            Some(_) => shared.replay_overflow_active.store(true, Ordering::Release),
            None => shared.replay_lost.store(true, Ordering::Release),
        }
    }
    // After the mark: a fill that read the generation before this is refused, and one that
    // reads it after sees the mark.
    invalidate_hashed(key, hash);
}

/// First half of a commit-time invalidation, at PRE_COMMIT: drops `key` and keeps L1 out of
/// play for it until [`end_invalidation`].
/// Returns the key's hash, for the second half.
pub fn begin_invalidation(key: &str) -> u64 {
    let hash = hash_key(key);
    let Some(shared) = shared() else { return hash };
    shared.inflight[gen_slot(hash)].fetch_add(1, Ordering::AcqRel);
    invalidate_hashed(key, hash);
    hash
}

/// Second half, after the commit is visible (or the transaction aborted); `hash` is what
/// [`begin_invalidation`] returned for the key.
pub fn end_invalidation(hash: u64) {
    let Some(shared) = shared() else { return };
    // Nothing to look up: while the slot's in-flight count is above zero, `fill` refuses the
    // key under the partition lock, so no entry appeared since the first half. A fill that
    // read the generation meanwhile (from a snapshot without this commit) must still be
    // refused once the count drops: the generation moves, under the lock that `fill` checks
    // both under.
    if let Some(p) = partition(hash) {
        let _g = p.lock(true);
        shared.gens[gen_slot(hash)].fetch_add(1, Ordering::AcqRel);
    }
    let slot = &shared.inflight[gen_slot(hash)];
    let _ = slot.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
}

/// Drops `key` and moves its generation, so that fills already in flight are refused.
pub fn invalidate(key: &str) -> bool {
    invalidate_hashed(key, hash_key(key))
}

fn invalidate_hashed(key: &str, hash: u64) -> bool {
    let (Some(shared), Some(p)) = (shared(), partition(hash)) else {
        return false;
    };
    let _g = p.lock(true);
    shared.gens[gen_slot(hash)].fetch_add(1, Ordering::AcqRel);
    shared.invalidations.fetch_add(1, Ordering::Relaxed);
    match p.find(key.as_bytes(), hash) {
        Some(i) => {
            p.remove(i, shared);
            true
        }
        None => false,
    }
}

/// Empties L1 entirely and moves every generation: used when invalidations from other
/// servers may have been missed.
pub fn flush_all() {
    let Some(shared) = shared() else { return };
    for part in 0..PARTITIONS {
        let hash = (part as u64) << 58;
        let Some(p) = partition(hash) else { return };
        let _g = p.lock(true);
        let h = p.hdr();
        h.tail = h.head;
        h.live = 0;
        h.tombs = 0;
        for i in 0..p.slots {
            *p.slot(i) = Slot {
                hash: 0,
                off: SLOT_EMPTY,
            };
        }
    }
    for g in shared.gens.iter() {
        g.fetch_add(1, Ordering::AcqRel);
    }
    shared.live_entries.store(0, Ordering::Relaxed);
    shared.used_bytes.store(0, Ordering::Relaxed);
    shared.flushes.fetch_add(1, Ordering::Relaxed);
}

/// Drops every entry whose key starts with `prefix` and satisfies `keep`; returns how many.
pub fn invalidate_matching(prefix: &str, keep: impl Fn(&str) -> bool) -> i64 {
    let Some(shared) = shared() else { return 0 };
    let mut dropped = 0;
    for part in 0..PARTITIONS {
        let Some(p) = partition((part as u64) << 58) else {
            return dropped;
        };
        let _g = p.lock(true);
        for i in 0..p.slots {
            let s = *p.slot(i);
            if s.off < 2 || !p.is_live_offset(s.off) {
                continue;
            }
            let e = p.entry(s.off - 2);
            if unsafe { (*e).flags } & FLAG_DEAD != 0 {
                continue;
            }
            let key = std::str::from_utf8(p.entry_key(e)).unwrap_or("");
            if key.starts_with(prefix) && keep(key) {
                shared.gens[gen_slot(s.hash)].fetch_add(1, Ordering::AcqRel);
                p.remove(i, shared);
                dropped += 1;
            }
        }
    }
    dropped
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use super::*;
    use pgrx::prelude::*;

    fn value_bytes(v: L1Value) -> Option<Vec<u8>> {
        match v {
            L1Value::Value(d) => unsafe {
                let p = d.cast_mut_ptr::<pg_sys::varlena>();
                Some(std::slice::from_raw_parts(p as *const u8, pgrx::varsize_any(p)).to_vec())
            },
            L1Value::Negative => None,
        }
    }

    /// A flat 4-byte-header varlena holding `body`.
    fn varlena(body: &[u8]) -> Vec<u8> {
        let total = 4 + body.len();
        let mut v = ((total as u32) << 2).to_le_bytes().to_vec();
        v.extend_from_slice(body);
        v
    }

    #[pg_test]
    fn fill_then_hit_returns_the_same_bytes() {
        assert!(available(), "the test cluster preloads twotier");
        let key = "test:db:c:v1:hit";
        let h = hash_key(key);
        let v = varlena(b"{\"a\": 1}");
        assert!(get(key, h, h).is_none());
        assert!(fill(key, h, h, generation(h), Some(&v), 60));
        assert_eq!(get(key, h, h).and_then(value_bytes), Some(v));
        let neg = "test:db:c:v1:none";
        assert!(fill(
            neg,
            hash_key(neg),
            hash_key(neg),
            generation(hash_key(neg)),
            None,
            60
        ));
        assert!(matches!(
            get(neg, hash_key(neg), hash_key(neg)),
            Some(L1Value::Negative)
        ));
    }

    #[pg_test]
    fn a_keys_invalidation_reaches_its_variants_and_no_other_entry() {
        let key = "test:db:c:v1:var";
        let g = hash_key(key);
        let variants = ["test:db:c:v1:var~vu1|", "test:db:c:v1:var~vu2|"];
        for v in variants {
            let h = hash_key(v);
            assert!(fill(v, h, g, generation(g), Some(&varlena(b"old")), 60));
            assert!(get(v, h, g).is_some());
        }
        let other = "test:db:c:v1:other~vu1|";
        let (oh, og) = (hash_key(other), hash_key("test:db:c:v1:other"));
        assert!(fill(
            other,
            oh,
            og,
            generation(og),
            Some(&varlena(b"o")),
            60
        ));
        invalidate(key);
        for v in variants {
            assert!(
                get(v, hash_key(v), g).is_none(),
                "{v} outlived its key's invalidation"
            );
        }
        assert!(get(other, oh, og).is_some());
        // A fill under the key's new generation is a hit again.
        let v = variants[0];
        assert!(fill(
            v,
            hash_key(v),
            g,
            generation(g),
            Some(&varlena(b"new")),
            60
        ));
        assert_eq!(
            get(v, hash_key(v), g).and_then(value_bytes),
            Some(varlena(b"new"))
        );
    }

    #[pg_test]
    fn a_fill_that_raced_an_invalidation_is_refused() {
        let key = "test:db:c:v1:race";
        let h = hash_key(key);
        let seen = generation(h);
        // The writer commits while the reader is fetching.
        invalidate(key);
        assert!(!fill(key, h, h, seen, Some(&varlena(b"old")), 60));
        assert!(get(key, h, h).is_none());
        // A reader that started after the invalidation may fill.
        assert!(fill(key, h, h, generation(h), Some(&varlena(b"new")), 60));
        assert_eq!(get(key, h, h).and_then(value_bytes), Some(varlena(b"new")));
        assert!(invalidate(key));
        assert!(get(key, h, h).is_none());
    }

    #[pg_test]
    fn a_working_set_larger_than_l1_stays_bounded() {
        let s = shared().expect("L1 is available");
        let ring_total = s.ring_bytes * PARTITIONS as u64;
        let body = vec![b'x'; 900];
        let v = varlena(&body);
        let n = (ring_total / 900) as usize * 3;
        let evictions_before = s.evictions.load(Ordering::Relaxed);
        for i in 0..n {
            let key = format!("test:db:big:v1:{i}");
            let h = hash_key(&key);
            fill(&key, h, h, generation(h), Some(&v), 60);
        }
        assert!(s.evictions.load(Ordering::Relaxed) > evictions_before);
        assert!(s.used_bytes.load(Ordering::Relaxed) as u64 <= ring_total);
        // The newest entries are the ones kept.
        let last = format!("test:db:big:v1:{}", n - 1);
        assert!(get(&last, hash_key(&last), hash_key(&last)).is_some());
        let first = "test:db:big:v1:0";
        assert!(get(first, hash_key(first), hash_key(first)).is_none());
    }

    #[pg_test]
    fn pattern_invalidation_only_touches_its_prefix() {
        for k in [
            "test:db:p:v1:user-1",
            "test:db:p:v1:user-2",
            "test:db:q:v1:user-1",
        ] {
            let h = hash_key(k);
            assert!(fill(k, h, h, generation(h), Some(&varlena(b"1")), 60));
        }
        let n = invalidate_matching("test:db:p:v1:", |k| k.ends_with("user-1"));
        assert_eq!(n, 1);
        assert!(get(
            "test:db:p:v1:user-1",
            hash_key("test:db:p:v1:user-1"),
            hash_key("test:db:p:v1:user-1")
        )
        .is_none());
        assert!(get(
            "test:db:p:v1:user-2",
            hash_key("test:db:p:v1:user-2"),
            hash_key("test:db:p:v1:user-2")
        )
        .is_some());
        assert!(get(
            "test:db:q:v1:user-1",
            hash_key("test:db:q:v1:user-1"),
            hash_key("test:db:q:v1:user-1")
        )
        .is_some());
    }
}

#[cfg(test)]
mod hash_tests {
    use super::{gen_slot, hash_key, GEN_SLOTS, PARTITIONS};

    #[test]
    fn keys_that_differ_anywhere_hash_apart() {
        let base = "twotier:00ab.5:widget_config:v1:3f2a";
        let h = hash_key(base);
        assert_eq!(h, hash_key(base), "the same key must hash the same");
        for i in 0..base.len() {
            let mut changed = base.as_bytes().to_vec();
            changed[i] ^= 1;
            assert_ne!(
                h,
                hash_key(std::str::from_utf8(&changed).unwrap()),
                "byte {i}"
            );
        }
        // Lengths across the 8-byte words, and a trailing NUL (the same bytes, zero-padded).
        assert_ne!(hash_key("a"), hash_key("a\0"));
        assert_ne!(hash_key("abcdefgh"), hash_key("abcdefgh\0"));
        assert_ne!(hash_key(""), hash_key("\0"));
    }

    #[test]
    fn tier_keys_spread_over_partitions_and_slots() {
        let n = 200_000;
        let mut parts = vec![0u32; PARTITIONS];
        let mut slots = vec![0u32; GEN_SLOTS];
        for i in 0..n {
            let h = hash_key(&format!(
                "twotier:9f0c1d2e3a4b5c6d.16384:widget_config:v3:{i}"
            ));
            parts[(h >> 58) as usize % PARTITIONS] += 1;
            slots[gen_slot(h)] += 1;
        }
        // Chi-squared over the partitions: 63 degrees of freedom, mean 63, deviation 11.2.
        let mean = n as f64 / PARTITIONS as f64;
        let chi2: f64 = parts
            .iter()
            .map(|c| (*c as f64 - mean).powi(2) / mean)
            .sum();
        assert!(
            chi2 < 63.0 + 4.0 * 11.2,
            "chi-squared {chi2:.1} over {PARTITIONS} partitions: {parts:?}"
        );
        // Poisson with mean 200000 / 65536 = 3.05: e^-3.05 = 4.7 % of the slots stay empty.
        let empty = slots.iter().filter(|c| **c == 0).count() as f64 / GEN_SLOTS as f64;
        assert!(
            (0.040..0.055).contains(&empty),
            "{:.2} % of slots empty",
            empty * 100.0
        );
        assert!(*slots.iter().max().unwrap() <= 16);
    }
}
