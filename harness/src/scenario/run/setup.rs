//! Setting a scenario VM up as the scenario declares it: its seeded data disks, the boot,
//! the mounts, its workloads (counter, journal, app), its agent stopped or its run paused,
//! and what is recorded before the backup to be proved afterwards.

use super::super::format::{AgentState, Check, VmSpec, VmState};
use super::super::report::{DiskReport, VmReport};
use super::ctx::{label, RunCtx, Vm, PROGRESS, ROOT_TOKEN};
use super::error::{io, on, At, RunError};
use crate::image::qemu_img;
use crate::image::seed::{self, DiskSeed};
use crate::qemu::{DiskConfig, KernelBoot, Machine};
use crate::sys::deadline;
use crate::testguest::{self, GuestOptions, OwnBoot};
use crate::workload;

/// Makes VM `spec`'s disks, boots it, mounts its data disks and starts its workloads.
pub(super) async fn prepare_vm(ctx: &mut RunCtx<'_>, spec: &VmSpec) -> Result<Vm, RunError> {
    let name = spec.name.get_ref();
    let dir = ctx.work.join(name);
    std::fs::create_dir_all(&dir).map_err(io(At::vm(name, "creating a VM folder"), &dir))?;
    let mut extra = Vec::new();
    for d in &spec.disks {
        let d = d.get_ref();
        let seed = DiskSeed {
            name: d.name.get_ref().clone(),
            format: d.format.into(),
            size: super::super::format::parse_size(d.size.get_ref()).map_err(on(name, "reading a disk's size"))?,
            filesystem: d.filesystem,
            files: d.files.clone(),
            partitioning: d.partition,
        };
        let path = seed::create(&dir, &seed).map_err(on(name, "making a data disk"))?;
        extra.push(DiskConfig { node_name: seed.name, path, format: seed.format, read_only: false });
    }
    let mut gopts = GuestOptions::named(name);
    gopts.accel = ctx.opts.accel;
    gopts.memory_mib = *spec.memory_mib.get_ref();
    gopts.extra_disks = extra;
    gopts.artifacts_dir = ctx.opts.artifacts_dir.clone();
    gopts.disk_dir = Some(dir.clone());
    if spec.is_windows() {
        let guest = match spec.image.get_ref().own() {
            Some(own) => crate::windows::guest::boot_own(gopts, &own.resolved.path, own.disk_format(), ctx.progress)
                .await
                .map_err(on(name, "booting its own Windows image"))?,
            None => crate::windows::guest::boot(gopts, ctx.progress).await.map_err(on(name, "booting Windows"))?,
        };
        return super::windows::prepare(ctx, spec, guest, dir).await;
    }
    let guest = match spec.image.get_ref().own() {
        Some(own) => {
            let boot = match &own.resolved.kernel {
                Some((kernel, initrd)) => KernelBoot {
                    kernel: kernel.clone(),
                    initrd: initrd.clone(),
                    append: own.append.as_ref().map(|a| a.get_ref().clone()).unwrap_or_default(),
                },
                // Its own bootloader: SeaBIOS boots the first disk.
                None => KernelBoot::firmware(),
            };
            let own = OwnBoot { path: own.resolved.path.clone(), format: own.disk_format(), boot };
            testguest::boot_own(gopts, own, ctx.progress).await.map_err(on(name, "booting its own image"))?
        }
        None => testguest::boot(gopts, ctx.progress).await.map_err(on(name, "booting"))?,
    };
    let agent = guest.machine.agent().map_err(on(name, "the guest agent"))?;
    for d in &spec.disks {
        let d = d.get_ref();
        let Some(fstype) = d.filesystem.guest_type().filter(|_| d.mount) else { continue };
        workload::mount_disk(agent, d.name.get_ref(), fstype).await.map_err(on(name, "mounting a data disk"))?;
    }
    let boot_id = Some(workload::boot_id(agent).await.map_err(on(name, "reading boot_id"))?);
    let mut counter_before = None;
    if *spec.workload.counter.get_ref() {
        workload::start_counter(agent).await.map_err(on(name, "starting the counter"))?;
        let first = workload::wait_counter_above(agent, 0, PROGRESS).await.map_err(on(name, "reading the counter"))?;
        counter_before = Some(first);
    }
    let journal = spec.workload.journal.as_ref().map(|j| format!("/mnt/{}/journal", j.get_ref()));
    if let Some(path) = &journal {
        workload::start_journal(agent, path).await.map_err(on(name, "starting the journal"))?;
    }
    let app = spec.workload.app.as_ref().map(|a| app_dir(a.get_ref()));
    if let Some(dir) = &app {
        workload::start_app(agent, dir).await.map_err(on(name, "starting the app"))?;
    }
    if spec.agent == AgentState::Stopped {
        workload::stop_agent(agent, deadline::AGENT_COMMAND).await.map_err(on(name, "stopping the guest agent"))?;
    }
    if spec.state == VmState::Paused {
        pause(&guest.machine).await?;
    }
    let wants_token = ctx.s.file.restore.as_ref().is_some_and(|r| r.checks.get_ref().contains(&Check::RootFromBackup));
    let root_token = if wants_token {
        let token = format!("{}-{}", name, boot_id.as_deref().unwrap_or("?"));
        crate::qemu::exec::sh(agent, &format!("echo {token} > {ROOT_TOKEN} && sync"), deadline::guest_exec())
            .await
            .map_err(on(name, "writing the root token"))?;
        Some(token)
    } else {
        None
    };
    let app_since = None;
    Ok(Vm {
        spec: spec.clone(),
        guest,
        dir,
        boot_id,
        counter_before,
        journal,
        journal_before: None,
        app,
        app_since,
        root_token,
    })
}

/// Where the app keeps its store: on the root filesystem, or on a mounted data disk.
fn app_dir(disk: &str) -> String {
    if disk == "root" {
        "/var/lib/quiesce-app".into()
    } else {
        format!("/mnt/{disk}")
    }
}

/// Pauses a VM the scenario wants paused when the backup begins.
pub(super) async fn pause(m: &Machine) -> Result<(), RunError> {
    m.qmp().execute_raw("stop", serde_json::Value::Null, deadline::QMP_COMMAND).await.map_err(on(m.name(), "stop"))?;
    m.qmp().wait_event("STOP", |_| true, deadline::COMMAND_EVENT).await.map_err(on(m.name(), "wait for STOP"))?;
    Ok(())
}

/// The VM as the report shows it before the backup: its run state and its disks.
pub(super) fn vm_report(vm: &Vm) -> VmReport {
    VmReport {
        name: vm.name().to_owned(),
        state_before: label(vm.spec.state).into(),
        state_after_backup: None,
        method: None,
        method_reason: None,
        conditions: vec![],
        disks: vm
            .guest
            .machine
            .config()
            .disks
            .iter()
            .map(|d| DiskReport {
                name: d.node_name.clone(),
                format: d.format.driver().into(),
                // A size qemu-img cannot read shows as 0, and the fixture shows the change.
                virtual_size: qemu_img::virtual_size(&d.path).unwrap_or(0),
            })
            .collect(),
        backup_disks: vec![],
        timings: None,
        journal: None,
    }
}

/// The journal's lines on disk just before the job, for a VM whose guest can be asked.
pub(super) async fn journal_lines_before(vm: &Vm) -> Result<Option<u64>, RunError> {
    let Some(path) = &vm.journal else { return Ok(None) };
    if vm.spec.state != VmState::Running || vm.spec.agent == AgentState::Stopped {
        return Ok(None);
    }
    let j = super::windows::journal_now(vm, path).await?;
    Ok(Some(j.lines))
}
