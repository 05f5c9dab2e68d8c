//! An NTFS data disk on the real Linux test guest, without Windows: seeded on the host with
//! ntfs-3g's tools, mounted in the guest with the kernel's ntfs3 driver, written there, and
//! read back on the host by the manifest reader.
//!
//! It also pins down why such a disk rules out Child VM Snapshot: ntfs3 cannot be frozen
//! (FIFREEZE fails with EOPNOTSUPP), qemu-ga skips it silently and still says "frozen",
//! and writes keep reaching the disk meanwhile.

use std::time::{Duration, Instant};

use quiesce::backup::conditions::{Condition, Outcome};
use quiesce::backup::job::{self, MethodChoice};
use quiesce::backup::Method;
use quiesce::image::manifest::{self, EntryKind, FsKind};
use quiesce::image::seed::{self, DiskSeed, Filesystem, Partitioning};
use quiesce::qemu::{exec, DiskFormat, Qmp};
use quiesce::timeline::Timeline;
use quiesce::workload;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::common;

const T: Duration = Duration::from_secs(60);

/// Writes the guest's virtio disk `node` has made so far (QEMU's count, not the guest's).
async fn disk_writes(qmp: &Qmp, node: &str) -> Result<u64, String> {
    let stats =
        qmp.execute_raw("query-blockstats", Value::Null, Duration::from_secs(10)).await.map_err(|e| e.to_string())?;
    let dev = format!("{node}-dev");
    stats
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["node-name"] == node || s["qdev"].as_str().is_some_and(|q| q.contains(&dev)))
        .and_then(|s| s["stats"]["wr_operations"].as_u64())
        .ok_or_else(|| format!("no write count for {node} in {stats}"))
}

#[tokio::test]
async fn ntfs_disk_seeded_on_the_host_is_read_and_written_by_ntfs3_and_read_back() {
    let disks = tempfile::tempdir().unwrap();
    // Small (resident in its MFT record) and larger (in clusters of its own) files.
    let big: String = (0..20_000).map(|i| format!("line {i}\n")).collect();
    let files = [("hello.txt", "hello from the host\n".to_owned()), ("big.log", big)];
    let seed = DiskSeed {
        name: "data".into(),
        format: DiskFormat::Qcow2,
        size: 64 << 20,
        filesystem: Filesystem::Ntfs,
        files: files.iter().map(|(n, c)| (n.to_string(), c.clone())).collect(),
        partitioning: Partitioning::None,
    };
    let path = match seed::create(disks.path(), &seed) {
        Ok(p) => p,
        Err(e @ seed::SeedError::MissingTool { .. }) => {
            eprintln!("SKIPPED: {e}");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let seeded = manifest::read_image(&path, DiskFormat::Qcow2, &Default::default()).unwrap();
    let opts = common::with_data_disk("ntfs", path.clone(), DiskFormat::Qcow2);
    let mut guest = common::boot_with(opts).await;
    let m = &guest.machine;
    let agent = m.agent().unwrap();
    eprintln!("kernel {}", exec::sh(agent, "uname -r", T).await.unwrap().trim());

    // ntfs3 is a module: busybox modprobe loads it when mount asks for the type.
    let mnt = workload::mount_disk(agent, "data", Filesystem::Ntfs.guest_type().unwrap()).await.unwrap();
    let mounts = exec::sh(agent, "grep ' /mnt/data ' /proc/mounts", T).await.unwrap();
    assert!(mounts.contains(" /mnt/data ntfs3 rw,"), "{mounts}");
    for (name, content) in &files {
        let sum = exec::sh(agent, &format!("sha256sum {mnt}/{name}"), T).await.unwrap();
        assert_eq!(sum.split_whitespace().next(), Some(hex::encode(Sha256::digest(content)).as_str()), "{name}");
    }
    assert_eq!(workload::read_file(agent, &format!("{mnt}/hello.txt")).await.unwrap(), files[0].1);

    // The guest writes a file, a folder (which the host side could not seed) and a journal.
    let guest_file = "written by the guest\n";
    let deep_file = "in a folder made by the guest\n";
    exec::sh(
        agent,
        &format!("printf '{guest_file}' > {mnt}/guest.txt && mkdir {mnt}/sub && printf '{deep_file}' > {mnt}/sub/deep.txt && sync"),
        T,
    )
    .await
    .unwrap();
    workload::start_journal(agent, &format!("{mnt}/journal")).await.unwrap();
    workload::stop_journal(agent).await.unwrap();
    let journal = workload::check_journal(agent, &format!("{mnt}/journal")).await.unwrap();
    assert!(journal.intact(), "{journal:?}");

    // What the agent reports, and the six conditions: the ntfs3 mount fails the fifth.
    let fsinfo = agent.execute_raw("guest-get-fsinfo", Value::Null, T).await.unwrap();
    let ours = fsinfo.as_array().unwrap().iter().find(|f| f["mountpoint"] == "/mnt/data").unwrap();
    assert_eq!(ours["type"], "ntfs3", "{fsinfo}");
    let tl = Timeline::new();
    let choice = job::choose(m, MethodChoice::Auto, disks.path(), &tl).await.unwrap();
    assert_eq!(choice.method, Method::SavedState, "{}", choice.reason);
    assert_eq!(choice.conditions.len(), 6);
    for v in &choice.conditions {
        let expected =
            if v.condition == Condition::FilesystemsSupportSnapshots { Outcome::Failed } else { Outcome::Held };
        assert_eq!(v.outcome, expected, "{v:?}");
    }
    assert!(
        choice
            .reason
            .contains("filesystems-support-snapshots: /mnt/data is ntfs3: the Linux ntfs3 driver cannot freeze"),
        "{}",
        choice.reason
    );

    // The fact behind that verdict. FIFREEZE itself (busybox fsfreeze; thawed at once in
    // case a future kernel can freeze it, so the guest is never left frozen):
    let out = exec::run(
        agent,
        &[
            "/bin/sh",
            "-c",
            "fsfreeze --freeze /mnt/data; rc=$?; [ $rc -eq 0 ] && fsfreeze --unfreeze /mnt/data; exit $rc",
        ],
        T,
    )
    .await
    .unwrap();
    assert!(!out.success() && out.stderr.contains("Operation not supported"), "{out:?}");

    // Through the agent: it freezes the root ext4 only, yet reports "frozen"; a writer
    // started before the freeze keeps getting its writes to the NTFS disk.
    exec::sh(
        agent,
        "setsid sh -c 'i=0; while :; do i=$((i+1)); echo $i | dd of=/mnt/data/probe conv=fsync 2>/dev/null; \
         echo $i > /run/probe.n; usleep 50000; done' </dev/null >/dev/null 2>&1 & echo $! > /run/probe.pid; \
         i=0; until [ \"$(cat /run/probe.n 2>/dev/null)\" -ge 2 ] 2>/dev/null; do \
         i=$((i+1)); [ $i -gt 400 ] && exit 1; usleep 50000; done",
        T,
    )
    .await
    .unwrap();
    let frozen = agent.execute_raw("guest-fsfreeze-freeze", Value::Null, T).await.unwrap();
    // Nothing below may panic before the thaw: results are kept and checked after it.
    let status = agent.execute_raw("guest-fsfreeze-status", Value::Null, T).await;
    let qmp = m.qmp();
    let watched: Result<(u64, u64), String> = async {
        let at_freeze = disk_writes(qmp, "data").await?;
        // Three more writes to the NTFS disk while the agent says frozen, or the deadline.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let now = disk_writes(qmp, "data").await?;
            if now >= at_freeze + 3 || Instant::now() >= deadline {
                return Ok((at_freeze, now));
            }
            // A round trip to the guest paces the polling (guest-ping is allowed while frozen).
            agent.execute_raw("guest-ping", Value::Null, T).await.map_err(|e| e.to_string())?;
        }
    }
    .await;
    let still = agent.execute_raw("guest-fsfreeze-status", Value::Null, T).await;
    agent.execute_raw("guest-fsfreeze-thaw", Value::Null, T).await.unwrap();
    assert_eq!(frozen, 1, "the agent froze {frozen} filesystems: only the root ext4 was expected");
    assert_eq!(status.unwrap(), "frozen");
    assert_eq!(still.unwrap(), "frozen");
    let (at_freeze, after) = watched.unwrap();
    assert!(after >= at_freeze + 3, "the NTFS disk saw no writes while frozen ({at_freeze} -> {after})");
    eprintln!("writes to the ntfs3 disk while the agent said frozen: {at_freeze} -> {after}");
    workload::stop_background(agent, "/run/probe.pid").await.unwrap();
    exec::sh(agent, "umount /mnt/data", T).await.unwrap();

    // A clean shutdown, then the disk as the host reads it.
    guest.machine.shutdown(T).await.unwrap();
    let read = manifest::read_image(&path, DiskFormat::Qcow2, &Default::default()).unwrap();
    let [fs] = read.filesystems.as_slice() else { panic!("{read:?}") };
    assert_eq!(fs.kind, FsKind::Ntfs);
    assert_eq!(fs.label, "data");
    assert_eq!(fs.uuid, seeded.filesystems[0].uuid, "the guest changed the volume serial");
    let expect = files
        .iter()
        .map(|(n, c)| (format!("/{n}"), c.as_str()))
        .chain([("/guest.txt".to_owned(), guest_file), ("/sub/deep.txt".to_owned(), deep_file)]);
    for (p, content) in expect {
        let e = fs.entries.iter().find(|e| e.path == p).unwrap_or_else(|| panic!("{p} missing: {:?}", fs.entries));
        assert_eq!(e.kind, EntryKind::File, "{p}");
        assert_eq!(e.blake3.as_deref(), Some(blake3::hash(content.as_bytes()).to_hex().as_str()), "{p}");
    }
    assert!(fs.entries.iter().any(|e| e.path == "/sub" && e.kind == EntryKind::Dir));
    let j = fs.entries.iter().find(|e| e.path == "/journal").unwrap();
    let numbers: String = (1..=journal.lines).map(|i| format!("{i}\n")).collect();
    assert_eq!(j.blake3.as_deref(), Some(blake3::hash(numbers.as_bytes()).to_hex().as_str()), "journal");
}
