//! Builds the XDP program in `bpf/` with clang and places the object in OUT_DIR, where
//! `bpf.rs` embeds it. Reruns when any `.c` or `.h` there changes.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let bpf_dir = manifest.join("../../bpf");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("vxnat.bpf.o");
    for entry in std::fs::read_dir(&bpf_dir).expect("bpf/ exists") {
        let path = entry.expect("readable bpf/ entry").path();
        if matches!(path.extension().and_then(|e| e.to_str()), Some("c" | "h")) {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".to_string());
    let status = Command::new(&clang)
        .args(["-O2", "-g", "-Wall", "-Werror", "-target", "bpf"])
        // Debian keeps asm/ headers under the multiarch include directory.
        .arg(format!("-I/usr/include/{}-linux-gnu", std::env::consts::ARCH))
        .arg("-c")
        .arg(bpf_dir.join("vxnat.bpf.c"))
        .arg("-o")
        .arg(&out)
        .status()
        .unwrap_or_else(|e| panic!("running {clang} to build bpf/vxnat.bpf.c: {e} (install clang: scripts/setup.sh)"));
    assert!(status.success(), "{clang} failed to build bpf/vxnat.bpf.c");
}
