//! Replayed-xid marks: a slot of shared memory holding the xid of a transaction whose
//! invalidation a standby replayed before its commit. While that xid runs (its commit is not
//! replayed yet), whatever the mark guards stays out of play. L1's slots and overflow use
//! them.

use pgrx::pg_sys;
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};

/// Whether `xid` is still running as this server sees it: on a standby, whether its commit
/// (or abort) has not been replayed yet.
pub fn xid_running(xid: u32) -> bool {
    unsafe { pg_sys::TransactionIdIsInProgress(pg_sys::TransactionId::from(xid)) }
}

/// A mark holding the xid of a transaction whose invalidation was replayed (0: none).
pub enum Mark {
    Empty,
    Running,
    /// Its commit or abort is replayed (the mark is cleared on the way).
    Ended,
}

/// Reads a mark; one whose xid has ended is cleared on the way, by whoever sees it first.
pub fn read_mark(mark: &AtomicU32) -> Mark {
    let xid = mark.load(SeqCst);
    if xid == 0 {
        Mark::Empty
    } else if xid_running(xid) {
        Mark::Running
    } else {
        let _ = mark.compare_exchange(xid, 0, SeqCst, SeqCst);
        Mark::Ended
    }
}

/// Replay: puts `xid` in a mark of `marks` that is empty, already holds it, or holds an ended
/// xid. Returns what it replaced, or None when every mark holds another running xid.
pub fn claim_mark(marks: &[AtomicU32], xid: u32) -> Option<u32> {
    let free = marks.iter().find(|m| {
        let held = m.load(SeqCst);
        held == 0 || held == xid || !xid_running(held)
    })?;
    Some(free.swap(xid, SeqCst))
}
