//! The "nothing lost" proof reads the journal from the VM's disks, not from the guest's
//! page cache: a line damaged on the disk behind a guest that still caches it is found.

use std::time::Duration;

use quiesce::image::seed::{self, DiskSeed};
use quiesce::qemu::{exec, DiskFormat};
use quiesce::verify::corrupt;
use quiesce::workload;

use crate::common;

const JOURNAL: &str = "/mnt/data/journal";

#[tokio::test]
async fn a_line_damaged_on_disk_is_found_though_the_guest_still_caches_it() {
    let disks = tempfile::tempdir().unwrap();
    let path = seed::create(disks.path(), &DiskSeed::ext4("data", DiskFormat::Qcow2, 32 << 20)).unwrap();
    let guest = common::boot_with(common::with_data_disk("journal", path.clone(), DiskFormat::Qcow2)).await;
    let m = &guest.machine;
    let agent = m.agent().unwrap();
    workload::mount_disk(agent, "data", "ext4").await.unwrap();
    workload::start_journal(agent, JOURNAL).await.unwrap();
    let wait = format!("while [ $(wc -l < {JOURNAL}) -lt 50 ]; do usleep 10000; done");
    exec::sh(agent, &wait, Duration::from_secs(30)).await.unwrap();
    workload::stop_journal(agent).await.unwrap();
    let before = workload::check_journal(agent, JOURNAL).await.unwrap();
    assert!(before.intact() && before.lost_of(before.lines) == 0, "{before:?}");

    // The guest reads the file once more so its cache is warm, then line 1 ("1") becomes "7"
    // on the disk through the device's own block backend; the guest is not told.
    exec::sh(agent, &format!("cat {JOURNAL} > /dev/null"), Duration::from_secs(10)).await.unwrap();
    let (offset, byte) = corrupt::locate_ext4(&path, DiskFormat::Qcow2, "/journal").unwrap();
    assert_eq!(byte, b'1', "the journal's first byte");
    corrupt::write_byte(m, "data", offset, b'7').await.unwrap();
    let cached = exec::sh(agent, &format!("head -c 1 {JOURNAL}"), Duration::from_secs(10)).await.unwrap();
    assert_eq!(cached, "1", "the guest's cache still holds the old line");

    let after = workload::check_journal(agent, JOURNAL).await.unwrap();
    assert_eq!(after.first_break, Some((1, "7".into())), "{after:?}");
    assert_eq!(after.lost_of(before.lines), before.lines);
}
