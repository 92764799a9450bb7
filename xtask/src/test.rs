//! `cargo xtask test [ARGS]...`: setup, then `cargo test` over the userspace crates.
//!
//! The eBPF crate is left out (`--exclude proxy-ebpf`): it only builds for the BPF target, and
//! proxy-agent's build script already builds it, so the tests run against the real object.
//! The same command runs locally and in CI; nothing here depends on `CI`.

use std::process::ExitCode;

use anyhow::Result;

use crate::{cmd, setup};

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
}
