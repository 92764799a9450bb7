//! `cargo xtask bench [--quick] [--services N,N,...]`: measures the proxy on this machine and
//! writes `target/bench/report.md`, `target/bench/report.json` and two charts,
//! `s1-connections.png` and `s2-latency.png` ([`charts`]).
//!
//! Runs setup, builds the agent in release mode (what a node runs), then the scenarios:
//!
//! - S1, new connections per second through a ClusterIP, and S2, request latency on established
//!   connections ([`data_plane`]): a pod reached directly, through this proxy, and through
//!   replicas of kube-proxy's iptables and nftables rules, with N Services loaded. S1 at N = 1,
//!   1,000, 10,000 and 30,000, S2 at 1,000, every mode twice (interleaved) for 5 s, plus the time
//!   each replica takes to load and the agent's first sync; `--quick`: N = 1 and 100, S2 at 100,
//!   once for 1 s. `--services` changes only S3's counts.
//! - S3, the control plane ([`control_plane`]): N Services × 10 endpoints programmed from empty,
//!   endpoint change latency with N Services programmed, agent and BPF map memory. N = 1,000,
//!   10,000 and 30,000 with 50 change samples each; `--quick`: N = 200 and 10 samples, a check in
//!   seconds that the benchmark works.
//!
//! Each N (in S1 and S2 each run) gets its own testbed, so every run starts from empty maps, and
//! the objects are the same on every run. The figures are printed next to the targets and
//! never asserted: on a shared two-core machine a benchmark measures, it does not pass or fail. It
//! fails only when a measurement cannot be taken (the agent does not start, a change never reaches
//! the datapath). The JSON holds the same numbers and every raw latency sample, for comparing
//! runs; the charts draw the S1 and S2 figures of the report.

mod charts;
mod control_plane;
mod data_plane;
mod report;

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result};

use crate::{cmd, setup};
use report::{Machine, Report};

pub use control_plane::MAX_SERVICES;

const SERVICES: &[u32] = &[1_000, 10_000, 30_000];
const SAMPLES: usize = 50;
const QUICK_SERVICES: &[u32] = &[200];
const QUICK_SAMPLES: usize = 10;
const DATA_PLANE: data_plane::Plan = data_plane::Plan {
    services: &[1, 1_000, 10_000, 30_000],
    latency_services: 1_000,
    rounds: 2,
    duration_s: 5,
};
const QUICK_DATA_PLANE: data_plane::Plan = data_plane::Plan {
    services: &[1, 100],
    latency_services: 100,
    rounds: 1,
    duration_s: 1,
};
// S1 and S2 start the agent with its default map sizes (S3 raises them where it needs to).
const _: () = assert!(DATA_PLANE.fits_default_maps() && QUICK_DATA_PLANE.fits_default_maps());

/// Runs the benchmark; `services` replaces the default Service counts (also with `quick`).
pub fn bench(quick: bool, services: Option<Vec<u32>>) -> Result<()> {
    setup::setup()?;
    println!("building the agent (release) ...");
    cmd::run(cmd::cargo().args(["build", "--release", "--package", "proxy-agent"]))?;
    let target = target_dir();
    let agent = target.join("release").join("proxy-agent");
    let (defaults, samples) = if quick {
        (QUICK_SERVICES, QUICK_SAMPLES)
    } else {
        (SERVICES, SAMPLES)
    };
    let counts = services.unwrap_or_else(|| defaults.to_vec());
    let data_plane = data_plane::run(
        &agent,
        if quick {
            &QUICK_DATA_PLANE
        } else {
            &DATA_PLANE
        },
    )?;
    let control_plane = counts
        .iter()
        .map(|&n| control_plane::run(&agent, n, samples))
        .collect::<Result<Vec<_>>>()?;
    let report = Report {
        date: cmd::output(Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%SZ"]))?
            .trim()
            .to_owned(),
        machine: machine()?,
        quick,
        targets: report::TARGETS,
        data_plane,
        control_plane,
    };
    let dir = target.join("bench");
    let (md, json) = report::write(&report, &dir)?;
    let (s1, s2) = charts::write(&report, &dir)?;
    println!("\n{}", report::markdown(&report));
    println!(
        "written: {}, {}, {}, {}",
        md.display(),
        json.display(),
        s1.display(),
        s2.display()
    );
    Ok(())
}

/// Where cargo builds: `$CARGO_TARGET_DIR`, or `target/` in the workspace.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| cmd::workspace_root().join("target"), Into::into)
}

fn machine() -> Result<Machine> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").context("reading /proc/cpuinfo")?;
    // x86 names the CPU in `model name`; other architectures may not name it at all.
    let cpu_model = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("model name")?.split_once(':'))
        .map_or("unknown CPU", |(_, model)| model.trim())
        .to_owned();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .context("reading the kernel release")?
        .trim()
        .to_owned();
    Ok(Machine {
        cpus: std::thread::available_parallelism()?.get(),
        cpu_model,
        kernel,
    })
}
