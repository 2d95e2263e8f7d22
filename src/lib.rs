//! twotier: cached SQL functions for PostgreSQL. See DESIGN.md for the contracts; each module
//! below owns one concern.

use pgrx::prelude::*;

mod api;
mod catalog;
mod error;
mod gucs;
mod invalidation;
mod keys;
mod l1;
mod l2;
mod read_through;
mod server_text;
mod shmem;
mod source;
mod spi;
mod stats;
mod typed_keys;
mod vary;

::pgrx::pg_module_magic!();

extension_sql_file!("../sql/twotier.sql", name = "twotier_catalog", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    gucs::init();
    shmem::init();
    invalidation::wal::init();
    if gucs::preloaded() {
        invalidation::delivery::register();
    }
    if gucs::preloaded() && gucs::l1_size_mb() > 0 {
        invalidation::listener::register();
    }
    catalog::init();
    invalidation::init();
}

#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec!["shared_preload_libraries = 'twotier'"]
    }
}
