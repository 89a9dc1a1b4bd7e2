//! The service model: services, backends, settings and their lifecycle.
pub mod settings;
