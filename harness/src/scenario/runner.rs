//! Runs one scenario: makes its disks, boots its VMs and starts their workloads, takes the
//! backup, checks the VMs came back as they were, restores, and runs the checks. It turns
//! the scenario's data into library calls; all the work is done by the layers below.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::format::{Check, Filesystem, MethodChoice, Scenario, VmSpec, VmState};
use super::report::{DiskReport, Report, RestoreReport, VmReport};
use crate::backup::saved_state::SaveSettings;
use crate::backup::{job, runstate, Backup, BackupWriter};
use crate::image::qemu_img;
use crate::image::seed::{self, DiskSeed};
use crate::qemu::accel::AccelChoice;
use crate::qemu::caps::{self, Capabilities};
use crate::qemu::{config::default_qemu_binary, DiskConfig, GuestAgent, Machine};
use crate::testguest::{self, GuestOptions, TestGuest};
use crate::timeline::Timeline;
use crate::verify::{restore, RestoreOptions};
use crate::workload;

const T: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub accel: Option<AccelChoice>,
    pub artifacts_dir: Option<PathBuf>,
    /// Where disks and the backup are made while the scenario runs.
    pub work_dir: PathBuf,
    /// Keep the backup (in `work_dir`) instead of removing it at the end.
    pub keep_backup: bool,
}

/// Everything known about one VM of the scenario while it runs.
struct Vm {
    spec: VmSpec,
    guest: TestGuest,
    boot_id: Option<String>,
    counter_before: Option<u64>,
    journal: Option<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RunError(String);

fn fail<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> RunError + '_ {
    move |e| RunError(format!("{what}: {e}"))
}

/// Runs `s` and reports what happened; a failure is in the report, not a panic.
pub async fn run(s: &Scenario, opts: &RunOptions, progress: &mut dyn FnMut(&str)) -> Report {
    let tl = Timeline::new();
    let started = Instant::now();
    let mut report = Report { scenario: s.name.clone(), description: s.file.description.clone(), ..Default::default() };
    let result = run_inner(s, opts, &tl, &mut report, progress).await;
    report.steps = tl.steps();
    report.duration_ms = started.elapsed().as_secs_f64() * 1000.0;
    report.passed = result.is_ok() && report.checks.iter().all(|c| c.passed);
    report.error = result.err().map(|e| e.0);
    report
}

async fn run_inner(
    s: &Scenario,
    opts: &RunOptions,
    tl: &Timeline,
    report: &mut Report,
    progress: &mut dyn FnMut(&str),
) -> Result<(), RunError> {
    let caps = caps::probe(&default_qemu_binary()).await.map_err(fail("probing QEMU"))?;
    report.qemu_version = caps.version.clone();
    std::fs::create_dir_all(&opts.work_dir).map_err(fail("creating the work folder"))?;
    let work = tempfile::Builder::new()
        .prefix(&format!("{}-", s.name))
        .tempdir_in(&opts.work_dir)
        .map_err(fail("creating the work folder"))?;

    let mut vms = Vec::new();
    for spec in s.vms() {
        progress(&format!("{}: booting {}", s.name, spec.name.get_ref()));
        let vm = tl
            .step(Some(spec.name.get_ref()), "boot and prepare", prepare_vm(spec, opts, work.path(), progress))
            .await?;
        report.accel = vm.guest.accel.accel.as_str().to_owned();
        vms.push(vm);
    }
    for vm in &vms {
        report.vms.push(VmReport {
            name: vm.spec.name.get_ref().clone(),
            state_before: label(vm.spec.state).into(),
            state_after_backup: None,
            method: None,
            method_reason: None,
            disks: vm
                .guest
                .machine
                .config()
                .disks
                .iter()
                .map(|d| DiskReport {
                    name: d.node_name.clone(),
                    format: d.format.driver().into(),
                    virtual_size: qemu_img::virtual_size(&d.path).unwrap_or(0),
                })
                .collect(),
            timings: None,
        });
    }

    progress(&format!("{}: backing up", s.name));
    let backup_path = work.path().join("backup");
    let mut writer = BackupWriter::create(&backup_path, &caps.version).map_err(fail("creating the backup"))?;
    for vm in &vms {
        let m = &vm.guest.machine;
        let (reason, allowed) = choose_method(s.file.backup.method);
        allowed.map_err(RunError)?;
        let b = job::saved_state(m, &caps, &SaveSettings::default(), &reason, &mut writer, tl)
            .await
            .map_err(fail("backup"))?;
        if let Some(r) = report.vm_mut(m.name()) {
            r.method = Some(b.method.as_str().into());
            r.method_reason = Some(reason);
            r.timings = Some(b.timings.clone());
        }
    }
    let backup = writer.commit().map_err(fail("finishing the backup"))?;

    for vm in &vms {
        after_backup_checks(vm, report).await?;
    }

    if let Some(rspec) = &s.file.restore {
        let reopened = Backup::open(&backup.path).map_err(fail("reopening the backup"))?;
        let bad = reopened.verify().map_err(fail("verifying the backup"))?;
        report.check("*", "backup-checksums", bad.is_empty(), format!("{} files differ", bad.len()));
        for vm in &vms {
            progress(&format!("{}: restoring {}", s.name, vm.spec.name.get_ref()));
            restore_and_check(vm, &reopened, &rspec.checks, opts, tl, report).await?;
        }
    }
    if opts.keep_backup {
        let kept = opts.work_dir.join(format!("{}-backup", s.name));
        let _ = std::fs::remove_dir_all(&kept);
        std::fs::rename(&backup.path, &kept).map_err(fail("keeping the backup"))?;
        report.backup_path = Some(kept.display().to_string());
    }
    Ok(())
}

fn label(s: VmState) -> &'static str {
    match s {
        VmState::Running => "running",
        VmState::Paused => "paused",
    }
}

/// Which method a VM gets, and why. (Child VM Snapshot is not built yet: `auto` says so.)
fn choose_method(choice: MethodChoice) -> (String, Result<(), String>) {
    match choice {
        MethodChoice::SavedState => ("saved-state was chosen in the scenario".into(), Ok(())),
        MethodChoice::Auto => ("auto: Child VM Snapshot is not available in this version of quiesce".into(), Ok(())),
        MethodChoice::ChildSnapshot => (
            String::new(),
            Err("method child-snapshot was forced, but Child VM Snapshot is not available in this version of quiesce"
                .into()),
        ),
    }
}

async fn prepare_vm(
    spec: &VmSpec,
    opts: &RunOptions,
    work: &std::path::Path,
    progress: &mut dyn FnMut(&str),
) -> Result<Vm, RunError> {
    let name = spec.name.get_ref();
    let dir = work.join(name);
    std::fs::create_dir_all(&dir).map_err(fail("creating a VM folder"))?;
    let mut extra = Vec::new();
    for d in &spec.disks {
        let d = d.get_ref();
        let seed = DiskSeed {
            name: d.name.get_ref().clone(),
            format: d.format.into(),
            size: super::format::parse_size(d.size.get_ref()).map_err(RunError)?,
            filesystem: d.filesystem,
            files: d.files.clone(),
        };
        let path = seed::create(&dir, &seed).map_err(fail(&format!("VM {name}")))?;
        extra.push(DiskConfig { node_name: seed.name, path, format: seed.format, read_only: false });
    }
    let mut gopts = GuestOptions::named(name);
    gopts.accel = opts.accel;
    gopts.memory_mib = *spec.memory_mib.get_ref();
    gopts.extra_disks = extra;
    gopts.artifacts_dir = opts.artifacts_dir.clone();
    let guest = testguest::boot(gopts, progress).await.map_err(fail(&format!("booting VM {name}")))?;
    let agent = guest.machine.agent().map_err(fail(name))?;
    for d in &spec.disks {
        let d = d.get_ref();
        if d.filesystem == Filesystem::Ext4 {
            workload::mount_disk(agent, d.name.get_ref(), "ext4")
                .await
                .map_err(fail::<crate::qemu::exec::ExecError>("mounting a data disk"))?;
        }
    }
    let boot_id =
        Some(workload::boot_id(agent).await.map_err(fail::<crate::qemu::exec::ExecError>("reading boot_id"))?);
    let mut counter_before = None;
    if spec.workload.counter {
        workload::start_counter(agent).await.map_err(fail::<crate::qemu::exec::ExecError>("starting the counter"))?;
        counter_before = Some(workload::wait_counter_above(agent, 0, T).await.map_err(fail::<
            crate::qemu::exec::ExecError,
        >(
            "reading the counter"
        ))?);
    }
    let journal = spec.workload.journal.as_ref().map(|j| format!("/mnt/{}/journal", j.get_ref()));
    if let Some(path) = &journal {
        workload::start_journal(agent, path)
            .await
            .map_err(fail::<crate::qemu::exec::ExecError>("starting the journal"))?;
    }
    if spec.state == VmState::Paused {
        pause(&guest.machine).await?;
    }
    Ok(Vm { spec: spec.clone(), guest, boot_id, counter_before, journal })
}

async fn pause(m: &Machine) -> Result<(), RunError> {
    m.qmp().execute_raw("stop", serde_json::Value::Null, T).await.map_err(fail("stop"))?;
    m.qmp().wait_event("STOP", |_| true, T).await.map_err(fail("wait for STOP"))?;
    Ok(())
}

/// The VM is back as it was: same run state, disks active, workloads running on.
async fn after_backup_checks(vm: &Vm, report: &mut Report) -> Result<(), RunError> {
    let m = &vm.guest.machine;
    let name = m.name().to_owned();
    let st = runstate::query(m).await.map_err(fail("query-status"))?;
    if let Some(r) = report.vm_mut(&name) {
        r.state_after_backup = Some(st.label().into());
    }
    let want = label(vm.spec.state);
    report.check(
        &name,
        "state-restored-after-backup",
        st.label() == want,
        format!("{want} before, {} after ({})", st.label(), st.status),
    );
    let inactive = runstate::inactive_nodes(m).await.map_err(fail("query block nodes"))?;
    report.check(&name, "disks-active-after-backup", inactive.is_empty(), format!("inactive: {inactive:?}"));
    if !st.running {
        return Ok(());
    }
    let agent = m.agent().map_err(fail(&name))?;
    if vm.counter_before.is_some() {
        let now = workload::read_counter(agent).await.map_err(fail("reading the counter"))?;
        let moved = workload::wait_counter_above(agent, now, T).await;
        report.check(
            &name,
            "runs-on-after-backup",
            moved.is_ok(),
            format!("counter moved on from {now}: {}", moved.is_ok()),
        );
    }
    if let Some(path) = &vm.journal {
        let j = workload::check_journal(agent, path).await.map_err(fail("checking the journal"))?;
        report.check(
            &name,
            "nothing-lost-after-backup",
            j.intact(),
            format!("{} lines, first break {:?}", j.lines, j.first_break),
        );
    }
    Ok(())
}

async fn restore_and_check(
    vm: &Vm,
    backup: &Backup,
    checks: &[Check],
    opts: &RunOptions,
    tl: &Timeline,
    report: &mut Report,
) -> Result<(), RunError> {
    let name = vm.spec.name.get_ref().clone();
    let mut ro = RestoreOptions::named(&format!("{name}-restored"));
    ro.artifacts_dir = opts.artifacts_dir.clone();
    ro.resume = false;
    let restored = restore::saved_state(backup, &name, &ro, tl).await.map_err(fail("restore"))?;
    let m = &restored.machine;
    if checks.contains(&Check::DisksMatchBackup) {
        let vb = backup.vm(&name).expect("restored from it");
        let mut all = true;
        for d in &vb.disks {
            let overlay = &restored.disks.iter().find(|(n, _)| n == &d.node_name).expect("one overlay per disk").1;
            let same = qemu_img::identical(
                overlay,
                crate::qemu::DiskFormat::Qcow2,
                &backup.vm_dir(&name).join(&d.file),
                d.format,
            )
            .map_err(fail("comparing a restored disk"))?;
            all &= same;
        }
        report.check(&name, "disks-match-backup", all, format!("{} disks compared", vb.disks.len()));
    }
    let before = runstate::query(m).await.map_err(fail("query-status"))?;
    let state_after_restore = if vm.spec.state == VmState::Running {
        tl.step(Some(m.name()), "resume", restore::resume(m)).await.map_err(fail("resume"))?;
        runstate::query(m).await.map_err(fail("query-status"))?.label().to_owned()
    } else {
        // A paused VM stays paused; it is continued only to look inside it.
        let label = before.label().to_owned();
        restore::resume(m).await.map_err(fail("resume for checks"))?;
        label
    };
    report.check(
        &name,
        "state-after-restore",
        state_after_restore == label(vm.spec.state),
        format!("{} after restore", state_after_restore),
    );
    report.restores.push(RestoreReport { vm: name.clone(), state_after_restore, restore_ms: restored.restore_ms });
    let agent = m.agent().map_err(fail(&name))?;
    agent.wait_ready(T).await.map_err(fail("waiting for the restored guest's agent"))?;
    for check in checks {
        guest_check(*check, vm, agent, report).await?;
    }
    Ok(())
}

async fn guest_check(check: Check, vm: &Vm, agent: &GuestAgent, report: &mut Report) -> Result<(), RunError> {
    let name = vm.spec.name.get_ref().clone();
    match check {
        Check::DisksMatchBackup => {}
        Check::SameBoot => {
            let now =
                workload::boot_id(agent).await.map_err(fail::<crate::qemu::exec::ExecError>("reading boot_id"))?;
            let same = Some(&now) == vm.boot_id.as_ref();
            report.check(
                &name,
                "same-boot",
                same,
                if same { "boot_id unchanged".into() } else { format!("boot_id {now}") },
            );
        }
        Check::CounterContinues => {
            let before = vm.counter_before.unwrap_or(0);
            let c = workload::read_counter(agent)
                .await
                .map_err(fail::<crate::qemu::exec::ExecError>("reading the counter"))?;
            let moves = workload::wait_counter_above(agent, c, T).await.is_ok();
            report.check(
                &name,
                "counter-continues",
                c >= before && moves,
                format!("{c} >= {before} read before the backup, and moving: {moves}"),
            );
        }
        Check::FilesMatchSeed => {
            let mut bad = Vec::new();
            let mut n = 0;
            for d in &vm.spec.disks {
                let d = d.get_ref();
                for (path, want) in &d.files {
                    n += 1;
                    let got = workload::read_file(agent, &format!("/mnt/{}/{path}", d.name.get_ref())).await;
                    if got.as_deref().ok() != Some(want.as_str()) {
                        bad.push(format!("{}:{path}", d.name.get_ref()));
                    }
                }
            }
            report.check(&name, "files-match-seed", bad.is_empty(), format!("{n} files, differing: {bad:?}"));
        }
        Check::JournalIntact => match &vm.journal {
            None => report.check(&name, "journal-intact", false, "the VM has no journal workload"),
            Some(path) => {
                let j = workload::check_journal(agent, path)
                    .await
                    .map_err(fail::<crate::qemu::exec::ExecError>("checking the journal"))?;
                report.check(
                    &name,
                    "journal-intact",
                    j.intact(),
                    format!("{} lines, first break {:?}", j.lines, j.first_break),
                );
            }
        },
    }
    Ok(())
}

/// Probes QEMU once for a set of scenarios.
pub async fn capabilities() -> Result<Capabilities, caps::CapsError> {
    caps::probe(&default_qemu_binary()).await
}
