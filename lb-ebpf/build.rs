// Rebuild the program when the linker changes (as aya-template does).
fn main() {
    if let Ok(path) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    // Global BPF functions: bpf-linker internalizes every symbol it is not
    // told to export, and the verifier checks an exported (global)
    // function once for all callers instead of once per call path.
    println!("cargo:rustc-link-arg-bins=--export=xlb_segment_sum,xlb_rewrite,xlb_route");
}
