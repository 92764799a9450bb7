//! `cargo xtask test [ARGS]...`: setup, then `cargo test` over the userspace crates, then, on
//! the full run only, `cargo xtask bench --quick`.
//!
//! The eBPF crate is left out (`--exclude proxy-ebpf`): it only builds for the BPF target, and
//! proxy-agent's build script already builds it, so the tests run against the real object.
//! The same command runs locally and in CI; nothing here depends on `CI`.
//!
//! The quick benchmark is part of the full run so that a change that breaks the benchmark harness
//! (a testbed, a replica, wrk's output, the report or the charts) fails the tests rather than the
//! next person's `cargo xtask bench`. It proves that every measurement can be taken; it asserts no
//! timing, which on a shared two-core machine would fail at random.

use std::process::ExitCode;

use anyhow::{Context, Result};

use crate::{bench, cmd, setup};

/// `cargo test` options that choose packages: given any, the user's choice replaces
/// `--workspace --exclude proxy-ebpf` (next to `--workspace`, cargo ignores `-p` and tests all).
/// A user's `--exclude` adds to the default one instead.
const PACKAGE_FLAGS: &[&str] = &["-p", "--package", "--workspace"];

/// `cargo test` options that choose targets: given any, the user's choice replaces
/// `--all-targets`, which would otherwise add every other target back.
const TARGET_FLAGS: &[&str] = &[
    "--lib",
    "--bin",
    "--bins",
    "--example",
    "--examples",
    "--test",
    "--tests",
    "--bench",
    "--benches",
    "--all-targets",
    "--doc",
];

/// Other `cargo test` options that make it run less than every test.
const NARROWING_FLAGS: &[&str] = &["--exclude", "--no-run"];

/// Runs `cargo test <args>`, with the defaults for what `args` does not choose, and exits as it
/// did.
pub fn test(args: &[String]) -> Result<ExitCode> {
    setup::setup()?;
    let mut cargo = cmd::cargo();
    cargo.arg("test");
    if !has_any(args, PACKAGE_FLAGS) {
        cargo.args(["--workspace", "--exclude", "proxy-ebpf"]);
    }
    if !has_any(args, TARGET_FLAGS) {
        cargo.arg("--all-targets");
    }
    cargo.args(args);
    let status = cmd::status(&mut cargo)?;
    if status.success() {
        println!("xtask test: cargo test succeeded");
        if is_full_run(args) {
            println!(
                "xtask test: running `cargo xtask bench --quick`: it proves that the benchmark \
                 harness works and asserts no timing"
            );
            bench::bench(true, None)
                .context("the quick benchmark failed: the benchmark harness is broken")?;
            println!("xtask test: the quick benchmark ran");
        }
        Ok(ExitCode::SUCCESS)
    } else {
        println!("xtask test: cargo test failed ({status})");
        // A signal has no exit code; 101 is what cargo itself uses for failed tests.
        let code = status
            .code()
            .and_then(|code| u8::try_from(code).ok())
            .unwrap_or(101);
        Ok(ExitCode::from(code))
    }
}

/// Whether `args` leave every default whole: no package, target, test-name filter, `--no-run`, or
/// arguments for the test binaries. A bare word counts as a filter even when it is an option's
/// value (`-j 2`): telling them apart would mean knowing every cargo option, and skipping the
/// quick benchmark is the harmless mistake.
fn is_full_run(args: &[String]) -> bool {
    let narrowed = [PACKAGE_FLAGS, TARGET_FLAGS, NARROWING_FLAGS]
        .iter()
        .any(|flags| has_any(args, flags));
    // `--` itself is a bare word here: it starts the test binaries' arguments.
    let filtered = args.iter().any(|arg| arg == "--" || !arg.starts_with('-'));
    !narrowed && !filtered
}

/// Whether `args` contain one of `flags` as `--flag`, `--flag=value` or (short) `-pvalue`. Only
/// arguments before `--` count: the ones after it belong to the test binaries.
fn has_any(args: &[String], flags: &[&str]) -> bool {
    args.iter().take_while(|arg| *arg != "--").any(|arg| {
        flags.iter().any(|flag| {
            let is_short = !flag.starts_with("--");
            arg == flag
                || if is_short {
                    arg.starts_with(flag)
                } else {
                    arg.strip_prefix(flag)
                        .is_some_and(|rest| rest.starts_with('='))
                }
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Vec<String> {
        line.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn user_choices_replace_the_defaults() {
        assert!(has_any(&args("-p proxy-common"), PACKAGE_FLAGS));
        assert!(has_any(&args("-pproxy-common"), PACKAGE_FLAGS));
        assert!(has_any(&args("--package=proxy-common"), PACKAGE_FLAGS));
        assert!(has_any(&args("--test loader"), TARGET_FLAGS));
        assert!(!has_any(&args("--release -- --list"), PACKAGE_FLAGS));
        assert!(!has_any(&args("--exclude proxy-agent"), PACKAGE_FLAGS));
        assert!(!has_any(&args("--testing"), TARGET_FLAGS));
        assert!(!has_any(&args("-- --test-threads 1 --lib"), TARGET_FLAGS));
    }

    #[test]
    fn only_the_full_run_runs_the_quick_benchmark() {
        for full in ["", "--release", "--no-fail-fast -j2", "--jobs=2 -v"] {
            assert!(is_full_run(&args(full)), "{full}");
        }
        for narrowed in [
            "-p proxy-common",
            "--workspace",
            "--lib",
            "--test loader",
            "--exclude proxy-agent",
            "--exclude=proxy-agent",
            "--no-run",
            "sync",
            "--release sync",
            "-- --list",
            "-- --ignored",
            "-j 2",
        ] {
            assert!(!is_full_run(&args(narrowed)), "{narrowed}");
        }
    }
}
