//! Child VM Snapshot on a real guest: freeze, one transaction, thaw, copy out, merge back.

use std::sync::Mutex;
use std::time::Duration;

use quiesce::backup::child_snapshot::{SnapshotSettings, Undo};
use quiesce::backup::job::{self, JobSettings, MethodChoice};
use quiesce::backup::saved_state::SaveSettings;
use quiesce::backup::{BackupWriter, Faults, Method};
use quiesce::image::seed::{self, DiskSeed};
use quiesce::qemu::{caps, DiskFormat};
use quiesce::timeline::Timeline;
use quiesce::verify::{restore, RestoreOptions};
use quiesce::workload;

use crate::common;

#[tokio::test]
async fn snapshot_keeps_writes_made_during_the_backup_and_restores_bootable() {
    let disks = tempfile::tempdir().unwrap();
    let path = seed::create(disks.path(), &DiskSeed::ext4("data", DiskFormat::Qcow2, 64 << 20)).unwrap();
    let opts = common::with_data_disk("cs", path.clone(), DiskFormat::Qcow2);
    let guest = common::boot_with(opts).await;
    let m = &guest.machine;
    let agent = m.agent().unwrap();
    workload::mount_disk(agent, "data", "ext4").await.unwrap();
    workload::start_journal(agent, "/mnt/data/journal").await.unwrap();

    let caps = caps::probe("qemu-system-x86_64").await.unwrap();
    let tl = Timeline::new();
    let snapdir = disks.path();
    let choice = job::choose(m, MethodChoice::Auto, snapdir, &tl).await.unwrap();
    assert_eq!(choice.method, Method::ChildSnapshot, "{}: {:?}", choice.reason, choice.conditions);
    let out = tempfile::tempdir().unwrap();
    let mut w = BackupWriter::create(&out.path().join("b"), &caps.version).unwrap();
    let js = JobSettings {
        caps: &caps,
        save: SaveSettings::default(),
        snapshot: SnapshotSettings::new(snapdir),
        faults: Faults::default(),
    };
    let undo = Mutex::new(Undo::default());
    let vm = job::backup(m, &choice, &js, &mut w, &tl, &undo).await.unwrap();
    let backup = w.commit().unwrap();
    assert!(undo.lock().unwrap().is_clean());
    eprintln!("timings {:?}", vm.timings);

    // The VM runs on its own images again, with nothing left in the snapshot location.
    let blocks = m.qmp().execute_raw("query-block", serde_json::Value::Null, Duration::from_secs(10)).await.unwrap();
    for b in blocks.as_array().unwrap() {
        let file = b["inserted"]["image"]["filename"].as_str().unwrap_or("");
        assert!(!file.contains("-overlay.qcow2"), "still on an overlay: {file}");
    }
    assert!(std::fs::read_dir(snapdir)
        .unwrap()
        .flatten()
        .all(|e| !e.file_name().to_string_lossy().contains("overlay")));
    let j = workload::check_journal(agent, "/mnt/data/journal").await.unwrap();
    assert!(j.intact(), "{j:?}");

    let mut ro = RestoreOptions::named("cs-restored");
    ro.artifacts_dir = Some(common::artifacts());
    let restored = restore::boot(&backup, "cs", &ro, &tl).await.unwrap();
    let ragent = restored.machine.agent().unwrap();
    quiesce::qemu::exec::sh(ragent, "e2fsck -fn /dev/vdb", Duration::from_secs(60)).await.unwrap();
    workload::mount_disk(ragent, "data", "ext4").await.unwrap();
    let rj = workload::check_journal(ragent, "/mnt/data/journal").await.unwrap();
    assert!(rj.intact() && rj.lines <= j.lines, "{rj:?} vs live {j:?}");
}

/// An agent that answers the freeze and then never again within the undo's wait cannot be
/// thawed by anyone: the error says so, names the thaw, and the overlays are merged all the
/// same (that needs QEMU only).
#[tokio::test]
async fn an_agent_that_never_answers_after_the_freeze_is_reported_not_hidden() {
    let disks = tempfile::tempdir().unwrap();
    let path = seed::create(disks.path(), &DiskSeed::ext4("data", DiskFormat::Qcow2, 32 << 20)).unwrap();
    let guest = common::boot_with(common::with_data_disk("cs-silent", path, DiskFormat::Qcow2)).await;
    let m = &guest.machine;
    let agent = m.agent().unwrap();
    workload::mount_disk(agent, "data", "ext4").await.unwrap();
    // Silent far longer than the two short thaw deadlines below add up to.
    workload::stop_agent_after_next_freeze(agent, Duration::from_secs(120)).await.unwrap();

    let caps = caps::probe("qemu-system-x86_64").await.unwrap();
    let tl = Timeline::new();
    let choice = job::choose(m, MethodChoice::ChildSnapshot, disks.path(), &tl).await.unwrap();
    let mut snapshot = SnapshotSettings::new(disks.path());
    snapshot.thaw_deadline = Duration::from_secs(2);
    let out = tempfile::tempdir().unwrap();
    let mut w = BackupWriter::create(&out.path().join("b"), &caps.version).unwrap();
    let faults = Faults { agent_stops_after_freeze: true, ..Faults::default() };
    let js = JobSettings { caps: &caps, save: SaveSettings::default(), snapshot, faults };
    let undo = Mutex::new(Undo::default());
    let err = job::backup(m, &choice, &js, &mut w, &tl, &undo).await.unwrap_err().to_string();
    eprintln!("{err}");
    assert!(err.contains("guest-fsfreeze-thaw"), "{err}");
    assert!(err.contains("to its prior state failed too"), "{err}");
    assert!(!undo.lock().unwrap().is_clean(), "the guest is still frozen, and the undo must say so");

    let blocks = m.qmp().execute_raw("query-block", serde_json::Value::Null, Duration::from_secs(10)).await.unwrap();
    for b in blocks.as_array().unwrap() {
        let file = b["inserted"]["image"]["filename"].as_str().unwrap_or("");
        assert!(!file.contains("-overlay.qcow2"), "still on an overlay: {file}");
    }
}
