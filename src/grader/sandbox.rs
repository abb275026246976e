//! The sandboxed subprocess runner used by `program` for model-written code.
//!
//! What every run gets: its own temp directory as cwd (HOME and TMPDIR point there too), a
//! cleared environment (only `PATH`, `HOME`, `TMPDIR`, `LANG`, `PYTHONDONTWRITEBYTECODE`,
//! `PYTHONHASHSEED`), stdin from a file or `/dev/null`, a new session/process group
//! (`setsid`), rlimits — `RLIMIT_CPU` (CPU seconds), `RLIMIT_AS` (address space),
//! `RLIMIT_FSIZE` (largest file it can write), `RLIMIT_NPROC` (processes/threads),
//! `RLIMIT_CORE` = 0 — a wall-clock limit after which the whole process group is SIGKILLed, and
//! an output cap (stdout+stderr read at most `max_output` bytes, then the group is killed).
//!
//! When rft runs as root (containers) it does more: each run executes as its own unprivileged
//! uid (`UID_BASE + k`, no supplementary groups), so the code cannot write root-owned files or
//! read private ones (`/root`, `/etc/shadow`, 0600 files); `RLIMIT_NPROC` is then exact per run
//! (root ignores it); at the end every process of that uid is SIGKILLed, which also catches
//! children that escaped the process group with `setsid`; it gets a fresh network namespace
//! (no network at all); and a private mount namespace in which every mount is remounted
//! read-only and nosuid except the run's own directory (writes elsewhere fail with EROFS).
//! Each namespace is probed once and skipped when the kernel refuses it (e.g. a container
//! without CAP_SYS_ADMIN); `details.sandbox` of a `program` result says what was in force.
//!
//! What it does NOT isolate: the file system is the host's — world-readable files
//! (`/etc/passwd`, the Python stdlib, other 0755 temp dirs, …) can be read; without the
//! read-only mount namespace, world-writable directories (`/tmp`, `/dev/shm`) can be written
//! (capped by `RLIMIT_FSIZE`; as root, entries the run's uid left at the top of `/tmp`,
//! `/var/tmp`, `/dev/shm` are removed afterwards); `/proc` shows the host's processes; there
//! is no seccomp filter and no cgroup (memory is capped per process by `RLIMIT_AS`, not per
//! tree; CPU by `RLIMIT_CPU` per process). As a non-root user the code runs as that user: it
//! can read and write whatever the user can; the run tries an unprivileged user+network
//! namespace (no network) and silently goes without when the kernel refuses; `RLIMIT_NPROC`
//! counts all the user's processes, so it is set to the user's current thread count +
//! `max_procs`; a child that calls `setsid` itself escapes the group kill (its pipes are
//! abandoned after a short grace period, it is not waited for).
//! For hostile code at scale, run rft itself inside a container or VM.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// First uid used for sandboxed runs when rft is root; runs cycle through `UID_SLOTS` uids.
pub const UID_BASE: u32 = 1_870_000_000;
pub const UID_SLOTS: u32 = 4096;

#[derive(Debug, Clone)]
pub struct Limits {
    pub wall: Duration,
    pub cpu_s: u64,
    pub memory_bytes: u64,
    pub max_output: usize,
    pub max_procs: u64,
    pub max_file_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            wall: Duration::from_secs(5),
            cpu_s: 5,
            memory_bytes: 1 << 30,
            max_output: 1 << 20,
            max_procs: 32,
            max_file_bytes: 16 << 20,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Exit code, when the process exited normally.
    pub code: Option<i32>,
    /// Terminating signal, when killed.
    pub signal: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub timed_out: bool,
    pub truncated: bool,
    pub elapsed: Duration,
}

impl Outcome {
    pub fn success(&self) -> bool {
        self.code == Some(0) && !self.timed_out && !self.truncated
    }
    /// A one-line reason for a failed run.
    pub fn describe(&self) -> String {
        if self.timed_out {
            format!("timed out after {:.1}s", self.elapsed.as_secs_f32())
        } else if self.truncated {
            "output limit exceeded".into()
        } else if let Some(sig) = self.signal {
            let what = match sig {
                libc::SIGXCPU => " (CPU time limit)",
                libc::SIGXFSZ => " (file size limit)",
                libc::SIGKILL => " (killed)",
                libc::SIGSEGV => " (segfault, possibly the memory limit)",
                _ => "",
            };
            format!("killed by signal {sig}{what}")
        } else {
            let err = String::from_utf8_lossy(&self.stderr);
            let last = err.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
            format!(
                "exit code {:?}: {}",
                self.code,
                last.chars().take(200).collect::<String>()
            )
        }
    }
}

/// How runs are isolated (decided once per process from the euid).
#[derive(Debug, Clone)]
pub struct Sandbox {
    pub limits: Limits,
    /// Run as a per-run uid (only possible as root).
    pub drop_uid: bool,
    /// New network namespace (root: when the kernel allows it; non-root: best effort).
    pub isolate_net: bool,
    /// Private mount namespace in which every mount is read-only (and nosuid) except the
    /// run's directory (root only, when the kernel allows it).
    pub readonly_fs: bool,
}

/// What the kernel lets this process do, probed once from forked children.
struct Caps {
    netns: bool,
    mountns: bool,
}

fn caps() -> &'static Caps {
    static CAPS: OnceLock<Caps> = OnceLock::new();
    CAPS.get_or_init(|| {
        if !is_root() {
            return Caps {
                netns: false,
                mountns: false,
            };
        }
        // SAFETY (both closures): run in a forked child, only system calls.
        let netns = probe(|| unsafe { libc::unshare(libc::CLONE_NEWNET) == 0 });
        let mountns = probe(|| unsafe {
            let root = c"/".as_ptr();
            let null = std::ptr::null();
            libc::unshare(libc::CLONE_NEWNS) == 0
                && libc::mount(
                    null,
                    root,
                    null,
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) == 0
                && libc::mount(
                    null,
                    root,
                    null,
                    libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY,
                    std::ptr::null(),
                ) == 0
        });
        Caps { netns, mountns }
    })
}

/// Runs `f` in a forked child and reports whether it returned true.
fn probe(f: fn() -> bool) -> bool {
    // SAFETY: the child only runs `f` (system calls) and `_exit`.
    unsafe {
        let pid = libc::fork();
        if pid == 0 {
            libc::_exit(if f() { 0 } else { 1 });
        }
        if pid < 0 {
            return false;
        }
        let mut st = 0;
        libc::waitpid(pid, &mut st, 0) == pid && libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0
    }
}

/// Mount points of this process (from /proc/self/mountinfo), for the read-only remount.
fn mount_points() -> Vec<CString> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut v: Vec<CString> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| !m.contains('\\'))
        .filter_map(|m| CString::new(m).ok())
        .collect();
    v.dedup();
    v
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

static NEXT_UID: AtomicU32 = AtomicU32::new(0);

impl Sandbox {
    pub fn new(limits: Limits) -> Self {
        let root = is_root();
        Sandbox {
            limits,
            drop_uid: root,
            isolate_net: !root || caps().netns,
            readonly_fs: root && caps().mountns,
        }
    }

    /// A one-line description for `details`.
    pub fn describe(&self) -> String {
        format!(
            "{}{}{}rlimits+setsid+killpg",
            if self.drop_uid { "per-run uid, " } else { "" },
            if self.isolate_net { "netns, " } else { "" },
            if self.ro_fs() { "read-only fs, " } else { "" }
        )
    }

    fn ro_fs(&self) -> bool {
        self.readonly_fs && self.drop_uid && caps().mountns
    }

    /// Runs `argv` in `dir` (which the caller created and owns). `stdin`: a file to feed, or
    /// `None` for `/dev/null`.
    pub fn run(&self, argv: &[String], dir: &Path, stdin: Option<&Path>) -> io::Result<Outcome> {
        let lim = self.limits.clone();
        let uid = if self.drop_uid {
            let uid = UID_BASE + NEXT_UID.fetch_add(1, Ordering::Relaxed) % UID_SLOTS;
            // The run owns its directory; the files we wrote stay root-owned and readable.
            chown(dir, uid)?;
            Some(uid)
        } else {
            None
        };
        let nproc = match uid {
            Some(_) => lim.max_procs,
            None => user_threads().saturating_add(lim.max_procs),
        };
        let net = self.isolate_net && (uid.is_none() || caps().netns);
        let ro = self.ro_fs() && uid.is_some();
        let (ro_dir, ro_mounts) = if ro {
            let d = CString::new(dir.as_os_str().as_bytes()).map_err(io::Error::other)?;
            (d, mount_points())
        } else {
            (CString::default(), Vec::new())
        };
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .current_dir(dir)
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("HOME", dir)
            .env("TMPDIR", dir)
            .env("LANG", "C.UTF-8")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("PYTHONHASHSEED", "0")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        match stdin {
            Some(p) => cmd.stdin(std::fs::File::open(p)?),
            None => cmd.stdin(Stdio::null()),
        };
        let (cpu, mem, fsize) = (lim.cpu_s.max(1), lim.memory_bytes, lim.max_file_bytes);
        // SAFETY: the closure runs between fork and exec and only makes async-signal-safe
        // system calls (setsid, unshare, setrlimit, setgroups, setgid, setuid).
        unsafe {
            cmd.pre_exec(move || {
                if libc::setsid() < 0 {
                    return Err(io::Error::last_os_error());
                }
                if net {
                    if uid.is_some() {
                        if libc::unshare(libc::CLONE_NEWNET) != 0 {
                            return Err(io::Error::last_os_error());
                        }
                    } else {
                        // Best effort for unprivileged users.
                        let _ = libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET);
                    }
                }
                if ro {
                    // Everything read-only except the run's directory (bound onto itself first
                    // so it is a mount of its own and keeps its write access).
                    let null = std::ptr::null();
                    if libc::unshare(libc::CLONE_NEWNS) != 0
                        || libc::mount(
                            null,
                            c"/".as_ptr(),
                            null,
                            libc::MS_REC | libc::MS_PRIVATE,
                            std::ptr::null(),
                        ) != 0
                        || libc::mount(
                            ro_dir.as_ptr(),
                            ro_dir.as_ptr(),
                            null,
                            libc::MS_BIND,
                            std::ptr::null(),
                        ) != 0
                    {
                        return Err(io::Error::last_os_error());
                    }
                    for m in &ro_mounts {
                        let flags = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_NOSUID;
                        let _ = libc::mount(null, m.as_ptr(), null, flags, std::ptr::null());
                    }
                    // std changed into `dir` before this hook ran: re-enter it through the new
                    // (writable) mount.
                    if libc::chdir(ro_dir.as_ptr()) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                let set = |res, soft: u64, hard: u64| {
                    let r = libc::rlimit {
                        rlim_cur: soft as libc::rlim_t,
                        rlim_max: hard as libc::rlim_t,
                    };
                    if libc::setrlimit(res, &r) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                };
                set(libc::RLIMIT_CPU, cpu, cpu + 1)?;
                set(libc::RLIMIT_AS, mem, mem)?;
                set(libc::RLIMIT_FSIZE, fsize, fsize)?;
                set(libc::RLIMIT_CORE, 0, 0)?;
                set(libc::RLIMIT_NPROC, nproc, nproc)?;
                if let Some(u) = uid {
                    if libc::setgroups(0, std::ptr::null()) != 0
                        || libc::setgid(u as libc::gid_t) != 0
                        || libc::setuid(u as libc::uid_t) != 0
                    {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let start = Instant::now();
        let mut child = cmd.spawn()?;
        let pgid = child.id() as libc::pid_t;
        let kill_all = || {
            // SAFETY: killpg on the group we created; an already-dead group gives ESRCH.
            unsafe { libc::killpg(pgid, libc::SIGKILL) };
            if let Some(u) = uid {
                kill_uid(u);
            }
        };
        let mut out = Outcome::default();
        let mut pipes: [Option<File>; 2] = [
            child.stdout.take().map(|p| File::from(OwnedFd::from(p))),
            child.stderr.take().map(|p| File::from(OwnedFd::from(p))),
        ];
        let mut status = None;
        let mut reap_deadline: Option<Instant> = None;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let now = Instant::now();
            if status.is_none() {
                status = child.try_wait()?;
                if status.is_some() {
                    // The main process is gone: kill what it left behind, then drain briefly.
                    kill_all();
                    reap_deadline = Some(now + Duration::from_millis(200));
                }
            }
            let open: Vec<usize> = (0..2).filter(|&i| pipes[i].is_some()).collect();
            if open.is_empty() && status.is_some() {
                break;
            }
            if reap_deadline.is_some_and(|d| now >= d) {
                break; // an escaped process holds the pipe: abandon it
            }
            if status.is_none() && now.duration_since(start) >= lim.wall {
                out.timed_out = true;
                kill_all();
                status = Some(child.wait()?);
                reap_deadline = Some(Instant::now() + Duration::from_millis(200));
                continue;
            }
            if open.is_empty() {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            let mut fds: Vec<libc::pollfd> = open
                .iter()
                .map(|&i| libc::pollfd {
                    fd: pipes[i].as_ref().map_or(-1, |p| p.as_raw_fd()),
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect();
            // SAFETY: fds points to fds.len() valid pollfd structs.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 20) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            for (k, &i) in open.iter().enumerate() {
                if fds[k].revents == 0 {
                    continue;
                }
                let r = match pipes[i].as_mut() {
                    Some(p) => p.read(&mut buf),
                    None => Ok(0),
                };
                match r {
                    Ok(0) | Err(_) => pipes[i] = None,
                    Ok(m) => {
                        let room = lim.max_output.saturating_sub(out.stdout.len() + out.stderr.len());
                        let dst = if i == 0 { &mut out.stdout } else { &mut out.stderr };
                        dst.extend_from_slice(&buf[..m.min(room)]);
                        if m > room && !out.truncated {
                            out.truncated = true;
                            kill_all();
                        }
                    }
                }
            }
        }
        if status.is_none() {
            status = Some(child.wait()?);
        }
        kill_all();
        if let Some(u) = uid {
            remove_owned(u);
        }
        let st = status.expect("status set above");
        out.code = st.code();
        out.signal = st.signal();
        out.elapsed = start.elapsed();
        Ok(out)
    }
}

/// Gives the run's directory to its uid, private (0700) so concurrent runs cannot peek.
fn chown(p: &Path, uid: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::os::unix::fs::chown(p, Some(uid), Some(uid))?;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o700))
}

/// Removes what a per-run uid left at the top of the world-writable temp directories.
fn remove_owned(uid: u32) {
    use std::os::unix::fs::MetadataExt;
    for d in ["/tmp", "/var/tmp", "/dev/shm"] {
        let Ok(rd) = std::fs::read_dir(d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(m) = e.path().symlink_metadata() else {
                continue;
            };
            if m.uid() == uid {
                let _ = if m.is_dir() {
                    std::fs::remove_dir_all(e.path())
                } else {
                    std::fs::remove_file(e.path())
                };
            }
        }
    }
}

/// SIGKILLs every process owned by `uid` (from a forked helper that becomes that uid).
fn kill_uid(uid: u32) {
    // SAFETY: the child only makes async-signal-safe calls and exits with _exit.
    unsafe {
        let pid = libc::fork();
        if pid == 0 {
            if libc::setgid(uid) == 0 && libc::setuid(uid) == 0 {
                libc::kill(-1, libc::SIGKILL);
                libc::kill(-1, libc::SIGKILL);
            }
            libc::_exit(0);
        } else if pid > 0 {
            let mut st = 0;
            libc::waitpid(pid, &mut st, 0);
        }
    }
}

/// Threads currently owned by this real uid (for a non-root `RLIMIT_NPROC`).
fn user_threads() -> u64 {
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() }.to_string();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return 4096;
    };
    let mut n = 0u64;
    for e in rd.flatten() {
        if !e
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
        {
            continue;
        }
        let Ok(st) = std::fs::read_to_string(e.path().join("status")) else {
            continue;
        };
        let mut mine = false;
        for line in st.lines() {
            if let Some(rest) = line.strip_prefix("Uid:") {
                mine = rest.split_whitespace().next() == Some(uid.as_str());
            } else if let Some(rest) = line.strip_prefix("Threads:") {
                if mine {
                    n += rest.trim().parse::<u64>().unwrap_or(1);
                }
            }
        }
    }
    n
}

/// Resolves a program name to an absolute path. For a per-run uid the binary (and every
/// directory above it) must be usable by others, so e.g. a pyenv shim under `/root` is
/// skipped in favour of `/usr/bin/python3`.
pub fn resolve_program(name: &str, need_world: bool) -> Option<PathBuf> {
    let ok = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        let Ok(m) = std::fs::metadata(p) else {
            return false;
        };
        if !m.is_file() || m.permissions().mode() & 0o111 == 0 {
            return false;
        }
        if !need_world {
            return true;
        }
        if m.permissions().mode() & 0o001 == 0 {
            return false;
        }
        let Ok(real) = std::fs::canonicalize(p) else {
            return false;
        };
        real.ancestors().skip(1).all(|d| {
            std::fs::metadata(d)
                .map(|m| m.permissions().mode() & 0o001 != 0)
                .unwrap_or(false)
        }) && std::fs::metadata(&real)
            .map(|m| m.permissions().mode() & 0o005 == 0o005)
            .unwrap_or(false)
    };
    if name.contains('/') {
        let p = PathBuf::from(name);
        return ok(&p).then_some(p);
    }
    let path = std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into());
    let found = path
        .split(':')
        .chain(["/usr/local/bin", "/usr/bin", "/bin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| ok(p));
    found
}
