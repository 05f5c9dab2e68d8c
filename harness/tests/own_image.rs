//! A scenario on an image made outside quiesce (`image = { path, ... }`): the cached Linux
//! guest's root filesystem converted by `qemu-img` to qcow2, booted with the cached kernel
//! and initrd given beside it (a bare filesystem has no bootloader of its own). It is backed
//! up by Child VM Snapshot and by Saved State with the real qemu-ga in it, restored and
//! checked, and the image file is proved unchanged: the same hash before and after.
//!
//! The scenario file is written into a temp folder beside the image, so its relative paths
//! resolve as a user's would.

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

#[test]
fn an_own_image_is_backed_up_by_both_methods_and_never_written() {
    let img = quiesce::image::recipe::ensure("linux", false, &mut |m| eprintln!("  {m}")).expect("the cached guest");
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let dir = tmp.path();
    let own = dir.join("mine.qcow2");
    qemu_img::convert(&img.root, DiskFormat::Raw, &own, DiskFormat::Qcow2).expect("converting the cached root");
    std::fs::copy(&img.kernel, dir.join("vmlinuz")).unwrap();
    std::fs::copy(&img.initrd, dir.join("initrd.img")).unwrap();
    let before = hash(&own);
    let runs = [
        ("child-snapshot", r#""blocks-match-backup", "fsck-clean", "files-match-seed""#),
        ("saved-state", r#""same-boot", "disks-match-backup", "files-match-seed""#),
    ];
    for (method, checks) in runs {
        let path = dir.join(format!("{method}.toml"));
        std::fs::write(&path, scenario(method, checks, &img.cmdline)).unwrap();
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
