//! A Windows guest's agent, replayed by a scripted peer, against the REAL conditions,
//! Child VM Snapshot method and backup-set code, with a REAL QEMU doing the block work
//! (overlays, the transaction, the copy, the active commit) and the save.
//!
//! This is the one place where a scripted peer stands in for a guest: no Windows guest can
//! run here (no image, and a PVM host whose KVM cannot run one). The peer answers with the
//! replies and error texts of qemu-ga 10.0.2's Windows build as `shared/design/windows.md`
//! records them from its source: volume GUID names and `System Reserved` in
//! guest-get-fsinfo, `mswindows` in guest-get-osinfo, a VSS freeze that counts the
//! unlettered volume too, the 10 s hold's thaw error, VSS failing to initialise, freeze-list
//! refusing an invalid entry, and commands disabled while frozen. None of it was seen from
//! a live Windows guest. The QEMU under it boots no OS: SeaBIOS finds no bootable disk and
//! waits, which leaves a running VM whose disks QEMU serves.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use serde_json::{json, Value};
use tokio::net::UnixStream;
use tokio::sync::Notify;

use super::child_snapshot::SnapshotSettings;
use super::conditions::{Condition, Outcome};
use super::job::MethodChoice;
use super::saved_state::SaveSettings;
use super::set::{self, Member, SetError, UndoStep, Undone};
use super::vss::{self, FreezeListError, VssFailure};
use super::{BackupError, Faults, Method};
use crate::image::qemu_img;
use crate::interrupt::Interrupt;
use crate::qemu::stand_in::{self, ALLOWED_FROZEN, HOLD_LIMIT, VSS_INIT};
use crate::qemu::{caps, Accel, DiskConfig, DiskFormat, GuestAgent, KernelBoot, Machine, MachineConfig, Transcript};
use crate::timeline::Timeline;

const SYSTEM_RESERVED: &str = "\\\\?\\Volume{6b1c3a2e-0000-0000-0000-100000000000}\\";

/// What the scripted Windows agent does; changed by each test before it runs.
#[derive(Default)]
struct Script {
    vss_init_failed: bool,
    freeze_error: Option<&'static str>,
    thaw_errors: VecDeque<&'static str>,
    frozen: bool,
    freezes: u32,
    thaws: u32,
}

fn fs(mnt: &str, name: &str, serial: &str) -> Value {
    json!({"mountpoint": mnt, "type": "NTFS", "name": name, "total-bytes": 64424509440u64, "used-bytes": 21474836480u64,
           "disk": [{"bus": 0, "bus-type": "scsi", "serial": serial, "target": 0, "unit": 0,
                     "pci-controller": {"bus": 0, "domain": 0, "function": 0, "slot": 4}}]})
}

impl Script {
    /// The agent's answer to one command: Ok(return value) or Err(error text).
    fn answer(&mut self, cmd: &str, args: &Value) -> Result<Value, String> {
        if self.frozen && !ALLOWED_FROZEN.contains(&cmd) {
            return Err(format!("Command {cmd} has been disabled: the command is not allowed"));
        }
        match cmd {
            "guest-ping" => Ok(json!({})),
            "guest-info" => Ok(json!({"version": "109.1.0", "supported_commands": [
                {"name": "guest-fsfreeze-freeze", "enabled": true, "success-response": true},
                {"name": "guest-fsfreeze-freeze-list", "enabled": true, "success-response": true},
                {"name": "guest-fsfreeze-thaw", "enabled": true, "success-response": true},
                {"name": "guest-fsfreeze-status", "enabled": true, "success-response": true}]})),
            "guest-get-fsinfo" => Ok(json!([
                fs("C:\\", "\\\\?\\Volume{6b1c3a2e-0000-0000-0000-200000000000}\\", "root"),
                fs("System Reserved", SYSTEM_RESERVED, "root"),
                fs("D:\\", "\\\\?\\Volume{9f0e1d2c-0000-0000-0000-100000000000}\\", "data"),
            ])),
            "guest-get-disks" => Ok(json!([
                {"name": "\\\\.\\PhysicalDrive0", "partition": false,
                 "address": {"bus": 0, "bus-type": "scsi", "serial": "root", "target": 0, "unit": 0,
                             "pci-controller": {"bus": 0, "domain": 0, "function": 0, "slot": 4}}},
                {"name": "\\\\.\\PhysicalDrive1", "partition": false,
                 "address": {"bus": 0, "bus-type": "scsi", "serial": "data", "target": 0, "unit": 0,
                             "pci-controller": {"bus": 0, "domain": 0, "function": 0, "slot": 5}}},
            ])),
            "guest-get-osinfo" => Ok(json!({"name": "Microsoft Windows", "kernel-release": "20348",
                "version": "Microsoft Windows Server 2022", "variant": "server", "pretty-name": "Windows Server 2022 Standard Evaluation",
                "version-id": "2022", "variant-id": "server", "kernel-version": "10.0", "machine": "x86_64", "id": "mswindows"})),
            "guest-fsfreeze-status" if self.vss_init_failed => Err(VSS_INIT.into()),
            "guest-fsfreeze-status" => Ok(json!(if self.frozen { "frozen" } else { "thawed" })),
            "guest-exec" => Ok(json!({"pid": 4242})),
            "guest-exec-status" => {
                let parts = json!([{"Disk": 0, "Partition": 1, "Serial": "root", "Style": "MBR", "MbrType": 7, "GptType": null},
                                   {"Disk": 0, "Partition": 2, "Serial": "root", "Style": "MBR", "MbrType": 7, "GptType": null},
                                   {"Disk": 1, "Partition": 1, "Serial": "data", "Style": "MBR", "MbrType": 7, "GptType": null}]);
                let out = base64::engine::general_purpose::STANDARD.encode(format!("{parts}\r\n"));
                Ok(json!({"exited": true, "exitcode": 0, "out-data": out}))
            }
            "guest-fsfreeze-freeze" | "guest-fsfreeze-freeze-list" if self.vss_init_failed => Err(VSS_INIT.into()),
            "guest-fsfreeze-freeze" => {
                self.freezes += 1;
                // A failed freeze is thawed by the agent itself before it answers.
                if let Some(e) = self.freeze_error {
                    return Err(e.into());
                }
                self.frozen = true;
                // C:\, D:\ and the unlettered System Reserved: more than the lettered drives.
                Ok(json!(3))
            }
            "guest-fsfreeze-freeze-list" => {
                let names: Vec<String> = serde_json::from_value(args["mountpoints"].clone()).unwrap_or_default();
                if let Some(bad) = names.iter().find(|n| !["C:\\", "D:\\", SYSTEM_RESERVED].contains(&n.as_str())) {
                    return Err(format!(
                        "failed to add {bad} to snapshot set: The parameter is incorrect. (0x80070057)"
                    ));
                }
                self.frozen = true;
                Ok(json!(names.len()))
            }
            "guest-fsfreeze-thaw" => {
                let was = std::mem::replace(&mut self.frozen, false);
                self.thaws += 1;
                match (was, self.thaw_errors.pop_front()) {
                    // The agent resets to thawed even when it reports the hold was too long.
                    (true, Some(e)) => Err(e.into()),
                    (true, None) => Ok(json!(3)),
                    (false, _) => Ok(json!(0)),
                }
            }
            other => Err(format!("The command {other} has not been found")),
        }
    }
}

struct Fixture {
    machine: Machine,
    script: Arc<Mutex<Script>>,
    frozen: Arc<Notify>,
    dir: tempfile::TempDir,
}

/// A running QEMU (SeaBIOS, no OS) with a root and a data disk, and the scripted agent.
async fn windows_vm(name: &str, script: Script) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let disk = |n: &str| {
        let p = dir.path().join(format!("{n}.qcow2"));
        qemu_img::create(&p, DiskFormat::Qcow2, 64 << 20).unwrap();
        DiskConfig { node_name: n.into(), path: p, format: DiskFormat::Qcow2, read_only: false }
    };
    let mut cfg = MachineConfig::new(name, Accel::Tcg, KernelBoot::firmware());
    cfg.memory_mib = 128;
    cfg.agent = false;
    cfg.artifacts_dir = dir.path().join("artifacts");
    cfg.disks = vec![disk("root"), disk("data")];
    let mut machine = Machine::launch(cfg).await.expect("QEMU starts");
    let (client, server) = UnixStream::pair().unwrap();
    let transcript = Transcript::create(&dir.path().join("agent-transcript.log")).unwrap();
    machine.attach_scripted_agent(GuestAgent::new(client, transcript));
    let script = Arc::new(Mutex::new(script));
    let frozen = Arc::new(Notify::new());
    let (peer, notify) = (script.clone(), frozen.clone());
    let answer = move |cmd: &str, args: &Value| {
        let answer = peer.lock().unwrap().answer(cmd, args);
        if peer.lock().unwrap().frozen {
            notify.notify_one();
        }
        answer
    };
    tokio::spawn(stand_in::serve(server, answer, || false));
    Fixture { machine, script, frozen, dir }
}

fn member<'a>(m: &'a Machine, dir: &Path, faults: Faults) -> Member<'a> {
    let mut snapshot = SnapshotSettings::new(dir);
    (snapshot.freeze_deadline, snapshot.thaw_deadline) = (Duration::from_secs(20), Duration::from_secs(20));
    Member {
        machine: m,
        method: MethodChoice::Auto,
        snapshot,
        save: SaveSettings::default(),
        declared_iscsi: vec![],
        faults,
        journal: None,
    }
}

/// The nodes attached to the VM's devices now: no overlay may be left on any path.
async fn attached(m: &Machine) -> Vec<String> {
    let blocks = m.qmp().execute(qapi::qmp::query_block {}).await.unwrap();
    blocks.into_iter().filter_map(|b| b.inserted?.node_name).collect()
}

#[tokio::test]
async fn a_windows_vm_is_backed_up_by_vss_and_freeze_list_refuses_a_bad_volume() {
    let f = windows_vm("win-vss-ok", Script::default()).await;
    let caps = caps::probe(&crate::qemu::config::default_qemu_binary()).await.unwrap();
    let tl = Timeline::new();
    let out = set::run(
        &[member(&f.machine, f.dir.path(), Faults::default())],
        &caps,
        &f.dir.path().join("backup"),
        &tl,
        &Interrupt::new(),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let (_, choice) = &out.choices[0];
    assert_eq!(choice.method, Method::ChildSnapshot, "{}", choice.reason);
    let reason = |c: Condition| choice.conditions.iter().find(|v| v.condition == c).unwrap().reason.clone();
    assert_eq!(reason(Condition::AgentCanFreeze), "qemu-ga 109.1.0 answers and can freeze and thaw; VSS is ready");
    assert!(reason(Condition::BasicDisksOnly).ends_with("; no dynamic disks in the Windows guest"));
    assert!(reason(Condition::FilesystemsSupportSnapshots).contains("System Reserved (NTFS)"));
    assert!(reason(Condition::GuestOsSupported).contains("Windows Server 2022"));
    let vb = &out.backup.manifest.vms[0];
    assert_eq!(vb.disks.iter().map(|d| d.node_name.as_str()).collect::<Vec<_>>(), ["root", "data"]);
    assert!(vb.machine.kernel.is_empty(), "a firmware boot keeps no kernel in the backup");
    assert_eq!(attached(&f.machine).await, ["root", "data"]);
    {
        let s = f.script.lock().unwrap();
        assert_eq!((s.freezes, s.thaws, s.frozen), (1, 1, false));
    }

    // guest-fsfreeze-freeze-list takes C:\ names and volume GUID paths; one bad entry fails
    // the whole command, in the agent's words, and nothing stays frozen.
    let agent = f.machine.agent().unwrap();
    let names = [vss::freeze_list_name("C:", ""), vss::freeze_list_name("System Reserved", SYSTEM_RESERVED)];
    assert_eq!(vss::freeze_list(agent, &names, Duration::from_secs(20)).await.unwrap(), 2);
    agent.execute_raw("guest-fsfreeze-thaw", Value::Null, Duration::from_secs(20)).await.unwrap();
    let bad = ["C:\\".to_owned(), "X:\\".to_owned()];
    match vss::freeze_list(agent, &bad, Duration::from_secs(20)).await {
        Err(FreezeListError::Vss(e)) => {
            assert_eq!((e.failure, e.volume.as_deref()), (VssFailure::AddVolume, Some("X:\\")));
            assert!(e.text.starts_with("failed to add X:\\ to snapshot set"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    assert!(!f.script.lock().unwrap().frozen);
}

#[tokio::test]
async fn a_thaw_past_the_10_s_hold_fails_the_set_and_commands_are_disabled_while_frozen() {
    let script = Script { thaw_errors: VecDeque::from([HOLD_LIMIT]), ..Default::default() };
    let f = windows_vm("win-hold", script).await;
    let caps = caps::probe(&crate::qemu::config::default_qemu_binary()).await.unwrap();
    let tl = Timeline::new();
    // The host keeps the guest frozen a while (as a slow transaction would); meanwhile a
    // guest-exec is refused, as qemu-ga refuses it while frozen.
    let faults = Faults { hold_frozen_for: Some(Duration::from_millis(1500)), ..Default::default() };
    let members = [member(&f.machine, f.dir.path(), faults)];
    let agent = f.machine.agent().unwrap();
    let probe = async {
        f.frozen.notified().await;
        crate::qemu::winexec::run(
            agent,
            "C:\\Windows\\System32\\cmd.exe",
            &["/c", "ver"],
            None,
            Duration::from_secs(10),
        )
        .await
    };
    let (path, interrupt) = (f.dir.path().join("backup"), Interrupt::new());
    let (result, refused) = tokio::join!(set::run(&members, &caps, &path, &tl, &interrupt), probe);
    match refused {
        Err(crate::qemu::winexec::WinExecError::Agent { source, .. }) => {
            assert_eq!(
                vss::disabled_while_frozen(&source).map(|d| d.command).as_deref(),
                Some("guest-exec"),
                "{source}"
            );
        }
        other => panic!("guest-exec while frozen: {other:?}"),
    }
    match result {
        Err(SetError::Failed { phase, error, undone, .. }) => {
            assert_eq!(phase, "PrepareForSnapshot");
            match *error {
                BackupError::Vss { error: e, .. } => {
                    assert_eq!(e.failure, VssFailure::HoldLimitExceeded);
                    assert_eq!(e.text, HOLD_LIMIT);
                }
                other => panic!("{other}"),
            }
            let (_, what) = &undone[0];
            assert!(
                matches!(what, Undone::PutBack { steps, .. } if steps == &[UndoStep::ThawedAndMergedByItsOwnUndo]),
                "{what}"
            );
        }
        Ok(_) => panic!("a snapshot past the 10 s hold must fail"),
        Err(e) => panic!("{e}"),
    }
    // All or nothing: no backup, the VM back on its own disks, no overlay left, thawed.
    assert!(!f.dir.path().join("backup").join("manifest.json").exists());
    assert_eq!(attached(&f.machine).await, ["root", "data"]);
    assert!(std::fs::read_dir(f.dir.path())
        .unwrap()
        .flatten()
        .all(|e| !e.file_name().to_string_lossy().contains("overlay")));
    assert!(!f.script.lock().unwrap().frozen);
}

#[tokio::test]
async fn vss_that_failed_to_initialise_falls_back_to_saved_state_in_the_agents_words() {
    let f = windows_vm("win-novss", Script { vss_init_failed: true, ..Default::default() }).await;
    let caps = caps::probe(&crate::qemu::config::default_qemu_binary()).await.unwrap();
    let tl = Timeline::new();
    let out = set::run(
        &[member(&f.machine, f.dir.path(), Faults::default())],
        &caps,
        &f.dir.path().join("backup"),
        &tl,
        &Interrupt::new(),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let (_, choice) = &out.choices[0];
    assert_eq!(choice.method, Method::SavedState);
    let agent = choice.conditions.iter().find(|v| v.condition == Condition::AgentCanFreeze).unwrap();
    assert_eq!(agent.outcome, Outcome::Failed);
    assert!(
        agent.reason.ends_with("the agent said: fsfreeze not possible as VSS failed to initialize"),
        "{}",
        agent.reason
    );
    assert!(
        choice.reason.starts_with("fell back to Saved State: agent-can-freeze: VSS cannot be used"),
        "{}",
        choice.reason
    );
    assert!(out.backup.manifest.vms[0].state.is_some(), "a saved state was taken");
    assert_eq!(f.script.lock().unwrap().freezes, 0, "nothing was frozen");
    let status = f.machine.qmp().execute(qapi::qmp::query_status {}).await.unwrap();
    assert!(status.running, "the VM runs on after its save");
}

#[tokio::test]
async fn a_vss_writer_that_fails_the_freeze_is_reported_in_the_agents_words() {
    let text = "failed to gather writer metadata: The writer did not respond. (0x800423f3)";
    let f = windows_vm("win-writer", Script { freeze_error: Some(text), ..Default::default() }).await;
    let caps = caps::probe(&crate::qemu::config::default_qemu_binary()).await.unwrap();
    let tl = Timeline::new();
    let err = set::run(
        &[member(&f.machine, f.dir.path(), Faults::default())],
        &caps,
        &f.dir.path().join("backup"),
        &tl,
        &Interrupt::new(),
    )
    .await
    .expect_err("the freeze fails");
    let SetError::Failed { error, .. } = &err else { panic!("{err}") };
    let BackupError::Vss { error: e, step, .. } = error.as_ref() else { panic!("{err}") };
    assert_eq!(
        (e.failure, e.text.as_str(), step.as_str()),
        (VssFailure::GatherWriterMetadata, text, "guest-fsfreeze-freeze")
    );
    assert!(err.to_string().contains(&format!("a VSS writer did not answer: the agent said: {text}")), "{err}");
    assert_eq!(attached(&f.machine).await, ["root", "data"]);
}
