// Rebuild the program when the linker changes (as aya-template does).
fn main() {
    if let Ok(path) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    // Global BPF functions: bpf-linker internalizes every symbol it is not
    // told to export, and the verifier checks an exported (global)
    // function once for all callers instead of once per call path.
    println!("cargo:rustc-link-arg-bins=--export=xlb_segment_sum,xlb_rewrite,xlb_route,xlb_clamp_syn_mss");
    // LLVM's in-order memcpy expansion (bpf-linker's default) turns off the
    // inline expansion of memset and memmove: every struct zeroing and
    // possibly-overlapping copy became a call into a byte-per-iteration
    // BPF function (13% of the hot path). The generic expansion writes them
    // as plain loads and stores.
    println!("cargo:rustc-link-arg-bins=--disable-expand-memcpy-in-order");
}
