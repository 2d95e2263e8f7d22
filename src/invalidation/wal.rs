//! Invalidations in the WAL, for streaming standbys: a custom resource manager
//! (`RegisterCustomRmgr`, PostgreSQL 15+) whose record a committing writer inserts at
//! PRE_COMMIT, before its commit record. A standby's startup process replays it first, and
//! drops the keys from the standby's L1 and keeps them out of play there (no L1 read or fill,
//! no L2 read) until it replays the writer's commit. So a standby's cache is never older than
//! the standby's own tables, whatever Redis and the invalidation channel do.
//!
//! The same records rebuild the ledger (`ledger.rs`): crash recovery and standbys replay each
//! writer's keys into it, and the delivery worker's DELIVERED record ("every key before this
//! position has reached Redis, in this epoch") takes them out again on standbys.
//!
//! The id is PostgreSQL's experimental one (128) until a production id is reserved on the
//! wiki page "CustomWALResourceManagers" (see docs/design.md).

use crate::gucs;
use crate::invalidation::ledger;
use crate::l1;
use pgrx::pg_sys;
use std::ffi::c_char;

const RM_ID: u8 = pg_sys::RM_EXPERIMENTAL_ID as u8;
const XLOG_TWOTIER_INVALIDATE: u8 = 0x00;
const XLOG_TWOTIER_DELIVERED: u8 = 0x10;

/// Registered only while shared_preload_libraries is processed (PostgreSQL refuses it
/// otherwise), so a server that replays these records always has the redo function.
pub fn init() {
    unsafe {
        if !pg_sys::process_shared_preload_libraries_in_progress {
            return;
        }
        static mut RMGR: pg_sys::RmgrData = pg_sys::RmgrData {
            rm_name: c"twotier".as_ptr(),
            rm_redo: Some(redo),
            rm_desc: Some(desc),
            rm_identify: Some(identify),
            rm_startup: Some(startup),
            rm_cleanup: None,
            rm_mask: None,
            rm_decode: None,
        };
        pg_sys::RegisterCustomRmgr(RM_ID, &raw mut RMGR);
    }
}

/// Flag of 0.2.0's records: the keys went to the outbox table (which 0.3.0 no longer has).
const FLAG_OUTBOX: u32 = 1;
const HEADER: usize = 12;

/// The record: flags (u32), database OID (u32), the number of keys (u32), then each key as
/// length (u32) and bytes. The keys are tier keys (they carry the system identifier and
/// database OID, so a record can only match the entries it was written for).
fn encode<'a>(flags: u32, db: u32, keys: impl Iterator<Item = &'a str>) -> Vec<u8> {
    // Room for a few tier keys up front: one growth step costs more than the copy.
    let mut out = Vec::with_capacity(256);
    out.resize(HEADER, 0u8);
    let mut n = 0u32;
    for k in keys {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(k.as_bytes());
        n += 1;
    }
    out[..4].copy_from_slice(&flags.to_le_bytes());
    out[4..8].copy_from_slice(&db.to_le_bytes());
    out[8..12].copy_from_slice(&n.to_le_bytes());
    out
}

/// (flags, database OID, keys) of a record.
fn decode(data: &[u8]) -> (u32, u32, Vec<&str>) {
    let take = |at: usize| -> Option<u32> {
        data.get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let mut keys = Vec::new();
    let (Some(flags), Some(db), Some(n)) = (take(0), take(4), take(8)) else {
        return (0, 0, keys);
    };
    let mut at = HEADER;
    for _ in 0..n {
        let Some(len) = take(at) else { break };
        let Some(bytes) = data.get(at + 4..at + 4 + len as usize) else {
            break;
        };
        keys.push(std::str::from_utf8(bytes).unwrap_or(""));
        at += 4 + len as usize;
    }
    (flags, db, keys)
}

/// At PRE_COMMIT of a writer: one record with every key it invalidates, after the keys
/// entered the ledger and before the commit record. Written at every wal_level: crash
/// recovery rebuilds the ledger from it.
pub fn log_invalidation<'a>(keys: impl Iterator<Item = &'a str>) {
    unsafe {
        if gucs::test_no_wal() || !crate::gucs::preloaded() {
            return;
        }
        let mut data = encode(0, pg_sys::MyDatabaseId.to_u32(), keys);
        if data.len() <= HEADER {
            return;
        }
        pg_sys::XLogBeginInsert();
        pg_sys::XLogRegisterData(data.as_mut_ptr() as _, data.len() as _);
        pg_sys::XLogInsert(RM_ID, XLOG_TWOTIER_INVALIDATE);
    }
}

/// The delivery worker's record: every key whose record is before `x` reached Redis, whose
/// keys now live in `epoch`. Returns the record's end, for a caller that must flush it.
pub fn log_delivered(epoch: u64, x: u64) -> u64 {
    let mut data = [0u8; 16];
    data[..8].copy_from_slice(&epoch.to_le_bytes());
    data[8..].copy_from_slice(&x.to_le_bytes());
    unsafe {
        pg_sys::XLogBeginInsert();
        pg_sys::XLogRegisterData(data.as_mut_ptr() as _, data.len() as _);
        let end = pg_sys::XLogInsert(RM_ID, XLOG_TWOTIER_DELIVERED);
        // Not a commit: without this the WAL writer would leave it unflushed (and unsent to
        // standbys) until some commit comes by.
        pg_sys::XLogSetAsyncXactLSN(end);
        end
    }
}

fn decode_delivered(data: &[u8]) -> Option<(u64, u64)> {
    let epoch = u64::from_le_bytes(data.get(..8)?.try_into().ok()?);
    let x = u64::from_le_bytes(data.get(8..16)?.try_into().ok()?);
    Some((epoch, x))
}

unsafe fn record_data<'a>(record: *mut pg_sys::XLogReaderState) -> (&'a [u8], u32) {
    unsafe {
        let decoded = (*record).record;
        let data = if (*decoded).main_data.is_null() {
            &[][..]
        } else {
            std::slice::from_raw_parts(
                (*decoded).main_data as *const u8,
                (*decoded).main_data_len as usize,
            )
        };
        (data, (*decoded).header.xl_xid.into())
    }
}

fn info_of(record: *mut pg_sys::XLogReaderState) -> u8 {
    unsafe { (*(*record).record).header.xl_info & !(pg_sys::XLR_INFO_MASK as u8) }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn startup() {
    ledger::replay_startup();
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn redo(record: *mut pg_sys::XLogReaderState) {
    let (data, xid) = unsafe { record_data(record) };
    let lsn = unsafe { (*record).ReadRecPtr };
    if info_of(record) == XLOG_TWOTIER_DELIVERED {
        if let Some((epoch, x)) = decode_delivered(data) {
            ledger::replay_delivered(epoch, x);
        }
        return;
    }
    let (_, db, keys) = decode(data);
    // The ledger first: once the key is out of L1, the L2 copy must be out of reach too.
    ledger::replay_record(db, xid, lsn, &keys);
    for key in keys {
        l1::replay_invalidation(key, xid);
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn desc(buf: pg_sys::StringInfo, record: *mut pg_sys::XLogReaderState) {
    let (data, _) = unsafe { record_data(record) };
    let text = if info_of(record) == XLOG_TWOTIER_DELIVERED {
        let (epoch, x) = decode_delivered(data).unwrap_or_default();
        format!("epoch {epoch}, up to {:X}/{:X}", x >> 32, x & 0xffff_ffff)
    } else {
        let (flags, db, keys) = decode(data);
        format!(
            "db {db}{}, {} keys{}",
            if flags & FLAG_OUTBOX != 0 {
                ", outbox"
            } else {
                ""
            },
            keys.len(),
            keys.first()
                .map(|k| format!(", first {k}"))
                .unwrap_or_default()
        )
    };
    if let Ok(c) = std::ffi::CString::new(text) {
        unsafe { pg_sys::appendStringInfoString(buf, c.as_ptr()) };
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn identify(info: u8) -> *const c_char {
    match info & !(pg_sys::XLR_INFO_MASK as u8) {
        XLOG_TWOTIER_INVALIDATE => c"INVALIDATE".as_ptr(),
        XLOG_TWOTIER_DELIVERED => c"DELIVERED".as_ptr(),
        _ => std::ptr::null(),
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn records_decode_to_their_keys(
            flags in any::<u32>(), db in any::<u32>(), keys in proptest::collection::vec(".{0,40}", 0..20),
        ) {
            let data = encode(flags, db, keys.iter().map(|k| k.as_str()));
            let (f, d, back) = decode(&data);
            let back: Vec<String> = back.into_iter().map(String::from).collect();
            prop_assert_eq!((f, d, back), (flags, db, keys));
        }
    }
}
