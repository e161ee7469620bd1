//! The commit protocol: write to a temporary name in the same directory, fsync, rename over
//! the final name, fsync the directory. A crash at any point leaves either the old file or
//! the new one, never a mix, plus at worst a stray temporary file that garbage collection
//! removes. The file-system primitives it uses are the public [`crate::durable_fs`].

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

use crate::durable_fs::{sync_dir, temp_path};
use crate::{Error, Result};

/// A step of a save, in order. Crash tests stop a save right after one of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Step {
    /// The segment's bytes are in its temporary file (not yet fsynced).
    SegmentWritten,
    /// The segment's temporary file is fsynced.
    SegmentSynced,
    /// The segment is renamed to its final name (directory not yet fsynced).
    SegmentRenamed,
    /// The new manifest's bytes are in its temporary file.
    ManifestWritten,
    /// The new manifest is fsynced.
    ManifestSynced,
    /// The new manifest replaced the old one (directory not yet fsynced).
    ManifestRenamed,
}

impl Step {
    /// Every step, in the order a save takes them.
    pub const ALL: [Step; 6] = [
        Step::SegmentWritten,
        Step::SegmentSynced,
        Step::SegmentRenamed,
        Step::ManifestWritten,
        Step::ManifestSynced,
        Step::ManifestRenamed,
    ];
}

#[cfg(feature = "fault-injection")]
thread_local! {
    static CRASH_AFTER: std::cell::Cell<Option<Step>> = const { std::cell::Cell::new(None) };
    static FAIL_WRITES: std::cell::Cell<Option<std::io::ErrorKind>> = const { std::cell::Cell::new(None) };
}

/// Makes every file write of later saves on this thread fail with `kind` (e.g.
/// `StorageFull`), as a full disk would, until called again with `None` (for tests only).
#[cfg(feature = "fault-injection")]
pub fn fail_writes(kind: Option<std::io::ErrorKind>) {
    FAIL_WRITES.with(|c| c.set(kind));
}

/// The injected write failure, if any.
fn injected_write_error() -> std::io::Result<()> {
    #[cfg(feature = "fault-injection")]
    if let Some(kind) = FAIL_WRITES.with(|c| c.get()) {
        return Err(std::io::Error::from(kind));
    }
    Ok(())
}

/// Makes the next save on this thread stop with [`Error::SimulatedCrash`] right after `step`,
/// leaving the files as a crash at that moment would (for crash tests only).
#[cfg(feature = "fault-injection")]
pub fn crash_after(step: Option<Step>) {
    CRASH_AFTER.with(|c| c.set(step));
}

pub(crate) fn reached(step: Step) -> Result<()> {
    #[cfg(feature = "fault-injection")]
    if CRASH_AFTER.with(|c| c.get()) == Some(step) {
        CRASH_AFTER.with(|c| c.set(None));
        return Err(Error::SimulatedCrash(step));
    }
    let _ = step;
    Ok(())
}

/// Writes a file through `fill`, then fsyncs it and renames it to `dest`, fsyncing the
/// directory. `steps` names the (written, synced, renamed) steps for crash tests.
pub(crate) fn commit_file(
    dest: &Path,
    steps: [Step; 3],
    fill: impl FnOnce(&mut File, &Path) -> Result<()>,
) -> Result<()> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    let stem = dest.file_name().and_then(|s| s.to_str()).unwrap_or("file");
    let tmp = temp_path(dir, stem);
    let result = (|| {
        let mut file = File::create(&tmp).map_err(|e| Error::io("create", &tmp, e))?;
        fill(&mut file, &tmp)?;
        file.flush()
            .and_then(|()| injected_write_error())
            .map_err(|e| Error::io("write", &tmp, e))?;
        reached(steps[0])?;
        file.sync_all().map_err(|e| Error::io("fsync", &tmp, e))?;
        drop(file);
        reached(steps[1])?;
        fs::rename(&tmp, dest).map_err(|e| Error::io("rename into place", dest, e))?;
        reached(steps[2])?;
        sync_dir(dir).map_err(Error::from)
    })();
    if let Err(e) = &result {
        // A real failure (disk full, permission) leaves no litter; a simulated crash must
        // leave the files exactly as a crash would.
        #[cfg(feature = "fault-injection")]
        if matches!(e, Error::SimulatedCrash(_)) {
            return result;
        }
        let _ = e;
        let _ = fs::remove_file(&tmp);
    }
    result
}
