//! quiesce pointed at a real old QEMU: Debian 12's own 7.2, unpacked with `dpkg-deb -x`
//! into a folder of this test's (never installed over the system's QEMU), and chosen with
//! `QUIESCE_QEMU` alone: its qemu-img, qemu-io and qemu-storage-daemon are taken from
//! beside it. 7.2 has no `file:` migration, so:
//!
//! - `quiesce doctor` exits 1 and says plainly that Saved State will not work, and why;
//! - a Saved State scenario is refused with that reason, and leaves no QEMU behind;
//! - a Child VM Snapshot scenario, which 7.2 can do, passes.
//!
//! The packages come through the guest image recipe's own apt state (bookworm, whatever
//! this host's sources are), else the host's apt. Where they cannot be fetched, or 7.2
//! cannot run on this host (libraries it was built against are missing), the test says so
//! and skips.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The emulator, its data, its tools, and the firmware (SeaBIOS) it finds beside its data:
/// an emulator unpacked away from where it was built to live looks for its firmware there.
const PACKAGES: [&str; 6] =
    ["qemu-system-x86", "qemu-system-common", "qemu-system-data", "qemu-utils", "qemu-block-extra", "seabios"];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn quiesce() -> Command {
    Command::new(env!("CARGO_BIN_EXE_quiesce"))
}

/// Why the test cannot run here, said the way a skipped test says it.
fn skip(why: &str) {
    eprintln!("SKIPPED old_qemu: {why}");
}

/// Fetches and unpacks QEMU 7.2 into the test's folder (once; later runs reuse it), and
/// returns its emulator, or why it cannot be had here.
fn qemu_7_2() -> Result<PathBuf, String> {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("qemu-7.2");
    let emulator = base.join("root/usr/bin/qemu-system-x86_64");
    if emulator.is_file() {
        return Ok(emulator);
    }
    let debs = base.join("debs");
    std::fs::create_dir_all(&debs).map_err(|e| format!("{}: {e}", debs.display()))?;
    let mut download = Command::new("apt-get");
    download.current_dir(&debs).args(["download", "-q"]);
    download.args(PACKAGES.iter().map(|p| format!("{p}/bookworm")));
    // The recipe's own apt state knows bookworm on any host; it is there once the guest
    // image was built (the other guest tests build it).
    let recipe_apt = quiesce::image::cache::cache_dir().join("debs/apt/apt.conf");
    if recipe_apt.is_file() {
        download.env("APT_CONFIG", &recipe_apt);
    }
    let out = download.output().map_err(|e| format!("apt-get: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "the bookworm QEMU 7.2 packages could not be fetched: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let unpacked = base.join("root.partial");
    let _ = std::fs::remove_dir_all(&unpacked);
    for deb in std::fs::read_dir(&debs).map_err(|e| e.to_string())?.flatten() {
        let st = Command::new("dpkg-deb").arg("-x").arg(deb.path()).arg(&unpacked).status();
        if !st.map(|s| s.success()).unwrap_or(false) {
            return Err(format!("dpkg-deb -x {} failed", deb.path().display()));
        }
    }
    std::fs::rename(&unpacked, base.join("root")).map_err(|e| e.to_string())?;
    Ok(emulator)
}

fn run(cmd: &mut Command) -> (i32, String) {
    let out = cmd.output().expect("quiesce runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn quiesce_on_qemu_7_2_says_what_will_not_work_refuses_saved_state_and_does_child_snapshots() {
    let emulator = match qemu_7_2() {
        Ok(e) => e,
        Err(why) => return skip(&why),
    };
    let version = Command::new(&emulator).arg("--version").output();
    match version {
        Ok(v) if v.status.success() && String::from_utf8_lossy(&v.stdout).contains("version 7.2") => {}
        Ok(v) => {
            return skip(&format!(
                "Debian's QEMU 7.2 does not run on this host (libraries it needs are missing?): {}",
                String::from_utf8_lossy(&v.stderr).trim()
            ))
        }
        Err(e) => return skip(&format!("Debian's QEMU 7.2 does not start here: {e}")),
    }
    let with_7_2 = |cmd: &mut Command| {
        cmd.env("QUIESCE_QEMU", &emulator).env_remove("QUIESCE_QEMU_IMG").env_remove("QUIESCE_QEMU_COMPAT");
    };

    let mut doctor = quiesce();
    doctor.args(["doctor", "--no-build"]);
    with_7_2(&mut doctor);
    let (code, text) = run(&mut doctor);
    assert_eq!(code, 1, "doctor must fail on a QEMU that cannot do Saved State:\n{text}");
    assert!(text.contains("7.2."), "{text}");
    assert!(text.contains("WILL NOT WORK file: migration (QEMU 8.2+): Saved State cannot be taken"), "{text}");
    // The tools are 7.2's own, from beside the emulator.
    let img_dir = emulator.parent().unwrap().join("qemu-img");
    assert!(text.contains(&img_dir.display().to_string()), "qemu-img is not the one beside 7.2's emulator:\n{text}");

    let reports = tempfile::tempdir().unwrap();
    let mut saved = quiesce();
    saved.arg("run").arg(root().join("scenarios/saved-state-running.toml")).arg("--report-dir").arg(reports.path());
    with_7_2(&mut saved);
    let (code, text) = run(&mut saved);
    assert_eq!(code, 1, "{text}");
    let report = std::fs::read_to_string(reports.path().join("saved-state-running.json")).unwrap();
    assert!(report.contains("cannot migrate to a file: URI (8.2 or newer is needed)"), "{report}");

    let mut snap = quiesce();
    snap.arg("run").arg(root().join("scenarios/child-snapshot-running.toml")).arg("--report-dir").arg(reports.path());
    with_7_2(&mut snap);
    let (code, text) = run(&mut snap);
    assert_eq!(code, 0, "a Child VM Snapshot needs nothing 7.2 lacks:\n{text}");
    let report = std::fs::read_to_string(reports.path().join("child-snapshot-running.json")).unwrap();
    assert!(report.contains("\"qemu_version\": \"7.2."), "{report}");

    let left = Command::new("pgrep").args(["-f", &emulator.display().to_string()]).output().unwrap();
    assert!(left.stdout.is_empty(), "QEMU 7.2 processes were left behind: {}", String::from_utf8_lossy(&left.stdout));
}
