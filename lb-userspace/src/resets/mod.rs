//! Proactive resets.
pub mod rst;
