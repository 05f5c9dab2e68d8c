//! Scenarios: the file format, and the runner that turns one into library calls.

pub mod format;

pub use format::{load, parse, Scenario, ScenarioError};
