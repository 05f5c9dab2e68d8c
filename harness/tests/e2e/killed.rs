//! quiesce itself is killed with SIGKILL in the middle of a backup, so no undo can run.
//! Boots a real guest through the real `quiesce run`.
//!
//! What must hold: the QEMU quiesce started dies with it (PDEATHSIG); the run folder it
//! leaves (disks, overlays, a partial backup: SIGKILL leaves no way to remove them) is
//! found by the next `quiesce doctor`, which names what was in it and removes it; after
//! that nothing of the run is left on the host: no folder, no process.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use quiesce::sys::Process;

/// Booting the guest and reaching the copy-out, under TCG on a shared CPU.
const REACHES_COPY: Duration = Duration::from_secs(600);
/// A QEMU dying of its parent's death, and doctor's own run (no build, cached probe).
const DIES: Duration = Duration::from_secs(20);
const DOCTOR: Duration = Duration::from_secs(120);
/// The marker `QUIESCE_TRACE_STEPS` prints when the frozen images start to be copied out:
/// the overlays exist, the backup is half written.
const MARKER: &str = "quiesce-step: vm1: copy frozen images";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The live processes, other than `except`, whose command line names `needle`, with
/// their command line's first word.
fn processes_naming(needle: &Path, except: u32) -> Vec<(u32, String)> {
    let needle = needle.as_os_str().as_encoded_bytes();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        if pid == except || pid == std::process::id() {
            continue;
        }
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else { continue };
        if cmd.windows(needle.len()).any(|w| w == needle) {
            let argv0 = cmd.split(|b| *b == 0).next().map(|a| String::from_utf8_lossy(a).into_owned());
            out.push((pid, argv0.unwrap_or_default()));
        }
    }
    out
}

/// Runs `cmd`, its output captured, killed if it outlasts `within`.
fn run_within(cmd: &mut Command, within: Duration) -> std::process::Output {
    let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(within) {
        Ok(out) => out.expect("wait"),
        Err(_) => {
            let _ = Process::open(pid).map(|p| p.terminate(Duration::from_secs(1)));
            panic!("{cmd:?} did not end within {within:?}");
        }
    }
}

#[test]
fn sigkill_mid_backup_leaves_nothing_once_doctor_ran() {
    let reports = tempfile::tempdir().expect("temp folder");
    let scenario = root().join("scenarios/child-snapshot-writes-during-backup.toml");
    let mut quiesce = Command::new(env!("CARGO_BIN_EXE_quiesce"))
        .arg("run")
        .arg(&scenario)
        .arg("--report-dir")
        .arg(reports.path())
        .env("QUIESCE_TRACE_STEPS", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start quiesce run");
    let qpid = quiesce.id();
    let stderr = quiesce.stderr.take().expect("its stderr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let until = Instant::now() + REACHES_COPY;
    let mut seen = Vec::new();
    loop {
        let left = until.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains(MARKER) => break,
            Ok(line) => seen.push(line),
            Err(e) => {
                let _ = quiesce.kill();
                panic!("no {MARKER:?} within {REACHES_COPY:?} ({e}); stderr so far:\n{}", seen.join("\n"));
            }
        }
    }
    // Its QEMU, known before the kill: a process naming the run's folder.
    let qemus: Vec<(u32, String)> =
        processes_naming(reports.path(), qpid).into_iter().filter(|(_, a)| a.contains("qemu-system")).collect();
    assert!(!qemus.is_empty(), "no QEMU of this run found");
    let held: Vec<Process> = qemus.iter().map(|(pid, _)| Process::open(*pid).expect("pidfd of its QEMU")).collect();

    quiesce.kill().expect("SIGKILL quiesce");
    quiesce.wait().expect("reap quiesce");
    for q in &held {
        assert!(q.wait_exit(DIES), "QEMU {} outlived the quiesce that started it (no PDEATHSIG?)", q.pid());
    }

    // SIGKILL let nothing be removed: the run folder is there, with the backup under way.
    let work = reports.path().join("work");
    let runs: Vec<PathBuf> = std::fs::read_dir(&work).expect("the work folder").flatten().map(|e| e.path()).collect();
    assert_eq!(runs.len(), 1, "one run folder left: {runs:?}");

    let out = run_within(
        Command::new(env!("CARGO_BIN_EXE_quiesce"))
            .arg("doctor")
            .arg("--no-build")
            .arg("--report-dir")
            .arg(reports.path()),
        DOCTOR,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().find(|l| l.starts_with("leftovers")).unwrap_or_default().to_owned();
    assert!(line.contains("a run left by a quiesce that was killed"), "doctor did not find the run:\n{stdout}");
    assert!(line.contains("-overlay.qcow2"), "doctor did not name the overlays: {line}");
    assert!(line.contains(".partial-"), "doctor did not name the partial backup: {line}");
    assert!(line.ends_with("; removed"), "doctor did not remove it: {line}");
    let after: Vec<PathBuf> = std::fs::read_dir(&work).expect("the work folder").flatten().map(|e| e.path()).collect();
    assert!(after.is_empty(), "left on the host after doctor: {after:?}");
    let procs = processes_naming(reports.path(), 0);
    assert!(procs.is_empty(), "processes of the killed run still alive: {procs:?}");
}
