//! `cargo xtask`: the project's workflows as one Rust binary instead of shell scripts.
//!
//! Every subcommand that builds or runs something first calls [`setup::setup`], so a fresh machine
//! needs nothing but Rust and root: the first run installs what is missing, later runs only check.

mod bench;
mod clippy;
mod cmd;
mod demo;
mod run;
mod setup;
mod test;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "xtask",
    bin_name = "cargo xtask",
    about = "Developer and CI workflows for the eBPF kube-proxy"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

const TEST: &str = "test";

#[derive(Subcommand)]
enum Command {
    /// Check for (and install where missing) the toolchains, bpf-linker and Debian packages the
    /// build and the tests need; mount bpffs.
    Setup,
    /// Run setup, then `cargo test` over the workspace (the eBPF crate is built by proxy-agent);
    /// when no argument narrows the run, then `bench --quick`, which proves that the benchmark
    /// harness works and asserts no timing.
    ///
    /// Arguments go to `cargo test` as given: `cargo xtask test -p proxy-common`,
    /// `cargo xtask test -- --list`. Choosing packages or targets replaces the defaults
    /// (`--workspace --exclude proxy-ebpf`, `--all-targets`).
    #[command(name = TEST)]
    Test {
        /// Arguments for `cargo test`, including a `--` and what follows it for the test binaries.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run setup, build the agent, and show every behaviour of the seed article on a simulated
    /// two-node cluster (network namespaces, real eBPF, real traffic); then clean up.
    Demo,
    /// Run setup, build the agent (release), and measure it against direct pod IPs and replicas
    /// of kube-proxy's iptables and nftables layouts: new connections per second and latency
    /// through a ClusterIP at N Services, rule load times, and the control plane (N Services
    /// programmed from empty, endpoint change latency, memory). Writes target/bench/report.md,
    /// report.json and the charts s1-connections.png and s2-latency.png.
    Bench {
        /// A small run (100-200 Services, 1 s loads, 10 change samples): seconds, not minutes,
        /// to check that the benchmark works. Its figures compare nothing.
        #[arg(long)]
        quick: bool,
        /// Service counts for the control-plane scenario, comma-separated (replaces its defaults).
        #[arg(
            long,
            value_delimiter = ',',
            value_parser = clap::value_parser!(u32).range(1..=i64::from(bench::MAX_SERVICES)),
        )]
        services: Option<Vec<u32>>,
    },
    /// Run the agent in place of kube-proxy on a local kind cluster (needs Docker, kind and
    /// kubectl): build the release image, create the cluster `proxy-dev` unless it exists, deploy
    /// the agent's DaemonSet and the demo Services, and say how to try them.
    Run {
        /// Delete the kind cluster instead.
        #[arg(long)]
        delete: bool,
    },
    /// Run setup, then clippy with `-D warnings` on the userspace crates (stable) and on the eBPF
    /// crate (nightly, BPF target).
    Clippy,
}

fn main() -> anyhow::Result<ExitCode> {
    match Cli::parse().command {
        Command::Setup => setup::setup().map(|()| ExitCode::SUCCESS),
        Command::Test { args } => test::test(&restore_leading_separator(args, std::env::args())),
        Command::Demo => {
            setup::setup()?;
            let agent = build_agent()?;
            demo::demo(&agent, &cmd::workspace_root().join("examples/seed.yaml"))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench { quick, services } => {
            bench::bench(quick, services).map(|()| ExitCode::SUCCESS)
        }
        Command::Run { delete } => {
            if delete { run::delete() } else { run::run() }.map(|()| ExitCode::SUCCESS)
        }
        Command::Clippy => clippy::clippy(),
    }
}

/// Builds `proxy-agent` (which builds the eBPF program) and returns the binary's path.
fn build_agent() -> anyhow::Result<std::path::PathBuf> {
    cmd::run(cmd::cargo().args(["build", "--package", "proxy-agent"]))?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| cmd::workspace_root().join("target"), Into::into);
    Ok(target.join("debug").join("proxy-agent"))
}

/// clap keeps a `--` among trailing arguments except when it comes first, which it takes as its
/// own end-of-options marker (clap-rs/clap#5055). `cargo xtask test -- --list` would then become
/// `cargo test --list`, so the `--` is put back when it directly followed the subcommand.
fn restore_leading_separator(
    mut args: Vec<String>,
    argv: impl IntoIterator<Item = String>,
) -> Vec<String> {
    let mut after_subcommand = argv
        .into_iter()
        .skip(1)
        .skip_while(|arg| arg != TEST)
        .skip(1);
    if after_subcommand.next().as_deref() == Some("--") {
        args.insert(0, "--".to_owned());
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(line: &str) -> Vec<String> {
        line.split_whitespace().map(str::to_owned).collect()
    }

    /// What `cargo xtask <line>` hands to [`test::test`].
    fn test_args(line: &str) -> Vec<String> {
        let argv = words(&format!("xtask {line}"));
        match Cli::try_parse_from(&argv).unwrap().command {
            Command::Test { args } => restore_leading_separator(args, argv),
            _ => panic!("not the test subcommand"),
        }
    }

    #[test]
    fn test_arguments_reach_cargo_test_verbatim() {
        for line in [
            "-p proxy-common",
            "--release",
            "-p proxy-common -- --list --exact",
            "-- --list",
            "-- -- x",
            "",
        ] {
            assert_eq!(test_args(&format!("test {line}")), words(line), "{line}");
        }
    }
}
