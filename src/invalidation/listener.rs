//! The L1 listener: one background worker per server, subscribed to the Redis channel on
//! which every server sharing the Redis publishes the keys its commits invalidated. It drops
//! them from this server's L1. It needs no database connection: L1 keys carry the database.
//!
//! A server whose subscription breaks cannot know what it missed, so the worker flushes L1
//! when the channel is lost and again when it is back. On a standby an invalidation is
//! applied only once WAL replay has passed the writer's commit, so that a reader on the
//! standby cannot refill L1 from a snapshot that does not contain the change yet.

use crate::gucs;
use crate::l1;
use crate::l2::channel;
use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags,
};
use pgrx::pg_sys;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// How long the subscription may stay silent before the listener checks it with a PING.
const PING_EVERY: Duration = Duration::from_secs(1);

pub fn register() {
    BackgroundWorkerBuilder::new("twotier L1 listener")
        .set_type("twotier listener")
        .set_library("twotier")
        .set_function("twotier_l1_listener_main")
        .enable_shmem_access(None)
        .set_start_time(BgWorkerStartTime::PostmasterStart)
        .set_restart_time(Some(Duration::from_secs(1)))
        .load();
}

static STOPPING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether this background worker was told to stop. pgrx's `sigterm_received` clears its flag
/// when read, and its `wait_latch` reads it: a SIGTERM seen in one nested wait would be lost
/// to the loops around it, so it is latched here. Both workers use only these two.
pub fn stopping() -> bool {
    if BackgroundWorker::sigterm_received() {
        STOPPING.store(true, Ordering::Relaxed);
    }
    STOPPING.load(Ordering::Relaxed)
}

/// Waits on the latch up to `timeout`; false when the worker must stop (SIGTERM, or the
/// postmaster is gone).
pub fn wait(timeout: Duration) -> bool {
    if !BackgroundWorker::wait_latch(Some(timeout)) {
        STOPPING.store(true, Ordering::Relaxed);
    }
    !stopping()
}

/// Sleeps `timeout` whatever the latch says, in steps short enough to see a SIGTERM; false
/// when the worker must stop. The delivery worker's pause after Redis refused a batch: every
/// COMMIT sets its latch, and a latch wait would turn that pause into a retry per commit (and
/// a wake-up signal from each writer).
pub fn sleep(timeout: Duration) -> bool {
    const STEP: Duration = Duration::from_millis(100);
    let end = Instant::now() + timeout;
    while !stopping() {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return true;
        }
        let events = (pg_sys::WL_TIMEOUT | pg_sys::WL_POSTMASTER_DEATH) as i32;
        // Without WL_LATCH_SET the latch is not waited on: setting it wakes nobody.
        let rc = unsafe {
            pg_sys::WaitLatch(
                std::ptr::null_mut(),
                events,
                left.min(STEP).as_millis().max(1) as std::ffi::c_long,
                pg_sys::PG_WAIT_EXTENSION,
            )
        };
        if rc & pg_sys::WL_POSTMASTER_DEATH as i32 != 0 {
            STOPPING.store(true, Ordering::Relaxed);
        }
    }
    false
}

fn wait_for_replay(lsn: u64) {
    if !unsafe { pg_sys::RecoveryInProgress() } {
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while unsafe { pg_sys::GetXLogReplayRecPtr(std::ptr::null_mut()) } < lsn
        && Instant::now() < deadline
    {
        if !wait(Duration::from_millis(1)) {
            return;
        }
    }
}

fn apply(payload: &str) {
    // This server's own commits invalidated its L1 themselves, before the message was sent.
    if channel::head(payload).1 == channel::origin() {
        return;
    }
    let (lsn, _, keys) = channel::decode(payload);
    wait_for_replay(lsn);
    for key in keys {
        l1::invalidate(key);
    }
}

fn set_subscribed(shared: &l1::L1Shared, on: bool) {
    let was = shared.subscribed.swap(on, Ordering::AcqRel);
    if was != on {
        // Either way L1 may hold entries whose invalidation went by unseen.
        l1::flush_all();
        if on {
            shared
                .subscribed_since_ms
                .store(l1::now_ms(), Ordering::Relaxed);
            pgrx::log!(
                "twotier listener: subscribed to {}; L1 flushed",
                channel::channel()
            );
        } else {
            shared.subscription_losses.fetch_add(1, Ordering::Relaxed);
            shared
                .subscribed_since_ms
                .store(l1::now_ms(), Ordering::Relaxed);
            pgrx::log!("twotier listener: lost the invalidation channel; L1 flushed");
        }
    }
}

/// Listens until the subscription fails or the worker is told to stop. `Ok` means stop.
fn listen(shared: &l1::L1Shared, url: &str) -> Result<(), String> {
    // The same client as every backend's: the password file and the TLS settings apply.
    let client = crate::l2::client_for(url).map_err(|e| e.to_string())?;
    let mut con = client
        .get_connection_with_timeout(gucs::connect_timeout())
        .map_err(|e| e.to_string())?;
    let mut pubsub = con.as_pubsub();
    pubsub
        .subscribe(channel::channel())
        .map_err(|e| e.to_string())?;
    pubsub
        .set_read_timeout(Some(Duration::from_millis(250)))
        .map_err(|e| e.to_string())?;
    set_subscribed(shared, true);
    let mut last_heard = Instant::now();
    loop {
        if stopping() {
            return Ok(());
        }
        if BackgroundWorker::sighup_received() {
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
            if !gucs::redis_seeds().iter().any(|seed| seed == url) {
                return Err("twotier.redis_url changed".into());
            }
        }
        match pubsub.get_message() {
            Ok(msg) => {
                last_heard = Instant::now();
                shared.messages.fetch_add(1, Ordering::Relaxed);
                apply(&String::from_utf8_lossy(msg.get_payload_bytes()));
            }
            Err(e) if e.is_timeout() || crate::l2::interrupted(&e) => {
                // A quiet channel and a dead one (Redis paused, a network gone silent) read
                // the same: after a quiet second, ask. No answer within the read timeout is
                // a lost subscription.
                if last_heard.elapsed() >= PING_EVERY {
                    pubsub
                        .ping::<redis::Value>()
                        .map_err(|e| format!("no answer to PING on the subscription: {e}"))?;
                    last_heard = Instant::now();
                }
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// # Safety
/// Entry point called by the postmaster for the registered background worker.
#[no_mangle]
#[pgrx::pg_guard]
pub unsafe extern "C-unwind" fn twotier_l1_listener_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let Some(shared) = l1::shared() else { return };
    shared
        .worker_pid
        .store(unsafe { pg_sys::MyProcPid }, Ordering::Relaxed);
    // A listener that crashed or was terminated missed whatever was published meanwhile: its
    // successor starts like a lost subscription (at server start L1 is empty: nothing to lose).
    if shared.subscribed.swap(false, Ordering::AcqRel)
        || shared.live_entries.load(Ordering::Relaxed) > 0
    {
        l1::flush_all();
        shared.subscription_losses.fetch_add(1, Ordering::Relaxed);
        pgrx::log!("twotier listener: started after an earlier listener ended; L1 flushed");
    }
    let mut last_error: Option<String> = None;
    // A cluster's seeds in turn: a message PUBLISHed on any node reaches every node's
    // subscribers, so one node at a time is enough, and the next one when it fails.
    let mut attempt = 0usize;
    while !stopping() {
        if BackgroundWorker::sighup_received() {
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        let seeds = gucs::redis_seeds();
        if !seeds.is_empty() {
            let url = &seeds[attempt % seeds.len()];
            attempt = attempt.wrapping_add(1);
            match listen(shared, url) {
                Ok(()) => break,
                Err(e) => {
                    set_subscribed(shared, false);
                    if last_error.as_deref() != Some(e.as_str()) {
                        pgrx::log!("twotier listener: {}: {e}", gucs::redacted_url(url));
                        last_error = Some(e);
                    }
                }
            }
        }
        let pause =
            gucs::retry_interval().clamp(Duration::from_millis(100), Duration::from_secs(5));
        if !wait(pause) {
            break;
        }
    }
    set_subscribed(shared, false);
    shared.worker_pid.store(0, Ordering::Relaxed);
    // Exit code 1: the postmaster starts a new listener after the restart interval (code 0
    // would unregister it for good, so pg_terminate_backend would leave the server deaf).
    // At shutdown nothing is restarted either way.
    unsafe { pg_sys::proc_exit(1) };
}
