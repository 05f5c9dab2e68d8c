//! Runs one scenario: makes its disks, boots its VMs and starts their workloads, chooses each
//! VM's method from the six conditions, takes the backup, checks the VMs came back as they
//! were, restores (loading the saved state, or booting from the backed-up disks), and runs
//! the checks. It turns the scenario's data into library calls; the work is done below.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::disk_checks;
use super::format::{
    AgentState, Attach, Check, Expect, FaultKind, FaultSpec, Filesystem, ManifestSpec, MethodChoice, RestoreExpect,
    RestoreSpec, Scenario, VmSpec, VmState,
};
use super::report::{DiskReport, JournalReport, Report, RestoreReport, VmReport};
use crate::backup::child_snapshot::SnapshotSettings;
use crate::backup::job::Choice;
use crate::backup::saved_state::SaveSettings;
use crate::backup::set::{self, Member, SetError, Undone};
use crate::backup::{runstate, Backup, Faults, Method};
use crate::image::seed::{self, DiskSeed};
use crate::image::{fsck, qemu_img};
use crate::interrupt::Interrupt;
use crate::qemu::accel::AccelChoice;
use crate::qemu::caps;
use crate::qemu::exec::ExecError;
use crate::qemu::{config::default_qemu_binary, DiskConfig, DiskFormat, GuestAgent, Machine};
use crate::testguest::{self, GuestOptions, TestGuest};
use crate::timeline::Timeline;
use crate::verify::{self, corrupt, restore, RestoreOptions};
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
    /// The run's interruption (the CLI fires it on SIGINT/SIGTERM).
    pub interrupt: Option<Interrupt>,
}

/// Everything known about one VM of the scenario while it runs.
pub(super) struct Vm {
    pub(super) spec: VmSpec,
    pub(super) guest: TestGuest,
    /// The folder of its disks, and the default snapshot location.
    pub(super) dir: PathBuf,
    pub(super) boot_id: Option<String>,
    pub(super) counter_before: Option<u64>,
    pub(super) journal: Option<String>,
    /// Journal lines on disk just before the job: all must be there afterwards.
    pub(super) journal_before: Option<u64>,
    pub(super) app: Option<String>,
    /// Written to the root disk before the backup, for `root-from-backup`.
    pub(super) root_token: Option<String>,
}

impl Vm {
    pub(super) fn name(&self) -> &str {
        self.spec.name.get_ref()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RunError(pub(super) String);

pub(super) fn fail<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> RunError + '_ {
    move |e| RunError(format!("{what}: {e}"))
}

fn gfail(what: &str) -> impl FnOnce(ExecError) -> RunError + '_ {
    fail::<ExecError>(what)
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

    let interrupted = || opts.interrupt.as_ref().is_some_and(|i| i.is_triggered());
    let mut vms = Vec::new();
    for spec in s.vms() {
        if interrupted() {
            return Err(RunError("interrupted while booting; no backup was started".into()));
        }
        progress(&format!("{}: booting {}", s.name, spec.name.get_ref()));
        let vm = tl
            .step(Some(spec.name.get_ref()), "boot and prepare", prepare_vm(s, spec, opts, work.path(), progress))
            .await?;
        report.accel = vm.guest.accel.accel.as_str().to_owned();
        report.vms.push(VmReport {
            name: vm.name().to_owned(),
            state_before: label(spec.state).into(),
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
                    virtual_size: qemu_img::virtual_size(&d.path).unwrap_or(0),
                })
                .collect(),
            backup_disks: vec![],
            timings: None,
            journal: None,
        });
        vms.push(vm);
    }

    if let Some(rb) = &s.file.rollback {
        let vm = vms.pop().expect("a rollback scenario has one VM");
        return super::rollback::run(s, rb.get_ref(), vm, &caps, work.path(), opts, tl, report, progress).await;
    }

    progress(&format!("{}: backing up", s.name));
    let full_target = s.file.faults.iter().any(|f| f.get_ref().kind == FaultKind::BackupTargetFull);
    let _small = if full_target { Some(SmallTmpfs::mount(&work.path().join("target"))?) } else { None };
    let backup_path = if full_target { work.path().join("target").join("backup") } else { work.path().join("backup") };
    // A scenario-local interruption: the CLI's (SIGINT) is forwarded to it, and a fault can
    // fire it without ending the whole run.
    let local = Interrupt::new();
    let forward = opts.interrupt.clone().map(|outer| {
        let local = local.clone();
        tokio::spawn(async move {
            outer.fired().await;
            local.trigger();
        })
    });
    for vm in &mut vms {
        vm.journal_before = journal_lines_before(vm).await?;
    }
    let members: Vec<Member> = vms.iter().map(|vm| member(s, vm, s.file.backup.method)).collect();
    for vm in &vms {
        if has_fault(s, vm.name(), FaultKind::AgentHangsInFreeze) {
            install_hook(vm, "zz-quiesce-hang", "[ \"$1\" = freeze ] && sleep 11\nexit 0").await?;
        }
        if has_fault(s, vm.name(), FaultKind::AgentFreezeFails) {
            // Sorted after the app's hook, so the app is paused first and the veto must
            // resume it: the undo is what puts the writer back to work.
            let veto =
                "[ \"$1\" = freeze ] || exit 0\necho \"quiesce fault: this writer vetoes the freeze\" >&2\nexit 1";
            install_hook(vm, "zz-quiesce-veto", veto).await?;
        }
        if has_fault(s, vm.name(), FaultKind::AgentStopsAfterFreeze) {
            // Silent for longer than the thaw may wait, so the thaw times out; the undo's
            // own wait outlasts it.
            let silence = SnapshotSettings::new(&vm.dir).thaw_deadline + Duration::from_secs(2);
            let agent = vm.guest.machine.agent().map_err(fail(vm.name()))?;
            workload::stop_agent_after_next_freeze(agent, silence)
                .await
                .map_err(gfail("starting the agent-stopping watcher"))?;
        }
    }
    let outcome = set::run(&members, &caps, &backup_path, tl, &local).await;
    if let Some(f) = forward {
        f.abort();
    }
    report.excluded = match &outcome {
        Ok(o) => o.excluded.clone(),
        Err(_) => vec![],
    };
    let backup = match (outcome, s.file.backup.expect) {
        (Ok(o), Expect::Success) => {
            for (vm, choice) in &o.choices {
                record_choice(report, vm, choice);
            }
            for vb in &o.backup.manifest.vms {
                if let Some(r) = report.vm_mut(&vb.name) {
                    r.timings = Some(vb.timings.clone());
                    r.backup_disks = DiskReport::of_backup(vb);
                }
            }
            for v in &o.skipped {
                report.check(
                    v,
                    "skipped-nothing-the-host-can-back-up",
                    true,
                    "all its disks are pass-through or iSCSI",
                );
            }
            o.backup
        }
        (Ok(_), expect) => {
            report.check(
                "*",
                "backup-outcome",
                false,
                format!("the backup succeeded, but the scenario expects it {expect:?}"),
            );
            return Ok(());
        }
        (Err(SetError::Refused { reasons, choices, .. }), Expect::Refused) => {
            for (vm, choice) in &choices {
                record_choice(report, vm, choice);
            }
            report.check("*", "backup-refused", true, reasons);
            return nothing_changed(s, &vms, &backup_path, report).await;
        }
        (Err(e @ SetError::Failed { .. }), Expect::Failed)
        | (Err(e @ SetError::Interrupted { .. }), Expect::Interrupted) => {
            let text = e.to_string();
            // A VM whose QEMU a fault killed cannot be put back; every other one must be.
            let undone: &[(String, Undone)] = match &e {
                SetError::Failed { undone, .. } | SetError::Interrupted { undone, .. } => undone,
                _ => &[],
            };
            let all_undone = undone
                .iter()
                .filter(|(vm, _)| !has_fault(s, vm, FaultKind::QemuKilledAfterPrepare))
                .all(|(_, what)| !matches!(what, Undone::CouldNotPutBack(_)));
            report.check("*", "backup-failed-as-expected", true, text);
            report.check("*", "every-vm-put-back", all_undone, "see backup-failed-as-expected");
            if let SetError::Failed { vm, phase, .. } = &e {
                report.failure = Some(format!("{vm} in {phase}"));
            }
            if let SetError::Interrupted { phase, .. } = &e {
                report.failure = Some(format!("interrupted in {phase}"));
            }
            return nothing_changed(s, &vms, &backup_path, report).await;
        }
        (Err(e), _) => return Err(fail("backup")(e)),
    };

    for vm in &vms {
        let method = backup.vm(vm.name()).map(|b| b.method).unwrap_or(Method::SavedState);
        after_backup_checks(vm, method, report).await?;
    }

    if interrupted() {
        return Err(RunError("interrupted after the backup; the restore was not started".into()));
    }
    if let Some(rspec) = &s.file.restore {
        let reopened = Backup::open(&backup.path).map_err(fail("reopening the backup"))?;
        let bad = reopened.verify().map_err(fail("verifying the backup"))?;
        report.check("*", "backup-checksums", bad.is_empty(), format!("{} files differ", bad.len()));
        for vm in &vms {
            progress(&format!("{}: restoring {}", s.name, vm.name()));
            restore_and_check(s, vm, &reopened, rspec, opts, tl, report).await?;
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

/// Where the app keeps its store: on the root filesystem, or on a mounted data disk.
fn app_dir(disk: &str) -> String {
    if disk == "root" {
        "/var/lib/quiesce-app".into()
    } else {
        format!("/mnt/{disk}")
    }
}

fn label(s: VmState) -> &'static str {
    match s {
        VmState::Running => "running",
        VmState::Paused => "paused",
    }
}

fn record_choice(report: &mut Report, vm: &str, choice: &Choice) {
    if let Some(r) = report.vm_mut(vm) {
        r.method = Some(choice.method.as_str().into());
        r.method_reason = Some(choice.reason.clone());
        r.conditions = choice.conditions.iter().map(|v| (v.condition.name().to_owned(), v.outcome)).collect();
    }
}

/// A 48 MiB tmpfs: big enough to start a backup, too small to finish one. Unmounted on drop.
struct SmallTmpfs(PathBuf);

impl SmallTmpfs {
    fn mount(at: &Path) -> Result<Self, RunError> {
        std::fs::create_dir_all(at).map_err(fail("creating the small backup target"))?;
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=48m,mode=0700", "quiesce-full-target"])
            .arg(at)
            .output()
            .map_err(fail("mounting a small tmpfs"))?;
        if !out.status.success() {
            return Err(RunError(format!(
                "the backup-target-full fault mounts a small tmpfs and needs root: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(SmallTmpfs(at.to_owned()))
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        // Lazy, so a file still open somewhere cannot keep the mount alive.
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn has_fault(s: &Scenario, vm: &str, kind: FaultKind) -> bool {
    s.file.faults.iter().any(|f| f.get_ref().vm.get_ref() == vm && f.get_ref().kind == kind)
}

/// The set member for one VM: its method, where its overlays go, and its faults.
pub(super) fn member<'a>(s: &Scenario, vm: &'a Vm, method: MethodChoice) -> Member<'a> {
    let name = vm.name();
    let snapdir =
        s.file.backup.snapshot_dir.as_ref().map(|d| PathBuf::from(d.get_ref())).unwrap_or_else(|| vm.dir.clone());
    let mut snapshot = SnapshotSettings::new(&snapdir);
    if let Some(ms) = &s.file.backup.freeze_deadline_ms {
        snapshot.freeze_deadline = std::time::Duration::from_millis(*ms.get_ref());
    }
    Member {
        machine: &vm.guest.machine,
        method,
        snapshot,
        save: SaveSettings::default(),
        declared_iscsi: vm
            .spec
            .disks
            .iter()
            .map(|d| d.get_ref())
            .filter(|d| d.attach == Attach::Iscsi)
            .map(|d| d.name.get_ref().clone())
            .collect(),
        faults: Faults {
            transaction_fails: has_fault(s, name, FaultKind::TransactionFails),
            save_fails: has_fault(s, name, FaultKind::SaveFails),
            interrupt_after_freeze: has_fault(s, name, FaultKind::InterruptAfterFreeze),
            sigint_after_freeze: has_fault(s, name, FaultKind::SigintAfterFreeze),
            agent_stops_after_freeze: has_fault(s, name, FaultKind::AgentStopsAfterFreeze),
            kill_after_prepare: has_fault(s, name, FaultKind::QemuKilledAfterPrepare),
        },
    }
}

/// Installs a fault's freeze hook in the guest: `body` (printf escapes) after `#!/bin/sh`.
/// One that sleeps past the freeze deadline hangs the agent in guest-fsfreeze-freeze; one
/// that fails vetoes the freeze, as a failing VSS writer does.
async fn install_hook(vm: &Vm, name: &str, body: &str) -> Result<(), RunError> {
    let agent = vm.guest.machine.agent().map_err(fail(vm.name()))?;
    let path = format!("/etc/qemu/fsfreeze-hook.d/{name}");
    let script = format!("printf '#!/bin/sh\\n{body}\\n' > {path} && chmod 755 {path}");
    crate::qemu::exec::sh(agent, &script, T).await.map_err(gfail("installing a fault's freeze hook"))?;
    Ok(())
}

/// A refused or failed backup must leave everything as it was: no backup (not even a
/// partial folder), no overlays, every VM in its run state, thawed, nothing lost.
async fn nothing_changed(s: &Scenario, vms: &[Vm], backup_path: &Path, report: &mut Report) -> Result<(), RunError> {
    let parent = backup_path.parent().unwrap_or(Path::new("."));
    let partial: Vec<String> = std::fs::read_dir(parent)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains("backup"))
                .collect()
        })
        .unwrap_or_default();
    report.check("*", "no-backup-written", partial.is_empty(), format!("{partial:?}"));
    for vm in vms {
        let m = &vm.guest.machine;
        let name = vm.name();
        if has_fault(s, name, FaultKind::QemuKilledAfterPrepare) {
            let mut dead = m.qmp().is_closed();
            if !dead {
                dead = m.qmp().execute_raw("query-status", serde_json::Value::Null, T).await.is_err();
            }
            report.check(name, "killed-vm-reported", dead, "its QEMU was killed by the fault; it cannot be put back");
            continue;
        }
        let snapdir =
            s.file.backup.snapshot_dir.as_ref().map(|d| PathBuf::from(d.get_ref())).unwrap_or_else(|| vm.dir.clone());
        let overlays: Vec<String> = std::fs::read_dir(&snapdir)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.ends_with("-overlay.qcow2"))
                    .collect()
            })
            .unwrap_or_default();
        report.check(name, "no-overlays-left", overlays.is_empty(), format!("{overlays:?}"));
        let (own, detail) = own_images(m).await?;
        report.check(name, "on-its-own-images", own, detail);
        let st = runstate::query(m).await.map_err(fail("query-status"))?;
        let want = label(vm.spec.state);
        report.check(name, "state-unchanged", st.label() == want, format!("{want} before, {} after", st.label()));
        let inactive = runstate::inactive_nodes(m).await.map_err(fail("query block nodes"))?;
        report.check(name, "disks-active", inactive.is_empty(), format!("inactive: {inactive:?}"));
        if let Some(r) = report.vm_mut(name) {
            r.state_after_backup = Some(st.label().into());
        }
        if !st.running || vm.spec.agent == AgentState::Stopped {
            continue;
        }
        let agent = m.agent().map_err(fail(name))?;
        let status = agent
            .execute_raw("guest-fsfreeze-status", serde_json::Value::Null, T)
            .await
            .map_err(fail("guest-fsfreeze-status"))?;
        report.check(name, "guest-thawed", status == "thawed", format!("guest-fsfreeze-status: {status}"));
        if let Some(path) = &vm.journal {
            let (ok, detail) = journal_kept(vm, path, report).await?;
            report.check(name, "nothing-lost", ok, detail);
        }
        if let Some(dir) = &vm.app {
            let (moves, detail) = app_commits_on(agent, dir).await?;
            report.check(name, "app-writes-on", moves, detail);
        }
    }
    Ok(())
}

/// Whether the app's writer commits new transfers: a writer left paused by a freeze hook
/// (no thaw after a failed freeze) stands still.
async fn app_commits_on(agent: &GuestAgent, dir: &str) -> Result<(bool, String), RunError> {
    let transfers = || async {
        let out = crate::qemu::exec::sh(agent, &format!("quiesce-app status {dir}"), T)
            .await
            .map_err(gfail("reading the app's status"))?;
        // "running pid=N transfers=M" or "stopped transfers=M"
        let n = out.split_whitespace().find_map(|w| w.strip_prefix("transfers=")).and_then(|n| n.parse::<u64>().ok());
        Ok::<_, RunError>((out.starts_with("running"), n.unwrap_or(0)))
    };
    let (running, first) = transfers().await?;
    if !running {
        return Ok((false, format!("the writer is not running ({first} transfers)")));
    }
    let deadline = Instant::now() + T;
    loop {
        let (_, now) = transfers().await?;
        if now > first {
            return Ok((true, "the writer commits on".into()));
        }
        if Instant::now() > deadline {
            return Ok((false, format!("no transfer committed in {}s (stuck at {first})", T.as_secs())));
        }
        // A poll, not a synchronisation: the writer commits every few ms when it runs.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn prepare_vm(
    s: &Scenario,
    spec: &VmSpec,
    opts: &RunOptions,
    work: &Path,
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
            partitioning: d.partition,
        };
        let path = seed::create(&dir, &seed).map_err(fail(&format!("VM {name}")))?;
        extra.push(DiskConfig { node_name: seed.name, path, format: seed.format, read_only: false });
    }
    let mut gopts = GuestOptions::named(name);
    gopts.accel = opts.accel;
    gopts.memory_mib = *spec.memory_mib.get_ref();
    gopts.extra_disks = extra;
    gopts.artifacts_dir = opts.artifacts_dir.clone();
    gopts.disk_dir = Some(dir.clone());
    let guest = testguest::boot(gopts, progress).await.map_err(fail(&format!("booting VM {name}")))?;
    let agent = guest.machine.agent().map_err(fail(name))?;
    for d in &spec.disks {
        let d = d.get_ref();
        let Some(fstype) = d.filesystem.guest_type().filter(|_| d.mount) else { continue };
        workload::mount_disk(agent, d.name.get_ref(), fstype).await.map_err(gfail("mounting a data disk"))?;
    }
    let boot_id = Some(workload::boot_id(agent).await.map_err(gfail("reading boot_id"))?);
    let mut counter_before = None;
    if spec.workload.counter {
        workload::start_counter(agent).await.map_err(gfail("starting the counter"))?;
        counter_before = Some(workload::wait_counter_above(agent, 0, T).await.map_err(gfail("reading the counter"))?);
    }
    let journal = spec.workload.journal.as_ref().map(|j| format!("/mnt/{}/journal", j.get_ref()));
    if let Some(path) = &journal {
        workload::start_journal(agent, path).await.map_err(gfail("starting the journal"))?;
    }
    let app = spec.workload.app.as_ref().map(|a| app_dir(a.get_ref()));
    if let Some(dir) = &app {
        workload::start_app(agent, dir).await.map_err(gfail("starting the app"))?;
    }
    if spec.agent == AgentState::Stopped {
        workload::stop_agent(agent, T).await.map_err(fail("stopping the guest agent"))?;
    }
    if spec.state == VmState::Paused {
        pause(&guest.machine).await?;
    }
    let wants_token = s.file.restore.as_ref().is_some_and(|r| r.checks.get_ref().contains(&Check::RootFromBackup));
    let root_token = if wants_token {
        let token = format!("{}-{}", name, boot_id.as_deref().unwrap_or("?"));
        crate::qemu::exec::sh(agent, &format!("echo {token} > {ROOT_TOKEN} && sync"), T)
            .await
            .map_err(gfail("writing the root token"))?;
        Some(token)
    } else {
        None
    };
    Ok(Vm { spec: spec.clone(), guest, dir, boot_id, counter_before, journal, journal_before: None, app, root_token })
}

async fn pause(m: &Machine) -> Result<(), RunError> {
    m.qmp().execute_raw("stop", serde_json::Value::Null, T).await.map_err(fail("stop"))?;
    m.qmp().wait_event("STOP", |_| true, T).await.map_err(fail("wait for STOP"))?;
    Ok(())
}

/// The VM is back as it was: same run state, disks active and its own (no overlay left),
/// workloads running on with nothing lost.
async fn after_backup_checks(vm: &Vm, method: Method, report: &mut Report) -> Result<(), RunError> {
    let m = &vm.guest.machine;
    let name = vm.name().to_owned();
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
    if method == Method::ChildSnapshot {
        let (ok, detail) = own_images(m).await?;
        report.check(&name, "overlays-merged", ok, detail);
    }
    if !st.running || vm.spec.agent == AgentState::Stopped {
        return Ok(());
    }
    let agent = m.agent().map_err(fail(&name))?;
    if vm.counter_before.is_some() {
        let now = workload::read_counter(agent).await.map_err(gfail("reading the counter"))?;
        let moved = workload::wait_counter_above(agent, now, T).await;
        report.check(
            &name,
            "runs-on-after-backup",
            moved.is_ok(),
            format!("counter moved on from {now}: {}", moved.is_ok()),
        );
    }
    if let Some(path) = &vm.journal {
        let (ok, detail) = journal_kept(vm, path, report).await?;
        report.check(&name, "nothing-lost-after-backup", ok, detail);
    }
    Ok(())
}

/// The journal's lines on disk just before the job, for a VM whose guest can be asked.
async fn journal_lines_before(vm: &Vm) -> Result<Option<u64>, RunError> {
    let Some(path) = &vm.journal else { return Ok(None) };
    if vm.spec.state != VmState::Running || vm.spec.agent == AgentState::Stopped {
        return Ok(None);
    }
    let agent = vm.guest.machine.agent().map_err(fail(vm.name()))?;
    let j = workload::check_journal(agent, path).await.map_err(gfail("counting the journal before the job"))?;
    Ok(Some(j.lines))
}

/// Reads the journal back from the VM's disks after the job: every line written before it
/// must be there, in sequence, and so must every line written during it (the sequence has
/// no gap up to the last line read). The count lost goes into the report and the fixture.
async fn journal_kept(vm: &Vm, path: &str, report: &mut Report) -> Result<(bool, String), RunError> {
    let agent = vm.guest.machine.agent().map_err(fail(vm.name()))?;
    let j = workload::check_journal(agent, path).await.map_err(gfail("checking the journal"))?;
    let before = vm.journal_before.unwrap_or(0);
    let lost = j.lost_of(before);
    if let Some(r) = report.vm_mut(vm.name()) {
        r.journal = Some(JournalReport { before_job: vm.journal_before, read_back: j.lines, lost });
    }
    let detail = format!(
        "{} lines read back from disk ({} written before the job), {lost} lost, first break {:?}",
        j.lines, before, j.first_break
    );
    Ok((j.intact() && lost == 0, detail))
}

/// True if every disk is back on its own image file and no overlay file is left beside it.
async fn own_images(m: &Machine) -> Result<(bool, String), RunError> {
    let blocks = m.qmp().execute_raw("query-block", serde_json::Value::Null, T).await.map_err(fail("query-block"))?;
    let mut wrong = Vec::new();
    for d in &m.config().disks {
        let dev = format!("{}-dev", d.node_name);
        let file = blocks
            .as_array()
            .and_then(|a| a.iter().find(|b| b["qdev"].as_str().is_some_and(|q| q.contains(&dev))))
            .and_then(|b| b["inserted"]["file"].as_str())
            .unwrap_or("?");
        if Path::new(file) != d.path {
            wrong.push(format!("{} on {file}", d.node_name));
        }
    }
    Ok((wrong.is_empty(), if wrong.is_empty() { "every disk is on its own image".into() } else { wrong.join(", ") }))
}

async fn restore_and_check(
    s: &Scenario,
    vm: &Vm,
    backup: &Backup,
    rspec: &RestoreSpec,
    opts: &RunOptions,
    tl: &Timeline,
    report: &mut Report,
) -> Result<(), RunError> {
    let checks = &rspec.checks.get_ref()[..];
    let name = vm.name().to_owned();
    let vb = backup.vm(&name).ok_or_else(|| RunError(format!("the backup has no VM {name}")))?.clone();
    let mut ro = RestoreOptions::named(&format!("{name}-restored"));
    ro.artifacts_dir = opts.artifacts_dir.clone();
    ro.resume = false;
    // A saved state's disks are crash-consistent by design; fsck is the proof for frozen ones.
    if checks.contains(&Check::FsckClean) && vb.method == Method::ChildSnapshot {
        // The root disk is ext4, and so are data disks seeded as ext4.
        let mut ext4 = vec!["root".to_owned()];
        ext4.extend(ext4_disks(vm));
        fsck_backup(backup, &vb, &ext4, report)?;
    }
    // The backup point of each disk whose files the scenario compares.
    let wanted: Vec<&ManifestSpec> = rspec
        .manifests
        .iter()
        .map(|m| m.get_ref())
        .filter(|m| m.applies_to(&name))
        .filter(|m| m.disk.get_ref() == "root" || vm.spec.disks.iter().any(|d| d.get_ref().name == m.disk))
        .collect();
    let points = if checks.contains(&Check::ManifestMatchesBackup) {
        tl.step(Some(&name), "read the backup point's manifests", async {
            disk_checks::backup_points(backup, &vb, &wanted).await
        })
        .await?
    } else {
        vec![]
    };
    let mut restored = match vb.method {
        Method::SavedState => restore::saved_state(backup, &name, &ro, tl).await,
        Method::ChildSnapshot => restore::boot(backup, &name, &ro, tl).await,
    }
    .map_err(fail("restore"))?;
    // Faults on the restored image itself, before its guest runs.
    let mut flipped = Vec::new();
    for f in faults(s, &name, FaultKind::FlipByteInRestore) {
        let (disk, path) = fault_target(f);
        let d = vb.disks.iter().find(|d| d.node_name == disk).ok_or_else(|| RunError(format!("no disk {disk}")))?;
        let (offset, byte) = corrupt::locate_ext4(&backup.vm_dir(&name).join(&d.file), d.format, &path)
            .map_err(fail("locating the file to corrupt"))?;
        tl.step(Some(restored.machine.name()), "flip a byte in the restored image", async {
            corrupt::write_byte(&restored.machine, &disk, offset, byte ^ 0x01).await
        })
        .await
        .map_err(fail("corrupting the restored image"))?;
        flipped.push((disk, path, offset));
    }
    if checks.contains(&Check::DisksMatchBackup) {
        let mut all = true;
        for d in &vb.disks {
            let overlay = &restored.disks.iter().find(|(n, _)| n == &d.node_name).expect("one overlay per disk").1;
            let same = qemu_img::identical(overlay, DiskFormat::Qcow2, &backup.vm_dir(&name).join(&d.file), d.format)
                .map_err(fail("comparing a restored disk"))?;
            all &= same;
        }
        report.check(
            &name,
            "disks-match-backup",
            all,
            format!("{} disks compared before the guest ran", vb.disks.len()),
        );
    }
    if checks.contains(&Check::BlocksMatchBackup) {
        let results = tl
            .step(
                Some(&name),
                "compare blocks with the backup",
                disk_checks::compare_blocks(backup, &vb, &restored.disks),
            )
            .await?;
        let differ: Vec<String> =
            results.iter().filter(|(_, c)| !c.identical).map(|(d, c)| format!("{d}: {c}")).collect();
        if rspec.expect == RestoreExpect::Mismatch {
            // Each flipped byte is the first difference of its disk, at its exact offset.
            let found = flipped
                .iter()
                .all(|(disk, _, off)| results.iter().any(|(d, c)| d == disk && c.first_difference == Some(*off)));
            let detail = format!("flipped at {:?}; found: {differ:?}", flipped.iter().map(|f| f.2).collect::<Vec<_>>());
            report.check(&name, "blocks-name-the-flipped-byte", found && !flipped.is_empty(), detail);
        } else {
            let detail = if differ.is_empty() {
                format!("{} disks identical to the backup, allocated data compared", results.len())
            } else {
                differ.join("; ")
            };
            report.check(&name, "blocks-match-backup", differ.is_empty(), detail);
        }
    }
    let m = &mut restored.machine;
    let state_after_restore = match vb.method {
        Method::SavedState if vm.spec.state == VmState::Running => {
            tl.step(Some(m.name()), "resume", restore::resume(m)).await.map_err(fail("resume"))?;
            runstate::query(m).await.map_err(fail("query-status"))?.label().to_owned()
        }
        Method::SavedState => {
            // A paused VM stays paused; it is continued only to look inside it.
            let label = runstate::query(m).await.map_err(fail("query-status"))?.label().to_owned();
            restore::resume(m).await.map_err(fail("resume for checks"))?;
            label
        }
        Method::ChildSnapshot => {
            let restored_name = m.name().to_owned();
            tl.step(Some(&restored_name), "boot", async {
                restore::resume(m).await?;
                m.wait_agent(restore::BOOT_DEADLINE).await.map_err(|e| crate::verify::RestoreError::Machine {
                    vm: name.clone(),
                    step: "boot".into(),
                    error: e,
                })
            })
            .await
            .map_err(fail("booting the restored VM"))?;
            "booted".to_owned()
        }
    };
    let want = match vb.method {
        Method::SavedState => label(vm.spec.state),
        Method::ChildSnapshot => "booted",
    };
    report.check(
        &name,
        "state-after-restore",
        state_after_restore == want,
        format!("{state_after_restore} after restore"),
    );
    report.restores.push(RestoreReport { vm: name.clone(), state_after_restore, restore_ms: restored.restore_ms });
    if vm.spec.agent == AgentState::Stopped {
        return Ok(());
    }
    let m = &restored.machine;
    let agent = m.agent().map_err(fail(&name))?;
    agent.wait_ready(T).await.map_err(fail("waiting for the restored guest's agent"))?;
    if vb.method == Method::ChildSnapshot {
        if checks.contains(&Check::GuestFsck) {
            let mut bad = Vec::new();
            let disks = ext4_disks(vm);
            for disk in &disks {
                let r = verify::guest::fsck_ext4(agent, disk, Duration::from_secs(120))
                    .await
                    .map_err(gfail("e2fsck in the restored guest"))?;
                if !r.clean() {
                    bad.push(format!("{disk} ({}, exit {}): {}", r.device, r.exit_code, r.tail));
                }
            }
            let detail = if bad.is_empty() {
                format!("{} ext4 data disks clean in the guest", disks.len())
            } else {
                bad.join("; ")
            };
            report.check(&name, "guest-fsck-clean", bad.is_empty(), detail);
        }
        // A fresh boot: the data disks are not mounted yet.
        for d in &vm.spec.disks {
            if let Some(fstype) = d.get_ref().filesystem.guest_type().filter(|_| d.get_ref().mount) {
                workload::mount_disk(agent, d.get_ref().name.get_ref(), fstype)
                    .await
                    .map_err(gfail("mounting a restored disk"))?;
            }
        }
    }
    if checks.contains(&Check::RootFromBackup) {
        let got = workload::read_file(agent, ROOT_TOKEN).await.unwrap_or_default();
        let ok = vm.root_token.as_deref().is_some_and(|t| got.trim() == t);
        report.check(&name, "root-from-backup", ok, format!("{ROOT_TOKEN} written before the backup is there: {ok}"));
    }
    for check in checks {
        guest_check(*check, vm, vb.method, agent, report).await?;
    }
    let mut truncated = Vec::new();
    for f in faults(s, &name, FaultKind::TruncateInRestore) {
        let (disk, path) = fault_target(f);
        let file = format!("/mnt/{disk}{path}");
        crate::qemu::exec::sh(
            agent,
            &format!("s=$(stat -c %s '{file}') && truncate -s $((s / 2)) '{file}' && sync"),
            T,
        )
        .await
        .map_err(gfail("truncating a restored file"))?;
        truncated.push((disk, path));
    }
    if points.is_empty() {
        return Ok(());
    }
    // Files are read once the guest is down and its filesystems are clean.
    let m = &mut restored.machine;
    let restored_name = m.name().to_owned();
    tl.step(Some(&restored_name), "shut down", m.shutdown(T)).await.map_err(fail("shutting the restored VM down"))?;
    let diffs = tl
        .step(Some(&name), "compare manifests with the backup point", async {
            disk_checks::compare_manifests(&name, &points, &restored.disks, report).await
        })
        .await?;
    if rspec.expect == RestoreExpect::Mismatch {
        let corrupted: Vec<(String, String)> =
            flipped.iter().map(|(d, p, _)| (d.clone(), p.clone())).chain(truncated).collect();
        for (disk, path) in &corrupted {
            let named = diffs.iter().any(|(d, lines)| {
                d == disk && lines.iter().any(|l| l.split_whitespace().nth(1) == Some(path.as_str()))
            });
            report.check(&name, &format!("manifest-names {disk}:{path}"), named, "the corrupted file is named");
        }
    } else {
        for (disk, lines) in &diffs {
            let detail = if lines.is_empty() { "same files as the backup point".into() } else { lines.join("; ") };
            report.check(&name, &format!("manifest-matches-backup {disk}"), lines.is_empty(), detail);
        }
    }
    Ok(())
}

/// Where a restore's guest finds the token written before the backup.
const ROOT_TOKEN: &str = "/root/quiesce-root-token";

/// The names of the VM's ext4 data disks.
fn ext4_disks(vm: &Vm) -> Vec<String> {
    vm.spec
        .disks
        .iter()
        .map(|d| d.get_ref())
        .filter(|d| d.filesystem == Filesystem::Ext4)
        .map(|d| d.name.get_ref().clone())
        .collect()
}

fn faults<'a>(s: &'a Scenario, vm: &'a str, kind: FaultKind) -> impl Iterator<Item = &'a FaultSpec> + 'a {
    s.file.faults.iter().map(|f| f.get_ref()).filter(move |f| f.vm.get_ref() == vm && f.kind == kind)
}

/// The disk and path of a fault on a restored file (checked present when the file was read).
fn fault_target(f: &FaultSpec) -> (String, String) {
    let get = |x: &Option<toml::Spanned<String>>| x.as_ref().map(|v| v.get_ref().clone()).unwrap_or_default();
    (get(&f.disk), get(&f.path))
}

/// `e2fsck -fn` of the backup's ext4 disks, read on the host.
fn fsck_backup(
    backup: &Backup,
    vb: &crate::backup::VmBackup,
    ext4: &[String],
    report: &mut Report,
) -> Result<(), RunError> {
    let mut bad = Vec::new();
    for d in vb.disks.iter().filter(|d| ext4.contains(&d.node_name)) {
        let r = fsck::ext4(&backup.vm_dir(&vb.name).join(&d.file), d.format).map_err(fail("e2fsck"))?;
        if !r.clean {
            bad.push(format!("{} (exit {}): {}", d.node_name, r.exit_code, r.tail));
        }
    }
    let detail = if bad.is_empty() { format!("{} ext4 disks clean", ext4.len()) } else { bad.join("; ") };
    report.check(&vb.name, "fsck-clean", bad.is_empty(), detail);
    Ok(())
}

async fn guest_check(
    check: Check,
    vm: &Vm,
    method: Method,
    agent: &GuestAgent,
    report: &mut Report,
) -> Result<(), RunError> {
    let name = vm.name().to_owned();
    match check {
        // Checked on the host, or before the guest ran.
        Check::DisksMatchBackup
        | Check::FsckClean
        | Check::ManifestMatchesBackup
        | Check::BlocksMatchBackup
        | Check::GuestFsck
        | Check::RootFromBackup => {}
        // A disk-only backup boots afresh: there is no boot or counter to continue.
        Check::SameBoot | Check::CounterContinues if method == Method::ChildSnapshot => {}
        Check::CounterContinues if vm.counter_before.is_none() => {}
        Check::SameBoot => {
            let now = workload::boot_id(agent).await.map_err(gfail("reading boot_id"))?;
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
            let c = workload::read_counter(agent).await.map_err(gfail("reading the counter"))?;
            let moves = workload::wait_counter_above(agent, c, T).await.is_ok();
            let detail = format!("{c} >= {before} read before the backup, and moving: {moves}");
            report.check(&name, "counter-continues", c >= before && moves, detail);
        }
        Check::FilesMatchSeed => {
            let mut bad = Vec::new();
            let mut n = 0;
            for d in vm.spec.disks.iter().map(|d| d.get_ref()).filter(|d| d.mount) {
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
            // In a set, a check applies to the VMs that run its workload.
            None => {}
            Some(path) => {
                let j = workload::check_journal(agent, path).await.map_err(gfail("checking the journal"))?;
                report.check(
                    &name,
                    "journal-intact",
                    j.intact(),
                    format!("{} lines, first break {:?}", j.lines, j.first_break),
                );
            }
        },
        Check::AppConsistent => match &vm.app {
            None => {}
            Some(dir) => {
                if method == Method::SavedState {
                    // Same boot: the writer runs on; stop it so the check sees a settled store.
                    crate::qemu::exec::sh(agent, &format!("quiesce-app stop {dir}"), T)
                        .await
                        .map_err(gfail("stopping the app"))?;
                }
                let r = workload::check_app(agent, dir).await.map_err(gfail("checking the app"))?;
                report.check(&name, "app-consistent", r.is_ok(), r.unwrap_or_else(|e| e));
            }
        },
    }
    Ok(())
}
