//! Errors that reach a caller, one enum per subsystem, each mapped to a deliberate SQLSTATE
//! with a hint where the user can act. Redis faults are deliberately absent: they never reach
//! a caller as an ERROR (see `l2_redis::L2Error`, which is logged and counted instead).

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
}

/// Problems with the arguments of a cache call.
#[derive(Debug, Error)]
pub enum CallError {
    #[error("twotier: key of {len} bytes exceeds twotier.max_key_bytes ({max})")]
    KeyTooLong { len: usize, max: usize },
    #[error("twotier: the query of cache \"{0}\" returned more than one row for one key")]
    TooManyRows(String),
    #[error("twotier: cannot PREPARE a transaction that changed tables watched by a cache")]
    PrepareWithInvalidations,
    #[error("twotier: cache \"{cache}\" reads {table}, which has row-level security")]
    RowSecurity { cache: String, table: String },
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
            CatalogError::QueryShape(_) => PgSqlErrorCode::ERRCODE_DATATYPE_MISMATCH,
        }
    }
    fn hint(&self) -> Option<String> {
        match self {
            CatalogError::UnknownCache(_) => {
                Some("Caches are created with twotier.define(); SELECT name FROM twotier.caches lists them.".into())
            }
            CatalogError::QueryShape(_) => Some(
                "Select a single jsonb expression, e.g. SELECT to_jsonb(t) FROM t WHERE id = $1::int or jsonb_build_object(...)."
                    .into(),
            ),
        }
    }
}

impl Raise for CallError {
    fn sqlstate(&self) -> PgSqlErrorCode {
        match self {
            CallError::KeyTooLong { .. } => PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            CallError::TooManyRows(_) => PgSqlErrorCode::ERRCODE_CARDINALITY_VIOLATION,
            CallError::PrepareWithInvalidations => PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            CallError::RowSecurity { .. } => PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
        }
    }
    fn hint(&self) -> Option<String> {
        match self {
            CallError::KeyTooLong { .. } => Some("Raise twotier.max_key_bytes, or cache by a shorter key such as an id.".into()),
            CallError::TooManyRows(_) => {
                Some("A cache query must return at most one row per key: add a unique condition, LIMIT 1 or aggregate.".into())
            }
            CallError::PrepareWithInvalidations => {
                Some("Commit it directly; invalidations cannot be carried across PREPARE TRANSACTION.".into())
            }
            CallError::RowSecurity { .. } => Some(
                "One answer for every caller would leak rows across policies: redefine the cache with vary_by => ARRAY['role', ...] naming what the policies depend on."
                    .into(),
            ),
        }
    }
}
