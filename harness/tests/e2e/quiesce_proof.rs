//! The consistency proofs bite. One guest, its app and journal writing to an ext4 data disk
//! throughout, is backed up by Child VM Snapshot once with the freeze (every proof holds)
//! and then [`RUNS`] times without it (the `skip-freeze` fault). Without the freeze, what
//! `fs-quiesced` and `app-consistent` read must fail on every run: an ext4 that needs a
//! journal replay, no acknowledgement from the app, a WAL left to replay. A proof that
//! passed once by chance would be counted, and the test fails on any.

use std::path::Path;
use std::sync::Mutex;

use quiesce::backup::child_snapshot::{SnapshotSettings, Undo};
use quiesce::backup::job::{self, Choice, JobSettings, MethodChoice};
use quiesce::backup::saved_state::SaveSettings;
use quiesce::backup::{Backup, BackupWriter, Faults, Method, VmBackup};
use quiesce::image::fsread::state::Quiesced;
use quiesce::image::inspect::{FsState, RawImage};
use quiesce::qemu::caps::{self, Capabilities};
use quiesce::qemu::{DiskFormat, Machine};
use quiesce::timeline::Timeline;
use quiesce::workload;

use crate::common;

/// Backups taken without the freeze; each must fail every proof.
const RUNS: usize = 10;
const APP_DIR: &str = "/mnt/data";

/// What the proofs read from one backup.
#[derive(Debug)]
struct Read {
    /// Per ext4 volume (disk name), whether it was frozen clean.
    clean: Vec<(String, bool)>,
    /// The app acknowledged this freeze, with its WAL emptied.
    acked: bool,
    /// The size of the app's WAL in the backup's image.
    wal: u64,
}

impl Read {
    fn fs_quiesced(&self) -> bool {
        !self.clean.is_empty() && self.clean.iter().all(|(_, c)| *c)
    }

    fn app_quiesced(&self) -> bool {
        self.acked && self.wal == 0
    }
}

async fn backup(
    m: &Machine,
    caps: &Capabilities,
    choice: &Choice,
    snapdir: &Path,
    faults: Faults,
    at: &Path,
) -> (Backup, VmBackup) {
    let tl = Timeline::new();
    let mut w = BackupWriter::create(at, &caps.version).unwrap();
    let js = JobSettings { caps, save: SaveSettings::default(), snapshot: SnapshotSettings::new(snapdir), faults };
    let undo = Mutex::new(Undo::default());
    let vb = job::backup(m, choice, &js, &mut w, &tl, &undo).await.unwrap();
    assert!(undo.lock().unwrap().is_clean());
    (w.commit().unwrap(), vb)
}

fn read(b: &Backup, vb: &VmBackup) -> Read {
    let mut clean = Vec::new();
    let mut wal = u64::MAX;
    for d in &vb.disks {
        let raw = RawImage::open(&b.vm_dir(&vb.name).join(&d.file), d.format).unwrap();
        for v in raw.states().unwrap() {
            if let FsState::Ext4(s) = v.fs {
                clean.push((d.node_name.clone(), s.quiesced() == Quiesced::Clean));
            }
        }
        if d.node_name == "data" {
            wal = raw.ext4_file("/app.db-wal", 0).unwrap().map_or(0, |f| f.size);
        }
    }
    let freeze = vb.freeze.as_ref().expect("a Child VM Snapshot records its freeze");
    let acked = freeze.ack("quiesce-app", APP_DIR).is_some_and(|a| a.checkpointed);
    Read { clean, acked, wal }
}

#[tokio::test]
async fn without_the_freeze_the_proofs_fail_every_time() {
    let disks = tempfile::tempdir().unwrap();
    let seed = quiesce::image::seed::DiskSeed::ext4("data", DiskFormat::Qcow2, 64 << 20);
    let path = quiesce::image::seed::create(disks.path(), &seed).unwrap();
    let guest = common::boot_with(common::with_data_disk("proof", path, DiskFormat::Qcow2)).await;
    let m = &guest.machine;
    let agent = m.agent().unwrap();
    workload::mount_disk(agent, "data", "ext4").await.unwrap();
    workload::start_journal(agent, "/mnt/data/journal").await.unwrap();
    workload::start_app(agent, APP_DIR).await.unwrap();

    let caps = caps::probe("qemu-system-x86_64").await.unwrap();
    let snapdir = disks.path();
    let choice = job::choose(m, MethodChoice::ChildSnapshot, snapdir, &Timeline::new()).await.unwrap();
    assert_eq!(choice.method, Method::ChildSnapshot);
    let out = tempfile::tempdir().unwrap();

    // With the freeze, every proof holds.
    let (b, vb) = backup(m, &caps, &choice, snapdir, Faults::default(), &out.path().join("frozen")).await;
    let frozen = read(&b, &vb);
    eprintln!("frozen: {frozen:?}; {}", vb.freeze.as_ref().unwrap().summary());
    assert!(frozen.fs_quiesced() && frozen.app_quiesced(), "{frozen:?}");
    assert_eq!(frozen.clean.len(), 2, "the root and data filesystems: {frozen:?}");
    std::fs::remove_dir_all(&b.path).unwrap();

    // Without it, none does, on any run.
    let faults = Faults { skip_freeze: true, ..Faults::default() };
    let mut by_chance = Vec::new();
    for run in 1..=RUNS {
        let (b, vb) = backup(m, &caps, &choice, snapdir, faults.clone(), &out.path().join(format!("live-{run}"))).await;
        let live = read(&b, &vb);
        eprintln!("run {run}: {live:?}; {}", vb.freeze.as_ref().unwrap().summary());
        assert!(vb.freeze.as_ref().unwrap().freeze_cs.is_none(), "no freeze hook may run without a freeze");
        if live.fs_quiesced() || live.clean.iter().any(|(_, c)| *c) {
            by_chance.push(format!("run {run}: fs-quiesced {live:?}"));
        }
        if live.app_quiesced() || live.acked || live.wal == 0 {
            by_chance.push(format!("run {run}: app-consistent {live:?}"));
        }
        std::fs::remove_dir_all(&b.path).unwrap();
    }
    assert!(by_chance.is_empty(), "a proof passed without the freeze: {by_chance:#?}");
    let j = workload::check_journal(agent, "/mnt/data/journal").await.unwrap();
    assert!(j.intact(), "{j:?}");
}
