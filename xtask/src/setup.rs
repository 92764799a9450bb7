//! `cargo xtask setup`: make this machine able to build the eBPF datapath and run the tests.
//!
//! Each step checks first and only installs what is missing, so a second run costs a few process
//! starts; every subcommand that builds calls [`setup`] for that reason. Each step prints one line
//! saying what it found or did, and a failure names the missing piece.

use std::fs;
use std::io;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, bail};
use nix::mount::{MsFlags, mount};

use crate::cmd::{self, CommandError};

/// The toolchain that builds the eBPF crate (`-Z build-std=core` for `bpfel-unknown-none`).
pub const NIGHTLY: &str = "nightly";

/// The bpf-linker release TOOLCHAIN.md checked against the nightly's LLVM.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// What the tests and benchmarks run: `ip` and namespaces, the iptables/nftables baselines,
/// `bpftool` to inspect maps, load generators, and the font the benchmark's charts are drawn with.
const DEBIAN_PACKAGES: &[&str] = &[
    "iproute2",
    "iptables",
    "nftables",
    "bpftool",
    "wrk",
    "iperf3",
    "fonts-dejavu-core",
];

const BPFFS: &str = "/sys/fs/bpf";

/// Runs every step in order; the root check comes first because every later step needs it.
pub fn setup() -> Result<()> {
    require_root()?;
    nightly_toolchain()?;
    ensure_component(NIGHTLY, "rust-src")?;
    bpf_linker()?;
    debian_packages()?;
    bpffs()
}

fn require_root() -> Result<()> {
    let euid = nix::unistd::geteuid();
    if !euid.is_root() {
        bail!(
            "cargo xtask must run as root (effective uid is {euid}): loading eBPF programs and \
             creating network namespaces need CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN, and setup \
             installs Debian packages. Run it from a root shell; xtask does not use sudo."
        );
    }
    println!("ok: running as root");
    Ok(())
}

fn nightly_toolchain() -> Result<()> {
    let list = cmd::output(Command::new("rustup").args(["toolchain", "list"]))
        .context("rustup is needed to manage the stable and nightly toolchains")?;
    if list.lines().any(is_plain_nightly) {
        println!("ok: {NIGHTLY} toolchain");
        return Ok(());
    }
    installing(&format!("{NIGHTLY} toolchain"));
    let mut install = Command::new("rustup");
    install.args(["toolchain", "install", NIGHTLY, "--profile", "minimal"]);
    cmd::run(&mut install).map_err(|err| {
        explain(
            err,
            &format!("installing the {NIGHTLY} toolchain (it builds the eBPF crate)"),
            "",
        )
    })?;
    println!("installed: {NIGHTLY} toolchain");
    Ok(())
}

/// Whether a `rustup toolchain list` line is the toolchain `+nightly` selects
/// (`nightly-x86_64-unknown-linux-gnu (default)`), not a dated one (`nightly-2025-01-01-…`).
fn is_plain_nightly(line: &str) -> bool {
    let name = line.split_whitespace().next().unwrap_or_default();
    name.strip_prefix(NIGHTLY).is_some_and(|rest| {
        rest.is_empty()
            || rest
                .strip_prefix('-')
                .is_some_and(|host| !host.starts_with(|c: char| c.is_ascii_digit()))
    })
}

/// Adds a rustup component to `toolchain` unless it is there already (`rustup component add`
/// would be idempotent too, but it asks the network first).
pub fn ensure_component(toolchain: &str, component: &str) -> Result<()> {
    let mut list = Command::new("rustup");
    list.args(["component", "list", "--toolchain", toolchain, "--installed"]);
    // Components are listed as `rust-src`, or with the host triple as in `clippy-x86_64-…`.
    let installed = cmd::output(&mut list)?.lines().any(|line| {
        line.strip_prefix(component)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('-'))
    });
    if installed {
        println!("ok: {component} for {toolchain}");
        return Ok(());
    }
    installing(&format!("{component} for {toolchain}"));
    let mut add = Command::new("rustup");
    add.args(["component", "add", component, "--toolchain", toolchain]);
    cmd::run(&mut add)
        .map_err(|err| explain(err, &format!("adding {component} to {toolchain}"), ""))?;
    println!("installed: {component} for {toolchain}");
    Ok(())
}

fn bpf_linker() -> Result<()> {
    let broken = match bpf_linker_version() {
        Ok(version) => {
            println!("ok: {version}");
            return Ok(());
        }
        Err(err) => err,
    };
    // A bpf-linker that exists but cannot start has usually lost its libLLVM to a nightly update.
    // `cargo install` skips a crate it has recorded as installed, so only `--force` rebuilds it.
    let force = !broken.is_not_found();
    if force {
        println!("broken: {broken}");
    }
    install_bpf_linker(force)?;
    match bpf_linker_version() {
        Ok(version) => {
            println!("installed: {version}");
            Ok(())
        }
        Err(err) if err.is_not_found() => Err(err).context(
            "bpf-linker is installed in cargo's bin directory ($CARGO_HOME/bin, usually \
             ~/.cargo/bin), which is not on PATH",
        ),
        Err(err) => Err(err).context("bpf-linker was just installed but does not start"),
    }
}

fn bpf_linker_version() -> Result<String, CommandError> {
    cmd::output(Command::new("bpf-linker").arg("--version")).map(|out| out.trim().to_owned())
}

/// Builds bpf-linker against the nightly toolchain's own libLLVM, so that the linker and the
/// rustc producing its bitcode always share an LLVM version (see TOOLCHAIN.md).
fn install_bpf_linker(force: bool) -> Result<()> {
    let llvm_major = nightly_llvm_major()?;
    let prefix = prepare_llvm_prefix()?;
    installing(&format!(
        "bpf-linker {BPF_LINKER_VERSION} against the {NIGHTLY} LLVM {llvm_major} \
         (builds for about a minute)"
    ));
    let mut install = cmd::cargo();
    install
        .env("LLVM_PREFIX", &prefix)
        .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
        .args([
            "--no-default-features",
            "--features",
            &format!("llvm-{llvm_major}"),
        ]);
    if force {
        install.arg("--force");
    }
    cmd::run(&mut install).map_err(|err| {
        explain(
            err,
            &format!("installing bpf-linker {BPF_LINKER_VERSION}"),
            "",
        )
    })?;
    Ok(())
}

/// The LLVM major version of the nightly rustc, from the `LLVM version: 22.1.4` line of
/// `rustc +nightly -vV`: bpf-linker's `llvm-<major>` feature must match it.
fn nightly_llvm_major() -> Result<String> {
    let version = cmd::output(Command::new("rustc").args([&format!("+{NIGHTLY}"), "-vV"]))?;
    version
        .lines()
        .find_map(|line| line.strip_prefix("LLVM version: "))
        .and_then(|llvm| llvm.split('.').next())
        .map(str::to_owned)
        .with_context(|| format!("no `LLVM version:` line in `rustc +{NIGHTLY} -vV`:\n{version}"))
}

/// Creates `$HOME/.cache/bpf-linker-llvm` with `lib/libLLVM.so` (for the build) and
/// `lib/<soname>` (for the runtime loader) linked to the nightly's libLLVM. bpf-linker keeps
/// `<prefix>/lib` as its RUNPATH, hence a stable place outside the toolchain directory, which
/// rustup replaces on every update.
fn prepare_llvm_prefix() -> Result<PathBuf> {
    let home = std::env::var_os("HOME").context("HOME is not set: it holds the LLVM prefix")?;
    let prefix = Path::new(&home).join(".cache/bpf-linker-llvm");
    let lib_dir = prefix.join("lib");
    let llvm = nightly_libllvm()?;
    let soname = llvm
        .file_name()
        .context("libLLVM path without a file name")?;
    fs::create_dir_all(&lib_dir).with_context(|| format!("creating {}", lib_dir.display()))?;
    for entry in fs::read_dir(&lib_dir).with_context(|| format!("reading {}", lib_dir.display()))? {
        let link = entry?.path();
        let name = link.file_name().unwrap_or_default();
        // Links left from an older nightly would only confuse someone debugging the loader.
        let wanted = name == "libLLVM.so" || name == soname;
        if !wanted && name.to_string_lossy().starts_with("libLLVM.so") {
            fs::remove_file(&link).with_context(|| format!("removing {}", link.display()))?;
        }
    }
    for link in [lib_dir.join("libLLVM.so"), lib_dir.join(soname)] {
        // Links already right are left alone: a bpf-linker running right now loads through them.
        if fs::read_link(&link).is_ok_and(|target| target == llvm) {
            continue;
        }
        if let Err(err) = fs::remove_file(&link)
            && err.kind() != io::ErrorKind::NotFound
        {
            return Err(err).with_context(|| format!("removing {}", link.display()));
        }
        symlink(&llvm, &link).with_context(|| format!("linking {}", link.display()))?;
    }
    Ok(prefix)
}

/// The nightly sysroot's `lib/libLLVM.so.<version>-rust-<version>-nightly`.
fn nightly_libllvm() -> Result<PathBuf> {
    let sysroot =
        cmd::output(Command::new("rustc").args([&format!("+{NIGHTLY}"), "--print", "sysroot"]))?;
    let lib_dir = Path::new(sysroot.trim()).join("lib");
    let entries =
        fs::read_dir(&lib_dir).with_context(|| format!("reading {}", lib_dir.display()))?;
    for entry in entries {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if name.starts_with("libLLVM.so.") && name.ends_with("-nightly") {
            return Ok(path);
        }
    }
    bail!(
        "no libLLVM.so.*-nightly in {}: bpf-linker needs the nightly's LLVM library",
        lib_dir.display()
    )
}

fn debian_packages() -> Result<()> {
    let mut missing = Vec::new();
    for &package in DEBIAN_PACKAGES {
        let mut query = Command::new("dpkg-query");
        query.args(["-W", "-f=${Status}", package]);
        match cmd::output(&mut query) {
            Ok(status) if status == "install ok installed" => {}
            Err(err) if err.is_not_found() => {
                return Err(err).context(format!(
                    "setup installs packages with dpkg/apt (Debian or Ubuntu); elsewhere install \
                     {} by hand",
                    DEBIAN_PACKAGES.join(" ")
                ));
            }
            // Also a failure: dpkg-query exits 1 for a package it has never heard of.
            _ => missing.push(package),
        }
    }
    if missing.is_empty() {
        println!("ok: Debian packages {}", DEBIAN_PACKAGES.join(" "));
        return Ok(());
    }
    let names = missing.join(" ");
    installing(&format!("Debian packages {names}"));
    let update = cmd::output(Command::new("apt-get").arg("update")).map_err(|err| {
        explain(
            err,
            &format!("updating the apt package lists for {names}"),
            "",
        )
    })?;
    let mut install = Command::new("apt-get");
    install
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y"])
        .args(&missing);
    // apt-get update exits 0 when it could not fetch the package lists (it reports `Err:` lines
    // and carries on), and the install then fails with "Unable to locate package": the update's
    // report is what shows that the network was the problem.
    cmd::run(&mut install)
        .map_err(|err| explain(err, &format!("installing Debian packages {names}"), &update))?;
    println!("installed: Debian packages {names}");
    Ok(())
}

/// The agent mounts bpffs itself, but tests that read pins may run before any agent has.
fn bpffs() -> Result<()> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    let mounted = mounts.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.get(1) == Some(&BPFFS) && fields.get(2) == Some(&"bpf")
    });
    if mounted {
        println!("ok: bpffs at {BPFFS}");
        return Ok(());
    }
    mount(
        Some("bpf"),
        BPFFS,
        Some("bpf"),
        MsFlags::empty(),
        None::<&str>,
    )
    .with_context(|| format!("mount -t bpf bpf {BPFFS}"))?;
    println!("mounted: bpffs at {BPFFS}");
    Ok(())
}

/// Announces a step that may take a while (the output of the commands is captured), so that a
/// silent terminal is not mistaken for a hang.
fn installing(what: &str) {
    println!("installing: {what} ...");
}

/// Substrings by which rustup, cargo (curl) and apt report that a host could not be reached.
const NETWORK_SIGNS: &[&str] = &[
    "could not resolve",
    "couldn't resolve",
    "temporary failure resolving",
    "temporary failure in name resolution",
    "network is unreachable",
    "connection refused",
    "connection timed out",
    "operation timed out",
    "spurious network error",
    "failed to download",
    "could not download",
    "failed to fetch",
    "failed to query replaced source registry",
    "failed to update registry",
    "download of config.json failed",
    "dns error",
    "could not connect",
];

/// Wraps a failed command with the step that needed it and, when its stderr (or `earlier_output`,
/// another command's output from the same step) shows a network failure, says so and quotes the
/// line that shows it: an unreachable network is the likely cause on a fresh machine, and easy to
/// miss at the end of a long log.
fn explain(err: CommandError, step: &str, earlier_output: &str) -> anyhow::Error {
    let evidence = err
        .stderr()
        .lines()
        .chain(earlier_output.lines())
        .find(|line| {
            let line = line.to_lowercase();
            NETWORK_SIGNS.iter().any(|sign| line.contains(sign))
        });
    let context = match evidence {
        Some(line) => format!(
            "{step}: the network or package registry is unreachable ({})",
            line.trim()
        ),
        None => format!("{step} failed"),
    };
    anyhow::Error::new(err).context(context)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_nightly_is_told_from_dated_ones() {
        assert!(is_plain_nightly("nightly-x86_64-unknown-linux-gnu"));
        assert!(is_plain_nightly(
            "nightly-x86_64-unknown-linux-gnu (default)"
        ));
        assert!(!is_plain_nightly(
            "nightly-2025-01-01-x86_64-unknown-linux-gnu"
        ));
        assert!(!is_plain_nightly(
            "stable-x86_64-unknown-linux-gnu (active, default)"
        ));
    }
}
