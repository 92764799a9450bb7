//! Names of everything a testbed creates outside its own memory, and the sweep of what dead
//! processes left behind.
//!
//! Every name starts with `ptb<pid>-<n>-`: the pid of the process that owns it, and a counter that
//! keeps two testbeds of one process (parallel tests) apart. A test binary that was killed (SIGKILL,
//! a CI timeout) runs no `Drop`; the next testbed to start finds its names by the pid, sees that the
//! pid is gone, and removes them.

use std::path::{Path, PathBuf};
use std::sync::Once;
use std::sync::atomic::{AtomicU32, Ordering};

use nix::errno::Errno;
use nix::sys::signal::kill;
use nix::unistd::Pid;

use crate::netns::NETNS_RUN_DIR;

const PREFIX: &str = "ptb";

/// Where per-node bpffs directories go (the agent mounts bpffs there when it is missing).
const BPFFS: &str = "/sys/fs/bpf";

/// The name prefix of one testbed: `ptb<pid>-<n>`.
#[derive(Debug, Clone)]
pub(crate) struct Names {
    prefix: String,
}

impl Names {
    pub(crate) fn next() -> Names {
        static TESTBEDS: AtomicU32 = AtomicU32::new(1);
        let n = TESTBEDS.fetch_add(1, Ordering::Relaxed);
        Names {
            prefix: format!("{PREFIX}{}-{n}", std::process::id()),
        }
    }

    pub(crate) fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The `ip netns` name of the namespace for `role` (a node, pod or external name, or "underlay").
    pub(crate) fn netns(&self, role: &str) -> String {
        format!("{}-{role}", self.prefix)
    }

    pub(crate) fn bpf_dir(&self, node: &str) -> PathBuf {
        Path::new(BPFFS).join(format!("{}-{node}", self.prefix))
    }

    /// The temporary directory holding every node's state directory.
    pub(crate) fn state_root(&self) -> PathBuf {
        std::env::temp_dir().join(&self.prefix)
    }
}

/// A bpffs directory for a test that pins a datapath without a testbed (the packet tests), named
/// like a testbed's, so that the pins of a test binary killed before its cleanup are swept like
/// any other leftovers: every datapath's maps hold over 100 MiB of kernel memory until unpinned.
pub fn scratch_bpf_dir(label: &str) -> PathBuf {
    sweep_leftovers();
    Names::next().bpf_dir(label)
}

/// Removes namespaces, bpffs directories and state directories whose owning process is gone.
///
/// Never fails: a parallel testbed in another process may be sweeping the same leftovers, so
/// whatever cannot be removed is logged and left for the next sweep.
pub(crate) fn sweep_leftovers() {
    // A dead process's pid can be handed to this one. Names carrying it were left by that earlier
    // process, as long as no testbed of this process exists yet: the first sweep runs before any,
    // and `call_once` holds every other caller until it is done.
    static FIRST: Once = Once::new();
    FIRST.call_once(|| sweep(Some(std::process::id())));
    sweep(None);
}

/// One sweep; names owned by `stale_own_pid` count as dead too.
fn sweep(stale_own_pid: Option<u32>) {
    let dead = |pid: u32| Some(pid) == stale_own_pid || !is_alive(pid);
    for name in owned_entries(Path::new(NETNS_RUN_DIR), dead) {
        // Deleting needs no handle on the namespace, only its name.
        let result = std::process::Command::new("ip")
            .args(["netns", "del", &name])
            .output();
        match result {
            Ok(out) if out.status.success() => tracing::info!("removed leftover netns {name}"),
            Ok(out) => tracing::warn!(
                "removing leftover netns {name}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(err) => tracing::warn!("removing leftover netns {name}: {err}"),
        }
    }
    for dir in [Path::new(BPFFS).to_owned(), std::env::temp_dir()] {
        for name in owned_entries(&dir, dead) {
            let path = dir.join(&name);
            match std::fs::remove_dir_all(&path) {
                Ok(()) => tracing::info!("removed leftover {}", path.display()),
                Err(err) => tracing::warn!("removing leftover {}: {err}", path.display()),
            }
        }
    }
}

/// Entries of `dir` named by this module whose owning pid is `dead`.
fn owned_entries(dir: &Path, dead: impl Fn(u32) -> bool) -> Vec<String> {
    // A missing directory (no namespace created yet, bpffs not mounted) has no leftovers.
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| owner_pid(name).is_some_and(&dead))
        .collect()
}

/// The pid in a `ptb<pid>-...` name.
fn owner_pid(name: &str) -> Option<u32> {
    let (pid, _) = name.strip_prefix(PREFIX)?.split_once('-')?;
    pid.parse().ok()
}

fn is_alive(pid: u32) -> bool {
    // A pid beyond i32 is no pid at all.
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    // Signal 0 checks existence only; EPERM still means the process exists.
    !matches!(kill(Pid::from_raw(pid), None), Err(Errno::ESRCH))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_parses_only_our_names() {
        assert_eq!(owner_pid("ptb123-4-node1"), Some(123));
        assert_eq!(owner_pid("ptb123-4-underlay"), Some(123));
        assert_eq!(owner_pid("ptbx-4-node1"), None);
        assert_eq!(owner_pid("ptb123"), None);
        assert_eq!(owner_pid("cni-1234-abcd"), None);
    }

    #[test]
    fn testbeds_of_one_process_get_distinct_prefixes() {
        let (a, b) = (Names::next(), Names::next());
        assert_ne!(a.prefix(), b.prefix());
        assert!(
            a.netns("node1")
                .starts_with(&format!("ptb{}-", std::process::id()))
        );
    }

    #[test]
    fn the_own_process_is_alive() {
        assert!(is_alive(std::process::id()));
    }
}
