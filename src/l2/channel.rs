//! The invalidation channel's name and messages: every server sharing a Redis publishes the
//! keys its commits invalidated there, and each server's listener drops them from its L1.

use crate::gucs;
use crate::keys;
use pgrx::pg_sys;

pub fn channel() -> String {
    format!("{}:invalidations", keys::escape(gucs::key_prefix()))
}

/// This server, as its messages name it: a standby shares its primary's system identifier,
/// so the postmaster's pid and start time tell the two apart.
pub fn origin() -> &'static str {
    static ORIGIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ORIGIN.get_or_init(|| unsafe {
        let (pid, started) = (pg_sys::PostmasterPid, pg_sys::PgStartTime);
        format!("{:x}.{pid}.{started}", pg_sys::GetSystemIdentifier())
    })
}

/// Message: first line `lsn <commit LSN> <origin>`, then one L1 key per line.
pub fn message(commit_lsn: u64, keys: &[&str]) -> String {
    let mut out = format!("lsn {commit_lsn} {}", origin());
    for k in keys {
        out.push('\n');
        out.push_str(k);
    }
    out
}

/// A message read back: the commit's LSN, the origin server, and the L1 keys. Anything
/// malformed reads as LSN 0 from no origin, whose keys are still dropped (dropping is safe).
pub fn decode(payload: &str) -> (u64, &str, Vec<&str>) {
    let (lsn, origin) = head(payload);
    let keys = payload.split('\n').skip(1).filter(|k| !k.is_empty());
    (lsn, origin, keys.collect())
}

/// The commit's LSN and the origin of a message, without reading its keys: a server's own
/// messages (most of what its listener receives) need nothing more.
pub fn head(payload: &str) -> (u64, &str) {
    let first = payload.split('\n').next().unwrap_or("");
    let mut head = first.strip_prefix("lsn ").unwrap_or("").split(' ');
    let lsn = head.next().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
    (lsn, head.next().unwrap_or(""))
}

#[cfg(test)]
mod tests {
    use super::decode;

    #[test]
    fn a_message_reads_back_as_written() {
        let payload = "lsn 12345 abc.1.2\nk1\nk:2\n";
        assert_eq!(decode(payload), (12345, "abc.1.2", vec!["k1", "k:2"]));
        assert_eq!(decode("garbage\nk"), (0, "", vec!["k"]));
        assert_eq!(decode(""), (0, "", vec![]));
        assert_eq!(super::head(payload), (12345, "abc.1.2"));
    }
}
