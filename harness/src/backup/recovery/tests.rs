use super::*;

fn record() -> Record {
    Record {
        version: VERSION,
        vm: Identity {
            qmp: "/run/vm/qmp.sock".into(),
            pid: 4242,
            start_ticks: 123456,
            boot_id: "b0".into(),
            name: "own".into(),
        },
        agent: Some("/run/vm/qga.sock".into()),
        before: Before { running: true, status: "running".into() },
        migration: Some(MigrationSettings::from_replies(
            &serde_json::json!([{"capability": "events", "state": false}]),
            &serde_json::json!({"max-bandwidth": 134217728}),
        )),
        writer_pid: 1,
        left: Leftovers {
            frozen: true,
            saving: false,
            overlays: vec![OverlayRecord {
                disk: "virtio0".into(),
                base_node: "#block142".into(),
                node: "virtio0-snap".into(),
                file: "/run/vm/own-virtio0-overlay.qcow2".into(),
            }],
            reserve: Some("/run/vm/own-merge-reserve".into()),
            merge_paused: true,
            in_place: None,
        },
    }
}

/// The journal of an in-place restore: nothing of a backup's, no migration settings.
fn in_place_record() -> Record {
    let r = record();
    let restore = InPlaceRecord { backup: "/backups/own-1".into(), vm: "own".into() };
    Record { agent: None, migration: None, left: Leftovers { in_place: Some(restore), ..Leftovers::default() }, ..r }
}

#[test]
fn start_ticks_are_read_past_a_command_name_with_spaces_and_parentheses() {
    // As Linux writes /proc/PID/stat; field 22 (starttime) is 9876543.
    let stat = "1234 (qemu (x) 1) S 1 1234 1234 0 -1 4194560 100 0 0 0 5 6 0 0 20 0 3 0 9876543 1000 10 0";
    assert_eq!(start_ticks_of(stat), Some(9876543));
    assert_eq!(start_ticks_of("1234 (short) S 1"), None);
    // Ended, not reaped yet: gone.
    assert_eq!(start_ticks_of(&stat.replace(") S 1", ") Z 1")), None);
    assert_eq!(start_ticks_of("no parenthesis"), None);
    let me = std::fs::read_to_string("/proc/self/stat").unwrap();
    assert!(start_ticks_of(&me).is_some());
}

#[test]
fn the_same_process_only_matches_pid_start_and_boot() {
    let a = record().vm;
    assert!(a.same_process(&Identity { name: "renamed".into(), ..a.clone() }));
    assert!(!a.same_process(&Identity { pid: 4243, ..a.clone() }));
    assert!(!a.same_process(&Identity { start_ticks: 1, ..a.clone() }));
    assert!(!a.same_process(&Identity { boot_id: "b1".into(), ..a.clone() }));
    assert!(!a.same_process(&Identity { qmp: "/other.sock".into(), ..a.clone() }));
    // This process is live; one with its pid but another start time is another process.
    let me = Identity::of(Path::new("/x.sock"), std::process::id(), "me").unwrap();
    assert_eq!(me.liveness(), Liveness::Live);
    assert_eq!(Identity { start_ticks: me.start_ticks + 1, ..me.clone() }.liveness(), Liveness::OtherProcess);
    assert_eq!(Identity { pid: u32::MAX - 1, ..me }.liveness(), Liveness::Gone);
}

#[test]
fn a_journal_is_written_whole_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j.json");
    let r = record();
    write_durably(&path, &serde_json::to_vec(&r).unwrap()).unwrap();
    assert_eq!(read(&path).unwrap(), r);
    // No temporary file is left beside it.
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(names, [std::ffi::OsString::from("j.json")]);
    assert!(r.left.to_string().contains("the guest frozen, overlay virtio0-snap"), "{}", r.left);
    assert!(r.left.to_string().ends_with("the VM paused to finish a merge"), "{}", r.left);
    let r = in_place_record();
    write_durably(&path, &serde_json::to_vec(&r).unwrap()).unwrap();
    assert_eq!(read(&path).unwrap(), r);
    assert!(!r.left.is_empty());
    assert!(r.left.to_string().contains("in-place restore of VM own from backup /backups/own-1"), "{}", r.left);
}

/// A journal of another version says so (not "missing field"), whatever its fields.
#[test]
fn a_journal_of_another_version_is_refused_by_its_version() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j.json");
    // As version 1 wrote it: no merge_paused, no in_place.
    let mut j = serde_json::to_value(record()).unwrap();
    j["version"] = 1.into();
    j["left"].as_object_mut().unwrap().remove("merge_paused");
    j["left"].as_object_mut().unwrap().remove("in_place");
    std::fs::write(&path, serde_json::to_vec(&j).unwrap()).unwrap();
    match read(&path) {
        Err(JournalError::Unreadable { why, .. }) => {
            assert!(why.contains("version 1, written by another quiesce") && why.contains("reads version 2"), "{why}")
        }
        other => panic!("accepted: {other:?}"),
    }
}

/// A journal is untrusted: each bound broken is refused with the reason, never acted on.
#[test]
fn a_journal_out_of_bounds_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j.json");
    let refused = |r: &Record| {
        std::fs::write(&path, serde_json::to_vec(r).unwrap()).unwrap();
        match read(&path) {
            Err(JournalError::Unreadable { why, .. }) => why,
            other => panic!("accepted: {other:?}"),
        }
    };
    let mut r = record();
    r.version = VERSION + 1;
    assert!(refused(&r).contains(&format!("version {}", VERSION + 1)));
    let mut r = in_place_record();
    r.left.in_place.as_mut().unwrap().backup = "relative/backup".into();
    assert!(refused(&r).contains("not an absolute path"));
    let mut r = in_place_record();
    r.left.in_place.as_mut().unwrap().backup = "/backups/../etc".into();
    assert!(refused(&r).contains("not an absolute path"));
    let mut r = in_place_record();
    r.left.in_place.as_mut().unwrap().vm = "a\nb".into();
    assert!(refused(&r).contains("not a VM name"));
    let mut r = in_place_record();
    r.left.in_place.as_mut().unwrap().vm = "x".repeat(MAX_TEXT + 1);
    assert!(refused(&r).contains("longer than"));
    let mut r = in_place_record();
    r.left.frozen = true;
    assert!(refused(&r).contains("an in-place restore together with"));
    let mut r = record();
    r.left.overlays[0].file = "/etc/passwd".into();
    assert!(refused(&r).contains("not a file quiesce makes"));
    let mut r = record();
    r.left.overlays[0].file = "/run/../etc/x-overlay.qcow2".into();
    assert!(refused(&r).contains("not a file quiesce makes"));
    let mut r = record();
    r.left.reserve = Some("relative-merge-reserve".into());
    assert!(refused(&r).contains("merge reserve"));
    let mut r = record();
    r.left.overlays[0].node = "a\"b".into();
    assert!(refused(&r).contains("not a node name"));
    let mut r = record();
    r.left.overlays = vec![r.left.overlays[0].clone(); MAX_OVERLAYS + 1];
    assert!(refused(&r).contains("overlays"));
    let mut r = record();
    r.migration = Some(MigrationSettings::from_replies(
        &serde_json::json!([{"capability": "events", "state": false}]),
        &serde_json::json!({"max-bandwidth": 1}),
    ));
    let mut j = serde_json::to_value(&r).unwrap();
    j["migration"]["capabilities"] = serde_json::json!([["x-colo", true]]);
    std::fs::write(&path, serde_json::to_vec(&j).unwrap()).unwrap();
    assert!(matches!(read(&path), Err(JournalError::Unreadable { why, .. }) if why.contains("x-colo")));
    let mut r = record();
    r.vm.name = "x".repeat(MAX_TEXT + 1);
    assert!(refused(&r).contains("longer than"));
    std::fs::write(&path, b"{\"version\": 1, \"extra\": true}").unwrap();
    assert!(matches!(read(&path), Err(JournalError::Unreadable { .. })));
    std::fs::write(&path, vec![b' '; MAX_BYTES as usize + 1]).unwrap();
    assert!(matches!(read(&path), Err(JournalError::Unreadable { why, .. }) if why.contains("at most")));
    std::fs::write(&path, [0xff, 0xfe]).unwrap();
    assert!(matches!(read(&path), Err(JournalError::Unreadable { .. })));
}

#[test]
fn a_node_opens_its_file_also_in_json_form() {
    use serde_json::json;
    let f = Path::new("/run/vm/own-virtio0-overlay.qcow2");
    assert!(replay::opens(&json!({"file": "/run/vm/own-virtio0-overlay.qcow2"}), f));
    // As QEMU 10 names an overlay added with "backing": null.
    let j = r#"json:{"backing": null, "driver": "qcow2", "file": {"driver": "file", "filename": "/run/vm/own-virtio0-overlay.qcow2"}}"#;
    assert!(replay::opens(&json!({ "file": j }), f));
    assert!(!replay::opens(&json!({"file": "/run/vm/other-overlay.qcow2"}), f));
    assert!(!replay::opens(&json!({"file": "json:{not json"}), f));
    assert!(!replay::opens(&json!({}), f));
}
