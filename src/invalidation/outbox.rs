//! The outbox: invalidations that could not be put in Redis before their commit became visible.
//!
//! A writer marks its keys "in flight" in Redis at PRE_COMMIT. When that fails (Redis down,
//! paused, full, read-only, or this backend resting after a fault) the keys are inserted into
//! `twotier.outbox` in the writer's own transaction: WAL-logged rows that commit or vanish with
//! the data change, survive a crash and reach standbys. A background worker per database
//! delivers them (tombstones and the channel message) and deletes what it delivered.
//!
//! Until they are delivered Redis may hold values older than the database, so L2 is not
//! trusted: per database, a shared-memory state says whether this server may read and fill
//! L2. It is a pair of sequence numbers. Every outbox write bumps `dirty_seq`; L2 is trusted
//! only when `clean_seq == dirty_seq` and no outbox writer is between its PRE_COMMIT and its
//! end (`pending`). `clean_seq` only ever moves to a `dirty_seq` read *before* a check, made
//! with a fresh snapshot while `pending` was zero, found the outbox empty; a write racing with
//! that check bumps `dirty_seq` past it. After a server start every database begins untrusted
//! (`dirty_seq = 1`, `clean_seq = 0`): the state is rebuilt from the table, never assumed.

use crate::error::{InternalError, Raise};
use crate::gucs;
use crate::l2;
use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags,
};
use pgrx::pg_sys::{self, Oid};
use pgrx::prelude::*;
use std::cell::Cell;
use std::sync::atomic::{AtomicI32, AtomicI64, AtomicU32, AtomicU64, Ordering::SeqCst};
use std::time::{Duration, Instant};

const DB_SLOTS: usize = 64;
/// How often a standby's worker looks for outbox rows replicated from the primary: the bound
/// on how long a standby may read L2 after replaying a commit whose invalidation is undelivered.
pub const STANDBY_POLL: Duration = Duration::from_millis(100);
/// How often one backend re-checks an untrusted outbox itself.
const VERIFY_EVERY: Duration = Duration::from_millis(100);
/// A worker that was asked for and has not shown up by then is asked for again.
const WORKER_START_GRACE_MS: i64 = 5_000;
/// A primary's worker leaves once nothing has been undelivered for this long.
const WORKER_IDLE_EXIT: Duration = Duration::from_secs(30);
const BATCH: i64 = 1000;

#[repr(C)]
pub struct DbState {
    db: AtomicU32,
    pending: AtomicU32,
    dirty_seq: AtomicU64,
    clean_seq: AtomicU64,
    worker_pid: AtomicI32,
    worker_requested_ms: AtomicI64,
    rows: AtomicI64,
    recorded: AtomicU64,
    delivered: AtomicU64,
    failures: AtomicU64,
    last_delivery_ms: AtomicI64,
    /// On a standby: transactions whose outbox insert was replayed from the WAL (twotier's
    /// record precedes the commit). L2 is untrusted while one runs, and once it has ended the
    /// worker must look at the table again (its rows are visible only now).
    replay_xids: [AtomicU32; REPLAY_XIDS],
    /// Set when more outbox writers were in replay at once than `replay_xids` holds: L2 is
    /// then never trusted again on this server until a restart.
    replay_lost: std::sync::atomic::AtomicBool,
}

const REPLAY_XIDS: usize = 32;

static mut STATES: *const DbState = std::ptr::null();

pub fn shmem_size() -> usize {
    std::mem::size_of::<DbState>() * DB_SLOTS
}

/// # Safety
/// `ptr` must point at `shmem_size()` bytes of shared memory that outlive the process.
pub unsafe fn attach(ptr: *mut u8, fresh: bool) {
    unsafe {
        if fresh {
            std::ptr::write_bytes(ptr, 0, shmem_size());
            let states = std::slice::from_raw_parts(ptr as *const DbState, DB_SLOTS);
            for s in states {
                s.dirty_seq.store(1, SeqCst);
            }
        }
        STATES = ptr as *const DbState;
    }
}

fn states() -> Option<&'static [DbState]> {
    unsafe { (!STATES.is_null()).then(|| std::slice::from_raw_parts(STATES, DB_SLOTS)) }
}

/// This database's state, claimed on first use. None without shared memory or when more
/// than `DB_SLOTS` databases use twotier: then L2 is simply never trusted there.
fn state_of(db: Oid) -> Option<&'static DbState> {
    let states = states()?;
    let db = db.to_u32();
    if let Some(s) = states.iter().find(|s| s.db.load(SeqCst) == db) {
        return Some(s);
    }
    for s in states {
        if s.db.compare_exchange(0, db, SeqCst, SeqCst).is_ok() {
            return Some(s);
        }
        if s.db.load(SeqCst) == db {
            return Some(s);
        }
    }
    None
}

/// Replay (startup process) of an invalidation that went to the outbox of database `db` in
/// transaction `xid`, read before its commit record.
pub fn replay_outbox_write(db: Oid, xid: u32) {
    let Some(st) = state_of(db) else { return };
    st.dirty_seq.fetch_add(1, SeqCst);
    match crate::l1::marks::claim_mark(&st.replay_xids, xid) {
        // Overwrote an ended one nobody had noticed yet: its rows still need a look.
        Some(finished) if finished != 0 && finished != xid => {
            st.dirty_seq.fetch_add(1, SeqCst);
        }
        Some(_) => {}
        None => st.replay_lost.store(true, SeqCst),
    }
}

fn my_state() -> Option<&'static DbState> {
    // A backend stays in one database: find its slot once.
    if let Some(st) = MINE.with(|m| m.get()) {
        return Some(st);
    }
    let st = state_of(unsafe { pg_sys::MyDatabaseId })?;
    MINE.with(|m| m.set(Some(st)));
    Some(st)
}

thread_local! {
    static INSERT_PLAN: Cell<Option<pg_sys::SPIPlanPtr>> = const { Cell::new(None) };
    static MINE: Cell<Option<&'static DbState>> = const { Cell::new(None) };
    static HOLDING: Cell<Option<&'static DbState>> = const { Cell::new(None) };
    static LAST_VERIFY: Cell<Option<Instant>> = const { Cell::new(None) };
}

fn in_recovery() -> bool {
    unsafe { pg_sys::RecoveryInProgress() }
}

fn worker_running(st: &DbState) -> bool {
    st.worker_pid.load(SeqCst) != 0
}

/// The state's sequence number if nothing is undelivered: no outbox writer in progress and
/// every outbox write seen delivered.
fn clean_seq(st: &DbState) -> Option<u64> {
    if st.replay_lost.load(SeqCst) {
        return None;
    }
    for mark in &st.replay_xids {
        match crate::l1::marks::read_mark(mark) {
            crate::l1::marks::Mark::Empty => continue,
            crate::l1::marks::Mark::Running => return None,
            // Its commit (or abort) is replayed: whoever sees that first makes the state dirty
            // again, so that the worker re-reads the table, now with those rows in it.
            crate::l1::marks::Mark::Ended { cleared_here } => {
                if cleared_here {
                    st.dirty_seq.fetch_add(1, SeqCst);
                }
                return None;
            }
        }
    }
    let seq = st.dirty_seq.load(SeqCst);
    (st.pending.load(SeqCst) == 0 && st.clean_seq.load(SeqCst) == seq).then_some(seq)
}

/// Whether this backend may read and fill L2 now; the sequence number to pass to
/// [`still_trusted`] before a fill.
pub fn l2_trust() -> Option<u64> {
    let st = my_state()?;
    // A standby learns of new outbox rows only from its worker's polling.
    let watched = !in_recovery() || worker_running(st);
    if let (Some(seq), true) = (clean_seq(st), watched) {
        return Some(seq);
    }
    if !watched {
        ensure_worker(st);
    }
    if clean_seq(st).is_none() {
        verify(st);
    }
    clean_seq(st).filter(|_| watched)
}

/// A fill may follow a read made under `seq` only if nothing was put in the outbox since.
pub fn still_trusted(seq: u64) -> bool {
    my_state().and_then(clean_seq) == Some(seq)
}

/// Checks the table itself, at most every `VERIFY_EVERY` per backend: after a server start,
/// or when the worker emptied the outbox a moment ago, this is what trusts L2 again.
fn verify(st: &DbState) {
    let due = LAST_VERIFY.with(|l| l.get().is_none_or(|t| t.elapsed() >= VERIFY_EVERY));
    if !due {
        return;
    }
    LAST_VERIFY.with(|l| l.set(Some(Instant::now())));
    let seq = st.dirty_seq.load(SeqCst);
    if st.pending.load(SeqCst) != 0 {
        return;
    }
    match backlog(false) {
        Some(0) => {
            st.clean_seq.fetch_max(seq, SeqCst);
            st.rows.store(0, SeqCst);
        }
        Some(n) => {
            st.rows.store(n, SeqCst);
            ensure_worker(st);
        }
        None => {}
    }
}

/// Rows in this database's outbox (with `all` false at most one is counted: only emptiness
/// matters), read with the latest snapshot as the extension's owner. None without the table.
fn backlog(all: bool) -> Option<i64> {
    let exists = unsafe {
        let schema = pg_sys::get_namespace_oid(c"twotier".as_ptr(), true);
        schema != Oid::INVALID
            && pg_sys::get_relname_relid(c"outbox".as_ptr(), schema) != Oid::INVALID
    };
    if !exists {
        return None;
    }
    as_outbox_owner(|| {
        let sql = if all {
            c"SELECT count(*) FROM twotier.outbox"
        } else {
            c"SELECT count(*) FROM (SELECT FROM twotier.outbox LIMIT 1) AS any_row"
        };
        crate::spi::query_latest(sql, &[])
            .first()
            .and_then(|r| r.first().cloned().flatten())
            .and_then(|n| n.parse().ok())
    })
}

fn as_outbox_owner<R>(f: impl FnOnce() -> R) -> R {
    // The outbox holds keys of every cache: no caller reads or writes it with their own rights.
    crate::spi::as_owner(
        Oid::from(pg_sys::BOOTSTRAP_SUPERUSERID),
        c"pg_catalog, pg_temp",
        f,
    )
}

/// PRE_COMMIT of a writer whose keys could not be marked in Redis: they go into the outbox in
/// this transaction, and L2 stops being trusted on this server before the commit is visible.
pub fn record(keys: &[(String, i64)]) {
    let Some(st) = my_state() else {
        // No shared state: this server never trusts L2 (see l2_trust), but the keys must
        // still reach the Redis other servers read.
        insert(keys);
        return;
    };
    if HOLDING.with(|h| h.get().is_none()) {
        st.pending.fetch_add(1, SeqCst);
        HOLDING.with(|h| h.set(Some(st)));
    }
    st.dirty_seq.fetch_add(1, SeqCst);
    insert(keys);
    st.recorded.fetch_add(keys.len() as u64, SeqCst);
    ensure_worker(st);
}

fn insert(keys: &[(String, i64)]) {
    let names: Vec<&str> = keys.iter().map(|(k, _)| k.as_str()).collect();
    let ttls: Vec<i32> = keys
        .iter()
        .map(|(_, t)| (*t).clamp(1, i32::MAX as i64) as i32)
        .collect();
    as_outbox_owner(|| unsafe {
        pg_sys::SPI_connect();
        // Prepared once per backend: with Redis down every writer's commit runs it.
        let plan = INSERT_PLAN.with(|p| match p.get() {
            Some(plan) => plan,
            None => {
                let mut types = [pg_sys::TEXTARRAYOID, pg_sys::INT4ARRAYOID];
                let plan = pg_sys::SPI_prepare(
                    c"INSERT INTO twotier.outbox (key, ttl_s) SELECT * FROM unnest($1, $2)"
                        .as_ptr(),
                    2,
                    types.as_mut_ptr(),
                );
                if plan.is_null() {
                    InternalError::Spi {
                        what: "preparing the outbox insert",
                        code: pg_sys::SPI_result,
                    }
                    .raise();
                }
                pg_sys::SPI_keepplan(plan);
                p.set(Some(plan));
                plan
            }
        });
        let mut values = [
            names.into_datum().unwrap_or(pg_sys::Datum::from(0)),
            ttls.into_datum().unwrap_or(pg_sys::Datum::from(0)),
        ];
        let nulls = [b' ' as std::ffi::c_char, b' ' as std::ffi::c_char, 0];
        // PRE_COMMIT runs after the last statement's snapshot is gone; SPI needs one.
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
        let rc = pg_sys::SPI_execute_plan(plan, values.as_mut_ptr(), nulls.as_ptr(), false, 0);
        pg_sys::PopActiveSnapshot();
        pg_sys::SPI_finish();
        if rc != pg_sys::SPI_OK_INSERT as i32 {
            InternalError::Spi {
                what: "recording invalidations in twotier.outbox",
                code: rc,
            }
            .raise();
        }
    });
}

/// End of a transaction (COMMIT or ABORT callback): never fails.
pub fn end_transaction() {
    if let Some(st) = HOLDING.with(|h| h.take()) {
        st.pending.fetch_sub(1, SeqCst);
    }
}

fn ensure_worker(st: &DbState) {
    if worker_running(st) || unsafe { pg_sys::MyBackendType } != pg_sys::BackendType::B_BACKEND {
        return;
    }
    let now = crate::l1::now_ms();
    let asked = st.worker_requested_ms.load(SeqCst);
    if now - asked < WORKER_START_GRACE_MS
        || st
            .worker_requested_ms
            .compare_exchange(asked, now, SeqCst, SeqCst)
            .is_err()
    {
        return;
    }
    let db = unsafe { pg_sys::MyDatabaseId };
    let started = BackgroundWorkerBuilder::new(&format!("twotier outbox {}", db.to_u32()))
        .set_type("twotier outbox")
        .set_library("twotier")
        .set_function("twotier_outbox_main")
        .set_argument(Some(pg_sys::Datum::from(db.to_u32())))
        .enable_spi_access()
        // A standby needs its worker too: the default would wait for the end of recovery.
        .set_start_time(BgWorkerStartTime::ConsistentState)
        .set_restart_time(None)
        .set_notify_pid(0)
        .load_dynamic();
    if started.is_err() {
        st.worker_requested_ms.store(0, SeqCst);
        pgrx::warning!(
            "twotier: could not start the outbox worker (max_worker_processes?); L2 stays unused until it runs"
        );
    }
}

/// What `twotier.status()` shows about the outbox of this database.
pub fn status() -> serde_json::Value {
    // Asked as a cache call would ask: after a restart this is what checks the table (and
    // starts the worker a standby needs) rather than reporting a state nobody refreshed.
    if !gucs::redis_url().is_empty() {
        l2_trust();
    }
    let rows = backlog(true);
    let Some(st) = my_state() else {
        return serde_json::json!({
            "available": false,
            "rows": rows,
            "l2_trusted": false,
        });
    };
    let pid = st.worker_pid.load(SeqCst);
    let trusted = clean_seq(st).is_some();
    let last = st.last_delivery_ms.load(SeqCst);
    serde_json::json!({
        "available": true,
        "rows": rows,
        "l2_trusted": trusted && (!in_recovery() || pid != 0),
        "writers_in_flight": st.pending.load(SeqCst),
        "recorded": st.recorded.load(SeqCst),
        "delivered": st.delivered.load(SeqCst),
        "delivery_failures": st.failures.load(SeqCst),
        "last_delivery_epoch_ms": (last != 0).then_some(last),
        "worker_pid": (pid != 0).then_some(pid),
    })
}

unsafe extern "C-unwind" fn on_worker_exit(_code: i32, arg: pg_sys::Datum) {
    if let Some(st) = state_of(Oid::from(arg.value() as u32)) {
        let me = unsafe { pg_sys::MyProcPid };
        let _ = st.worker_pid.compare_exchange(me, 0, SeqCst, SeqCst);
        st.worker_requested_ms.store(0, SeqCst);
    }
}

type Row = (i64, String, i64);

/// Up to `BATCH` rows with an id above `after`, oldest first.
fn read_batch(after: i64) -> Vec<Row> {
    BackgroundWorker::transaction(|| {
        Spi::connect(|client| {
            let table = client.select(
                "SELECT id, key, ttl_s::int8 FROM twotier.outbox WHERE id > $1 ORDER BY id LIMIT $2",
                None,
                &[after.into(), BATCH.into()],
            )?;
            let mut rows = Vec::new();
            for row in table {
                rows.push((
                    row.get::<i64>(1)?.unwrap_or(0),
                    row.get::<String>(2)?.unwrap_or_default(),
                    row.get::<i64>(3)?.unwrap_or(1),
                ));
            }
            Ok::<_, pgrx::spi::Error>(rows)
        })
        .unwrap_or_default()
    })
}

fn delete(ids: Vec<i64>) {
    BackgroundWorker::transaction(|| {
        Spi::run_with_args(
            "DELETE FROM twotier.outbox WHERE id = ANY ($1)",
            &[ids.into()],
        )
        .unwrap_or_else(|_| {
            InternalError::Spi {
                what: "deleting delivered rows of twotier.outbox",
                code: 0,
            }
            .raise()
        });
    });
}

/// # Safety
/// Entry point called by the postmaster for a dynamic worker registered by `ensure_worker`.
#[no_mangle]
#[pg_guard]
pub unsafe extern "C-unwind" fn twotier_outbox_main(arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let db = Oid::from(arg.value() as u32);
    let Some(st) = state_of(db) else { return };
    let me = unsafe { pg_sys::MyProcPid };
    if st
        .worker_pid
        .compare_exchange(0, me, SeqCst, SeqCst)
        .is_err()
    {
        return;
    }
    unsafe { pg_sys::before_shmem_exit(Some(on_worker_exit), arg) };
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(db), None);
    let mut backoff = Duration::from_millis(50);
    let mut idle_since = Instant::now();
    let mut seen = std::collections::HashSet::new();
    while !crate::invalidation::listener::stopping() {
        if BackgroundWorker::sighup_received() {
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        let seq = st.dirty_seq.load(SeqCst);
        let writers = st.pending.load(SeqCst);
        let mut rows = read_batch(0);
        if in_recovery() {
            // A standby must see every row (it only reads), not just the oldest batch.
            while rows.len() < 100 * BATCH as usize {
                let Some(&(last, _, _)) = rows.last() else {
                    break;
                };
                let more = read_batch(last);
                if more.is_empty() {
                    break;
                }
                rows.extend(more);
            }
        }
        let pause = if rows.is_empty() {
            seen.clear();
            st.rows.store(0, SeqCst);
            if writers == 0 {
                st.clean_seq.fetch_max(seq, SeqCst);
            }
            if !in_recovery() && idle_since.elapsed() >= WORKER_IDLE_EXIT {
                break;
            }
            if in_recovery() {
                STANDBY_POLL
            } else {
                Duration::from_millis(100)
            }
        } else if in_recovery() {
            // The primary delivers these; a standby keeps L2 out of use meanwhile, and drops
            // the keys from its own L1 now: the channel message that would do it may be as
            // far away as the Redis that refused the marker.
            st.rows.store(rows.len() as i64, SeqCst);
            if st.clean_seq.load(SeqCst) == st.dirty_seq.load(SeqCst) {
                st.dirty_seq.fetch_add(1, SeqCst);
            }
            for (id, key, _) in &rows {
                if seen.insert(*id) {
                    crate::l1::invalidate(key);
                }
            }
            idle_since = Instant::now();
            STANDBY_POLL
        } else {
            st.rows.store(rows.len() as i64, SeqCst);
            idle_since = Instant::now();
            let batch: Vec<(String, i64)> = rows.iter().map(|(_, k, t)| (k.clone(), *t)).collect();
            let lsn = unsafe { pg_sys::GetXLogInsertRecPtr() };
            match l2::deliver_outbox(&batch, lsn) {
                Ok(()) => {
                    delete(rows.iter().map(|(id, _, _)| *id).collect());
                    st.delivered.fetch_add(rows.len() as u64, SeqCst);
                    st.last_delivery_ms.store(crate::l1::now_ms(), SeqCst);
                    backoff = Duration::from_millis(50);
                    Duration::ZERO
                }
                Err(_) => {
                    st.failures.fetch_add(1, SeqCst);
                    backoff =
                        (backoff * 2).min(gucs::retry_interval().max(Duration::from_millis(100)));
                    backoff
                }
            }
        };
        if !pause.is_zero() && !crate::invalidation::listener::wait(pause) {
            break;
        }
    }
}
