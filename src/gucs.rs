//! Every `twotier.*` setting lives here, each with a typed getter, so the rest of the
//! code never touches a raw GUC.

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use std::ffi::{CStr, CString};
use std::time::Duration;

static REDIS_URL: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c""));
static REDIS_CLUSTER: GucSetting<bool> = GucSetting::<bool>::new(false);
static CONNECT_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(50);
static READ_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(50);
static RETRY_INTERVAL_MS: GucSetting<i32> = GucSetting::<i32>::new(2000);
static NEGATIVE_TTL_S: GucSetting<i32> = GucSetting::<i32>::new(30);
static LOG_EVENTS: GucSetting<bool> = GucSetting::<bool>::new(false);
static KEY_PREFIX: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"twotier"));
static ENABLED: GucSetting<bool> = GucSetting::<bool>::new(true);
static MAX_KEY_BYTES: GucSetting<i32> = GucSetting::<i32>::new(1024);
static MAX_MANY_KEYS: GucSetting<i32> = GucSetting::<i32>::new(1000);
static MAX_VALUE_KB: GucSetting<i32> = GucSetting::<i32>::new(512);
static L1_SIZE_MB: GucSetting<i32> = GucSetting::<i32>::new(64);
static STATS_SLOTS: GucSetting<i32> = GucSetting::<i32>::new(256);
static L1_MAX_VALUE_KB: GucSetting<i32> = GucSetting::<i32>::new(64);
static L1_MAX_AGE_S: GucSetting<i32> = GucSetting::<i32>::new(300);
static L1_ENABLED: GucSetting<bool> = GucSetting::<bool>::new(true);
static TOMBSTONE_TTL_S: GucSetting<i32> = GucSetting::<i32>::new(30);
static STAMPEDE_WAIT_MS: GucSetting<i32> = GucSetting::<i32>::new(200);
static TTL_JITTER_PCT: GucSetting<i32> = GucSetting::<i32>::new(5);
static FLUSH_ABOVE_KEYS: GucSetting<i32> = GucSetting::<i32>::new(1000);
static TEST_NO_LEDGER: GucSetting<bool> = GucSetting::<bool>::new(false);
static TEST_VARIANTS_IGNORE_KEY: GucSetting<bool> = GucSetting::<bool>::new(false);
static TEST_FILL_TRUSTS_REDIS: GucSetting<bool> = GucSetting::<bool>::new(false);
static TEST_CLUSTER_ANY_MAP: GucSetting<bool> = GucSetting::<bool>::new(false);
static LEDGER_MB: GucSetting<i32> = GucSetting::<i32>::new(32);
static TEST_NO_WAL: GucSetting<bool> = GucSetting::<bool>::new(false);
static REDIS_TLS_CA_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static REDIS_TLS_CERT_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static REDIS_TLS_KEY_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static REDIS_PASSWORD_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static TEST_WEAK_CACHE_LOCK: GucSetting<bool> = GucSetting::<bool>::new(false);

static mut PRELOADED: bool = false;

/// Whether the library was loaded by `shared_preload_libraries` (shared memory, workers, the
/// WAL resource manager) rather than by a session: fixed at `_PG_init`.
pub fn preloaded() -> bool {
    unsafe { PRELOADED }
}

pub fn init() {
    unsafe { PRELOADED = pgrx::pg_sys::process_shared_preload_libraries_in_progress };
    init_l1();
    for (name, short, setting) in [
        (
            c"twotier.redis_tls_ca_file",
            c"PEM file of the CA that signs the Redis server's certificate (rediss:// URLs); empty: the system's trust store.",
            &REDIS_TLS_CA_FILE,
        ),
        (
            c"twotier.redis_tls_cert_file",
            c"PEM client certificate for Redis servers that require one (tls-auth-clients).",
            &REDIS_TLS_CERT_FILE,
        ),
        (
            c"twotier.redis_tls_key_file",
            c"PEM private key of twotier.redis_tls_cert_file.",
            &REDIS_TLS_KEY_FILE,
        ),
        (
            c"twotier.redis_password_file",
            c"File holding the Redis password (its first line); readable only by the server's OS user.",
            &REDIS_PASSWORD_FILE,
        ),
    ] {
        GucRegistry::define_string_guc(
            name,
            short,
            c"Read by each backend when it connects; only superusers see or set it.",
            setting,
            GucContext::Sighup,
            GucFlags::SUPERUSER_ONLY,
        );
    }
    // Defined by hand for its hooks: the password is never shown (not even to
    // pg_read_all_settings, which SUPERUSER_ONLY does not keep out), and per-role,
    // per-database or per-function values, which pg_db_role_setting would show to everyone,
    // are refused.
    unsafe {
        pgrx::pg_sys::DefineCustomStringVariable(
            c"twotier.redis_url".as_ptr(),
            c"Redis (L2) URL, e.g. redis://user@127.0.0.1:6379/0, rediss://... or redis+unix:///path.sock; empty means no L2.".as_ptr(),
            c"Set it in postgresql.conf (or ALTER SYSTEM). A URL holding a password is refused: the password goes in twotier.redis_password_file. For rediss://, see twotier.redis_tls_ca_file.".as_ptr(),
            REDIS_URL.as_ptr(),
            c"".as_ptr(),
            GucContext::Suset as isize as _,
            GucFlags::SUPERUSER_ONLY.bits(),
            Some(check_redis_url),
            None,
            Some(show_redis_url),
        );
    }
    GucRegistry::define_int_guc(
        c"twotier.connect_timeout_ms",
        c"Timeout for connecting to Redis.",
        c"A cache call never waits longer than this for a connection; on timeout it answers from the source.",
        &CONNECT_TIMEOUT_MS,
        1,
        60_000,
        GucContext::Suset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"twotier.read_timeout_ms",
        c"Timeout for one Redis reply.",
        c"A slow or paused Redis costs a call at most this long before it falls back to the source.",
        &READ_TIMEOUT_MS,
        1,
        60_000,
        GucContext::Suset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"twotier.retry_interval_ms",
        c"After a Redis failure, how long a backend skips Redis before trying again.",
        c"Also the minimum interval between two WARNINGs about Redis from one backend.",
        &RETRY_INTERVAL_MS,
        0,
        3_600_000,
        GucContext::Suset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"twotier.negative_ttl_s",
        c"Default TTL of a negative entry (the query returned no row).",
        c"A cache's own negative_ttl, given to twotier.define, takes precedence.",
        &NEGATIVE_TTL_S,
        1,
        86_400,
        GucContext::Suset,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_bool_guc(
        c"twotier.redis_cluster",
        c"L2 is a Redis Cluster (or Valkey in cluster mode) whose seed nodes twotier.redis_url lists, comma-separated.",
        c"Keys carry a hash tag per cache and key; reads are trusted only while the cluster's map is the one the L2 epoch was taken with (docs/design.md).",
        &REDIS_CLUSTER,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"twotier.log_events",
        c"Log HIT, MISS, SET and INVALIDATE events with cache and key.",
        c"Emitted at LOG level; set client_min_messages = log to see them in a session.",
        &LOG_EVENTS,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"twotier.key_prefix",
        c"First component of every Redis key written by this server.",
        c"Servers that must share entries (a primary and its replicas) need the same prefix.",
        &KEY_PREFIX,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"twotier.enabled",
        c"When off, every cached function answers from the source and touches no tier.",
        c"",
        &ENABLED,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"twotier.max_key_bytes",
        c"Longest key a cached function accepts.",
        c"Longer keys are refused with an ERROR rather than silently truncated.",
        &MAX_KEY_BYTES,
        16,
        65_536,
        GucContext::Suset,
        GucFlags::UNIT_BYTE,
    );
    GucRegistry::define_int_guc(
        c"twotier.max_many_keys",
        c"Most keys one cached_<name>_many or twotier.get_many call accepts.",
        c"A call with more is refused with an ERROR: its answers, held until it ends, and its source queries are bounded.",
        &MAX_MANY_KEYS,
        1,
        100_000,
        // A bound that protects the server (memory held until the call ends, source queries,
        // Redis writes) is not the caller's to raise.
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"twotier.max_value_kb",
        c"Values larger than this (as JSON text) are returned but not cached.",
        c"",
        &MAX_VALUE_KB,
        1,
        1_048_576,
        GucContext::Suset,
        GucFlags::UNIT_KB,
    );
    GucRegistry::define_int_guc(
        c"twotier.tombstone_ttl_s",
        c"How long an invalidation's tombstone stays in Redis, and the oldest L2 read a fill may follow.",
        c"A fill whose Redis read is older than this is refused, so a tombstone only has to outlive \
          this window, not the cache TTL. Keep it above the slowest cache query.",
        &TOMBSTONE_TTL_S,
        1,
        86_400,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"twotier.stampede_wait_ms",
        c"How long a miss waits for another backend already running the same source query.",
        c"Many sessions missing one key at once run its query once; after this wait (or if that \
          backend ends without filling L1) each runs it itself. 0 turns the wait off.",
        &STAMPEDE_WAIT_MS,
        0,
        60_000,
        GucContext::Userset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"twotier.ttl_jitter_pct",
        c"Each fill shortens its entry's TTL by a random amount up to this percentage.",
        c"So that entries filled together (a warm-up, a restart) do not all expire together.",
        &TTL_JITTER_PCT,
        0,
        50,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"twotier.flush_above_keys",
        c"A transaction that changes more keys of one cache than this flushes the cache instead.",
        c"One new key version in place of a tombstone per key: a bulk UPDATE costs Redis nothing \
          and leaves nothing behind. 0 means never.",
        &FLUSH_ABOVE_KEYS,
        0,
        i32::MAX,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"twotier.test_no_ledger",
        c"Test only: a writer's keys are not kept in the ledger, so nothing takes them to Redis.",
        c"Turns off the protection the consistency tests check, to show that they can fail. Never in production.",
        &TEST_NO_LEDGER,
        GucContext::Suset,
        GucFlags::NO_SHOW_ALL,
    );
    GucRegistry::define_bool_guc(
        c"twotier.test_fill_trusts_redis",
        c"Test only: an L2 fill is checked against Redis alone, not against this server's ledger.",
        c"Turns off the protection the forgetful-Redis tests check, to show that they can fail. Never in production.",
        &TEST_FILL_TRUSTS_REDIS,
        GucContext::Suset,
        GucFlags::NO_SHOW_ALL,
    );
    GucRegistry::define_bool_guc(
        c"twotier.test_cluster_any_map",
        c"Test only: every Redis Cluster map has the same fingerprint, so a failover, a restart or a resharding moves no epoch and L2 trusts whatever map it finds.",
        c"Turns off the protection the Redis Cluster failover tests check, to show that they can fail. Never in production.",
        &TEST_CLUSTER_ANY_MAP,
        GucContext::Sighup,
        GucFlags::NO_SHOW_ALL,
    );
    GucRegistry::define_bool_guc(
        c"twotier.test_variants_ignore_key",
        c"Test only: a vary_by entry is a hit whatever became of its key's generation.",
        c"Turns off what carries a key's invalidation to its variants, to show that the variant tests can fail. Never in production.",
        &TEST_VARIANTS_IGNORE_KEY,
        GucContext::Suset,
        GucFlags::NO_SHOW_ALL,
    );
    GucRegistry::define_bool_guc(
        c"twotier.test_weak_cache_lock",
        c"Test only: writers take the cache lock in a mode that flush, TRUNCATE and define do not wait for.",
        c"Turns off the ordering the flush-against-commit test checks, to show that it can fail. Never in production.",
        &TEST_WEAK_CACHE_LOCK,
        GucContext::Suset,
        GucFlags::NO_SHOW_ALL,
    );
    GucRegistry::define_bool_guc(
        c"twotier.test_no_wal",
        c"Test only: invalidations are not written to the WAL for standbys to replay.",
        c"Turns off the protection the standby consistency test checks, to show that it can fail. Never in production.",
        &TEST_NO_WAL,
        GucContext::Suset,
        GucFlags::NO_SHOW_ALL,
    );
}

pub fn init_l1() {
    GucRegistry::define_int_guc(
        c"twotier.stats_slots",
        c"Caches (across all databases) that twotier.stats counts separately.",
        c"Allocated at server start. Slots of dropped caches and databases are reclaimed when all are in use; beyond that, caches are counted together as \"(overflow)\", with a WARNING.",
        &STATS_SLOTS,
        16,
        1_000_000,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"twotier.ledger_mb",
        c"Shared memory for invalidations not yet delivered to Redis, in megabytes.",
        c"Allocated at server start (about 100 bytes per key). A writer whose keys do not fit moves the cache to a new version instead.",
        &LEDGER_MB,
        1,
        65_536,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"twotier.l1_size_mb",
        c"Size of the shared-memory L1, in megabytes; 0 disables L1.",
        c"Allocated at server start; needs shared_preload_libraries = 'twotier'.",
        &L1_SIZE_MB,
        0,
        1_048_576,
        GucContext::Postmaster,
        GucFlags::UNIT_MB,
    );
    GucRegistry::define_int_guc(
        c"twotier.l1_max_value_kb",
        c"Values larger than this (as jsonb) skip L1 and are served from L2 or the source.",
        c"",
        &L1_MAX_VALUE_KB,
        1,
        1_048_576,
        GucContext::Suset,
        GucFlags::UNIT_KB,
    );
    GucRegistry::define_int_guc(
        c"twotier.l1_max_age_s",
        c"Longest time an entry stays in L1, whatever its cache TTL.",
        c"A safety net for invalidations from other servers that never arrived.",
        &L1_MAX_AGE_S,
        1,
        86_400,
        GucContext::Suset,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_bool_guc(
        c"twotier.l1_enabled",
        c"When off, this session neither reads nor fills L1 (L2 and the source only).",
        c"For comparisons and benchmarks; invalidations still reach L1.",
        &L1_ENABLED,
        GucContext::Userset,
        GucFlags::default(),
    );
}

fn cstr_setting(setting: &GucSetting<Option<CString>>) -> &'static CStr {
    // The GUC machinery owns the string and replaces (never mutates) it on change; we only
    // read it within the current call, so borrowing avoids an allocation per cache call.
    let raw = unsafe { *setting.as_ptr() };
    if raw.is_null() {
        c""
    } else {
        unsafe { CStr::from_ptr(raw) }
    }
}

unsafe extern "C-unwind" fn check_redis_url(
    newval: *mut *mut std::ffi::c_char,
    _extra: *mut *mut std::ffi::c_void,
    source: pgrx::pg_sys::GucSource::Type,
) -> bool {
    use pgrx::pg_sys::GucSource::*;
    if matches!(
        source,
        PGC_S_TEST | PGC_S_DATABASE | PGC_S_USER | PGC_S_DATABASE_USER
    ) {
        return refuse_setting(
            pgrx::PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            c"twotier.redis_url cannot be set per role, per database or per function",
            c"Its password would be readable by every role in pg_db_role_setting; set it in postgresql.conf or with ALTER SYSTEM.",
        );
    }
    let url = if newval.is_null() || unsafe { (*newval).is_null() } {
        c""
    } else {
        unsafe { CStr::from_ptr(*newval) }
    };
    if url_has_password(&url.to_string_lossy()) {
        // Our own message: PostgreSQL's would quote the value, password and all, in the log.
        return refuse_setting(
            pgrx::PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            c"twotier.redis_url must not hold a password",
            c"A setting's value reaches pg_settings, SHOW and the server log; put the password in a file readable only by the server's OS user and name it in twotier.redis_password_file.",
        );
    }
    true
}

/// A check hook's refusal: the SQLSTATE, message and hint PostgreSQL reports. Always false.
fn refuse_setting(code: pgrx::PgSqlErrorCode, message: &CStr, hint: &CStr) -> bool {
    unsafe {
        pgrx::pg_sys::GUC_check_errcode(code as i32);
        pgrx::pg_sys::GUC_check_errmsg_string = pgrx::pg_sys::pstrdup(message.as_ptr());
        pgrx::pg_sys::GUC_check_errhint_string = pgrx::pg_sys::pstrdup(hint.as_ptr());
    }
    false
}

/// A Redis URL's parts: scheme, authority (`userinfo@host:port`), path, and the query if any.
struct UrlParts<'a> {
    scheme: &'a str,
    authority: &'a str,
    path: &'a str,
    query: Option<&'a str>,
}

fn split_url(url: &str) -> Option<UrlParts<'_>> {
    let scheme_end = url.find("://")?;
    let (scheme, rest) = (&url[..scheme_end], &url[scheme_end + 3..]);
    let (before_query, query) = match rest.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match before_query.find('/') {
        Some(i) => (&before_query[..i], &before_query[i..]),
        None => (before_query, ""),
    };
    Some(UrlParts {
        scheme,
        authority,
        path,
        query,
    })
}

/// Whether a Redis URL carries a password, in any form the client accepts: `user:password@`
/// or `:password@` before the host, or `pass=`/`password=` in the query (`redis+unix://`).
/// Whether any URL of a comma-separated list (a cluster's seeds) holds a password.
pub fn url_has_password(urls: &str) -> bool {
    urls.split(',').any(one_url_has_password)
}

fn one_url_has_password(url: &str) -> bool {
    let Some(parts) = split_url(url) else {
        return false;
    };
    let in_userinfo = parts
        .authority
        .rsplit_once('@')
        .is_some_and(|(userinfo, _)| userinfo.contains(':'));
    let in_query = parts.query.unwrap_or("").split(['&', '#']).any(|pair| {
        let name = pair.split('=').next().unwrap_or("").to_ascii_lowercase();
        name == "pass" || name == "password"
    });
    in_userinfo || in_query
}

/// The URL as any message or view may show it: whatever could be a credential masked.
/// Every URL of a comma-separated list with its user and query names kept and secrets masked.
pub fn redacted_url(urls: &str) -> String {
    urls.split(',')
        .map(one_redacted_url)
        .collect::<Vec<_>>()
        .join(",")
}

fn one_redacted_url(url: &str) -> String {
    let Some(UrlParts {
        scheme,
        authority,
        path,
        query,
    }) = split_url(url)
    else {
        return url.to_string();
    };
    let authority = match authority.rsplit_once('@') {
        Some((_, host)) => format!("***@{host}"),
        None => authority.to_string(),
    };
    let query = query.map(|q| {
        q.split('&')
            .map(|pair| match pair.split_once('=') {
                Some((name, _))
                    if matches!(
                        name.to_ascii_lowercase().as_str(),
                        "pass" | "password" | "user" | "username"
                    ) =>
                {
                    format!("{name}=***")
                }
                _ => pair.to_string(),
            })
            .collect::<Vec<_>>()
            .join("&")
    });
    match query {
        Some(q) => format!("{scheme}://{authority}{path}?{q}"),
        None => format!("{scheme}://{authority}{path}"),
    }
}

unsafe extern "C-unwind" fn show_redis_url() -> *const std::ffi::c_char {
    thread_local! {
        static SHOWN: std::cell::RefCell<CString> = std::cell::RefCell::new(CString::default());
    }
    let masked = redacted_url(&redis_url().to_string_lossy());
    SHOWN.with(|s| {
        *s.borrow_mut() = CString::new(masked).unwrap_or_default();
        s.borrow().as_ptr()
    })
}

/// The Redis URL, borrowed; empty when L2 is off.
pub fn redis_url() -> &'static CStr {
    cstr_setting(&REDIS_URL)
}

/// Whether L2 is a Redis Cluster, whose seed nodes `twotier.redis_url` lists.
pub fn redis_cluster() -> bool {
    REDIS_CLUSTER.get()
}

/// The URLs of `twotier.redis_url`, in order: one server's, or a cluster's seed nodes.
pub fn redis_seeds() -> Vec<String> {
    redis_url()
        .to_string_lossy()
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(String::from)
        .collect()
}

/// The TLS files for rediss:// (CA, client certificate, client key); None where unset.
pub fn redis_tls_files() -> [Option<String>; 3] {
    [
        &REDIS_TLS_CA_FILE,
        &REDIS_TLS_CERT_FILE,
        &REDIS_TLS_KEY_FILE,
    ]
    .map(|s| {
        s.get()
            .map(|v| v.to_string_lossy().into_owned())
            .filter(|v| !v.is_empty())
    })
}

/// The Redis password, read from `twotier.redis_password_file` at each connect (a changed file
/// takes effect at the next connection). The file must not be readable by group or others.
pub fn redis_password() -> Result<Option<String>, String> {
    let Some(path) = REDIS_PASSWORD_FILE
        .get()
        .map(|v| v.to_string_lossy().into_owned())
        .filter(|v| !v.is_empty())
    else {
        return Ok(None);
    };
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(&path).map_err(|e| format!("cannot read {path}: {e}"))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(format!(
            "{path} is readable by group or others; chmod 600 it (PostgreSQL asks the same of ssl_key_file)"
        ));
    }
    let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {path}: {e}"))?;
    let first = text.lines().next().unwrap_or("").trim_end_matches('\r');
    if first.is_empty() {
        return Err(format!("{path} holds no password on its first line"));
    }
    Ok(Some(first.to_string()))
}

pub fn key_prefix() -> &'static str {
    cstr_setting(&KEY_PREFIX).to_str().unwrap_or("twotier")
}

pub fn connect_timeout() -> Duration {
    Duration::from_millis(CONNECT_TIMEOUT_MS.get().max(1) as u64)
}

pub fn read_timeout() -> Duration {
    Duration::from_millis(READ_TIMEOUT_MS.get().max(1) as u64)
}

pub fn retry_interval() -> Duration {
    Duration::from_millis(RETRY_INTERVAL_MS.get().max(0) as u64)
}

pub fn negative_ttl_s() -> i64 {
    NEGATIVE_TTL_S.get() as i64
}

pub fn log_events() -> bool {
    LOG_EVENTS.get()
}

pub fn enabled() -> bool {
    ENABLED.get()
}

pub fn max_many_keys() -> usize {
    MAX_MANY_KEYS.get() as usize
}

pub fn max_key_bytes() -> usize {
    MAX_KEY_BYTES.get() as usize
}

pub fn max_value_bytes() -> usize {
    MAX_VALUE_KB.get() as usize * 1024
}

pub fn stats_slots() -> usize {
    STATS_SLOTS.get().max(16) as usize
}

pub fn l1_size_mb() -> usize {
    L1_SIZE_MB.get().max(0) as usize
}

pub fn l1_max_value_bytes() -> usize {
    L1_MAX_VALUE_KB.get() as usize * 1024
}

pub fn l1_max_age_s() -> i64 {
    L1_MAX_AGE_S.get() as i64
}

pub fn l1_enabled() -> bool {
    L1_ENABLED.get()
}

pub fn tombstone_ttl_s() -> i64 {
    TOMBSTONE_TTL_S.get().max(1) as i64
}

pub fn test_no_wal() -> bool {
    TEST_NO_WAL.get()
}

pub fn test_weak_cache_lock() -> bool {
    TEST_WEAK_CACHE_LOCK.get()
}

pub fn test_no_ledger() -> bool {
    TEST_NO_LEDGER.get()
}

pub fn test_variants_ignore_key() -> bool {
    TEST_VARIANTS_IGNORE_KEY.get()
}

pub fn test_cluster_any_map() -> bool {
    TEST_CLUSTER_ANY_MAP.get()
}

pub fn test_fill_trusts_redis() -> bool {
    TEST_FILL_TRUSTS_REDIS.get()
}

/// Shared memory for undelivered invalidations, in bytes (0 without preload).
pub fn ledger_bytes() -> usize {
    LEDGER_MB.get().max(1) as usize * 1024 * 1024
}

/// Whether the server (postgresql.conf, not this session) has a Redis: a session that set
/// `twotier.redis_url = ''` still owes its invalidations to the Redis everyone else reads.
pub fn server_has_redis() -> bool {
    let raw = unsafe { pgrx::pg_sys::GetConfigOptionResetString(c"twotier.redis_url".as_ptr()) };
    !raw.is_null() && unsafe { *raw } != 0
}

/// None when bulk invalidations should never turn into a flush.
pub fn flush_above_keys() -> Option<usize> {
    let n = FLUSH_ABOVE_KEYS.get();
    (n > 0).then_some(n as usize)
}

/// `ttl_s` shortened by a random part of `twotier.ttl_jitter_pct` percent; never below 1 s.
pub fn jittered_ttl_s(ttl_s: i64) -> i64 {
    use std::cell::Cell;
    thread_local! {
        static SEED: Cell<u64> = Cell::new(
            (std::process::id() as u64) << 32
                ^ std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
                | 1,
        );
    }
    let pct = TTL_JITTER_PCT.get().clamp(0, 50) as i64;
    let span = ttl_s * pct / 100;
    if span <= 0 {
        return ttl_s.max(1);
    }
    // xorshift64: a cache's expiry spread needs no better randomness.
    let r = SEED.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        x
    });
    (ttl_s - (r % (span as u64 + 1)) as i64).max(1)
}

/// None when misses should not wait for one another.
pub fn stampede_wait() -> Option<Duration> {
    let ms = STAMPEDE_WAIT_MS.get();
    (ms > 0).then(|| Duration::from_millis(ms as u64))
}

#[cfg(test)]
mod tests {
    use super::{redacted_url, url_has_password};

    #[test]
    fn every_password_form_is_found_and_masked() {
        for url in [
            "redis://:pw-secret@127.0.0.1:6379/0",
            "redis://app:pw-secret@127.0.0.1:6379/0",
            "rediss://app:pw-secret@host/0",
            "redis+unix:///tmp/r.sock?db=0&pass=pw-secret",
            "unix:///tmp/r.sock?password=pw-secret",
            "redis+unix:///tmp/r.sock?user=app&PASS=pw-secret",
        ] {
            assert!(url_has_password(url), "{url}");
            assert!(!redacted_url(url).contains("pw-secret"), "{url}");
        }
        for url in [
            "redis://127.0.0.1:6379/0",
            "redis://app@127.0.0.1:6379/0",
            "redis+unix:///tmp/r.sock?db=0",
            "",
        ] {
            assert!(!url_has_password(url), "{url}");
        }
        assert_eq!(
            redacted_url("redis://app@127.0.0.1:6379/0"),
            "redis://***@127.0.0.1:6379/0"
        );
        assert_eq!(
            redacted_url("redis+unix:///tmp/r.sock?db=1"),
            "redis+unix:///tmp/r.sock?db=1"
        );
    }
}
