//! Durable file-system primitives: unique temporary names, create-and-fsync, directory fsync.
//!
//! kv-store's commit protocol is built on them, and they are public so that a crate keeping its
//! own small files beside a store (agent-pool's `agent.json` and transcripts) makes them
//! durable the same way instead of with a second copy of these few lines. The pattern: write
//! under a [`temp_path`] in the destination's directory, fsync, rename into place, then
//! [`sync_dir`] so the rename survives a power cut. A crash leaves the old state or the new
//! one, plus at worst a temporary whose name starts with [`TMP_PREFIX`], for its owner to
//! remove.
//!
//! Errors are [`IoError`]s rather than kv-store's [`Error`](crate::Error), so each caller
//! keeps its own error vocabulary: an `IoError` carries the operation and the path, which is
//! all a caller needs to build its own message (kv-store's `From` impl does exactly that).

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Prefix of every temporary name [`temp_path`] makes. Nothing else in a directory that uses
/// these helpers may start with it, so that whatever does is known to be litter of an
/// interrupted write.
pub const TMP_PREFIX: &str = ".tmp-";

/// A file-system call that failed: what was being done, to which path, and the operating
/// system's error.
#[derive(Debug, thiserror::Error)]
#[error("could not {op} {}", path.display())]
#[non_exhaustive]
pub struct IoError {
    /// What was being done ("create", "write", "fsync", "open directory", "fsync directory").
    pub op: &'static str,
    /// The file or directory involved.
    pub path: PathBuf,
    /// The operating system's error.
    #[source]
    pub source: io::Error,
}

impl IoError {
    fn new(op: &'static str, path: &Path, source: io::Error) -> IoError {
        IoError {
            op,
            path: path.to_owned(),
            source,
        }
    }
}

/// A temporary path in `dir`, unique within this process and among processes: `stem` says
/// what it is for (it shows in a directory listing after a crash).
pub fn temp_path(dir: &Path, stem: &str) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    dir.join(format!("{TMP_PREFIX}{stem}-{}-{n}", std::process::id()))
}

/// Creates `path`, which must not exist yet, with `bytes` and fsyncs it. The caller fsyncs the
/// directory (often after more files, or after renaming a whole temporary directory).
pub fn write_new(path: &Path, bytes: &[u8]) -> Result<(), IoError> {
    let mut f = File::create_new(path).map_err(|e| IoError::new("create", path, e))?;
    f.write_all(bytes)
        .map_err(|e| IoError::new("write", path, e))?;
    f.sync_all().map_err(|e| IoError::new("fsync", path, e))
}

/// fsyncs a directory so that creations and renames in it survive a power cut.
pub fn sync_dir(dir: &Path) -> Result<(), IoError> {
    let d = File::open(dir).map_err(|e| IoError::new("open directory", dir, e))?;
    d.sync_all()
        .map_err(|e| IoError::new("fsync directory", dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_new_writes_once_and_names_what_failed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        write_new(&path, b"hello").unwrap();
        sync_dir(dir.path()).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"hello");

        // An existing file is never overwritten: that is what makes a create a commit point.
        let err = write_new(&path, b"again").unwrap_err();
        assert_eq!((err.op, err.path.as_path()), ("create", path.as_path()));
        assert_eq!(err.source.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(
            err.to_string(),
            format!("could not create {}", path.display())
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"hello");

        let missing = dir.path().join("missing");
        let err = sync_dir(&missing).unwrap_err();
        assert_eq!((err.op, err.path), ("open directory", missing));
    }

    #[test]
    fn temp_paths_are_unique_and_marked() {
        let dir = Path::new("/d");
        let (a, b) = (temp_path(dir, "x"), temp_path(dir, "x"));
        assert_ne!(a, b);
        for p in [a, b] {
            assert_eq!(p.parent(), Some(dir));
            let name = p.file_name().unwrap().to_str().unwrap();
            assert!(name.starts_with(&format!("{TMP_PREFIX}x-")), "{name}");
        }
    }
}
