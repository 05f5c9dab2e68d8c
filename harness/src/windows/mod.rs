//! Windows guests: building the test guest's image from the user's ISOs ([`build`], with
//! the install run in [`install`]), booting it in a scenario ([`guest`]), when a Windows
//! guest is ready ([`ready`]), its workloads ([`workload`]) and the hook for a user-supplied
//! VSS writer ([`app`]). What the
//! layers below do differently for Windows lives with them: the agent's VSS failures in
//! [`crate::backup::vss`], Windows programs run through the agent in
//! [`crate::qemu::winexec`], the conditions' Windows cases in [`crate::backup::conditions`].
//!
//! NEVER RUN AGAINST A LIVE WINDOWS GUEST: no Windows guest can run where this was written
//! (no image, and a PVM host whose KVM cannot run one). What could be tested here is: the
//! inputs, media and command line with stub ISOs, and the agent's Windows replies and
//! error texts (from qemu-ga's Windows source) replayed by a scripted peer against the real
//! conditions, method and set code, with real QEMU doing the block work.

pub mod app;
pub mod build;
pub mod guest;
pub mod install;
pub mod ready;
pub mod workload;

use std::time::Duration;

/// Deadlines for a Windows guest, longer than the Linux guest's: peers give VSS 60-90 s to
/// freeze (its requester alone waits up to 60 s for the provider's "frozen" event) and
/// 60 s to thaw; Windows boots in a minute or two under KVM where the Linux guest takes 5 s.
pub mod deadline {
    use super::Duration;

    /// `guest-fsfreeze-freeze` of a Windows guest (VSS).
    pub const FREEZE: Duration = Duration::from_secs(90);
    /// `guest-fsfreeze-thaw` of a Windows guest.
    pub const THAW: Duration = Duration::from_secs(60);
    /// From QEMU's start until qemu-ga answers and VSS is ready.
    pub const BOOT: Duration = Duration::from_secs(10 * 60);
    /// A PowerShell command through guest-exec: PowerShell alone takes seconds to start.
    pub const POWERSHELL: Duration = Duration::from_secs(120);
    /// `guest-shutdown` until QEMU exits: Windows stops its services first.
    pub const SHUTDOWN: Duration = Duration::from_secs(5 * 60);
    /// `chkdsk` of a data volume, read-only.
    pub const CHKDSK: Duration = Duration::from_secs(10 * 60);
    /// The whole unattended install, by default: peers budget 2 h for what takes 20-60 min
    /// under KVM.
    pub const INSTALL: Duration = Duration::from_secs(2 * 60 * 60);
}
