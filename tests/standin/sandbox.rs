//! The container side of the stand-in: a helper mode of this same binary that turns
//! itself into one container's process (the part a container runtime's `init` plays).
//!
//! `zeroscale-standin-node __standin-sandbox <spec.json>` joins the pod's network
//! namespace, makes a private mount (and UTS) namespace, builds the container's root on a
//! tmpfs (the host's `/usr /etc /opt`... as overlays with the tmpfs as their writable
//! layer, so nothing is ever written to the host; fresh `/proc`, `/dev` and `/sys` bound
//! from the host, a private `/tmp`), bind-mounts the volumes and the image's entrypoint,
//! chroots into it, takes the container's user and execs the command with exactly the
//! environment it is given. `__standin-enter <pid> <spec.json>` runs a command inside a
//! running container's namespaces and root (exec probes, `preStop` exec).
//!
//! It runs single-threaded, before any tokio runtime exists, because `setns` into a mount
//! namespace refuses multi-threaded callers. A failure before the final `execve` is written
//! as JSON to fd [`STATUS_FD`] (close-on-exec, so a successful exec closes it empty).

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt, symlink};
use std::path::{Component, Path, PathBuf};

use nix::fcntl::{FcntlArg, FdFlag, OFlag, fcntl, open};
use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, setns, unshare};
use nix::sys::signal::Signal;
use nix::sys::stat::{Mode, umask};
use nix::unistd::{
    AccessFlags, Gid, Uid, access, chdir, chroot, execve, fchdir, getppid, setgroups, sethostname,
    setresgid, setresuid,
};
use serde::{Deserialize, Serialize};

pub const SANDBOX_MODE: &str = "__standin-sandbox";
pub const ENTER_MODE: &str = "__standin-enter";
/// The descriptor on which the helper reports a failure before exec.
pub const STATUS_FD: RawFd = 3;
/// The `PATH` a container gets unless it sets its own (the usual image default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Top-level host directories a container sees (read through an overlay, or as the same
/// symlink when the host has one, as merged-/usr systems do for /bin and /lib).
pub const HOST_DIRS: &[&str] = &[
    "usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc", "opt",
];

/// Who the process runs as.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    /// `allowPrivilegeEscalation: false`.
    pub no_new_privs: bool,
}

/// What to exec.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Process {
    pub argv: Vec<String>,
    /// The whole environment: nothing is inherited.
    pub env: Vec<(String, String)>,
    pub working_dir: Option<String>,
    pub identity: Identity,
}

/// A host path bind-mounted into the container root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bind {
    pub source: PathBuf,
    /// Absolute path inside the container.
    pub target: String,
    pub read_only: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxSpec {
    /// `/run/netns/<name>`; `None` for host-network pods.
    pub netns: Option<PathBuf>,
    /// An empty host directory the container's tmpfs is mounted on (in the private mount
    /// namespace only).
    pub fs_dir: PathBuf,
    /// The pod name, in a UTS namespace of its own; `None` keeps the host's (host network).
    pub hostname: Option<String>,
    /// `/etc/hosts` of the container, when it gets its own.
    pub hosts: Option<String>,
    pub binds: Vec<Bind>,
    pub read_only_root: bool,
    pub process: Process,
    /// The stand-in's pid: if it is gone by the time the helper is ready, it exits.
    pub parent: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnterSpec {
    pub process: Process,
    pub parent: i32,
}

/// Why a container could not start, as the kubelet would say it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// `CreateContainerError` (the sandbox) or `RunContainerError` (the exec).
    pub reason: String,
    pub message: String,
}

fn create_error(what: impl std::fmt::Display, e: impl std::fmt::Display) -> Failure {
    Failure {
        reason: "CreateContainerError".into(),
        message: format!("{what}: {e}"),
    }
}

fn run_error(message: String) -> Failure {
    Failure {
        reason: "RunContainerError".into(),
        message,
    }
}

/// Runs the helper when this process was started as one; returns otherwise.
pub fn run_helper_if_asked() {
    let args: Vec<String> = std::env::args().collect();
    let failure = match args.get(1).map(String::as_str) {
        Some(SANDBOX_MODE) if args.len() == 3 => match read_spec::<SandboxSpec>(&args[2]) {
            Ok(spec) => sandbox(&spec),
            Err(f) => f,
        },
        Some(ENTER_MODE) if args.len() == 4 => {
            match (args[2].parse::<i32>(), read_spec::<EnterSpec>(&args[3])) {
                (Ok(pid), Ok(spec)) => enter(pid, &spec),
                (Err(e), _) => create_error("pid", e),
                (_, Err(f)) => f,
            }
        }
        _ => return,
    };
    report(&failure);
    std::process::exit(128);
}

fn read_spec<T: for<'de> Deserialize<'de>>(path: &str) -> Result<T, Failure> {
    let text = std::fs::read(path).map_err(|e| create_error(path, e))?;
    serde_json::from_slice(&text).map_err(|e| create_error(path, e))
}

fn report(failure: &Failure) {
    // SAFETY: fd 3 is the status pipe the stand-in set up for this process; when it is not
    // open the write fails with EBADF and the exit code still tells.
    let pipe = unsafe { std::os::fd::BorrowedFd::borrow_raw(STATUS_FD) };
    if let Ok(json) = serde_json::to_vec(failure) {
        let _ = nix::unistd::write(pipe, &json);
    }
    eprintln!("{}: {}", failure.reason, failure.message);
}

fn sandbox(spec: &SandboxSpec) -> Failure {
    match build_sandbox(spec) {
        Ok(()) => exec(&spec.process, spec.parent),
        Err(f) => f,
    }
}

fn mnt(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), Failure> {
    mount(source, target, fstype, flags, data)
        .map_err(|e| create_error(format!("mount {}", target.display()), e))
}

fn mkdir(path: &Path, mode: u32) -> Result<(), Failure> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .and_then(|()| std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)))
        .map_err(|e| create_error(format!("mkdir {}", path.display()), e))
}

fn build_sandbox(spec: &SandboxSpec) -> Result<(), Failure> {
    umask(Mode::from_bits_truncate(0o022));
    if let Some(netns) = &spec.netns {
        let ns = File::open(netns).map_err(|e| create_error(netns.display(), e))?;
        setns(&ns, CloneFlags::CLONE_NEWNET).map_err(|e| create_error("setns net", e))?;
    }
    let mut flags = CloneFlags::CLONE_NEWNS;
    if spec.hostname.is_some() {
        flags |= CloneFlags::CLONE_NEWUTS;
    }
    unshare(flags).map_err(|e| create_error("unshare", e))?;
    // Nothing mounted from here on may reach the host's mount table.
    mnt(
        None,
        Path::new("/"),
        None,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None,
    )?;
    if let Some(name) = &spec.hostname {
        sethostname(name).map_err(|e| create_error("sethostname", e))?;
    }

    let fs = &spec.fs_dir;
    mnt(
        Some(Path::new("tmpfs")),
        fs,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )?;
    let (root, upper, work) = (fs.join("root"), fs.join("upper"), fs.join("work"));
    for d in [&root, &upper, &work] {
        mkdir(d, 0o755)?;
    }
    // The root is a mount of its own so that it can be made read-only at the end.
    mnt(Some(&root), &root, None, MsFlags::MS_BIND, None)?;

    let mut overlays = Vec::new();
    for d in HOST_DIRS {
        let host = Path::new("/").join(d);
        let Ok(meta) = std::fs::symlink_metadata(&host) else {
            continue;
        };
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&host).map_err(|e| create_error(host.display(), e))?;
            symlink(&target, root.join(d)).map_err(|e| create_error(host.display(), e))?;
        } else if meta.is_dir() {
            let (u, w, r) = (upper.join(d), work.join(d), root.join(d));
            for x in [&u, &w, &r] {
                mkdir(x, 0o755)?;
            }
            let options = format!(
                "lowerdir={},upperdir={},workdir={}",
                host.display(),
                u.display(),
                w.display()
            );
            mnt(
                Some(Path::new("overlay")),
                &r,
                Some("overlay"),
                MsFlags::empty(),
                Some(&options),
            )?;
            overlays.push(format!("/{d}"));
        }
    }

    let proc_ = root.join("proc");
    mkdir(&proc_, 0o555)?;
    mnt(
        Some(Path::new("proc")),
        &proc_,
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None,
    )?;
    let dev = root.join("dev");
    mkdir(&dev, 0o755)?;
    mnt(
        Some(Path::new("/dev")),
        &dev,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    )?;
    let sys = root.join("sys");
    mkdir(&sys, 0o555)?;
    mnt(
        Some(Path::new("/sys")),
        &sys,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    )?;
    mnt(
        None,
        &sys,
        None,
        MsFlags::MS_BIND
            | MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV
            | MsFlags::MS_NOEXEC,
        None,
    )?;
    mkdir(&root.join("tmp"), 0o1777)?;
    mkdir(&root.join("var/tmp"), 0o1777)?;
    mkdir(&root.join("root"), 0o700)?;
    mkdir(&root.join("run"), 0o755)?;
    if let (Some(hosts), true) = (&spec.hosts, overlays.iter().any(|o| o == "/etc")) {
        std::fs::write(root.join("etc/hosts"), hosts).map_err(|e| create_error("/etc/hosts", e))?;
        if let Some(name) = &spec.hostname {
            std::fs::write(root.join("etc/hostname"), format!("{name}\n"))
                .map_err(|e| create_error("/etc/hostname", e))?;
        }
    }

    // Mount sources are host paths: open them before the chroot and mount them through
    // /proc/self/fd, so every target path resolves inside the container root (an absolute
    // symlink in there can never lead a mkdir onto the host).
    let mut binds: Vec<&Bind> = spec.binds.iter().collect();
    binds.sort_by_key(|b| Path::new(&b.target).components().count());
    let mut sources = Vec::new();
    for b in &binds {
        let fd = open(&b.source, OFlag::O_PATH | OFlag::O_CLOEXEC, Mode::empty())
            .map_err(|e| create_error(b.source.display(), e))?;
        let is_dir = std::fs::metadata(&b.source)
            .map_err(|e| create_error(b.source.display(), e))?
            .is_dir();
        sources.push((fd, is_dir));
    }
    chroot(&root).map_err(|e| create_error("chroot", e))?;
    chdir("/").map_err(|e| create_error("chdir /", e))?;
    for (b, (fd, is_dir)) in binds.iter().zip(&sources) {
        let target = inside(&b.target)?;
        if *is_dir {
            mkdir_plain(&target)?;
        } else {
            if let Some(parent) = target.parent() {
                mkdir_plain(parent)?;
            }
            if !target.exists() {
                File::create(&target).map_err(|e| create_error(target.display(), e))?;
            }
        }
        let source = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
        mnt(
            Some(&source),
            &target,
            None,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None,
        )?;
        if b.read_only {
            mnt(
                None,
                &target,
                None,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                None,
            )?;
        }
    }
    drop(sources);

    if let Some(wd) = &spec.process.working_dir {
        mkdir_plain(&inside(wd)?)?;
    }
    if spec.read_only_root {
        let ro = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
        mnt(None, Path::new("/"), None, ro, None)?;
        for o in &overlays {
            mnt(None, Path::new(o), None, ro, None)?;
        }
    }
    Ok(())
}

/// An absolute container path without `..`.
fn inside(path: &str) -> Result<PathBuf, Failure> {
    let p = Path::new(path);
    if !p.is_absolute() || p.components().any(|c| c == Component::ParentDir) {
        return Err(create_error(path, "must be an absolute path without '..'"));
    }
    Ok(p.to_path_buf())
}

fn mkdir_plain(path: &Path) -> Result<(), Failure> {
    std::fs::create_dir_all(path).map_err(|e| create_error(format!("mkdir {}", path.display()), e))
}

fn enter(pid: i32, spec: &EnterSpec) -> Failure {
    let open_ns = |what: &str| {
        let path = format!("/proc/{pid}/{what}");
        File::open(&path).map_err(|e| create_error(path, e))
    };
    let entered = (|| {
        let net = open_ns("ns/net")?;
        let uts = open_ns("ns/uts")?;
        let mnt_ns = open_ns("ns/mnt")?;
        let root = open_ns("root")?;
        setns(&net, CloneFlags::CLONE_NEWNET).map_err(|e| create_error("setns net", e))?;
        setns(&uts, CloneFlags::CLONE_NEWUTS).map_err(|e| create_error("setns uts", e))?;
        setns(&mnt_ns, CloneFlags::CLONE_NEWNS).map_err(|e| create_error("setns mnt", e))?;
        fchdir(&root).map_err(|e| create_error("fchdir", e))?;
        chroot(".").map_err(|e| create_error("chroot", e))?;
        Ok::<(), Failure>(())
    })();
    match entered {
        Ok(()) => exec(&spec.process, spec.parent),
        Err(f) => f,
    }
}

/// Takes the identity and execs; returns only on failure.
fn exec(process: &Process, parent: i32) -> Failure {
    let wd = process.working_dir.as_deref().unwrap_or("/");
    if let Err(e) = chdir(wd) {
        return create_error(format!("chdir to cwd (\"{wd}\")"), e);
    }
    let id = &process.identity;
    let groups: Vec<Gid> = id.groups.iter().map(|g| Gid::from_raw(*g)).collect();
    let identity = setgroups(&groups)
        .and_then(|()| {
            let g = Gid::from_raw(id.gid);
            setresgid(g, g, g)
        })
        .and_then(|()| {
            let u = Uid::from_raw(id.uid);
            setresuid(u, u, u)
        })
        .and_then(|()| {
            if id.no_new_privs {
                nix::sys::prctl::set_no_new_privs()
            } else {
                Ok(())
            }
        })
        // A change of credentials clears the parent-death signal: set it again.
        .and_then(|()| nix::sys::prctl::set_pdeathsig(Signal::SIGKILL));
    if let Err(e) = identity {
        return create_error("setting the user", e);
    }
    if getppid().as_raw() != parent {
        std::process::exit(137);
    }
    let Some(program) = process.argv.first() else {
        return run_error("no command specified".into());
    };
    let path_env = process
        .env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str())
        .unwrap_or(DEFAULT_PATH);
    let path = match find_executable(program, path_env) {
        Ok(p) => p,
        Err(message) => return run_error(message),
    };
    let cstr = |s: &str| CString::new(s).map_err(|_| run_error(format!("{s:?} contains NUL")));
    let built = (|| {
        let path = cstr(&path.to_string_lossy())?;
        let argv = process
            .argv
            .iter()
            .map(|a| cstr(a))
            .collect::<Result<Vec<_>, _>>()?;
        let env = process
            .env
            .iter()
            .map(|(k, v)| cstr(&format!("{k}={v}")))
            .collect::<Result<Vec<_>, _>>()?;
        Ok::<_, Failure>((path, argv, env))
    })();
    let (path_c, argv, env) = match built {
        Ok(b) => b,
        Err(f) => return f,
    };
    // The status pipe closes on a successful exec: that is the stand-in's "started".
    // SAFETY: STATUS_FD is ours (set up by the stand-in); borrowing it for fcntl is sound.
    let status = unsafe { std::os::fd::BorrowedFd::borrow_raw(STATUS_FD) };
    let _ = fcntl(status, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
    match execve(&path_c, &argv, &env) {
        Ok(never) => match never {},
        Err(e) => run_error(format!("exec: \"{program}\": {}", e.desc().to_lowercase())),
    }
}

/// The executable `program` names: a path as given, or the first match in `PATH`.
/// Errors read as the container runtime's.
pub fn find_executable(program: &str, path_env: &str) -> Result<PathBuf, String> {
    if program.contains('/') {
        let p = PathBuf::from(program);
        return match std::fs::metadata(&p) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(format!(
                "exec: \"{program}\": stat {program}: no such file or directory"
            )),
            Err(e) => Err(format!("exec: \"{program}\": {e}")),
            Ok(m) if m.is_dir() => Err(format!("exec: \"{program}\": is a directory")),
            Ok(_) if access(&p, AccessFlags::X_OK).is_err() => {
                Err(format!("exec: \"{program}\": permission denied"))
            }
            Ok(_) => Ok(p),
        };
    }
    for dir in path_env.split(':') {
        let dir = if dir.is_empty() { "." } else { dir };
        let candidate = Path::new(dir).join(program);
        if std::fs::metadata(&candidate).is_ok_and(|m| m.is_file())
            && access(&candidate, AccessFlags::X_OK).is_ok()
        {
            return Ok(candidate);
        }
    }
    Err(format!(
        "exec: \"{program}\": executable file not found in $PATH"
    ))
}

/// For the stand-in's `pre_exec`: puts `fd` at [`STATUS_FD`] without close-on-exec, so
/// the helper inherits it.
///
/// # Safety
/// Only async-signal-safe calls: meant for the child between fork and exec.
pub unsafe fn install_status_fd(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: plain fcntl/dup2 on descriptors of this process.
    unsafe {
        if fd == STATUS_FD {
            if nix::libc::fcntl(fd, nix::libc::F_SETFD, 0) == -1 {
                return Err(std::io::Error::last_os_error());
            }
        } else if nix::libc::dup2(fd, STATUS_FD) == -1 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A pipe whose write end goes to the helper as [`STATUS_FD`].
pub fn status_pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(std::io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn executables_are_found_in_path_with_runtime_like_errors() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("tool");
        std::fs::write(&exe, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let plain = dir.path().join("data");
        std::fs::write(&plain, "x").unwrap();
        let path = format!("/nonexistent:{}", dir.path().display());
        assert_eq!(find_executable("tool", &path).unwrap(), exe);
        assert_eq!(
            find_executable("nope", &path).unwrap_err(),
            "exec: \"nope\": executable file not found in $PATH"
        );
        assert_eq!(
            find_executable("data", &path).unwrap_err(),
            "exec: \"data\": executable file not found in $PATH",
            "not executable"
        );
        assert_eq!(find_executable(exe.to_str().unwrap(), "").unwrap(), exe);
        assert_eq!(
            find_executable("/no/such", "").unwrap_err(),
            "exec: \"/no/such\": stat /no/such: no such file or directory"
        );
    }

    #[test]
    fn specs_round_trip_as_json() {
        let spec = SandboxSpec {
            netns: Some("/run/netns/x".into()),
            fs_dir: "/tmp/fs".into(),
            hostname: Some("pod".into()),
            hosts: None,
            binds: vec![Bind {
                source: "/tmp/v".into(),
                target: "/data".into(),
                read_only: true,
            }],
            read_only_root: true,
            process: Process {
                argv: vec!["sh".into()],
                env: vec![("A".into(), "1".into())],
                working_dir: None,
                identity: Identity {
                    uid: 65532,
                    gid: 65532,
                    groups: vec![],
                    no_new_privs: true,
                },
            },
            parent: 1,
        };
        let json = serde_json::to_string(&spec).unwrap();
        assert_eq!(serde_json::from_str::<SandboxSpec>(&json).unwrap(), spec);
    }

    #[test]
    fn container_paths_must_be_absolute_and_plain() {
        assert!(inside("/etc/zeroscale").is_ok());
        assert!(inside("relative").is_err());
        assert!(inside("/a/../b").is_err());
    }
}
