//! Waiting: free loopback ports, and the bounded polls every test waits with.
//!
//! A test never sleeps for a guessed time: it polls for the state it needs, with a deadline
//! that names what it waited for when it passes. Services start on ports from [`free_port`],
//! never on fixed ones, so test binaries and tests within one can run side by side.

use std::future::Future;
use std::net::{TcpListener, UdpSocket};
use std::time::{Duration, Instant};

/// A TCP port that was free on 127.0.0.1 a moment ago, and that this process has not handed
/// out before: the kernel may give a port it just released to the next `bind(0)`, and tests
/// running side by side in one test binary would then start two servers on one port (a store
/// cluster takes twenty at once).
pub fn free_port() -> u16 {
    let mut given = GIVEN.lock().unwrap();
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// A port free for both TCP and UDP on 127.0.0.1 a moment ago, not handed out before (by this
/// or [`free_port`]): for a proxy's UDP listener (`listen P udp`), whose TCP twin a test may
/// also use, or a service that listens on both.
pub fn free_udp_port() -> u16 {
    let mut given = GIVEN.lock().unwrap();
    loop {
        let port = UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if !given.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
}

/// Every port [`free_port`] and [`free_udp_port`] handed out in this process.
static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());

/// Polls `f` every `every` until it returns `Some`, or returns `None` once `timeout` has
/// passed. The benchmarks use it with a fine `every` so pacing does not dominate what they
/// measure; tests use [`wait_for`].
pub async fn poll<T, F, Fut>(timeout: Duration, every: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(every).await;
    }
}

/// Polls `f` until it returns `Some`, or panics after `timeout` naming `what`.
/// This is how tests wait: a bounded poll with a deadline, never a bare sleep.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    match poll(timeout, Duration::from_millis(100), f).await {
        Some(v) => v,
        None => panic!("timed out after {timeout:?} waiting for {what}"),
    }
}
