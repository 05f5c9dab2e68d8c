//! The scripted Windows peer and the helpers that drive the REAL runner
//! (`scenario::run::run`) on the scenario files of `scenarios/windows/` with it; the tests
//! are in `windows_tests.rs` and its siblings.
//!
//! A SCRIPTED PEER STANDS IN FOR WINDOWS HERE, because no Windows guest can run where
//! quiesce is tested (no image, and a PVM host whose KVM cannot run one). What is real:
//! the runner and every layer under it (the Windows boot and its readiness, the conditions,
//! the methods, the set, the restore, the checks), QEMU (a q35 machine whose SeaBIOS finds
//! nothing to boot and waits, with real disks, a real saved state and its restore, real
//! overlays and block jobs), the NTFS data disk (made by mkntfs) and its journal read on
//! the host while QEMU holds it. What is scripted: the agent, answering with qemu-ga
//! 10.0.2's Windows replies and error texts as `shared/design/windows.md` records them
//! (VSS's 10 s hold included) and answering the runner's PowerShell as the recipe's
//! scripts would. The "Windows image" is a blank disk.
//!
//! A peer cannot power QEMU off: when it gets `guest-shutdown`, QEMU is told to quit in
//! its place (`Machine::shutdown`, tests only), so files can be compared on the host after
//! a restored guest "powered off".
//!
//! Never tried this way, and so never tried at all: the PowerShell itself (the workloads,
//! drive letters, the boot id, the VSS provider's removal), chkdsk, a real Windows guest's
//! shutdown, and NTFS as Windows writes it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};
use tokio::net::UnixStream;

use crate::image::qemu_img;
use crate::image::windows::cache::{BuiltImage, ImageInfo};
use crate::qemu::accel::AccelChoice;
use crate::qemu::stand_in::{self, Factory, ALLOWED_FROZEN, HOLD_LIMIT, VSS_INIT};
use crate::qemu::{Accel, DiskFormat};
use crate::scenario::{self, Report, RunOptions, Scenario};

/// Windows caps VSS's hold of writes at 10 s; after that the guest writes again by itself.
const VSS_HOLD: Duration = Duration::from_secs(10);

/// The RAM of every Windows VM run with the peer, in place of its file's 4 GiB (what a real
/// Windows Server needs): the stand-in boots no OS, and no test here is about RAM, while a
/// 4 GiB saved state costs each Saved State run two sha256 passes over 4 GiB (beside the
/// copy, and the runner's check of the backup it reopens): 10-20 s of a test's 13-28 s,
/// measured. The Linux member of a mixed set keeps its own.
const STAND_IN_RAM_MIB: u32 = 256;

/// The scripted Windows guest, shared by every machine of a run: a restored saved state
/// continues the same boot, so it keeps the boot id and the counter.
pub(super) struct Peer {
    pub(super) boot_id: String,
    pub(super) counter: u64,
    pub(super) frozen_at: Option<Instant>,
    next_pid: i64,
    exec: HashMap<i64, (i64, String, String)>,
    /// The PowerShell scripts run, in order (what the runner asked of "Windows").
    pub(super) scripts: Vec<String>,
    pub(super) freezes: u32,
    /// Files the guest reads back (`D:\\hello.txt` -> content): what the host seeded.
    pub(super) files: HashMap<String, String>,
    /// Programs other than PowerShell run, by path.
    pub(super) programs: Vec<String>,
    /// The QEMU-GA service was stopped: nothing answers any more.
    pub(super) stopped: bool,
    /// qemu-ga's VSS provider was unregistered (and the agent restarted).
    pub(super) vss_init_failed: bool,
    /// SQL Server's instance, if the "image" has one (app-hook.ps1 answers for it).
    pub(super) sql: Option<String>,
    /// The app's writer was started (rows grow on every count).
    pub(super) app_started: bool,
    rows: u64,
    /// SQL Server's freeze (3197) and resume (3198) events, at the peer's clock.
    pub(super) events: Vec<(u32, String)>,
    /// What DBCC CHECKDB says of the restored database: None for clean.
    pub(super) checkdb_says: Option<String>,
    /// The folders CHECKDB was run on.
    pub(super) checked: Vec<String>,
    tick: u64,
    /// The machine whose agent channel the current command came on.
    machine: String,
    /// What each machine's guest was asked to write to its data disk, not yet on it: the
    /// peer cannot write a disk QEMU holds, so it is written when that machine powers off
    /// (`windows_rollback_tests::power_off`).
    pub(super) pending: HashMap<String, Vec<GuestWrite>>,
    /// Machines that got `guest-shutdown`.
    pub(super) powered_off: Vec<String>,
}

/// A change the scripted guest makes to its data disk (`D:`), by path in the volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum GuestWrite {
    Create(String, String),
    Append(String, String),
    Remove(String),
    Mkdir(String),
}

impl Peer {
    pub(super) fn new() -> Self {
        Peer {
            boot_id: "6f1d2c3b-0000-4000-8000-000000000001".into(),
            counter: 0,
            frozen_at: None,
            next_pid: 4000,
            exec: HashMap::new(),
            scripts: Vec::new(),
            freezes: 0,
            files: HashMap::new(),
            programs: Vec::new(),
            stopped: false,
            vss_init_failed: false,
            sql: None,
            app_started: false,
            rows: 0,
            events: Vec::new(),
            checkdb_says: None,
            checked: Vec::new(),
            tick: 0,
            machine: String::new(),
            pending: HashMap::new(),
            powered_off: Vec::new(),
        }
    }

    /// The rollback cycle's changes (`windows_rollback::mutate_script`), as the guest would
    /// make them: recorded for this machine's data disk, written when it powers off.
    fn mutate(&mut self, script: &str) -> (i64, String, String) {
        let arg = |after: &str| -> Option<String> {
            let rest = script.split(after).nth(1)?;
            let path = rest.split('\'').next()?;
            Some(path.strip_prefix("D:\\")?.replace('\\', "/"))
        };
        let text = |after: &str| -> Option<String> {
            let rest = script.split(after).nth(1)?.split(", \"").nth(1)?;
            Some(rest.split("`n\"").next()?.to_owned() + "\n")
        };
        let writes = (|| {
            Some(vec![
                GuestWrite::Create(arg("WriteAllText('")?, text("WriteAllText(")?),
                GuestWrite::Append(arg("AppendAllText('")?, text("AppendAllText(")?),
                GuestWrite::Remove(arg("Remove-Item -LiteralPath '")?),
                GuestWrite::Mkdir(arg("New-Item -ItemType Directory -Path '")?),
            ])
        })();
        match writes {
            Some(w) => {
                self.pending.entry(self.machine.clone()).or_default().extend(w);
                (0, String::new(), String::new())
            }
            None => (1, String::new(), format!("scripted peer: cannot read the changes in {script}\r\n")),
        }
    }

    /// The guest's UTC clock, as PowerShell's `o` format prints it: one second a tick.
    fn now(&mut self) -> String {
        self.tick += 1;
        format!("2026-12-01T18:{:02}:{:02}.0000000Z", (self.tick / 60) % 60, self.tick % 60)
    }

    /// app-hook.ps1, as it answers with SQL Server installed, or without (exit 3).
    fn app_hook(&mut self, script: &str) -> (i64, String, String) {
        let action = script.split("app-hook.ps1' -Action ").nth(1).and_then(|r| r.split(' ').next()).unwrap_or("");
        let dir = script.split("-Dir '").nth(1).and_then(|r| r.split('\'').next()).unwrap_or("").to_owned();
        let Some(instance) = self.sql.clone() else {
            return match action {
                "detect" => (0, "absent\r\n".into(), String::new()),
                _ => (3, "absent: no SQL Server instance\r\n".into(), String::new()),
            };
        };
        match action {
            "detect" => (0, format!("sqlserver {instance}\r\n"), String::new()),
            "start" => {
                self.app_started = true;
                (0, format!("{}\r\n", self.now()), String::new())
            }
            "count" => {
                self.rows += 7;
                (0, format!("{}\r\n", self.rows), String::new())
            }
            "frozen" => {
                let lines: String = self
                    .events
                    .iter()
                    .rev()
                    .map(|(id, at)| {
                        let what = if *id == 3197 { "I/O is frozen on" } else { "I/O was resumed on" };
                        format!("{id} {at} {what} database quiesce. No user action is required.\r\n")
                    })
                    .collect();
                (0, lines, String::new())
            }
            "check" => {
                self.checked.push(dir);
                match &self.checkdb_says {
                    None => (0, "consistent\r\n".into(), String::new()),
                    Some(err) => (1, String::new(), format!("sqlcmd failed (1): {err}\r\n")),
                }
            }
            _ => (1, String::new(), format!("scripted peer: no app-hook action {action}\r\n")),
        }
    }

    /// What the recipe's scripts (or the inline ones) would print for `script`.
    fn powershell(&mut self, script: &str) -> (i64, String, String) {
        self.scripts.push(script.to_owned());
        let ok = |out: String| (0, out, String::new());
        if script.contains("app-hook.ps1' -Action ") {
            self.app_hook(script)
        } else if script.contains("Write-VolumeCache") && script.contains("WriteAllText(") {
            self.mutate(script)
        } else if script.contains("Get-Partition") {
            let parts = json!([{"Disk": 0, "Partition": 1, "Serial": "root", "Style": "MBR", "MbrType": 7, "GptType": null},
                               {"Disk": 0, "Partition": 2, "Serial": "root", "Style": "MBR", "MbrType": 7, "GptType": null},
                               {"Disk": 1, "Partition": 1, "Serial": "data", "Style": "MBR", "MbrType": 7, "GptType": null}]);
            ok(format!("{parts}\r\n"))
        } else if let Some(rest) = script.split("ReadAllBytes('").nth(1) {
            let file = rest.split("')").next().unwrap_or("");
            match self.files.get(file) {
                Some(content) => ok(format!("{}\r\n", base64::engine::general_purpose::STANDARD.encode(content))),
                None => {
                    (1, String::new(), format!("Exception calling \"ReadAllBytes\": Could not find file '{file}'.\r\n"))
                }
            }
        } else if script.contains("-s vss-uninstall") {
            self.vss_init_failed = true;
            ok(String::new())
        } else if script.contains("quiesce-boot") {
            ok(format!("{}\r\n", self.boot_id))
        } else if let Some(rest) = script.split("$above = ").nth(1) {
            let above: u64 = rest.split(';').next().and_then(|n| n.trim().parse().ok()).unwrap_or(0);
            self.counter = self.counter.max(above) + 1;
            ok(format!("{}\r\n", self.counter))
        } else if script.contains("counter.ps1' -Action read") {
            self.counter += 1;
            ok(format!("{}\r\n", self.counter))
        } else if script.contains("counter.ps1' -Action start")
            || script.contains("journal.ps1' -Action")
            || script.contains("Win32_Volume")
        {
            ok(String::new())
        } else {
            (1, String::new(), format!("scripted peer: no answer for this script: {script}\r\n"))
        }
    }

    fn answer(&mut self, cmd: &str, args: &Value) -> Result<Value, String> {
        if self.frozen_at.is_some() && !ALLOWED_FROZEN.contains(&cmd) {
            return Err(format!("Command {cmd} has been disabled: the command is not allowed"));
        }
        match cmd {
            "guest-ping" => Ok(json!({})),
            // The guest goes down (qemu-ga sends no reply: see `stand_in::serve`).
            "guest-shutdown" => {
                self.powered_off.push(self.machine.clone());
                Ok(json!({}))
            }
            "guest-info" => Ok(json!({"version": "109.1.0", "supported_commands": [
                {"name": "guest-fsfreeze-freeze", "enabled": true, "success-response": true},
                {"name": "guest-fsfreeze-thaw", "enabled": true, "success-response": true},
                {"name": "guest-fsfreeze-status", "enabled": true, "success-response": true}]})),
            "guest-get-fsinfo" => {
                let fs = |mnt: &str, guid: &str, serial: &str| {
                    json!({"mountpoint": mnt, "type": "NTFS",
                    "name": format!("\\\\?\\Volume{{{guid}}}\\"), "total-bytes": 64424509440u64, "used-bytes": 21474836480u64,
                    "disk": [{"bus": 0, "bus-type": "scsi", "serial": serial, "target": 0, "unit": 0,
                              "pci-controller": {"bus": 0, "domain": 0, "function": 0, "slot": 4}}]})
                };
                Ok(json!([
                    fs("C:\\", "6b1c3a2e-0000-0000-0000-200000000000", "root"),
                    fs("System Reserved", "6b1c3a2e-0000-0000-0000-100000000000", "root"),
                    fs("D:\\", "9f0e1d2c-0000-0000-0000-100000000000", "data")
                ]))
            }
            "guest-get-disks" => Ok(json!([
                {"name": "\\\\.\\PhysicalDrive0", "partition": false, "address": {"bus": 0, "bus-type": "scsi",
                 "serial": "root", "target": 0, "unit": 0, "pci-controller": {"bus": 0, "domain": 0, "function": 0, "slot": 4}}}])),
            "guest-get-osinfo" => Ok(json!({"name": "Microsoft Windows", "kernel-release": "20348",
                "version": "Microsoft Windows Server 2022", "variant": "server", "pretty-name": "Windows Server 2022 Standard Evaluation",
                "version-id": "2022", "variant-id": "server", "kernel-version": "10.0", "machine": "x86_64", "id": "mswindows"})),
            "guest-fsfreeze-status" | "guest-fsfreeze-freeze" if self.vss_init_failed => Err(VSS_INIT.into()),
            // After the 10 s hold the guest writes again, but the status still says frozen.
            "guest-fsfreeze-status" => Ok(json!(if self.frozen_at.is_some() { "frozen" } else { "thawed" })),
            "guest-fsfreeze-freeze" => {
                self.freezes += 1;
                self.frozen_at = Some(Instant::now());
                if self.app_started {
                    // SQL Server's VSS writer freezes its database with the volume.
                    let at = self.now();
                    self.events.push((3197, at));
                }
                Ok(json!(3))
            }
            "guest-fsfreeze-thaw" if self.app_started && self.frozen_at.is_some() => {
                let at = self.now();
                self.events.push((3198, at));
                self.app_started = false;
                let r = self.answer(cmd, args);
                self.app_started = true;
                r
            }
            "guest-fsfreeze-thaw" => match self.frozen_at.take() {
                // The agent resets to thawed even when it reports the hold was too long.
                Some(at) if at.elapsed() > VSS_HOLD => Err(HOLD_LIMIT.into()),
                Some(_) => Ok(json!(3)),
                None => Ok(json!(0)),
            },
            "guest-exec" => {
                let path = args["path"].as_str().unwrap_or("");
                let argv: Vec<&str> = args["arg"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
                let result = if path.ends_with("powershell.exe") {
                    let encoded = argv.iter().skip_while(|a| **a != "-EncodedCommand").nth(1).copied().unwrap_or("");
                    let bytes = base64::engine::general_purpose::STANDARD.decode(encoded).unwrap_or_default();
                    let units: Vec<u16> = bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
                    self.powershell(&String::from_utf16_lossy(&units))
                } else if path.ends_with("sc.exe") && argv == ["stop", "QEMU-GA"] {
                    // qemu-ga answers guest-exec with the pid once the process is created;
                    // sc.exe then asks the service manager to stop the service, so the reply
                    // gets out and the agent is silent from the next request on (the stand-in
                    // decides silence as each request arrives), guest-sync included.
                    self.stopped = true;
                    (0, String::new(), String::new())
                } else if path.ends_with("chkdsk.exe") {
                    self.programs.push(format!("{path} {}", argv.join(" ")));
                    let out = "The type of the file system is NTFS.\r\nWindows has scanned the file system and found no problems.\r\nNo further action is required.\r\n";
                    (0, out.to_owned(), String::new())
                } else {
                    (1, String::new(), format!("scripted peer: no program {path}"))
                };
                self.next_pid += 1;
                self.exec.insert(self.next_pid, result);
                Ok(json!({"pid": self.next_pid}))
            }
            "guest-exec-status" => {
                let pid = args["pid"].as_i64().unwrap_or(0);
                let (code, out, err) =
                    self.exec.remove(&pid).ok_or_else(|| format!("Invalid parameter 'pid' ({pid})"))?;
                let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
                Ok(json!({"exited": true, "exitcode": code, "out-data": b64(&out), "err-data": b64(&err)}))
            }
            other => Err(format!("The command {other} has not been found")),
        }
    }
}

/// A blank disk standing in for the built Windows image (SeaBIOS finds nothing to boot).
pub(super) fn blank_image(dir: &Path) -> BuiltImage {
    let disk = dir.join("disk.qcow2");
    qemu_img::create(&disk, DiskFormat::Qcow2, 64 << 20).unwrap();
    let info = ImageInfo {
        recipe_key: crate::image::windows::cache::recipe_key(),
        input_key: "0".repeat(16),
        edition: "Windows Server 2022 SERVERSTANDARD (scripted stand-in)".into(),
        build: Some(20348),
        virtio_os: "2k22".into(),
        windows_iso_sha256: String::new(),
        virtio_iso_sha256: String::new(),
        ready_line: "QUIESCE-WINDOWS-READY (scripted stand-in)".into(),
        built_at: 0,
    };
    BuiltImage { dir: dir.to_owned(), disk, info }
}

pub(super) fn windows_scenario(file: &str) -> (PathBuf, String) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios/windows").join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    (path, text)
}

/// Runs `s` through the real runner with the scripted peer standing in for every agent
/// (its Windows VMs with [`STAND_IN_RAM_MIB`] of RAM), on
/// a thread of its own with the stack the whole runner's future needs in a debug build
/// (as `quiesce run` and `tests/scenarios.rs` run it on a main thread). QEMU lives as long
/// as the thread that launched it, which is this one until the run is over.
pub(super) fn run_with_peer(s: &Scenario, peer: Arc<Mutex<Peer>>) -> (Report, tempfile::TempDir) {
    run_with_peer_but(s, peer, &[])
}

/// As [`run_with_peer`], but the machines whose names start with one of `real` (a Linux VM
/// of a mixed set, and its restore) get a real agent port: their real qemu-ga answers.
pub(super) fn run_with_peer_but(
    s: &Scenario,
    peer: Arc<Mutex<Peer>>,
    real: &'static [&'static str],
) -> (Report, tempfile::TempDir) {
    let mut s = s.clone();
    for vm in s.file.vms.iter_mut().map(|v| v.get_mut()).filter(|v| v.is_windows()) {
        *vm.memory_mib.get_mut() = STAND_IN_RAM_MIB;
    }
    std::thread::Builder::new()
        .stack_size(64 << 20)
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(run_in_scope(&s, peer, real))
        })
        .unwrap()
        .join()
        .unwrap()
}

async fn run_in_scope(
    s: &Scenario,
    peer: Arc<Mutex<Peer>>,
    real: &'static [&'static str],
) -> (Report, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let image = blank_image(dir.path());
    let power_off = super::windows_rollback_tests::power_off(peer.clone());
    let factory: Factory = Arc::new(move |machine: &str| {
        if real.iter().any(|r| machine.starts_with(r)) {
            return None;
        }
        let (harness, guest) = UnixStream::pair().ok()?;
        let (answering, asked, machine) = (peer.clone(), peer.clone(), machine.to_owned());
        let answer = move |cmd: &str, args: &Value| {
            let mut p = answering.lock().unwrap();
            p.machine = machine.clone();
            p.answer(cmd, args)
        };
        tokio::spawn(stand_in::serve(guest, answer, move || asked.lock().unwrap().stopped));
        Some(harness)
    });
    let opts = RunOptions {
        accel: Some(AccelChoice::Fixed(Accel::Tcg)),
        artifacts_dir: Some(dir.path().join("artifacts")),
        work_dir: dir.path().join("work"),
        keep_backup: false,
        interrupt: None,
    };
    let mut quiet = |_: &str| {};
    let run = scenario::run(s, &opts, &mut quiet);
    let run = stand_in::on_power_off(power_off, crate::windows::guest::with_image(image, run));
    let report = stand_in::scope(factory, run).await;
    (report, dir)
}

pub(super) fn passed(report: &Report, check: &str) -> Option<bool> {
    report.checks.iter().find(|c| c.check == check).map(|c| c.passed)
}
