//! Shared-memory plumbing: asks the postmaster for space at preload and hands each subsystem
//! its region at startup. Without `shared_preload_libraries` nothing here runs and the
//! subsystems fall back to backend-local memory (and say so in `twotier.status()`).

use pgrx::pg_sys;
use std::ffi::CStr;

static mut PREV_REQUEST: pg_sys::shmem_request_hook_type = None;
static mut PREV_STARTUP: pg_sys::shmem_startup_hook_type = None;

pub fn init() {
    unsafe {
        if !pg_sys::process_shared_preload_libraries_in_progress {
            return;
        }
        PREV_REQUEST = pg_sys::shmem_request_hook;
        pg_sys::shmem_request_hook = Some(on_shmem_request);
        PREV_STARTUP = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(on_shmem_startup);
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_shmem_request() {
    unsafe {
        if let Some(prev) = PREV_REQUEST {
            prev();
        }
        pg_sys::RequestAddinShmemSpace(crate::stats::shmem_size());
        pg_sys::RequestAddinShmemSpace(crate::invalidation::ledger::shmem_size());
        crate::invalidation::ledger::request_lock();
        pg_sys::RequestAddinShmemSpace(crate::l1::shmem_size());
        crate::l1::request_locks();
    }
}

/// Finds or creates a named region; returns it and whether it already existed.
unsafe fn region(name: &CStr, size: usize) -> (*mut u8, bool) {
    let mut found = false;
    let ptr = unsafe { pg_sys::ShmemInitStruct(name.as_ptr(), size, &mut found) };
    (ptr.cast(), found)
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_shmem_startup() {
    unsafe {
        if let Some(prev) = PREV_STARTUP {
            prev();
        }
        let lock = &raw mut (*pg_sys::MainLWLockArray.add(21)).lock; // AddinShmemInitLock
        pg_sys::LWLockAcquire(lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let (ptr, found) = region(c"twotier stats", crate::stats::shmem_size());
        crate::stats::attach(ptr, !found);
        let (ptr, found) = region(c"twotier ledger", crate::invalidation::ledger::shmem_size());
        crate::invalidation::ledger::attach(ptr, !found);
        if crate::l1::shmem_size() > 0 {
            let (ptr, found) = region(c"twotier l1", crate::l1::shmem_size());
            crate::l1::attach(ptr, !found);
        }
        pg_sys::LWLockRelease(lock);
    }
}
