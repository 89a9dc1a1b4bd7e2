//! Compiles the XDP program (lb-ebpf) with the nightly toolchain and
//! bpf-linker and leaves the object in OUT_DIR for `include_bytes_aligned!`.
//!
//! `XLB_SKIP_EBPF=1` writes an empty object instead, so `cargo check` and
//! clippy work on a machine without the BPF toolchain (the binary then fails
//! at load time with a clear message).
use std::{env, fs, path::PathBuf};

use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=XLB_SKIP_EBPF");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    if env::var_os("XLB_SKIP_EBPF").is_some() {
        fs::write(out_dir.join("xlb"), []).context("writing the empty eBPF stub")?;
        return Ok(());
    }
    let metadata = cargo_metadata::MetadataCommand::new().no_deps().exec().context("running cargo metadata")?;
    let ebpf = metadata.packages.into_iter().find(|p| p.name.as_str() == "lb-ebpf").ok_or_else(|| anyhow!("lb-ebpf package not found in the workspace"))?;
    let root_dir = ebpf.manifest_path.parent().ok_or_else(|| anyhow!("lb-ebpf manifest has no parent directory"))?.as_str().to_owned();
    let package = aya_build::Package { name: ebpf.name.as_str(), root_dir: &root_dir, ..Default::default() };
    aya_build::build_ebpf([package], aya_build::Toolchain::default()).context("building the eBPF program (run `cargo xtask setup` if the toolchain is missing)")
}
