//! Unit tests of the condition rules, on recorded (or schema-built) guest agent replies.

use super::*;
use serde_json::{json, Value};

/// A reply as the typed command would take it; a test fails if it does not fit.
fn typed<T: serde::de::DeserializeOwned>(reply: Value) -> T {
    serde_json::from_value(reply).expect("the reply fits QEMU's schema")
}

fn held(f: &Finding) -> &str {
    match f {
        Finding::Held(r) => r,
        other => panic!("expected it to hold: {other:?}"),
    }
}

fn failed(f: &Finding) -> &str {
    match f {
        Finding::Failed(r) => r,
        other => panic!("expected it to fail: {other:?}"),
    }
}

// Recorded facts: replies of qemu-ga's guest-get-osinfo. The Linux one is from this
// project's test guest; the Windows Server 2022 one follows qemu-ga's Windows code (NT
// version in kernel-version, build number in kernel-release); qemu-ga never ran on
// Windows 2000, so that one is made from the same fields with NT 5.0's values. Neither
// Windows reply comes from a live guest here.
fn linux() -> Value {
    json!({"name": "Debian GNU/Linux", "kernel-release": "6.12.117+deb12-cloud-amd64", "version": "12 (bookworm)",
           "id": "debian", "kernel-version": "#1 SMP PREEMPT_DYNAMIC Debian 6.12.117-1~deb12u1", "machine": "x86_64",
           "pretty-name": "Debian GNU/Linux 12 (bookworm)", "version-id": "12"})
}
fn windows_2022() -> Value {
    json!({"name": "Microsoft Windows", "kernel-release": "20348", "version": "Microsoft Windows Server 2022",
           "variant": "server", "pretty-name": "Windows Server 2022 Datacenter", "version-id": "2022",
           "variant-id": "server", "kernel-version": "10.0", "machine": "x86_64", "id": "mswindows"})
}
fn windows_2000() -> Value {
    json!({"name": "Microsoft Windows", "kernel-release": "2195", "version": "Microsoft Windows 2000",
           "variant": "server", "pretty-name": "Windows 2000 Server", "version-id": "2000",
           "variant-id": "server", "kernel-version": "5.0", "machine": "x86", "id": "mswindows"})
}

#[test]
fn os_rule_table() {
    assert!(os_supported(&typed(linux())).held());
    assert!(held(&os_supported(&typed(windows_2022()))).contains("Windows Server 2022"));
    let f = os_supported(&typed(windows_2000()));
    assert!(failed(&f).contains("Windows 2000 (NT 5.0) is never supported"), "{f:?}");
    // NT 5.1 (XP) and 5.2 (2003) are not caught by the 2000 rule.
    let mut xp = windows_2000();
    xp["kernel-version"] = json!("5.1");
    assert!(os_supported(&typed(xp)).held());
    assert!(os_supported(&typed(json!({}))).held());
}

fn commands(freeze: bool, thaw: bool) -> Value {
    json!({"version": "10.0.2", "supported_commands": [
        {"name": "guest-fsfreeze-freeze", "enabled": freeze, "success-response": true},
        {"name": "guest-fsfreeze-thaw", "enabled": thaw, "success-response": true}]})
}

#[test]
fn agent_must_have_freeze_and_thaw_enabled() {
    assert_eq!(held(&agent_can_freeze(&typed(commands(true, true)))), "qemu-ga 10.0.2 answers and can freeze and thaw");
    let f = agent_can_freeze(&typed(commands(false, true)));
    assert_eq!(failed(&f), "the guest agent has guest-fsfreeze-freeze disabled or missing");
    let f = agent_can_freeze(&typed(json!({"version": "1.0", "supported_commands": []})));
    assert!(failed(&f).contains("guest-fsfreeze-freeze and guest-fsfreeze-thaw"), "{f:?}");
    // A reply that does not fit the schema never reaches the rule.
    assert!(serde_json::from_value::<GuestAgentInfo>(json!("garbage")).is_err());
}

/// One entry of a guest-get-fsinfo reply, shaped as the test guest's qemu-ga 10 sends it
/// (recorded: every address field present, total-bytes-privileged on Linux).
fn fs(mnt: &str, ty: &str, serial: &str) -> Value {
    json!({"mountpoint": mnt, "type": ty, "name": "vdb", "total-bytes": 31334400,
           "total-bytes-privileged": 33009664, "used-bytes": 24576,
           "disk": [{"bus": 0, "bus-type": "virtio", "dev": "/dev/vdb", "serial": serial, "target": 0, "unit": 0,
                     "pci-controller": {"bus": 0, "domain": 0, "function": 0, "slot": 3}}]})
}

/// A Windows guest's entry, constructed from qemu-ga's Windows code (not from a live
/// guest): the volume GUID path as name, no total-bytes-privileged.
fn windows_fs(mnt: &str, ty: &str, serial: &str) -> Value {
    json!({"mountpoint": mnt, "type": ty, "name": "\\\\?\\Volume{6b1c3a2e-0000-0000-0000-100000000000}\\",
           "total-bytes": 64424509440u64, "used-bytes": 21474836480u64,
           "disk": [{"bus": 0, "bus-type": "scsi", "serial": serial, "target": 0, "unit": 0,
                     "pci-controller": {"bus": 0, "domain": 0, "function": 0, "slot": 4}}]})
}

fn fsinfo(entries: Vec<Value>) -> Vec<GuestFilesystemInfo> {
    typed(Value::Array(entries))
}

#[test]
fn filesystem_table() {
    let ok = fsinfo(vec![fs("/", "ext4", "root"), fs("/mnt/data", "xfs", "data"), fs("/boot/efi", "vfat", "other")]);
    assert_eq!(
        held(&filesystems_support_snapshots(&ok, &["root", "data"])),
        "all filesystems support snapshots: / (ext4), /mnt/data (xfs)"
    );
    let bad = fsinfo(vec![fs("/", "ext4", "root"), fs("/mnt/usb", "vfat", "data")]);
    let f = filesystems_support_snapshots(&bad, &["root", "data"]);
    assert!(failed(&f).contains("/mnt/usb is vfat"), "{f:?}");
    let unknown = fsinfo(vec![fs("/mnt/x", "weirdfs", "data")]);
    assert!(failed(&filesystems_support_snapshots(&unknown, &["data"])).contains("not known"));
}

#[test]
fn ntfs_is_refused_under_linux_ntfs3_and_fuse_but_not_under_windows() {
    // The ntfs3 entry of a guest-get-fsinfo reply recorded on the test guest (qemu-ga 10).
    let ntfs3 = fsinfo(vec![fs("/", "ext4", "root"), fs("/mnt/data", "ntfs3", "data")]);
    let f = filesystems_support_snapshots(&ntfs3, &["root", "data"]);
    assert!(failed(&f).starts_with("/mnt/data is ntfs3: the Linux ntfs3 driver cannot freeze"), "{f:?}");
    // Not one of ours: another VM's ntfs3 volume does not matter.
    assert!(filesystems_support_snapshots(&ntfs3, &["root"]).held());
    let fuse = fsinfo(vec![fs("/mnt/data", "fuseblk", "data")]);
    assert!(failed(&filesystems_support_snapshots(&fuse, &["data"])).contains("FUSE"));
    // Windows guests report GetVolumeInformation's names; NTFS and ReFS freeze under VSS.
    // Their entries have no total-bytes-privileged, and still fit the typed reply.
    let windows = fsinfo(vec![windows_fs("C:\\", "NTFS", "root"), windows_fs("D:\\", "ReFS", "data")]);
    let ok = filesystems_support_snapshots(&windows, &["root", "data"]);
    assert!(held(&ok).contains("C:\\ (NTFS)") && held(&ok).contains("D:\\ (ReFS)"), "{ok:?}");
    let usb = fsinfo(vec![windows_fs("E:\\", "FAT32", "data")]);
    assert!(failed(&filesystems_support_snapshots(&usb, &["data"])).contains("FAT has no journal"));
}

/// One entry of a guest-get-disks reply, shaped as the test guest's qemu-ga 10 sends it.
fn disk(name: &str, serial: Option<&str>, deps: &[&str]) -> Value {
    let mut d = json!({"name": name, "partition": false, "dependencies": deps});
    if let Some(serial) = serial {
        d["address"] = json!({"bus": 0, "bus-type": "virtio", "dev": name, "serial": serial, "target": 0,
                              "unit": 0, "pci-controller": {"bus": 0, "domain": 0, "function": 0, "slot": 2}});
    }
    d
}

#[test]
fn guest_volumes_on_our_disks_are_not_basic() {
    let disks: Vec<GuestDiskInfo> = typed(json!([
        disk("/dev/vda", Some("root"), &[]),
        disk("/dev/vdb", Some("data"), &[]),
        disk("/dev/dm-0", None, &["/dev/vdb", "/dev/vdc"]),
    ]));
    let f = guest_disks_basic(&disks, &["root", "data"]);
    assert_eq!(
        failed(&f),
        "guest volume /dev/dm-0 is built on /dev/vdb, /dev/vdc (device-mapper/md/LVM: not a basic disk)"
    );
    assert!(guest_disks_basic(&disks, &["root"]).held());
    assert!(guest_disks_basic(&[], &["root"]).held());
}

/// Found by the fuzz test: a guest named its OS in 44 KB, and the reason repeated it all
/// (it goes into the manifest and the report). Every rule that quotes the guest is cut.
#[test]
fn reasons_repeat_little_of_what_the_guest_said() {
    let long = format!("Debian GNU/{}\n\u{1b}[2J", "U/".repeat(22_000));
    let reason = |f: &Finding| match f {
        Finding::Held(r) | Finding::Failed(r) | Finding::NotChecked(r) => r.clone(),
    };
    let mut os = linux();
    os["pretty-name"] = json!(long);
    let mut info = commands(true, true);
    info["version"] = json!(long);
    let many: Vec<Value> = (0..500).map(|i| fs(&format!("/mnt/{i}{long}"), "ext4", "data")).collect();
    let odd = fsinfo(vec![fs(&long, &long, "data")]);
    let deps: Vec<String> = (0..500).map(|i| format!("/dev/vdb{i}{long}")).collect();
    let deps: Vec<&str> = deps.iter().map(String::as_str).collect();
    let disks: Vec<GuestDiskInfo> =
        typed(json!([disk("/dev/vdb", Some("data"), &[]), disk(&format!("/dev/dm-0{long}"), None, &deps)]));
    for f in [
        os_supported(&typed(os)),
        agent_can_freeze(&typed(info)),
        filesystems_support_snapshots(&fsinfo(many), &["data"]),
        filesystems_support_snapshots(&odd, &["data"]),
        guest_disks_basic(&disks, &["data"]),
    ] {
        let r = reason(&f);
        assert!(r.len() < 2048, "a reason of {} bytes: {}", r.len(), &r[..300]);
        assert!(!r.contains('\n') && !r.contains('\u{1b}'), "{r:?}");
        assert!(r.contains("… (44"), "the cut is said: {r:?}");
    }
}

#[test]
fn findings_become_verdicts_with_their_reason_unchanged() {
    let v = Finding::NotChecked(NO_AGENT.to_owned()).verdict(Condition::GuestOsSupported);
    assert_eq!((v.outcome, v.reason.as_str()), (Outcome::NotChecked, NO_AGENT));
    let v = Finding::Failed("x".into()).verdict(Condition::VmRunning);
    assert_eq!((v.outcome, v.reason.as_str(), v.held()), (Outcome::Failed, "x", false));
    let vs = [
        Finding::NotChecked(NO_AGENT.into()).verdict(Condition::GuestOsSupported),
        Finding::Held("fine".into()).verdict(Condition::VmRunning),
    ];
    assert_eq!(failures(&vs).as_deref(), Some("guest-os-supported: not checked: the guest agent is not answering"));
    let vs = [vs[0].clone(), Finding::Failed("the VM is paused".into()).verdict(Condition::VmRunning)];
    assert_eq!(failures(&vs).as_deref(), Some("vm-running: the VM is paused"));
}
