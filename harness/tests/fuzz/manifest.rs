//! manifest.json is input from elsewhere: mutated manifests of a real backup folder, opened
//! and checked. Whatever the manifest says, quiesce reads nothing outside the folder, does
//! not panic, stays within its memory bound, and an error is short and says what is wrong.

use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use serde_json::{json, Value};

use super::engine::{self, mutate_bytes, Rng};
use quiesce::backup::manifest::VmBackup;
use quiesce::backup::{Backup, BackupWriter};

/// A manifest is bounded (4 MiB) and what it holds is small; reading and checking one, the
/// files of this test folder included, needs far less than this.
const MEMORY: usize = 48 << 20;

/// Strings a mutated manifest puts where a name or path goes.
const NAMES: &[&str] = &[
    "../../../../etc/passwd",
    "/etc/passwd",
    "..",
    ".",
    "",
    "vm1",
    "vm2",
    "root.qcow2",
    "boot/vmlinuz",
    "boot/../boot/vmlinuz",
    "boot//vmlinuz",
    "./state.bin",
    "link",
    "link/x",
    "dirlink/vmlinuz",
    "../outside/secret",
    "fifo",
    "boot",
    "a\0b",
    "vms",
    "manifest.json",
    "../vm2/root.qcow2",
    "\\..\\..\\etc\\passwd",
    "%2e%2e/etc",
];

fn vm(name: &str, method: &str, disks: Value, state: Value) -> VmBackup {
    serde_json::from_value(json!({
        "name": name, "method": method, "method_reason": "fuzz seed",
        "conditions": [
            {"condition": "agent-can-freeze", "outcome": "held", "reason": "qemu-ga answered"},
            {"condition": "guest-os-supported", "outcome": "failed", "reason": "Windows 2000"},
        ],
        "run_state_before": "running",
        "machine": {"machine_type": "q35", "accel": "tcg", "memory_mib": 256, "cpus": 1, "agent": true,
                    "kernel": "boot/vmlinuz", "initrd": "boot/initrd.img", "append": "console=ttyS0", "disk_order": ["root", "data"]},
        "disks": disks, "state": state,
        "excluded": [{"node_name": "lun", "virtual_size": 1048576, "why": "iSCSI"}],
        "timings": {"downtime_ms": 12.5, "save_ms": null, "capture_ms": 3.0, "freeze_window_ms": 40.0},
    }))
    .expect("the seed VM is a valid manifest entry")
}

fn disk(node: &str, file: &str, format: &str, dir: &Path, content: &[u8]) -> Value {
    std::fs::write(dir.join(file), content).unwrap();
    let (sha256, bytes) = quiesce::backup::folder::sha256_file(&dir.join(file)).unwrap();
    json!({"node_name": node, "format": format, "virtual_size": 1 << 20, "file": file, "bytes": bytes, "sha256": sha256})
}

/// A backup folder of two VMs (Saved State and Child VM Snapshot), written by quiesce's own
/// writer, with traps beside it: a secret outside the folder, links to it, a FIFO.
fn seed_backup(root: &Path) -> std::path::PathBuf {
    let path = root.join("backup");
    let mut w = BackupWriter::create(&path, "10.0.2").unwrap();
    for (name, method) in [("vm1", "saved-state"), ("vm2", "child-snapshot")] {
        let dir = w.vm_dir(name).unwrap();
        std::fs::create_dir_all(dir.join("boot")).unwrap();
        std::fs::write(dir.join("boot/vmlinuz"), b"kernel").unwrap();
        std::fs::write(dir.join("boot/initrd.img"), b"initrd").unwrap();
        let disks = json!([
            disk("root", "root.qcow2", "qcow2", &dir, b"root"),
            disk("data", "data.vhdx", "vhdx", &dir, b"data")
        ]);
        let state = if method == "saved-state" {
            let d = disk("x", "state.bin", "raw", &dir, b"state");
            json!({"file": "state.bin", "bytes": d["bytes"], "sha256": d["sha256"], "mapped_ram": true, "multifd_channels": 4})
        } else {
            Value::Null
        };
        w.add(vm(name, method, disks, state));
    }
    w.commit().unwrap();
    let outside = root.join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("secret"), b"secret").unwrap();
    std::os::unix::fs::symlink(outside.join("secret"), path.join("vms/vm1/link")).unwrap();
    std::os::unix::fs::symlink(&outside, path.join("vms/vm1/dirlink")).unwrap();
    nix::unistd::mkfifo(&path.join("vms/vm1/fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    path
}

/// A random JSON value, sometimes of a kind the field does not take.
fn value(rng: &mut Rng, depth: usize) -> Value {
    match rng.below(if depth > 3 { 6 } else { 8 }) {
        0 => Value::Null,
        1 => json!(rng.one_in(2)),
        2 => json!(*rng.pick(&[0u64, 1, 2, 3, u64::from(u32::MAX) + 2, u64::MAX])),
        3 => json!(*rng.pick(&[-1.0f64, 0.5, 1e300, -0.0])),
        4 | 5 => json!(*rng.pick(NAMES)),
        6 => Value::Array((0..rng.below(4)).map(|_| value(rng, depth + 1)).collect()),
        _ => Value::Object((0..rng.below(4)).map(|_| (rng.pick(NAMES).to_string(), value(rng, depth + 1))).collect()),
    }
}

/// One structural change at a random place of the manifest.
fn mutate_json(rng: &mut Rng, v: &mut Value) {
    // A random node, as a JSON pointer found by walking down.
    let mut pointer = String::new();
    let mut at = &*v;
    for _ in 0..rng.below(7) {
        let (key, next) = match at {
            Value::Object(o) if !o.is_empty() => {
                let (k, n) = o.iter().nth(rng.below(o.len())).expect("in range");
                (k.replace('~', "~0").replace('/', "~1"), n)
            }
            Value::Array(a) if !a.is_empty() => {
                let i = rng.below(a.len());
                (i.to_string(), &a[i])
            }
            _ => break,
        };
        pointer.push('/');
        pointer.push_str(&key);
        at = next;
    }
    let node = v.pointer_mut(&pointer).expect("the pointer was just walked");
    match (rng.below(6), node) {
        (0, Value::Object(o)) if !o.is_empty() => {
            let k = o.keys().nth(rng.below(o.len())).cloned().expect("in range");
            o.remove(&k);
        }
        (1, Value::Array(a)) if !a.is_empty() => {
            let i = rng.below(a.len());
            let dup = a[i].clone();
            a.insert(i, dup);
        }
        (2, Value::String(s)) => *s = rng.pick(NAMES).to_string(),
        (3, n) => {
            // Nesting deeper than serde_json's recursion limit, sometimes.
            let depth = rng.pick(&[2usize, 50, 200]);
            let mut inner = std::mem::take(n);
            for _ in 0..*depth {
                inner = json!([inner]);
            }
            *n = inner;
        }
        (_, n) => *n = value(rng, 0),
    }
}

/// The JSON pointers of every leaf of `v`, with the key that holds it.
fn leaves(v: &Value, at: &str, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(o) => o.iter().for_each(|(k, x)| {
            let p = format!("{at}/{}", k.replace('~', "~0").replace('/', "~1"));
            if x.is_object() || x.is_array() {
                leaves(x, &p, out);
            } else {
                out.push((p, k.clone()));
            }
        }),
        Value::Array(a) => a.iter().enumerate().for_each(|(i, x)| leaves(x, &format!("{at}/{i}"), out)),
        _ => {}
    }
}

/// One change that keeps the manifest's shape, so it gets past the parser: a name or path
/// replaced (the checks on names), a size or checksum changed (the checks on content).
fn mutate_field(rng: &mut Rng, v: &mut Value, leaves: &[(String, String)]) {
    // Names and paths half the time: they are what keeps a backup inside its folder.
    let names: Vec<&(String, String)> = leaves.iter().filter(|(_, k)| is_name(k)).collect();
    let (pointer, key) = if rng.one_in(2) { *rng.pick(&names) } else { rng.pick(leaves) };
    let Some(node) = v.pointer_mut(pointer) else { return };
    *node = match key.as_str() {
        k if is_name(k) => match rng.below(6) {
            0 => json!(format!("{}/{}", rng.pick(NAMES), rng.pick(NAMES))),
            1 => json!("x".repeat(rng.len(1 << 16))),
            _ => json!(*rng.pick(NAMES)),
        },
        "bytes" | "virtual_size" => json!(*rng.pick(&[0u64, 1, 4, 5, 6, u64::MAX])),
        "sha256" => json!(*rng.pick(&["", "00", &"0".repeat(64), "not hex"])),
        "format_version" => json!(*rng.pick(&[0u64, 1, 2, 3])),
        // Mostly of the field's own type, so the change gets past the parser.
        _ => match (&*node, rng.below(3)) {
            (Value::String(_), 0 | 1) => json!(*rng.pick(NAMES)),
            (Value::Number(_), 0 | 1) => json!(*rng.pick(&[0u64, 1, 255, 256, u64::from(u32::MAX) + 1])),
            (Value::Bool(b), 0 | 1) => json!(!b),
            _ => value(rng, 0),
        },
    };
}

fn is_name(key: &str) -> bool {
    matches!(key, "file" | "kernel" | "initrd" | "name")
}

/// The rule, written again independently: every name is plain and reaches a regular file
/// (or nothing) inside the folder without a link on the way.
fn names_are_inside(backup: &Backup) -> Result<(), String> {
    let plain = |s: &str| {
        !s.is_empty()
            && !s.starts_with('/')
            && s.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
            && !s.contains('\0')
    };
    for vm in &backup.manifest.vms {
        if !plain(&vm.name) || vm.name.contains('/') {
            return Err(format!("VM name {:?} was accepted", vm.name));
        }
        let files = vm
            .disks
            .iter()
            .map(|d| &d.file)
            .chain(vm.state.iter().map(|s| &s.file))
            .chain(vm.files.iter().map(|f| &f.file));
        for f in files.chain([&vm.machine.kernel, &vm.machine.initrd]) {
            if !plain(f) {
                return Err(format!("file name {f:?} of VM {} was accepted", vm.name));
            }
            let mut p = backup.path.join("vms");
            for c in std::iter::once(vm.name.as_str()).chain(f.split('/')) {
                p.push(c);
                match std::fs::symlink_metadata(&p) {
                    Ok(m) if m.file_type().is_symlink() => {
                        return Err(format!("{f:?} passes through a link and was accepted"))
                    }
                    Ok(m) if m.file_type().is_fifo() => return Err(format!("{f:?} is a FIFO and was accepted")),
                    _ => {}
                }
            }
        }
    }
    Ok(())
}

#[test]
fn manifest() {
    let _turn = engine::turn();
    let root = tempfile::tempdir().unwrap();
    let path = seed_backup(root.path());
    let seed: Value = serde_json::from_slice(&std::fs::read(path.join("manifest.json")).unwrap()).unwrap();
    let mut fields = Vec::new();
    leaves(&seed, "", &mut fields);
    let stats = engine::run("manifest", |rng, input| {
        let mut m = seed.clone();
        for _ in 0..1 + rng.below(3) {
            if rng.one_in(5) {
                mutate_json(rng, &mut m);
            } else {
                mutate_field(rng, &mut m, &fields);
            }
        }
        *input = serde_json::to_vec_pretty(&m).expect("a Value encodes");
        if rng.one_in(8) {
            for _ in 0..1 + rng.below(3) {
                mutate_bytes(rng, input, 1 << 20);
            }
        }
        if rng.one_in(300) {
            // Past the bound on a manifest's size.
            input.resize(quiesce::backup::manifest::MAX_MANIFEST_BYTES as usize + 1 + rng.below(1000), b' ');
        }
        std::fs::write(path.join("manifest.json"), &*input).map_err(|e| e.to_string())?;
        let (result, peak) = engine::measure(|| {
            Backup::open(&path).map(|b| {
                let inside = names_are_inside(&b);
                (inside, b.check())
            })
        });
        if peak > MEMORY {
            return Err(format!("opening and checking held {peak} bytes at once (bound {MEMORY})"));
        }
        let clear = |e: &quiesce::backup::FolderError| {
            let text = e.to_string();
            if text.is_empty() || text.len() > 2048 {
                return Err(format!("an error of {} bytes: {}", text.len(), engine::cut(&text, 300)));
            }
            Ok(format!("err:{}", engine::kind_of(&format!("{e:?}"))))
        };
        match result {
            Ok((Err(outside), _)) => Err(outside),
            Ok((Ok(()), Ok(v))) => Ok(format!("ok:{}", if v.mismatches.is_empty() { "clean" } else { "mismatch" })),
            Ok((Ok(()), Err(e))) => clear(&e).map(|k| format!("check-{k}")),
            Err(e) => clear(&e),
        }
    });
    // The mutations reach past the parser: some manifests open (and are checked), and
    // names are refused as unsafe, not only as damaged JSON.
    let count = |p: &str| stats.iter().filter(|(k, _)| k.starts_with(p)).map(|(_, n)| n).sum::<u64>();
    if engine::replaying() {
        return;
    }
    assert!(count("ok:") > 0, "no mutated manifest opened: {stats:?}");
    assert!(count("err:UnsafePath") > 0, "no unsafe path was refused: {stats:?}");
}
