//! Runs `proxy-agent` on a testbed node the way a DaemonSet would run it on a real one: in the
//! node's network namespace, its maps pinned in the node's own bpffs directory, its manifests in
//! the node's state directory.
//!
//! Changes go through [`Agent::apply`], which writes a manifest atomically (write, then rename,
//! as `kubectl`-style tools do) and waits until the agent has synced it, so a test's next packet
//! meets the new state.
use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{Node, Process};

/// How long an agent may take to load, sync and attach, or to sync a change.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// The agent's default `--metrics-address`, on its node's loopback.
const METRICS: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 10249);
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Agent {
    binary: PathBuf,
    node: Node,
    manifests: PathBuf,
    /// Every argument after `run`: the source and the test's own.
    args: Vec<String>,
    process: Process,
}

impl Agent {
    /// Starts the agent on `node` with the manifest directory `<state_dir>/manifests` and waits
    /// until it is ready (first sync done, devices attached).
    pub fn start(binary: &Path, node: &Node, extra_args: &[&str]) -> Result<Agent> {
        let manifests = node.state_dir.join("manifests");
        fs::create_dir_all(&manifests)
            .with_context(|| format!("creating {}", manifests.display()))?;
        let source = ["--manifests".to_string(), manifests.display().to_string()];
        Agent::start_with(binary, node, manifests, &source, extra_args)
    }

    /// Starts the agent on `node` against the Kubernetes API that `kubeconfig` names and waits
    /// until it is ready.
    pub fn start_api(
        binary: &Path,
        node: &Node,
        kubeconfig: &Path,
        extra_args: &[&str],
    ) -> Result<Agent> {
        let source = ["--kubeconfig".to_string(), kubeconfig.display().to_string()];
        let manifests = node.state_dir.join("manifests");
        Agent::start_with(binary, node, manifests, &source, extra_args)
    }

    fn start_with(
        binary: &Path,
        node: &Node,
        manifests: PathBuf,
        source: &[String],
        extra_args: &[&str],
    ) -> Result<Agent> {
        let args: Vec<String> = source
            .iter()
            .cloned()
            .chain(extra_args.iter().map(ToString::to_string))
            .collect();
        let process = spawn(binary, node, &args)?;
        let agent = Agent {
            binary: binary.to_path_buf(),
            node: node.clone(),
            manifests,
            args,
            process,
        };
        agent.process.wait_for_log("ready", READY_TIMEOUT)?;
        Ok(agent)
    }

    pub fn process(&self) -> &Process {
        &self.process
    }

    /// Starts a new agent process with the same arguments (after the old one stopped or was
    /// killed) and waits until it is ready.
    pub fn restart(&mut self) -> Result<()> {
        self.process = spawn(&self.binary, &self.node, &self.args)?;
        self.process.wait_for_log("ready", READY_TIMEOUT)
    }

    /// Starts a new agent process with the same arguments without waiting for it to be ready.
    pub fn restart_unready(&mut self) -> Result<()> {
        self.process = spawn(&self.binary, &self.node, &self.args)?;
        Ok(())
    }

    /// Writes (or replaces) manifest `name` and waits until the agent has synced it.
    pub fn apply(&self, name: &str, yaml: &str) -> Result<()> {
        let synced_before = self.sync_count()?;
        let path = self.manifests.join(name);
        let temporary = self.manifests.join(format!(".{name}.tmp"));
        fs::write(&temporary, yaml).with_context(|| format!("writing {}", temporary.display()))?;
        fs::rename(&temporary, &path).with_context(|| format!("renaming to {}", path.display()))?;
        self.wait_for_sync_after(synced_before)
    }

    /// Removes manifest `name` and waits until the agent has synced the removal.
    pub fn remove(&self, name: &str) -> Result<()> {
        let synced_before = self.sync_count()?;
        fs::remove_file(self.manifests.join(name))
            .with_context(|| format!("removing manifest {name}"))?;
        self.wait_for_sync_after(synced_before)
    }

    /// Writes a manifest before the agent starts (or while it is down).
    pub fn write_manifest(node: &Node, name: &str, yaml: &str) -> Result<()> {
        let manifests = node.state_dir.join("manifests");
        fs::create_dir_all(&manifests)?;
        fs::write(manifests.join(name), yaml).with_context(|| format!("writing manifest {name}"))
    }

    /// Runs `proxy-agent <args> --bpf-dir <this node's pins>` in the node and returns its stdout.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let output = self
            .node
            .netns
            .command(&self.binary)
            .args(args)
            .arg("--bpf-dir")
            .arg(&self.node.bpf_dir)
            .output()
            .with_context(|| format!("running {} {args:?}", self.binary.display()))?;
        if !output.status.success() {
            bail!(
                "proxy-agent {args:?} failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// The agent's Prometheus text, fetched from the node's loopback as a scraper there would.
    pub fn metrics(&self) -> Result<String> {
        let mut stream = self
            .node
            .netns
            .tcp_connect(METRICS, SCRAPE_TIMEOUT)
            .with_context(|| format!("connecting to the agent's metrics on {METRICS}"))?;
        stream.set_read_timeout(Some(SCRAPE_TIMEOUT))?;
        stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n")?;
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .context("reading the agent's metrics")?;
        match response.split_once("\r\n\r\n") {
            Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.to_owned()),
            _ => bail!("the agent's metrics endpoint answered:\n{response}"),
        }
    }

    /// How many syncs this agent process has logged.
    pub fn sync_count(&self) -> Result<usize> {
        Ok(self.process.log()?.matches(" synced ").count())
    }

    /// Waits until the agent logs a sync beyond the first `synced_before`.
    pub fn wait_for_sync_after(&self, synced_before: usize) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        while self.sync_count()? <= synced_before {
            if Instant::now() > deadline {
                bail!(
                    "the agent did not sync within {READY_TIMEOUT:?}; its log:\n{}",
                    self.process.log()?
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

fn spawn(binary: &Path, node: &Node, args: &[String]) -> Result<Process> {
    let mut command = Command::new(binary);
    command
        .arg("run")
        .args(args)
        .arg("--node-name")
        .arg(&node.name)
        .arg("--bpf-dir")
        .arg(&node.bpf_dir)
        // Plain text, no colours: tests and the demo read this log.
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info");
    node.spawn(command)
}
