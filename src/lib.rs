//! klab: one command from a declarative lab file to a Kubernetes lab on libvirt.
//!
//! Pure core (no I/O): [`config`] (lab file → validated [`model`]), [`plan`] (model → plan),
//! [`render`] (plan → XML / cloud-init files), [`reconcile`] (plan vs [`observed`] → actions),
//! [`verify`] (post-boot checks).
//! Effects: [`backend`] (hypervisors), [`provision`] (SSH), [`image`], [`seed`], [`state`], [`exec`].
//! Use cases: [`usecase`] (`up`, `down`, `status` with injected backend, dialer and paths).
//! Edge: [`cli`], [`commands`], [`output`].

pub mod backend;
pub mod catalog;
pub mod cli;
pub mod commands;
pub mod config;
pub mod copies;
pub mod exec;
pub mod image;
pub mod keys;
pub mod kubeconfig;
pub mod model;
pub mod observed;
pub mod output;
pub mod paths;
pub mod plan;
pub mod provision;
pub mod reconcile;
pub mod registry;
pub mod render;
pub mod seed;
pub mod state;
pub mod usecase;
pub mod verify;
