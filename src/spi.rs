//! Running SQL the way twotier needs it, for every layer above: settings pinned as a
//! function's SET clause would pin them, a role switched as SECURITY DEFINER would switch it,
//! an SPI connection closed on every path, and reads of twotier's own tables with the latest
//! committed state.

use crate::error::{InternalError, Raise};
use pgrx::pg_sys::{self, Datum, Oid};
use std::ffi::CStr;

/// Runs `f` with `settings` in force, as a function's SET clause would set them; the previous
/// values come back after it (and on ERROR, with the (sub)transaction's abort).
pub fn with_settings<R>(settings: &[(&CStr, &CStr)], f: impl FnOnce() -> R) -> R {
    unsafe {
        let nest = pg_sys::NewGUCNestLevel();
        for (name, value) in settings {
            pg_sys::set_config_option(
                name.as_ptr(),
                value.as_ptr(),
                pg_sys::GucContext::PGC_USERSET,
                pg_sys::GucSource::PGC_S_SESSION,
                pg_sys::GucAction::GUC_ACTION_SAVE,
                true,
                0,
                false,
            );
        }
        let result = f();
        pg_sys::AtEOXact_GUC(true, nest);
        result
    }
}

/// Settings that change how values are rendered to text and json: a cache's query and its key
/// expressions run with these, never with the session's, so that what one caller's session
/// says cannot change what every caller is served.
pub const PINNED: [(&CStr, &CStr); 5] = [
    (c"DateStyle", c"ISO, MDY"),
    (c"TimeZone", c"UTC"),
    (c"IntervalStyle", c"postgres"),
    (c"extra_float_digits", c"1"),
    (c"bytea_output", c"hex"),
];

/// Runs `f` as `owner` with `search_path`, the way a SECURITY DEFINER function with a SET
/// clause would. On ERROR the (sub)transaction abort restores user and GUC state.
pub fn as_owner<R>(owner: Oid, search_path: &CStr, f: impl FnOnce() -> R) -> R {
    unsafe {
        let mut saved_user = Oid::INVALID;
        let mut saved_sec = 0;
        pg_sys::GetUserIdAndSecContext(&mut saved_user, &mut saved_sec);
        pg_sys::SetUserIdAndSecContext(
            owner,
            saved_sec | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32,
        );
        let result = with_settings(&[(c"search_path", search_path)], f);
        pg_sys::SetUserIdAndSecContext(saved_user, saved_sec);
        result
    }
}

pub struct SpiConnection;

impl SpiConnection {
    pub fn open() -> Self {
        unsafe { pg_sys::SPI_connect() };
        SpiConnection
    }
}

impl Drop for SpiConnection {
    fn drop(&mut self) {
        // On the error path PostgreSQL's abort processing cleans up SPI itself; finishing here
        // during an unwind would act on a stack that is being torn down.
        if !std::thread::panicking() {
            unsafe { pg_sys::SPI_finish() };
        }
    }
}

/// Runs a read-only query with the latest committed state, whatever the transaction's
/// isolation level or snapshot: for the extension's own tables, which must never be read as
/// of an old snapshot. Returns each row's columns as text. `args` are text parameters.
pub fn query_latest(sql: &CStr, args: &[&str]) -> Vec<Vec<Option<String>>> {
    let _spi = SpiConnection::open();
    unsafe {
        let mut types: Vec<Oid> = vec![pg_sys::TEXTOID; args.len()];
        let mut values: Vec<Datum> = args
            .iter()
            .map(|a| {
                Datum::from(pg_sys::cstring_to_text_with_len(
                    a.as_ptr().cast(),
                    a.len() as i32,
                ))
            })
            .collect();
        let nulls: Vec<std::ffi::c_char> = vec![b' ' as std::ffi::c_char; args.len() + 1];
        pg_sys::PushActiveSnapshot(pg_sys::GetLatestSnapshot());
        // read_only: run under the snapshot just pushed instead of taking another one.
        let rc = pg_sys::SPI_execute_with_args(
            sql.as_ptr(),
            args.len() as i32,
            types.as_mut_ptr(),
            values.as_mut_ptr(),
            nulls.as_ptr(),
            true,
            0,
        );
        pg_sys::PopActiveSnapshot();
        if rc != pg_sys::SPI_OK_SELECT as i32 {
            InternalError::Spi {
                what: "reading twotier's catalog",
                code: rc,
            }
            .raise();
        }
        let table = pg_sys::SPI_tuptable;
        let mut rows = Vec::new();
        for i in 0..pg_sys::SPI_processed as usize {
            let tuple = *(*table).vals.add(i);
            let natts = (*(*table).tupdesc).natts;
            let row = (1..=natts)
                .map(|c| {
                    let v = pg_sys::SPI_getvalue(tuple, (*table).tupdesc, c);
                    (!v.is_null()).then(|| CStr::from_ptr(v).to_string_lossy().into_owned())
                })
                .collect();
            rows.push(row);
        }
        rows
    }
}
