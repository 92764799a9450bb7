//! Child processes owned by a testbed: started inside a node's namespace, logged to a file in the
//! node's state directory, and killed and reaped when the testbed drops.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::prctl::set_pdeathsig;
use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, getppid};

use crate::netns::Netns;

/// How often waits look at a child or its log: waiting never holds a lock across a sleep, so that a
/// thread waiting for a process cannot block the testbed's drop from killing it.
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// How long the drop waits for a SIGKILLed child to be reaped before it gives up on it.
const REAP_TIMEOUT: Duration = Duration::from_secs(5);

/// Lines of each child's log printed when a testbed drops during a panic.
const LOG_TAIL_LINES: usize = 40;

/// A child process owned by a [`Testbed`](crate::Testbed), running in a node's namespace.
///
/// stdout and stderr go, interleaved, to one file ([`Process::log_path`]). The testbed SIGKILLs and
/// reaps the child when it drops, and prints the tail of its log if it drops during a panic (the
/// log file itself goes with the state directory). The child also gets SIGKILL if the test process
/// dies without running `Drop` (parent-death signal).
#[derive(Clone)]
pub struct Process {
    inner: Arc<Inner>,
}

struct Inner {
    child: Mutex<Child>,
    pid: u32,
    /// "<program> on <node>", for messages.
    label: String,
    log_path: PathBuf,
}

impl std::fmt::Debug for Process {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Process")
            .field("pid", &self.inner.pid)
            .field("label", &self.inner.label)
            .finish_non_exhaustive()
    }
}

impl Process {
    pub fn pid(&self) -> u32 {
        self.inner.pid
    }

    /// The file holding the child's stdout and stderr.
    pub fn log_path(&self) -> &Path {
        &self.inner.log_path
    }

    /// Everything the child has written so far (invalid UTF-8 replaced).
    pub fn log(&self) -> Result<String> {
        let bytes = std::fs::read(self.log_path())
            .with_context(|| format!("reading the log of {}", self.inner.label))?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// Waits until the log contains `needle` (e.g. a "ready" line). Fails early if the child exits
    /// first, and the error carries the log.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            // Read the log before checking for an exit, so that a line written just before exiting
            // still counts.
            let log = self.log()?;
            if log.contains(needle) {
                return Ok(());
            }
            if let Some(status) = self.try_wait()? {
                bail!(
                    "{} exited ({status}) before logging {needle:?}; log:\n{log}",
                    self.inner.label
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not log {needle:?} within {timeout:?}; log:\n{log}\n{}",
                    self.inner.label,
                    where_threads_wait(self.inner.pid)
                );
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// Sends SIGTERM (does nothing if the child has exited).
    pub fn sigterm(&self) -> Result<()> {
        self.signal(Signal::SIGTERM)
    }

    /// Sends SIGKILL (does nothing if the child has exited).
    pub fn sigkill(&self) -> Result<()> {
        self.signal(Signal::SIGKILL)
    }

    /// The exit status if the child has exited (reaping it), `None` while it runs.
    pub fn try_wait(&self) -> Result<Option<ExitStatus>> {
        self.lock()
            .try_wait()
            .with_context(|| format!("waiting for {}", self.inner.label))
    }

    /// Waits up to `timeout` for the child to exit; `None` if it still runs.
    pub fn wait_timeout(&self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// SIGKILL, then waits for the exit status.
    pub fn kill(&self) -> Result<ExitStatus> {
        self.sigkill()?;
        self.wait_timeout(REAP_TIMEOUT)?
            .with_context(|| format!("{} survived SIGKILL for {REAP_TIMEOUT:?}", self.inner.label))
    }

    /// A graceful stop: SIGTERM, up to `grace` to exit, then SIGKILL.
    pub fn stop(&self, grace: Duration) -> Result<ExitStatus> {
        self.sigterm()?;
        match self.wait_timeout(grace)? {
            Some(status) => Ok(status),
            None => self.kill(),
        }
    }

    fn signal(&self, signal: Signal) -> Result<()> {
        let mut child = self.lock();
        // Only a reaped child's pid can be reused by another process, and only the holder of this
        // lock reaps: a child found running here keeps its pid until the lock is released.
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        kill(Pid::from_raw(self.inner.pid as i32), signal)
            .with_context(|| format!("sending {signal} to {}", self.inner.label))
    }

    fn lock(&self) -> MutexGuard<'_, Child> {
        self.inner
            .child
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn log_tail(&self) -> String {
        match self.log() {
            Ok(log) => {
                let lines: Vec<&str> = log.lines().collect();
                lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
            }
            Err(err) => format!("{err:#}"),
        }
    }
}

/// The children of one testbed.
#[derive(Default)]
pub(crate) struct ProcessSet {
    state: Mutex<SetState>,
}

#[derive(Default)]
struct SetState {
    /// Set by the testbed's drop: a node handle that outlived its testbed must not start children
    /// that nobody would kill.
    closed: bool,
    /// Numbers the log files, so two children of one program never share one.
    started: u32,
    processes: Vec<Process>,
}

impl std::fmt::Debug for ProcessSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessSet").finish_non_exhaustive()
    }
}

impl ProcessSet {
    /// Starts `command` in `netns`, logging to a new file in `log_dir`. stdin is /dev/null.
    pub(crate) fn spawn(
        &self,
        netns: &Netns,
        node: &str,
        mut command: Command,
        log_dir: &Path,
    ) -> Result<Process> {
        let program = Path::new(command.get_program())
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        let label = format!("{program} on {node}");
        let mut state = self.lock();
        if state.closed {
            bail!("cannot start {label}: its testbed has been dropped");
        }
        state.started += 1;
        let log_path = log_dir.join(format!("{}-{program}.log", state.started));
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        netns.enter_before_exec(&mut command);
        die_with_this_process(&mut command);
        let child =
            spawn_from_lasting_thread(command).with_context(|| format!("starting {label}"))?;
        let process = Process {
            inner: Arc::new(Inner {
                pid: child.id(),
                child: Mutex::new(child),
                label,
                log_path,
            }),
        };
        state.processes.push(process.clone());
        Ok(process)
    }

    /// SIGKILLs and reaps every child, and refuses new ones. Logs and goes on at every error.
    pub(crate) fn shutdown(&self) {
        let processes = {
            let mut state = self.lock();
            state.closed = true;
            std::mem::take(&mut state.processes)
        };
        // Signal all before waiting for any, so they die in parallel.
        for process in &processes {
            if let Err(err) = process.sigkill() {
                tracing::warn!("{err:#}");
            }
        }
        for process in &processes {
            match process.wait_timeout(REAP_TIMEOUT) {
                Ok(Some(_)) => {}
                Ok(None) => tracing::warn!(
                    "{} (pid {}) survived SIGKILL for {REAP_TIMEOUT:?}",
                    process.inner.label,
                    process.pid()
                ),
                Err(err) => tracing::warn!("{err:#}"),
            }
        }
        // The log files are deleted with the state directory right after this: a failing test is
        // the one time someone needs them.
        if std::thread::panicking() {
            for process in &processes {
                eprintln!(
                    "---- last lines of {} (pid {}, {}) ----\n{}",
                    process.inner.label,
                    process.pid(),
                    process.log_path().display(),
                    process.log_tail()
                );
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, SetState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Arms SIGKILL for the child when its parent dies, so a test binary killed without running `Drop`
/// leaves no agents behind.
fn die_with_this_process(command: &mut Command) {
    let parent = std::process::id();
    // SAFETY: between fork and exec only async-signal-safe calls are allowed; this makes two system
    // calls and allocates nothing (an io::Error from an errno does not allocate).
    unsafe {
        command.pre_exec(move || {
            set_pdeathsig(Signal::SIGKILL).map_err(io::Error::from)?;
            // The parent may have died between fork and prctl, before the signal was armed.
            if getppid().as_raw() as u32 != parent {
                return Err(io::Error::from(nix::errno::Errno::ESRCH));
            }
            Ok(())
        });
    }
}

/// What each thread of `pid` is doing, with its kernel stack: a child that stays silent is usually
/// blocked in the kernel, and this says where.
fn where_threads_wait(pid: u32) -> String {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return format!("(pid {pid} has no /proc entry)");
    };
    let mut report = format!("threads of pid {pid}:");
    for task in tasks.flatten() {
        let dir = task.path();
        let read = |name: &str| {
            std::fs::read_to_string(dir.join(name)).unwrap_or_else(|err| format!("({err})"))
        };
        // The state is the field after the parenthesised command name in `stat`.
        let stat = read("stat");
        let state = stat
            .rsplit(") ")
            .next()
            .and_then(|rest| rest.split(' ').next());
        report += &format!(
            "\n-- {} {} state={} wchan={}\n{}",
            task.file_name().to_string_lossy(),
            read("comm").trim(),
            state.unwrap_or("?"),
            read("wchan"),
            read("stack").trim_end()
        );
    }
    report
}

type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);

/// Spawns `command` from a thread that lives as long as the process.
///
/// The parent-death signal fires when the *thread* that forked the child exits, not the process. Tests
/// call `spawn` from short-lived threads (a test's own thread, tokio's blocking pool), which would
/// kill the child early, so every child is forked by this one thread that never exits.
fn spawn_from_lasting_thread(command: Command) -> io::Result<Child> {
    static SPAWNER: OnceLock<mpsc::Sender<SpawnRequest>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (requests, incoming) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("ptb-spawner".into())
            .spawn(move || {
                for (mut command, reply) in incoming {
                    // The requester waits for this reply; if it has gone, so has the need for it.
                    let _ = reply.send(command.spawn());
                }
            })
            .expect("starting the testbed's spawner thread");
        requests
    });
    let (reply, spawned) = mpsc::channel();
    let gone = || io::Error::other("the testbed's spawner thread has exited");
    spawner.send((command, reply)).map_err(|_| gone())?;
    spawned.recv().map_err(|_| gone())?
}
