//! The one error type of kv-store: every way a save, load or maintenance step can fail.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong in kv-store.
///
/// Each message says what happened, to which file or cache, and what to do next.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O call failed.
    #[error("could not {op} {path}")]
    Io {
        /// What was being done ("create", "read", "fsync", ...).
        op: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// The disk (or quota) is full; the previously committed state is untouched.
    #[error(
        "no space left while writing {path}: free some disk space (or run garbage collection) and \
         save again; the last saved state is intact"
    )]
    DiskFull {
        /// The file being written.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// A cache name that cannot be used as a file name.
    #[error("invalid cache name {name:?}: {reason}")]
    InvalidName {
        /// The name as given.
        name: String,
        /// Which rule it breaks.
        reason: &'static str,
    },
    /// No manifest exists under that name.
    #[error("no saved cache named {name:?} in {root}")]
    NotFound {
        /// The cache name.
        name: String,
        /// The store's root directory.
        root: PathBuf,
    },
    /// A segment file is not a valid safetensors file.
    #[error(
        "segment {path} is not a valid safetensors file: it is damaged; delete the cache and rebuild it"
    )]
    BadSafetensors {
        /// The segment file.
        path: PathBuf,
        /// What the safetensors parser said.
        #[source]
        source: safetensors::SafeTensorError,
    },
    /// A file's agentkv metadata is missing, unparsable or inconsistent with its tensors.
    #[error("{path} is damaged or not an agentkv file: {detail}; delete the cache and rebuild it")]
    BadMetadata {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A file was written by a newer (or unknown) version of the format.
    #[error(
        "{path} uses {kind} format version {found}, this build reads up to {supported}: upgrade agentkv"
    )]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// "segment" or "manifest".
        kind: &'static str,
        /// The version found in the file.
        found: u32,
        /// The newest version this build understands.
        supported: u32,
    },
    /// A tensor's bytes do not hash to the checksum recorded for them.
    #[error(
        "checksum mismatch in {path}, tensor {tensor}: the file is damaged; delete the cache and rebuild it"
    )]
    ChecksumMismatch {
        /// The segment file.
        path: PathBuf,
        /// The tensor whose bytes changed.
        tensor: String,
    },
    /// The cache was made by another model, tokenizer, template or KV dtype than the one asked for.
    #[error(
        "cache {name:?} was made with a different {field}: expected {expected}, found {found}; rebuild it with the current model"
    )]
    FingerprintMismatch {
        /// The cache name (or segment id).
        name: String,
        /// Which part of the fingerprint differs.
        field: &'static str,
        /// What the caller runs.
        expected: String,
        /// What the file records.
        found: String,
    },
    /// A manifest references a segment file that does not exist.
    #[error(
        "cache {name:?} needs segment {id}, which is missing from {dir}; delete the cache and rebuild it"
    )]
    SegmentMissing {
        /// The cache name.
        name: String,
        /// The missing segment's id.
        id: String,
        /// The segments directory.
        dir: PathBuf,
    },
    /// The segments of a chain do not follow each other.
    #[error(
        "cache {name:?} has a broken segment chain at {id}: {detail}; delete the cache and rebuild it"
    )]
    BrokenChain {
        /// The cache name.
        name: String,
        /// The segment where the chain breaks.
        id: String,
        /// How it breaks.
        detail: String,
    },
    /// The data passed to a save does not match the metadata passed with it.
    #[error("invalid save request: {detail}")]
    InvalidInput {
        /// What is inconsistent.
        detail: String,
    },
    /// A simulated crash, for crash tests only.
    #[cfg(feature = "fault-injection")]
    #[error("simulated crash after step {0:?}")]
    SimulatedCrash(crate::durable::Step),
}

/// kv-store's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Keeps the operation and the path in the message, and recognises a full disk.
impl From<crate::durable_fs::IoError> for Error {
    fn from(e: crate::durable_fs::IoError) -> Error {
        Error::io(e.op, e.path, e.source)
    }
}

impl Error {
    /// Wraps an I/O error, recognising a full disk.
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Error {
        let path = path.into();
        match source.kind() {
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => {
                Error::DiskFull { path, source }
            }
            _ => Error::Io { op, path, source },
        }
    }

    pub(crate) fn bad_metadata(path: impl Into<PathBuf>, detail: impl Into<String>) -> Error {
        Error::BadMetadata {
            path: path.into(),
            detail: detail.into(),
        }
    }
}
