//! File-level manifests and diffs of real disk images: ext4 made by `seed::create` (and by
//! mkfs.ext4 with its default features), NTFS made by mkntfs (ntfs-3g), in every format.
//! No guest boots here; nothing needs root except the one NTFS test that mounts with FUSE,
//! which says so and is skipped where it cannot run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use quiesce::image::manifest::{self, Change, Entry, EntryKind, Field, FsKind, Limits, Manifest, ManifestError};
use quiesce::image::qemu_img;
use quiesce::image::seed::{self, DiskSeed, Filesystem, Partitioning};
use quiesce::qemu::DiskFormat;
use quiesce::sys::{deadline, Process, Tool};

use crate::common::rng::XorShift;

const MARKER: &str = "QUIESCE-MARKER-6b1f0c2e-only-in-one-file";

fn files(list: &[(&str, String)]) -> BTreeMap<String, String> {
    list.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
}

fn seed_in(dir: &Path, name: &str, format: DiskFormat, files: BTreeMap<String, String>) -> PathBuf {
    let seed = DiskSeed { files, ..DiskSeed::ext4(name, format, 16 << 20) };
    seed::create(dir, &seed).unwrap_or_else(|e| panic!("seeding {name}: {e}"))
}

fn subdir(root: &Path, name: &str) -> PathBuf {
    let d = root.join(name);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn read(path: &Path, format: DiskFormat) -> Manifest {
    manifest::read_image(path, format, &Limits::default()).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn entry<'m>(m: &'m Manifest, path: &str) -> &'m Entry {
    m.filesystems[0].entries.iter().find(|e| e.path == path).unwrap_or_else(|| panic!("{path} not in {m:#?}"))
}

fn blake3_hex(data: &[u8]) -> String {
    blake3::hash(data).to_hex().to_string()
}

fn sample_files() -> Vec<(&'static str, String)> {
    vec![
        ("hello.txt", "hello\n".to_string()),
        ("dir/sub/data.txt", "0123456789abcdef".repeat(6400)),
        ("dir/empty", String::new()),
        ("marker.txt", format!("{MARKER}\n{}", "payload line\n".repeat(700))),
    ]
}

#[test]
fn seeded_ext4_manifest_lists_the_files_and_is_the_same_in_every_format() {
    let dir = tempfile::tempdir().unwrap();
    let list = sample_files();
    let q = seed_in(&subdir(dir.path(), "q"), "data", DiskFormat::Qcow2, files(&list));
    let m = read(&q, DiskFormat::Qcow2);
    assert_eq!(m.filesystems.len(), 1, "{m:#?}");
    let fs = &m.filesystems[0];
    assert_eq!((fs.kind, fs.partition, fs.label.as_str()), (FsKind::Ext4, None, "data"));
    assert_eq!(fs.uuid.len(), 36, "{}", fs.uuid);
    assert!(m.unread.is_empty());
    for (path, content) in &list {
        let e = entry(&m, &format!("/{path}"));
        assert_eq!(e.kind, EntryKind::File);
        assert_eq!(e.size, content.len() as u64, "{path}");
        assert_eq!(e.blake3.as_deref(), Some(blake3_hex(content.as_bytes()).as_str()), "{path}");
        assert_eq!(e.mode, 0o644, "{path}");
    }
    for d in ["/", "/dir", "/dir/sub", "/lost+found"] {
        assert_eq!(entry(&m, d).kind, EntryKind::Dir, "{d}");
    }
    let paths: Vec<&str> = fs.entries.iter().map(|e| e.path.as_str()).collect();
    let mut sorted = paths.clone();
    sorted.sort();
    assert_eq!(paths, sorted, "entries are sorted by path");
    assert_eq!(paths.len(), 4 + 4, "{paths:?}");
    // Serialisable, and back.
    let json = serde_json::to_string(&m).unwrap();
    assert!(json.contains(r#""type":"file""#) && json.contains(r#""kind":"ext4""#), "{json}");
    assert_eq!(serde_json::from_str::<Manifest>(&json).unwrap(), m);

    for format in [DiskFormat::Raw, DiskFormat::Vpc, DiskFormat::Vhdx] {
        let p = seed_in(&subdir(dir.path(), format.driver()), "data", format, files(&list));
        let other = read(&p, format);
        assert_eq!(other, m, "{format:?} gives a different manifest");
        assert!(manifest::diff(&m, &other, &[]).is_empty());
        assert_eq!(manifest::probe_format(&p).unwrap(), format);
    }
}

/// Finds the marker's bytes in a raw image.
fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[test]
fn a_byte_flipped_in_a_files_data_is_named_as_changed_content() {
    let dir = tempfile::tempdir().unwrap();
    let good = seed_in(&subdir(dir.path(), "good"), "data", DiskFormat::Qcow2, files(&sample_files()));
    let raw = seed_in(&subdir(dir.path(), "raw"), "data", DiskFormat::Raw, files(&sample_files()));
    let mut bytes = std::fs::read(&raw).unwrap();
    let at = find(&bytes, MARKER.as_bytes()).expect("the marker is in the image once");
    assert!(find(&bytes[at + 1..], MARKER.as_bytes()).is_none());
    bytes[at + 100] ^= 0x01;
    std::fs::write(&raw, &bytes).unwrap();
    let bad = dir.path().join("bad.qcow2");
    qemu_img::convert(&raw, DiskFormat::Raw, &bad, DiskFormat::Qcow2).unwrap();
    assert!(!qemu_img::identical(&good, DiskFormat::Qcow2, &bad, DiskFormat::Qcow2).unwrap());

    let changes = manifest::diff(&read(&good, DiskFormat::Qcow2), &read(&bad, DiskFormat::Qcow2), &[]);
    assert_eq!(changes.len(), 1, "{changes:#?}");
    assert_eq!(changes[0].path(), Some("/marker.txt"));
    assert_eq!(changes[0].fields(), &[Field::Content]);
    assert_eq!(changes[0].to_string(), "~ /marker.txt content");
}

#[test]
fn a_truncated_file_is_named_with_both_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let full = "journal record\n".repeat(1000);
    let short = full[..4000].to_string();
    let keep = ("keep.txt", "unchanged\n".to_string());
    let a = seed_in(&subdir(dir.path(), "a"), "db", DiskFormat::Vhdx, files(&[keep.clone(), ("db/log", full)]));
    let b = seed_in(&subdir(dir.path(), "b"), "db", DiskFormat::Qcow2, files(&[keep, ("db/log", short)]));
    let changes = manifest::diff(&read(&a, DiskFormat::Vhdx), &read(&b, DiskFormat::Qcow2), &[]);
    assert_eq!(changes.len(), 1, "{changes:#?}");
    let Change::Changed { fields, before, after, .. } = &changes[0] else { panic!("{changes:?}") };
    assert_eq!(after.path, "/db/log");
    assert_eq!((before.size, after.size), (15000, 4000));
    assert_eq!(fields, &[Field::Size, Field::Content]);
    assert_eq!(changes[0].to_string(), "~ /db/log size 15000 -> 4000, content");
    // A volatile path is left out when asked.
    let ignored = manifest::diff(&read(&a, DiskFormat::Vhdx), &read(&b, DiskFormat::Qcow2), &["/db".to_string()]);
    assert!(ignored.is_empty(), "{ignored:?}");
}

#[test]
fn added_removed_and_mode_changes_on_a_default_ext4() {
    // mkfs.ext4 with Debian's defaults: extents, journal, metadata checksums, 64bit.
    let dir = tempfile::tempdir().unwrap();
    let mk = |name: &str, setup: &dyn Fn(&Path)| -> PathBuf {
        let root = subdir(dir.path(), &format!("{name}-root"));
        setup(&root);
        let img = dir.path().join(format!("{name}.raw"));
        std::fs::File::create(&img).unwrap().set_len(32 << 20).unwrap();
        let out = Tool::new("mkfs.ext4", deadline::MKFS)
            .args(["-q", "-F", "-L", "sys", "-U", "0b3c8a52-6f0e-4d5a-9c1e-2f3a4b5c6d7e", "-E", "root_owner=0:0", "-d"])
            .arg(&root)
            .arg(&img)
            .env("E2FSPROGS_FAKE_TIME", "1735689600")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", out.stderr);
        img
    };
    use std::os::unix::fs::{symlink, PermissionsExt};
    let a = mk("a", &|r| {
        std::fs::create_dir_all(r.join("etc")).unwrap();
        std::fs::write(r.join("etc/conf"), "x=1\n").unwrap();
        std::fs::write(r.join("gone"), "bye").unwrap();
        std::fs::write(r.join("big"), vec![7u8; 3 << 20]).unwrap();
        symlink("etc/conf", r.join("link")).unwrap();
    });
    let b = mk("b", &|r| {
        std::fs::create_dir_all(r.join("etc")).unwrap();
        std::fs::write(r.join("etc/conf"), "x=1\n").unwrap();
        std::fs::set_permissions(r.join("etc/conf"), std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(r.join("new"), "hi").unwrap();
        std::fs::write(r.join("big"), vec![7u8; 3 << 20]).unwrap();
        symlink("etc/other", r.join("link")).unwrap();
        std::fs::write(r.join("\u{e9}t\u{e9} \\ weird\nname"), "").unwrap();
    });
    let (ma, mb) = (read(&a, DiskFormat::Raw), read(&b, DiskFormat::Raw));
    assert_eq!(entry(&ma, "/link").target.as_deref(), Some("etc/conf"));
    assert_eq!(entry(&ma, "/big").blake3.as_deref(), Some(blake3_hex(&vec![7u8; 3 << 20]).as_str()));
    let text: Vec<String> = manifest::diff(&ma, &mb, &[]).iter().map(|c| c.to_string()).collect();
    assert_eq!(
        text,
        vec![
            "~ /etc/conf mode 0644 -> 0600",
            "- /gone (3 bytes)",
            "~ /link size 8 -> 9, target etc/conf -> etc/other",
            "+ /new (2 bytes)",
            "+ /\u{e9}t\u{e9} \\\\ weird\\x0aname (0 bytes)",
        ]
    );
}

/// How long `command -v` may take to say whether a tool is installed.
const WHICH: Duration = Duration::from_secs(10);

fn have(tool: &str) -> bool {
    Tool::new("sh", WHICH).arg("-c").arg(format!("command -v {tool}")).output().is_ok_and(|o| o.status.success())
}

/// A blank NTFS image made by mkntfs, with `files` copied into its root by ntfscp (no root
/// needed). None (and a note) if ntfs-3g is not installed.
fn ntfs_image(path: &Path, size: u64, label: &str, files: &[(&str, &[u8])]) -> Option<()> {
    if !have("mkntfs") || !have("ntfscp") {
        eprintln!("SKIPPED: mkntfs/ntfscp not found; install ntfs-3g (apt-get install ntfs-3g)");
        return None;
    }
    std::fs::File::create(path).unwrap().set_len(size).unwrap();
    let out = Tool::new("mkntfs", deadline::MKFS).args(["-F", "-Q", "-q", "-L", label]).arg(path).output().unwrap();
    assert!(out.status.success(), "mkntfs: {}", out.stderr);
    let tmp = tempfile::tempdir().unwrap();
    for (name, data) in files {
        let src = tmp.path().join("src");
        std::fs::write(&src, data).unwrap();
        let out = Tool::new("ntfscp", deadline::MKFS).arg("-q").arg(path).arg(&src).arg(name).output().unwrap();
        assert!(out.status.success(), "ntfscp {name}: {}", out.stderr);
    }
    Some(())
}

#[test]
fn ntfs_manifest_of_an_mkntfs_image() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("win.raw");
    let big: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let files: &[(&str, &[u8])] = &[("small.txt", b"tiny resident file\n"), ("big.bin", &big), ("Mixed Case.TXT", b"")];
    if ntfs_image(&raw, 32 << 20, "WINDATA", files).is_none() {
        return;
    }
    let vhdx = dir.path().join("win.vhdx");
    qemu_img::convert(&raw, DiskFormat::Raw, &vhdx, DiskFormat::Vhdx).unwrap();
    let m = read(&vhdx, DiskFormat::Vhdx);
    assert_eq!(m.filesystems.len(), 1, "{m:#?}");
    let fs = &m.filesystems[0];
    assert_eq!((fs.kind, fs.label.as_str(), fs.partition), (FsKind::Ntfs, "WINDATA", None));
    assert_eq!(fs.uuid.len(), 16);
    let paths: Vec<&str> = fs.entries.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, vec!["/", "/Mixed Case.TXT", "/big.bin", "/small.txt"], "system files are left out");
    for (name, data) in files {
        let e = entry(&m, &format!("/{name}"));
        assert_eq!((e.kind, e.size), (EntryKind::File, data.len() as u64), "{name}");
        assert_eq!(e.blake3.as_deref(), Some(blake3_hex(data).as_str()), "{name}");
    }
    assert_eq!(m, read(&raw, DiskFormat::Raw));

    // One byte of the big file flipped in the image: named.
    let mut bytes = std::fs::read(&raw).unwrap();
    let at = find(&bytes, &big[1000..1064]).expect("the big file's data is in the image");
    bytes[at] ^= 0x80;
    let bad = dir.path().join("bad.raw");
    std::fs::write(&bad, &bytes).unwrap();
    let changes = manifest::diff(&m, &read(&bad, DiskFormat::Raw), &[]);
    assert_eq!(changes.iter().map(|c| c.to_string()).collect::<Vec<_>>(), vec!["~ /big.bin content"]);
}

/// Unmounts a FUSE mount when dropped, so a failed assertion leaves nothing mounted.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Tool::new("umount", deadline::MOUNT).arg(&self.0).output();
    }
}

#[test]
fn ntfs_subdirectories_and_links_written_through_ntfs_3g() {
    // Directories and symlinks cannot be made in an NTFS image without mounting it; ntfs-3g
    // mounts through FUSE, which needs root (or a setuid fusermount) and /dev/fuse.
    let root = nix::unistd::Uid::effective().is_root();
    if !root || !Path::new("/dev/fuse").exists() || !have("ntfs-3g") {
        eprintln!("SKIPPED: needs root, /dev/fuse and ntfs-3g to mount an NTFS image");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("win.raw");
    if ntfs_image(&raw, 32 << 20, "TREE", &[]).is_none() {
        return;
    }
    let mnt = subdir(dir.path(), "mnt");
    {
        // Not through Tool: once a tool exits, what it left in its process group is killed,
        // and the FUSE daemon ntfs-3g leaves behind is the mount. Its exit is awaited on a
        // pidfd, under the mount deadline.
        let mut mount = std::process::Command::new("ntfs-3g").arg(&raw).arg(&mnt).spawn().unwrap();
        let watched = Process::open(mount.id()).unwrap();
        if !watched.wait_exit(deadline::MOUNT) {
            let _ = mount.kill();
            let _ = mount.wait();
            panic!("ntfs-3g did not mount within {:?}", deadline::MOUNT);
        }
        assert!(mount.wait().unwrap().success());
        let _m = Mounted(mnt.clone());
        std::fs::create_dir_all(mnt.join("Users/Ann/Documents")).unwrap();
        std::fs::write(mnt.join("Users/Ann/Documents/report.docx"), "quarterly numbers").unwrap();
        std::fs::write(mnt.join("top.txt"), "top").unwrap();
        std::os::unix::fs::symlink("../../top.txt", mnt.join("Users/Ann/link")).unwrap();
        // A copy of the image while it is mounted: what a snapshot of a live NTFS is.
        std::fs::copy(&raw, dir.path().join("live.raw")).unwrap();
    }
    // The dirty flag is read, but it cannot tell a live copy from a quiesced one: ntfs-3g
    // never sets it while mounted (and Windows only when chkdsk is due). So `fs-quiesced`
    // does not count an NTFS volume as proven either way; this pins that down.
    use quiesce::image::inspect::{FsState, RawImage};
    let dirty = |p: &Path| match RawImage::open(p, DiskFormat::Raw).unwrap().states().unwrap().as_slice() {
        [v] => match &v.fs {
            FsState::Ntfs(s) => s.dirty,
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    };
    assert!(!dirty(&dir.path().join("live.raw")), "ntfs-3g has started marking mounted volumes dirty");
    assert!(!dirty(&raw), "an unmounted NTFS must read clean");
    let m = read(&raw, DiskFormat::Raw);
    let paths: Vec<&str> = m.filesystems[0].entries.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        vec![
            "/",
            "/Users",
            "/Users/Ann",
            "/Users/Ann/Documents",
            "/Users/Ann/Documents/report.docx",
            "/Users/Ann/link",
            "/top.txt"
        ]
    );
    assert_eq!(entry(&m, "/Users/Ann/Documents/report.docx").blake3, Some(blake3_hex(b"quarterly numbers")));
    let link = entry(&m, "/Users/Ann/link");
    assert_eq!(link.kind, EntryKind::Symlink, "{link:?}");
    assert_eq!(link.target.as_deref(), Some("../../top.txt"), "{link:?}");
}

/// Writes an MBR with the given (type, start sector, sectors) entries.
fn write_mbr(disk: &mut [u8], parts: &[(u8, u32, u32)]) {
    for (i, (t, start, n)) in parts.iter().enumerate() {
        let e = 446 + i * 16;
        disk[e + 4] = *t;
        disk[e + 8..e + 12].copy_from_slice(&start.to_le_bytes());
        disk[e + 12..e + 16].copy_from_slice(&n.to_le_bytes());
    }
    disk[510] = 0x55;
    disk[511] = 0xaa;
}

#[test]
fn partitioned_disks_list_each_filesystem_by_partition() {
    let dir = tempfile::tempdir().unwrap();
    let ext = std::fs::read(seed_in(dir.path(), "root", DiskFormat::Raw, files(&[("a", "1".into())]))).unwrap();
    let ntfs = dir.path().join("n.raw");
    let with_ntfs = ntfs_image(&ntfs, 16 << 20, "DATA", &[("b.txt", b"2")]).is_some();
    let mut disk = vec![0u8; 48 << 20];
    disk[1 << 20..(1 << 20) + ext.len()].copy_from_slice(&ext);
    let mut parts = vec![(0x83, 2048, (ext.len() / 512) as u32)];
    if with_ntfs {
        let n = std::fs::read(&ntfs).unwrap();
        disk[20 << 20..(20 << 20) + n.len()].copy_from_slice(&n);
        parts.push((0x07, 40960, (n.len() / 512) as u32));
    }
    parts.push((0x82, 80 * 1024, 1024)); // a blank "swap" partition: listed as unread
    write_mbr(&mut disk, &parts);
    let raw = dir.path().join("disk.raw");
    std::fs::write(&raw, &disk).unwrap();
    let qcow = dir.path().join("disk.qcow2");
    qemu_img::convert(&raw, DiskFormat::Raw, &qcow, DiskFormat::Qcow2).unwrap();
    let m = read(&qcow, DiskFormat::Qcow2);
    let got: Vec<(Option<u32>, FsKind)> = m.filesystems.iter().map(|f| (f.partition, f.kind)).collect();
    let mut want = vec![(Some(1), FsKind::Ext4)];
    if with_ntfs {
        want.push((Some(2), FsKind::Ntfs));
    }
    assert_eq!(got, want);
    let last = parts.len() as u32;
    assert_eq!(
        m.unread.iter().map(|u| (u.partition, u.content.as_str())).collect::<Vec<_>>(),
        vec![(Some(last), "unknown")]
    );

    // The same disk with partition 1's file changed: the change is named with its partition.
    let mut disk2 = disk.clone();
    let ext2 = std::fs::read(seed_in(&subdir(dir.path(), "two"), "root", DiskFormat::Raw, files(&[("a", "3".into())])))
        .unwrap();
    disk2[1 << 20..(1 << 20) + ext2.len()].copy_from_slice(&ext2);
    let raw2 = dir.path().join("disk2.raw");
    std::fs::write(&raw2, &disk2).unwrap();
    let text: Vec<String> =
        manifest::diff(&m, &read(&raw2, DiskFormat::Raw), &[]).iter().map(|c| c.to_string()).collect();
    let expect = if with_ntfs { "~ p1:/a content" } else { "~ /a content" };
    assert_eq!(text, vec![expect]);

    // Whole-disk FAT (a seed's vfat disk) is listed as unread, not misread as a partition table.
    let vfat = DiskSeed {
        name: "usb".into(),
        format: DiskFormat::Qcow2,
        size: 40 << 20,
        filesystem: Filesystem::Vfat,
        files: BTreeMap::new(),
        partitioning: Partitioning::None,
    };
    let p = seed::create(dir.path(), &vfat).unwrap();
    let m = read(&p, DiskFormat::Qcow2);
    assert!(m.filesystems.is_empty());
    assert_eq!(m.unread[0].content, "vfat");
}

fn expect_error(path: &Path, format: DiskFormat) -> ManifestError {
    match manifest::read_image(path, format, &Limits::default()) {
        Ok(m) => panic!("{} read without error: {m:#?}", path.display()),
        Err(e) => e,
    }
}

/// Rounds of the damaged-filesystem tests: `QUIESCE_FUZZ_ROUNDS` (default 300) for a longer hunt.
fn rounds() -> usize {
    std::env::var("QUIESCE_FUZZ_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(300)
}

#[test]
fn hostile_images_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let mut garbage = vec![0u8; 8 << 20];
    garbage.iter_mut().for_each(|b| *b = rng.next_u64() as u8);

    // Random bytes: no filesystem and no partition table are recognised; nothing is read.
    let p = dir.path().join("noise.raw");
    std::fs::write(&p, &garbage).unwrap();
    let m = read(&p, DiskFormat::Raw);
    assert!(m.filesystems.is_empty() && m.unread.len() == 1, "{m:#?}");

    // Random bytes that claim to be ext4, or NTFS: errors that say where.
    let mut g = garbage.clone();
    g[1080] = 0x53;
    g[1081] = 0xef;
    std::fs::write(&p, &g).unwrap();
    let e = expect_error(&p, DiskFormat::Raw);
    assert!(e.to_string().starts_with("whole disk (ext4): /"), "{e}");
    let mut g = garbage.clone();
    g[3..11].copy_from_slice(b"NTFS    ");
    std::fs::write(&p, &g).unwrap();
    let e = expect_error(&p, DiskFormat::Raw);
    assert!(e.to_string().starts_with("whole disk (ntfs): /"), "{e}");

    // A partition that runs past the end of the disk (a truncated copy).
    let mut g = vec![0u8; 4 << 20];
    write_mbr(&mut g, &[(0x83, 2048, 1 << 20)]);
    std::fs::write(&p, &g).unwrap();
    let e = expect_error(&p, DiskFormat::Raw);
    assert!(e.to_string().contains("past the end of the disk"), "{e}");

    // A raw ext4 image cut short: the filesystem is larger than its disk.
    let full =
        std::fs::read(seed_in(&subdir(dir.path(), "r"), "data", DiskFormat::Raw, files(&sample_files()))).unwrap();
    std::fs::write(&p, &full[..full.len() / 2]).unwrap();
    let e = expect_error(&p, DiskFormat::Raw);
    assert!(e.to_string().contains("larger than its volume"), "{e}");

    // A qcow2 cut short: QEMU's own driver refuses it.
    let q = seed_in(&subdir(dir.path(), "q"), "data", DiskFormat::Qcow2, files(&sample_files()));
    let bytes = std::fs::read(&q).unwrap();
    let cut = dir.path().join("cut.qcow2");
    std::fs::write(&cut, &bytes[..bytes.len() / 3]).unwrap();
    let e = expect_error(&cut, DiskFormat::Qcow2);
    assert!(matches!(e, ManifestError::DamagedImage { .. }), "{e}");
    let v = seed_in(&subdir(dir.path(), "v"), "data", DiskFormat::Vhdx, files(&sample_files()));
    let bytes = std::fs::read(&v).unwrap();
    let cut = dir.path().join("cut.vhdx");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = expect_error(&cut, DiskFormat::Vhdx);
    assert!(matches!(e, ManifestError::Image { .. }), "{e}");

    // A real ext4 (default features) with random metadata bytes overwritten, many times.
    let root = subdir(dir.path(), "root");
    for i in 0..40 {
        std::fs::create_dir_all(root.join(format!("d{}", i % 5))).unwrap();
        std::fs::write(root.join(format!("d{}/f{i}", i % 5)), format!("{i}").repeat(i * 300)).unwrap();
    }
    let img = dir.path().join("ext4.raw");
    std::fs::File::create(&img).unwrap().set_len(8 << 20).unwrap();
    let out = Tool::new("mkfs.ext4", deadline::MKFS).args(["-q", "-F", "-d"]).arg(&root).arg(&img).output().unwrap();
    assert!(out.status.success());
    let clean = std::fs::read(&img).unwrap();
    let (mut ok, mut errors, mut panics) = (0, 0, 0);
    let n = rounds();
    for round in 0..n {
        let mut d = clean.clone();
        // Metadata lives early in a small filesystem: superblock, group descriptors, bitmaps,
        // inode tables, directory blocks.
        for _ in 0..1 + round % 8 {
            let at = 1024 + (rng.next_u64() as usize) % (1 << 20);
            d[at] = rng.next_u64() as u8;
        }
        std::fs::write(&p, &d).unwrap();
        match manifest::read_image(&p, DiskFormat::Raw, &Limits::default()) {
            Ok(_) => ok += 1,
            Err(ManifestError::ReaderPanicked { what, .. }) => {
                eprintln!("round {round}: the ext4 reader panicked: {what}");
                panics += 1;
            }
            Err(_) => errors += 1,
        }
    }
    eprintln!("damaged ext4: {ok} read, {errors} errors, {panics} reader panics (turned into errors)");
    assert_eq!(ok + errors + panics, n);
}

#[test]
fn damaged_ntfs_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("n.raw");
    let big = vec![0x5au8; 100_000];
    if ntfs_image(&raw, 16 << 20, "X", &[("a.txt", b"aaa"), ("big", &big)]).is_none() {
        return;
    }
    let clean = std::fs::read(&raw).unwrap();
    let p = dir.path().join("bad.raw");
    std::fs::write(&p, &clean[..clean.len() / 2]).unwrap();
    let e = expect_error(&p, DiskFormat::Raw);
    assert!(e.to_string().contains("larger than its volume"), "{e}");
    // The MFT: mkntfs puts it where the boot sector says (cluster number at 0x30).
    let cluster = u64::from(u16::from_le_bytes([clean[11], clean[12]])) * u64::from(clean[13]);
    let mft = (u64::from_le_bytes(clean[0x30..0x38].try_into().unwrap()) * cluster) as usize;
    let mut rng = XorShift(0x1234_5678_9abc_def1);
    let (mut ok, mut errors, mut panics) = (0, 0, 0);
    for round in 0..rounds() {
        let mut d = clean.clone();
        for _ in 0..1 + round % 6 {
            let at = if round % 3 == 0 {
                (rng.next_u64() as usize) % 512
            } else {
                mft + (rng.next_u64() as usize) % (128 << 10)
            };
            d[at] = rng.next_u64() as u8;
        }
        std::fs::write(&p, &d).unwrap();
        match manifest::read_image(&p, DiskFormat::Raw, &Limits::default()) {
            Ok(_) => ok += 1,
            Err(ManifestError::ReaderPanicked { what, .. }) => {
                eprintln!("round {round}: the NTFS reader panicked: {what}");
                panics += 1;
            }
            Err(_) => errors += 1,
        }
    }
    eprintln!("damaged NTFS: {ok} read, {errors} errors, {panics} reader panics (turned into errors)");
}

#[test]
fn limits_stop_the_walk_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = seed_in(dir.path(), "data", DiskFormat::Raw, files(&sample_files()));
    let few = Limits { max_entries: 3, ..Limits::default() };
    let e = manifest::read_image(&p, DiskFormat::Raw, &few).unwrap_err();
    assert!(matches!(e, ManifestError::TooManyEntries { limit: 3, .. }), "{e}");
    assert!(e.to_string().contains("more than 3 paths"), "{e}");
    let small = Limits { max_hash_bytes: 50_000, ..Limits::default() };
    let e = manifest::read_image(&p, DiskFormat::Raw, &small).unwrap_err();
    assert!(e.to_string().contains("/dir/sub/data.txt"), "names the file it stopped at: {e}");
}

/// `program args... image` through quiesce's runner; its stdout and stderr, and whether it
/// exited 0.
fn tool(program: &str, args: &[&str], image: &Path) -> (bool, String) {
    let out = Tool::new(program, deadline::E2FSCK).args(args).arg(image).output().unwrap();
    (out.status.success(), format!("{}{}", out.stdout_text(), out.stderr))
}

#[test]
fn seeded_ext4_disks_are_real_ext4_with_a_clean_journal() {
    use quiesce::image::fsread::state::{Journal, Quiesced};
    use quiesce::image::inspect::{FsState, RawImage};
    let dir = tempfile::tempdir().unwrap();
    for format in [DiskFormat::Raw, DiskFormat::Qcow2, DiskFormat::Vhdx] {
        let d = subdir(dir.path(), format.extension());
        let img = seed_in(&d, "data", format, files(&sample_files()));
        let states = RawImage::open(&img, format).unwrap().states().unwrap();
        let [v] = states.as_slice() else { panic!("{states:?}") };
        let FsState::Ext4(s) = &v.fs else { panic!("{v:?}") };
        for f in ["has_journal", "extent", "64bit", "metadata_csum", "flex_bg", "dir_index", "extra_isize"] {
            assert!(s.has(f), "{format:?}: no {f} in {:?}", s.features);
        }
        assert!(!s.has("needs_recovery") && !s.needs_recovery);
        assert_eq!(s.block_size, 4096);
        assert!(matches!(s.journal, Journal::Internal { start: 0, .. }), "{:?}", s.journal);
        assert_eq!(s.quiesced(), Quiesced::Clean);
    }
    // e2fsprogs reads the same features and journal state as the pure-Rust reader.
    let raw = dir.path().join("raw/data.raw");
    let (ok, text) = tool("dumpe2fs", &["-h"], &raw);
    assert!(ok, "{text}");
    let features = text.lines().find_map(|l| l.strip_prefix("Filesystem features:")).unwrap_or_default();
    for f in ["has_journal", "extent", "64bit", "metadata_csum", "flex_bg"] {
        assert!(features.split_whitespace().any(|w| w == f), "dumpe2fs: {features}");
    }
    assert!(!features.contains("needs_recovery"), "{features}");
    assert!(text.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == ["Journal", "start:", "0"]), "{text}");
}

/// 4 KiB of `fill`, then a 4 KiB hole, `n` times: mke2fs -d leaves all-zero blocks out, so
/// each run of data is an extent of its own, more than the inode's four.
fn fragmented(n: usize) -> String {
    (0..n)
        .map(|i| format!("{}{}", char::from(b'A' + (i % 26) as u8).to_string().repeat(4096), "\0".repeat(4096)))
        .collect()
}

#[test]
fn manifests_read_htree_directories_and_extent_trees() {
    let dir = tempfile::tempdir().unwrap();
    let mut list: Vec<(String, String)> =
        (0..600).map(|i| (format!("big/entry-{i:04}.txt"), format!("{i}\n"))).collect();
    list.push(("frag.bin".into(), fragmented(40)));
    let seed = DiskSeed { files: list.iter().cloned().collect(), ..DiskSeed::ext4("data", DiskFormat::Raw, 32 << 20) };
    let raw = seed::create(dir.path(), &seed).unwrap();
    // mke2fs -d writes directories as plain lists; e2fsck -D indexes them as the kernel
    // does when a directory outgrows a block (an htree).
    let (_, text) = tool("e2fsck", &["-fyD"], &raw);
    let (_, stat) = tool("debugfs", &["-R", "stat /big"], &raw);
    let flags = stat.lines().find_map(|l| l.split("Flags: ").nth(1)).unwrap_or_default();
    let flags = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).unwrap_or(0);
    assert!(flags & 0x1000 != 0, "/big is not an htree (flags {flags:#x}); e2fsck said: {text}");
    let (_, extents) = tool("debugfs", &["-R", "ex /frag.bin"], &raw);
    assert!(extents.lines().any(|l| l.trim_start().starts_with("0/ 1")), "no index level:\n{extents}");
    assert!(extents.lines().filter(|l| l.trim_start().starts_with("1/ 1")).count() == 40, "{extents}");
    // The manifest lists every entry of the htree, and hashes the file through its tree.
    for format in [DiskFormat::Raw, DiskFormat::Qcow2] {
        let img = if format == DiskFormat::Raw {
            raw.clone()
        } else {
            let q = dir.path().join("data.qcow2");
            qemu_img::convert(&raw, DiskFormat::Raw, &q, format).unwrap();
            q
        };
        let m = read(&img, format);
        for (path, content) in &list {
            let e = entry(&m, &format!("/{path}"));
            assert_eq!(e.blake3.as_deref(), Some(blake3_hex(content.as_bytes()).as_str()), "{path}");
        }
        let in_big = m.filesystems[0].entries.iter().filter(|e| e.path.starts_with("/big/")).count();
        assert_eq!(in_big, 600);
        assert_eq!(entry(&m, "/frag.bin").size, 40 * 8192);
    }
}
