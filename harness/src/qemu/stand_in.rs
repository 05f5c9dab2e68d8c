//! TESTS ONLY: a scripted agent standing in for a guest's agent on every machine launched
//! inside [`scope`]. It exists for one reason: no Windows guest can run where quiesce is
//! tested (no image, and a PVM host whose KVM cannot run one), yet the scenario runner's
//! Windows path must be driven end to end. Inside the scope, [`super::Machine::launch`]
//! starts QEMU without a virtio-serial port (so a saved state and its restore agree on the
//! devices) and hands the agent channel to the test's peer, whatever machine it is: the
//! scenario VM or its restore. QEMU itself, its disks, its block jobs and its migration
//! stay real. Nothing of this is compiled outside `cargo test`.

use std::sync::Arc;

use tokio::net::UnixStream;

/// The harness's end of a channel whose other end the test's peer serves, for the machine
/// named by the argument; None launches that machine as usual, with a real agent port.
pub(crate) type Factory = Arc<dyn Fn(&str) -> Option<UnixStream> + Send + Sync>;

tokio::task_local! {
    static STAND_IN: Factory;
}

/// Runs `f` with `factory` standing in for the agent of every machine it launches.
pub(crate) async fn scope<F: std::future::Future>(factory: Factory, f: F) -> F::Output {
    STAND_IN.scope(factory, f).await
}

/// The stand-in's channel for machine `name`, if a scope is active and wants this machine.
pub(super) fn channel_for(name: &str) -> Option<UnixStream> {
    STAND_IN.try_with(|f| f(name)).ok().flatten()
}
