//! Invalidations in the WAL, for streaming standbys: a custom resource manager
//! (`RegisterCustomRmgr`, PostgreSQL 15+) whose record a committing writer inserts at
//! PRE_COMMIT, before its commit record. A standby's startup process replays it first, and
//! drops the keys from the standby's L1 and keeps them out of play there (no L1 read or fill,
//! no L2 read) until it replays the writer's commit. So a standby's cache is never older than
//! the standby's own tables, whatever Redis and the invalidation channel do.
//!
//! The id is PostgreSQL's experimental one (128) until a production id is reserved on the
//! wiki page "CustomWALResourceManagers" (see docs/design.md).

use crate::gucs;
use crate::l1;
use pgrx::pg_sys;
use std::ffi::c_char;

const RM_ID: u8 = pg_sys::RM_EXPERIMENTAL_ID as u8;
const XLOG_TWOTIER_INVALIDATE: u8 = 0x00;

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
            rm_startup: None,
            rm_cleanup: None,
            rm_mask: None,
            rm_decode: None,
        };
        pg_sys::RegisterCustomRmgr(RM_ID, &raw mut RMGR);
    }
}

/// Flag: the keys also went to the database's outbox (Redis could not be told).
const FLAG_OUTBOX: u32 = 1;
const HEADER: usize = 12;

/// The record: flags (u32), database OID (u32), the number of keys (u32), then each key as
/// length (u32) and bytes. The keys are tier keys (they carry the system identifier and
/// database OID, so a record can only match the entries it was written for).
fn encode<'a>(flags: u32, db: u32, keys: impl Iterator<Item = &'a str>) -> Vec<u8> {
    let mut out = vec![0u8; HEADER];
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

/// At PRE_COMMIT of a writer: one record with every key it invalidates. Only where standbys
/// can exist (wal_level replica or logical) and L1 is in shared memory.
pub fn log_invalidation<'a>(keys: impl Iterator<Item = &'a str>, to_outbox: bool) {
    unsafe {
        if gucs::test_no_wal()
            || pg_sys::wal_level < pg_sys::WalLevel::WAL_LEVEL_REPLICA as i32
            || !crate::gucs::preloaded()
        {
            return;
        }
        let flags = if to_outbox { FLAG_OUTBOX } else { 0 };
        let mut data = encode(flags, pg_sys::MyDatabaseId.to_u32(), keys);
        if data.len() <= HEADER {
            return;
        }
        pg_sys::XLogBeginInsert();
        pg_sys::XLogRegisterData(data.as_mut_ptr() as _, data.len() as _);
        pg_sys::XLogInsert(RM_ID, XLOG_TWOTIER_INVALIDATE);
    }
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

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn redo(record: *mut pg_sys::XLogReaderState) {
    let (data, xid) = unsafe { record_data(record) };
    // Crash recovery of a primary replays these too: harmless, L1 starts empty there, and L2
    // starts untrusted until the outbox worker has read the table.
    let (flags, db, keys) = decode(data);
    if flags & FLAG_OUTBOX != 0 {
        crate::invalidation::outbox::replay_outbox_write(pg_sys::Oid::from(db), xid);
    }
    for key in keys {
        l1::replay_invalidation(key, xid);
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn desc(buf: pg_sys::StringInfo, record: *mut pg_sys::XLogReaderState) {
    let (data, _) = unsafe { record_data(record) };
    let (flags, db, keys) = decode(data);
    let text = format!(
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
    );
    if let Ok(c) = std::ffi::CString::new(text) {
        unsafe { pg_sys::appendStringInfoString(buf, c.as_ptr()) };
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn identify(info: u8) -> *const c_char {
    match info & !(pg_sys::XLR_INFO_MASK as u8) {
        XLOG_TWOTIER_INVALIDATE => c"INVALIDATE".as_ptr(),
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
