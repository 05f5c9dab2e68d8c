//! A QEMU started by a test as a person starts one (`-drive if=virtio`, so QEMU names the
//! nodes itself; its own QMP and agent sockets; daemonized, so in a session and process
//! group of its own), for the tests of VMs quiesce did not start (`own_vm`, `recovery`).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use quiesce::image::qemu_img;
use quiesce::image::recipe;
use quiesce::qemu::{DiskFormat, GuestAgent, Qmp, Transcript};
use quiesce::sys::{deadline, Process, Tool};
use quiesce::workload;

/// What one agent or QMP exchange of a test may take on a shared machine.
pub const T: Duration = Duration::from_secs(60);

/// A QEMU started by hand (by the test), stopped when dropped: quiesce never stops it.
pub struct HandStarted {
    pub dir: tempfile::TempDir,
    pub process: Process,
}

impl HandStarted {
    pub fn qmp(&self) -> PathBuf {
        self.dir.path().join("qmp.sock")
    }

    pub fn agent(&self) -> PathBuf {
        self.dir.path().join("qga.sock")
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root.qcow2")
    }

    /// Starts the cached Linux test guest as a person would, and waits for its agent.
    pub async fn start(name: &str) -> HandStarted {
        let image = recipe::ensure("linux", false, &mut |s| eprintln!("  {s}")).expect("the test guest image");
        let accel = quiesce::testguest::accel_for(&image, None).expect("an accelerator").accel;
        let dir = tempfile::Builder::new().prefix(&format!("quiesce-own-{name}-")).tempdir().unwrap();
        // The VM's own copies (hard links where they can be) of the cached files: the shared
        // cache may replace its image while the VM runs, and a person's VM owns its files.
        let own = |from: &Path, name: &str| {
            let to = dir.path().join(name);
            std::fs::hard_link(from, &to).or_else(|_| std::fs::copy(from, &to).map(|_| ())).unwrap();
            to
        };
        let base = own(&image.root, "base.img");
        let root = dir.path().join("root.qcow2");
        qemu_img::create_overlay(&base, DiskFormat::Raw, &root).unwrap();
        let mut boot = image.kernel_boot();
        boot.kernel = own(&boot.kernel, "vmlinuz");
        boot.initrd = own(&boot.initrd, "initrd.img");
        let d = dir.path().display();
        let args: Vec<String> = vec![
            "-name".into(),
            name.into(),
            "-M".into(),
            "q35".into(),
            "-accel".into(),
            accel.as_str().into(),
            "-m".into(),
            "256".into(),
            "-display".into(),
            "none".into(),
            "-nodefaults".into(),
            "-kernel".into(),
            boot.kernel.display().to_string(),
            "-initrd".into(),
            boot.initrd.display().to_string(),
            "-append".into(),
            boot.append.clone(),
            "-drive".into(),
            format!("file={},if=virtio,format=qcow2", root.display()),
            "-qmp".into(),
            format!("unix:{d}/qmp.sock,server=on,wait=off"),
            "-chardev".into(),
            format!("socket,path={d}/qga.sock,server=on,wait=off,id=qga0"),
            "-device".into(),
            "virtio-serial-pci".into(),
            "-device".into(),
            "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0".into(),
            "-serial".into(),
            format!("file:{d}/serial.log"),
            "-pidfile".into(),
            format!("{d}/qemu.pid"),
            // The parent exits once the sockets exist: no waiting for files to appear.
            "-daemonize".into(),
        ];
        Tool::new("qemu-system-x86_64", deadline::QMP_CONNECT).args(&args).run().expect("QEMU starts");
        let pid: u32 = std::fs::read_to_string(dir.path().join("qemu.pid")).unwrap().trim().parse().unwrap();
        let process = Process::open(pid).expect("QEMU is running");
        let vm = HandStarted { dir, process };
        let a = vm.agent_conn().await;
        a.wait_ready(deadline::BOOT_TO_AGENT).await.expect("the guest agent answers");
        workload::start_counter(&a).await.unwrap();
        drop(a);
        vm
    }

    /// A connection to the guest agent; drop it before quiesce runs (the agent's socket
    /// serves one client at a time).
    pub async fn agent_conn(&self) -> GuestAgent {
        let s = tokio::net::UnixStream::connect(self.agent()).await.unwrap();
        let t = Transcript::create(&self.dir.path().join("test-agent.log")).unwrap();
        GuestAgent::new(s, t)
    }

    /// Asks QEMU `command` on a connection of its own, closed afterwards.
    pub async fn qmp_ask(&self, command: &str, args: Value) -> Value {
        let s = tokio::net::UnixStream::connect(self.qmp()).await.unwrap();
        let t = Transcript::create(&self.dir.path().join("test-qmp.log")).unwrap();
        let q = Qmp::connect(s, t, deadline::QMP_CONNECT).await.unwrap();
        q.execute_raw(command, args, deadline::QMP_COMMAND).await.unwrap()
    }

    /// What must be the same before and after a backup: run state, block nodes (by driver
    /// and file: no overlay left), the migration settings a save changes.
    pub async fn state(&self) -> Value {
        let status = self.qmp_ask("query-status", Value::Null).await;
        let nodes = self.qmp_ask("query-named-block-nodes", json!({"flat": true})).await;
        let mut nodes: Vec<String> =
            nodes.as_array().unwrap().iter().map(|n| format!("{} {} ro={}", n["drv"], n["file"], n["ro"])).collect();
        nodes.sort();
        let caps = self.qmp_ask("query-migrate-capabilities", Value::Null).await;
        let params = self.qmp_ask("query-migrate-parameters", Value::Null).await;
        json!({"status": status["status"], "running": status["running"], "nodes": nodes, "caps": caps,
               "bandwidth": params["max-bandwidth"], "channels": params["multifd-channels"]})
    }

    /// The guest is thawed and its counter moves past its last value.
    pub async fn assert_alive(&self) {
        let a = self.agent_conn().await;
        a.wait_ready(T).await.unwrap();
        let frozen = a.execute_raw("guest-fsfreeze-status", Value::Null, T).await.unwrap();
        assert_eq!(frozen, json!("thawed"));
        let c = workload::read_counter(&a).await.unwrap();
        workload::wait_counter_above(&a, c, T).await.expect("the counter goes on");
    }
}

impl Drop for HandStarted {
    fn drop(&mut self) {
        // The test started it, so the test stops it (quiesce never does).
        self.process.terminate(deadline::QEMU_QUIT);
    }
}
