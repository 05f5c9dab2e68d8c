//! A scenario on an image made outside quiesce (`image = { path, ... }`): the cached Linux
//! guest's root filesystem (a bare ext4 image) put in the first partition of a disk with an
//! MBR partition table, as installers lay disks out, and converted by `qemu-img` to qcow2.
//! It boots with the cached kernel and initrd given beside it and `root=/dev/vda1` (the
//! filesystem has no bootloader of its own). It is backed
//! up by Child VM Snapshot and by Saved State with the real qemu-ga in it, restored and
//! checked, and the image file is proved unchanged: the same hash before and after.
//!
//! The scenario file is written into a temp folder beside the image, so its relative paths
//! resolve as a user's would.

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

use quiesce::image::qemu_img;
use quiesce::qemu::DiskFormat;
use quiesce::scenario::{self, RunOptions};

fn hash(path: &Path) -> blake3::Hash {
    blake3::hash(&std::fs::read(path).expect("reading the image"))
}

fn scenario(method: &str, checks: &str, append: &str) -> String {
    format!(
        r#"description = "An image you bring, backed up by {method}"
[[vm]]
name = "mine"
image = {{ path = "mine.qcow2", format = "qcow2", os = "linux", kernel = "vmlinuz", initrd = "initrd.img", append = "{append}" }}
[[vm.disk]]
name = "data"
format = "qcow2"
size = "32M"
filesystem = "ext4"
files = {{ "a.txt" = "one", "b.txt" = "two" }}
[backup]
method = "{method}"
[restore]
checks = [{checks}]
"#
    )
}

/// Where the partition starts: 1 MiB, as fdisk and parted align it.
const PART_START: u64 = 1 << 20;

/// Writes `raw`: an MBR with one Linux partition (type 0x83) at [`PART_START`] holding
/// `root`'s bytes. The partition table is written here, not by sfdisk, so the test needs no
/// tool the CI image may lack.
fn partitioned(root: &Path, raw: &Path) {
    let len = std::fs::metadata(root).unwrap().len();
    assert_eq!(len % 512, 0, "the root image is not whole sectors");
    let mut mbr = [0u8; 512];
    let entry = &mut mbr[446..462];
    entry[1..4].copy_from_slice(&[0xfe, 0xff, 0xff]); // CHS unused: LBA only
    entry[4] = 0x83;
    entry[5..8].copy_from_slice(&[0xfe, 0xff, 0xff]);
    entry[8..12].copy_from_slice(&u32::try_from(PART_START / 512).unwrap().to_le_bytes());
    entry[12..16].copy_from_slice(&u32::try_from(len / 512).unwrap().to_le_bytes());
    mbr[510..512].copy_from_slice(&[0x55, 0xaa]);
    let mut out = std::fs::File::create(raw).unwrap();
    out.write_all(&mbr).unwrap();
    out.seek(SeekFrom::Start(PART_START)).unwrap();
    std::io::copy(&mut std::fs::File::open(root).unwrap(), &mut out).unwrap();
    out.sync_all().unwrap();
}

#[test]
fn an_own_image_is_backed_up_by_both_methods_and_never_written() {
    let img = quiesce::image::recipe::ensure("linux", false, &mut |m| eprintln!("  {m}")).expect("the cached guest");
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let dir = tmp.path();
    let own = dir.join("mine.qcow2");
    let raw = dir.join("partitioned.raw");
    partitioned(&img.root, &raw);
    qemu_img::convert(&raw, DiskFormat::Raw, &own, DiskFormat::Qcow2).expect("converting the partitioned disk");
    std::fs::remove_file(&raw).unwrap();
    let append: String = img
        .cmdline
        .split_whitespace()
        .map(|arg| if arg == "root=/dev/vda" { "root=/dev/vda1" } else { arg })
        .collect::<Vec<_>>()
        .join(" ");
    assert!(append.contains("root=/dev/vda1"), "the recipe's command line names no root=/dev/vda: {}", img.cmdline);
    std::fs::copy(&img.kernel, dir.join("vmlinuz")).unwrap();
    std::fs::copy(&img.initrd, dir.join("initrd.img")).unwrap();
    let before = hash(&own);
    let runs = [
        ("child-snapshot", r#""blocks-match-backup", "fsck-clean", "files-match-seed""#),
        ("saved-state", r#""same-boot", "disks-match-backup", "files-match-seed""#),
    ];
    for (method, checks) in runs {
        let path = dir.join(format!("{method}.toml"));
        std::fs::write(&path, scenario(method, checks, &append)).unwrap();
        let s = scenario::load(&path).unwrap_or_else(|e| panic!("{e}"));
        let opts = RunOptions {
            accel: None,
            artifacts_dir: Some(dir.join("artifacts")),
            work_dir: dir.join("work"),
            keep_backup: false,
            interrupt: None,
        };
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let report = rt.block_on(scenario::run(&s, &opts, &mut |m| eprintln!("  {m}")));
        let json = serde_json::to_string_pretty(&report).unwrap_or_default();
        assert!(report.passed, "{method} on an own image did not pass: {:?}\n{json}", report.error);
        assert!(json.contains(&format!("\"{method}\"")) || json.contains(method), "{json}");
        assert_eq!(hash(&own), before, "{method} wrote the image the user brought");
    }
}
