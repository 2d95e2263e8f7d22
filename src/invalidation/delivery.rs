//! The delivery worker: one per primary, the only process that sends invalidations to Redis.
//! Writers leave their keys in the ledger at PRE_COMMIT, mark them ready and wake it at COMMIT
//! (once the commit is visible); it takes every ready key, sends the tombstones and the channel message in one
//! pipelined exchange per batch, and only after Redis acknowledged removes them from the
//! ledger and writes a DELIVERED record for standbys. While Redis is down, paused or full,
//! keys wait in the ledger (and L2 is not used for them), and the worker retries with a
//! growing pause. It needs no database connection: tier keys carry their database.

use crate::gucs;
use crate::invalidation::{ledger, listener};
use crate::l2;
use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags,
};
use pgrx::pg_sys;
use std::time::{Duration, Instant};

const BATCH: usize = 1000;
/// How often the worker looks whether the ledger must go to its file, and how often an idle
/// primary tells standbys where delivery stands.
const SAVE_EVERY: Duration = Duration::from_secs(1);
const RECORD_EVERY: Duration = Duration::from_secs(1);
/// At most one DELIVERED record per this while batches follow each other (each is a WAL
/// insert and a flush for the WAL writer); the last one of a burst is always written.
const RECORD_AFTER_BATCH: Duration = Duration::from_millis(10);
/// After an exchange, commits gather this long before the next: under load, batches of many
/// keys instead of one exchange per commit; idle, the first commit goes out at once.
const GATHER: Duration = Duration::from_millis(2);

/// How often the worker reads a Redis Cluster's map afresh (and after every failed exchange):
/// a failover takes seconds (the node timeout and an election), so the map it leaves behind is
/// seen within one of these.
const MAP_CHECK_EVERY: Duration = Duration::from_millis(500);

/// On a Redis Cluster: if the map is not the one the L2 epoch carries, move the epoch to it.
/// A map that cannot be read (a master down, no seed answering) moves nothing: readers are
/// refused by the same test until it can.
fn check_map() {
    if let Ok(Some(fingerprint)) = l2::cluster_fingerprint() {
        if fingerprint != ledger::epoch() as u32 {
            ledger::move_epoch_to_map(fingerprint);
        }
    }
}

pub fn register() {
    BackgroundWorkerBuilder::new("twotier delivery")
        .set_type("twotier delivery")
        .set_library("twotier")
        .set_function("twotier_delivery_main")
        .enable_shmem_access(None)
        // A standby delivers nothing: its primary does. After a promotion it starts.
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(Duration::from_secs(1)))
        .load();
}

unsafe extern "C-unwind" fn on_exit(_code: i32, _arg: pg_sys::Datum) {
    ledger::unregister_worker();
}

/// # Safety
/// Entry point called by the postmaster for the worker registered by [`register`].
#[no_mangle]
#[pgrx::pg_guard]
pub unsafe extern "C-unwind" fn twotier_delivery_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    if !ledger::available() {
        return;
    }
    unsafe {
        ledger::register_worker(pg_sys::MyLatch);
        pg_sys::before_shmem_exit(Some(on_exit), pg_sys::Datum::from(0));
    }
    let mut backoff = Duration::from_millis(50);
    let mut saved_x = 0u64;
    let mut last_save = Instant::now();
    let mut last_record = Instant::now();
    let mut record_end = 0u64;
    let mut record_owed = false;
    let mut last_exchange: Option<Instant> = None;
    let mut last_map_check = Instant::now() - MAP_CHECK_EVERY;
    // After a refused batch: no new attempt before this, however many commits wake the worker.
    let mut retry_at: Option<Instant> = None;
    while !listener::stopping() {
        if BackgroundWorker::sighup_received() {
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        let has_redis = !gucs::redis_url().is_empty();
        if has_redis {
            ledger::settle_start();
        }
        if has_redis && gucs::redis_cluster() && last_map_check.elapsed() >= MAP_CHECK_EVERY {
            check_map();
            last_map_check = Instant::now();
        }
        if let Some(left) = last_exchange.and_then(|t| GATHER.checked_sub(t.elapsed())) {
            // Not a latch wait: every commit sets the latch, which would end it at once.
            unsafe { pg_sys::pg_usleep(left.as_micros() as std::ffi::c_long) };
        }
        let resting = retry_at.is_some_and(|at| Instant::now() < at);
        let batch = if resting {
            ledger::Batch::default()
        } else {
            ledger::take_batch(BATCH)
        };
        let mut pause = if let Some(at) = retry_at.filter(|_| resting) {
            at.saturating_duration_since(Instant::now())
        } else if ledger::undelivered() > 0 {
            // Keys of transactions still running (or Redis refusing): look again soon.
            Duration::from_millis(10)
        } else {
            Duration::from_secs(1)
        };
        if !batch.deliver.is_empty() {
            let keys: Vec<&str> = batch.deliver.iter().map(|(_, k, _)| k.as_str()).collect();
            let lsn = unsafe { pg_sys::GetXLogInsertRecPtr() };
            // The worker has no session: its redis_url is postgresql.conf's.
            let sent = if has_redis {
                l2::deliver_batch(&keys, lsn)
            } else {
                // No Redis to deliver to. A Redis configured later may hold values these keys
                // made old: L2 moves to a new epoch before anyone reads it again.
                ledger::forget_undelivered();
                Ok(())
            };
            last_exchange = Some(Instant::now());
            match sent {
                Ok(()) => {
                    retry_at = None;
                    ledger::settle(&batch, true);
                    record_owed = true;
                    backoff = Duration::from_millis(50);
                    pause = Duration::ZERO;
                }
                Err(_) => {
                    ledger::settle(&batch, false);
                    // A master gone or a slot moved: see whether the map changed at once.
                    last_map_check = Instant::now() - MAP_CHECK_EVERY;
                    pause = backoff;
                    retry_at = Some(Instant::now() + backoff);
                    backoff =
                        (backoff * 2).min(gucs::retry_interval().max(Duration::from_millis(100)));
                }
            }
        }
        if record_owed && (last_record.elapsed() >= RECORD_AFTER_BATCH || !pause.is_zero()) {
            record_end = ledger::log_progress();
            last_record = Instant::now();
            record_owed = false;
        } else if batch.deliver.is_empty()
            && last_record.elapsed() >= RECORD_EVERY
            && unsafe { pg_sys::GetXLogInsertRecPtr() } != record_end
        {
            // Idle, but other WAL went by: a standby that restarts from a later point learns
            // from this that nothing before it is undelivered.
            if ledger::delivered_up_to() != ledger::last_x() || ledger::undelivered() == 0 {
                record_end = ledger::log_progress();
            }
            last_record = Instant::now();
        }
        // Crash recovery replays every record after the last checkpoint's redo point, so the
        // file is needed only for what is older: it is written when a checkpoint has begun
        // since the last write (a few times an hour, not every second of a long outage with a
        // ledger of hundreds of thousands of keys).
        if last_save.elapsed() >= SAVE_EVERY && unsafe { pg_sys::GetRedoRecPtr() } > saved_x {
            if let Some(x) = ledger::save_file(false) {
                saved_x = x;
            }
            last_save = Instant::now();
        }
        let rest = if retry_at.is_some_and(|at| Instant::now() < at) {
            listener::sleep(pause.min(MAP_CHECK_EVERY))
        } else {
            pause.is_zero() || listener::wait(pause.min(SAVE_EVERY))
        };
        if !rest {
            break;
        }
    }
    ledger::save_file(false);
}
