//! The read path of a cached function: L2 (Redis) then the source, filling L2 on the way
//! back unless the contract forbids it.

use crate::catalog::{self, CacheDef};
use crate::error::{CallError, Raise};
use crate::gucs;
use crate::invalidation;
use crate::keys;
use crate::l1::{self, L1Value};
use crate::l2_redis::{self, Lookup};
use crate::source;
use crate::stats::{Counter, Path};
use pgrx::pg_sys::{self, Datum, Oid};

extern "C-unwind" {
    // The fmgr entry point itself (pg_sys wraps it in a Rust fn), for DirectFunctionCall.
    #[link_name = "jsonb_in"]
    fn raw_jsonb_in(fcinfo: pg_sys::FunctionCallInfo) -> Datum;
}
use pgrx::PgTryBuilder;
use std::time::Instant;

fn log_event(event: &str, def: &CacheDef, key: &str, extra: &str) {
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

/// The flat bytes of a jsonb datum (4-byte varlena header, not toasted), as L1 stores them.
fn varlena_bytes<'a>(datum: Datum) -> &'a [u8] {
    unsafe {
        let ptr = datum.cast_mut_ptr::<pg_sys::varlena>();
        std::slice::from_raw_parts(ptr as *const u8, pgrx::varsize_any(ptr))
    }
}

/// Looks `key` up in cache `name`: returns the jsonb datum, or None for SQL NULL.
pub fn get(name: &str, key: &str) -> Option<Datum> {
    let started = Instant::now();
    catalog::accept_invalidations();
    let def = catalog::lookup(name);
    catalog::require_read(&def);
    if key.len() > gucs::max_key_bytes() {
        CallError::KeyTooLong {
            len: key.len(),
            max: gucs::max_key_bytes(),
        }
        .raise();
    }
    def.stats.bump(Counter::Calls);

    if let Some(reason) = bypass_reason(&def) {
        def.stats.bump(Counter::Bypasses);
        log_event("BYPASS", &def, key, &format!(" ({reason})"));
        return source::fetch(&def, key).map(|v| v.datum);
    }

    let tier_key = keys::full_key(&def.key_prefix, key);
    let use_l1 = gucs::l1_enabled() && l1::available();
    let hash = l1::hash_key(&tier_key);
    // Read before any fetch: a fill is refused if an invalidation moved it meanwhile.
    let generation = if use_l1 { l1::generation(hash) } else { 0 };
    if use_l1 {
        match l1::get(&tier_key, hash) {
            Some(L1Value::Value(datum)) => {
                def.stats.bump(Counter::L1Hits);
                def.stats.record(Path::L1Hit, started.elapsed());
                log_event("HIT", &def, key, " (l1)");
                return Some(datum);
            }
            Some(L1Value::Negative) => {
                def.stats.bump(Counter::NegativeHits);
                def.stats.record(Path::L1Hit, started.elapsed());
                log_event("HIT", &def, key, " (l1, no row)");
                return None;
            }
            None => {}
        }
    }
    let fill_l1 = |value: Option<Datum>, ttl: i64| {
        if use_l1 {
            if l1::fill(&tier_key, hash, generation, value.map(varlena_bytes), ttl) {
                def.stats.bump(Counter::Fills);
            } else {
                def.stats.bump(Counter::FillsRejected);
            }
        }
    };

    let (lookup, remaining_s) = match l2_redis::get_with_ttl(&tier_key) {
        Ok((lookup, remaining)) => (Ok(lookup), remaining),
        Err(e) => (Err(e), None),
    };
    let (seen, l2_usable) = match lookup {
        Ok(Lookup::Value(text)) => {
            match jsonb_from_text(&text) {
                Some(datum) => {
                    def.stats.bump(Counter::L2Hits);
                    fill_l1(Some(datum), remaining_s.unwrap_or(def.ttl_s).min(def.ttl_s));
                    def.stats.record(Path::L2Hit, started.elapsed());
                    log_event("HIT", &def, key, " (l2)");
                    return Some(datum);
                }
                None => {
                    def.stats.bump(Counter::RedisErrors);
                    pgrx::warning!("twotier: unreadable value in Redis for {}:{key}; replacing it from the source", def.name);
                    (Some(text), true)
                }
            }
        }
        Ok(Lookup::Negative) => {
            def.stats.bump(Counter::NegativeHits);
            fill_l1(
                None,
                remaining_s
                    .unwrap_or(def.negative_ttl_s)
                    .min(def.negative_ttl_s),
            );
            def.stats.record(Path::L2Hit, started.elapsed());
            log_event("HIT", &def, key, " (l2, no row)");
            return None;
        }
        Ok(Lookup::Absent { seen }) => (seen, true),
        // A commit is changing this key right now: what the source shows this snapshot may
        // be about to become old, so it is returned but stored nowhere.
        Ok(Lookup::InFlight) => {
            log_event("MISS", &def, key, " (commit in flight: no fill)");
            def.stats.bump(Counter::Misses);
            let value = source::fetch(&def, key);
            def.stats.record(Path::Miss, started.elapsed());
            return value.map(|v| v.datum);
        }
        Err(e) => {
            if e.is_fault() {
                def.stats.bump(Counter::RedisErrors);
            }
            (None, false)
        }
    };

    def.stats.bump(Counter::Misses);
    log_event("MISS", &def, key, "");
    let value = source::fetch(&def, key);
    let ttl = if value.is_some() {
        def.ttl_s
    } else {
        def.negative_ttl_s
    };
    let json = value.as_ref().map(|v| v.json.as_str());
    let mut invalidated_meanwhile = false;
    // A standby may lag its primary: what it reads must not become everyone's L2 entry.
    let l2_fill = l2_usable
        && json.is_none_or(|j| j.len() <= gucs::max_value_bytes())
        && !unsafe { pg_sys::RecoveryInProgress() };
    if l2_fill {
        match l2_redis::fill(&tier_key, &seen, json, ttl) {
            Ok(true) => {
                def.stats.bump(Counter::Fills);
                log_event("SET", &def, key, &format!(" TTL: {ttl}s"));
            }
            Ok(false) => {
                invalidated_meanwhile = true;
                def.stats.bump(Counter::FillsRejected);
                log_event("SET", &def, key, " rejected: invalidated while fetching");
            }
            Err(e) => {
                if e.is_fault() {
                    def.stats.bump(Counter::RedisErrors);
                }
            }
        }
    }
    if !invalidated_meanwhile {
        fill_l1(value.as_ref().map(|v| v.datum), ttl);
    }
    def.stats.record(Path::Miss, started.elapsed());
    value.map(|v| v.datum)
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

    #[pg_test]
    fn second_call_is_served_without_the_source() {
        setup("rt_hit");
        let first = Spi::get_one::<pgrx::JsonB>("SELECT cached_rt_hit('1')")
            .unwrap()
            .unwrap();
        let second = Spi::get_one::<pgrx::JsonB>("SELECT cached_rt_hit('1')")
            .unwrap()
            .unwrap();
        assert_eq!(first.0, second.0);
        assert_eq!(fetches("rt_hit"), 1);
        let none = Spi::get_one::<pgrx::JsonB>("SELECT cached_rt_hit('42')").unwrap();
        assert!(none.is_none());
        let none = Spi::get_one::<pgrx::JsonB>("SELECT cached_rt_hit('42')").unwrap();
        assert!(none.is_none());
        // An unknown key runs no nextval; the stats tell the source runs apart instead.
        let (misses, negative_hits) = Spi::get_two::<i64, i64>(
            "SELECT misses, negative_hits FROM twotier.stats WHERE cache = 'rt_hit'",
        )
        .unwrap();
        assert_eq!(misses, Some(2), "key 1 once, key 42 once");
        assert_eq!(
            negative_hits,
            Some(1),
            "the negative entry answers the second call for 42"
        );
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
