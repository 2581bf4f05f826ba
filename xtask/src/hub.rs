//! Files from the Hugging Face Hub, through `hf-hub`'s sync API, into the standard cache.
//!
//! Configured from the environment as the Python client (`huggingface_hub`) is, so that both
//! share one cache and one login:
//!
//! | variable | meaning | default |
//! |---|---|---|
//! | `HF_ENDPOINT` | the Hub or a mirror | `https://huggingface.co` |
//! | `HF_HOME` | root of the Hub's local files | `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface` |
//! | `HF_HUB_CACHE` | the download cache | `$HF_HOME/hub` |
//! | `HF_TOKEN` | access token (private or gated repos) | the file `HF_TOKEN_PATH`, else `$HF_HOME/token` |
//! | `HF_HUB_OFFLINE` | `1`: never use the network, only the cache | off |
//! | `HF_HUB_DISABLE_PROGRESS_BARS` | `1`: no progress bar | bars on a terminal |
//!
//! A file already in the cache for the repo and revision is used as it is, with no request at
//! all. What is downloaded is checked against the Hub's sha256 (the `etag` of LFS files) so
//! that a truncated or corrupt file is never kept.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use hf_hub::api::sync::{ApiBuilder, ApiError};
use hf_hub::{Cache, Repo, RepoType};
use sha2::{Digest, Sha256};

/// Where and how to reach the Hub, read from the environment.
#[derive(Clone, Debug)]
pub struct HubConfig {
    pub endpoint: String,
    /// The download cache (`HF_HUB_CACHE`): `models--{org}--{name}/{blobs,refs,snapshots}`.
    pub cache_dir: PathBuf,
    pub token: Option<String>,
    pub offline: bool,
    /// False when `HF_HUB_DISABLE_PROGRESS_BARS` is set.
    pub progress_bars: bool,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn truthy(value: &str) -> bool {
    matches!(
        value.trim().to_ascii_lowercase().as_str(),
        "1" | "on" | "yes" | "true"
    )
}

impl HubConfig {
    /// Reads `HF_ENDPOINT`, `HF_HOME`, `HF_HUB_CACHE`, `HF_TOKEN`, `HF_TOKEN_PATH` and
    /// `HF_HUB_OFFLINE` (and `HF_HUB_DISABLE_PROGRESS_BARS`) with the Python client's defaults.
    pub fn from_env() -> Result<Self> {
        let endpoint = env("HF_ENDPOINT")
            .map(|e| e.trim().trim_end_matches('/').to_string())
            .unwrap_or_else(|| "https://huggingface.co".to_string());
        let hf_home = match env("HF_HOME") {
            Some(home) => PathBuf::from(home),
            None => {
                let cache = env("XDG_CACHE_HOME")
                    .map(PathBuf::from)
                    .or_else(|| env("HOME").map(|h| PathBuf::from(h).join(".cache")));
                match cache {
                    Some(c) => c.join("huggingface"),
                    None => bail!(
                        "cannot place the Hugging Face cache: neither HF_HOME nor HOME is set"
                    ),
                }
            }
        };
        let cache_dir = env("HF_HUB_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("hub"));
        let token = env("HF_TOKEN").map(|t| t.trim().to_string()).or_else(|| {
            let path = env("HF_TOKEN_PATH")
                .map(PathBuf::from)
                .unwrap_or_else(|| hf_home.join("token"));
            std::fs::read_to_string(path)
                .ok()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
        });
        let offline = env("HF_HUB_OFFLINE").is_some_and(|v| truthy(&v));
        let progress_bars = !env("HF_HUB_DISABLE_PROGRESS_BARS").is_some_and(|v| truthy(&v));
        Ok(Self {
            endpoint,
            cache_dir,
            token,
            offline,
            progress_bars,
        })
    }
}

/// One file of one repository at one revision.
#[derive(Clone, Debug)]
pub struct HubFile {
    pub repo: String,
    pub revision: String,
    pub filename: String,
}

impl HubFile {
    pub fn new(repo: &str, revision: &str, filename: &str) -> Self {
        Self {
            repo: repo.to_string(),
            revision: revision.to_string(),
            filename: filename.to_string(),
        }
    }

    fn hf_repo(&self) -> Repo {
        Repo::with_revision(self.repo.clone(), RepoType::Model, self.revision.clone())
    }

    /// The URL the file is downloaded from.
    pub fn url(&self, endpoint: &str) -> String {
        format!(
            "{endpoint}/{}/resolve/{}/{}",
            self.repo,
            self.revision.replace('/', "%2F"),
            self.filename
        )
    }

    /// The Hub's page of the file, for messages.
    fn describe(&self) -> String {
        format!(
            "{}/{} (revision {})",
            self.repo, self.filename, self.revision
        )
    }
}

/// A file in the local cache.
#[derive(Clone, Debug)]
pub struct Fetched {
    /// `{cache}/models--org--name/snapshots/{commit}/{file}`.
    pub path: PathBuf,
    /// The commit the revision pointed to when the file was downloaded.
    pub commit: String,
    pub sha256: String,
    /// True when no request was made.
    pub from_cache: bool,
}

/// The cached copy of `file`, if any, without touching the network: the revision's ref
/// (`refs/{revision}` -> commit) or, for a revision that is a commit hash, its snapshot.
pub fn cached(hub: &HubConfig, file: &HubFile) -> Option<PathBuf> {
    let cache = Cache::new(hub.cache_dir.clone());
    if let Some(path) = cache.repo(file.hf_repo()).get(&file.filename) {
        return Some(path);
    }
    let is_commit = file.revision.len() == 40 && is_hex(&file.revision);
    let path = hub
        .cache_dir
        .join(file.hf_repo().folder_name())
        .join("snapshots")
        .join(&file.revision)
        .join(&file.filename);
    (is_commit && path.exists()).then_some(path)
}

fn is_hex(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The cached file, else a download into the cache (with a progress bar on a terminal when
/// `progress`). Errors say what failed and what to do, in a few lines.
pub fn fetch(hub: &HubConfig, file: &HubFile, progress: bool) -> Result<Fetched> {
    if let Some(path) = cached(hub, file) {
        eprintln!("using the cached {} (no network access)", path.display());
        return finish(file, path, true);
    }
    if hub.offline {
        bail!(
            "HF_HUB_OFFLINE is set and {} is not in the cache {}\n{}",
            file.describe(),
            hub.cache_dir.display(),
            hint(hub, file)
        );
    }
    std::fs::create_dir_all(&hub.cache_dir).map_err(|e| {
        anyhow::anyhow!(
            "cannot create the Hugging Face cache {}: {e} (set HF_HOME to a writable directory)",
            hub.cache_dir.display()
        )
    })?;
    eprintln!("downloading {}", file.url(&hub.endpoint));
    let api = ApiBuilder::from_cache(Cache::new(hub.cache_dir.clone()))
        .with_endpoint(hub.endpoint.clone())
        .with_token(hub.token.clone())
        .with_progress(false)
        .with_user_agent("la-vgg-xtask", env!("CARGO_PKG_VERSION"))
        .build()
        .map_err(|e| describe_error(hub, file, e))?;
    let repo = api.repo(file.hf_repo());
    let bar = Bar {
        bar: None,
        show: progress && hub.progress_bars,
    };
    let result = without_panics(|| repo.download_with_progress(&file.filename, bar));
    let path = match result {
        Ok(Ok(path)) => path,
        Ok(Err(e)) => return Err(describe_error(hub, file, e)),
        Err(panic) => bail!(
            "the download of {} from {} failed: hf-hub stopped on {panic}\n{}",
            file.describe(),
            hub.endpoint,
            hint(hub, file)
        ),
    };
    finish(file, path, false)
}

/// Checks the cached file against the sha256 it was stored under (the Hub's etag of an LFS
/// file, its blob's name); a mismatch removes it from the cache so that the next run
/// downloads it afresh.
fn finish(file: &HubFile, path: PathBuf, from_cache: bool) -> Result<Fetched> {
    let commit = path
        .parent()
        .and_then(Path::file_name)
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_default();
    let blob = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
    let sha256 = sha256_file(&blob)?;
    let etag = blob
        .file_name()
        .map(|n| n.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    if etag.len() == 64 && is_hex(&etag) && etag != sha256 {
        let _ = std::fs::remove_file(&path);
        if blob != path {
            let _ = std::fs::remove_file(&blob);
        }
        bail!(
            "{} in the cache is corrupt or truncated: its sha256 is {sha256}, the Hub's is {etag}; \
             it was removed from the cache, run the command again to download it afresh",
            file.describe()
        );
    }
    Ok(Fetched {
        path,
        commit,
        sha256,
        from_cache,
    })
}

/// Hex sha256 of a file, read in chunks.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

/// Lower-case hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs `f`, turning a panic inside hf-hub (it unwraps a few server replies) into an error
/// instead of a crash with a backtrace.
fn without_panics<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    std::panic::set_hook(previous);
    result.map_err(|payload| {
        payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "an unexpected reply".to_string())
    })
}

/// What to do when the Hub cannot be used.
fn hint(hub: &HubConfig, file: &HubFile) -> String {
    format!(
        "hint: without network access, download {} elsewhere ({}) and run `cargo xtask convert --from FILE`;\n\
         hint: to use a mirror, set HF_ENDPOINT (now {})",
        file.filename,
        file.url("https://huggingface.co"),
        hub.endpoint
    )
}

/// Turns hf-hub's error into a few lines: what failed, then what to do.
fn describe_error(hub: &HubConfig, file: &HubFile, error: ApiError) -> anyhow::Error {
    let what = file.describe();
    let endpoint = &hub.endpoint;
    let message = match error {
        ApiError::TooManyRetries(inner) => return describe_error(hub, file, *inner),
        ApiError::RequestError(e) => match *e {
            ureq2::Error::Status(code, response) => {
                let error_code = response.header("x-error-code").map(str::to_string);
                let server_message = response
                    .header("x-error-message")
                    .map(|m| format!(" ({m})"))
                    .unwrap_or_default();
                let url = response.get_url().to_string();
                match error_code.as_deref() {
                    Some("RepositoryNotFound") => format!(
                        "repository `{}` not found on {endpoint} (HTTP {code}){server_message}: \
                         check the repo id (--arch, --bn, --repo); a private or gated repo needs HF_TOKEN",
                        file.repo
                    ),
                    Some("RevisionNotFound") => format!(
                        "revision `{}` not found in {} on {endpoint} (HTTP {code}){server_message}",
                        file.revision, file.repo
                    ),
                    Some("EntryNotFound") => format!(
                        "file `{}` not found in {} at revision {} on {endpoint} (HTTP {code}){server_message}",
                        file.filename, file.repo, file.revision
                    ),
                    Some("GatedRepo") => format!(
                        "{} is gated (HTTP {code}){server_message}: accept its terms on the Hub and set HF_TOKEN",
                        file.repo
                    ),
                    _ if code == 401 || code == 403 => format!(
                        "{url}: HTTP {code} {}{server_message}: the repo `{}` does not exist or needs a token \
                         with access (HF_TOKEN)",
                        response.status_text(),
                        file.repo
                    ),
                    _ if code == 404 => format!(
                        "{url}: HTTP 404 Not Found{server_message}: no `{}` in `{}` at revision {} \
                         (check the repo id and revision)",
                        file.filename, file.repo, file.revision
                    ),
                    _ => format!(
                        "{url}: HTTP {code} {}{server_message}",
                        response.status_text()
                    ),
                }
            }
            ureq2::Error::Transport(t) => {
                let detail = t.to_string();
                match t.kind() {
                    ureq2::ErrorKind::Dns => format!(
                        "cannot resolve the host of {endpoint} (DNS lookup failed: offline?): {detail}"
                    ),
                    ureq2::ErrorKind::ConnectionFailed => {
                        format!("cannot connect to {endpoint} (offline, or the server is down?): {detail}")
                    }
                    ureq2::ErrorKind::Io => {
                        format!("the connection to {endpoint} broke off: {detail}")
                    }
                    _ => format!("request to {endpoint} failed: {detail}"),
                }
            }
        },
        ApiError::MissingHeader(h) | ApiError::InvalidHeader(h) => format!(
            "{endpoint} did not answer as a Hugging Face Hub for {what}: header `{h}` is missing or \
             malformed (is HF_ENDPOINT right?)"
        ),
        ApiError::ParseIntError(e) => format!(
            "{endpoint} sent a malformed Content-Range header for {what}: {e} (is HF_ENDPOINT right?)"
        ),
        ApiError::IoError(e) => match e.kind() {
            std::io::ErrorKind::UnexpectedEof
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::TimedOut
            | std::io::ErrorKind::BrokenPipe => format!(
                "the download of {what} was cut short ({e}); the part received is kept in the \
                 cache {}: run the command again to resume",
                hub.cache_dir.display()
            ),
            _ => format!(
                "cannot write {what} to the cache {}: {e} (set HF_HOME to a writable directory)",
                hub.cache_dir.display()
            ),
        },
        ApiError::InvalidResume => format!(
            "the partial download of {what} in {} is larger than the file: delete the `.part` \
             file under models--{}/blobs and run again",
            hub.cache_dir.display(),
            file.repo.replace('/', "--")
        ),
        ApiError::LockAcquisition(path) => format!(
            "another process is downloading {what} (lock {}): wait for it, or delete the lock",
            path.display()
        ),
    };
    anyhow::anyhow!("{message}\n{}", hint(hub, file))
}

/// hf-hub's progress callbacks, drawn by indicatif on stderr when it is a terminal.
struct Bar {
    bar: Option<indicatif::ProgressBar>,
    show: bool,
}

impl hf_hub::api::Progress for Bar {
    fn init(&mut self, size: usize, filename: &str) {
        if !self.show {
            return;
        }
        // Called again when a download resumes: start over at the new offset.
        let bar = self.bar.get_or_insert_with(|| {
            let bar = indicatif::ProgressBar::new(size as u64);
            let style = indicatif::ProgressStyle::with_template(
                "{msg} [{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec} (eta {eta})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(style);
            bar
        });
        bar.set_length(size as u64);
        bar.set_position(0);
        bar.set_message(filename.to_string());
    }

    fn update(&mut self, size: usize) {
        if let Some(bar) = &self.bar {
            bar.inc(size as u64);
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}
