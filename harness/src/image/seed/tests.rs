use super::*;

#[test]
fn dynamic_and_vfat_disks() {
    let dir = tempfile::tempdir().unwrap();
    let mut seed = DiskSeed {
        name: "ldm".into(),
        format: DiskFormat::Qcow2,
        size: 8 << 20,
        filesystem: Filesystem::None,
        files: Default::default(),
        partitioning: Partitioning::MbrDynamic,
    };
    let p = create(dir.path(), &seed).unwrap();
    let head = crate::image::partition::read_head(&p, DiskFormat::Qcow2).unwrap();
    assert!(crate::image::partition::parse(&head).dynamic_reason().is_some());
    seed.name = "usb".into();
    seed.partitioning = Partitioning::None;
    seed.filesystem = Filesystem::Vfat;
    seed.size = 40 << 20;
    let p = create(dir.path(), &seed).unwrap();
    let head = crate::image::partition::read_head(&p, DiskFormat::Qcow2).unwrap();
    assert_eq!(&head[82..87], b"FAT32");
}

#[test]
fn seeded_ext4_inodes_carry_the_fixed_time_not_the_staging_files() {
    let dir = tempfile::tempdir().unwrap();
    let mut seed = DiskSeed::ext4("data", DiskFormat::Raw, 16 << 20);
    seed.files.insert("a/b.txt".into(), "hello\n".into());
    let p = create(dir.path(), &seed).unwrap();
    for path in ["/", "/a", "/a/b.txt"] {
        let out = Tool::new("debugfs", deadline::DEBUGFS).args(["-R", &format!("stat {path}")]).arg(&p).run();
        let text = out.unwrap().stdout_text();
        let times: Vec<&str> = text.lines().filter(|l| l.trim_start().contains("time: 0x")).collect();
        assert!(times.len() >= 3, "{text}");
        // 1735689600 = 0x67748580
        assert!(times.iter().all(|l| l.contains("0x67748580")), "{path}: {times:?}");
    }
}

/// debugfs says nothing by its exit status when a request fails: the times are read back.
#[test]
fn times_not_set_by_debugfs_are_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut seed = DiskSeed::ext4("data", DiskFormat::Raw, 16 << 20);
    seed.files.insert("a.txt".into(), "hello\n".into());
    let p = create(dir.path(), &seed).unwrap();
    // A file the seed names but the image lacks: debugfs exits 0 having set nothing.
    seed.files.insert("missing.txt".into(), String::new());
    let staging = dir.path().join("staging");
    std::fs::create_dir(&staging).unwrap();
    let e = fix_ext4_times(&seed, &staging.join("root"), &p).unwrap_err();
    assert!(matches!(e, SeedError::Mkfs { tool: "debugfs", .. }), "{e}");
    assert!(e.to_string().contains("/missing.txt"), "{e}");
    // Not a filesystem at all: debugfs cannot open it, and still exits 0.
    let junk = dir.path().join("junk.raw");
    std::fs::write(&junk, vec![0u8; 1 << 20]).unwrap();
    let e = fix_ext4_times(&seed, &staging.join("root"), &junk).unwrap_err();
    assert!(e.to_string().contains("cannot be read"), "{e}");
}

#[test]
fn uuid_is_stable_and_well_formed() {
    let u = fixed_uuid("data");
    assert_eq!(u, fixed_uuid("data"));
    assert_ne!(u, fixed_uuid("other"));
    assert_eq!(u.len(), 36);
    assert_eq!(u.split('-').map(str::len).collect::<Vec<_>>(), vec![8, 4, 4, 4, 12]);
}

#[test]
fn seeded_ext4_disks_are_reproducible_in_every_format() {
    let dir = tempfile::tempdir().unwrap();
    for format in [DiskFormat::Raw, DiskFormat::Qcow2, DiskFormat::Vpc, DiskFormat::Vhdx] {
        let seed = DiskSeed {
            name: "data".into(),
            format,
            size: 16 << 20,
            filesystem: Filesystem::Ext4,
            files: [("a/b.txt".to_owned(), "hello\n".to_owned())].into(),
            partitioning: Partitioning::None,
        };
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        let pa = create(&a, &seed).unwrap();
        let pb = create(&b, &seed).unwrap();
        assert!(qemu_img::identical(&pa, format, &pb, format).unwrap(), "{format:?}");
        assert!(qemu_img::virtual_size(&pa).unwrap() >= 16 << 20);
        std::fs::remove_dir_all(&a).unwrap();
        std::fs::remove_dir_all(&b).unwrap();
    }
}

/// The NTFS seed, or None (and a note) where ntfs-3g is not installed.
fn ntfs_disk(dir: &Path, seed: &DiskSeed) -> Option<PathBuf> {
    match create(dir, seed) {
        Ok(p) => Some(p),
        Err(SeedError::MissingTool { tool, package, .. }) => {
            eprintln!("SKIPPED: {tool} not found; install {package}");
            None
        }
        Err(e) => panic!("{e}"),
    }
}

fn ntfs_seed(name: &str, format: DiskFormat, files: &[(&str, String)]) -> DiskSeed {
    DiskSeed {
        name: name.into(),
        format,
        size: 24 << 20,
        filesystem: Filesystem::Ntfs,
        files: files.iter().map(|(n, c)| (n.to_string(), c.clone())).collect(),
        partitioning: Partitioning::None,
    }
}

#[test]
fn seeded_ntfs_disks_read_back_with_their_files_and_serial() {
    let dir = tempfile::tempdir().unwrap();
    // Resident (small), empty, and non-resident (larger than an MFT record) content.
    let big: String = (0..40_000).map(|i| format!("{i}\n")).collect();
    let files = [("hello.txt", "hello\n".to_owned()), ("empty", String::new()), ("big.log", big)];
    for format in [DiskFormat::Qcow2, DiskFormat::Vhdx] {
        let seed = ntfs_seed("windata", format, &files);
        let mut manifests = vec![];
        for copy in ["a", "b"] {
            let d = dir.path().join(format!("{copy}-{}", format.extension()));
            std::fs::create_dir(&d).unwrap();
            let Some(p) = ntfs_disk(&d, &seed) else { return };
            let m = crate::image::manifest::read_image(&p, format, &Default::default()).unwrap();
            manifests.push(m);
        }
        assert_eq!(manifests[0], manifests[1], "{format:?}: two seeds of one spec differ");
        let m = &manifests[0];
        assert!(m.unread.is_empty(), "{:?}", m.unread);
        let [fs] = m.filesystems.as_slice() else { panic!("{m:?}") };
        assert_eq!(fs.kind, crate::image::manifest::FsKind::Ntfs);
        assert_eq!(fs.label, "windata");
        assert_eq!(fs.uuid, format!("{:016X}", ntfs_serial("windata")));
        assert!(fixed_uuid("windata").replace('-', "").to_uppercase().starts_with(&fs.uuid));
        let listed: Vec<&str> = fs.entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(listed, ["/", "/big.log", "/empty", "/hello.txt"], "{format:?}");
        for (name, content) in &files {
            let e = fs.entries.iter().find(|e| e.path == format!("/{name}")).unwrap();
            assert_eq!(e.size, content.len() as u64, "{name}");
            assert_eq!(e.blake3.as_deref(), Some(blake3::hash(content.as_bytes()).to_hex().as_str()), "{name}");
        }
    }
}

#[test]
fn ntfs_serial_is_set_in_both_boot_sectors_and_the_volume_stays_valid() {
    let dir = tempfile::tempdir().unwrap();
    // A size that is not a whole number of clusters: the backup boot sector is the
    // device's last sector, not the end of the last cluster.
    let mut seed = ntfs_seed("serial", DiskFormat::Raw, &[("a.txt", "a".into())]);
    seed.size = (16 << 20) + 3 * 512;
    let Some(raw) = ntfs_disk(dir.path(), &seed) else { return };
    let bytes = std::fs::read(&raw).unwrap();
    let want = ntfs_serial("serial").to_le_bytes();
    assert_eq!(&bytes[NTFS_SERIAL_AT..NTFS_SERIAL_AT + 8], want);
    let last = &bytes[bytes.len() - 512..];
    assert_eq!(last, &bytes[..512], "the backup boot sector is the device's last sector");
    assert_ne!(ntfs_serial("serial"), ntfs_serial("other"));
    // Without files (ntfscp stamps the current time), the volume is the same to the byte.
    seed.files.clear();
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    std::fs::create_dir(&a).unwrap();
    std::fs::create_dir(&b).unwrap();
    let (pa, pb) = (create(&a, &seed).unwrap(), create(&b, &seed).unwrap());
    assert!(std::fs::read(pa).unwrap() == std::fs::read(pb).unwrap(), "two empty NTFS seeds differ");
    // ntfs-3g's own checks: ntfsfix -n compares the two boot sectors and the MFT mirror;
    // the probe is what mount.ntfs-3g asks first.
    for (tool, args) in [("ntfsfix", &["-n"][..]), ("ntfs-3g.probe", &["--readwrite"][..])] {
        let out = match Tool::new(tool, deadline::MKFS).args(args).arg(&raw).output() {
            Err(ToolError::Spawn { .. }) => {
                eprintln!("SKIPPED {tool}: not installed");
                continue;
            }
            out => out.unwrap(),
        };
        let text = format!("{}{}", out.stdout_text(), out.stderr);
        assert!(out.status.success(), "{tool}: {text}");
        if tool == "ntfsfix" {
            assert!(text.contains("Checking the alternate boot sector... OK"), "{text}");
        }
    }
}

#[test]
fn ntfs_seeds_refuse_what_ntfscp_cannot_make() {
    let dir = tempfile::tempdir().unwrap();
    for (files, want) in [
        (vec![("a/b.txt", "x".to_owned())], "is in a subfolder"),
        (vec![("$MFT", "x".to_owned())], "NTFS system files"),
        (vec![("a:b", "x".to_owned())], "not a valid Windows file name"),
        (vec![("Read.me", "x".to_owned()), ("READ.ME", "y".to_owned())], "only in case"),
    ] {
        let e = create(dir.path(), &ntfs_seed("bad", DiskFormat::Qcow2, &files)).unwrap_err();
        assert!(matches!(e, SeedError::Unsupported { .. }), "{e}");
        assert!(e.to_string().starts_with("disk bad: ") && e.to_string().contains(want), "{e}");
    }
    let missing = SeedError::MissingTool { disk: "d".into(), tool: "mkntfs", package: "ntfs-3g" };
    assert_eq!(missing.to_string(), "disk d: mkntfs is not installed (Debian package ntfs-3g)");
    // mkntfs's own refusal reaches the user without its notes about writing to a file.
    let mut tiny = ntfs_seed("tiny", DiskFormat::Raw, &[]);
    tiny.size = 1 << 19;
    match create(dir.path(), &tiny) {
        Err(SeedError::MissingTool { .. }) => {}
        Err(e @ SeedError::Mkfs { tool: "mkntfs", .. }) => {
            let e = e.to_string();
            assert!(e.contains("Minimum NTFS volume size") && !e.contains("block device"), "{e}");
        }
        other => panic!("{other:?}"),
    }
}
