//! Locks and durable directories, the same way everywhere.
//!
//! Every lock in Correu guards a short critical section over plain data
//! (counters, maps, queues of settles) that is consistent at every step, so
//! a holder that panicked leaves data still fit to use: these helpers take
//! the guard of a poisoned lock instead of spreading the panic.

use std::path::Path;
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// The guard of `m`, poisoned or not.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A read guard of `l`, poisoned or not.
pub fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}

/// A write guard of `l`, poisoned or not.
pub fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(PoisonError::into_inner)
}

/// Makes the entries of `dir` durable: a file created, linked or renamed
/// into it survives a crash only once its directory is synced (blocking).
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}
