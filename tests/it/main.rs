//! The one integration-test binary: whole-program behaviour.

mod backend_test_driver;
mod cli;
mod crash;
mod e2e;
mod exec_fake;
mod image;
mod invalid;
mod labs_plan;
mod purity;
mod render_validate;
mod seed;
mod ssh;
