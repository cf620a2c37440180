//! The three launcher stages, run in processes of their own (the gateway's executable
//! started again with a hidden first argument, see [`dispatch`]):
//!
//! - **launcher**: reads the [`LaunchSpec`] from the gateway, optionally becomes the
//!   command's own Unix user, enters new user, PID, mount and IPC namespaces, starts
//!   init, waits for it and reports how the command ended. If the gateway goes away, it
//!   kills init (and so the whole namespace).
//! - **init**: PID 1 of the new namespace. Builds the command's own root file system
//!   (a read-only tmpfs with binds of what it may use, a private `/proc` and `/tmp`) and
//!   `pivot_root`s into it, starts
//!   the exec stage, reaps orphans, passes stop signals on to every process in the
//!   namespace, and exits as soon as the command's main process has: the kernel then
//!   kills whatever is left. Init stays outside the command's Landlock domain, so the
//!   command can neither signal nor trace it.
//! - **exec**: unblocks the signals init blocked, restricts itself with Landlock, drops
//!   every capability, installs the seccomp filters, and replaces itself with the command
//!   (same process: the command's main process).
//!
//! Every stage is single-threaded (unsharing a user namespace requires it) and talks to
//! its parent over a Unix socket on its standard input: one JSON line down (the spec)
//! and one up (the [`Report`]). End of file on that socket means the parent died, or,
//! for the exec stage, that it became the command.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use landlock::{
    ABI, Access, AccessFs, AccessNet, BitFlags, CompatLevel, Compatible, LandlockStatus,
    PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus, Scope,
};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sched::{CloneFlags, unshare};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, sigprocmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::statvfs::{FsFlags, statvfs};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{Gid, Pid, Uid};

use super::{Features, LaunchSpec, Report};

/// First argument that makes the gateway's executable act as the launcher.
pub const LAUNCHER_ARG: &str = "__kinvoke-sandbox-launch";
/// First argument that makes it act as the sandbox's init.
const INIT_ARG: &str = "__kinvoke-sandbox-init";
/// First argument that makes it act as the stage that confines itself and becomes the
/// command.
const EXEC_ARG: &str = "__kinvoke-sandbox-exec";
/// The executable to start again: the running one, even if its file was replaced since.
pub const SELF_EXE: &str = "/proc/self/exe";
/// Largest spec line accepted (the command line is capped far below this).
const MAX_SPEC_BYTES: u64 = 4 * 1024 * 1024;
/// The newest Landlock ABI whose rights this code asks for and is tested against.
const LANDLOCK_ABI: ABI = ABI::V7;

/// Runs a launcher stage when the process was started as one; call first thing in
/// `main`, before any thread exists. `None` = a normal start, go on.
pub fn dispatch() -> Option<ExitCode> {
    let stage = std::env::args_os().nth(1)?;
    if stage == LAUNCHER_ARG {
        close_inherited_fds();
        Some(launcher())
    } else if stage == INIT_ARG {
        Some(init())
    } else if stage == EXEC_ARG {
        Some(exec_stage())
    } else {
        None
    }
}

/// Closes every file descriptor above standard error. The gateway's own descriptors are
/// close-on-exec, but whatever the gateway inherited from its parent without that flag
/// (a shell's `exec 7<secret`, a service manager's pipe) would otherwise reach every
/// command, and Landlock checks files only when they are opened.
#[allow(
    unsafe_code,
    reason = "close_range(2) has no safe binding in std or nix; see the SAFETY note"
)]
fn close_inherited_fds() {
    // SAFETY: called first thing in a freshly exec'd, single-threaded process, before any
    // Rust value owns a descriptor above 2 (std's runtime only ever touches 0-2), so no
    // owner is left holding a closed descriptor. The syscall takes plain integers.
    let closed = unsafe { nix::libc::syscall(nix::libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    if closed != 0 {
        eprintln!(
            "kinvoke: sandbox: close_range failed: {}",
            std::io::Error::last_os_error()
        );
        std::process::exit(1);
    }
}

/// The parent's socket, which is this stage's standard input.
fn control_socket() -> Result<UnixStream, String> {
    let fd: OwnedFd = std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| format!("sandbox: no control socket: {e}"))?;
    Ok(UnixStream::from(fd))
}

fn read_spec(control: &UnixStream) -> Result<LaunchSpec, String> {
    let mut line = String::new();
    BufReader::new(control.take(MAX_SPEC_BYTES))
        .read_line(&mut line)
        .map_err(|e| format!("sandbox: cannot read the launch spec: {e}"))?;
    serde_json::from_str(&line).map_err(|e| format!("sandbox: malformed launch spec: {e}"))
}

fn send(mut control: &UnixStream, report: &Report) {
    if let Ok(mut line) = serde_json::to_vec(report) {
        line.push(b'\n');
        // the parent may be gone already; nobody is left to tell then
        let _ = control.write_all(&line);
    }
}

/// Blocks the signals this stage handles itself, so they queue for its signalfd instead
/// of killing it (and, for init, so the kernel does not drop them: PID 1 ignores signals
/// it has no handler for, but never blocked ones).
fn signal_fd(signals: &[Signal]) -> Result<SignalFd, String> {
    let mut mask = SigSet::empty();
    for s in signals {
        mask.add(*s);
    }
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&mask), None)
        .map_err(|e| format!("sandbox: cannot block signals: {e}"))?;
    SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .map_err(|e| format!("sandbox: cannot create a signalfd: {e}"))
}

// ---- stage 1: the launcher ----

fn launcher() -> ExitCode {
    let control = match control_socket() {
        Ok(c) => c,
        Err(reason) => {
            eprintln!("kinvoke: {reason}");
            return ExitCode::FAILURE;
        }
    };
    let report = read_spec(&control).and_then(|spec| launch(&spec, &control));
    send(&control, &report.unwrap_or_else(Report::Failed));
    ExitCode::SUCCESS
}

fn launch(spec: &LaunchSpec, control: &UnixStream) -> Result<Report, String> {
    // stop signals reach init through the process group; the launcher waits for it
    let signals = signal_fd(&[
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGQUIT,
    ])?;
    if let Some((uid, gid)) = spec.run_as {
        become_user(uid, gid)?;
    }
    let (outer_uid, outer_gid) = (Uid::current(), Gid::current());
    unshare(
        CloneFlags::CLONE_NEWUSER
            | CloneFlags::CLONE_NEWPID
            | CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWIPC,
    )
    .map_err(|e| {
        format!(
            "sandbox: cannot create user, PID and mount namespaces: {e}; the kernel must allow \
             unprivileged user namespaces (user.max_user_namespaces > 0, and on Debian/Ubuntu \
             kernel.unprivileged_userns_clone = 1, kernel.apparmor_restrict_unprivileged_userns = 0)"
        )
    })?;
    // root inside the namespace (so init may mount), the launcher's own user outside
    write_proc("/proc/self/setgroups", "deny")?;
    write_proc("/proc/self/uid_map", &format!("0 {outer_uid} 1"))?;
    write_proc("/proc/self/gid_map", &format!("0 {outer_gid} 1"))?;

    let (ours, theirs) =
        UnixStream::pair().map_err(|e| format!("sandbox: cannot create a socket: {e}"))?;
    let mut init = Command::new(SELF_EXE)
        .arg0("kinvoke-sandbox-init")
        .arg(INIT_ARG)
        .env_clear()
        .stdin(Stdio::from(OwnedFd::from(theirs)))
        .spawn()
        .map_err(|e| format!("sandbox: cannot start init: {e}"))?;
    let init_pid = Pid::from_raw(i32::try_from(init.id()).unwrap_or(i32::MAX));
    let mut line =
        serde_json::to_vec(spec).map_err(|e| format!("sandbox: cannot encode the spec: {e}"))?;
    line.push(b'\n');
    if let Err(e) = (&ours).write_all(&line) {
        let _ = init.kill();
        let _ = init.wait();
        return Err(format!("sandbox: cannot hand the spec to init: {e}"));
    }

    let mut parent_alive = true;
    let status = loop {
        if let Ok(Some(status)) = init.try_wait() {
            break status;
        }
        let mut fds = vec![PollFd::new(signals.as_fd(), PollFlags::POLLIN)];
        if parent_alive {
            fds.push(PollFd::new(control.as_fd(), PollFlags::POLLIN));
        }
        if poll(&mut fds, PollTimeout::NONE).is_err() {
            continue;
        }
        let parent_event = fds.get(1).and_then(PollFd::revents).is_some_and(|r| {
            r.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR)
        });
        drop(fds);
        while let Ok(Some(_)) = signals.read_signal() {}
        if parent_event && parent_gone(control) {
            // the gateway died: nothing may outlive it
            parent_alive = false;
            let _ = kill(init_pid, Signal::SIGKILL);
        }
    };
    let mut reply = String::new();
    let _ = BufReader::new((&ours).take(MAX_SPEC_BYTES)).read_line(&mut reply);
    match serde_json::from_str::<Report>(&reply) {
        Ok(report) => Ok(report),
        Err(_) => match (status.code(), status.signal()) {
            (_, Some(signal)) => Ok(Report::Signaled(signal)),
            (code, None) => Err(format!(
                "sandbox: init ended (exit code {code:?}) without saying how the command ended"
            )),
        },
    }
}

/// True when the parent's end of the socket is closed (a read returns end of file).
fn parent_gone(control: &UnixStream) -> bool {
    let mut buf = [0u8; 64];
    let _ = control.set_nonblocking(true);
    let gone = matches!((&*control).read(&mut buf), Ok(0));
    let _ = control.set_nonblocking(false);
    gone
}

fn become_user(uid: u32, gid: u32) -> Result<(), String> {
    let (uid, gid) = (Uid::from_raw(uid), Gid::from_raw(gid));
    nix::unistd::setgroups(&[])
        .and_then(|()| nix::unistd::setresgid(gid, gid, gid))
        .and_then(|()| nix::unistd::setresuid(uid, uid, uid))
        // changing user makes a process undumpable, which makes its /proc/self files
        // root's: the uid_map write that follows would be refused
        .and_then(|()| nix::sys::prctl::set_dumpable(true))
        .map_err(|e| {
            format!(
                "sandbox: cannot become user {uid} (sandbox.run_as_uids): {e}; only a gateway \
                 running as root can give commands users of their own"
            )
        })
}

fn write_proc(path: &str, content: &str) -> Result<(), String> {
    std::fs::write(path, content).map_err(|e| format!("sandbox: cannot write {path}: {e}"))
}

// ---- stage 2: init, PID 1 of the command's namespace ----

fn init() -> ExitCode {
    let control = match control_socket() {
        Ok(c) => c,
        Err(reason) => {
            eprintln!("kinvoke: {reason}");
            return ExitCode::FAILURE;
        }
    };
    // the launcher is this process's only link to the gateway: die with it
    let report = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)
        .map_err(|e| format!("sandbox: cannot tie init to its launcher: {e}"))
        .and_then(|()| read_spec(&control))
        .and_then(|spec| supervise(&spec, &control));
    send(&control, &report.unwrap_or_else(Report::Failed));
    // returning ends PID 1: the kernel kills every process left in the namespace
    ExitCode::SUCCESS
}

/// Signals that init passes on to every process in the namespace.
const FORWARDED: [Signal; 6] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

fn supervise(spec: &LaunchSpec, control: &UnixStream) -> Result<Report, String> {
    let mut handled = FORWARDED.to_vec();
    handled.push(Signal::SIGCHLD);
    let signals = signal_fd(&handled)?;
    let mut features = Features {
        landlock_full: false,
        landlock_scoped: false,
        private_proc: false,
        private_tmp: false,
        private_root: false,
        capabilities_dropped: false,
        seccomp: false,
    };
    build_root(spec, &mut features)?;
    let mut spec = spec.clone();
    if !features.private_tmp {
        spec.private_tmp = None;
    }

    // the exec stage confines itself and becomes the command; init itself stays outside
    // the Landlock domain, so no command can signal, trace or read it
    let (ours, theirs) =
        UnixStream::pair().map_err(|e| format!("sandbox: cannot create a socket: {e}"))?;
    let main = Command::new(SELF_EXE)
        .arg0("kinvoke-sandbox-exec")
        .arg(EXEC_ARG)
        .env_clear()
        .stdin(Stdio::from(OwnedFd::from(theirs)))
        .spawn()
        .map_err(|e| format!("sandbox: cannot start the exec stage: {e}"))?;
    let main_pid = Pid::from_raw(i32::try_from(main.id()).unwrap_or(i32::MAX));
    // the Child handle is not needed: init reaps every process itself
    drop(main);
    let mut line =
        serde_json::to_vec(&spec).map_err(|e| format!("sandbox: cannot encode the spec: {e}"))?;
    line.push(b'\n');
    (&ours)
        .write_all(&line)
        .map_err(|e| format!("sandbox: cannot hand the spec to the exec stage: {e}"))?;
    // end of file: the exec stage became the command (its end of the socket is closed on
    // exec); a line: it could not, or it was a probe
    let mut reply = String::new();
    let _ = BufReader::new((&ours).take(MAX_SPEC_BYTES)).read_line(&mut reply);
    if !reply.is_empty() {
        let _ = waitpid(main_pid, None);
        return match serde_json::from_str::<Report>(&reply) {
            Ok(Report::Probed(confined)) => Ok(Report::Probed(Features {
                private_proc: features.private_proc,
                private_tmp: features.private_tmp,
                private_root: features.private_root,
                ..confined
            })),
            Ok(report) => Ok(report),
            Err(e) => Err(format!(
                "sandbox: malformed answer from the exec stage: {e}"
            )),
        };
    }

    loop {
        let mut fds = [
            PollFd::new(signals.as_fd(), PollFlags::POLLIN),
            PollFd::new(control.as_fd(), PollFlags::POLLIN),
        ];
        if poll(&mut fds, PollTimeout::NONE).is_err() {
            continue;
        }
        let parent_event = fds[1].revents().is_some_and(|r| {
            r.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR)
        });
        if parent_event && parent_gone(control) {
            // the launcher died (killed): end the namespace with it
            return Ok(Report::Failed(
                "the sandbox's launcher ended before the command".to_owned(),
            ));
        }
        while let Ok(Some(info)) = signals.read_signal() {
            let Ok(signal) = Signal::try_from(i32::try_from(info.ssi_signo).unwrap_or(0)) else {
                continue;
            };
            if signal != Signal::SIGCHLD {
                // -1 from PID 1: every process of the namespace but init
                let _ = kill(Pid::from_raw(-1), signal);
            }
        }
        // reap everything that ended: the command and orphans re-parented to init
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) if pid == main_pid => {
                    return Ok(Report::Exited(code));
                }
                Ok(WaitStatus::Signaled(pid, signal, _)) if pid == main_pid => {
                    return Ok(Report::Signaled(signal as i32));
                }
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }
}

// ---- stage 3: the exec stage, which confines itself and becomes the command ----

fn exec_stage() -> ExitCode {
    let control = match control_socket() {
        Ok(c) => c,
        Err(reason) => {
            eprintln!("kinvoke: {reason}");
            return ExitCode::FAILURE;
        }
    };
    let report = read_spec(&control).and_then(|spec| confine_and_exec(&spec));
    send(&control, &report.unwrap_or_else(Report::Failed));
    ExitCode::FAILURE
}

/// Returns only when the command could not be started (or for a probe).
fn confine_and_exec(spec: &LaunchSpec) -> Result<Report, String> {
    // init blocks the signals it handles; the command must start with none blocked
    sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)
        .map_err(|e| format!("sandbox: cannot unblock signals: {e}"))?;
    let mut features = Features {
        landlock_full: false,
        landlock_scoped: false,
        private_proc: false,
        private_tmp: spec.private_tmp.is_some(),
        private_root: false,
        capabilities_dropped: false,
        seccomp: false,
    };
    restrict(spec, &mut features)?;
    drop_capabilities()?;
    features.capabilities_dropped = true;
    deny_syscalls()?;
    features.seccomp = true;
    if spec.probe {
        return Ok(Report::Probed(features));
    }
    let (program, args) = spec
        .argv
        .split_first()
        .ok_or_else(|| "empty command".to_owned())?;
    let err = Command::new(program)
        .args(args)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&spec.cwd)
        .stdin(Stdio::null())
        .exec();
    Err(format!("could not start \"{program}\": {err}"))
}

/// What the sandbox mounts itself, after the binds: a volume there would be covered by
/// the kernel's own file system, and Landlock, which grants by path, would give the
/// volume's rights to it (a writable `/proc/sys` is the host's kernel settings).
const RESERVED_TARGETS: &[&str] = &["/proc", "/dev", "/sys"];

/// Refuses a mount whose target is not a plain absolute path below `/`, lies inside
/// another bind or mount (whose contents could hold a symbolic link that creating the
/// target would follow on the host), or at or below what the sandbox mounts itself
/// (`/proc`, `/dev`, `/sys`, and `/tmp` when the command has a private one).
fn check_mounts(spec: &LaunchSpec) -> Result<(), String> {
    let bound: Vec<&Path> = spec
        .read_only
        .iter()
        .chain(&spec.devices)
        .chain(&spec.writable)
        .map(PathBuf::as_path)
        .collect();
    let private_tmp = spec.private_tmp.as_ref().map(|_| Path::new("/tmp"));
    for (i, m) in spec.mounts.iter().enumerate() {
        let plain = m.target.is_absolute()
            && m.target.components().count() > 1
            && m.target.components().all(|c| {
                matches!(
                    c,
                    std::path::Component::RootDir | std::path::Component::Normal(_)
                )
            });
        let nested = bound.iter().any(|b| m.target.starts_with(b))
            || spec
                .mounts
                .iter()
                .enumerate()
                .any(|(j, other)| j != i && m.target.starts_with(&other.target));
        let reserved = RESERVED_TARGETS
            .iter()
            .map(Path::new)
            .chain(private_tmp)
            .any(|r| m.target.starts_with(r));
        if !plain || nested || reserved {
            return Err(format!(
                "sandbox: mount target {} must be a plain absolute path below / that lies in \
                 no other mount and not in /proc, /dev or /sys",
                m.target.display()
            ));
        }
    }
    Ok(())
}

/// Makes the mount point for `shown_at` below `root`, one component at a time, refusing
/// any component that is a symbolic link or not a directory: the path lies inside a
/// volume whose contents a command may have written.
fn create_below(root: &Path, shown_at: &Path, dir: bool) -> Result<PathBuf, String> {
    let parts: Vec<_> = shown_at
        .components()
        .filter(|c| matches!(c, std::path::Component::Normal(_)))
        .collect();
    let mut at = root.to_path_buf();
    for (i, part) in parts.iter().enumerate() {
        at.push(part);
        let last = i + 1 == parts.len();
        match std::fs::symlink_metadata(&at) {
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(format!(
                    "sandbox: cannot show {} there: {} is a symbolic link",
                    shown_at.display(),
                    at.display()
                ));
            }
            Ok(meta) if !last && !meta.is_dir() => {
                return Err(format!(
                    "sandbox: cannot show {} there: {} is not a directory",
                    shown_at.display(),
                    at.display()
                ));
            }
            Ok(_) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                let made = if last && !dir {
                    std::fs::File::create_new(&at).map(drop)
                } else {
                    std::fs::create_dir(&at)
                };
                made.map_err(|e| format!("sandbox: cannot create {}: {e}", at.display()))?;
            }
            Err(err) => return Err(format!("sandbox: cannot inspect {}: {err}", at.display())),
        }
    }
    Ok(at)
}

/// Builds the command's file system and moves into it: a small read-only tmpfs as `/`,
/// holding only bind mounts of the read-only paths (read-only), the devices, the
/// command's own directories (read-write), a `/proc` of this PID namespace only, and
/// `/dev/fd` and `/dev/std*` links. Everything else of the host, such as the Unix
/// sockets of its daemons, does not exist for the command. Landlock then confines it
/// again inside this view.
fn build_root(spec: &LaunchSpec, features: &mut Features) -> Result<(), String> {
    let fail = |what: &str, path: &Path, e: &dyn std::fmt::Display| {
        format!("sandbox: cannot {what} {}: {e}", path.display())
    };
    // nothing mounted here may reach the host's mount table
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| fail("make private", Path::new("/"), &e))?;
    let root = spec.new_root.as_path();
    mount(
        Some("tmpfs"),
        root,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755,size=1m"),
    )
    .map_err(|e| fail("mount a tmpfs on", root, &e))?;
    let inside = |path: &Path| root.join(path.strip_prefix("/").unwrap_or(path));

    let read_only = spec.read_only.iter().map(|p| (p, p, Bind::ReadOnly));
    let devices = spec.devices.iter().map(|p| (p, p, Bind::Device));
    let writable = spec.writable.iter().map(|p| (p, p, Bind::Writable));
    check_mounts(spec)?;
    let mounts = spec.mounts.iter().map(|m| {
        let kind = if m.writable {
            Bind::Writable
        } else {
            Bind::ReadOnly
        };
        (&m.source, &m.target, kind)
    });
    // outer paths first (a stable sort keeps the given order otherwise): a volume shown
    // at /tmp must not hide a program directory below /tmp, bound after it
    let mut binds: Vec<(&PathBuf, &PathBuf, Bind)> = read_only
        .chain(devices)
        .chain(writable)
        .chain(mounts)
        .collect();
    binds.sort_by_key(|(_, shown_at, _)| shown_at.components().count());
    for (path, shown_at, kind) in binds {
        let Ok(meta) = std::fs::metadata(path) else {
            // a configured path that this host lacks grants nothing
            continue;
        };
        let in_volume = spec
            .mounts
            .iter()
            .any(|m| shown_at.starts_with(&m.target) && shown_at != &m.target);
        let target = if in_volume {
            // below a volume, whose contents an earlier container may have written: no
            // symbolic link is followed while making the mount point
            create_below(root, shown_at, meta.is_dir())?
        } else {
            let target = inside(shown_at);
            if meta.is_dir() {
                std::fs::create_dir_all(&target).map_err(|e| fail("create", &target, &e))?;
            } else {
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent).map_err(|e| fail("create", parent, &e))?;
                }
                if !target.exists() {
                    std::fs::File::create(&target).map_err(|e| fail("create", &target, &e))?;
                }
            }
            target
        };
        mount(
            Some(path.as_path()),
            &target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|e| fail("bind-mount", path, &e))?;
        // no setuid programs or device nodes from any bind; everything but the command's
        // own directories read-only, so no chmod, chown, utimes or xattr reaches the
        // host's files (writing to a device node works on a read-only mount); flags the
        // host locked on the mount (nosuid, noexec, atime) must be kept
        let mut flags =
            MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_NOSUID | locked_flags(&target);
        if kind != Bind::Writable {
            flags |= MsFlags::MS_RDONLY;
        }
        if kind != Bind::Device {
            flags |= MsFlags::MS_NODEV;
        }
        mount(None::<&str>, &target, None::<&str>, flags, None::<&str>)
            .map_err(|e| fail("restrict", path, &e))?;
    }

    let proc = inside(Path::new("/proc"));
    std::fs::create_dir_all(&proc).map_err(|e| fail("create", &proc, &e))?;
    features.private_proc = mount(
        Some("proc"),
        &proc,
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .is_ok();
    if !features.private_proc {
        // a container that masks parts of /proc forbids a new one: the host's, which
        // Landlock's ptrace rule guards
        mount(
            Some("/proc"),
            &proc,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|e| fail("bind-mount", Path::new("/proc"), &e))?;
    }
    let dev = inside(Path::new("/dev"));
    std::fs::create_dir_all(&dev).map_err(|e| fail("create", &dev, &e))?;
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        let link = dev.join(name);
        std::os::unix::fs::symlink(target, &link).map_err(|e| fail("create", &link, &e))?;
    }
    // the command's tmp/ on /tmp, unless its own directory lies below /tmp (the mount
    // would hide it): then it has its TMPDIR only
    let tmp = inside(Path::new("/tmp"));
    let below_tmp = spec.cwd.starts_with("/tmp");
    if let Some(private) = spec.private_tmp.as_ref().filter(|_| !below_tmp) {
        std::fs::create_dir_all(&tmp).map_err(|e| fail("create", &tmp, &e))?;
        mount(
            Some(private.as_path()),
            &tmp,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| fail("bind-mount", private, &e))?;
        features.private_tmp = true;
    }
    mount(
        None::<&str>,
        root,
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        None::<&str>,
    )
    .map_err(|e| fail("make read-only", root, &e))?;

    // pivot_root(".", "."): the old root ends up stacked on the new one, then detached
    nix::unistd::chdir(root).map_err(|e| fail("enter", root, &e))?;
    nix::unistd::pivot_root(".", ".").map_err(|e| fail("pivot to", root, &e))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(|e| fail("detach", Path::new("/"), &e))?;
    nix::unistd::chdir("/").map_err(|e| fail("enter", Path::new("/"), &e))?;
    features.private_root = true;
    Ok(())
}

/// How a path is bound into the command's root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bind {
    ReadOnly,
    Device,
    Writable,
}

/// The per-mount flags of the mount holding `path` that a remount in a user namespace
/// must repeat (the kernel locks them when the namespace is created).
fn locked_flags(path: &Path) -> MsFlags {
    let Ok(stat) = statvfs(path) else {
        return MsFlags::empty();
    };
    let have = stat.flags();
    [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
        (FsFlags::ST_RDONLY, MsFlags::MS_RDONLY),
    ]
    .into_iter()
    .filter(|(st, _)| have.contains(*st))
    .fold(MsFlags::empty(), |acc, (_, ms)| acc | ms)
}

/// Landlock: read and execute on the read-only paths, everything on the command's own
/// directories, read and write on a few devices, reading `/proc`; nothing else. Signals
/// and abstract Unix sockets stay inside the sandbox's own domain where the kernel can
/// scope them (ABI 6+). Landlock also denies `ptrace` and `/proc/PID/{mem,environ,fd}` of
/// processes outside the domain, whatever `/proc` shows.
fn restrict(spec: &LaunchSpec, features: &mut Features) -> Result<(), String> {
    let fail = |e: &dyn std::fmt::Display| format!("sandbox: Landlock: {e}");
    let read_exec = AccessFs::Execute | AccessFs::ReadFile | AccessFs::ReadDir;
    let read_file = AccessFs::Execute | AccessFs::ReadFile;
    let all = AccessFs::from_all(LANDLOCK_ABI);
    let device = AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::Truncate;

    // (path, rights) first: a host that lacks a configured path simply grants nothing
    let mut rules: Vec<(PathBuf, BitFlags<AccessFs>)> = Vec::new();
    let mut grant = |path: &Path, dir_access: BitFlags<AccessFs>, file_access| {
        if let Ok(meta) = std::fs::metadata(path) {
            rules.push((
                path.to_owned(),
                if meta.is_dir() {
                    dir_access
                } else {
                    file_access
                },
            ));
        }
    };
    for p in &spec.read_only {
        grant(p, read_exec, read_file);
    }
    for p in &spec.writable {
        grant(p, all, AccessFs::from_file(LANDLOCK_ABI));
    }
    for m in &spec.mounts {
        if m.writable {
            grant(&m.target, all, AccessFs::from_file(LANDLOCK_ABI));
        } else {
            grant(&m.target, read_exec, read_file);
        }
    }
    if features.private_tmp {
        grant(Path::new("/tmp"), all, AccessFs::from_file(LANDLOCK_ABI));
    }
    for p in &spec.devices {
        grant(p, device, device);
    }
    grant(
        Path::new("/proc"),
        AccessFs::ReadFile | AccessFs::ReadDir,
        AccessFs::ReadFile.into(),
    );

    let mut ruleset = Ruleset::default()
        // Landlock itself is required; rights of newer ABIs are taken where available
        .set_compatibility(CompatLevel::HardRequirement)
        .handle_access(AccessFs::from_all(ABI::V1))
        .map_err(|e| fail(&e))?
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(all)
        .map_err(|e| fail(&e))?
        // no TCP listener: a command's `kubectl proxy` or port-forward would lend its
        // caller's relay credentials to every other command on the host (ABI 4+)
        .handle_access(AccessNet::BindTcp)
        .map_err(|e| fail(&e))?
        .scope(Scope::from_all(LANDLOCK_ABI))
        .map_err(|e| fail(&e))?
        .create()
        .map_err(|e| fail(&e))?;
    for (path, access) in rules {
        let fd = PathFd::new(&path).map_err(|e| fail(&e))?;
        ruleset = ruleset
            .add_rule(PathBeneath::new(fd, access))
            .map_err(|e| fail(&e))?;
    }
    let status = ruleset.restrict_self().map_err(|e| fail(&e))?;
    match status.ruleset {
        RulesetStatus::NotEnforced => {
            return Err(
                "sandbox: Landlock is not enforced by this kernel (needs Linux 5.13+ with \
                 landlock in the lsm= boot list)"
                    .to_owned(),
            );
        }
        RulesetStatus::FullyEnforced => features.landlock_full = true,
        RulesetStatus::PartiallyEnforced => features.landlock_full = false,
    }
    features.landlock_scoped = matches!(
        status.landlock,
        LandlockStatus::Available { effective_abi, .. } if effective_abi >= ABI::V6
    );
    if !status.no_new_privs {
        return Err("sandbox: no_new_privs could not be set".to_owned());
    }
    Ok(())
}

/// `IPPROTO_MPTCP` (linux/in.h): Go listens with Multipath TCP by default since 1.24, and
/// Landlock's TCP rules do not cover it.
const IPPROTO_MPTCP: u64 = 262;

/// `setxattrat(2)` and `removexattrat(2)` (Linux 6.13): syscalls numbered 424 and up
/// have one number on every architecture, and the libc crate does not name these yet.
const SYS_SETXATTRAT: i64 = 463;
const SYS_REMOVEXATTRAT: i64 = 466;

/// The seccomp filters of what no kubectl or helm needs and an escape would:
///
/// - tracing (`ptrace` could hold a dead main process hostage past its exit, and read
///   memory) and `process_vm_*`;
/// - listening sockets: `listen` (a `bind`-less listen gets a port Landlock never sees)
///   and Multipath TCP sockets (Landlock's TCP rules do not cover them; Go falls back to
///   TCP), so no command serves its relay credentials to other commands;
/// - new user namespaces (`unshare`/`clone` with `CLONE_NEWUSER`; `clone3`, whose flags
///   seccomp cannot read, answers ENOSYS and the C library falls back to `clone`): in one,
///   a command would hold every capability again;
/// - setuid and setgid modes on any file it creates or changes, and extended
///   attributes (file capabilities);
/// - kernel keyrings, BPF, perf, userfaultfd and io_uring (`openat2` answers ENOSYS,
///   callers fall back to `openat`, whose mode the filter reads).
fn deny_syscalls() -> Result<(), String> {
    use nix::libc;
    use seccompiler::{
        BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
        SeccompRule,
    };
    use std::collections::BTreeMap;
    let fail = |e: &dyn std::fmt::Display| format!("sandbox: seccomp: {e}");
    let when = |arg: u8, mask: u64, value: u64| -> Result<SeccompRule, String> {
        let condition = SeccompCondition::new(
            arg,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::MaskedEq(mask),
            value,
        )
        .map_err(|e| fail(&e))?;
        SeccompRule::new(vec![condition]).map_err(|e| fail(&e))
    };
    // a mode argument with the setuid or the setgid bit
    let set_id = |arg: u8| -> Result<Vec<SeccompRule>, String> {
        Ok(vec![when(arg, 0o4000, 0o4000)?, when(arg, 0o2000, 0o2000)?])
    };
    let new_user_ns = |arg: u8| -> Result<Vec<SeccompRule>, String> {
        let flag = u64::from(CloneFlags::CLONE_NEWUSER.bits().cast_unsigned());
        Ok(vec![when(arg, flag, flag)?])
    };
    let mut refused: BTreeMap<i64, Vec<SeccompRule>> = [
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_listen,
        libc::SYS_keyctl,
        libc::SYS_add_key,
        libc::SYS_request_key,
        libc::SYS_bpf,
        libc::SYS_perf_event_open,
        libc::SYS_userfaultfd,
        libc::SYS_io_uring_setup,
        libc::SYS_setxattr,
        libc::SYS_lsetxattr,
        libc::SYS_fsetxattr,
        SYS_SETXATTRAT,
        SYS_REMOVEXATTRAT,
    ]
    .into_iter()
    .map(|call| (call, Vec::new()))
    .collect();
    refused.insert(
        libc::SYS_socket,
        vec![when(2, u64::from(u32::MAX), IPPROTO_MPTCP)?],
    );
    refused.insert(libc::SYS_unshare, new_user_ns(0)?);
    refused.insert(libc::SYS_clone, new_user_ns(0)?);
    refused.insert(libc::SYS_fchmod, set_id(1)?);
    refused.insert(libc::SYS_fchmodat, set_id(2)?);
    refused.insert(libc::SYS_fchmodat2, set_id(2)?);
    refused.insert(libc::SYS_openat, set_id(3)?);
    refused.insert(libc::SYS_mknodat, set_id(2)?);
    refused.insert(libc::SYS_mkdirat, set_id(2)?);
    #[cfg(target_arch = "x86_64")]
    {
        // the older calls only x86_64 still has
        refused.insert(libc::SYS_chmod, set_id(1)?);
        refused.insert(libc::SYS_open, set_id(2)?);
        refused.insert(libc::SYS_creat, set_id(1)?);
        refused.insert(libc::SYS_mknod, set_id(1)?);
        refused.insert(libc::SYS_mkdir, set_id(1)?);
    }
    let not_implemented: BTreeMap<i64, Vec<SeccompRule>> = [libc::SYS_clone3, libc::SYS_openat2]
        .into_iter()
        .map(|call| (call, Vec::new()))
        .collect();
    let arch: seccompiler::TargetArch = std::env::consts::ARCH.try_into().map_err(|e| fail(&e))?;
    for (rules, errno) in [(refused, libc::EPERM), (not_implemented, libc::ENOSYS)] {
        let filter = SeccompFilter::new(
            rules,
            SeccompAction::Allow,
            SeccompAction::Errno(errno.cast_unsigned()),
            arch,
        )
        .map_err(|e| fail(&e))?;
        let program: BpfProgram = filter.try_into().map_err(|e| fail(&e))?;
        seccompiler::apply_filter(&program).map_err(|e| fail(&e))?;
    }
    Ok(())
}

/// Root of the user namespace keeps no capability across `exec`: the bounding and
/// inheritable sets are emptied, so the command starts with none.
fn drop_capabilities() -> Result<(), String> {
    for set in [
        caps::CapSet::Ambient,
        caps::CapSet::Inheritable,
        caps::CapSet::Bounding,
    ] {
        caps::clear(None, set)
            .map_err(|e| format!("sandbox: cannot drop capabilities ({set:?}): {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]

    use super::*;

    fn spec_with_mount(target: &str) -> LaunchSpec {
        LaunchSpec {
            argv: vec!["true".into()],
            env: Vec::new(),
            cwd: PathBuf::from("/"),
            read_only: vec![PathBuf::from("/usr")],
            writable: Vec::new(),
            mounts: vec![crate::sandbox::Mount {
                source: PathBuf::from("/tmp/volume"),
                target: PathBuf::from(target),
                writable: true,
            }],
            devices: Vec::new(),
            private_tmp: None,
            new_root: PathBuf::from("/tmp/root"),
            run_as: None,
            probe: false,
        }
    }

    #[test]
    fn a_volume_may_not_lie_where_the_sandbox_mounts_the_kernels_file_systems() {
        for target in [
            "/proc",
            "/proc/sys",
            "/proc/sys/kernel",
            "/dev",
            "/dev/shm",
            "/sys",
            "/sys/kernel",
            "/",
            "/usr/local",
            "/a/../proc",
            "relative",
        ] {
            let err = check_mounts(&spec_with_mount(target)).unwrap_err();
            assert!(err.contains("mount target"), "{target}: {err}");
        }
        for target in ["/kinvoke/work", "/tmp", "/procedures", "/devices"] {
            check_mounts(&spec_with_mount(target)).unwrap_or_else(|e| panic!("{target}: {e}"));
        }
        // with a private /tmp, /tmp is the sandbox's
        let mut spec = spec_with_mount("/tmp/x");
        spec.private_tmp = Some(PathBuf::from("/tmp/private"));
        assert!(check_mounts(&spec).is_err());
    }

    #[test]
    fn a_mount_point_inside_a_volume_never_follows_a_planted_link() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        // a volume at /tmp whose writer planted tmp/cc -> a directory outside the root
        std::fs::create_dir(root.path().join("tmp")).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("tmp/cc")).unwrap();
        let err = create_below(root.path(), Path::new("/tmp/cc/.tools/bin"), true).unwrap_err();
        assert!(err.contains("symbolic link"), "{err}");
        assert!(
            std::fs::read_dir(outside.path()).unwrap().next().is_none(),
            "nothing was made through the link"
        );
        // a plain path is made one directory at a time, a file at its end
        let made = create_below(root.path(), Path::new("/tmp/tools/bin"), true).unwrap();
        assert!(made.is_dir() && made.starts_with(root.path()));
        let file = create_below(root.path(), Path::new("/tmp/etc/hosts"), false).unwrap();
        assert!(file.is_file());
        // a file where a directory must be
        let err = create_below(root.path(), Path::new("/tmp/etc/hosts/x"), true).unwrap_err();
        assert!(err.contains("not a directory"), "{err}");
    }
}
