//! Building this crate needs the `bpf-linker` binary, which cargo cannot express as a
//! dependency: rebuild whenever the linker on PATH changes.
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
