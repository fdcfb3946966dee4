//! leasedog: an etcd leader lease paired with kernel watchdogs, so that a
//! stalled PostgreSQL primary is reset before its lease can expire.
//! See ARCHITECTURE.md for the map and FENCING.md's rules for the why.

pub mod agent;
pub mod audit;
pub mod callbacks;
pub mod cli;
pub mod clock;
pub mod config;
pub mod dcs;
pub mod decide;
pub mod evidence;
pub mod health;
pub mod metrics;
pub mod notify;
pub mod postgres;
pub mod privs;
pub mod timing;
pub mod watchdog;
