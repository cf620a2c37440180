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

/// The top-level modules of `server/src` each module names with `crate::NAME`, comments
/// aside.
fn imports() -> std::collections::BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let Some(name) = path.file_stem().map(|s| s.to_string_lossy().into_owned()) else {
            continue;
        };
        if name == "lib" || name == "main" {
            continue;
        }
        let mut files = BTreeSet::new();
        if path.is_dir() {
            rust_files(&path, &mut files);
        } else {
            files.insert(
                path.strip_prefix(src.parent().unwrap().parent().unwrap())
                    .unwrap()
                    .display()
                    .to_string(),
            );
        }
        let root = src.parent().unwrap().parent().unwrap();
        let used: &mut BTreeSet<String> = out.entry(name.clone()).or_default();
        for file in files {
            let text = std::fs::read_to_string(root.join(&file)).unwrap();
            for line in text.lines().filter(|l| !l.trim_start().starts_with("//")) {
                for (i, _) in line.match_indices("crate::") {
                    let rest = &line[i + "crate::".len()..];
                    let module: String = rest
                        .chars()
                        .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                        .collect();
                    if !module.is_empty() && module != name {
                        used.insert(module);
                    }
                }
            }
        }
    }
    out
}

#[test]
fn no_module_imports_a_module_that_imports_it_back() {
    let imports = imports();
    let mut cycles = Vec::new();
    for (a, used) in &imports {
        for b in used {
            if a < b && imports.get(b).is_some_and(|back| back.contains(a)) {
                cycles.push(format!("{a} <-> {b}"));
            }
        }
    }
    assert!(cycles.is_empty(), "import cycles: {cycles:?}");
    // the check sees real imports
    assert!(imports["runner"].contains("exec"), "{imports:?}");
}
