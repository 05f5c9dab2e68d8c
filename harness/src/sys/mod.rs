//! The bottom layer: the processes quiesce starts, and how long it waits for anything. It
//! knows nothing of QEMU, images or backups; every layer above starts its children here.
//!
//! - [`Spawn`] and [`Child`]: a child in its own process group, watched through a pidfd, so
//!   every wait on it takes a deadline and none is a sleep loop; dropping it kills the
//!   whole group and reaps the child, so nothing it started outlives it and no zombie is
//!   left.
//! - [`Process`]: a process we did not start as our child (a daemon that forked away from
//!   it), held by a pidfd so a signal reaches it and no other, and every wait on it has a
//!   deadline.
//! - [`Tool`]: a helper program (`qemu-img`, `e2fsck`, `debugfs`...) run to its end
//!   within a deadline, its output captured and capped, its failure a typed [`ToolError`]
//!   that names the command.
//! - [`deadline`]: one named deadline per kind of wait.
//! - [`shell_quote`]: command lines written for people to paste into a shell.
//! - [`Mapped`]: a file mapped read-only, a SIGBUS from it (the file shrank) turned into
//!   zeros and a flag instead of a crash (`verify::blockcmp` compares page cache pages
//!   in place).
//!
//! This module holds the crate's only `unsafe` code (the crate denies it everywhere else,
//! and each item here that needs it says why it is sound): opening a pidfd, signalling
//! through one, registering one with the async runtime, the hook that runs in a child
//! between fork and exec, and mapping a file with its SIGBUS handler.

mod child;
pub mod deadline;
mod mapped;
mod process;
mod quote;
mod tool;

pub use child::{Child, Spawn};
pub use mapped::Mapped;
pub use process::Process;
pub use quote::{shell_line, shell_quote};
pub use tool::{blocking_tools, Output, Running, Tool, ToolError};

#[cfg(test)]
mod tests;
