use super::*;

fn record() -> Record {
    Record {
        version: VERSION,
        domain: DomainId {
            uri: "qemu:///system".into(),
            uuid: "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0".into(),
            name: "guest1".into(),
        },
        writer_pid: 4242,
        before: "running".into(),
        snapshot: "quiesce-4242".into(),
        overlays: vec![OverlayRecord {
            target: "vda".into(),
            image: "/var/lib/g/root.qcow2".into(),
            overlay: "/var/lib/g/guest1-vda-quiesce-overlay-4242.qcow2".into(),
        }],
        freezing: true,
        pausing: false,
    }
}

#[test]
fn a_journal_quiesce_writes_is_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j.json");
    std::fs::write(&path, serde_json::to_vec(&record()).unwrap()).unwrap();
    assert_eq!(read(&path).unwrap(), record());
}

#[test]
fn a_journal_that_quiesce_did_not_write_is_refused_clearly() {
    type Change = Box<dyn Fn(&mut Record)>;
    let broken: Vec<(&str, Change)> = vec![
        ("version", Box::new(|r| r.version = 2)),
        ("not a plain name", Box::new(|r| r.overlays[0].target = "../vda".into())),
        (
            "not an absolute path",
            Box::new(|r| r.overlays[0].overlay = "g/guest1-vda-quiesce-overlay-4242.qcow2".into()),
        ),
        (
            "not an absolute path",
            Box::new(|r| r.overlays[0].overlay = "/var/../etc/guest1-vda-quiesce-overlay-4242.qcow2".into()),
        ),
        // Any file but quiesce's own overlay of that disk by that run: never deleted.
        ("not a file quiesce makes", Box::new(|r| r.overlays[0].overlay = "/etc/passwd".into())),
        (
            "not a file quiesce makes",
            Box::new(|r| r.overlays[0].overlay = "/g/x-vdb-quiesce-overlay-4242.qcow2".into()),
        ),
        ("not a file quiesce makes", Box::new(|r| r.overlays[0].overlay = "/g/x-vda-quiesce-overlay-1.qcow2".into())),
        ("not a file quiesce makes", Box::new(|r| r.overlays[0].overlay = "/g/-vda-quiesce-overlay-4242.qcow2".into())),
        ("is not one", Box::new(|r| r.domain.uuid = "guest1".into())),
        ("no connection URI", Box::new(|r| r.domain.uri = String::new())),
        ("control characters", Box::new(|r| r.domain.uri = "qemu:///system\n".into())),
        ("not one quiesce names", Box::new(|r| r.snapshot = "someone-elses".into())),
        ("overlays (at most", Box::new(|r| r.overlays = vec![r.overlays[0].clone(); MAX_OVERLAYS + 1])),
    ];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j.json");
    for (why, change) in broken {
        let mut r = record();
        change(&mut r);
        std::fs::write(&path, serde_json::to_vec(&r).unwrap()).unwrap();
        let e = read(&path).unwrap_err().to_string();
        assert!(e.contains("is unreadable") && e.contains(why), "{why}: {e}");
    }
    std::fs::write(&path, b"{\"version\": 1, \"extra\": true}").unwrap();
    assert!(matches!(read(&path), Err(JournalError::Unreadable { .. })));
    std::fs::write(&path, vec![b' '; recovery::MAX_BYTES as usize + 1]).unwrap();
    assert!(read(&path).unwrap_err().to_string().contains("at most"));
}

#[test]
fn the_journal_is_named_by_uri_and_uuid() {
    let a = journal_path("qemu:///system", "0F1E2D3C-4B5A-6978-8796-A5B4C3D2E1F0").unwrap();
    assert_eq!(a, journal_path("qemu:///system", "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0").unwrap());
    assert_ne!(a, journal_path("qemu:///session", "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0").unwrap());
    assert!(a.parent().unwrap().ends_with("libvirt-journals"));
}

#[test]
fn libvirt_states_and_reasons_are_read() {
    use super::replay::state_and_reason;
    assert_eq!(state_and_reason("paused (snapshot)\n"), ("paused".into(), "snapshot".into()));
    assert_eq!(state_and_reason("paused (from snapshot)"), ("paused".into(), "from snapshot".into()));
    assert_eq!(state_and_reason("shut off (destroyed)"), ("shut off".into(), "destroyed".into()));
    assert_eq!(state_and_reason("running"), ("running".into(), String::new()));
}
