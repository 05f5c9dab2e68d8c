//! Saved State on a real guest: the VM returns to its prior state, and the restore
//! continues the same boot.

use std::time::Duration;

use quiesce::backup::saved_state::SaveSettings;
use quiesce::backup::{job, runstate, Backup, BackupWriter};
use quiesce::qemu::caps;
use quiesce::timeline::Timeline;
use quiesce::verify::{restore, RestoreOptions};
use quiesce::workload;

use crate::common;

const T: Duration = Duration::from_secs(30);

#[tokio::test]
async fn running_vm_is_saved_runs_on_and_restores_into_the_same_boot() {
    let mut opts = common::options("ss-running");
    opts.memory_mib = 256;
    let guest = common::boot_with(opts).await;
    let m = &guest.machine;
    let agent = m.agent().unwrap();
    workload::start_counter(agent).await.unwrap();
    let boot_id = workload::boot_id(agent).await.unwrap();
    let before = workload::wait_counter_above(agent, 0, T).await.unwrap();
    let caps = caps::probe("qemu-system-x86_64").await.unwrap();
    let out = tempfile::tempdir().unwrap();
    let tl = Timeline::new();
    let mut w = BackupWriter::create(&out.path().join("b"), &caps.version).unwrap();
    let vm = job::saved_state(m, &caps, &SaveSettings::default(), "test", &mut w, &tl).await.unwrap();
    let backup = w.commit().unwrap();
    assert_eq!(vm.run_state_before, runstate::Activity::Running);
    assert!(vm.timings.downtime_ms.is_some());
    // It runs on: running, disks active, the counter moves.
    assert!(runstate::query(m).await.unwrap().running);
    assert!(runstate::inactive_nodes(m).await.unwrap().is_empty());
    let a = workload::read_counter(agent).await.unwrap();
    workload::wait_counter_above(agent, a, T).await.expect("the counter runs on after the backup");

    let reopened = Backup::open(&backup.path).unwrap();
    assert!(reopened.verify().unwrap().is_empty());
    let mut ro = RestoreOptions::named("ss-running-restored");
    ro.artifacts_dir = Some(common::artifacts());
    let restored = restore::saved_state(&reopened, "ss-running", &ro, &tl).await.unwrap();
    let ragent = restored.machine.agent().unwrap();
    ragent.wait_ready(T).await.unwrap();
    assert_eq!(workload::boot_id(ragent).await.unwrap(), boot_id);
    // It keeps counting from where it was: at least the value read before the backup, and on.
    let c = workload::read_counter(ragent).await.unwrap();
    assert!(c >= before, "restored counter {c} is behind {before}, read before the backup");
    workload::wait_counter_above(ragent, c, T).await.expect("the restored counter runs on");
    eprintln!("timings: {:?}", vm.timings);
}
