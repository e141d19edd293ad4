//! touchledger's one integration-test binary: real sled directories in temp dirs (and, from the
//! NATS service on, real `nats-server` instances started by the test kit). No mocks.

mod audit;
mod bgnbd;
mod cli;
mod cluster;
mod crash;
mod current;
mod follow;
mod full_disk;
mod fuzz;
mod http;
mod model;
mod nats;
mod partition;
mod partition_reads;
mod projector;
mod roles;
mod server;
mod service_crash;
mod storage;
mod support;
mod tamper;
mod tls;
mod validation;
mod views;
