//! The machine guard cleans up on every path: a normal drop, a panic, a clean shutdown,
//! and QEMU dying under it.

use std::time::Duration;

use crate::common;

#[tokio::test]
async fn drop_leaves_no_process_and_no_socket() {
    let guest = common::boot("guard-drop").await;
    let pid = guest.machine.pid();
    let run_dir = guest.machine.run_dir().to_owned();
    let disk_dir = guest.disk_dir().to_owned();
    assert!(run_dir.join("qmp.sock").exists());
    drop(guest);
    assert!(!common::process_exists(pid), "QEMU {pid} still exists after drop");
    assert!(!run_dir.exists(), "{} left behind", run_dir.display());
    assert!(!disk_dir.exists(), "{} left behind", disk_dir.display());
}

#[test]
fn a_panicking_test_takes_its_qemu_with_it_and_keeps_evidence() {
    let (tx, rx) = std::sync::mpsc::channel();
    let outcome = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let guest = common::boot("guard-panic").await;
            tx.send((guest.machine.pid(), guest.machine.run_dir().to_owned())).unwrap();
            panic!("deliberate panic while holding a machine");
        })
    })
    .join();
    assert!(outcome.is_err(), "the thread should have panicked");
    let (pid, run_dir) = rx.recv().unwrap();
    assert!(!common::process_exists(pid), "QEMU {pid} survived the panic");
    assert!(!run_dir.exists());
    let kept = std::fs::read_dir(common::artifacts())
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("guard-panic-"))
        .expect("an evidence folder for the panicked machine");
    for f in ["serial.log", "transcript.log", "cmdline.sh", "qemu-img-info.txt", "why.txt"] {
        assert!(kept.join(f).is_file(), "{f} missing from {}", kept.display());
    }
    let serial = std::fs::read_to_string(kept.join("serial.log")).unwrap();
    assert!(serial.contains("QUIESCE-GUEST-READY"), "serial log: {serial}");
    let info = std::fs::read_to_string(kept.join("qemu-img-info.txt")).unwrap();
    assert!(info.contains("backing file"), "{info}");
    std::fs::remove_dir_all(kept).unwrap();
}

#[tokio::test]
async fn clean_shutdown_through_the_agent() {
    let mut guest = common::boot("guard-shutdown").await;
    let status = guest.machine.shutdown(Duration::from_secs(30)).await.unwrap();
    assert!(status.success(), "{status}");
    assert!(!guest.machine.is_running());
}

#[tokio::test]
async fn qemu_killed_under_the_guard_is_reported_and_cleaned() {
    let mut guest = common::boot("guard-killed").await;
    let run_dir = guest.machine.run_dir().to_owned();
    guest.machine.kill().expect("QEMU exits on SIGKILL");
    let err = guest.machine.qmp().execute(qapi::qmp::query_status {}).await.unwrap_err();
    assert!(matches!(err, quiesce::qemu::QmpError::Disconnected { .. } | quiesce::qemu::QmpError::Io(_)), "{err}");
    guest.machine.mark_failed("test killed QEMU");
    drop(guest);
    assert!(!run_dir.exists());
}

/// A guest that panics at boot ends its QEMU (`panic=-1` and `-no-reboot`): the boot fails
/// saying QEMU exited, with the kernel's panic in the serial tail, never with a bare error
/// of the agent's socket (the reset QEMU's exit leaves on it).
#[tokio::test]
async fn a_guest_that_panics_at_boot_is_reported_as_qemu_exiting_with_its_serial_tail() {
    use quiesce::qemu::{DiskFormat, Machine, MachineError};
    let image = quiesce::image::recipe::ensure("linux", false, &mut |s| eprintln!("  {s}")).unwrap();
    let verdict = quiesce::testguest::accel_for(&image, None).unwrap();
    let mut boot = image.kernel_boot();
    // No init in the initramfs, none on a root that does not exist: the kernel panics.
    boot.append = "console=ttyS0 panic=-1 rdinit=/no-such-init init=/no-such-init root=/dev/no-such-disk".into();
    let (cfg, _disks) = quiesce::testguest::machine_config(
        common::options("guard-boot-panic"),
        verdict.accel,
        boot,
        &image.root,
        DiskFormat::Raw,
    )
    .unwrap();
    let mut machine = Machine::launch(cfg).await.unwrap();
    let err = machine.wait_agent(quiesce::sys::deadline::boot_to_agent()).await.unwrap_err();
    let MachineError::Exited { serial, .. } = &err else { panic!("expected QEMU to have exited, got: {err}") };
    assert!(serial.contains("Kernel panic"), "serial tail: {serial}");
    drop(machine);
    for e in std::fs::read_dir(common::artifacts()).unwrap().filter_map(Result::ok) {
        if e.file_name().to_string_lossy().starts_with("guard-boot-panic-") {
            std::fs::remove_dir_all(e.path()).unwrap();
        }
    }
}
