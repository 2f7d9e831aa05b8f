//! Locks, durable directories and private files, the same way everywhere.
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

/// Opens `path` for writing, created `0600` if new (then truncated): mail
/// and queued messages are readable by their owner only (the process, and
/// Dovecot running as the same user), whatever the umask.
pub fn create_private(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

/// Writes `data` to a private file (`0600` when created).
pub fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    create_private(path)?.write_all(data)
}

/// Makes `dir` and its missing parents, each new one `0700`.
pub fn create_private_dirs(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Whether a file can be made, written, synced and removed in `dir` now
/// (a full disk or a read-only volume fails it): for readiness checks.
/// Blocking.
pub fn probe_writable(dir: &Path) -> Result<(), String> {
    use std::io::Write;
    let path = dir.join(format!(".correu-ready.{}", std::process::id()));
    let said = |what: &str, e: std::io::Error| format!("{}: cannot {what}: {e}", dir.display());
    let result = create_private(&path)
        .map_err(|e| said("create a file", e))
        .and_then(|mut f| {
            f.write_all(b"ready\n")
                .and_then(|()| f.sync_data())
                .map_err(|e| said("write a file", e))
        });
    let removed = std::fs::remove_file(&path);
    result?;
    removed.map_err(|e| said("remove a file", e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn private_files_and_directories_whatever_the_umask() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("a/b/c");
        create_private_dirs(&d).unwrap();
        for p in ["a", "a/b", "a/b/c"] {
            let mode = std::fs::metadata(dir.path().join(p))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o700, "{p}");
        }
        let f = d.join("m");
        write_private(&f, b"x").unwrap();
        assert_eq!(
            std::fs::metadata(&f).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(probe_writable(&d), Ok(()));
        assert!(probe_writable(&dir.path().join("missing")).is_err());
    }
}
