//! Downloading the official CIFAR archives.
//!
//! The archive is streamed to a temporary file next to its final name while its MD5 is
//! computed, checked against the published sum, then renamed into place; extraction
//! goes to a temporary folder that is renamed once complete. An interrupted or failed
//! fetch therefore leaves no half-written archive or folder behind, and a second call
//! finds either nothing or a finished result.

use std::fs;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use md5::{Digest, Md5};

use crate::cifar::CifarKind;
use crate::dataset::Split;
use crate::{Error, Result};

/// Where the archives are published.
pub const DEFAULT_BASE_URL: &str = "https://www.cs.toronto.edu/~kriz";

/// Which official archive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CifarArchive {
    Cifar10,
    Cifar100,
}

impl CifarArchive {
    pub fn file_name(self) -> &'static str {
        self.kind().archive()
    }

    /// The MD5 published next to the archive.
    pub fn md5(self) -> &'static str {
        match self {
            CifarArchive::Cifar10 => "c32a1d4ab5d03f1284b67883e8d87530",
            CifarArchive::Cifar100 => "03b5dce01913d631647c71ecec9e9cb8",
        }
    }

    /// The folder the archive extracts to.
    pub fn folder(self) -> &'static str {
        self.kind().folder()
    }

    fn kind(self) -> CifarKind {
        match self {
            CifarArchive::Cifar10 => CifarKind::Cifar10,
            CifarArchive::Cifar100 => CifarKind::Cifar100Fine,
        }
    }

    /// `true` when `folder` holds every batch file of both splits.
    fn is_complete(self, folder: &Path) -> bool {
        [Split::Train, Split::Test]
            .iter()
            .flat_map(|&s| self.kind().files(s))
            .all(|f| folder.join(f).is_file())
    }
}

/// Downloads (unless already there), checks and extracts a CIFAR archive into `dir`,
/// and returns the extracted folder (`dir/cifar-10-batches-bin` or
/// `dir/cifar-100-binary`), ready for [`crate::cifar()`].
///
/// `base_url` replaces [`DEFAULT_BASE_URL`] (a mirror, or a local server in tests);
/// `progress` draws a progress bar on stderr.
pub fn fetch_cifar(
    which: CifarArchive,
    dir: &Path,
    base_url: Option<&str>,
    progress: bool,
) -> Result<PathBuf> {
    fetch_cifar_with_md5(which, dir, base_url, progress, which.md5())
}

/// [`fetch_cifar`] checking against `md5` instead of the published sum: lets tests serve
/// a small synthetic archive while still exercising the real check.
#[doc(hidden)]
pub fn fetch_cifar_with_md5(
    which: CifarArchive,
    dir: &Path,
    base_url: Option<&str>,
    progress: bool,
    md5: &str,
) -> Result<PathBuf> {
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let target = dir.join(which.folder());
    if which.is_complete(&target) {
        return Ok(target);
    }
    if target.exists() {
        return Err(Error::format(
            &target,
            "exists but lacks some batch files; remove it to fetch again",
        ));
    }
    let archive = dir.join(which.file_name());
    let have_archive = archive.is_file() && file_md5(&archive)? == md5.to_ascii_lowercase();
    if !have_archive {
        let base = base_url.unwrap_or(DEFAULT_BASE_URL).trim_end_matches('/');
        let url = format!("{base}/{}", which.file_name());
        download(&url, &archive, md5, progress)?;
    }
    extract_tar_gz(&archive, dir, which.folder())?;
    if !which.is_complete(&target) {
        return Err(Error::format(
            &archive,
            format!("extracted, but `{}` lacks some batch files", which.folder()),
        ));
    }
    Ok(target)
}

/// The hex MD5 of a file.
pub fn file_md5(path: &Path) -> Result<String> {
    let mut file = fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Md5::new();
    io::copy(&mut file, &mut hasher).map_err(|e| Error::io(path, e))?;
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Streams `url` to `dest` through a temporary file in the same folder, renamed only
/// once the MD5 matches.
pub fn download(url: &str, dest: &Path, md5: &str, progress: bool) -> Result<()> {
    let fail = |reason: String| Error::Download {
        url: url.to_string(),
        reason,
    };
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_recv_response(Some(Duration::from_secs(60)))
        .build()
        .into();
    let mut response = agent.get(url).call().map_err(|e| fail(e.to_string()))?;
    let length = response.body().content_length();
    let bar = if progress {
        let bar = ProgressBar::new(length.unwrap_or(0));
        if let Ok(style) = ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(
            dest.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
        bar
    } else {
        ProgressBar::hidden()
    };

    let mut tmp = la_core::AtomicFile::create(dest)?;
    let mut hasher = Md5::new();
    let mut reader = response.body_mut().as_reader();
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0u64;
    {
        let mut out = BufWriter::new(&mut tmp);
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(fail(format!("after {total} bytes: {e}"))),
            };
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(|e| Error::io(dest, e))?;
            total += n as u64;
            bar.inc(n as u64);
        }
        out.flush().map_err(|e| Error::io(dest, e))?;
    }
    bar.finish_and_clear();
    if let Some(len) = length {
        if len != total {
            return Err(fail(format!("got {total} of {len} bytes")));
        }
    }
    let actual = hex(&hasher.finalize());
    if actual != md5.to_ascii_lowercase() {
        // `tmp` is deleted on return.
        return Err(Error::Checksum {
            path: dest.to_path_buf(),
            expected: md5.to_string(),
            actual,
        });
    }
    tmp.commit()?;
    Ok(())
}

/// A member path made relative and checked not to leave the target folder.
fn safe_member_path(archive: &Path, member: &Path) -> Result<PathBuf> {
    let mut out = PathBuf::new();
    for c in member.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                return Err(Error::format(
                    archive,
                    format!(
                        "member `{}` would be written outside the target folder",
                        member.display()
                    ),
                ))
            }
        }
    }
    Ok(out)
}

/// Extracts a `.tar.gz` into `dir` and renames its `expected_top` folder into place.
///
/// Refused before anything is renamed into `dir`: absolute paths, `..` components,
/// symbolic and hard links, and device or FIFO members. Extraction happens in a hidden
/// temporary folder inside `dir` that is deleted whatever the outcome.
pub fn extract_tar_gz(archive: &Path, dir: &Path, expected_top: &str) -> Result<PathBuf> {
    let file = fs::File::open(archive).map_err(|e| Error::io(archive, e))?;
    let staging = tempfile::Builder::new()
        .prefix(".extract-")
        .tempdir_in(dir)
        .map_err(|e| Error::io(dir, e))?;
    let bad = |e: io::Error| Error::unreadable(archive, "unreadable archive")(e);
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(io::BufReader::new(file)));
    for entry in tar.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        let member = entry.path().map_err(bad)?.into_owned();
        let rel = safe_member_path(archive, &member)?;
        let kind = entry.header().entry_type();
        if kind.is_dir() {
            let p = staging.path().join(&rel);
            fs::create_dir_all(&p).map_err(|e| Error::io(&p, e))?;
        } else if kind.is_file() {
            if rel.as_os_str().is_empty() {
                continue;
            }
            let p = staging.path().join(&rel);
            if let Some(parent) = p.parent() {
                fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
            }
            let mut out = fs::File::create(&p).map_err(|e| Error::io(&p, e))?;
            io::copy(&mut entry, &mut out).map_err(|e| {
                Error::format(
                    archive,
                    format!("member `{}` is truncated: {e}", member.display()),
                )
            })?;
        } else if kind.is_symlink() || kind.is_hard_link() {
            return Err(Error::format(
                archive,
                format!(
                    "member `{}` is a link; links are refused so that no file can be written outside the target folder",
                    member.display()
                ),
            ));
        } else if kind.is_pax_global_extensions() || kind.is_pax_local_extensions() {
            continue;
        } else {
            return Err(Error::format(
                archive,
                format!(
                    "member `{}` has an unsupported type {:?}",
                    member.display(),
                    kind
                ),
            ));
        }
    }
    let top = staging.path().join(expected_top);
    if !top.is_dir() {
        return Err(Error::format(
            archive,
            format!("the archive has no `{expected_top}/` folder"),
        ));
    }
    let dest = dir.join(expected_top);
    fs::rename(&top, &dest).map_err(|e| Error::io(&dest, e))?;
    Ok(dest)
}
