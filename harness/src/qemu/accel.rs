//! Chooses the accelerator. `/dev/kvm` existing proves little: on a PVM host it opens fine
//! and then a normal guest kernel hangs. So `auto` boots the guest kernel under KVM with a
//! short deadline and takes KVM only if the kernel runs to its end (a deliberate "no root
//! filesystem" panic, which `-no-reboot` turns into QEMU exiting). The verdict is cached per
//! QEMU, host kernel and guest kernel.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::config::Accel;
use super::process::QemuProcess;
use crate::sys::{deadline, Tool};

/// How a probe boot under KVM ended, read once from QEMU's exit and the kernel's console by
/// [`ProbeBoot::read`].
#[derive(Debug, Clone, PartialEq, Eq)]
enum ProbeBoot {
    /// The kernel ran to its deliberate panic (no root device), and QEMU exited: KVM works.
    RanToPanic,
    /// QEMU exited before the kernel got there: KVM (or QEMU) refused the guest.
    Failed(std::process::ExitStatus),
    /// Still running at the deadline: the kernel hangs, as on a PVM host.
    Hung,
}

impl ProbeBoot {
    /// `status` is QEMU's exit, if it exited. The kernel's console is read for one line of
    /// its documented output: a panic starts with `Kernel panic - not syncing:` (the
    /// kernel's `panic()`), printed only once it has run all the way to mounting root.
    fn read(status: Option<std::process::ExitStatus>, console: &str) -> ProbeBoot {
        let panicked = console.lines().any(|l| kernel_message(l).starts_with("Kernel panic - not syncing:"));
        match status {
            None => ProbeBoot::Hung,
            Some(_) if panicked => ProbeBoot::RanToPanic,
            Some(s) => ProbeBoot::Failed(s),
        }
    }
}

/// A console line without the kernel's `[    1.234567] ` time stamp, if it has one.
fn kernel_message(line: &str) -> &str {
    let line = line.trim_start();
    match line.strip_prefix('[').and_then(|rest| rest.split_once("] ")) {
        Some((stamp, msg)) if stamp.trim().parse::<f64>().is_ok() => msg,
        _ => line,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccelChoice {
    Auto,
    Fixed(Accel),
}

/// An accelerator name that is not one of auto, kvm or tcg.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccelError {
    /// `--accel` was given a name this program does not know.
    #[error("unknown accelerator {0:?}: use auto, kvm or tcg")]
    Unknown(String),
    /// `$QUIESCE_ACCEL` holds a name this program does not know.
    #[error("QUIESCE_ACCEL: unknown accelerator {0:?}: use auto, kvm or tcg")]
    UnknownInEnv(String),
}

impl std::str::FromStr for AccelChoice {
    type Err = AccelError;
    fn from_str(s: &str) -> Result<Self, AccelError> {
        match s {
            "auto" => Ok(AccelChoice::Auto),
            "kvm" => Ok(AccelChoice::Fixed(Accel::Kvm)),
            "tcg" => Ok(AccelChoice::Fixed(Accel::Tcg)),
            _ => Err(AccelError::Unknown(s.to_owned())),
        }
    }
}

impl AccelChoice {
    /// An explicit choice if given, else `$QUIESCE_ACCEL`, else auto.
    pub fn from_env(explicit: Option<AccelChoice>) -> Result<Self, AccelError> {
        match explicit {
            Some(c) => Ok(c),
            None => match std::env::var("QUIESCE_ACCEL") {
                Ok(v) if !v.is_empty() => v.parse().map_err(|_| AccelError::UnknownInEnv(v)),
                _ => Ok(AccelChoice::Auto),
            },
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Verdict {
    pub accel: Accel,
    pub reason: String,
    /// True when this came from the cache rather than a probe just now.
    #[serde(skip)]
    pub cached: bool,
}

#[derive(Serialize, Deserialize)]
struct CacheEntry {
    key: String,
    verdict: Verdict,
}

/// Resolves a choice to an accelerator. `kernel` is the guest kernel used for the probe;
/// `cache` is where the verdict is kept.
pub fn resolve(choice: AccelChoice, qemu: &str, kernel: &Path, cache: &Path) -> Verdict {
    match choice {
        AccelChoice::Fixed(accel) => {
            Verdict { accel, reason: "chosen explicitly (--accel or QUIESCE_ACCEL)".into(), cached: false }
        }
        AccelChoice::Auto => auto(qemu, kernel, cache),
    }
}

fn tcg(reason: String) -> Verdict {
    Verdict { accel: Accel::Tcg, reason, cached: false }
}

fn auto(qemu: &str, kernel: &Path, cache: &Path) -> Verdict {
    if !Path::new("/dev/kvm").exists() {
        return tcg("/dev/kvm does not exist".into());
    }
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        return tcg(format!("/dev/kvm cannot be opened: {e}"));
    }
    let key = cache_key(qemu, kernel);
    let path = cache.join("accel.json");
    if let Some(mut v) = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice::<CacheEntry>(&b).ok())
        .filter(|e| e.key == key)
        .map(|e| e.verdict)
    {
        v.cached = true;
        return v;
    }
    let verdict = probe_kvm(qemu, kernel);
    let entry = CacheEntry { key, verdict: verdict.clone() };
    // A cache that cannot be written only costs a probe next time.
    let _ = std::fs::create_dir_all(cache)
        .and_then(|_| std::fs::write(&path, serde_json::to_vec_pretty(&entry).expect("plain data encodes")));
    verdict
}

fn cache_key(qemu: &str, kernel: &Path) -> String {
    let mut h = Sha256::new();
    // A QEMU that cannot say its version still gets a key: the probe then says what is wrong.
    let version = Tool::new(qemu, deadline::QEMU_VERSION).arg("--version").run().map(|o| o.stdout).unwrap_or_default();
    h.update(&version);
    h.update(nix::sys::utsname::uname().map(|u| u.release().as_encoded_bytes().to_vec()).unwrap_or_default());
    h.update(kernel.as_os_str().as_encoded_bytes());
    if let Ok(m) = std::fs::metadata(kernel) {
        h.update(m.len().to_le_bytes());
    }
    hex::encode(&h.finalize()[..8])
}

/// Boots `kernel` under KVM with no root device and waits for its panic.
pub fn probe_kvm(qemu: &str, kernel: &Path) -> Verdict {
    let dir = match tempfile::Builder::new().prefix("quiesce-kvm-probe-").tempdir() {
        Ok(d) => d,
        Err(e) => return tcg(format!("KVM probe could not make a temp folder: {e}")),
    };
    let log: PathBuf = dir.path().join("serial.log");
    let args: Vec<String> = [
        "-M",
        "q35",
        "-accel",
        "kvm",
        "-cpu",
        "host",
        "-m",
        "256",
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-kernel",
        &kernel.to_string_lossy(),
        "-append",
        "console=ttyS0 panic=-1 root=/dev/quiesce-probe-none",
        "-serial",
        &format!("file:{}", log.display()),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let started = Instant::now();
    let mut proc = match QemuProcess::spawn(qemu, &args, &[], &dir.path().join("qemu.out")) {
        Ok(p) => p,
        Err(e) => return tcg(format!("KVM probe could not start {qemu}: {e}")),
    };
    let status = proc.wait_timeout(deadline::KVM_PROBE_BOOT);
    let took = started.elapsed();
    proc.terminate(deadline::KVM_PROBE_STOP);
    let serial = std::fs::read_to_string(&log).unwrap_or_default();
    match ProbeBoot::read(status, &serial) {
        ProbeBoot::RanToPanic => Verdict {
            accel: Accel::Kvm,
            reason: format!(
                "a probe boot of the guest kernel under KVM ran to completion in {:.1}s",
                took.as_secs_f64()
            ),
            cached: false,
        },
        ProbeBoot::Failed(status) => {
            let out = std::fs::read_to_string(dir.path().join("qemu.out")).unwrap_or_default();
            let first = out.lines().find(|l| !l.trim().is_empty()).unwrap_or("(no output)");
            tcg(format!("/dev/kvm is present but a KVM probe boot failed ({status}): {}", first.trim()))
        }
        ProbeBoot::Hung => tcg(format!(
            "/dev/kvm is present but a guest kernel under KVM did not finish booting within {}s \
             (it printed {} bytes); this host's KVM cannot run normal guests (a PVM host does this)",
            deadline::KVM_PROBE_BOOT.as_secs(),
            serial.len()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choice_parses() {
        assert_eq!("kvm".parse::<AccelChoice>().unwrap(), AccelChoice::Fixed(Accel::Kvm));
        assert_eq!("auto".parse::<AccelChoice>().unwrap(), AccelChoice::Auto);
        let e = "hvf".parse::<AccelChoice>().unwrap_err();
        assert_eq!(e, AccelError::Unknown("hvf".into()));
        assert_eq!(e.to_string(), "unknown accelerator \"hvf\": use auto, kvm or tcg");
    }

    #[test]
    fn a_probe_boot_is_read_from_the_exit_and_the_kernel_panic_line() {
        use std::os::unix::process::ExitStatusExt;
        let status = std::process::ExitStatus::from_raw(0);
        let exited = Some(status);
        let console = "[    0.000000] Linux version 6.1.0\n\
                       [    1.402117] Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)\n";
        assert_eq!(ProbeBoot::read(exited, console), ProbeBoot::RanToPanic);
        assert_eq!(
            ProbeBoot::read(exited, "Kernel panic - not syncing: Attempted to kill init!\n"),
            ProbeBoot::RanToPanic
        );
        assert_eq!(ProbeBoot::read(None, console), ProbeBoot::Hung);
        // QEMU exited, but the kernel never got to its panic (or only mentioned one).
        for console in ["", "[    0.000000] Linux version 6.1.0\n", "echo Kernel panic - not syncing: x\n"] {
            assert_eq!(ProbeBoot::read(exited, console), ProbeBoot::Failed(status), "{console:?}");
        }
    }

    #[test]
    fn explicit_choice_wins() {
        let v = resolve(
            AccelChoice::Fixed(Accel::Tcg),
            "qemu-system-x86_64",
            Path::new("/nonexistent"),
            Path::new("/nonexistent"),
        );
        assert_eq!(v.accel, Accel::Tcg);
        assert!(v.reason.contains("explicitly"));
    }
}
