//! Shared by the tests: a stand-in for the Hugging Face Hub on 127.0.0.1, synthetic VGG state
//! dicts in the three PyTorch layouts, and a way to run the built `xtask` binary.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use candle_core::{Device, Tensor};
// Each test binary uses some of these.
#[allow(unused_imports)]
pub use la_testing::{golden_path as fixture, max_abs_diff, read_tensors as read_raw};
use sha2::Digest;

// ---------------------------------------------------------------------------------------------
// Running the binary

/// Runs the built `xtask` with `args`, with no Hub or proxy settings from the outer
/// environment (only `envs`).
pub fn xtask(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_xtask"));
    for var in [
        "HF_HOME",
        "HF_ENDPOINT",
        "HF_TOKEN",
        "HF_TOKEN_PATH",
        "HF_HUB_CACHE",
        "HF_HUB_OFFLINE",
        "XDG_CACHE_HOME",
        "ALL_PROXY",
        "all_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
    ] {
        cmd.env_remove(var);
    }
    cmd.args(args).envs(envs.iter().copied());
    cmd.output().expect("the xtask binary runs")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts a failure as the user should see it: exit code 1, a short message, no panic.
pub fn assert_clean_failure(o: &Output) -> String {
    let err = stderr(o);
    assert_eq!(
        o.status.code(),
        Some(1),
        "stdout: {}\nstderr: {err}",
        stdout(o)
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(!err.contains("RUST_BACKTRACE"), "{err}");
    assert!(
        err.starts_with("error: ") || err.contains("\nerror: "),
        "{err}"
    );
    let error_lines = err
        .lines()
        .skip_while(|l| !l.starts_with("error: "))
        .count();
    assert!(error_lines <= 6, "too long an error:\n{err}");
    err
}

/// Files in `dir` (to check that nothing, not even a temporary, was left behind).
pub fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Synthetic state dicts

/// A small deterministic generator (SplitMix64) with normal draws (Box-Muller).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    pub fn normal(&mut self, std: f64) -> f32 {
        let (u1, u2) = (self.uniform(), self.uniform());
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * std) as f32
    }

    /// A tensor of N(0, std²) values.
    pub fn tensor(&mut self, shape: &[usize], std: f64) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| self.normal(std)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }
}

/// VGG16's conv table at widths / 16: [4, 4, M, 8, 8, M, 16 x3, M, 32 x3, M, 32 x3, M].
pub const TINY_CFG: [Option<usize>; 18] = [
    Some(4),
    Some(4),
    None,
    Some(8),
    Some(8),
    None,
    Some(16),
    Some(16),
    Some(16),
    None,
    Some(32),
    Some(32),
    Some(32),
    None,
    Some(32),
    Some(32),
    Some(32),
    None,
];
pub const TINY_HIDDEN: usize = 64;

/// The `features.{i}` tensors of a VGG from a torchvision-style table (`None` = max-pool),
/// signal-preserving init (N(0, 2/fan_in)) and small random biases.
pub fn features(rng: &mut Rng, cfg: &[Option<usize>]) -> (HashMap<String, Tensor>, usize) {
    let mut out = HashMap::new();
    let (mut idx, mut c) = (0, 3);
    for entry in cfg {
        match entry {
            Some(w) => {
                let std = (2.0 / (c * 9) as f64).sqrt();
                out.insert(
                    format!("features.{idx}.weight"),
                    rng.tensor(&[*w, c, 3, 3], std),
                );
                out.insert(format!("features.{idx}.bias"), rng.tensor(&[*w], 0.05));
                idx += 2; // conv, ReLU
                c = *w;
            }
            None => idx += 1,
        }
    }
    (out, c)
}

/// timm's names and shapes (`pre_logits.fc1` a [hidden, c, 7, 7] conv, `pre_logits.fc2`
/// [hidden, hidden, 1, 1], `head.fc`) for the tiny VGG16 (widths x `scale`) with `classes`
/// outputs.
pub fn timm_state_dict(seed: u64, classes: usize, scale: usize) -> HashMap<String, Tensor> {
    let mut rng = Rng::new(seed);
    let cfg: Vec<Option<usize>> = TINY_CFG.iter().map(|e| e.map(|w| w * scale)).collect();
    let (mut t, c) = features(&mut rng, &cfg);
    let h = TINY_HIDDEN;
    let fc1_std = (2.0 / (c * 49) as f64).sqrt();
    t.insert(
        "pre_logits.fc1.weight".into(),
        rng.tensor(&[h, c, 7, 7], fc1_std),
    );
    t.insert("pre_logits.fc1.bias".into(), rng.tensor(&[h], 0.05));
    let fc_std = (2.0 / h as f64).sqrt();
    t.insert(
        "pre_logits.fc2.weight".into(),
        rng.tensor(&[h, h, 1, 1], fc_std),
    );
    t.insert("pre_logits.fc2.bias".into(), rng.tensor(&[h], 0.05));
    t.insert("head.fc.weight".into(), rng.tensor(&[classes, h], fc_std));
    t.insert("head.fc.bias".into(), rng.tensor(&[classes], 0.05));
    t
}

/// The same tensors under torchvision's names (`classifier.{0,3,6}`, 2-D weights).
pub fn timm_to_torchvision(timm: &HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    let mut out = HashMap::new();
    for (name, t) in timm {
        let (new, t) = match name.as_str() {
            n if n.starts_with("features.") => (n.to_string(), t.clone()),
            n => {
                let (module, leaf) = n.rsplit_once('.').unwrap();
                let idx = match module {
                    "pre_logits.fc1" => 0,
                    "pre_logits.fc2" => 3,
                    "head.fc" => 6,
                    other => panic!("unexpected {other}"),
                };
                let rows = t.dim(0).unwrap();
                let t = if leaf == "weight" {
                    t.reshape((rows, t.elem_count() / rows)).unwrap()
                } else {
                    t.clone()
                };
                (format!("classifier.{idx}.{leaf}"), t)
            }
        };
        out.insert(new, t);
    }
    out
}

/// The inverse of [`timm_to_torchvision`]: timm's names, its fc1 a [hidden, c, 7, 7] conv.
pub fn torchvision_to_timm(tv: &HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    let mut out = HashMap::new();
    for (name, t) in tv {
        if name.starts_with("features.") {
            out.insert(name.clone(), t.clone());
            continue;
        }
        let (module, leaf) = name.rsplit_once('.').unwrap();
        let (new, conv) = match module {
            "classifier.0" => ("pre_logits.fc1", Some(7)),
            "classifier.3" => ("pre_logits.fc2", Some(1)),
            "classifier.6" => ("head.fc", None),
            other => panic!("unexpected {other}"),
        };
        let t = match (leaf, conv) {
            ("weight", Some(k)) => {
                let (rows, cols) = t.dims2().unwrap();
                t.reshape((rows, cols / (k * k), k, k)).unwrap()
            }
            _ => t.clone(),
        };
        out.insert(format!("{new}.{leaf}"), t);
    }
    out
}

/// Random attention projections (seed-style init) for every block of `config`, under our names.
pub fn random_attention(rng: &mut Rng, config: &la_vgg::VggConfig) -> HashMap<String, Tensor> {
    let a = config.attention_config().expect("a config with attention");
    let mut out = HashMap::new();
    for (i, widths) in config.blocks.iter().enumerate() {
        let c = *widths.last().unwrap();
        let d = a.key_channels(c);
        for (name, rows, std) in [
            ("query", d, 1.5),
            ("key", d, 1.5),
            ("value", c, 0.5),
            ("out", c, 0.5),
        ] {
            let std = std / (c as f64).sqrt();
            out.insert(
                format!("blocks.{i}.attention.{name}.weight"),
                rng.tensor(&[rows, c], std),
            );
            out.insert(
                format!("blocks.{i}.attention.{name}.bias"),
                rng.tensor(&[rows], 0.05),
            );
        }
    }
    out
}

/// Safetensors bytes of `tensors` (no metadata), as PyTorch's `save_file` writes them.
pub fn safetensors_bytes(tensors: &HashMap<String, Tensor>) -> Vec<u8> {
    let mut named: Vec<(&String, &Tensor)> = tensors.iter().collect();
    named.sort_by(|a, b| a.0.cmp(b.0));
    safetensors::serialize(named.into_iter().map(|(n, t)| (n.as_str(), t)), None).unwrap()
}

pub fn write_safetensors(path: &Path, tensors: &HashMap<String, Tensor>) {
    std::fs::write(path, safetensors_bytes(tensors)).unwrap();
}

// ---------------------------------------------------------------------------------------------
// A stand-in for the Hub

/// How the server answers a file request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// As huggingface.co does for LFS files: `/resolve/` answers 302 to a CDN URL with
    /// `X-Repo-Commit` and `X-Linked-Etag` (the sha256), the CDN serves byte ranges.
    Redirect,
    /// `/resolve/` serves the bytes itself, with `ETag` and `X-Repo-Commit`.
    Direct,
    /// Like `Redirect`, but every data response stops halfway through (Content-Length says
    /// more) and the connection closes.
    Truncate,
    /// Like `Direct`, but the etag is the sha256 of other bytes.
    WrongEtag,
}

/// One file the server holds.
#[derive(Clone, Debug)]
pub struct Served {
    pub repo: String,
    pub commit: String,
    pub filename: String,
    pub data: Arc<Vec<u8>>,
    pub sha256: String,
}

impl Served {
    pub fn new(repo: &str, filename: &str, data: Vec<u8>) -> Self {
        let sha256 = sha256_hex(&data);
        Self {
            repo: repo.into(),
            commit: sha256[..40].to_string(),
            filename: filename.into(),
            data: Arc::new(data),
            sha256,
        }
    }
}

/// A request as the server saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    /// Lower-case names.
    pub headers: HashMap<String, String>,
}

struct Shared {
    files: Vec<Served>,
    mode: Mutex<Mode>,
    log: Mutex<Vec<Seen>>,
    stop: AtomicBool,
}

/// An HTTP/1.1 server on 127.0.0.1 (a thread per connection, `Connection: close`).
pub struct HubServer {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl HubServer {
    pub fn start(files: Vec<Served>, mode: Mode) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            files,
            mode: Mutex::new(mode),
            log: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        let accept = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(stream) = stream {
                    let s = s.clone();
                    std::thread::spawn(move || {
                        let _ = handle(stream, addr, &s);
                    });
                }
            }
        });
        Self {
            addr,
            shared,
            accept: Some(accept),
        }
    }

    /// The value for HF_ENDPOINT.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.shared.mode.lock().unwrap() = mode;
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.shared.log.lock().unwrap().clone()
    }

    /// Closes the port: later connections are refused.
    pub fn stop(&mut self) {
        if let Some(handle) = self.accept.take() {
            self.shared.stop.store(true, Ordering::SeqCst);
            let _ = TcpStream::connect(self.addr); // wakes the accept loop
            handle.join().unwrap();
        }
    }
}

impl Drop for HubServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A port on 127.0.0.1 with nothing listening.
pub fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

fn handle(stream: TcpStream, addr: SocketAddr, s: &Shared) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (method, path) = (
        parts.next().unwrap_or("").to_string(),
        parts.next().unwrap_or("").to_string(),
    );
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    s.log.lock().unwrap().push(Seen {
        method: method.clone(),
        path: path.clone(),
        headers: headers.clone(),
    });
    let mode = *s.mode.lock().unwrap();
    let mut out = stream;
    let range = headers.get("range").cloned();
    if let Some(sha) = path.strip_prefix("/cdn/") {
        return match s.files.iter().find(|f| f.sha256 == sha) {
            Some(f) => serve_bytes(&mut out, f, range.as_deref(), mode, &[]),
            None => respond(&mut out, "404 Not Found", &[], b"no such object"),
        };
    }
    // /{org}/{name}/resolve/{revision}/{file}
    let segments: Vec<&str> = path.trim_start_matches('/').splitn(5, '/').collect();
    let [org, name, "resolve", revision, filename] = segments.as_slice() else {
        return respond(&mut out, "404 Not Found", &[], b"not a resolve URL");
    };
    let repo = format!("{org}/{name}");
    let in_repo: Vec<&Served> = s.files.iter().filter(|f| f.repo == repo).collect();
    let error = |code: &str, message: &str| -> Vec<(String, String)> {
        vec![
            ("X-Error-Code".into(), code.into()),
            ("X-Error-Message".into(), message.into()),
        ]
    };
    let Some(first) = in_repo.first() else {
        let h = error("RepositoryNotFound", "Repository not found");
        return respond(&mut out, "404 Not Found", &h, b"Repository not found");
    };
    if *revision != "main" && *revision != first.commit {
        let h = error("RevisionNotFound", "Invalid rev id");
        return respond(&mut out, "404 Not Found", &h, b"Invalid rev id");
    }
    let Some(file) = in_repo.iter().find(|f| f.filename == *filename) else {
        let h = error("EntryNotFound", "Entry not found");
        return respond(&mut out, "404 Not Found", &h, b"Entry not found");
    };
    let commit = ("X-Repo-Commit".to_string(), file.commit.clone());
    match mode {
        Mode::Redirect | Mode::Truncate => {
            let headers = vec![
                commit,
                ("X-Linked-Etag".into(), format!("\"{}\"", file.sha256)),
                ("X-Linked-Size".into(), file.data.len().to_string()),
                ("ETag".into(), format!("\"{}\"", &file.sha256[..40])),
                (
                    "Location".into(),
                    format!("http://{addr}/cdn/{}", file.sha256),
                ),
            ];
            respond(&mut out, "302 Found", &headers, b"")
        }
        Mode::Direct => serve_bytes(&mut out, file, range.as_deref(), mode, &[commit]),
        Mode::WrongEtag => {
            let mut f = (*file).clone();
            f.sha256 = sha256_hex(b"other bytes");
            serve_bytes(&mut out, &f, range.as_deref(), mode, &[commit])
        }
    }
}

/// 200 with the whole file, or 206 with `Range: bytes=a-[b]`, or 416 past the end.
fn serve_bytes(
    out: &mut TcpStream,
    file: &Served,
    range: Option<&str>,
    mode: Mode,
    extra: &[(String, String)],
) -> std::io::Result<()> {
    let len = file.data.len();
    let mut headers: Vec<(String, String)> = extra.to_vec();
    headers.push(("ETag".into(), format!("\"{}\"", file.sha256)));
    headers.push(("Accept-Ranges".into(), "bytes".into()));
    let Some(spec) = range.and_then(|r| r.strip_prefix("bytes=")) else {
        return respond(out, "200 OK", &headers, &file.data);
    };
    let (a, b) = spec.split_once('-').unwrap_or((spec, ""));
    let start: usize = a.parse().unwrap_or(0);
    let end: usize = b
        .parse()
        .unwrap_or(len.saturating_sub(1))
        .min(len.saturating_sub(1));
    if start >= len || start > end {
        headers.push(("Content-Range".into(), format!("bytes */{len}")));
        return respond(out, "416 Range Not Satisfiable", &headers, b"");
    }
    headers.push(("Content-Range".into(), format!("bytes {start}-{end}/{len}")));
    let body = &file.data[start..=end];
    if mode == Mode::Truncate && body.len() > 1 {
        // Promise the whole range, send half, hang up.
        write_head(out, "206 Partial Content", &headers, body.len())?;
        out.write_all(&body[..body.len() / 2])?;
        out.flush()?;
        return out.shutdown(std::net::Shutdown::Both);
    }
    respond(out, "206 Partial Content", &headers, body)
}

fn write_head(
    out: &mut TcpStream,
    status: &str,
    headers: &[(String, String)],
    len: usize,
) -> std::io::Result<()> {
    let mut head = format!("HTTP/1.1 {status}\r\nContent-Length: {len}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    out.write_all(head.as_bytes())
}

fn respond(
    out: &mut TcpStream,
    status: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> std::io::Result<()> {
    write_head(out, status, headers, body.len())?;
    out.write_all(body)?;
    out.flush()
}
