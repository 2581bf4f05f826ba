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

#[test]
fn a_write_replaces_the_file_and_leaves_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.txt");
    write_atomically(&path, b"first").unwrap();
    write_atomically(&path, b"second").unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"second");
    assert_eq!(entries(dir.path()), ["out.txt"]);
}

#[test]
fn an_abandoned_write_keeps_the_old_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.txt");
    write_atomically(&path, b"old").unwrap();
    {
        let mut file = AtomicFile::create(&path).unwrap();
        file.write_all(b"half of the new cont").unwrap();
        // Dropped without commit, as when a writer fails midway.
    }
    assert_eq!(std::fs::read(&path).unwrap(), b"old");
    assert_eq!(entries(dir.path()), ["out.txt"]);
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
