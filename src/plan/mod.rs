//! PURE planning core: validated lab + explicit inputs → `LabPlan`. No I/O, no clock, no randomness.

pub mod ipam;
pub mod types;

pub use types::*;
