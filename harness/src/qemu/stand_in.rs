//! TESTS ONLY: a scripted agent standing in for a guest's agent on every machine launched
//! inside [`scope`]. It exists for one reason: no Windows guest can run where quiesce is
//! tested (no image, and a PVM host whose KVM cannot run one), yet the scenario runner's
//! Windows path must be driven end to end. Inside the scope, [`super::Machine::launch`]
//! starts QEMU without a virtio-serial port (so a saved state and its restore agree on the
//! devices) and hands the agent channel to the test's peer, whatever machine it is: the
//! scenario VM or its restore. QEMU itself, its disks, its block jobs and its migration
//! stay real. A peer cannot power QEMU off: on `guest-shutdown`, [`super::Machine::shutdown`]
//! tells QEMU to quit in the guest's place, then calls the test's [`PowerOff`] hook, if any.
//! Nothing of this is compiled outside `cargo test`.

use std::sync::Arc;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// The harness's end of a channel whose other end the test's peer serves, for the machine
/// named by the argument; None launches that machine as usual, with a real agent port.
pub(crate) type Factory = Arc<dyn Fn(&str) -> Option<UnixStream> + Send + Sync>;

/// Called when a machine whose agent the peer stands in for has powered off (the peer got
/// `guest-shutdown`, QEMU quit and was reaped), with its configuration: the peer's guest
/// writes to the disks what it was asked to write, since a scripted peer cannot write a
/// disk while QEMU holds it (an OS writes through QEMU, and its writes reach the image by
/// the time it has powered off: the same state for what reads the image next).
pub(crate) type PowerOff = Arc<dyn Fn(&super::MachineConfig) + Send + Sync>;

tokio::task_local! {
    static STAND_IN: Factory;
    static POWER_OFF: PowerOff;
}

/// Runs `f` with `factory` standing in for the agent of every machine it launches.
pub(crate) async fn scope<F: std::future::Future>(factory: Factory, f: F) -> F::Output {
    STAND_IN.scope(factory, f).await
}

/// Runs `f` with `power_off` called as each stand-in machine it launches powers off.
pub(crate) async fn on_power_off<F: std::future::Future>(power_off: PowerOff, f: F) -> F::Output {
    POWER_OFF.scope(power_off, f).await
}

/// A stand-in machine powered off: the test's hook, if it set one.
pub(super) fn powered_off(cfg: &super::MachineConfig) {
    let _ = POWER_OFF.try_with(|f| f(cfg));
}

/// The stand-in's channel for machine `name`, if a scope is active and wants this machine.
pub(super) fn channel_for(name: &str) -> Option<UnixStream> {
    STAND_IN.try_with(|f| f(name)).ok().flatten()
}

/// qemu-ga 10.0.2's Windows build when VSS could not start (`shared/design/windows.md`).
pub(crate) const VSS_INIT: &str = "fsfreeze not possible as VSS failed to initialize";
/// qemu-ga 10.0.2's Windows build thawing after VSS's 10 s hold of writes ran out.
pub(crate) const HOLD_LIMIT: &str = "couldn't hold writes: fsfreeze is limited up to 10 seconds";
/// Commands qemu-ga still runs while the guest is frozen.
pub(crate) const ALLOWED_FROZEN: [&str; 6] =
    ["guest-ping", "guest-info", "guest-sync", "guest-sync-delimited", "guest-fsfreeze-status", "guest-fsfreeze-thaw"];

/// Serves the agent's side of a channel until the harness goes away: qemu-ga's framing
/// (`guest-sync-delimited` answered after a 0xFF byte, ids echoed, errors as GenericError)
/// around the test's `answer` to every other command. While `silent` says so as a request
/// arrives, nothing is
/// sent back (a stopped agent), but requests are still read.
pub(crate) async fn serve(
    stream: UnixStream,
    mut answer: impl FnMut(&str, &Value) -> Result<Value, String>,
    silent: impl Fn() -> bool,
) {
    let mut chan = BufReader::new(stream);
    loop {
        let mut buf = Vec::new();
        if chan.read_until(b'\n', &mut buf).await.unwrap_or(0) == 0 {
            return;
        }
        let start = buf.iter().position(|&b| b != 0xFF).unwrap_or(buf.len());
        let Ok(req) = serde_json::from_slice::<Value>(&buf[start..]) else { continue };
        let cmd = req["execute"].as_str().unwrap_or("").to_owned();
        // Silent or not as the request arrives: a command that stops the agent (a service
        // stop run by guest-exec) still gets its own reply, and nothing after it does.
        let mute = silent();
        let out = if cmd == "guest-sync-delimited" {
            let mut out = vec![0xFF];
            out.extend(format!("{{\"return\": {}}}\n", req["arguments"]["id"]).as_bytes());
            out
        } else {
            let mut reply = match answer(&cmd, &req["arguments"]) {
                // qemu-ga sends no reply to a guest-shutdown it carries out.
                Ok(_) if cmd == "guest-shutdown" => continue,
                Ok(v) => json!({"return": v}),
                Err(desc) => json!({"error": {"class": "GenericError", "desc": desc}}),
            };
            if let Some(id) = req.get("id") {
                reply["id"] = id.clone();
            }
            format!("{reply}\n").into_bytes()
        };
        if mute {
            continue;
        }
        if chan.get_mut().write_all(&out).await.is_err() {
            return;
        }
    }
}
