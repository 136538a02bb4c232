//! [`StoreFront`]: a TCP front for etcd that can hold its writes, to see from outside whether
//! a client's writes overlap.

use std::sync::atomic::Ordering;

/// A TCP front for etcd that can hold its writes: while closed, every `POST /v3/kv/put` waits
/// at the front (a store whose disk stalls) and everything else passes at once. It counts the
/// writes outstanding, from their first bytes to the first bytes of their answer (HTTP/1: one
/// request at a time per connection) or until their client gives up on them: what shows
/// whether a client's writes overlap.
pub struct StoreFront {
    port: u16,
    outstanding: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    max: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    gate: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// What a front's connection is waiting for (see [`StoreFront`]).
const IDLE: u8 = 0;
const ANSWER: u8 = 1;
const WRITE_ANSWER: u8 = 2;

impl StoreFront {
    /// Starts an open front for `127.0.0.1:<upstream>`.
    pub async fn start(upstream: u16) -> StoreFront {
        use std::sync::atomic::{AtomicU8, AtomicUsize};
        use std::sync::Arc;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        const WRITE: &[u8] = b"POST /v3/kv/put";
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let outstanding = Arc::new(AtomicUsize::new(0));
        let max = Arc::new(AtomicUsize::new(0));
        let (gate, gate_rx) = tokio::sync::watch::channel(true);
        let (out, mx) = (outstanding.clone(), max.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                else {
                    continue;
                };
                let (mut c_read, mut c_write) = client.into_split();
                let (mut s_read, mut s_write) = server.into_split();
                let state = Arc::new(AtomicU8::new(IDLE));
                let (state2, out2, mx2) = (state.clone(), out.clone(), mx.clone());
                let mut gate_rx = gate_rx.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    let mut have = 0;
                    loop {
                        match c_read.read(&mut buf[have..]).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => have += n,
                        }
                        if state2.load(Ordering::SeqCst) == IDLE {
                            // A new request: read enough of it to see what it is.
                            if have < WRITE.len() && buf[..have] == WRITE[..have] {
                                continue;
                            }
                            if buf[..have].starts_with(WRITE) {
                                state2.store(WRITE_ANSWER, Ordering::SeqCst);
                                let now = out2.fetch_add(1, Ordering::SeqCst) + 1;
                                mx2.fetch_max(now, Ordering::SeqCst);
                                // Held until the gate opens, unless the client gives up on
                                // it first (its request timeout): then it is outstanding no
                                // more.
                                let abandoned = loop {
                                    tokio::select! {
                                        r = gate_rx.wait_for(|open| *open) => break r.is_err(),
                                        r = c_read.read(&mut buf[have..]) => match r {
                                            Ok(0) | Err(_) => break true,
                                            Ok(n) => have += n,
                                        },
                                    }
                                };
                                if abandoned {
                                    if state2.swap(IDLE, Ordering::SeqCst) == WRITE_ANSWER {
                                        out2.fetch_sub(1, Ordering::SeqCst);
                                    }
                                    break;
                                }
                            } else {
                                state2.store(ANSWER, Ordering::SeqCst);
                            }
                        }
                        if s_write.write_all(&buf[..have]).await.is_err() {
                            break;
                        }
                        have = 0;
                    }
                });
                let out3 = out.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n @ 1..) = s_read.read(&mut buf).await {
                        if state.swap(IDLE, Ordering::SeqCst) == WRITE_ANSWER {
                            out3.fetch_sub(1, Ordering::SeqCst);
                        }
                        if c_write.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        StoreFront {
            port,
            outstanding,
            max,
            gate,
            task,
        }
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Holds every write from now on.
    pub fn close(&self) {
        self.gate.send_replace(false);
    }

    /// Passes the held writes on, and every write after them.
    pub fn open(&self) {
        self.gate.send_replace(true);
    }

    /// Writes outstanding now (held or on their way).
    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::SeqCst)
    }

    /// The most writes that were outstanding at one moment so far.
    pub fn max_outstanding(&self) -> usize {
        self.max.load(Ordering::SeqCst)
    }
}

impl Drop for StoreFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}
