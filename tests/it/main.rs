//! The one integration-test binary: whole-program behaviour.

mod backend_test_driver;
mod calico;
mod cli;
mod copies;
mod crash;
mod e2e;
mod exec_fake;
mod ha;
mod hyperv;
mod image;
mod invalid;
mod labs_plan;
mod modes;
mod provision;
mod provision_fake;
mod provision_plan;
mod pty;
mod purity;
mod render_validate;
mod seed;
mod snapshot;
mod ssh;
mod standin_repo;
mod tools;
