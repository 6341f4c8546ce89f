//! klab: one command from a declarative lab file to a Kubernetes lab on libvirt.
//!
//! Pure core (no I/O): [`config`] (lab file → validated [`model`]), [`plan`] (model → plan),
//! [`render`] (plan → XML / cloud-init files), [`reconcile`] (plan vs observed → actions).
//! Effects: [`backend`] (hypervisors), [`provision`] (SSH), [`image`], [`seed`], [`state`], [`exec`].
//! Edge: [`cli`], [`commands`], [`output`].

pub mod backend;
pub mod catalog;
pub mod config;
pub mod image;
pub mod model;
pub mod plan;
pub mod provision;
