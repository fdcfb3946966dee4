//! Real parts for leasedog's tests, benchmarks and demo: etcd processes on
//! loopback ports, PostgreSQL clusters, and QEMU guests with real kernel
//! watchdogs. Everything started here is stopped when its handle drops.
pub mod agent;
pub mod etcd;
pub mod lab;
pub mod pg;
