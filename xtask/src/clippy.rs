//! `cargo xtask clippy`: clippy with `-D warnings` on every crate, with the toolchain each needs.
//!
//! The userspace crates are checked with the stable toolchain that builds them. The eBPF crate is
//! not a member of the default build (it only builds for `bpfel-unknown-none`), so it gets its own
//! nightly run, with the target and `-Z build-std=core` that proxy-agent's build script (through
//! aya-build) uses.

use std::process::{Command, ExitCode, ExitStatus};

use anyhow::Result;

use crate::{cmd, setup};

pub fn clippy() -> Result<ExitCode> {
    // proxy-agent's build script builds the eBPF crate, which needs bpf-linker and rust-src.
    setup::setup()?;
    // A nightly installed with the minimal profile (as setup does) comes without clippy.
    setup::ensure_component(setup::NIGHTLY, "clippy")?;

    let mut userspace = cmd::cargo();
    userspace
        .args([
            "clippy",
            "--workspace",
            "--exclude",
            "proxy-ebpf",
            "--all-targets",
        ])
        .args(["--", "-D", "warnings"]);
    let userspace = cmd::status(&mut userspace)?;

    // Through the rustup proxy rather than `$CARGO`, which is the stable cargo running xtask.
    let mut ebpf = Command::new("cargo");
    ebpf.current_dir(cmd::workspace_root())
        .arg(format!("+{}", setup::NIGHTLY))
        .args([
            "clippy",
            "-p",
            "proxy-ebpf",
            "--target",
            "bpfel-unknown-none",
        ])
        .args(["-Z", "build-std=core", "--", "-D", "warnings"]);
    let ebpf = cmd::status(&mut ebpf)?;

    let verdict = |status: ExitStatus| if status.success() { "clean" } else { "failed" };
    println!(
        "xtask clippy: userspace crates {}, proxy-ebpf {}",
        verdict(userspace),
        verdict(ebpf)
    );
    Ok(if userspace.success() && ebpf.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
