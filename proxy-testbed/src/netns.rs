//! Named network namespaces: create and delete them, and run code, commands and sockets inside.
//!
//! A namespace is entered with `setns(CLONE_NEWNET)` only, on a thread or in a child before `exec`.
//! The mount namespace is never touched: `ip netns exec` would remount `/sys` for the namespace,
//! which hides the bpffs mounted at `/sys/fs/bpf` and with it every pinned map and program.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::net::{SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nix::sched::{CloneFlags, setns};

/// Where `ip netns add` bind-mounts the namespaces it creates.
pub(crate) const NETNS_RUN_DIR: &str = "/run/netns";

/// `ip netns add` turns `/run/netns` into a shared mount on its first use; two of them racing
/// through that step can stack two mounts there. Creating one namespace at a time in this process
/// (parallel tests share it) keeps that from happening.
static NETNS_ADD: Mutex<()> = Mutex::new(());

/// A handle on a named network namespace (`/run/netns/<name>`).
///
/// Cloning is cheap (an `Arc`). The handle holds the namespace open but does not own it: the
/// [`Testbed`](crate::Testbed) that created it deletes it on drop. A handle kept past that point still
/// enters the (now unnamed) namespace until the last clone is dropped.
#[derive(Clone)]
pub struct Netns {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    /// Opened once, so entering never depends on the name still existing.
    fd: Arc<OwnedFd>,
}

impl std::fmt::Debug for Netns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Netns").field(&self.inner.name).finish()
    }
}

impl Netns {
    /// Creates the namespace with `ip netns add`, so that `ip netns list`, `ip -n` and other tools
    /// see it by name.
    pub(crate) fn create(name: &str) -> Result<Netns> {
        {
            let _one_at_a_time = NETNS_ADD.lock().unwrap_or_else(PoisonError::into_inner);
            run(Command::new("ip").args(["netns", "add", name]))
                .with_context(|| format!("creating network namespace {name}"))?;
        }
        let path = format!("{NETNS_RUN_DIR}/{name}");
        let file = File::open(&path).with_context(|| format!("opening {path}"))?;
        Ok(Netns {
            inner: Arc::new(Inner {
                name: name.to_owned(),
                fd: Arc::new(file.into()),
            }),
        })
    }

    /// Removes the name (`ip netns del`); the kernel frees the namespace once nothing holds it.
    pub(crate) fn delete(&self) -> Result<()> {
        run(Command::new("ip").args(["netns", "del", self.name()]))
            .with_context(|| format!("deleting network namespace {}", self.name()))
            .map(drop)
    }

    /// The name under `/run/netns`, as `ip netns list` shows it.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Runs `f` on a new thread that has entered this namespace, and returns what it returns.
    ///
    /// Sockets created in `f` belong to this namespace for their whole life, also after they are
    /// returned to the calling thread. A panic in `f` is resumed on the calling thread with its
    /// original payload. Note that `/proc/net` follows the main thread's namespace, not this
    /// thread's: read `/proc/thread-self/net` inside `f` instead.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|scope| {
            let thread = std::thread::Builder::new()
                .name("netns-run".into())
                .spawn_scoped(scope, || {
                    // The fd is held open by this handle, so this only fails without CAP_SYS_ADMIN,
                    // which Testbed::new has already checked.
                    setns(&*self.inner.fd, CloneFlags::CLONE_NEWNET).unwrap_or_else(|err| {
                        panic!("setns into network namespace {}: {err}", self.name())
                    });
                    f()
                })
                .expect("spawning a thread for Netns::run");
            thread
                .join()
                .unwrap_or_else(|payload| std::panic::resume_unwind(payload))
        })
    }

    /// A `Command` whose child enters this namespace before `exec` (network namespace only; see the
    /// module docs for why not `ip netns exec`).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut command = Command::new(program);
        self.enter_before_exec(&mut command);
        command
    }

    /// Makes the child of `command` enter this namespace between `fork` and `exec`.
    pub(crate) fn enter_before_exec(&self, command: &mut Command) {
        let fd = Arc::clone(&self.inner.fd);
        // SAFETY: the closure runs between fork and exec, where only async-signal-safe calls are
        // allowed; it makes one system call and allocates nothing.
        unsafe {
            command
                .pre_exec(move || setns(&*fd, CloneFlags::CLONE_NEWNET).map_err(io::Error::from));
        }
    }

    /// Runs `ip <args>` inside this namespace and returns its stdout; the error names the command
    /// and carries its stderr.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        run(self.command("ip").args(args))
            .with_context(|| format!("in network namespace {}", self.name()))
    }

    /// Reads a sysctl of this namespace; `path` is relative to `/proc/sys` and written with `/`
    /// (`net/ipv4/conf/eth0/rp_filter`), so interface names with dots stay unambiguous.
    pub fn sysctl(&self, path: &str) -> Result<String> {
        // /proc/sys/net resolves against the namespace of the thread that opens it.
        self.run(|| std::fs::read_to_string(format!("/proc/sys/{path}")))
            .map(|value| value.trim().to_owned())
            .with_context(|| format!("reading sysctl {path} in {}", self.name()))
    }

    /// Writes a sysctl of this namespace (see [`Netns::sysctl`] for `path`).
    pub fn set_sysctl(&self, path: &str, value: &str) -> Result<()> {
        self.run(|| std::fs::write(format!("/proc/sys/{path}"), value))
            .with_context(|| format!("setting sysctl {path}={value} in {}", self.name()))
    }

    /// Connects a TCP socket from this namespace. The stream keeps living in this namespace, so a
    /// test can hold long-lived connections from a pod.
    pub fn tcp_connect(&self, to: SocketAddrV4, timeout: Duration) -> io::Result<TcpStream> {
        self.run(|| TcpStream::connect_timeout(&to.into(), timeout))
    }

    /// Binds a TCP listener in this namespace.
    pub fn tcp_listen(&self, addr: SocketAddrV4) -> io::Result<TcpListener> {
        self.run(|| TcpListener::bind(addr))
    }

    /// Binds a UDP socket in this namespace.
    pub fn udp_bind(&self, addr: SocketAddrV4) -> io::Result<UdpSocket> {
        self.run(|| UdpSocket::bind(addr))
    }
}

/// Runs a short-lived command to completion; stdout on success, an error with stderr otherwise.
fn run(command: &mut Command) -> Result<String> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("starting {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Fails with a message naming the missing privilege unless this process may create and enter
/// network namespaces and configure them.
pub(crate) fn check_privileges() -> Result<()> {
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_SYS_ADMIN: u32 = 21;
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let effective = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .context("no CapEff line in /proc/self/status")?;
    let missing: Vec<&str> = [
        (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
        (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
    ]
    .into_iter()
    .filter(|(bit, _)| effective & (1 << bit) == 0)
    .map(|(_, name)| name)
    .collect();
    if !missing.is_empty() {
        bail!(
            "the testbed needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN) to create network namespaces; \
             this process lacks {}: run the tests as root",
            missing.join(", ")
        );
    }
    Ok(())
}
