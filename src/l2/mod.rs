//! L2: one lazily opened Redis connection per backend, with connect and read timeouts, and a
//! circuit breaker: after a connection-level failure the backend leaves Redis alone for
//! `twotier.retry_interval_ms` instead of paying a timeout on every call. Nothing in here
//! raises an ERROR; every failure comes back as an `L2Error` for the caller to count.

pub mod channel;
mod cluster;
pub mod layout;
mod link;
pub mod slots;

use cluster::{is_redirect, Conn, Router};
pub(crate) use link::client_for;
use link::{connect, interrupt_pending};

pub use layout::{classify, is_lease, l2_key, tier_key_of, Lookup};
use layout::{classify_variant, lease_key, FILL_SCRIPT, NEGATIVE, VARIANT_FILL_SCRIPT};
use layout::{l2_key_tagged, l2_pattern_tagged, tier_key_of_tagged};

use crate::gucs;

use std::cell::RefCell;
use std::ffi::CString;
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum L2Error {
    #[error("no Redis configured")]
    Off,
    #[error("Redis skipped until the retry interval ends")]
    Skipped,
    #[error("interrupted by a cancel or timeout request")]
    Interrupted,
    #[error("bad twotier.redis_url: {0}")]
    BadUrl(String),
    #[error("twotier.redis_password_file: {0}")]
    PasswordFile(String),
    #[error("the Redis Cluster's map is not the one the L2 epoch trusts (a failover, a restart or a resharding since): L2 is left alone until the delivery worker moves to a new epoch")]
    Untrusted,
    #[error("{0}")]
    Redis(#[from] redis::RedisError),
}

impl L2Error {
    /// Whether this is a fault worth counting (as opposed to L2 being off or resting).
    pub fn is_fault(&self) -> bool {
        !matches!(
            self,
            L2Error::Off | L2Error::Skipped | L2Error::Interrupted | L2Error::Untrusted
        )
    }
}

/// Takes the cross-server stampede lease of `key` for `ttl`: servers sharing this Redis that
/// miss the same key meanwhile wait for this fill instead of running the query too. A fill
/// deletes it; a backend killed while holding it leaves it to expire.
pub fn take_lease(key: &str, ttl: Duration) -> Result<bool, L2Error> {
    with_connection(|con, ctx| {
        let taken: Option<String> = con.call(
            redis::cmd("SET")
                .arg(lease_key(&ctx.key(key)))
                .arg(std::process::id())
                .arg("NX")
                .arg("PX")
                .arg(ttl.as_millis().max(1) as u64),
        )?;
        Ok(taken.is_some())
    })
}

/// Gives the lease back without a fill (nothing to store, or L2 no longer trusted), so that
/// waiting servers go to their source now rather than at the end of their wait.
pub fn release_lease(key: &str) {
    let _ = with_connection(|con, ctx| {
        con.call::<i64>(redis::cmd("DEL").arg(lease_key(&ctx.key(key))))
    });
}

/// Whether another server holds the stampede lease of `key`.
pub fn lease_held(key: &str) -> Result<bool, L2Error> {
    with_connection(|con, ctx| {
        let n: i64 = con.call(redis::cmd("EXISTS").arg(lease_key(&ctx.key(key))))?;
        Ok(n > 0)
    })
}

/// The L2 epoch lives in the ledger's shared memory (a layer up): it is handed down here
/// once, at attach, so that every key this backend names carries it.
static EPOCH: AtomicPtr<AtomicU64> = AtomicPtr::new(std::ptr::null_mut());

pub fn set_epoch_source(epoch: &'static AtomicU64) {
    EPOCH.store(
        epoch as *const AtomicU64 as *mut AtomicU64,
        Ordering::Release,
    );
}

fn epoch() -> u64 {
    let p = EPOCH.load(Ordering::Acquire);
    if p.is_null() {
        0
    } else {
        unsafe { (*p).load(Ordering::Acquire) }
    }
}

thread_local! {
    /// Requests this backend sent to Redis and waited on, each one round trip however many
    /// commands it pipelined: `twotier.status()` shows it, tests and the bench count with it.
    static ROUND_TRIPS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

pub fn round_trips() -> u64 {
    ROUND_TRIPS.with(|n| n.get())
}

/// What a fill needs to know about the read it follows.
#[derive(Debug, Clone)]
pub struct Read {
    pub lookup: Lookup,
    /// Remaining life of the entry in seconds, rounded up.
    pub remaining_s: Option<i64>,
    /// Redis's clock at the read, in microseconds.
    pub at_us: i64,
    /// For a variant: what its key held (the generation a fill must still find there).
    pub variant_base: Option<Option<Vec<u8>>>,
}

/// The connection's view of Redis that every operation needs.
pub struct Ctx<'a> {
    /// A fresh tombstone value per exchange that writes any (made on demand: a read needs
    /// none, and making one costs a clock read, a getpid and a format).
    tombstone: std::cell::OnceCell<String>,
    pub incarnation: &'a str,
    /// A cluster's names carry a hash tag.
    tagged: bool,
}

impl Ctx<'_> {
    fn tombstone(&self) -> &str {
        self.tombstone.get_or_init(tombstone_value)
    }

    fn key(&self, tier_key: &str) -> String {
        if self.tagged {
            l2_key_tagged(self.incarnation, tier_key)
        } else {
            l2_key(self.incarnation, tier_key)
        }
    }

    fn pattern(&self, tier_pattern: &str) -> String {
        if self.tagged {
            l2_pattern_tagged(self.incarnation, tier_pattern)
        } else {
            l2_key(self.incarnation, tier_pattern)
        }
    }

    fn tier_key_of(&self, l2: &str) -> Option<String> {
        if self.tagged {
            tier_key_of_tagged(self.incarnation, l2)
        } else {
            tier_key_of(self.incarnation, l2)
        }
    }
}

struct State {
    url: CString,
    cluster: bool,
    con: Option<Conn>,
    incarnation: String,
    resting_until: Option<Instant>,
    down_since: Option<SystemTime>,
    last_error: Option<String>,
    last_warning: Option<Instant>,
    /// The incarnation with the L2 epoch appended (when it is not 0), and that epoch.
    namespace: String,
    namespace_epoch: u64,
    /// Invalidations that could not be delivered; sent before anything else once Redis answers.
    undelivered: Vec<(String, i64)>,
}

thread_local! {
    static STATE: RefCell<State> = RefCell::new(State {
        url: CString::default(),
        cluster: false,
        con: None,
        incarnation: String::new(),
        resting_until: None,
        down_since: None,
        last_error: None,
        last_warning: None,
        namespace: String::new(),
        namespace_epoch: u64::MAX,
        undelivered: Vec::new(),
    });
}

fn warn_rate_limited(state: &mut State, message: String) {
    let interval = gucs::retry_interval().max(Duration::from_millis(1000));
    let due = state.last_warning.is_none_or(|t| t.elapsed() >= interval);
    if due {
        state.last_warning = Some(Instant::now());
        pgrx::warning!("{message}");
    }
}

thread_local! {
    static TOMBSTONE_SEQ: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

fn tombstone_value() -> String {
    let seq = TOMBSTONE_SEQ.with(|n| {
        n.set(n.get() + 1);
        n.get()
    });
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    format!("!inval:{}:{}:{}", std::process::id(), now.as_micros(), seq)
}

/// `SET key value EX ttl` for each key: how tombstones and in-flight markers are written.
fn sets<'a>(keys: impl IntoIterator<Item = (&'a str, i64)>, value: &str) -> Vec<redis::Cmd> {
    keys.into_iter()
        .map(|(key, ttl)| {
            let mut c = redis::cmd("SET");
            c.arg(key).arg(value).arg("EX").arg(ttl.max(1));
            c
        })
        .collect()
}

/// Tombstones and the channel message for `keys`, as commands.
fn invalidation_cmds(ctx: &Ctx, chunk: &[(String, i64)], commit_lsn: u64) -> Vec<redis::Cmd> {
    // A tombstone rather than DEL, so that fills racing with this invalidation fail their
    // compare-and-set; it needs to outlive only the fills that could race it.
    let l2: Vec<String> = chunk.iter().map(|(k, _)| ctx.key(k)).collect();
    let mut cmds = sets(
        l2.iter().map(|k| (k.as_str(), gucs::tombstone_ttl_s())),
        ctx.tombstone(),
    );
    let names: Vec<&str> = chunk.iter().map(|(k, _)| k.as_str()).collect();
    cmds.push(publish(&names, commit_lsn));
    cmds
}

/// The channel message by which every server sharing this Redis drops `tier_keys` from its L1.
fn publish(tier_keys: &[&str], commit_lsn: u64) -> redis::Cmd {
    let mut c = redis::cmd("PUBLISH");
    c.arg(channel::channel())
        .arg(channel::message(commit_lsn, tier_keys));
    c
}

fn deliver(
    link: &mut Conn,
    ctx: &Ctx,
    keys: &[(String, i64)],
    commit_lsn: u64,
) -> redis::RedisResult<()> {
    for chunk in keys.chunks(1000) {
        link.exchange(&invalidation_cmds(ctx, chunk, commit_lsn))?;
    }
    Ok(())
}

/// Runs `f` on this backend's connection, opening it if needed. Connection-level failures
/// close it and rest L2 for the retry interval; a server-side error (OOM, WRONGTYPE...) only
/// fails this operation.
fn with_connection<T>(
    f: impl FnMut(&mut Conn, &Ctx) -> redis::RedisResult<T>,
) -> Result<T, L2Error> {
    with_connection_as(Trust::Required, f)
}

/// Whether an operation needs L2's content to be trusted. Reads, fills and leases do; the
/// delivery worker's tombstones and its look at the map do not (tombstones sent under an
/// epoch that is about to move are moot, never harmful).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Trust {
    Required,
    NotNeeded,
}

fn with_connection_as<T>(
    trust: Trust,
    f: impl FnMut(&mut Conn, &Ctx) -> redis::RedisResult<T>,
) -> Result<T, L2Error> {
    let result = with_connection_inner(trust, f);
    if result.is_err() && interrupt_pending() {
        // A cancel or statement_timeout arrived while this backend waited on Redis: serve it
        // now, as any other wait in PostgreSQL would (where interrupts are held, as in the
        // COMMIT callback, nothing is pending by this test).
        pgrx::check_for_interrupts!();
    }
    result
}

fn with_connection_inner<T>(
    trust: Trust,
    mut f: impl FnMut(&mut Conn, &Ctx) -> redis::RedisResult<T>,
) -> Result<T, L2Error> {
    STATE.with(|cell| {
        let mut state = cell.borrow_mut();
        let url = gucs::redis_url();
        if url.is_empty() {
            state.con = None;
            return Err(L2Error::Off);
        }
        let cluster = gucs::redis_cluster();
        if state.url.as_c_str() != url || state.cluster != cluster {
            state.url = url.to_owned();
            state.cluster = cluster;
            state.con = None;
            state.resting_until = None;
        }
        if state.resting_until.is_some_and(|t| Instant::now() < t) {
            return Err(L2Error::Skipped);
        }
        // Only a connect or a message needs the URL as text: not every read.
        let url_text = || url.to_string_lossy().into_owned();
        let mut retries = 0;
        loop {
            let reused = state.con.is_some();
            if !reused {
                let connected = if cluster {
                    // The cluster's masters' run_ids are in its map's fingerprint, which the
                    // epoch carries: the names need no incarnation of their own.
                    Router::connect(&gucs::redis_seeds())
                        .map(|router| (Conn::Cluster(router), "c".to_string()))
                } else {
                    connect(&url_text()).map(|(link, run_id)| (Conn::Single(link), run_id))
                };
                match connected {
                    Ok((con, incarnation)) => {
                        state.con = Some(con);
                        state.incarnation = incarnation;
                        state.namespace_epoch = u64::MAX;
                    }
                    Err(e) => return Err(fail(&mut state, &url_text(), e, true)),
                }
            }
            let epoch = epoch();
            if state.namespace_epoch != epoch {
                state.namespace = match epoch {
                    0 => state.incarnation.clone(),
                    e => format!("{}-{e:x}", state.incarnation),
                };
                state.namespace_epoch = epoch;
            }
            if trust == Trust::Required {
                if let Some(fp) = state.con.as_ref().and_then(Conn::fingerprint) {
                    if fp != epoch as u32 {
                        // This backend's map may be the old one (the epoch moved after a
                        // failover this backend has not seen): one fresh map decides.
                        if reused && retries == 0 {
                            state.con = None;
                            retries += 1;
                            continue;
                        }
                        return Err(L2Error::Untrusted);
                    }
                }
            }
            let State {
                con,
                undelivered,
                namespace,
                ..
            } = &mut *state;
            let Some(con) = con.as_mut() else {
                return Err(L2Error::Skipped);
            };
            let ctx = Ctx {
                tombstone: std::cell::OnceCell::new(),
                incarnation: namespace,
                tagged: cluster,
            };
            let mut result = Ok(());
            if !undelivered.is_empty() {
                result = deliver(con, &ctx, undelivered, 0);
                if result.is_ok() {
                    undelivered.clear();
                }
            }
            match result.and_then(|_| f(con, &ctx)) {
                Ok(v) => {
                    if state.down_since.take().is_some() {
                        pgrx::log!(
                            "twotier: Redis at {} answers again",
                            gucs::redacted_url(&url_text())
                        );
                    }
                    state.resting_until = None;
                    return Ok(v);
                }
                // The reply may be half read: the stream cannot be reused either way.
                Err(e) if interrupted(&e) && interrupt_pending() => {
                    state.con = None;
                    return Err(L2Error::Interrupted);
                }
                // The cluster's map moved under this backend: this call is a miss, never
                // followed to another node (a read comes only from a master of the map the
                // epoch trusts), and the next call builds the map again.
                Err(e) if is_redirect(&e) => {
                    state.con = None;
                    return Err(L2Error::Redis(e));
                }
                // A connection kept since an earlier call may have been closed by a Redis
                // restart; one fresh connection decides whether Redis is really gone.
                // An interrupted read (EINTR) is retried the same way.
                Err(e)
                    if retries < 2
                        && (interrupted(&e)
                            || (reused
                                && (e.is_connection_dropped() || e.is_connection_refusal()))) =>
                {
                    state.con = None;
                    retries += 1;
                }
                Err(e) => {
                    let connection_lost = is_connection_error(&e);
                    return Err(fail(
                        &mut state,
                        &url_text(),
                        L2Error::Redis(e),
                        connection_lost,
                    ));
                }
            }
        }
    })
}

/// Whether the connection itself failed (rather than one command on it).
fn is_connection_error(e: &redis::RedisError) -> bool {
    e.is_io_error() || e.is_unrecoverable_error() || e.is_timeout()
}

/// A read with a timeout is not restarted after a signal handler runs (PostgreSQL signals
/// backends for cache invalidation and latches all the time): EINTR is not a Redis fault. The
/// reply may be half read, so the operation is retried on a fresh connection.
pub fn interrupted(e: &redis::RedisError) -> bool {
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .is_some_and(|io| io.kind() == std::io::ErrorKind::Interrupted)
}

fn fail(state: &mut State, url: &str, e: L2Error, connection_lost: bool) -> L2Error {
    state.last_error = Some(e.to_string());
    if connection_lost {
        // A timed-out request may still be answered later; the stream cannot be reused.
        state.con = None;
        state.resting_until = Some(Instant::now() + gucs::retry_interval());
        state.down_since.get_or_insert_with(SystemTime::now);
        let msg = format!(
            "twotier: Redis at {} is unreachable ({e}); answering from the source, next try in {} ms",
            gucs::redacted_url(url),
            gucs::retry_interval().as_millis()
        );
        warn_rate_limited(state, msg);
    } else {
        warn_rate_limited(
            state,
            format!(
                "twotier: Redis at {} failed a command: {e}",
                gucs::redacted_url(url)
            ),
        );
    }
    e
}

/// The commands that read the entry `entry` of the key `base` (the same name unless the
/// cache varies): its value and remaining life, and for a variant what its key holds.
fn read_cmds(ctx: &Ctx, base: &str, entry: &str, cmds: &mut Vec<redis::Cmd>) {
    let l2 = ctx.key(entry);
    if base != entry {
        let mut get = redis::cmd("GET");
        get.arg(ctx.key(base));
        cmds.push(get);
    }
    let mut get = redis::cmd("GET");
    get.arg(&l2);
    let mut pttl = redis::cmd("PTTL");
    pttl.arg(&l2);
    cmds.push(get);
    cmds.push(pttl);
}

/// The replies of [`read_cmds`] as a [`Read`].
fn parse_read(
    variant: bool,
    replies: &mut impl Iterator<Item = redis::Value>,
    at_us: i64,
) -> redis::RedisResult<Read> {
    let mut next = || replies.next().unwrap_or(redis::Value::Nil);
    let base: Option<Option<Vec<u8>>> = if variant {
        Some(redis::from_owned_redis_value(next())?)
    } else {
        None
    };
    let raw: Option<Vec<u8>> = redis::from_owned_redis_value(next())?;
    let pttl: i64 = redis::from_owned_redis_value(next())?;
    Ok(Read {
        lookup: match &base {
            // The variant's own token taken for its key's: shows what the check is for.
            Some(_) if gucs::test_variants_ignore_key() => {
                let own = raw.as_ref().and_then(|r| {
                    r.iter()
                        .position(|&b| b == b'\n')
                        .map(|cut| r[..cut].to_vec())
                });
                classify_variant(&own, raw)
            }
            Some(base) => classify_variant(base, raw),
            None => classify(raw),
        },
        remaining_s: (pttl > 0).then(|| (pttl + 999) / 1000),
        at_us,
        variant_base: base,
    })
}

/// The entry's value, its remaining life and Redis's clock, in one round trip: an entry
/// copied into L1 must not outlive its L2 original, and a fill must know how old its read is.
/// `base` is the key's tier key, `entry` the entry's (the same unless the cache varies).
pub fn read(base: &str, entry: &str) -> Result<Read, L2Error> {
    read_many(&[(base, entry)]).map(|mut reads| reads.remove(0))
}

/// [`read`] for many entries in one round trip, with one TIME per master, right after the
/// first entry that master serves: each entry's read time is its own master's clock, the
/// one its fill's age will be judged by (a cluster's masters' clocks may disagree). For the
/// entries after it the TIME ran before their GET, which can only make them look older.
pub fn read_many(entries: &[(&str, &str)]) -> Result<Vec<Read>, L2Error> {
    with_connection(|con, ctx| {
        // Each entry's commands, then its master (its last command's), then the TIMEs between.
        let mut per_entry: Vec<redis::Cmd> = Vec::with_capacity(entries.len() * 3);
        let mut ends = Vec::with_capacity(entries.len());
        for (base, entry) in entries {
            read_cmds(ctx, base, entry, &mut per_entry);
            ends.push(per_entry.len());
        }
        let masters: Vec<u16> = ends
            .iter()
            .map(|&end| con.master_of(&per_entry[end - 1]))
            .collect();
        let plan = time_plan(&masters);
        let mut cmds = Vec::with_capacity(per_entry.len() + plan.times);
        let mut per_entry = per_entry.into_iter();
        let mut start = 0;
        for (&end, &asks) in ends.iter().zip(&plan.asks) {
            cmds.extend(per_entry.by_ref().take(end - start));
            start = end;
            if asks {
                cmds.push(redis::cmd("TIME"));
            }
        }
        let mut replies = con.exchange(&cmds)?.into_iter();
        let mut reads = Vec::with_capacity(entries.len());
        let mut times = Vec::with_capacity(plan.times);
        for ((base, entry), &asks) in entries.iter().zip(&plan.asks) {
            reads.push(parse_read(base != entry, &mut replies, 0)?);
            if asks {
                times.push(time_us(replies.next().unwrap_or(redis::Value::Nil))?);
            }
        }
        for (read, &t) in reads.iter_mut().zip(&plan.time_of) {
            read.at_us = times[t];
        }
        Ok(reads)
    })
}

/// Where a read's TIMEs go: after the first entry of each master (`asks`), and which of
/// them (in order) each entry's read time is (`time_of`).
struct TimePlan {
    asks: Vec<bool>,
    time_of: Vec<usize>,
    times: usize,
}

fn time_plan(masters: &[u16]) -> TimePlan {
    let mut first: Vec<(u16, usize)> = Vec::new();
    let mut asks = Vec::with_capacity(masters.len());
    let mut time_of = Vec::with_capacity(masters.len());
    for &m in masters {
        match first.iter().find(|(master, _)| *master == m) {
            Some(&(_, t)) => {
                asks.push(false);
                time_of.push(t);
            }
            None => {
                first.push((m, first.len()));
                asks.push(true);
                time_of.push(first.len() - 1);
            }
        }
    }
    TimePlan {
        asks,
        time_of,
        times: first.len(),
    }
}

/// A TIME reply in microseconds.
fn time_us(reply: redis::Value) -> redis::RedisResult<i64> {
    let (secs, micros): (i64, i64) = redis::from_owned_redis_value(reply)?;
    Ok(secs * 1_000_000 + micros)
}

/// Fills the entry `entry` of the key `base` with `value` (None = negative entry) unless it
/// changed since `read`, or `read` is older than `twotier.tombstone_ttl_s`. Returns whether
/// the fill was applied.
pub fn fill(
    base: &str,
    entry: &str,
    read: &Read,
    value: Option<&str>,
    ttl_s: i64,
) -> Result<bool, L2Error> {
    let seen = match (&read.variant_base, &read.lookup) {
        // A variant's fill compares its key's content, whatever the variant held.
        (Some(base), _) => base.clone(),
        (None, Lookup::Absent { seen }) => seen.clone(),
        // Garbage that could not be parsed: it is replaced only if still the same garbage.
        (None, Lookup::Value(v)) => Some(v.clone()),
        (None, Lookup::Negative | Lookup::InFlight) => return Ok(false),
    };
    let window_us = gucs::tombstone_ttl_s() * 1_000_000;
    with_connection(|con, ctx| {
        // EVAL with the body: Redis keeps compiled scripts by their hash, and one command
        // needs no NOSCRIPT round trip.
        let value = value.map(str::as_bytes).unwrap_or(NEGATIVE);
        let eval = if base == entry {
            let l2 = ctx.key(entry);
            let mut eval = redis::cmd("EVAL");
            eval.arg(FILL_SCRIPT).arg(2).arg(&l2).arg(lease_key(&l2));
            match &seen {
                None => eval.arg("0").arg(""),
                Some(v) => eval.arg("1").arg(v.as_slice()),
            };
            eval.arg(value)
                .arg(ttl_s.max(1))
                .arg(read.at_us)
                .arg(window_us);
            eval
        } else {
            let (mode, seen) = match &seen {
                None => ("0", &b""[..]),
                Some(v) => ("1", v.as_slice()),
            };
            variant_fill(
                ctx, base, entry, mode, seen, value, ttl_s, read.at_us, window_us,
            )
        };
        let applied: i64 = con.call(&eval)?;
        Ok(applied == 1)
    })
}

/// `twotier.set`: the entry `entry` of the key `base` (the same unless the cache varies)
/// holds `value`, whatever it held.
pub fn set(base: &str, entry: &str, value: &str, ttl_s: i64) -> Result<(), L2Error> {
    with_connection(|con, ctx| {
        if base == entry {
            return con.call(
                redis::cmd("SET")
                    .arg(ctx.key(entry))
                    .arg(value)
                    .arg("EX")
                    .arg(ttl_s.max(1)),
            );
        }
        // Mode 2: whatever the key holds (no read to compare with, no age to check).
        let eval = variant_fill(ctx, base, entry, "2", b"", value.as_bytes(), ttl_s, 0, 0);
        con.call::<i64>(&eval).map(|_| ())
    })
}

/// VARIANT_FILL_SCRIPT's call for the variant `entry` of the key `base`; `mode` and `seen`
/// say what the key must still hold (see the script), the last argument is the token a first
/// fill after an absence derives.
#[allow(clippy::too_many_arguments)]
fn variant_fill(
    ctx: &Ctx,
    base: &str,
    entry: &str,
    mode: &str,
    seen: &[u8],
    value: &[u8],
    ttl_s: i64,
    read_at_us: i64,
    window_us: i64,
) -> redis::Cmd {
    let l2 = ctx.key(entry);
    let mut eval = redis::cmd("EVAL");
    eval.arg(VARIANT_FILL_SCRIPT)
        .arg(3)
        .arg(ctx.key(base))
        .arg(&l2)
        .arg(lease_key(&l2))
        .arg(mode)
        .arg(seen)
        .arg(value)
        .arg(ttl_s.max(1))
        .arg(read_at_us)
        .arg(window_us)
        .arg(format!("!gen:{}", ctx.tombstone()));
    eval
}

/// Replaces each key by a tombstone. Keys that cannot be delivered now are kept and sent
/// before this backend's next use of Redis.
pub fn invalidate(keys: &[(String, i64)], commit_lsn: u64) -> Result<(), L2Error> {
    if keys.is_empty() {
        return Ok(());
    }
    let result = with_connection(|con, ctx| deliver(con, ctx, keys, commit_lsn));
    if let Err(e) = &result {
        if !matches!(e, L2Error::Off) {
            STATE.with(|cell| cell.borrow_mut().undelivered.extend_from_slice(keys));
        }
    }
    result
}

/// The delivery worker's exchange: tombstones and the channel message for `tier_keys`, one
/// pipelined round trip per thousand keys. Until it succeeds the keys stay in the ledger.
pub fn deliver_batch(tier_keys: &[&str], lsn: u64) -> Result<(), L2Error> {
    // A key that several commits of the batch changed needs one tombstone (a hot row, or the
    // branch and teller rows of every tpcb-like transaction).
    let mut seen = std::collections::HashSet::with_capacity(tier_keys.len());
    let tier_keys: Vec<&str> = tier_keys
        .iter()
        .copied()
        .filter(|k| seen.insert(*k))
        .collect();
    with_connection_as(Trust::NotNeeded, |con, ctx| {
        for chunk in tier_keys.chunks(1000) {
            let l2: Vec<String> = chunk.iter().map(|k| ctx.key(k)).collect();
            let mut cmds = sets(
                l2.iter().map(|k| (k.as_str(), gucs::tombstone_ttl_s())),
                ctx.tombstone(),
            );
            cmds.push(publish(chunk, lsn));
            con.exchange(&cmds)?;
        }
        Ok(())
    })
}

/// SCANs `pattern` (a tier-key glob; never KEYS, which blocks Redis), keeps the tier keys
/// `keep` accepts, replaces them with tombstones batch by batch, and returns how many held a
/// live entry.
pub fn invalidate_matching(pattern: &str, keep: impl Fn(&str) -> bool) -> Result<i64, L2Error> {
    let ttl = gucs::tombstone_ttl_s();
    with_connection(|con, ctx| {
        let l2_pattern = ctx.pattern(pattern);
        let mut live = 0i64;
        // Each master SCANs its own keys; the tombstones go through the router, to wherever
        // each name lives.
        for m in 0..con.masters().len() {
            let mut cursor: u64 = 0;
            loop {
                let (next, batch): (u64, Vec<String>) = con.masters()[m].call(
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(&l2_pattern)
                        .arg("COUNT")
                        .arg(1000),
                )?;
                let matched: Vec<(String, String)> = batch
                    .into_iter()
                    .filter_map(|k| ctx.tier_key_of(&k).map(|t| (k, t)))
                    .filter(|(_, t)| keep(t))
                    .collect();
                if !matched.is_empty() {
                    let mut cmds: Vec<redis::Cmd> = matched
                        .iter()
                        .map(|(k, _)| {
                            let mut c = redis::cmd("GET");
                            c.arg(k);
                            c
                        })
                        .collect();
                    cmds.extend(sets(
                        matched.iter().map(|(k, _)| (k.as_str(), ttl)),
                        ctx.tombstone(),
                    ));
                    let names: Vec<&str> = matched.iter().map(|(_, t)| t.as_str()).collect();
                    cmds.push(publish(&names, 0));
                    let replies = con.exchange(&cmds)?;
                    live += replies
                        .into_iter()
                        .take(matched.len())
                        .map(|v| {
                            redis::from_owned_redis_value::<Option<Vec<u8>>>(v).unwrap_or(None)
                        })
                        .filter(|v| {
                            matches!(classify(v.clone()), Lookup::Value(_) | Lookup::Negative)
                        })
                        .count() as i64;
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(live)
    })
}

/// The delivery worker's look at the cluster: a fresh map (never one kept from an earlier
/// call, which could predate a failover) and its fingerprint. None for a single server.
pub fn cluster_fingerprint() -> Result<Option<u32>, L2Error> {
    if !gucs::redis_cluster() {
        return Ok(None);
    }
    STATE.with(|cell| cell.borrow_mut().con = None);
    with_connection_as(Trust::NotNeeded, |con, _| Ok(con.fingerprint()))
}

/// Health of this backend's L2 connection, for `twotier.status()`.
pub struct Health {
    pub configured: bool,
    pub reachable: Option<bool>,
    pub down_since: Option<SystemTime>,
    pub retry_in: Option<Duration>,
    pub last_error: Option<String>,
    pub undelivered: usize,
    pub url: String,
    pub incarnation: String,
    /// Redis's `maxmemory_policy`: every policy keeps the contract (docs/design.md, "Eviction
    /// policies"); shown so that an operator sees what the hit ratio is up against.
    pub maxmemory_policy: Option<String>,
    /// On a cluster: the fingerprint of this backend's map, and whether the L2 epoch trusts it.
    pub cluster: Option<(u32, bool)>,
}

/// Probes Redis with `INFO memory` (respecting the retry interval) and reports.
pub fn health() -> Health {
    // Not counted: the counter shows what the session's own calls cost.
    let counted = round_trips();
    let ping = with_connection_as(Trust::NotNeeded, |con, _| {
        con.call::<String>(redis::cmd("INFO").arg("memory"))
    });
    let maxmemory_policy = ping.as_ref().ok().and_then(|info| {
        info.lines()
            .find_map(|l| l.strip_prefix("maxmemory_policy:"))
            .map(|p| p.trim().to_string())
    });
    ROUND_TRIPS.with(|n| n.set(counted));
    STATE.with(|cell| {
        let state = cell.borrow();
        Health {
            configured: !gucs::redis_url().is_empty(),
            reachable: match &ping {
                Ok(_) => Some(true),
                Err(L2Error::Off) => None,
                Err(_) => Some(false),
            },
            down_since: state.down_since,
            retry_in: state
                .resting_until
                .and_then(|t| t.checked_duration_since(Instant::now())),
            last_error: state.last_error.clone(),
            undelivered: state.undelivered.len(),
            incarnation: state.incarnation.clone(),
            maxmemory_policy,
            cluster: state
                .con
                .as_ref()
                .and_then(Conn::fingerprint)
                .map(|fp| (fp, fp == epoch() as u32)),
            url: gucs::redacted_url(&gucs::redis_url().to_string_lossy()),
        }
    })
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use super::*;
    use pgrx::prelude::*;

    #[pg_test]
    fn incarnation_goes_after_the_prefix_and_comes_off_again() {
        let tier = "twotier:app:widget_config:v17:6f1c%3Ax";
        let l2 = l2_key("3f1c0a9be27d", tier);
        assert_eq!(l2, "twotier:3f1c0a9be27d:app:widget_config:v17:6f1c%3Ax");
        assert_eq!(tier_key_of("3f1c0a9be27d", &l2).as_deref(), Some(tier));
        // Keys of another incarnation, or not ours at all, are never mistaken for ours.
        assert_eq!(tier_key_of("000000000000", &l2), None);
        assert_eq!(
            tier_key_of("3f1c0a9be27d", "twotier:3f1c0a9be27dX:app"),
            None
        );
        // A SCAN pattern built for a tier prefix gets the same treatment.
        assert_eq!(
            l2_key("abc", "twotier:app:c:v1:*"),
            "twotier:abc:app:c:v1:*"
        );
    }

    #[pg_test]
    fn tombstones_and_markers_are_never_values() {
        assert!(matches!(
            classify(Some(b"!inval:1:2:3".to_vec())),
            Lookup::Absent { seen: Some(_) }
        ));
        assert_eq!(
            classify(Some(b"!inflight:1:2:3".to_vec())),
            Lookup::InFlight
        );
        assert_eq!(classify(Some(b"!none".to_vec())), Lookup::Negative);
        assert_eq!(classify(None), Lookup::Absent { seen: None });
        assert_eq!(
            classify(Some(b"{}".to_vec())),
            Lookup::Value(b"{}".to_vec())
        );
    }
}

#[cfg(test)]
mod time_plan_tests {
    use super::time_plan;

    #[test]
    fn one_time_per_master_after_its_first_entry() {
        // Five entries over masters 2, 0, 2, 1, 0: TIMEs after entries 0, 1 and 3.
        let plan = time_plan(&[2, 0, 2, 1, 0]);
        assert_eq!(plan.asks, vec![true, true, false, true, false]);
        assert_eq!(plan.time_of, vec![0, 1, 0, 2, 1]);
        assert_eq!(plan.times, 3);
        // One server: one TIME, after the first entry.
        let plan = time_plan(&[0, 0, 0]);
        assert_eq!(plan.asks, vec![true, false, false]);
        assert_eq!(plan.time_of, vec![0, 0, 0]);
        assert!(time_plan(&[]).asks.is_empty());
    }
}
