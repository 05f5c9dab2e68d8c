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
