//! Shared test helpers, one module per concern; everything is re-exported
//! here so that a test reads `use common::*;`.
//!
//! - [`broker`]: which broker, a namespace per test, publishing, parking,
//!   clean-up.
//! - [`cluster`]: cluster files (one server or a ring), keys and tokens.
//! - [`processes`]: real `provring` servers and commands, waiting for them.
//! - [`admin`]: a server's admin API and waiting for a topology.
//! - [`recorder`]: the recording webhook target and its checks.
//! - [`ring`]: a running ring behind one recorder.
//! - [`smtp`]: the mail catcher.
//! - [`tls`]: a private CA and certificates.
//!
//! Every test binary compiles all of it and uses part, hence the allows
//! (`dead_code` for the helpers, `unused_imports` for the re-exports).
#![allow(dead_code)]

mod admin;
mod broker;
mod cluster;
mod processes;
mod recorder;
mod ring;
mod smtp;
mod tls;

#[allow(unused_imports)]
pub use admin::*;
#[allow(unused_imports)]
pub use broker::*;
#[allow(unused_imports)]
pub use cluster::*;
#[allow(unused_imports)]
pub use processes::*;
#[allow(unused_imports)]
pub use recorder::*;
#[allow(unused_imports)]
pub use ring::*;
#[allow(unused_imports)]
pub use smtp::*;
#[allow(unused_imports)]
pub use tls::*;
