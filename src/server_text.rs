//! Text crossing between PostgreSQL (the database's encoding) and twotier's keys (UTF-8).
//!
//! Every key, and every value a key varies by, becomes UTF-8 before it becomes a tier key. The
//! conversion must be exact: a lossy one (U+FFFD for every byte that is not UTF-8) made
//! `{"sub":"josé"}` and `{"sub":"josè"}` one key in a LATIN1 database, and served one user's
//! rows to another. PostgreSQL's own conversions are exact both ways for every server encoding
//! (a character UTF-8 lacks is an ERROR); SQL_ASCII has none, and bytes that are not UTF-8 are
//! refused there.

use pgrx::pg_sys;
use std::borrow::Cow;
use std::ffi::{c_char, CStr};

fn database_is_utf8() -> bool {
    unsafe { pg_sys::GetDatabaseEncoding() == pg_sys::pg_enc::PG_UTF8 as i32 }
}

/// `bytes`, in the database's encoding, as UTF-8 (borrowed where they already are).
pub fn from_server(bytes: &[u8]) -> Cow<'_, str> {
    if database_is_utf8() {
        // PostgreSQL verifies every text it accepts in a UTF-8 database.
        if let Ok(s) = std::str::from_utf8(bytes) {
            return Cow::Borrowed(s);
        }
    }
    unsafe {
        // In a SQL_ASCII database this verifies that the bytes are UTF-8 (an ERROR if not);
        // elsewhere it converts them, exactly or with an ERROR.
        let out = pg_sys::pg_server_to_any(
            bytes.as_ptr().cast(),
            bytes.len() as i32,
            pg_sys::pg_enc::PG_UTF8 as i32,
        );
        let converted: &[u8] = if std::ptr::eq(out.cast_const(), bytes.as_ptr().cast()) {
            bytes
        } else {
            CStr::from_ptr(out).to_bytes()
        };
        let text = match std::str::from_utf8(converted) {
            Ok(s) => s.to_owned(),
            // Unreachable after pg_server_to_any; refused rather than guessed at.
            Err(_) => pgrx::error!("twotier: text that is not valid UTF-8 cannot be part of a key"),
        };
        if !std::ptr::eq(out.cast_const(), bytes.as_ptr().cast()) {
            pg_sys::pfree(out.cast());
        }
        Cow::Owned(text)
    }
}

/// A NUL-terminated C string from PostgreSQL (a setting, a type's output), as UTF-8.
///
/// # Safety
/// `text` points to a valid NUL-terminated string.
pub unsafe fn from_server_cstr(text: *const c_char) -> String {
    let bytes = unsafe { CStr::from_ptr(text) }.to_bytes();
    from_server(bytes).into_owned()
}

/// UTF-8 key text back in the database's encoding, for a type's input function or a text
/// datum (borrowed where nothing changes).
pub fn to_server(text: &str) -> Cow<'_, [u8]> {
    if database_is_utf8() {
        return Cow::Borrowed(text.as_bytes());
    }
    unsafe {
        let out = pg_sys::pg_any_to_server(
            text.as_ptr().cast(),
            text.len() as i32,
            pg_sys::pg_enc::PG_UTF8 as i32,
        );
        if std::ptr::eq(out.cast_const(), text.as_ptr().cast()) {
            return Cow::Borrowed(text.as_bytes());
        }
        let bytes = CStr::from_ptr(out).to_bytes().to_vec();
        pg_sys::pfree(out.cast());
        Cow::Owned(bytes)
    }
}

/// The text of a text datum (`text`, `varchar`, detoasted here if needed), as UTF-8.
///
/// # Safety
/// `datum` is a valid, non-NULL varlena datum that outlives the returned borrow.
pub unsafe fn text_datum<'a>(datum: pg_sys::Datum) -> Cow<'a, str> {
    unsafe {
        let v = pg_sys::pg_detoast_datum_packed(datum.cast_mut_ptr());
        let len = pgrx::varlena::varsize_any_exhdr(v);
        let data = pgrx::varlena::vardata_any(v) as *const u8;
        from_server(std::slice::from_raw_parts(data, len))
    }
}
