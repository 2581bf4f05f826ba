//! Atomic writes: the new content or the old, never a mix, and no temporary files left.

use std::io::Write;

use la_core::{write_atomically, AtomicFile};

fn entries(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// `out.txt` in a new directory.
fn target() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.txt");
    (dir, path)
}

/// The directory holds `out.txt` with `content`, and nothing else.
fn holds_only(dir: &tempfile::TempDir, content: &[u8]) {
    assert_eq!(std::fs::read(dir.path().join("out.txt")).unwrap(), content);
    assert_eq!(entries(dir.path()), ["out.txt"]);
}

#[test]
fn a_write_replaces_the_file_and_leaves_nothing_else() {
    let (dir, path) = target();
    write_atomically(&path, b"first").unwrap();
    write_atomically(&path, b"second").unwrap();
    holds_only(&dir, b"second");
}

#[test]
fn an_abandoned_write_keeps_the_old_file() {
    let (dir, path) = target();
    write_atomically(&path, b"old").unwrap();
    {
        let mut file = AtomicFile::create(&path).unwrap();
        file.write_all(b"half of the new cont").unwrap();
        // Dropped without commit, as when a writer fails midway.
    }
    holds_only(&dir, b"old");
}

#[test]
fn an_unwritable_destination_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no/such/dir/out.txt");
    let err = write_atomically(&path, b"x").unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("no/such/dir/out.txt") && text.contains("cannot write"),
        "{text}"
    );
    // The cause is kept, not flattened.
    assert!(std::error::Error::source(&err).is_some());
}

/// Written files get the usual mode (0o666 less the umask), not tempfile's owner-only 0o600:
/// weights and plots are shared with other users and tools.
#[cfg(unix)]
#[test]
fn written_files_are_readable_by_others_as_with_file_create() {
    use std::os::unix::fs::PermissionsExt;
    let (dir, path) = target();
    write_atomically(&path, b"x").unwrap();
    let plain = dir.path().join("plain.txt");
    std::fs::File::create(&plain).unwrap();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&path), mode(&plain));
}
