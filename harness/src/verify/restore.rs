//! Restores a VM from a backup into a new QEMU. The backup's files are never written: each
//! restored disk is a qcow2 overlay over the backup's image, with its format named.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::backup::manifest::VmBackup;
use crate::backup::saved_state::Plan;
use crate::backup::Backup;
use crate::image::qemu_img::{self, QemuImgError};
use crate::qemu::{DiskConfig, DiskFormat, KernelBoot, Machine, MachineConfig, MachineError};
use crate::timeline::Timeline;

const T: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("backup {backup} has no VM named {vm}")]
    NoSuchVm { backup: PathBuf, vm: String },
    #[error("VM {vm} in backup {backup} has no saved state to restore")]
    NoState { backup: PathBuf, vm: String },
    #[error("restoring VM {vm}: {step}: {error}")]
    Machine { vm: String, step: String, error: MachineError },
    #[error("restoring VM {vm}: the incoming migration ended {status}: {desc}")]
    Incoming { vm: String, status: String, desc: String },
    #[error("restoring VM {vm}, disk {disk}: {error}")]
    Image { vm: String, disk: String, error: QemuImgError },
    #[error("restoring VM {vm}: {0}", vm = .1)]
    Io(std::io::Error, String),
}

#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// The restored machine's name (files, logs).
    pub name: String,
    pub artifacts_dir: Option<PathBuf>,
    pub incoming_deadline: Duration,
    /// Resume a VM that was running at backup time. Off, the caller inspects the restored
    /// VM first and resumes it with [`resume`].
    pub resume: bool,
}

impl RestoreOptions {
    pub fn named(name: &str) -> Self {
        Self { name: name.to_owned(), artifacts_dir: None, incoming_deadline: Duration::from_secs(300), resume: true }
    }
}

/// Continues a restored VM and waits for it to run.
pub async fn resume(m: &Machine) -> Result<(), RestoreError> {
    let merr = |step: &str, error| RestoreError::Machine { vm: m.name().to_owned(), step: step.to_owned(), error };
    crate::backup::runstate::settle(m, T).await.map_err(|e| merr("query-status", e))?;
    m.qmp().execute_raw("cont", Value::Null, T).await.map_err(|e| merr("cont", m.qmp_err(e)))?;
    m.qmp().wait_event("RESUME", |_| true, T).await.map_err(|e| merr("wait for RESUME", m.qmp_err(e)))?;
    Ok(())
}

pub struct Restored {
    // Drop order: QEMU before the folder holding its overlays.
    pub machine: Machine,
    pub restore_ms: f64,
    /// The restored disks, as (node name, overlay path).
    pub disks: Vec<(String, PathBuf)>,
    _disk_dir: tempfile::TempDir,
}

/// Starts a machine configured like `vm` at backup time, on overlays over the backup's disks.
async fn launch_like(
    backup: &Backup,
    vm: &VmBackup,
    opts: &RestoreOptions,
    incoming: bool,
) -> Result<(Machine, Vec<(String, PathBuf)>, tempfile::TempDir), RestoreError> {
    let io = |e| RestoreError::Io(e, vm.name.clone());
    let vm_dir = backup.vm_dir(&vm.name);
    let disk_dir = tempfile::Builder::new().prefix(&format!("quiesce-{}-restore-", opts.name)).tempdir().map_err(io)?;
    let spec = &vm.machine;
    let boot = KernelBoot {
        kernel: vm_dir.join(&spec.kernel),
        initrd: vm_dir.join(&spec.initrd),
        append: spec.append.clone(),
    };
    let mut cfg = MachineConfig::new(&opts.name, spec.accel, boot);
    cfg.machine_type = spec.machine_type.clone();
    cfg.memory_mib = spec.memory_mib;
    cfg.cpus = spec.cpus;
    cfg.agent = spec.agent;
    cfg.incoming_defer = incoming;
    // Stopped vCPUs: a saved state is loaded into them, and a disk-only restore can be
    // inspected before the guest writes anything.
    cfg.start_paused = true;
    if let Some(d) = &opts.artifacts_dir {
        cfg.artifacts_dir = d.clone();
    }
    let mut disks = Vec::new();
    for d in &vm.disks {
        let overlay = disk_dir.path().join(format!("{}.qcow2", d.node_name));
        qemu_img::create_overlay(&vm_dir.join(&d.file), d.format, &overlay).map_err(|error| RestoreError::Image {
            vm: vm.name.clone(),
            disk: d.node_name.clone(),
            error,
        })?;
        cfg.disks.push(DiskConfig {
            node_name: d.node_name.clone(),
            path: overlay.clone(),
            format: DiskFormat::Qcow2,
            read_only: false,
        });
        disks.push((d.node_name.clone(), overlay));
    }
    // The disks the host could not back up come back blank, so the devices match.
    for x in &vm.excluded {
        let blank = disk_dir.path().join(format!("{}.blank.qcow2", x.node_name));
        qemu_img::create(&blank, DiskFormat::Qcow2, x.virtual_size).map_err(|error| RestoreError::Image {
            vm: vm.name.clone(),
            disk: x.node_name.clone(),
            error,
        })?;
        cfg.disks.push(DiskConfig {
            node_name: x.node_name.clone(),
            path: blank,
            format: DiskFormat::Qcow2,
            read_only: false,
        });
    }
    let order = &spec.disk_order;
    cfg.disks.sort_by_key(|d| order.iter().position(|n| n == &d.node_name).unwrap_or(usize::MAX));
    let m = Machine::launch(cfg).await.map_err(|error| RestoreError::Machine {
        vm: vm.name.clone(),
        step: "launch".into(),
        error,
    })?;
    Ok((m, disks, disk_dir))
}

fn find<'a>(backup: &'a Backup, vm: &str) -> Result<&'a VmBackup, RestoreError> {
    backup.vm(vm).ok_or_else(|| RestoreError::NoSuchVm { backup: backup.path.clone(), vm: vm.to_owned() })
}

/// How long a restored VM booting from its backup has to bring its agent up.
pub const BOOT_DEADLINE: Duration = Duration::from_secs(90);

/// Restores a disk-only (Child VM Snapshot) backup: a new VM on the backed-up disks, the
/// backed-up root disk itself included. With `opts.resume` it boots and its agent is
/// awaited; without, it is left before its first instruction. Nothing from the guest that
/// made the backup helps: this is the auto-recoverable test.
pub async fn boot(
    backup: &Backup,
    vm_name: &str,
    opts: &RestoreOptions,
    tl: &Timeline,
) -> Result<Restored, RestoreError> {
    let vm = find(backup, vm_name)?;
    let started = Instant::now();
    let (mut m, disks, disk_dir) =
        tl.step(Some(&opts.name), "launch from the backup's disks", launch_like(backup, vm, opts, false)).await?;
    if opts.resume {
        tl.step(Some(&opts.name), "boot until the agent answers", async {
            resume(&m).await?;
            m.wait_agent(BOOT_DEADLINE).await.map_err(|error| RestoreError::Machine {
                vm: vm.name.clone(),
                step: "boot".into(),
                error,
            })
        })
        .await?;
    }
    Ok(Restored { machine: m, restore_ms: started.elapsed().as_secs_f64() * 1000.0, disks, _disk_dir: disk_dir })
}

/// Restores a Saved State backup: same machine, the saved RAM and device state, and the
/// run state it had (a running VM resumes, a paused one stays paused).
pub async fn saved_state(
    backup: &Backup,
    vm_name: &str,
    opts: &RestoreOptions,
    tl: &Timeline,
) -> Result<Restored, RestoreError> {
    let vm = find(backup, vm_name)?;
    let state = vm
        .state
        .as_ref()
        .ok_or_else(|| RestoreError::NoState { backup: backup.path.clone(), vm: vm_name.to_owned() })?;
    let started = Instant::now();
    let (m, disks, disk_dir) =
        tl.step(Some(&opts.name), "launch restore target", launch_like(backup, vm, opts, true)).await?;
    let merr =
        |step: &str, error: MachineError| RestoreError::Machine { vm: vm.name.clone(), step: step.to_owned(), error };
    Plan::from_state(state).apply(&m, None).await.map_err(|e| RestoreError::Incoming {
        vm: vm.name.clone(),
        status: "not started".into(),
        desc: e.to_string(),
    })?;
    let path = backup.vm_dir(&vm.name).join(&state.file);
    tl.step(Some(&opts.name), "load state (incoming migration)", async {
        m.qmp()
            .execute_raw("migrate-incoming", json!({"uri": format!("file:{}", path.display())}), T)
            .await
            .map_err(|e| merr("migrate-incoming", m.qmp_err(e)))?;
        let ev = m
            .qmp()
            .wait_event(
                "MIGRATION",
                |d| matches!(d["status"].as_str(), Some("completed" | "failed" | "cancelled")),
                opts.incoming_deadline,
            )
            .await
            .map_err(|e| merr("wait for the state to load", m.qmp_err(e)))?;
        if ev.data["status"] != "completed" {
            let info = m.qmp().execute_raw("query-migrate", Value::Null, T).await.unwrap_or(Value::Null);
            return Err(RestoreError::Incoming {
                vm: vm.name.clone(),
                status: ev.data["status"].as_str().unwrap_or("?").to_owned(),
                desc: info["error-desc"].as_str().unwrap_or("QEMU gave no reason").to_owned(),
            });
        }
        Ok(())
    })
    .await?;
    if opts.resume && vm.run_state_before == "running" {
        tl.step(Some(&opts.name), "resume", resume(&m)).await?;
    }
    Ok(Restored { machine: m, restore_ms: started.elapsed().as_secs_f64() * 1000.0, disks, _disk_dir: disk_dir })
}
