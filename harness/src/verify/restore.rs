//! Restores a VM from a backup: into a new QEMU ([`boot`], [`saved_state`]), where the
//! backup's files are never written (each restored disk is a qcow2 overlay over the
//! backup's image, with its format named); or in place ([`in_place`]), where the backup's
//! disk contents are written back onto the VM's own disk files and the VM is started again
//! on them.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use qapi::qmp::{query_migrate, MigrationStatus};
use qapi::Enum;
use serde_json::{json, Value};

use crate::backup::manifest::{Entry, Method, StateEntry, VmBackup};
use crate::backup::runstate::Activity;
use crate::backup::saved_state::{migration_ended, migration_status, Plan};
use crate::backup::{Backup, FolderError};
use crate::image::qemu_img::{self, qemu_img, QemuImgError};
use crate::qemu::locks::held_for_writing;
use crate::qemu::{DiskConfig, DiskFormat, KernelBoot, Machine, MachineConfig, MachineError};
use crate::sys::deadline;
use crate::timeline::Timeline;

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The backup holds no VM of that name.
    #[error("backup {backup} has no VM named {vm}")]
    NoSuchVm { backup: PathBuf, vm: String },
    /// A file the backup names is refused (its path would lead outside the backup's folder)
    /// or is missing; nothing was started or written.
    #[error(transparent)]
    Backup(#[from] FolderError),
    /// The VM was backed up by Child VM Snapshot (disks only): there is no saved state to
    /// load; boot it instead.
    #[error("VM {vm} in backup {backup} has no saved state to restore")]
    NoState { backup: PathBuf, vm: String },
    /// The restored machine failed at `step` (launch, boot, a QMP command).
    #[error("restoring VM {vm}: {step}: {error}")]
    Machine { vm: String, step: String, error: MachineError },
    /// QEMU could not load the saved state; `desc` is QEMU's reason.
    #[error("restoring VM {vm}: the incoming migration ended {status}: {desc}")]
    Incoming { vm: String, status: String, desc: String },
    /// An overlay over a backed-up disk (or a blank disk for an excluded one) could not be
    /// made.
    #[error("restoring VM {vm}, disk {disk}: {error}")]
    Image { vm: String, disk: String, error: QemuImgError },
    /// A folder for the restored disks could not be made, or a host task failed.
    #[error("restoring VM {vm}: {0}", vm = .1)]
    Io(std::io::Error, String),
    /// The VM to restore in place does not have the disks the backup holds (checked before
    /// anything is written).
    #[error("restoring VM {vm} in place: {why}")]
    InPlaceTarget { vm: String, why: String },
    /// Writing a backed-up disk back onto the VM's own disk file failed.
    #[error(
        "restoring VM {vm} in place: writing the backup's disk {disk} onto {path} failed: {error}{hint}\n{}",
        written_text(.written)
    )]
    InPlaceWrite { vm: String, disk: String, path: PathBuf, error: QemuImgError, hint: String, written: Vec<String> },
}

fn written_text(written: &[String]) -> String {
    if written.is_empty() {
        "no disk of the VM was changed".into()
    } else {
        format!("disks already written back (the VM's disks are now mixed): {}", written.join(", "))
    }
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
        Self {
            name: name.to_owned(),
            artifacts_dir: None,
            incoming_deadline: deadline::STATE_FILE_MIGRATION,
            resume: true,
        }
    }
}

/// Continues a restored VM and waits for it to run.
pub async fn resume(m: &Machine) -> Result<(), RestoreError> {
    let merr = |step: &str, error| RestoreError::Machine { vm: m.name().to_owned(), step: step.to_owned(), error };
    crate::backup::runstate::settle(m, deadline::QMP_COMMAND).await.map_err(|e| merr("query-status", e))?;
    m.qmp().execute_raw("cont", Value::Null, deadline::QMP_COMMAND).await.map_err(|e| merr("cont", m.qmp_err(e)))?;
    m.qmp()
        .wait_event("RESUME", |_| true, deadline::COMMAND_EVENT)
        .await
        .map_err(|e| merr("wait for RESUME", m.qmp_err(e)))?;
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
    let disk_dir = tempfile::Builder::new().prefix(&format!("quiesce-{}-restore-", opts.name)).tempdir().map_err(io)?;
    let spec = &vm.machine;
    // No kernel in the backup: the VM boots its own disk through the firmware (Windows).
    // Otherwise every path is checked again as it is used: the manifest is input from elsewhere.
    let boot = if spec.kernel.is_empty() {
        KernelBoot::firmware()
    } else {
        KernelBoot {
            kernel: backup.file_path(&vm.name, &Entry::Kernel, &spec.kernel)?,
            initrd: backup.file_path(&vm.name, &Entry::Initrd, &spec.initrd)?,
            append: spec.append.clone(),
        }
    };
    let mut cfg = MachineConfig::new(&opts.name, spec.accel, boot);
    cfg.machine_type = spec.machine_type.clone();
    cfg.memory_mib = spec.memory_mib;
    cfg.cpus = spec.cpus;
    cfg.agent = spec.agent;
    let mut disks = Vec::new();
    for d in &vm.disks {
        let overlay = disk_dir.path().join(format!("{}.qcow2", d.node_name));
        let image = backup.file_path(&vm.name, &Entry::Disk(d.node_name.clone()), &d.file)?;
        qemu_img::create_overlay(&image, d.format, &overlay).map_err(|error| RestoreError::Image {
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
    let m = start(cfg, &vm.name, opts, incoming).await?;
    Ok((m, disks, disk_dir))
}

/// Launches a restore's QEMU from `cfg`, with its vCPUs stopped: a saved state is loaded
/// into them (`incoming`), and a disk-only restore can be inspected before the guest writes
/// anything.
async fn start(
    mut cfg: MachineConfig,
    vm: &str,
    opts: &RestoreOptions,
    incoming: bool,
) -> Result<Machine, RestoreError> {
    cfg.incoming_defer = incoming;
    cfg.start_paused = true;
    if let Some(d) = &opts.artifacts_dir {
        cfg.artifacts_dir = d.clone();
    }
    Machine::launch(cfg).await.map_err(|error| RestoreError::Machine {
        vm: vm.to_owned(),
        step: "launch".into(),
        error,
    })
}

/// Runs a machine started before its first instruction until its guest agent answers.
async fn boot_until_agent(m: &mut Machine, vm: &str, opts: &RestoreOptions, tl: &Timeline) -> Result<(), RestoreError> {
    tl.step(Some(&opts.name), "boot until the agent answers", async {
        resume(m).await?;
        m.wait_agent(deadline::boot_to_agent()).await.map_err(|error| RestoreError::Machine {
            vm: vm.to_owned(),
            step: "boot".into(),
            error,
        })
    })
    .await
}

/// Loads `vm`'s saved state into `m` (launched waiting for an incoming migration) and, with
/// `opts.resume`, resumes it if it was running at backup time.
async fn load_state(
    m: &Machine,
    backup: &Backup,
    vm: &VmBackup,
    state: &StateEntry,
    opts: &RestoreOptions,
    tl: &Timeline,
) -> Result<(), RestoreError> {
    let merr =
        |step: &str, error: MachineError| RestoreError::Machine { vm: vm.name.clone(), step: step.to_owned(), error };
    Plan::from_state(state).apply(m, None).await.map_err(|e| RestoreError::Incoming {
        vm: vm.name.clone(),
        status: "not started".into(),
        desc: e.to_string(),
    })?;
    let path = backup.file_path(&vm.name, &Entry::State, &state.file)?;
    tl.step(Some(&opts.name), "load state (incoming migration)", async {
        m.qmp()
            .execute_raw("migrate-incoming", json!({"uri": format!("file:{}", path.display())}), deadline::QMP_COMMAND)
            .await
            .map_err(|e| merr("migrate-incoming", m.qmp_err(e)))?;
        let ev = m
            .qmp()
            .wait_event("MIGRATION", migration_ended, opts.incoming_deadline)
            .await
            .map_err(|e| merr("wait for the state to load", m.qmp_err(e)))?;
        match migration_status(&ev.data) {
            Some(MigrationStatus::completed) => Ok(()),
            ended => {
                let info = m.qmp().execute_within(query_migrate {}, deadline::QMP_COMMAND).await.ok();
                Err(RestoreError::Incoming {
                    vm: vm.name.clone(),
                    status: ended.map_or("?", |s| s.name()).to_owned(),
                    desc: info.and_then(|i| i.error_desc).unwrap_or_else(|| "QEMU gave no reason".to_owned()),
                })
            }
        }
    })
    .await?;
    if opts.resume && vm.run_state_before == Activity::Running {
        tl.step(Some(&opts.name), "resume", resume(m)).await?;
    }
    Ok(())
}

fn find<'a>(backup: &'a Backup, vm: &str) -> Result<&'a VmBackup, RestoreError> {
    backup.vm(vm).ok_or_else(|| RestoreError::NoSuchVm { backup: backup.path.clone(), vm: vm.to_owned() })
}

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
        boot_until_agent(&mut m, &vm.name, opts, tl).await?;
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
    load_state(&m, backup, vm, state, opts, tl).await?;
    Ok(Restored { machine: m, restore_ms: started.elapsed().as_secs_f64() * 1000.0, disks, _disk_dir: disk_dir })
}

/// A VM restored in place: started again on its own disk files, which hold the backup's
/// content again.
pub struct RestoredInPlace {
    pub machine: Machine,
    /// From the first disk write until the machine was started (and, with `opts.resume`,
    /// booted or resumed).
    pub restore_ms: f64,
    /// The disks written back: the VM's own files, each in its own format.
    pub disks: Vec<DiskConfig>,
    /// How the backup was made, so how the VM was started: a fresh boot (Child VM
    /// Snapshot) or its saved state (Saved State).
    pub method: Method,
}

/// Restores VM `vm_name` of `backup` in place, onto the disks of `target`: the VM's own
/// configuration, whose QEMU must have stopped. Every backed-up disk's content is written
/// back onto the VM's disk file of the same node name (the file keeps its path, its format
/// and, for an overlay, its backing file), and the VM is started again as `opts.name` with
/// `target`'s configuration: from its first instruction for a disk-only (Child VM Snapshot)
/// backup, or by loading the saved state (Saved State) into it.
///
/// With `opts.resume`, a disk-only restore boots until its agent answers and a saved state
/// resumes if it was running at backup time; without, the VM is left stopped, so its disks
/// can be checked against the backup before the guest runs (then [`resume`] it, and for a
/// fresh boot wait for its agent).
///
/// Nothing is written unless every backed-up disk has its counterpart in `target`, in the
/// same format (and, for a saved state, the machine matches the one saved). Disks the backup
/// left out (pass-through, iSCSI) are not touched. qemu-img takes QEMU's image locks, so a
/// disk that a running QEMU still holds is refused, not written under it.
pub async fn in_place(
    backup: &Backup,
    vm_name: &str,
    target: &MachineConfig,
    opts: &RestoreOptions,
    tl: &Timeline,
) -> Result<RestoredInPlace, RestoreError> {
    let vm = find(backup, vm_name)?;
    let state = match vm.method {
        Method::SavedState => Some(
            vm.state
                .as_ref()
                .ok_or_else(|| RestoreError::NoState { backup: backup.path.clone(), vm: vm_name.to_owned() })?,
        ),
        Method::ChildSnapshot => None,
    };
    let disks = in_place_disks(vm, target, state.is_some())?;
    let started = Instant::now();
    tl.step(Some(&opts.name), "write the backup's disks back", write_back(backup, vm, &disks)).await?;
    let mut cfg = target.clone();
    cfg.name = opts.name.clone();
    let mut m =
        tl.step(Some(&opts.name), "launch on its own disks", start(cfg, &vm.name, opts, state.is_some())).await?;
    match state {
        Some(state) => load_state(&m, backup, vm, state, opts, tl).await?,
        None if opts.resume => boot_until_agent(&mut m, &vm.name, opts, tl).await?,
        None => {}
    }
    Ok(RestoredInPlace { machine: m, restore_ms: started.elapsed().as_secs_f64() * 1000.0, disks, method: vm.method })
}

/// The disks of `target` that receive the backup's disks, in the backup's order; an error
/// names the first that is missing or differs. A saved state loads only into the machine it
/// was saved from, so that is checked too.
fn in_place_disks(vm: &VmBackup, target: &MachineConfig, saved: bool) -> Result<Vec<DiskConfig>, RestoreError> {
    let bad = |why: String| RestoreError::InPlaceTarget { vm: vm.name.clone(), why };
    let spec = &vm.machine;
    if saved
        && (target.machine_type != spec.machine_type
            || target.accel != spec.accel
            || target.memory_mib != spec.memory_mib
            || target.cpus != spec.cpus)
    {
        return Err(bad(format!(
            "its saved state is of a {} machine under {} with {} MiB and {} vCPUs, but the VM to restore is a {} \
             machine under {} with {} MiB and {} vCPUs",
            spec.machine_type,
            spec.accel.as_str(),
            spec.memory_mib,
            spec.cpus,
            target.machine_type,
            target.accel.as_str(),
            target.memory_mib,
            target.cpus
        )));
    }
    let mut out = Vec::new();
    for d in &vm.disks {
        let Some(t) = target.disks.iter().find(|t| t.node_name == d.node_name) else {
            let have: Vec<&str> = target.disks.iter().map(|t| t.node_name.as_str()).collect();
            return Err(bad(format!(
                "the backup has a disk {}, which the VM does not have (it has {have:?})",
                d.node_name
            )));
        };
        if t.format != d.format {
            return Err(bad(format!(
                "disk {} is {} in the backup but {} in the VM ({}); an in-place restore keeps the VM's files as they are",
                d.node_name,
                d.format.driver(),
                t.format.driver(),
                t.path.display()
            )));
        }
        if t.read_only {
            return Err(bad(format!("disk {} ({}) is attached read-only", d.node_name, t.path.display())));
        }
        out.push(t.clone());
    }
    Ok(out)
}

/// Writes each backed-up disk onto its target file, one after the other, off the runtime.
async fn write_back(backup: &Backup, vm: &VmBackup, disks: &[DiskConfig]) -> Result<(), RestoreError> {
    // Every source is checked before the first disk is written.
    let sources = vm
        .disks
        .iter()
        .map(|d| backup.file_path(&vm.name, &Entry::Disk(d.node_name.clone()), &d.file))
        .collect::<Result<Vec<_>, _>>()?;
    let mut written = Vec::new();
    for ((d, t), src) in vm.disks.iter().zip(disks).zip(sources) {
        let (dst, fmt, dst_fmt) = (t.path.clone(), d.format, t.format);
        let result = tokio::task::spawn_blocking(move || write_into(&src, fmt, &dst, dst_fmt))
            .await
            .map_err(|e| RestoreError::Io(std::io::Error::other(e), vm.name.clone()))?;
        if let Err(error) = result {
            let hint = if held_for_writing(&t.path) {
                " (the disk is in use: stop the VM's QEMU before restoring it in place)".to_owned()
            } else {
                String::new()
            };
            return Err(RestoreError::InPlaceWrite {
                vm: vm.name.clone(),
                disk: d.node_name.clone(),
                path: t.path.clone(),
                error,
                hint,
                written,
            });
        }
        written.push(d.node_name.clone());
    }
    Ok(())
}

/// Writes the guest-visible content of `src` into the existing image `dst` (`qemu-img
/// convert -n`): `dst` keeps its path, its format and its backing file, if it has one, and
/// every area that is zero in `src` reads as zero in `dst` afterwards. Without `-U`, qemu-img
/// takes the images' locks, so an image that a running QEMU holds is refused.
fn write_into(src: &Path, src_format: DiskFormat, dst: &Path, dst_format: DiskFormat) -> Result<(), QemuImgError> {
    let (f, o) = (src_format.driver().as_ref(), dst_format.driver().as_ref());
    qemu_img(
        deadline::QEMU_IMG_COPY,
        &["convert".as_ref(), "-n".as_ref(), "-q".as_ref(), "-f".as_ref(), f, "-O".as_ref(), o],
    )
    .arg(src)
    .arg(dst)
    .run()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{FileExt, MetadataExt};

    use super::*;
    use crate::backup::manifest::DiskEntry;
    use crate::qemu::Accel;

    fn entry(node: &str, format: DiskFormat) -> DiskEntry {
        DiskEntry {
            node_name: node.into(),
            format,
            virtual_size: 8 << 20,
            file: format!("{node}.{}", format.extension()),
            bytes: 0,
            sha256: String::new(),
        }
    }

    fn target(disks: &[(&str, DiskFormat)]) -> MachineConfig {
        let boot = KernelBoot { kernel: "/k".into(), initrd: "/i".into(), append: "".into() };
        let mut cfg = MachineConfig::new("vm1", Accel::Tcg, boot);
        cfg.memory_mib = 256;
        for (node, format) in disks {
            cfg.disks.push(DiskConfig {
                node_name: (*node).into(),
                path: format!("/vms/vm1/{node}.{}", format.extension()).into(),
                format: *format,
                read_only: false,
            });
        }
        cfg
    }

    fn why(r: Result<Vec<DiskConfig>, RestoreError>) -> String {
        match r {
            Err(RestoreError::InPlaceTarget { why, .. }) => why,
            other => panic!("expected InPlaceTarget, got {:?}", other.map(|d| d.len())),
        }
    }

    #[test]
    fn in_place_targets_are_checked_before_anything_is_written() {
        let vb =
            crate::backup::manifest::sample_vm(vec![entry("root", DiskFormat::Qcow2), entry("data", DiskFormat::Vhdx)]);
        // The VM's own disks, in the backup's order, whatever the VM's order.
        let t = target(&[("data", DiskFormat::Vhdx), ("root", DiskFormat::Qcow2), ("scratch", DiskFormat::Raw)]);
        let got = in_place_disks(&vb, &t, true).unwrap();
        assert_eq!(got.iter().map(|d| d.node_name.as_str()).collect::<Vec<_>>(), ["root", "data"]);
        assert_eq!(got[1].path, PathBuf::from("/vms/vm1/data.vhdx"));

        let e = why(in_place_disks(&vb, &target(&[("root", DiskFormat::Qcow2)]), false));
        assert!(e.contains("a disk data, which the VM does not have"), "{e}");
        let e = why(in_place_disks(&vb, &target(&[("root", DiskFormat::Qcow2), ("data", DiskFormat::Raw)]), false));
        assert!(e.contains("disk data is vhdx in the backup but raw in the VM"), "{e}");
        let mut ro = t.clone();
        ro.disks[0].read_only = true;
        assert!(why(in_place_disks(&vb, &ro, false)).contains("read-only"));
        // A saved state loads only into the machine it was saved from; disks alone do not care.
        let mut bigger = t.clone();
        bigger.memory_mib = 512;
        assert!(in_place_disks(&vb, &bigger, false).is_ok());
        let e = why(in_place_disks(&vb, &bigger, true));
        assert!(e.contains("256 MiB") && e.contains("512 MiB"), "{e}");
    }

    #[test]
    fn write_into_keeps_the_file_and_its_backing_and_zeroes_what_the_source_lacks() {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        let raw_with = |name: &str, at: u64, bytes: &[u8]| {
            let f = std::fs::File::create(p(name)).unwrap();
            f.set_len(8 << 20).unwrap();
            f.write_all_at(bytes, at).unwrap();
        };
        // The VM's disk: an overlay whose backing file has data the backup does not.
        raw_with("base.raw", 1 << 20, b"only in the backing file");
        qemu_img::create_overlay(&p("base.raw"), DiskFormat::Raw, &p("disk.qcow2")).unwrap();
        raw_with("backup.raw", 2 << 20, b"the backup's data");
        qemu_img::convert(&p("backup.raw"), DiskFormat::Raw, &p("backup.qcow2"), DiskFormat::Qcow2).unwrap();
        let inode = std::fs::metadata(p("disk.qcow2")).unwrap().ino();
        let base = std::fs::read(p("base.raw")).unwrap();

        write_into(&p("backup.qcow2"), DiskFormat::Qcow2, &p("disk.qcow2"), DiskFormat::Qcow2).unwrap();
        assert!(qemu_img::identical(&p("disk.qcow2"), DiskFormat::Qcow2, &p("backup.raw"), DiskFormat::Raw).unwrap());
        assert_eq!(std::fs::metadata(p("disk.qcow2")).unwrap().ino(), inode, "written in place, not replaced");
        let info = qemu_img::info(&p("disk.qcow2")).unwrap();
        assert_eq!(info["backing-filename"].as_str(), p("base.raw").to_str(), "{info}");
        assert_eq!(info["backing-filename-format"], "raw");
        assert!(std::fs::read(p("base.raw")).unwrap() == base, "the backing file is never written");

        // Also into a raw disk, over data of its own.
        raw_with("disk.raw", 3 << 20, b"the VM's own data");
        write_into(&p("backup.qcow2"), DiskFormat::Qcow2, &p("disk.raw"), DiskFormat::Raw).unwrap();
        assert!(qemu_img::identical(&p("disk.raw"), DiskFormat::Raw, &p("backup.raw"), DiskFormat::Raw).unwrap());

        let e = write_into(&p("backup.qcow2"), DiskFormat::Qcow2, &p("missing.qcow2"), DiskFormat::Qcow2).unwrap_err();
        assert!(e.to_string().contains("convert -n"), "{e}");
    }

    #[test]
    fn a_disk_another_qemu_writes_is_seen_as_held() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk.raw");
        std::fs::File::create(&disk).unwrap().set_len(1 << 20).unwrap();
        assert!(!held_for_writing(&disk));
        // qemu-io holds the image open for writing while it sleeps (its `sleep` is in ms).
        // First it calls an unknown command: it says so on stderr, unbuffered, once it has
        // opened (and locked) the image, and goes on; that line is the sign to look.
        let mut writer = crate::sys::Spawn::new(crate::qemu::programs::QemuProgram::Io.path())
            .args(["-f", "raw", "-c", "quiesce-ready", "-c", "sleep 60000"])
            .arg(&disk)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = writer.take_stderr().unwrap();
        let mut ready = [nix::poll::PollFd::new(std::os::fd::AsFd::as_fd(&stderr), nix::poll::PollFlags::POLLIN)];
        assert_eq!(nix::poll::poll(&mut ready, 20_000u16), Ok(1), "qemu-io said nothing within 20 s");
        let mut said = std::io::BufReader::new(stderr);
        let mut line = String::new();
        std::io::BufRead::read_line(&mut said, &mut line).unwrap();
        assert!(line.contains("quiesce-ready"), "{line}");
        assert!(held_for_writing(&disk), "qemu-io's write lock was not seen");
        let e = write_into(&disk, DiskFormat::Raw, &disk, DiskFormat::Raw).unwrap_err();
        assert!(e.to_string().contains("lock"), "qemu-img meets the same lock: {e}");
        writer.kill();
        assert!(!held_for_writing(&disk));
    }
}
