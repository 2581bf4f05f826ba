//! Atomic writes: a file is written to a temporary file in its directory, flushed to disk
//! and renamed over the target, so a reader sees the old file or the new one, never half of
//! one, and a failed write leaves the old file as it was. Built on `tempfile`, which picks
//! the unique temporary name and removes the file if the write is abandoned.

use std::io::Write;
use std::path::{Path, PathBuf};

/// A file that could not be written; the target is left as it was.
#[derive(Debug, thiserror::Error)]
#[error("{}: cannot write", path.display())]
pub struct WriteError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// A file being written; it replaces `path` on [`AtomicFile::commit`], and is removed if
/// dropped before.
pub struct AtomicFile {
    path: PathBuf,
    file: tempfile::NamedTempFile,
}

impl AtomicFile {
    /// Starts writing `path` (its directory must exist).
    pub fn create(path: &Path) -> Result<Self, WriteError> {
        let fail = |source| WriteError {
            path: path.to_path_buf(),
            source,
        };
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let name = path.file_name().ok_or_else(|| {
            fail(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a file path",
            ))
        })?;
        let prefix = format!(".{}.", name.to_string_lossy());
        let mut builder = tempfile::Builder::new();
        builder.prefix(&prefix).suffix(".part");
        // tempfile creates owner-only files; a written file gets the usual mode instead
        // (0o666 less the umask, as `File::create`), since weights and plots are shared.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            builder.permissions(std::fs::Permissions::from_mode(0o666));
        }
        let file = builder.tempfile_in(dir).map_err(fail)?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    /// The file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// An error about this file.
    pub fn error(&self, source: std::io::Error) -> WriteError {
        WriteError {
            path: self.path.clone(),
            source,
        }
    }

    /// Flushes the data to disk and renames the file over its target (the rename made
    /// durable too, on Unix).
    pub fn commit(self) -> Result<(), WriteError> {
        let path = self.path;
        let fail = |source| WriteError {
            path: path.clone(),
            source,
        };
        self.file.as_file().sync_all().map_err(fail)?;
        self.file.persist(&path).map_err(|e| fail(e.error))?;
        #[cfg(unix)]
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(fail)?;
        }
        Ok(())
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.file.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// Writes `bytes` to `path` atomically.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), WriteError> {
    let mut file = AtomicFile::create(path)?;
    file.write_all(bytes).map_err(|e| file.error(e))?;
    file.commit()
}
