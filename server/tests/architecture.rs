//! ARCHITECTURE.md's module table names every file of `server/src`, and only those: a
//! newcomer finds any concern's file from it in one step.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic with the difference is the failure report"
)]

use std::collections::BTreeSet;
use std::path::Path;

fn rust_files(dir: &Path, out: &mut BTreeSet<String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let relative = path
                .strip_prefix(Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap())
                .unwrap();
            out.insert(relative.display().to_string());
        }
    }
}

#[test]
fn the_module_table_matches_server_src() {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(manifest.join("../ARCHITECTURE.md")).unwrap();
    let listed: BTreeSet<String> = doc
        .lines()
        .filter_map(|l| l.strip_prefix("| `server/src/"))
        .filter_map(|rest| rest.split('`').next())
        .map(|file| format!("server/src/{file}"))
        .collect();
    let mut present = BTreeSet::new();
    rust_files(&manifest.join("src"), &mut present);
    let missing: Vec<_> = present.difference(&listed).collect();
    let stale: Vec<_> = listed.difference(&present).collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "ARCHITECTURE.md lacks {missing:?} and names files that do not exist: {stale:?}"
    );
}
