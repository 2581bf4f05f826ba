//! CIFAR fetching against a real HTTP server on 127.0.0.1 that the test starts: the
//! download, MD5 check, 404 handling and the extraction's refusals all run for real.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use la_data::fetch::{fetch_cifar, fetch_cifar_with_md5, CifarArchive};
use la_data::{cifar, CifarKind, Dataset, Error, Split};
use md5::{Digest, Md5};

/// A minimal HTTP/1.1 server for fixed routes; stops when dropped (or after 60 s).
struct Server {
    base: String,
    requests: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(routes: HashMap<String, Vec<u8>>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let base = format!("http://{}/files", listener.local_addr().unwrap());
        let requests = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (req, st) = (requests.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !st.load(Ordering::SeqCst) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((stream, _)) => {
                        req.fetch_add(1, Ordering::SeqCst);
                        serve(stream, &routes);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Server {
            base,
            requests,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

fn serve(mut stream: TcpStream, routes: &HashMap<String, Vec<u8>>) {
    stream.set_nonblocking(false).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&head);
    let path = text.split_whitespace().nth(1).unwrap_or("/").to_string();
    let (status, body): (&str, &[u8]) = match routes.get(&path) {
        Some(b) => ("200 OK", b),
        None => ("404 Not Found", b"not found"),
    };
    let header = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(header.as_bytes());
    let _ = stream.write_all(body);
}

fn md5_hex(bytes: &[u8]) -> String {
    Md5::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A small but complete CIFAR-10 archive.
fn cifar10_archive() -> Vec<u8> {
    let src = tempfile::tempdir().unwrap();
    write_cifar10_folder(&src.path().join("cifar-10-batches-bin"), 3, 2);
    tar_gz_folder(src.path(), "cifar-10-batches-bin")
}

fn route(bytes: Vec<u8>) -> HashMap<String, Vec<u8>> {
    HashMap::from([("/files/cifar-10-binary.tar.gz".to_string(), bytes)])
}

/// Names in `dir` (not recursive).
fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn fetch_downloads_checks_and_extracts() {
    let archive = cifar10_archive();
    let md5 = md5_hex(&archive);
    let server = Server::start(route(archive.clone()));
    let dest = tempfile::tempdir().unwrap();
    let folder = fetch_cifar_with_md5(
        CifarArchive::Cifar10,
        dest.path(),
        Some(&server.base),
        true,
        &md5,
    )
    .unwrap();
    assert_eq!(folder, dest.path().join("cifar-10-batches-bin"));
    assert_eq!(
        listing(dest.path()),
        ["cifar-10-batches-bin", "cifar-10-binary.tar.gz"]
    );
    assert_eq!(
        std::fs::read(dest.path().join("cifar-10-binary.tar.gz")).unwrap(),
        archive
    );
    let train = cifar(&folder, CifarKind::Cifar10, Split::Train).unwrap();
    assert_eq!(train.len(), 15);
    assert_eq!(train.classes()[1], "car");
    assert_eq!(server.requests.load(Ordering::SeqCst), 1);

    // Already there: no second request.
    let again = fetch_cifar_with_md5(
        CifarArchive::Cifar10,
        dest.path(),
        Some(&server.base),
        false,
        &md5,
    )
    .unwrap();
    assert_eq!(again, folder);
    assert_eq!(server.requests.load(Ordering::SeqCst), 1);

    // Archive present but folder gone: re-extracted from the verified archive, no download.
    std::fs::remove_dir_all(&folder).unwrap();
    fetch_cifar_with_md5(
        CifarArchive::Cifar10,
        dest.path(),
        Some(&server.base),
        false,
        &md5,
    )
    .unwrap();
    assert_eq!(server.requests.load(Ordering::SeqCst), 1);
    assert_eq!(
        cifar(&folder, CifarKind::Cifar10, Split::Test)
            .unwrap()
            .len(),
        2
    );
}

#[test]
fn fetch_rejects_a_wrong_md5_and_leaves_nothing() {
    // The published MD5 cannot match the synthetic archive.
    let server = Server::start(route(cifar10_archive()));
    let dest = tempfile::tempdir().unwrap();
    let err = fetch_cifar(
        CifarArchive::Cifar10,
        dest.path(),
        Some(&server.base),
        false,
    )
    .unwrap_err();
    match &err {
        Error::Checksum {
            path,
            expected,
            actual,
        } => {
            assert_eq!(expected, CifarArchive::Cifar10.md5());
            assert_ne!(actual, expected);
            assert!(path.ends_with("cifar-10-binary.tar.gz"));
        }
        other => panic!("expected a checksum error, got {other}"),
    }
    assert!(
        listing(dest.path()).is_empty(),
        "{:?}",
        listing(dest.path())
    );
}

#[test]
fn fetch_reports_404() {
    let server = Server::start(HashMap::new());
    let dest = tempfile::tempdir().unwrap();
    let err = fetch_cifar(
        CifarArchive::Cifar100,
        dest.path(),
        Some(&server.base),
        false,
    )
    .unwrap_err();
    assert!(matches!(err, Error::Download { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("404") && msg.contains("cifar-100-binary.tar.gz"),
        "{msg}"
    );
    assert!(listing(dest.path()).is_empty());
}

fn assert_refused(archive: Vec<u8>, needle: &str) {
    let md5 = md5_hex(&archive);
    let server = Server::start(route(archive));
    let outer = tempfile::tempdir().unwrap();
    let dest = outer.path().join("data");
    let err = fetch_cifar_with_md5(
        CifarArchive::Cifar10,
        &dest,
        Some(&server.base),
        false,
        &md5,
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Format { .. }), "{msg}");
    assert!(msg.contains(needle), "{msg}");
    // Nothing escaped, nothing half-extracted: only the verified archive stays.
    assert_eq!(listing(outer.path()), ["data"]);
    assert_eq!(listing(&dest), ["cifar-10-binary.tar.gz"]);
}

#[test]
fn fetch_refuses_members_that_escape() {
    let (batch, _) = cifar10_records(0, 1);
    assert_refused(
        tar_gz_raw(&[
            ("cifar-10-batches-bin/data_batch_1.bin", &batch),
            ("../evil", b"gotcha"),
        ]),
        "../evil",
    );
    assert_refused(
        tar_gz_raw(&[("/tmp/la-data-absolute-evil", b"gotcha")]),
        "/tmp/la-data-absolute-evil",
    );
    assert!(!Path::new("/tmp/la-data-absolute-evil").exists());
    assert_refused(
        tar_gz_with_symlink("cifar-10-batches-bin", "data_batch_1.bin", "../../outside"),
        "is a link",
    );
    // An archive without the expected folder.
    assert_refused(
        tar_gz_raw(&[("other/file.bin", b"x")]),
        "no `cifar-10-batches-bin/` folder",
    );
}

#[test]
fn fetch_reports_an_unreachable_server() {
    // Bind then drop a listener: its port is very likely closed now.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dest = tempfile::tempdir().unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let err = fetch_cifar(CifarArchive::Cifar10, dest.path(), Some(&base), false).unwrap_err();
    assert!(matches!(err, Error::Download { .. }), "{err}");
    assert!(listing(dest.path()).is_empty());
}
