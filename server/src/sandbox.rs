//! The command sandbox of the local executor: what a command may touch, and the
//! machinery that makes it so.
//!
//! A command is untrusted code (see SECURITY.md). The gateway never runs it directly: it
//! starts its own executable again as a small launcher ([`stage`]) that
//!
//! 1. optionally becomes a per-command Unix user from a configured range (when the
//!    gateway runs as root),
//! 2. enters new user, PID, mount and IPC namespaces,
//! 3. starts an init process (PID 1 of the new PID namespace) that builds the command's
//!    own root file system (read-only binds of what it may read, its own directories, a
//!    private `/proc` and `/tmp`), moves into it, and starts a last stage that restricts itself with
//!    Landlock (read and execute on the system paths, read-write on the command's own
//!    directories, no signals or abstract sockets beyond its own domain), drops every
//!    capability, installs seccomp filters (no tracing, listening, new user namespaces
//!    or setuid files), and only then becomes the command.
//!
//! When the command's main process ends, init ends, and the kernel kills everything left
//! in the namespace: nothing the command started outlives it.
//!
//! [`launch`] is the gateway's side (spawn, report, stop); [`stage`] is what runs in the
//! launcher processes. This file holds the settings, the specification handed to the
//! launcher, and the pure checks: which paths are readable and whether one of them
//! exposes a secret of the gateway.

pub mod launch;
pub mod stage;

use std::collections::BTreeSet;
use std::ops::RangeInclusive;
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// Read-only paths a sandboxed command gets by default: the system's programs and
/// libraries, and the few files under `/etc` that name resolution, TLS and locale need.
/// `/etc` as a whole is left out on purpose: gateways keep their config in `/etc/kinvoke`.
/// Paths that do not exist on this machine are skipped.
pub const DEFAULT_READ_ONLY_PATHS: &[&str] = &[
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/etc/alternatives",
    "/etc/ca-certificates",
    // the trust stores, not /etc/ssl or /etc/pki as a whole: private keys live there
    "/etc/ssl/certs",
    "/etc/ssl/openssl.cnf",
    "/etc/pki/tls/certs",
    "/etc/pki/ca-trust/extracted",
    "/etc/group",
    "/etc/passwd",
    "/etc/nsswitch.conf",
    "/etc/hosts",
    "/etc/host.conf",
    "/etc/resolv.conf",
    "/etc/gai.conf",
    "/etc/protocols",
    "/etc/services",
    "/etc/localtime",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/mime.types",
];

/// Device files a command may read and write.
pub const DEVICES: &[&str] = &[
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
];

/// Where Kubernetes mounts a Pod's service-account token: always secret, whatever the
/// config says.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Whether a cluster's commands run in the sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxMode {
    /// Sandboxed; the gateway refuses to start if the kernel cannot sandbox.
    #[default]
    On,
    /// Not sandboxed: commands run as the gateway's user and can read its secrets. Only
    /// for hosts whose kernel cannot sandbox; `check-config` warns about it.
    Off,
}

/// The sandbox settings (`[sandbox]` in the config), validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxSettings {
    /// Paths a command may read and execute (directories cover what is below them).
    pub read_only_paths: Vec<PathBuf>,
    /// Directories every command may also write (shared by all of them: a cache, a
    /// drop box); empty by default.
    pub writable_paths: Vec<PathBuf>,
    /// Unix user ids handed out one per running command (group id = user id), when the
    /// gateway runs as root; `None` = commands keep the gateway's user, mapped to root of
    /// their own user namespace.
    pub run_as_uids: Option<RangeInclusive<u32>>,
    /// The paths the config names itself (not the defaults), with their keys: each must
    /// exist on the host, or a typo would silently grant nothing.
    pub configured_paths: Vec<LabeledPath>,
}

impl Default for SandboxSettings {
    fn default() -> Self {
        Self {
            read_only_paths: DEFAULT_READ_ONLY_PATHS.iter().map(PathBuf::from).collect(),
            writable_paths: Vec::new(),
            run_as_uids: None,
            configured_paths: Vec::new(),
        }
    }
}

/// A secret path exposed by a readable path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the sandbox lets commands read {readable} ({readable_source}), which holds {secret} ({secret_source}); \
     move the secret out of it or narrow sandbox.read_only_paths"
)]
pub struct SecretExposed {
    /// The readable path.
    pub readable: String,
    /// Where it comes from (a config key or "default").
    pub readable_source: String,
    /// The secret path.
    pub secret: String,
    /// Which config key names it.
    pub secret_source: String,
}

/// A path and the reason it is listed (a config key, "default", ...), for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabeledPath {
    /// The path as configured.
    pub path: PathBuf,
    /// Where it comes from.
    pub source: String,
}

impl LabeledPath {
    /// A path with its source.
    pub fn new(path: impl Into<PathBuf>, source: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            source: source.into(),
        }
    }
}

/// A program a cluster's commands run, with the config key that names it: the shell
/// (`cluster[i].shell`) or an argv-mode program (`cluster[i].allowed_programs`).
#[derive(Debug, Clone, Copy)]
pub struct NamedProgram<'a> {
    /// The program as configured: a base name (found on `PATH`) or an absolute path.
    pub path: &'a Path,
    /// The key, after the cluster's own (`shell`, `allowed_programs`).
    pub key: &'a str,
}

/// The readable paths for a cluster: the configured read-only and writable paths, and
/// the directories of [`command_dirs`], each with the config key it comes from.
pub fn readable_paths(
    settings: &SandboxSettings,
    command_path: &str,
    programs: &[NamedProgram<'_>],
    cluster_key: &str,
) -> Vec<LabeledPath> {
    let mut out: Vec<LabeledPath> = settings
        .read_only_paths
        .iter()
        .map(|p| LabeledPath::new(p, "sandbox.read_only_paths"))
        .chain(
            settings
                .writable_paths
                .iter()
                .map(|p| LabeledPath::new(p, "sandbox.writable_paths")),
        )
        .collect();
    for dir in path_dirs(command_path) {
        out.push(LabeledPath::new(dir, format!("{cluster_key}.path")));
    }
    for program in programs {
        if let Some(dir) = program_dir(program.path) {
            out.push(LabeledPath::new(
                dir,
                format!("{cluster_key}.{}", program.key),
            ));
        }
    }
    out
}

/// The directories a cluster's commands need besides the read-only paths: each directory
/// on their `PATH` and the directory of each program named by an absolute path (the
/// config refuses relative `PATH` entries; any that reached here would be skipped, as
/// they would name a directory inside the command's own).
pub fn command_dirs(command_path: &str, programs: &[NamedProgram<'_>]) -> Vec<PathBuf> {
    path_dirs(command_path)
        .map(PathBuf::from)
        .chain(
            programs
                .iter()
                .filter_map(|p| program_dir(p.path))
                .map(Path::to_owned),
        )
        .collect()
}

fn path_dirs(command_path: &str) -> impl Iterator<Item = &str> {
    command_path.split(':').filter(|d| d.starts_with('/'))
}

fn program_dir(program: &Path) -> Option<&Path> {
    program.parent().filter(|_| program.is_absolute())
}

/// Names the first configured path that does not exist on this host.
pub fn check_configured_paths_exist(settings: &SandboxSettings) -> Result<(), String> {
    match settings.configured_paths.iter().find(|p| !p.path.exists()) {
        None => Ok(()),
        Some(missing) => Err(format!(
            "{} ({}) does not exist on this host, so it would grant commands nothing; fix the path or remove it",
            missing.path.display(),
            missing.source
        )),
    }
}

/// Refuses a readable path that is, contains, or lies inside a secret path (a readable
/// `STATE_DIR/sub` exposes part of the state directory). Both sides are compared after
/// resolving symbolic links where the path exists (so `/opt/tools` → `/etc` is seen),
/// lexically otherwise.
pub fn check_exposure(
    readable: &[LabeledPath],
    secrets: &[LabeledPath],
) -> Result<(), SecretExposed> {
    check_paths(readable, secrets, true)
}

/// Refuses a readable path that is or contains one of `dirs`; one lying inside is fine
/// (the commands' work root holds their own directories, which they must reach).
pub fn check_containment(
    readable: &[LabeledPath],
    dirs: &[LabeledPath],
) -> Result<(), SecretExposed> {
    check_paths(readable, dirs, false)
}

/// A path a command can read lies inside a path every command may write.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{inner} ({inner_source}) lies inside {outer} ({outer_source}), which every command may write: \
     a command could replace a directory on its way with a symbolic link and have the next \
     command's sandbox mount something else there; keep sandbox.writable_paths apart from every other path"
)]
pub struct NestedInWritable {
    /// The inner path.
    pub inner: String,
    /// Where it comes from.
    pub inner_source: String,
    /// The writable path around it.
    pub outer: String,
    /// Where that comes from.
    pub outer_source: String,
}

/// Refuses any readable path (another writable path included) that lies strictly inside
/// one of the `writable` paths.
pub fn check_writable_nesting(
    readable: &[LabeledPath],
    writable: &[LabeledPath],
) -> Result<(), NestedInWritable> {
    for w in writable {
        let wp = resolved(&w.path);
        for r in readable {
            let rp = resolved(&r.path);
            // the writable entry itself is listed among the readable ones; anything else
            // may neither be it (a PATH directory commands can fill) nor lie inside it
            let itself = r.path == w.path && r.source == w.source;
            if !itself && rp.starts_with(&wp) {
                return Err(NestedInWritable {
                    inner: r.path.display().to_string(),
                    inner_source: r.source.clone(),
                    outer: w.path.display().to_string(),
                    outer_source: w.source.clone(),
                });
            }
        }
    }
    Ok(())
}

fn check_paths(
    readable: &[LabeledPath],
    secrets: &[LabeledPath],
    inside_too: bool,
) -> Result<(), SecretExposed> {
    for r in readable {
        let rp = resolved(&r.path);
        for s in secrets {
            let sp = resolved(&s.path);
            if sp.starts_with(&rp) || (inside_too && rp.starts_with(&sp)) {
                return Err(SecretExposed {
                    readable: r.path.display().to_string(),
                    readable_source: r.source.clone(),
                    secret: s.path.display().to_string(),
                    secret_source: s.source.clone(),
                });
            }
        }
    }
    Ok(())
}

/// The path with every symbolic link on it resolved, the dangling ones too (their
/// target, where it would be created), component by component; `.` and `..` as the
/// kernel reads them. A path that does not exist resolves as far as its links lead: a
/// link that points into a writable directory is seen even before its target exists.
fn resolved(path: &Path) -> PathBuf {
    use std::collections::VecDeque;
    use std::ffi::OsString;
    // a bound against link loops, as the kernel's own (40)
    const MAX_LINKS: usize = 40;
    let absolute = if path.is_absolute() {
        path.to_owned()
    } else {
        Path::new("/").join(path)
    };
    let mut pending: VecDeque<OsString> = absolute
        .components()
        .filter(|c| !matches!(c, Component::RootDir | Component::Prefix(_)))
        .map(|c| c.as_os_str().to_owned())
        .collect();
    let mut out = PathBuf::from("/");
    let mut links = 0;
    while let Some(part) = pending.pop_front() {
        if part == "." {
            continue;
        }
        if part == ".." {
            out.pop();
            continue;
        }
        let next = out.join(&part);
        let is_link = std::fs::symlink_metadata(&next).is_ok_and(|m| m.file_type().is_symlink());
        match std::fs::read_link(&next) {
            Ok(target) if is_link && links < MAX_LINKS => {
                links += 1;
                if target.is_absolute() {
                    out = PathBuf::from("/");
                }
                for c in target.components().rev() {
                    if !matches!(c, Component::RootDir | Component::Prefix(_)) {
                        pending.push_front(c.as_os_str().to_owned());
                    }
                }
            }
            _ => out = next,
        }
    }
    out
}

/// Parses `"START-END"` (inclusive) into a uid range; refuses ids below 1000 (system
/// users) and ranges that are empty.
pub fn parse_uid_range(text: &str) -> Result<RangeInclusive<u32>, String> {
    let (a, b) = text.split_once('-').ok_or_else(|| {
        format!("\"{text}\" is not a range; write it as START-END, e.g. \"200000-200999\"")
    })?;
    let start: u32 = a
        .trim()
        .parse()
        .map_err(|_| format!("\"{a}\" is not a user id"))?;
    let end: u32 = b
        .trim()
        .parse()
        .map_err(|_| format!("\"{b}\" is not a user id"))?;
    if start > end {
        return Err(format!("the range {start}-{end} is empty"));
    }
    if start < 1000 {
        return Err(format!(
            "user id {start} is below 1000 (system users); pick ids no other user or service has"
        ));
    }
    if end == u32::MAX {
        return Err("user id 4294967295 is reserved (-1)".to_owned());
    }
    Ok(start..=end)
}

/// Hands out one Unix user id per running command, so that no two commands share one.
#[derive(Debug)]
pub struct UidPool {
    free: Mutex<BTreeSet<u32>>,
}

/// A user id taken from a [`UidPool`]; given back when dropped.
#[derive(Debug)]
pub struct UidLease<'a> {
    pool: &'a UidPool,
    /// The id.
    pub uid: u32,
}

impl UidPool {
    /// A pool of every id in `range`.
    pub fn new(range: RangeInclusive<u32>) -> Self {
        Self {
            free: Mutex::new(range.collect()),
        }
    }

    /// Takes a free id, or `None` when every id is in use.
    pub fn take(&self) -> Option<UidLease<'_>> {
        let uid = self
            .free
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop_first()?;
        Some(UidLease { pool: self, uid })
    }
}

impl Drop for UidLease<'_> {
    fn drop(&mut self) {
        self.pool
            .free
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(self.uid);
    }
}

/// Everything the launcher needs to run one command in the sandbox; sent to it as one
/// JSON line on its standard input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchSpec {
    /// Program and arguments; the program is looked up on `PATH` from `env`.
    pub argv: Vec<String>,
    /// The command's whole environment.
    pub env: Vec<(String, String)>,
    /// Working directory (the attachments are here).
    pub cwd: PathBuf,
    /// Paths the command may read and execute.
    pub read_only: Vec<PathBuf>,
    /// Paths the command may read, write, create and delete below.
    pub writable: Vec<PathBuf>,
    /// Directories shown at another path inside the sandbox (a simulated kubelet's
    /// volume mounts): each is bound at its `target`, read-only or writable, and Landlock
    /// grants it as such. The local executor uses none.
    #[serde(default)]
    pub mounts: Vec<Mount>,
    /// Device files the command may read and write.
    pub devices: Vec<PathBuf>,
    /// Mounted over `/tmp` inside the sandbox.
    pub private_tmp: Option<PathBuf>,
    /// An empty directory the command's root file system is built on.
    pub new_root: PathBuf,
    /// Become this user and group before entering the namespaces.
    pub run_as: Option<(u32, u32)>,
    /// Set everything up, report what worked, and run nothing.
    pub probe: bool,
}

/// One directory bound at another path inside the sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    /// The directory on the host.
    pub source: PathBuf,
    /// Where the command sees it (absolute).
    pub target: PathBuf,
    /// Whether the command may write below it.
    pub writable: bool,
}

/// What the launcher reports back, as one JSON line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Report {
    /// The command's main process exited with this code.
    Exited(i32),
    /// The command's main process was killed by this signal.
    Signaled(i32),
    /// The sandbox could not be set up, or the program could not be started.
    Failed(String),
    /// The probe ran: what the kernel gave.
    Probed(Features),
}

/// Which protections a sandboxed command gets on this host, as found by a probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Features {
    /// Landlock enforces every requested restriction (else only some, on an older kernel).
    pub landlock_full: bool,
    /// Landlock's signal and abstract-socket scoping is in force (ABI 6+).
    pub landlock_scoped: bool,
    /// The command sees a `/proc` of its own PID namespace only.
    pub private_proc: bool,
    /// The command's `/tmp` is its own directory.
    pub private_tmp: bool,
    /// The command's `/` holds only what it may use (the host's other files and Unix
    /// sockets do not exist for it).
    pub private_root: bool,
    /// The command holds no capabilities, even in its own user namespace.
    pub capabilities_dropped: bool,
    /// A seccomp filter denies tracing, Multipath TCP, setuid modes and the like.
    pub seccomp: bool,
}

impl std::fmt::Display for Features {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let yes_no = |b: bool| if b { "yes" } else { "no" };
        write!(
            f,
            "Landlock {}{}, user/PID/mount/IPC namespaces, own root file system: {}, private /proc: {}, private /tmp: {}, capabilities dropped: {}, seccomp filter: {}",
            if self.landlock_full {
                "fully enforced"
            } else {
                "partially enforced (older kernel)"
            },
            if self.landlock_scoped {
                " with signal and socket scoping"
            } else {
                ""
            },
            yes_no(self.private_root),
            yes_no(self.private_proc),
            yes_no(self.private_tmp),
            yes_no(self.capabilities_dropped),
            yes_no(self.seccomp),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labeled(paths: &[&str]) -> Vec<LabeledPath> {
        paths.iter().map(|p| LabeledPath::new(p, "test")).collect()
    }

    #[test]
    fn a_readable_directory_holding_a_secret_is_refused_naming_both() {
        let cases = [
            (&["/etc"][..], "/etc/kinvoke/prod.kubeconfig", true),
            (
                &["/usr", "/etc/ssl"][..],
                "/etc/kinvoke/prod.kubeconfig",
                false,
            ),
            (&["/var/lib"][..], "/var/lib/kinvoke/state", true),
            (
                &["/var/lib/kinvoke/state"][..],
                "/var/lib/kinvoke/state",
                true,
            ),
            (
                &["/var/lib/kinvoke/state/sub"][..],
                "/var/lib/kinvoke/state",
                true,
            ),
            (&["/opt/a"][..], "/opt/ab/secret", false),
            (&["/opt/x/../etc"][..], "/opt/etc/secret", true),
            (&["/"][..], "/anything", true),
        ];
        for (readable, secret, refused) in cases {
            let result = check_exposure(&labeled(readable), &labeled(&[secret]));
            assert_eq!(result.is_err(), refused, "{readable:?} vs {secret}");
            if let Err(err) = result {
                let msg = err.to_string();
                assert!(msg.contains(secret), "{msg}");
            }
        }
    }

    #[test]
    fn a_readable_path_may_lie_inside_the_work_root_but_not_contain_it() {
        let work_root = labeled(&["/tmp"]);
        assert!(check_containment(&labeled(&["/tmp/kinvoke-x/work"]), &work_root).is_ok());
        assert!(check_containment(&labeled(&["/"]), &work_root).is_err());
        assert!(check_containment(&labeled(&["/tmp"]), &work_root).is_err());
    }

    #[test]
    fn nothing_may_lie_inside_a_path_every_command_writes() {
        let writable = labeled(&["/srv/shared"]);
        for (readable, refused) in [
            ("/srv/shared/a/b", true),
            ("/srv/shared/bin", true),
            ("/srv", false),
            ("/srv/sharedother", false),
        ] {
            let result = check_writable_nesting(&labeled(&[readable]), &writable);
            assert_eq!(result.is_err(), refused, "{readable}: {result:?}");
        }
        // a PATH directory that is the writable path itself: commands could fill it
        let path_dir = [LabeledPath::new("/srv/shared", "cluster[0].path")];
        assert!(check_writable_nesting(&path_dir, &writable).is_err());
        // the writable entry, listed among the readable paths, is not its own problem
        assert!(check_writable_nesting(&writable, &writable).is_ok());
    }

    #[test]
    fn a_dangling_link_is_resolved_to_where_its_target_would_be() {
        let dir = tempfile::tempdir().unwrap();
        let writable = dir.path().join("kw");
        std::fs::create_dir(&writable).unwrap();
        let link = dir.path().join("ktools");
        // its target does not exist yet: a command could create it and fill it
        std::os::unix::fs::symlink(writable.join("tools"), &link).unwrap();
        let err = check_writable_nesting(
            &[LabeledPath::new(&link, "cluster[0].path")],
            &[LabeledPath::new(&writable, "sandbox.writable_paths")],
        )
        .unwrap_err();
        assert_eq!(err.inner_source, "cluster[0].path");
        // and relative links and `..` resolve as the kernel reads them
        let rel = dir.path().join("rel");
        std::os::unix::fs::symlink("kw/../kw/sub", &rel).unwrap();
        assert!(resolved(&rel).starts_with(resolved(&writable)));
    }

    #[test]
    fn symbolic_links_are_followed_before_comparing() {
        let dir = tempfile::tempdir().unwrap();
        let secrets = dir.path().join("secrets");
        std::fs::create_dir(&secrets).unwrap();
        let link = dir.path().join("tools");
        std::os::unix::fs::symlink(&secrets, &link).unwrap();
        let err = check_exposure(
            &[LabeledPath::new(&link, "cluster[0].path")],
            &[LabeledPath::new(
                secrets.join("key.pem"),
                "listener[0].tls.key",
            )],
        )
        .unwrap_err();
        assert_eq!(err.readable_source, "cluster[0].path");
        assert_eq!(err.secret_source, "listener[0].tls.key");
    }

    #[test]
    fn the_default_paths_leave_etc_kinvoke_and_the_service_account_out() {
        let readable: Vec<LabeledPath> = DEFAULT_READ_ONLY_PATHS
            .iter()
            .map(|p| LabeledPath::new(p, "default"))
            .collect();
        let secrets = labeled(&[
            "/etc/kinvoke/gateway.toml",
            SERVICE_ACCOUNT_DIR,
            "/var/lib/kinvoke",
        ]);
        assert_eq!(check_exposure(&readable, &secrets), Ok(()));
    }

    #[test]
    fn readable_paths_add_the_command_path_and_the_programs_directories() {
        let paths = readable_paths(
            &SandboxSettings {
                read_only_paths: vec!["/usr".into()],
                writable_paths: vec!["/srv/cache".into()],
                run_as_uids: None,
                configured_paths: Vec::new(),
            },
            "/opt/kube/bin:relative:/usr/bin",
            &[
                NamedProgram {
                    path: Path::new("/opt/shells/bash"),
                    key: "shell",
                },
                NamedProgram {
                    path: Path::new("kubectl"),
                    key: "allowed_programs",
                },
                NamedProgram {
                    path: Path::new("/srv/helm/helm"),
                    key: "allowed_programs",
                },
            ],
            "cluster[2]",
        );
        let shown: Vec<(String, String)> = paths
            .iter()
            .map(|p| (p.path.display().to_string(), p.source.clone()))
            .collect();
        assert_eq!(
            shown,
            [
                ("/usr".into(), "sandbox.read_only_paths".into()),
                ("/srv/cache".into(), "sandbox.writable_paths".into()),
                ("/opt/kube/bin".into(), "cluster[2].path".into()),
                ("/usr/bin".into(), "cluster[2].path".into()),
                ("/opt/shells".into(), "cluster[2].shell".into()),
                ("/srv/helm".into(), "cluster[2].allowed_programs".into()),
            ]
        );
    }

    #[test]
    fn uid_ranges_are_parsed_and_checked() {
        assert_eq!(parse_uid_range("200000-200009"), Ok(200000..=200009));
        for (text, expected) in [
            ("200000", "START-END"),
            ("5-10", "below 1000"),
            ("3000-2000", "empty"),
            ("a-2000", "not a user id"),
            ("2000-4294967295", "reserved"),
        ] {
            let err = parse_uid_range(text).unwrap_err();
            assert!(err.contains(expected), "{text}: {err}");
        }
    }

    #[test]
    fn a_uid_is_lent_to_one_command_at_a_time() {
        let pool = UidPool::new(5000..=5001);
        let a = pool.take().unwrap();
        let b = pool.take().unwrap();
        assert_ne!(a.uid, b.uid);
        assert!(pool.take().is_none());
        let freed = a.uid;
        drop(a);
        assert_eq!(pool.take().unwrap().uid, freed);
    }

    #[test]
    fn the_spec_and_reports_round_trip_as_json() {
        let spec = LaunchSpec {
            argv: vec!["bash".into(), "-c".into(), "echo 'a\nb'".into()],
            env: vec![("PATH".into(), "/usr/bin".into())],
            cwd: "/w".into(),
            read_only: vec!["/usr".into()],
            writable: vec!["/w".into()],
            mounts: Vec::new(),
            devices: vec!["/dev/null".into()],
            private_tmp: Some("/t".into()),
            new_root: "/r".into(),
            run_as: Some((5000, 5000)),
            probe: false,
        };
        let line = serde_json::to_string(&spec).unwrap();
        assert!(!line.contains('\n'));
        assert_eq!(serde_json::from_str::<LaunchSpec>(&line).unwrap(), spec);
        let report = Report::Failed("x".into());
        let line = serde_json::to_string(&report).unwrap();
        assert_eq!(serde_json::from_str::<Report>(&line).unwrap(), report);
    }
}
