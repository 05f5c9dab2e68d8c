//! Disk images: the guest images quiesce boots, and (later) formats, chains and readers.

pub mod cache;
pub mod copy;
pub mod fsck;
pub mod fsread;
pub mod inspect;
pub mod manifest;
pub mod partition;
pub mod qemu_img;
pub mod recipe;
pub mod seed;
pub mod windows;

pub use recipe::{GuestImage, ImageError};
