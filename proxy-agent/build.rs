//! Builds `proxy-ebpf` for the BPF target with the nightly toolchain (aya-build runs
//! `cargo +nightly build -Z build-std=core --target bpfel-unknown-none`) and leaves the object in
//! OUT_DIR, where `loader.rs` embeds it. `cargo xtask setup` installs what this needs.
use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

fn main() -> anyhow::Result<()> {
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = packages
        .into_iter()
        .find(|package| package.name.as_str() == "proxy-ebpf")
        .ok_or_else(|| anyhow!("the proxy-ebpf package is not in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?;
    let package = aya_build::Package {
        name: ebpf.name.as_str(),
        root_dir: root_dir.as_str(),
        ..Default::default()
    };
    // The datapath also changes when the shared ABI does.
    println!("cargo:rerun-if-changed={}/../proxy-common", root_dir);
    aya_build::build_ebpf([package], Toolchain::Nightly)
}
