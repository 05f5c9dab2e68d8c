//! Scenarios on images made outside quiesce (`image = { path, ... }`), from the cached Linux
//! guest laid out as installers lay disks out (an MBR partition table, partitions at MiB
//! boundaries) and converted by `qemu-img` to qcow2:
//!
//! - with its own bootloader: a BIOS disk, syslinux's MBR code booting a FAT `/boot`
//!   partition with syslinux, the kernel and the initrd in it, the root filesystem in
//!   partition 2. The scenario gives no kernel: SeaBIOS boots the disk, as a user's image
//!   boots. Skipped, saying why, where syslinux or mtools are missing (CI installs them).
//! - without one (a bare root filesystem in partition 1): booted with the cached kernel and
//!   initrd given beside it and `root=/dev/vda1`.
//!
//! Each is backed up by Child VM Snapshot and by Saved State with the real qemu-ga in it,
//! restored (the restore boots the backup's disks the same way) and checked, and the image
//! file is proved unchanged: the same hash before and after. The scenario files are written
//! into a temp folder beside the image, so their relative paths resolve as a user's would.

use std::path::Path;

use quiesce::image::{qemu_img, GuestImage};
use quiesce::qemu::DiskFormat;
use quiesce::scenario::{self, RunOptions};

use crate::common::bootdisk;

fn hash(path: &Path) -> blake3::Hash {
    blake3::hash(&std::fs::read(path).expect("reading the image"))
}

/// A scenario with one VM on `image` (the inside of its `image = { ... }`) and a data disk.
fn scenario(method: &str, checks: &str, image: &str) -> String {
    format!(
        r#"description = "An image you bring, backed up by {method}"
[[vm]]
name = "mine"
image = {{ {image} }}
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

fn cached_guest() -> GuestImage {
    quiesce::image::recipe::ensure("linux", false, &mut |m| eprintln!("  {m}")).expect("the cached guest")
}

/// `raw` converted to `dir/mine.qcow2` (and removed), as a user's image would come.
fn to_qcow2(raw: &Path, dir: &Path) -> std::path::PathBuf {
    let own = dir.join("mine.qcow2");
    qemu_img::convert(raw, DiskFormat::Raw, &own, DiskFormat::Qcow2).expect("converting the disk");
    std::fs::remove_file(raw).unwrap();
    own
}

/// Runs a scenario on `image` by each method from `dir`, where the image is `own`: each must
/// pass its restore checks and leave the image's bytes as they were.
fn backed_up_by_both_methods(dir: &Path, own: &Path, image: &str) {
    let before = hash(own);
    let runs = [
        ("child-snapshot", r#""blocks-match-backup", "fsck-clean", "files-match-seed""#),
        ("saved-state", r#""same-boot", "disks-match-backup", "files-match-seed""#),
    ];
    for (method, checks) in runs {
        let path = dir.join(format!("{method}.toml"));
        std::fs::write(&path, scenario(method, checks, image)).unwrap();
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
        assert_eq!(hash(own), before, "{method} wrote the image the user brought");
    }
}

#[test]
fn an_own_image_with_its_own_bootloader_boots_from_it_and_is_backed_up_by_both_methods() {
    let tools = match bootdisk::bios_tools() {
        Ok(t) => t,
        Err(why) => {
            eprintln!(
                "SKIPPED an_own_image_with_its_own_bootloader_boots_from_it_and_is_backed_up_by_both_methods: {why}"
            );
            return;
        }
    };
    let img = cached_guest();
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let dir = tmp.path();
    let raw = dir.join("bootable.raw");
    bootdisk::bios_disk(&tools, &img, &raw);
    let own = to_qcow2(&raw, dir);
    // No kernel beside it: only the disk's own bootloader can boot it.
    assert!(std::fs::read_dir(dir).unwrap().flatten().all(|e| e.path() == own), "only the image is in {dir:?}");
    backed_up_by_both_methods(dir, &own, r#"path = "mine.qcow2", format = "qcow2", os = "linux""#);
}

#[test]
fn an_own_image_without_a_bootloader_boots_from_the_kernel_beside_it() {
    let img = cached_guest();
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let dir = tmp.path();
    let raw = dir.join("partitioned.raw");
    bootdisk::mbr_disk(&raw, None, &[bootdisk::Part { kind: bootdisk::LINUX, active: false, bytes: &img.root }]);
    let own = to_qcow2(&raw, dir);
    let append = bootdisk::cmdline_on(&img, "root=/dev/vda1");
    std::fs::copy(&img.kernel, dir.join("vmlinuz")).unwrap();
    std::fs::copy(&img.initrd, dir.join("initrd.img")).unwrap();
    let image = format!(
        r#"path = "mine.qcow2", format = "qcow2", os = "linux", kernel = "vmlinuz", initrd = "initrd.img", append = "{append}""#
    );
    backed_up_by_both_methods(dir, &own, &image);
}
