//! The Debian package as an operator meets it (issue 18, item 3): `dist/deb.sh` builds the .deb
//! of the binary this test run built (cargo-deb, the dev profile, quick compression), and
//! `dist/check-deb.sh` installs it in a throwaway Debian booted under systemd (`systemd-nspawn`
//! over a tmpfs overlay of this machine's root, private network): files, conffile, the `crux`
//! user, `systemd-analyze verify`, not started until a bloc is configured, then enabled, started,
//! READY=1 seen by systemd, `crux status` on the socket, a clean stop and a purge.
//!
//! Needs root, cargo-deb and systemd-nspawn (dev/setup.sh installs the last two); where one is
//! missing it says SKIPPED and which.

use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_crux");

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_path_buf()
}

fn skip_reason() -> Option<&'static str> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root (it boots a container)");
    }
    let deb = Command::new("cargo").args(["deb", "--version"]).output();
    if !deb.is_ok_and(|o| o.status.success()) {
        return Some("no cargo-deb (cargo install cargo-deb, or dev/setup.sh)");
    }
    let nspawn = Command::new("systemd-nspawn").arg("--version").output();
    if !nspawn.is_ok_and(|o| o.status.success()) {
        return Some("no systemd-nspawn (apt-get install systemd-container, or dev/setup.sh)");
    }
    None
}

#[test]
fn the_deb_installs_runs_under_systemd_and_purges() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIPPED the .deb test: {why}");
        return;
    }
    // The binary under test is target/<dir>/crux: its target dir is two levels up.
    let target = Path::new(BIN)
        .parent()
        .and_then(Path::parent)
        .expect("the target dir");
    let built = Command::new(repo().join("dist/deb.sh"))
        .args(["--profile", "dev", "--no-build"])
        .env("CARGO_TARGET_DIR", target)
        .current_dir(repo())
        .output()
        .expect("run dist/deb.sh");
    let stdout = String::from_utf8_lossy(&built.stdout);
    assert!(
        built.status.success(),
        "dist/deb.sh failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let deb = repo().join(stdout.lines().last().expect("the .deb's path").trim());
    assert!(
        deb.exists(),
        "dist/deb.sh named {deb:?}, which does not exist"
    );

    let checked = Command::new(repo().join("dist/check-deb.sh"))
        .arg(&deb)
        .output()
        .expect("run dist/check-deb.sh");
    let out = String::from_utf8_lossy(&checked.stdout);
    let err = String::from_utf8_lossy(&checked.stderr);
    eprintln!("{out}{err}");
    assert!(checked.status.success(), "dist/check-deb.sh failed");
    assert!(
        out.contains("check-deb: SKIPPED") || out.contains("PASSED"),
        "dist/check-deb.sh said neither PASSED nor SKIPPED"
    );
}
