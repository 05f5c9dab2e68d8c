//! Restoring backups and checking what was restored.

pub mod blockcmp;
pub mod corrupt;
pub mod guest;
pub mod guest_windows;
pub mod restore;
pub mod rollback_attached;

pub use restore::{RestoreError, RestoreOptions, Restored};
