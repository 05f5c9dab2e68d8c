//! `quiesce image build windows` up to the point where QEMU would boot Windows Setup, with
//! stub ISOs made here in the layout of the real ones: a Windows ISO whose
//! `sources/install.wim` is a real WIM (`wimlib-imagex capture` of a tiny folder, with the
//! editions' properties a Server 2022 evaluation ISO lists) and a virtio-win tree. No real
//! Windows ISO and no Windows guest is involved: none can run here. `--dry-run` prints the
//! command line, and the provisioning CD is read back with xorriso.
//!
//! Each refusal (a missing file, an ISO that is not Windows, the wrong architecture, a
//! virtio-win ISO without drivers for that Windows) is an error before anything boots, and
//! leaves nothing in the image cache.
//!
//! Needs xorriso, wimtools (wimlib-imagex) and p7zip-full (ci/setup-debian.sh installs them).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn quiesce(cache: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_quiesce"));
    c.env("QUIESCE_CACHE_DIR", cache).env_remove("QUIESCE_ACCEL");
    c
}

fn run(cmd: &mut Command, what: &str) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A Windows-like ISO: `sources/install.wim` with editions of `arch` and `build`.
fn windows_iso(dir: &Path, name: &str, arch: u32, build: u32) -> PathBuf {
    let tree = dir.join(format!("{name}-tree"));
    let tiny = dir.join(format!("{name}-tiny"));
    std::fs::create_dir_all(tree.join("sources")).unwrap();
    std::fs::create_dir_all(tree.join("boot")).unwrap();
    std::fs::create_dir_all(&tiny).unwrap();
    std::fs::write(tiny.join("hello.txt"), "hi\n").unwrap();
    std::fs::write(tree.join("setup.exe"), "MZ stub\n").unwrap();
    let wim = tree.join("sources/install.wim");
    let editions = [
        ("Windows Server 2022 SERVERDATACENTERCORE", "ServerDatacenterEval", "Server Core"),
        ("Windows Server 2022 SERVERSTANDARDCORE", "ServerStandardEval", "Server Core"),
        ("Windows Server 2022 SERVERSTANDARD", "ServerStandardEval", "Server"),
    ];
    for (i, (image, id, kind)) in editions.iter().enumerate() {
        let mut c = Command::new("wimlib-imagex");
        c.arg(if i == 0 { "capture" } else { "append" }).arg(&tiny).arg(&wim).arg(image);
        for prop in [
            format!("WINDOWS/ARCH={arch}"),
            format!("WINDOWS/VERSION/BUILD={build}"),
            format!("WINDOWS/EDITIONID={id}"),
            format!("WINDOWS/INSTALLATIONTYPE={kind}"),
        ] {
            c.arg("--image-property").arg(prop);
        }
        run(&mut c, "wimlib-imagex");
    }
    mkisofs(&tree, &dir.join(format!("{name}.iso")), "SSS_X64FREE_EN-US_DV9")
}

/// A virtio-win-like ISO with drivers for the given OS folders.
fn virtio_iso(dir: &Path, name: &str, oses: &[&str]) -> PathBuf {
    let tree = dir.join(format!("{name}-tree"));
    for os in oses {
        for (drv, inf) in
            [("viostor", "viostor"), ("vioscsi", "vioscsi"), ("NetKVM", "netkvm"), ("vioserial", "vioser")]
        {
            let d = tree.join(drv).join(os).join("amd64");
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join(format!("{inf}.inf")), "[Version]\n").unwrap();
        }
    }
    std::fs::create_dir_all(tree.join("guest-agent")).unwrap();
    std::fs::write(tree.join("guest-agent/qemu-ga-x86_64.msi"), "msi stub\n").unwrap();
    std::fs::write(tree.join("virtio-win-gt-x64.msi"), "msi stub\n").unwrap();
    mkisofs(&tree, &dir.join(format!("{name}.iso")), "virtio-win-0.1.271")
}

fn mkisofs(tree: &Path, iso: &Path, label: &str) -> PathBuf {
    run(
        Command::new("xorriso").args(["-as", "mkisofs", "-quiet", "-J", "-r", "-V", label, "-o"]).arg(iso).arg(tree),
        "xorriso",
    );
    iso.to_owned()
}

fn build(cache: &Path, iso: &Path, virtio: &Path, extra: &[&str]) -> Output {
    quiesce(cache)
        .args(["--accel", "tcg", "image", "build", "windows", "--dry-run", "--iso"])
        .arg(iso)
        .arg("--virtio-win")
        .arg(virtio)
        .args(extra)
        .output()
        .unwrap()
}

fn text(out: &Output) -> (String, String) {
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Nothing that looks like a built Windows image is in the cache.
fn no_image_in(cache: &Path) -> bool {
    let images = cache.join("images");
    std::fs::read_dir(&images).into_iter().flatten().flatten().all(|e| {
        let n = e.file_name().to_string_lossy().into_owned();
        !(n.starts_with("windows-") || n.starts_with(".build-windows-"))
    })
}

/// Reads a file out of the provisioning CD with xorriso.
fn read_back(media: &Path, inner: &str, dest: &Path) -> String {
    run(
        Command::new("xorriso").args(["-osirrox", "on", "-indev"]).arg(media).args(["-extract", inner]).arg(dest),
        "xorriso -extract",
    );
    std::fs::read_to_string(dest).unwrap()
}

#[test]
fn a_dry_run_builds_the_media_and_prints_the_qemu_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let win = windows_iso(dir.path(), "win", 9, 20348);
    let virtio = virtio_iso(dir.path(), "virtio", &["2k19", "2k22"]);
    let out = build(&cache, &win, &virtio, &[]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    // The default edition: the first Server Standard one (index 2 here, not Datacenter).
    assert!(stdout.contains("edition       Windows Server 2022 SERVERSTANDARDCORE (build 20348)"), "{stdout}");
    assert!(stdout.contains("virtio-win Windows Server 2022 (2k22)"), "{stdout}");
    let line = stdout.lines().find(|l| l.contains("qemu-system-x86_64")).unwrap_or_else(|| panic!("{stdout}"));
    for part in [
        "-M q35",
        "-accel tcg",
        "-boot once=d",
        "ide-cd,drive=cd-windows",
        "virtio-blk-pci,drive=root",
        "name=org.qemu.guest_agent.0",
        "-serial chardev:serial0",
    ] {
        assert!(line.contains(part), "{part} missing: {line}");
    }
    assert!(line.contains(&win.display().to_string()) && line.contains(&virtio.display().to_string()), "{line}");
    // The phases were shown as they came.
    assert!(stderr.contains("reading the editions from sources/install.wim"), "{stderr}");

    // The provisioning CD, read back with xorriso.
    let media = PathBuf::from(stdout.lines().find_map(|l| l.strip_prefix("media         ")).unwrap().trim());
    let listing =
        Command::new("xorriso").args(["-indev"]).arg(&media).args(["-find", "/", "-type", "f"]).output().unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout).into_owned();
    for p in [
        "/autounattend.xml",
        "/quiesce/firstlogon.ps1",
        "/quiesce/workloads/counter.ps1",
        "/quiesce/workloads/journal.ps1",
        "/quiesce/workloads/app-hook.ps1",
    ] {
        assert!(listing.contains(&format!("'{p}'")), "{p} is not on the CD:\n{listing}");
    }
    let xml = read_back(&media, "/autounattend.xml", &dir.path().join("autounattend.xml"));
    let doc = roxmltree::Document::parse(&xml).expect("the answer file is well-formed XML");
    assert_eq!(doc.root_element().tag_name().name(), "unattend");
    let value =
        |tag: &str| doc.descendants().filter(|n| n.has_tag_name(tag)).filter_map(|n| n.text()).collect::<Vec<_>>();
    assert!(value("Value").contains(&"Windows Server 2022 SERVERSTANDARDCORE"), "{xml}");
    let driver_paths = value("Path");
    for d in ["viostor", "vioscsi", "NetKVM", "vioserial"] {
        assert!(driver_paths.iter().any(|p| p.ends_with(&format!("\\{d}\\2k22\\amd64"))), "{d}: {driver_paths:?}");
    }
    assert!(value("CommandLine").iter().any(|c| c.contains("quiesce\\firstlogon.ps1")), "{xml}");
    let script = read_back(&media, "/quiesce/firstlogon.ps1", &dir.path().join("firstlogon.ps1"));
    assert!(script.contains("QUIESCE-WINDOWS-READY") && script.contains("QEMU Guest Agent VSS Provider"));
    assert!(no_image_in(&cache), "a dry run made a cache entry");

    // --edition picks another one, by name or index.
    let out = build(&cache, &win, &virtio, &["--edition", "1"]);
    assert!(text(&out).0.contains("edition       Windows Server 2022 SERVERDATACENTERCORE"), "{:?}", text(&out));
}

#[test]
fn bad_inputs_are_refused_before_anything_boots_and_leave_no_cache_entry() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let win = windows_iso(dir.path(), "win", 9, 20348);
    let virtio = virtio_iso(dir.path(), "virtio", &["2k22"]);
    let refused = |iso: &Path, virtio: &Path, extra: &[&str], expect: &str| {
        let out = build(&cache, iso, virtio, extra);
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(1), "{expect}: {stdout}{stderr}");
        assert!(stderr.contains(expect), "expected {expect:?} in:\n{stderr}");
        assert!(!stdout.contains("qemu-system"), "{stdout}");
        assert!(no_image_in(&cache), "{expect}: left a cache entry");
    };
    // A missing file.
    refused(&dir.path().join("nope.iso"), &virtio, &[], "Windows ISO");
    refused(&win, &dir.path().join("nope-virtio.iso"), &[], "virtio-win ISO");
    // A file that is no ISO at all.
    let text_file = dir.path().join("notes.iso");
    std::fs::write(&text_file, "not an ISO\n").unwrap();
    refused(&text_file, &virtio, &[], "is not an ISO image that can be read");
    // An ISO that is not Windows (the virtio-win one given as Windows).
    refused(&virtio, &virtio, &[], "is not a Windows installation ISO: it has no sources/install.wim");
    // The wrong architecture.
    let arm = windows_iso(dir.path(), "arm", 12, 20348);
    refused(&arm, &virtio, &[], "holds Windows for ARM64, not for x86-64");
    // A virtio-win ISO without drivers for this Windows (2k22 asked, 2k19 only).
    let old = virtio_iso(dir.path(), "old-virtio", &["2k19"]);
    refused(&win, &old, &[], "has no virtio-win drivers for Windows Server 2022 (2k22): missing viostor/2k22/amd64");
    // The Windows ISO given as the virtio-win one.
    refused(&win, &win, &[], "is not a virtio-win ISO");
    // An edition the ISO does not have: the choices are listed.
    refused(&win, &virtio, &["--edition", "Windows 11 Home"], "  3: Windows Server 2022 SERVERSTANDARD");
}

#[test]
fn a_missing_image_is_reported_with_the_command_that_builds_it() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    // Without --dry-run the inputs are still checked first: QEMU is never reached here.
    // (That `auto` refuses TCG is a unit test of windows::build: on a KVM host this test
    // would otherwise boot Windows Setup from a stub ISO.)
    let out = quiesce(&cache)
        .args(["--accel", "kvm", "image", "build", "windows", "--iso"])
        .arg(dir.path().join("missing.iso"))
        .arg("--virtio-win")
        .arg(dir.path().join("missing-virtio.iso"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{:?}", text(&out));
    assert!(no_image_in(&cache));
    let out = quiesce(&cache).args(["image", "path", "windows"]).output().unwrap();
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains("quiesce image build windows --iso WIN.iso --virtio-win VIRTIO.iso"), "{stderr}");
    let out = quiesce(&cache).args(["image", "build", "windows"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{:?}", text(&out));
}
