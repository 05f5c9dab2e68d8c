//! Everything that talks to QEMU: the machine guard and its launch configuration, the
//! accelerator and capability probes, and the QMP and guest-agent clients.

pub mod accel;
pub mod attach;
pub mod caps;
pub mod compat;
pub mod config;
pub mod events;
pub mod evidence;
pub mod exec;
pub mod framing;
pub mod launch;
pub mod locks;
pub mod machine;
pub mod message;
pub mod process;
pub mod programs;
pub mod qga;
pub mod qmp;
pub mod serial;
pub mod transcript;
pub mod winexec;

pub use attach::{attach, AttachError, AttachOptions};
pub use config::{Accel, DiskConfig, DiskFormat, KernelBoot, MachineConfig};
pub use events::{Event, EventQueue, WaitError};
pub use machine::{Machine, MachineError};
pub use qga::{AgentError, GuestAgent};
pub use qmp::{Qmp, QmpError};
pub use transcript::Transcript;

#[cfg(test)]
pub(crate) mod stand_in;
#[cfg(test)]
pub(crate) mod wire_tests;
