//! Fixtures for Switchboard's integration tests and benchmarks.
//!
//! Everything here starts REAL services (a Consul dev agent, an etcd member, containers on the
//! local Docker engine, the project's own binaries) on free loopback ports, and stops them on
//! drop, so a failing test leaves nothing behind. Containers carry the label
//! `switchboard.test=1` and a `sbtest-` name prefix; [`remove_stale_containers`] removes any a
//! crashed run left.
//!
//! The crate is cut into one fixture module per real service (`consul`, `etcd`, `docker`,
//! `proxies` for confd and the proxy it drives, `pki`, `metrics` for the telemetry endpoints,
//! `store_front`, `apps` for the in-test backends of each protocol the proxies route (HTTP/2
//! cleartext, gRPC, TCP, UDP) and their clients), on two modules every other one stands on:
//! `poll` (free ports, bounded waits) and `process` (the project's binaries, child processes).
//! A test, or a reader who wonders how a fixture behaves, finds it by the service's name, and a
//! new helper goes beside the others of its service instead of into a test file, where the next
//! test binary would copy it. The fixtures are re-exported flat, so a test file says
//! `use switchboard_tests::*;` whatever module a helper lives in.
//!
//! Three modules keep their path, because only a few test binaries need them: [`cluster`]
//! (store clusters), [`load`] (a load generator that counts every failed request) and
//! [`registrator`] (the registrator binary under test and what it writes to the stores).

mod apps;
pub mod cluster;
mod consul;
pub mod curl;
mod docker;
mod etcd;
pub mod load;
mod metrics;
mod pebble;
mod pki;
mod poll;
mod process;
mod proxies;
pub mod registrator;
mod store_front;

pub use apps::{
    h2c_get, http1_get, tcp_echo, udp_echo, udp_echo_addr, CountReply, CountRequest, EchoReply,
    EchoRequest, GrpcApp, GrpcClient, H2App, HttpReply, TcpEcho, TcpEchoClient, UdpEcho,
    CALL_TIMEOUT, COUNT_PATH, ECHO_PATH, SEEN_HOST, SEEN_PATH, SEEN_VERSION,
};
pub use consul::Consul;
pub use docker::{
    docker, ensure_test_image, image, remove_stale_containers, require_images, unique_name,
    Container, DockerEngine, DockerProxy, IMAGE_TAG, TEST_IMAGE, TEST_LABEL,
};
pub use etcd::Etcd;
pub use metrics::{healthz, scrape, wait_health, Scrape};
pub use pebble::{Gate, Pebble};
pub use pki::Pki;
pub use poll::{free_port, free_udp_port, poll, wait_for};
pub use process::{bin, hostname, run_cmd, target_dir, workspace_root, Process};
pub use proxies::{
    answer, answers, fresh_client, nginx_on_first_render, post_unix, routes_converge,
    signal_reload, spawn_confd, wait_pid_file, wait_routes, Backend, HaproxyConfd, NginxConfd,
};
pub use store_front::StoreFront;
