//! The read path of a cached function: L1 (shared memory), L2 (Redis), then the source,
//! filling the tiers it missed on the way back unless the contract forbids it.

use crate::catalog::{self, CacheDef};
use crate::error::{CallError, Raise};
use crate::gucs;
use crate::invalidation;
use crate::invalidation::ledger::{self, Guarded};
use crate::keys;
use crate::l1::{self, L1Value};
use crate::l2::{self, Lookup};
use crate::source;
use crate::stats::{Counter, Path};
use pgrx::pg_sys::{self, Datum, Oid};

extern "C-unwind" {
    // The fmgr entry points themselves (pg_sys wraps them in Rust fns), for DirectFunctionCall.
    #[link_name = "jsonb_in"]
    fn raw_jsonb_in(fcinfo: pg_sys::FunctionCallInfo) -> Datum;
    #[link_name = "jsonb_out"]
    fn raw_jsonb_out(fcinfo: pg_sys::FunctionCallInfo) -> Datum;
}
use pgrx::PgTryBuilder;
use std::time::Instant;

/// `extra` stays unformatted unless the event is logged: an L1 hit must not allocate a message.
fn log_event(event: &str, def: &CacheDef, key: &str, extra: std::fmt::Arguments<'_>) {
    if gucs::log_events() {
        pgrx::log!("twotier {event}: {}:{key}{extra}", def.name);
    }
}

/// Why this call may not use the cache tiers at all, if it may not.
fn bypass_reason(def: &CacheDef) -> Option<&'static str> {
    if !gucs::enabled() {
        Some("twotier.enabled is off")
    } else if invalidation::wrote(&def.name) {
        Some("this transaction wrote a watched table")
    } else if unsafe { pg_sys::XactIsoLevel } >= pg_sys::XACT_REPEATABLE_READ as i32 {
        // A cached value may be newer than this transaction's snapshot.
        Some("REPEATABLE READ or SERIALIZABLE transaction")
    } else {
        None
    }
}

/// JSON text from L2 to a jsonb datum. Garbage in Redis must not become an ERROR for the
/// caller: a value that jsonb_in rejects is reported as None and treated as a miss.
fn jsonb_from_text(text: &[u8]) -> Option<Datum> {
    let mut owned = Vec::with_capacity(text.len() + 1);
    owned.extend_from_slice(text);
    if owned.contains(&0) {
        return None;
    }
    owned.push(0);
    PgTryBuilder::new(|| unsafe {
        Some(pg_sys::DirectFunctionCall1Coll(
            Some(raw_jsonb_in),
            Oid::INVALID,
            Datum::from(owned.as_ptr()),
        ))
    })
    .catch_others(|_| None)
    .execute()
}

/// JSON text from L2 as a json datum, handed over as it is: an L2 hit of a json-mode cache
/// parses nothing. Only what cannot be text (not UTF-8, a NUL) is refused, as a miss.
fn json_from_text(text: &[u8]) -> Option<Datum> {
    if std::str::from_utf8(text).is_err() || text.contains(&0) || text.is_empty() {
        return None;
    }
    unsafe {
        Some(Datum::from(pg_sys::cstring_to_text_with_len(
            text.as_ptr().cast(),
            text.len() as i32,
        )))
    }
}

/// L2's text as the datum the cache hands out (jsonb, or json for a json-mode cache).
fn native_from_text(text: &[u8], json: bool) -> Option<Datum> {
    if json {
        json_from_text(text)
    } else {
        jsonb_from_text(text)
    }
}

/// A value in the cache's own form converted to the form the caller asked for: a jsonb
/// cache read through get_json, or a json cache through get (or a `->` in SQL).
pub fn convert(value: Datum, stored_json: bool, want_json: bool) -> Datum {
    if stored_json == want_json {
        return value;
    }
    unsafe {
        if want_json {
            let out = pg_sys::DirectFunctionCall1Coll(Some(raw_jsonb_out), Oid::INVALID, value);
            pg_sys::cstring_to_text(out.cast_mut_ptr()).into()
        } else {
            let text = pgrx::varlena_to_byte_slice(value.cast_mut_ptr::<pg_sys::varlena>());
            jsonb_from_text(text).unwrap_or_else(|| {
                crate::error::InternalError::Spi {
                    what: "reading a json entry as jsonb",
                    code: 0,
                }
                .raise()
            })
        }
    }
}

/// The flat bytes of a jsonb datum (4-byte varlena header, not toasted), as L1 stores them.
fn varlena_bytes<'a>(datum: Datum) -> &'a [u8] {
    unsafe {
        let ptr = datum.cast_mut_ptr::<pg_sys::varlena>();
        std::slice::from_raw_parts(ptr as *const u8, pgrx::varsize_any(ptr))
    }
}

/// Whether this transaction may store what it reads in any tier. A transaction with an
/// assigned xid has written something: a value it reads may contain its own uncommitted rows
/// (`INSERT ... RETURNING cached_x(...)`, a data-modifying CTE) even before any trigger ran.
fn may_fill() -> bool {
    unsafe { pg_sys::GetTopTransactionIdIfAny() == pg_sys::InvalidTransactionId }
}

/// One call of a cached function, going down the tiers: [`Call::try_l1`],
/// [`Call::try_l2`], then [`Call::try_source`], which fills what the others missed.
struct Call<'a> {
    def: &'a CacheDef,
    key: &'a str,
    /// The tier key of the entry answering this caller: the key's own, or for a vary_by cache
    /// the key's followed by the caller's variant.
    entry_key: String,
    /// How much of `entry_key` is the key's tier key, which every invalidation names.
    base_len: usize,
    /// The entry's hash (where L1 keeps it) and its key's (generation, in-flight marks and
    /// the ledger): the same number unless the cache varies.
    hash: u64,
    gen_hash: u64,
    /// L1's generation for the key, read before any tier is asked: a fill is refused if an
    /// invalidation moved it meanwhile.
    generation: u64,
    use_l1: bool,
    /// Decided before the source runs: the cache's own query may assign an xid (nextval),
    /// which says nothing about what the caller's transaction wrote.
    may_fill: bool,
    started: Instant,
}

/// What L2 said when it had no answer for the caller.
enum L2Miss {
    /// L2 was not asked or did not answer: fill it not.
    Unused,
    /// A commit is changing this key right now: what the source shows this snapshot may be
    /// about to become old, so it is returned but stored nowhere.
    InFlight,
    /// Absent (or unreadable): a fill must find L2 as `read` saw it, and the ledger's
    /// generation for the key still at `gen`.
    Absent { read: l2::Read, gen: u64 },
}

impl<'a> Call<'a> {
    fn new(def: &'a CacheDef, key: &'a str, started: Instant) -> Self {
        let entry_key = catalog::entry_key(def, key);
        let base_len = if def.vary_by.is_empty() {
            entry_key.len()
        } else {
            keys::base_of(&entry_key).len()
        };
        let hash = l1::hash_key(&entry_key);
        let gen_hash = if base_len == entry_key.len() {
            hash
        } else {
            l1::hash_key(&entry_key[..base_len])
        };
        let use_l1 = gucs::l1_enabled() && l1::available() && l1::channel_ok();
        let generation = if l1::available() {
            l1::generation(gen_hash)
        } else {
            0
        };
        Call {
            def,
            key,
            entry_key,
            base_len,
            hash,
            gen_hash,
            generation,
            use_l1,
            may_fill: may_fill(),
            started,
        }
    }

    /// The tier key of the key this entry belongs to: what invalidations name.
    fn tier_key(&self) -> &str {
        &self.entry_key[..self.base_len]
    }

    fn log(&self, event: &str, extra: std::fmt::Arguments<'_>) {
        log_event(event, self.def, self.key, extra);
    }

    fn hit(
        &self,
        path: Path,
        counter: Counter,
        extra: std::fmt::Arguments<'_>,
        value: Option<Datum>,
    ) -> Option<Datum> {
        self.def.stats.bump(counter);
        self.def.stats.record(path, self.started.elapsed());
        self.log("HIT", extra);
        value
    }

    fn fill_l1(&self, value: Option<Datum>, ttl_s: i64) {
        if !self.use_l1 || !self.may_fill {
            return;
        }
        if l1::fill(
            &self.entry_key,
            self.hash,
            self.gen_hash,
            self.generation,
            value.map(varlena_bytes),
            ttl_s,
        ) {
            self.def.stats.bump(Counter::Fills);
        } else {
            self.def.stats.bump(Counter::FillsRejected);
        }
    }

    /// L1: `Some(answer)` on a hit.
    fn try_l1(&self) -> Option<Option<Datum>> {
        if !self.use_l1 {
            return None;
        }
        self.l1_answer("")
    }

    /// What L1 holds for the key, counted and logged as a hit (`how` is added to the log).
    fn l1_answer(&self, how: &str) -> Option<Option<Datum>> {
        match l1::get(&self.entry_key, self.hash, self.gen_hash)? {
            L1Value::Value(datum) => Some(self.hit(
                Path::L1Hit,
                Counter::L1Hits,
                format_args!(" (l1{how})"),
                Some(datum),
            )),
            L1Value::Negative => Some(self.hit(
                Path::L1Hit,
                Counter::NegativeHits,
                format_args!(" (l1, no row{how})"),
                None,
            )),
        }
    }

    /// L2: `Ok(answer)` on a hit, `Err(why not)` otherwise.
    fn try_l2(&self) -> Result<Option<Datum>, L2Miss> {
        // A commit on this server is between its PRE_COMMIT and its end for this key: L2 may
        // still hold the old value whether or not Redis got the in-flight marker.
        if l1::in_flight(self.gen_hash) {
            return Err(L2Miss::InFlight);
        }
        if gucs::redis_url().is_empty() {
            return Err(L2Miss::Unused);
        }
        let gen = match ledger::guard(self.gen_hash) {
            Guarded::Clear(gen) => gen,
            Guarded::Untrusted => {
                self.def.stats.bump(Counter::L2Skips);
                return Err(L2Miss::Unused);
            }
            // Committed, not yet in Redis: the source has it, L1 may keep it, L2 not yet.
            Guarded::Undelivered => {
                self.def.stats.bump(Counter::L2Skips);
                return Err(L2Miss::Unused);
            }
        };
        let read = match l2::read(self.tier_key(), &self.entry_key) {
            Ok(read) => read,
            Err(e) => {
                if e.is_fault() {
                    self.def.stats.bump(Counter::RedisErrors);
                }
                return Err(L2Miss::Unused);
            }
        };
        self.l2_answer(read, gen)
    }

    /// What an L2 read says for this key: `Ok(answer)` on a hit, `Err(why not)` otherwise.
    fn l2_answer(&self, read: l2::Read, gen: u64) -> Result<Option<Datum>, L2Miss> {
        let def = self.def;
        match &read.lookup {
            Lookup::Value(text) => match native_from_text(text, def.returns_json) {
                Some(datum) => {
                    let ttl = read.remaining_s.unwrap_or(def.ttl_s).min(def.ttl_s);
                    self.fill_l1(Some(datum), ttl);
                    Ok(self.hit(
                        Path::L2Hit,
                        Counter::L2Hits,
                        format_args!(" (l2)"),
                        Some(datum),
                    ))
                }
                None => {
                    def.stats.bump(Counter::RedisErrors);
                    pgrx::warning!(
                        "twotier: unreadable value in Redis for {}:{}; replacing it from the source",
                        def.name,
                        self.key
                    );
                    Err(L2Miss::Absent { read, gen })
                }
            },
            Lookup::Negative => {
                let ttl = read
                    .remaining_s
                    .unwrap_or(def.negative_ttl_s)
                    .min(def.negative_ttl_s);
                self.fill_l1(None, ttl);
                Ok(self.hit(
                    Path::L2Hit,
                    Counter::NegativeHits,
                    format_args!(" (l2, no row)"),
                    None,
                ))
            }
            Lookup::InFlight => Err(L2Miss::InFlight),
            Lookup::Absent { .. } => Err(L2Miss::Absent { read, gen }),
        }
    }

    /// Another backend is running the source query for this key (or one of its slot): wait
    /// for its L1 fill, a bounded time. `Some(answer)` when it came.
    fn wait_for_fetch(&self, holder: i32, wait: std::time::Duration) -> Option<Option<Datum>> {
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            pgrx::check_for_interrupts!();
            unsafe { pg_sys::pg_usleep(500) };
            if let Some(answer) = self.l1_answer(", after waiting for another fetch") {
                self.def.stats.bump(Counter::StampedeWaits);
                return Some(answer);
            }
            if l1::fetch_holder(self.hash) != holder {
                // That fetch ended without filling this key (another key of the slot, or a
                // value it could not store): run the query here.
                return None;
            }
        }
        None
    }

    /// Another server holds this key's stampede lease: poll L2 for its fill, a bounded time.
    /// `Some(answer)` when the fill came (served like any L2 hit, with every L2 check).
    fn wait_for_l2_fill(&self, wait: std::time::Duration) -> Option<Option<Datum>> {
        if !l2::lease_held(&self.entry_key).unwrap_or(false) {
            return None;
        }
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            pgrx::check_for_interrupts!();
            unsafe { pg_sys::pg_usleep(2000) };
            match self.try_l2() {
                Ok(answer) => {
                    self.def.stats.bump(Counter::StampedeWaits);
                    return Some(answer);
                }
                Err(L2Miss::Absent { .. }) => {
                    if !l2::lease_held(&self.entry_key).unwrap_or(false) {
                        return None;
                    }
                }
                Err(_) => return None,
            }
        }
        None
    }

    /// The source, then the fills that the contract allows.
    fn try_source(&self, l2: L2Miss) -> Option<Datum> {
        let def = self.def;
        // Stampede protection on this server: one backend runs the query for a key missing in
        // many at once, the others wait for its fill. Only a fetch that will fill L1 leads.
        let leads = self.use_l1 && self.may_fill && !matches!(l2, L2Miss::InFlight);
        let _lease = match gucs::stampede_wait().filter(|_| leads) {
            None => None,
            Some(wait) => match l1::begin_fetch(self.hash) {
                Ok(lease) => Some(lease),
                Err(0) => None,
                Err(holder) => {
                    if let Some(answer) = self.wait_for_fetch(holder, wait) {
                        return answer;
                    }
                    None
                }
            },
        };
        // Across servers (a primary and its standbys share entries): the primary's leader
        // takes a lease in Redis; a standby missing the key meanwhile waits for its fill.
        let mut leased = false;
        if let (Some(wait), L2Miss::Absent { .. }) = (gucs::stampede_wait(), &l2) {
            if unsafe { pg_sys::RecoveryInProgress() } {
                if let Some(answer) = self.wait_for_l2_fill(wait) {
                    return answer;
                }
            } else if self.may_fill {
                leased = l2::take_lease(&self.entry_key, wait * 2).unwrap_or(false);
            }
        }
        def.stats.bump(Counter::Misses);
        let value = source::fetch(def, self.key);
        if matches!(l2, L2Miss::InFlight) {
            self.log("MISS", format_args!(" (commit in flight: no fill)"));
            def.stats.record(Path::Miss, self.started.elapsed());
            return value.map(|v| v.datum);
        }
        self.log("MISS", format_args!(""));
        // Jittered, so that entries filled together do not all expire together.
        let ttl = gucs::jittered_ttl_s(if value.is_some() {
            def.ttl_s
        } else {
            def.negative_ttl_s
        });
        let json = value.as_ref().map(|v| v.json.as_str());
        let too_large = json.is_some_and(|j| j.len() > gucs::max_value_bytes());
        if too_large {
            def.stats.bump(Counter::TooLarge);
            self.log(
                "MISS",
                format_args!(" (value over twotier.max_value_kb: not stored in L2)"),
            );
        }
        let mut invalidated_meanwhile = false;
        if let L2Miss::Absent { read, gen } = &l2 {
            // A standby may lag its primary: what it reads must not become everyone's entry.
            // The ledger, not Redis, says whether a commit touched the key since the read
            // began: Redis may have lost that commit's tombstone already.
            let checked =
                |hash, gen| gucs::test_fill_trusts_redis() || ledger::still_clear(hash, gen);
            let l2_fill = self.may_fill
                && !too_large
                && !unsafe { pg_sys::RecoveryInProgress() }
                && checked(self.gen_hash, *gen);
            if leased && !l2_fill {
                l2::release_lease(&self.entry_key);
            }
            if l2_fill {
                match l2::fill(self.tier_key(), &self.entry_key, read, json, ttl) {
                    Ok(true) if !checked(self.gen_hash, *gen) => {
                        // A commit reached PRE_COMMIT between the check and the SET, and its
                        // tombstone may have landed (and been lost) before this fill: the
                        // key gets a tombstone of its own.
                        ledger::requeue(self.tier_key());
                        invalidated_meanwhile = true;
                        def.stats.bump(Counter::FillsRejected);
                        self.log("SET", format_args!(" undone: invalidated while storing"));
                    }
                    Ok(true) => {
                        def.stats.bump(Counter::Fills);
                        self.log("SET", format_args!(" TTL: {ttl}s"));
                    }
                    Ok(false) => {
                        invalidated_meanwhile = true;
                        def.stats.bump(Counter::FillsRejected);
                        self.log("SET", format_args!(" rejected: invalidated while fetching"));
                    }
                    Err(e) => {
                        if e.is_fault() {
                            def.stats.bump(Counter::RedisErrors);
                        }
                    }
                }
            }
        }
        if !invalidated_meanwhile {
            self.fill_l1(value.as_ref().map(|v| v.datum), ttl);
        }
        def.stats.record(Path::Miss, self.started.elapsed());
        value.map(|v| v.datum)
    }
}

/// Refuses keys that can name no entry: empty, or longer than twotier.max_key_bytes.
pub fn check_key(key: &str) {
    if key.is_empty() {
        CallError::EmptyKey.raise();
    }
    if key.len() > gucs::max_key_bytes() {
        CallError::KeyTooLong {
            len: key.len(),
            max: gucs::max_key_bytes(),
        }
        .raise();
    }
}

/// Looks `key` up in cache `name`: returns the value (json text if `want_json`, else jsonb),
/// or None for SQL NULL.
pub fn get(name: &str, key: &str, want_json: bool) -> Option<Datum> {
    let started = Instant::now();
    catalog::accept_invalidations();
    let def = catalog::lookup(name);
    catalog::require_read(&def);
    check_key(key);
    def.stats.bump(Counter::Calls);
    let value = if let Some(reason) = bypass_reason(&def) {
        def.stats.bump(Counter::Bypasses);
        log_event("BYPASS", &def, key, format_args!(" ({reason})"));
        source::fetch(&def, key).map(|v| v.datum)
    } else {
        let call = Call::new(&def, key, started);
        match call.try_l1() {
            Some(answer) => answer,
            None => match call.try_l2() {
                Ok(answer) => answer,
                Err(miss) => call.try_source(miss),
            },
        }
    };
    value.map(|v| convert(v, def.returns_json, want_json))
}

/// Refuses what a many-key call cannot answer key by key: NULLs, a key given twice (one row
/// each would be ambiguous), more keys than twotier.max_many_keys.
pub fn check_many(keys: &[Option<&str>]) -> Vec<String> {
    if keys.len() > gucs::max_many_keys() {
        CallError::ManyTooMany {
            n: keys.len(),
            max: gucs::max_many_keys(),
        }
        .raise();
    }
    let mut seen = std::collections::HashSet::with_capacity(keys.len());
    let mut out = Vec::with_capacity(keys.len());
    for (i, key) in keys.iter().enumerate() {
        let Some(key) = key else {
            CallError::ManyNull(i + 1).raise();
        };
        check_key(key);
        if !seen.insert(*key) {
            CallError::ManyDuplicate(key.to_string()).raise();
        }
        out.push(key.to_string());
    }
    out
}

/// Many keys of cache `name` in one call: L1 for each, then one pipelined round trip to L2
/// for every key L1 lacked, then the source (its prepared plan) for the rest, each fill under
/// the same guards as a single read. Answers in the order of `keys`.
pub fn get_many(name: &str, keys: &[String], want_json: bool) -> Vec<Option<Datum>> {
    let started = Instant::now();
    catalog::accept_invalidations();
    let def = catalog::lookup(name);
    catalog::require_read(&def);
    def.stats.add(Counter::Calls, keys.len() as u64);
    let out = |values: Vec<Option<Datum>>| -> Vec<Option<Datum>> {
        values
            .into_iter()
            .map(|v| v.map(|v| convert(v, def.returns_json, want_json)))
            .collect()
    };
    if let Some(reason) = bypass_reason(&def) {
        def.stats.add(Counter::Bypasses, keys.len() as u64);
        return out(keys
            .iter()
            .map(|key| {
                log_event("BYPASS", &def, key, format_args!(" ({reason})"));
                source::fetch(&def, key).map(|v| v.datum)
            })
            .collect());
    }
    let calls: Vec<Call> = keys.iter().map(|k| Call::new(&def, k, started)).collect();
    let mut answers: Vec<Option<Option<Datum>>> = calls.iter().map(Call::try_l1).collect();
    let pending: Vec<usize> = (0..calls.len()).filter(|&i| answers[i].is_none()).collect();
    let mut misses: Vec<(usize, L2Miss)> = Vec::with_capacity(pending.len());
    if !pending.is_empty() {
        for (i, result) in pending.iter().zip(l2_batch(&def, &calls, &pending)) {
            match result {
                Ok(answer) => answers[*i] = Some(answer),
                Err(miss) => misses.push((*i, miss)),
            }
        }
    }
    for (i, miss) in misses {
        answers[i] = Some(calls[i].try_source(miss));
    }
    out(answers.into_iter().map(Option::flatten).collect())
}

/// L2 for the keys `pending` of `calls`, in one round trip: each answer as `try_l2` gives it.
fn l2_batch(
    def: &CacheDef,
    calls: &[Call],
    pending: &[usize],
) -> Vec<Result<Option<Datum>, L2Miss>> {
    // A commit in flight on this server for a key: not asked, and filled nowhere (see try_l2).
    let in_flight: Vec<bool> = pending
        .iter()
        .map(|&i| l1::in_flight(calls[i].gen_hash))
        .collect();
    let answer_unasked = || -> Vec<Result<Option<Datum>, L2Miss>> {
        in_flight
            .iter()
            .map(|&f| Err(if f { L2Miss::InFlight } else { L2Miss::Unused }))
            .collect()
    };
    if gucs::redis_url().is_empty() {
        return answer_unasked();
    }
    if !ledger::l2_trusted() {
        def.stats.add(Counter::L2Skips, pending.len() as u64);
        return answer_unasked();
    }
    // Each key's ledger generation, read before L2 as in a single read; a key with an
    // undelivered invalidation is not asked.
    let gens: Vec<Option<u64>> = pending
        .iter()
        .zip(&in_flight)
        .map(|(&i, &f)| match ledger::guard(calls[i].gen_hash) {
            Guarded::Clear(gen) if !f => Some(gen),
            Guarded::Undelivered if !f => {
                def.stats.bump(Counter::L2Skips);
                None
            }
            _ => None,
        })
        .collect();
    let tier_keys: Vec<(&str, &str)> = pending
        .iter()
        .zip(&gens)
        .filter(|(_, g)| g.is_some())
        .map(|(&i, _)| (calls[i].tier_key(), calls[i].entry_key.as_str()))
        .collect();
    let mut reads = if tier_keys.is_empty() {
        Vec::new().into_iter()
    } else {
        match l2::read_many(&tier_keys) {
            Ok(reads) => reads.into_iter(),
            Err(e) => {
                if e.is_fault() {
                    def.stats.bump(Counter::RedisErrors);
                }
                return answer_unasked();
            }
        }
    };
    pending
        .iter()
        .zip(in_flight.iter().zip(&gens))
        .map(|(&i, (&f, gen))| {
            if f {
                return Err(L2Miss::InFlight);
            }
            let Some(gen) = gen else {
                return Err(L2Miss::Unused);
            };
            match reads.next() {
                Some(read) => calls[i].l2_answer(read, *gen),
                None => Err(L2Miss::Unused),
            }
        })
        .collect()
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    /// Each test gets its own table, sequence and cache: tests share one database.
    fn setup(name: &str) {
        Spi::run(&format!(
            "CREATE TABLE {name}(k int PRIMARY KEY, v text);
             INSERT INTO {name} VALUES (1, 'one'), (2, 'two');
             CREATE SEQUENCE {name}_fetches;
             SELECT twotier.define('{name}', $q$SELECT jsonb_build_object('v', v, 'n', nextval('{name}_fetches'))
                                            FROM {name} WHERE k = $1::int$q$, '5 min', ARRAY['{name}(k)'])"
        ))
        .expect("define");
    }

    fn fetches(name: &str) -> i64 {
        Spi::get_one::<i64>(&format!("SELECT last_value FROM {name}_fetches"))
            .unwrap()
            .unwrap()
    }

    /// A #[pg_test] runs in one transaction, and `setup` gave it an xid (CREATE TABLE): like
    /// `INSERT ... RETURNING cached_x(...)`, it has written, so it must fill no tier, and every
    /// call runs the source. (Hits after a miss are the integration tests' business.)
    #[pg_test]
    fn a_transaction_with_an_xid_fills_nothing() {
        setup("rt_xid");
        let first = Spi::get_one::<pgrx::JsonB>("SELECT cached_rt_xid('1')")
            .unwrap()
            .unwrap();
        let second = Spi::get_one::<pgrx::JsonB>("SELECT cached_rt_xid('1')")
            .unwrap()
            .unwrap();
        assert_eq!(first.0["v"], second.0["v"]);
        assert_eq!(
            fetches("rt_xid"),
            2,
            "the second call went to the source again"
        );
        let (fills, misses) = Spi::get_two::<i64, i64>(
            "SELECT fills, misses FROM twotier.stats WHERE cache = 'rt_xid'",
        )
        .unwrap();
        assert_eq!(fills, Some(0), "nothing was stored in any tier");
        assert_eq!(misses, Some(2));
    }

    #[pg_test]
    fn a_writing_transaction_reads_its_own_writes() {
        setup("rt_ryw");
        Spi::get_one::<pgrx::JsonB>("SELECT cached_rt_ryw('2')").unwrap();
        // #[pg_test] runs inside one transaction: after this UPDATE it is a writer of `rt`.
        Spi::run("UPDATE rt_ryw SET v = 'changed' WHERE k = 2").unwrap();
        let v = Spi::get_one::<String>("SELECT cached_rt_ryw('2')->>'v'")
            .unwrap()
            .unwrap();
        assert_eq!(v, "changed");
        let bypasses =
            Spi::get_one::<i64>("SELECT bypasses FROM twotier.stats WHERE cache = 'rt_ryw'")
                .unwrap()
                .unwrap();
        assert_eq!(bypasses, 1);
    }

    #[pg_test(
        error = "twotier: the cache query must return exactly one column of type jsonb, it returns 1 column(s): text"
    )]
    fn define_refuses_a_query_of_the_wrong_shape() {
        Spi::run("CREATE TABLE bad(k int); SELECT twotier.define('bad', 'SELECT k::text FROM bad WHERE k = $1::int', '1 min', '{}')")
            .unwrap();
    }
}
