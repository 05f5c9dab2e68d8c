//! quiesce: reproduces VM backup scenarios on QEMU and proves that what it restores is right.
//!
//! Layers, lowest first: [`qemu`] (machines, QMP, the guest agent), [`image`] (guest images
//! and disk formats), then [`testguest`], which puts the two together.

pub mod backup;
pub mod image;
pub mod interrupt;
pub mod qemu;
pub mod report;
pub mod scenario;
pub mod sys;
pub mod testguest;
pub mod timeline;
pub mod verify;
pub mod workload;
