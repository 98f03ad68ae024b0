//! Build script: enables `crux sim` once `src/sim_cmd.rs` (written with the simulator work) has its
//! entry point, so the binary builds before and after that file lands.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(crux_sim)");
    println!("cargo::rerun-if-changed=src/sim_cmd.rs");
    let src = std::fs::read_to_string("src/sim_cmd.rs").unwrap_or_default();
    if src.contains("pub struct SimArgs") && src.contains("pub fn run") {
        println!("cargo::rustc-cfg=crux_sim");
    }
}
