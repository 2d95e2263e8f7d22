//! Errors that reach a caller, one enum per subsystem, each mapped to a deliberate SQLSTATE
//! with a hint where the user can act. Redis faults are deliberately absent: they never reach
//! a caller as an ERROR (see `l2::L2Error`, which is logged and counted instead).

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};
use thiserror::Error;

/// Problems with a cache's definition or with a call naming a cache.
#[derive(Debug, Error)]
pub enum CatalogError {
    #[error("twotier: cache \"{0}\" does not exist")]
    UnknownCache(String),
    #[error(
        "twotier: the cache query must return exactly one column of type jsonb, it returns {0}"
    )]
    QueryShape(String),
    #[error("twotier: the query's dependencies cannot be recorded: {0}")]
    Dependencies(String),
    #[error("twotier: watch expression {expression:?} gives {found} value(s), the key has {parts} part(s)")]
    WatchArity {
        expression: String,
        found: usize,
        parts: usize,
    },
}

/// Problems with the arguments of a cache call.
#[derive(Debug, Error)]
pub enum CallError {
    #[error("twotier: key of {len} bytes exceeds twotier.max_key_bytes ({max})")]
    KeyTooLong { len: usize, max: usize },
    #[error("twotier: a cache key cannot be NULL")]
    NullKey,
    #[error("twotier: a cache key cannot be empty")]
    EmptyKey,
    #[error("twotier: an empty pattern matches no key")]
    EmptyPattern,
    #[error("twotier: the keys query of warm() failed: {0}")]
    WarmQuery(String),
    #[error("twotier: the query of cache \"{0}\" returned more than one row for one key")]
    TooManyRows(String),
    #[error("twotier: cannot PREPARE a transaction that changed tables watched by a cache")]
    PrepareWithInvalidations,
    #[error("twotier: cache \"{cache}\" reads {table}, which has row-level security")]
    RowSecurity { cache: String, table: String },
    #[error("twotier: cache \"{cache}\" would read the temporary table {table}")]
    TempRelation { cache: String, table: String },
    #[error("twotier: key {key:?} is not the canonical text of its value{}", canonical.as_ref().map(|c| format!(" (that is {c:?})")).unwrap_or_default())]
    KeyNotCanonical {
        key: String,
        canonical: Option<String>,
    },
    #[error("twotier: key {key:?} does not have the {parts} parts of this cache's key")]
    KeyParts { key: String, parts: usize },
    #[error(
        "twotier: key_text takes the key's parts as separate arguments, not as a VARIADIC array"
    )]
    KeyTextArray,
    #[error("twotier: values of type {typ} cannot be cache keys: {why}")]
    KeyType { typ: String, why: &'static str },
    #[error("twotier: key type {0} does not exist")]
    UnknownKeyType(String),
    #[error("twotier: the query does not use ${0}")]
    UnusedParameter(usize),
    #[error("twotier: key {0} of a many-key call is NULL")]
    ManyNull(usize),
    #[error("twotier: key {0:?} appears more than once in a many-key call")]
    ManyDuplicate(String),
    #[error("twotier: {n} keys in one call exceed twotier.max_many_keys ({max})")]
    ManyTooMany { n: usize, max: usize },
    #[error("twotier: cannot call {0} within a security-restricted operation")]
    SecurityRestricted(&'static str),
    #[error("twotier: this cache varies by {0}, and its setting is not set")]
    VaryUnset(String),
    #[error("twotier: this cache varies by {0}, and its setting is not JSON")]
    VaryNotJson(String),
}

/// Raises an ERROR inside a security-restricted operation (ANALYZE, VACUUM, REINDEX, CREATE
/// INDEX, REFRESH MATERIALIZED VIEW): the code running there is a table owner's, started on
/// behalf of whoever ran the command, often a superuser. No twotier entry point runs there.
pub fn refuse_restricted(what: &'static str) {
    if unsafe { pgrx::pg_sys::InSecurityRestrictedOperation() } {
        CallError::SecurityRestricted(what).raise();
    }
}

pub trait Raise {
    fn sqlstate(&self) -> PgSqlErrorCode;
    fn hint(&self) -> Option<String>;
    fn raise(&self) -> !
    where
        Self: std::fmt::Display,
    {
        let mut report = ErrorReport::new(self.sqlstate(), self.to_string(), "twotier");
        if let Some(h) = self.hint() {
            report = report.set_hint(h);
        }
        report.report(PgLogLevel::ERROR);
        unreachable!("ERROR does not return")
    }
}

impl Raise for CatalogError {
    fn sqlstate(&self) -> PgSqlErrorCode {
        match self {
            CatalogError::UnknownCache(_) => PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            CatalogError::Dependencies(_) => PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            CatalogError::QueryShape(_) | CatalogError::WatchArity { .. } => {
                PgSqlErrorCode::ERRCODE_DATATYPE_MISMATCH
            }
        }
    }
    fn hint(&self) -> Option<String> {
        match self {
            CatalogError::UnknownCache(_) => {
                Some("Caches are created with twotier.define(); SELECT name FROM twotier.caches lists them.".into())
            }
            CatalogError::Dependencies(_) => Some(
                "The query must be one that a SQL function with BEGIN ATOMIC can hold (no utility statements); the ERROR above says what PostgreSQL refused."
                    .into(),
            ),
            CatalogError::QueryShape(_) => Some(
                "Select a single jsonb expression, e.g. SELECT to_jsonb(t) FROM t WHERE id = $1::int or jsonb_build_object(...)."
                    .into(),
            ),
            CatalogError::WatchArity { .. } => Some(
                "List the row's values that make up the key, in the key's order, e.g. 'translations(tenant_id, locale)'."
                    .into(),
            ),
        }
    }
}

impl Raise for CallError {
    fn sqlstate(&self) -> PgSqlErrorCode {
        match self {
            CallError::KeyTooLong { .. } => PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            CallError::NullKey => PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
            CallError::EmptyKey | CallError::EmptyPattern | CallError::WarmQuery(_) => {
                PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE
            }
            CallError::TooManyRows(_) => PgSqlErrorCode::ERRCODE_CARDINALITY_VIOLATION,
            CallError::PrepareWithInvalidations => PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            CallError::RowSecurity { .. } | CallError::TempRelation { .. } => {
                PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE
            }
            CallError::KeyNotCanonical { .. } | CallError::KeyParts { .. } => {
                PgSqlErrorCode::ERRCODE_INVALID_TEXT_REPRESENTATION
            }
            CallError::KeyTextArray | CallError::KeyType { .. } => {
                PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED
            }
            CallError::UnknownKeyType(_) => PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            CallError::UnusedParameter(_) => PgSqlErrorCode::ERRCODE_INDETERMINATE_DATATYPE,
            CallError::ManyNull(_) => PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
            CallError::ManyDuplicate(_) => PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            CallError::ManyTooMany { .. } => PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            CallError::SecurityRestricted(_) => PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            // What the policies would make of the same setting: no caller, no answer.
            CallError::VaryUnset(_) => PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            CallError::VaryNotJson(_) => PgSqlErrorCode::ERRCODE_INVALID_TEXT_REPRESENTATION,
        }
    }
    fn hint(&self) -> Option<String> {
        match self {
            CallError::KeyTooLong { .. } => Some("Raise twotier.max_key_bytes, or cache by a shorter key such as an id.".into()),
            CallError::NullKey | CallError::EmptyKey => {
                Some("Pass the key the cache's query takes as $1; filter NULL or empty keys out before the call.".into())
            }
            CallError::EmptyPattern => Some("Use * to invalidate every key of the cache, or twotier.flush(cache) to do it in O(1).".into()),
            CallError::WarmQuery(_) => Some("Pass a SELECT returning the keys as one text column.".into()),
            CallError::TooManyRows(_) => {
                Some("A cache query must return at most one row per key: add a unique condition, LIMIT 1 or aggregate.".into())
            }
            CallError::PrepareWithInvalidations => {
                Some("Commit it directly; invalidations cannot be carried across PREPARE TRANSACTION.".into())
            }
            CallError::TempRelation { .. } => Some(
                "A source table of the cache is gone (dropped or renamed) and a session's temporary table has its name: restore the table or redefine the cache."
                    .into(),
            ),
            CallError::KeyNotCanonical { .. } | CallError::KeyParts { .. } => Some(
                "Call the cache's cached_<name>(...) function with typed arguments, or twotier.key_text(...) to get a key's text: the triggers invalidate only that form."
                    .into(),
            ),
            CallError::KeyTextArray => Some("Write twotier.key_text(a, b), not twotier.key_text(VARIADIC ARRAY[a, b]).".into()),
            CallError::KeyType { .. } => Some("Cast the value to a type with one text per value (int, bigint, text, uuid, date, timestamptz, ...).".into()),
            CallError::UnknownKeyType(_) => Some("Name a type visible on your search_path, e.g. ARRAY['uuid'] or ARRAY['int', 'text'].".into()),
            CallError::UnusedParameter(_) => Some("Refer to every part of the key in the query: $1, $2, ... in order.".into()),
            CallError::ManyNull(_) => Some("Filter NULL keys out before the call (array_remove(keys, NULL)).".into()),
            CallError::ManyDuplicate(_) => Some("Pass each key once (ARRAY(SELECT DISTINCT unnest(keys)))".into()),
            CallError::ManyTooMany { .. } => Some("Split the keys into several calls, or ask a superuser to raise twotier.max_many_keys.".into()),
            CallError::SecurityRestricted(_) => Some(
                "ANALYZE, VACUUM, REINDEX, CREATE INDEX and REFRESH MATERIALIZED VIEW run code of a table's owner on behalf of whoever started them; call twotier outside index expressions and materialized views."
                    .into(),
            ),
            CallError::VaryUnset(_) | CallError::VaryNotJson(_) => Some(
                "Set it for the request first, as PostgREST does: SELECT set_config('request.jwt.claims', '{\"sub\": ...}', true). A caller without it has no variant of its own, so it is refused rather than served one."
                    .into(),
            ),
            CallError::RowSecurity { .. } => Some(
                "One answer for every caller would leak rows across policies: redefine the cache with vary_by => ARRAY['role', 'request.jwt.claims->>sub', ...] naming what the policies depend on."
                    .into(),
            ),
        }
    }
}

/// Failures of twotier's own machinery (not of a caller's input): the SPI calls that read or
/// write its catalog. Not XX000: an operator can act on these (a damaged or
/// hand-edited catalog, a missing privilege of the extension's owner).
#[derive(Debug, Error)]
pub enum InternalError {
    #[error("twotier: {what} failed (SPI code {code})")]
    Spi { what: &'static str, code: i32 },
    #[error("twotier: moving cache {cache} to a new version failed: {detail}")]
    NewVersion { cache: String, detail: String },
}

impl Raise for InternalError {
    fn sqlstate(&self) -> PgSqlErrorCode {
        PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE
    }
    fn hint(&self) -> Option<String> {
        Some("Check that the twotier schema is intact (ALTER EXTENSION twotier UPDATE, or drop and re-create it) and see the server log.".into())
    }
}
