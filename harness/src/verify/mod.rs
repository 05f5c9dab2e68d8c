//! Restoring backups and checking what was restored.

pub mod restore;

pub use restore::{RestoreError, RestoreOptions, Restored};
