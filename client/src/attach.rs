//! Turns `--file` arguments into attached files. A single file keeps its base name; a
//! directory is attached recursively as `NAME/...`, except `.` whose contents keep their
//! paths relative to it (like az). Names are those the user gave: a symbolic link keeps
//! its own name and its target supplies the content; inside an attached directory, a
//! link must stay inside it (a link out is refused, naming where it leads). The same
//! name twice is an error.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path};

use kinvoke_proto::v1::AttachedFile;

use crate::conn::LocalError;

/// Reads every `--file` argument into attachments, in a stable order.
pub fn collect(args: &[impl AsRef<Path>]) -> Result<Vec<AttachedFile>, LocalError> {
    let mut files: BTreeMap<String, (AttachedFile, String)> = BTreeMap::new();
    for arg in args {
        let arg = arg.as_ref();
        let meta = std::fs::metadata(arg)
            .map_err(|e| LocalError(format!("--file {}: {e}", arg.display())))?;
        if meta.is_dir() {
            let prefix = if is_current_dir(arg) {
                String::new()
            } else {
                base_name(arg)?
            };
            walk(arg, &prefix, arg, &mut files)?;
        } else {
            let name = base_name(arg)?;
            add(&mut files, name, arg)?;
        }
    }
    Ok(files.into_values().map(|(f, _)| f).collect())
}

fn is_current_dir(path: &Path) -> bool {
    path.components().all(|c| matches!(c, Component::CurDir))
}

/// The name an attachment gets: the last component of the path as the user wrote it,
/// so a symbolic link keeps its own name (its target supplies only the content); for a
/// path that ends in `..` or is `/`, the name of the directory it resolves to.
fn base_name(path: &Path) -> Result<String, LocalError> {
    let name = path
        .file_name()
        .map(|n| n.to_owned())
        .or_else(|| {
            path.canonicalize()
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_owned()))
        })
        .ok_or_else(|| LocalError(format!("--file {}: has no file name", path.display())))?;
    name.into_string().map_err(|n| {
        LocalError(format!(
            "--file {}: name {n:?} is not UTF-8; rename it",
            path.display()
        ))
    })
}

fn walk(
    dir: &Path,
    prefix: &str,
    arg: &Path,
    files: &mut BTreeMap<String, (AttachedFile, String)>,
) -> Result<(), LocalError> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| LocalError(format!("--file {}: {}: {e}", arg.display(), dir.display())))?;
    for entry in entries {
        let entry = entry
            .map_err(|e| LocalError(format!("--file {}: {}: {e}", arg.display(), dir.display())))?;
        let path = entry.path();
        let name = entry.file_name().into_string().map_err(|n| {
            LocalError(format!(
                "--file {}: name {n:?} is not UTF-8; rename it",
                arg.display()
            ))
        })?;
        let rel = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        let file_type = entry.file_type().map_err(|e| {
            LocalError(format!("--file {}: {}: {e}", arg.display(), path.display()))
        })?;
        if file_type.is_dir() {
            walk(&path, &rel, arg, files)?;
        } else if file_type.is_symlink() {
            // a link to a file is attached as that file; a link to a directory could loop
            let target = std::fs::metadata(&path).map_err(|e| {
                LocalError(format!("--file {}: {}: {e}", arg.display(), path.display()))
            })?;
            // a link that leads out of the attached directory (a chart's
            // `values.yaml -> ~/.kube/config`) would upload a file nobody named
            let (Ok(resolved), Ok(root)) = (path.canonicalize(), arg.canonicalize()) else {
                return Err(LocalError(format!(
                    "--file {}: {} is a symbolic link that cannot be resolved",
                    arg.display(),
                    path.display()
                )));
            };
            if !resolved.starts_with(&root) {
                return Err(LocalError(format!(
                    "--file {}: {} is a symbolic link to {}, outside {}; attach that file \
                     itself (--file {}) if it is meant to go",
                    arg.display(),
                    path.display(),
                    resolved.display(),
                    arg.display(),
                    resolved.display()
                )));
            }
            if target.is_dir() {
                return Err(LocalError(format!(
                    "--file {}: {} is a symbolic link to a directory; attach the directory itself",
                    arg.display(),
                    path.display()
                )));
            }
            add(files, rel, &path)?;
        } else {
            add(files, rel, &path)?;
        }
    }
    Ok(())
}

fn add(
    files: &mut BTreeMap<String, (AttachedFile, String)>,
    name: String,
    path: &Path,
) -> Result<(), LocalError> {
    let meta = std::fs::metadata(path)
        .map_err(|e| LocalError(format!("--file {}: {e}", path.display())))?;
    if !meta.is_file() {
        return Err(LocalError(format!(
            "--file {}: not a regular file or directory",
            path.display()
        )));
    }
    if let Some((_, first)) = files.get(&name) {
        return Err(LocalError(format!(
            "--file: \"{name}\" would be attached twice (from {first} and {}); rename one",
            path.display()
        )));
    }
    let content =
        std::fs::read(path).map_err(|e| LocalError(format!("--file {}: {e}", path.display())))?;
    let file = AttachedFile {
        path: name.clone(),
        content,
        mode: meta.permissions().mode() & 0o777,
    };
    files.insert(name, (file, path.display().to_string()));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(files: &[AttachedFile]) -> Vec<&str> {
        files.iter().map(|f| f.path.as_str()).collect()
    }

    #[test]
    fn directories_keep_their_name_and_relative_paths() {
        let tmp = tempfile::tempdir().unwrap();
        let chart = tmp.path().join("chart");
        std::fs::create_dir_all(chart.join("templates")).unwrap();
        std::fs::write(chart.join("Chart.yaml"), "name: x").unwrap();
        std::fs::write(chart.join("templates/cm.yaml"), "kind: ConfigMap").unwrap();
        let single = tmp.path().join("values.yaml");
        std::fs::write(&single, "a: 1").unwrap();
        let files = collect(&[chart, single]).unwrap();
        assert_eq!(
            names(&files),
            ["chart/Chart.yaml", "chart/templates/cm.yaml", "values.yaml"]
        );
    }

    #[test]
    fn a_symbolic_link_keeps_the_name_it_was_given_and_its_target_supplies_the_content() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        std::fs::write(dir.join("values.staging.yaml"), "env: staging").unwrap();
        std::os::unix::fs::symlink("values.staging.yaml", dir.join("values.dev.yaml")).unwrap();
        std::os::unix::fs::symlink("values.staging.yaml", dir.join("values.prod.yaml")).unwrap();
        std::fs::create_dir(dir.join("chart-1.2.3")).unwrap();
        std::fs::write(dir.join("chart-1.2.3/Chart.yaml"), "name: app").unwrap();
        std::os::unix::fs::symlink("chart-1.2.3", dir.join("chart")).unwrap();

        // `--file values.dev.yaml`: named as given, the staging file's content
        let files = collect(&[dir.join("values.dev.yaml")]).unwrap();
        assert_eq!(names(&files), ["values.dev.yaml"]);
        assert_eq!(files[0].content, b"env: staging");

        // two links to one file do not collide
        let files = collect(&[dir.join("values.dev.yaml"), dir.join("values.prod.yaml")]).unwrap();
        assert_eq!(names(&files), ["values.dev.yaml", "values.prod.yaml"]);

        // a linked directory arrives under the link's name
        let files = collect(&[dir.join("chart")]).unwrap();
        assert_eq!(names(&files), ["chart/Chart.yaml"]);

        // `..` and `dir/.` still name the directory they mean
        let files = collect(&[dir.join("chart-1.2.3/.")]).unwrap();
        assert_eq!(names(&files), ["chart-1.2.3/Chart.yaml"]);
    }

    #[test]
    fn a_link_inside_a_directory_that_leads_out_of_it_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let secret = tmp.path().join("kubeconfig");
        std::fs::write(&secret, "SECRET").unwrap();
        let chart = tmp.path().join("chart");
        std::fs::create_dir_all(chart.join("templates")).unwrap();
        std::fs::write(chart.join("values.base.yaml"), "a: 1").unwrap();
        std::os::unix::fs::symlink(&secret, chart.join("templates/values.yaml")).unwrap();
        let err = collect(&[&chart]).unwrap_err();
        assert!(err.0.contains("outside"), "{}", err.0);
        assert!(err.0.contains("kubeconfig"), "{}", err.0);
        // a link that stays inside is fine
        std::fs::remove_file(chart.join("templates/values.yaml")).unwrap();
        std::os::unix::fs::symlink("../values.base.yaml", chart.join("templates/values.yaml"))
            .unwrap();
        let files = collect(&[&chart]).unwrap();
        assert_eq!(
            names(&files),
            ["chart/templates/values.yaml", "chart/values.base.yaml"]
        );
    }

    #[test]
    fn duplicates_are_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        for d in ["a", "b"] {
            std::fs::create_dir(tmp.path().join(d)).unwrap();
            std::fs::write(tmp.path().join(d).join("x.yaml"), "").unwrap();
        }
        let err = collect(&[tmp.path().join("a/x.yaml"), tmp.path().join("b/x.yaml")]).unwrap_err();
        assert!(err.0.contains("attached twice"), "{}", err.0);
    }

    #[test]
    fn missing_files_are_named() {
        let err = collect(&["/nonexistent/file.yaml"]).unwrap_err();
        assert!(err.0.contains("/nonexistent/file.yaml"), "{}", err.0);
    }
}
