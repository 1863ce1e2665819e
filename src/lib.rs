//! Switchyard: a programmable load balancer for AI inference traffic, on Pingora, whose
//! every upstream choice is made by a Lua policy.
// Unsafe code is refused everywhere but in `policy::budget`, which sets the Lua count hook
// from a signal handler (see there), and in `server`, which ignores SIGHUP until the
// reload service takes it over.
#![deny(unsafe_code)]

pub mod admin;
pub mod alloc;
pub mod audit;
pub mod backends;
pub mod bare;
pub mod body;
pub mod config;
pub mod context;
pub mod demo;
pub mod dns;
pub mod errors;
pub mod header_timeout;
pub mod health;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod mock;
pub mod outlier;
pub mod plan;
pub mod policy;
pub mod provider;
pub mod proxy;
pub mod redact;
pub mod reload;
pub mod reply;
pub mod request;
pub mod retry;
pub mod routes;
pub mod runtime;
pub mod server;
pub mod stream_usage;
pub mod tenants;
pub mod tls;
pub mod tokens;
pub mod usage;
pub mod window;
