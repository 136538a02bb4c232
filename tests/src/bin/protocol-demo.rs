//! `protocol-demo`: the protocol tests' apps as a program a reader runs, so that every protocol
//! the shipped templates route can be tried by hand (docs/protocols.md does it, in containers,
//! and the docs tests run that page as written).
//!
//! `serve` runs one server that answers with its `--name`, so a client behind a proxy sees
//! which instance answered: `http` (HTTP/1.1, `<name> <path>`), `h2c` ([`H2App`]), `grpc`
//! ([`GrpcApp`]), `tcp` ([`TcpEcho`]) and `udp` ([`UdpEcho`]). It listens on every IPv4
//! address, as a server in a container must. The other subcommands are clients for the
//! protocols curl does not speak, printing one line per answer, so a recipe needs no grpcurl
//! or nc.

use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use switchboard_tests::{
    udp_echo_addr, GrpcApp, GrpcClient, H2App, TcpEcho, TcpEchoClient, UdpEcho, CALL_TIMEOUT,
};
use tokio::net::TcpListener;

#[derive(Parser)]
#[command(
    name = "protocol-demo",
    about = "Demo servers for each protocol the Switchboard templates route, and clients for them"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve one protocol on 0.0.0.0:PORT, answering with NAME, until SIGTERM or SIGINT.
    Serve {
        /// What each answer starts with: the instance's name.
        #[arg(long)]
        name: String,
        /// The port (TCP, or UDP for `udp`).
        #[arg(long, default_value_t = 8000)]
        port: u16,
        /// http: HTTP/1.1, answers `<name> <path>`; h2c: HTTP/2 cleartext (and HTTP/1.1),
        /// answers `<name>` with headers x-seen-path, x-seen-version, x-seen-host; grpc: the
        /// gRPC service switchboard.test.Echo; tcp: each line echoed as `<name> <line>`; udp:
        /// each datagram echoed as `<name> <datagram>`.
        #[arg(long, value_enum, default_value_t = Proto::Http)]
        proto: Proto,
    },
    /// One unary gRPC call (switchboard.test.Echo/Echo); prints `<name> <text>`.
    GrpcEcho {
        /// HOST:PORT of the server or of a proxy in front of it.
        #[arg(long)]
        addr: String,
        text: String,
    },
    /// One server-streaming gRPC call (switchboard.test.Echo/Count) of N messages; prints
    /// `<name> <i>` for each as it arrives.
    GrpcCount {
        /// HOST:PORT of the server or of a proxy in front of it.
        #[arg(long)]
        addr: String,
        /// The pause between two messages, in milliseconds.
        #[arg(long, default_value_t = 300)]
        interval_ms: u32,
        n: u32,
    },
    /// Sends TEXT as one line over a new TCP connection; prints the echo, `<name> <text>`.
    TcpEcho {
        /// HOST:PORT of the server or of a proxy in front of it.
        #[arg(long)]
        addr: String,
        text: String,
    },
    /// Sends TEXT as one UDP datagram; prints the answer, `<name> <text>`.
    UdpEcho {
        /// HOST:PORT of the server or of a proxy in front of it.
        #[arg(long)]
        addr: String,
        text: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Proto {
    Http,
    H2c,
    Grpc,
    Tcp,
    Udp,
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli.command).await {
        eprintln!("protocol-demo: {e:#}");
        std::process::exit(1);
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve { name, port, proto } => serve(&name, port, proto).await,
        Command::GrpcEcho { addr, text } => {
            let mut client = GrpcClient::connect_addr(resolve(&addr).await?, &addr).await?;
            let reply = client
                .echo(&text)
                .await
                .map_err(|s| anyhow!("gRPC Echo via {addr}: {s}"))?;
            println!("{} {}", reply.name, reply.text);
            Ok(())
        }
        Command::GrpcCount {
            addr,
            interval_ms,
            n,
        } => {
            let mut client = GrpcClient::connect_addr(resolve(&addr).await?, &addr).await?;
            let interval = Duration::from_millis(interval_ms.into());
            let mut stream = client
                .count(n, interval)
                .await
                .map_err(|s| anyhow!("gRPC Count via {addr}: {s}"))?;
            let wait = CALL_TIMEOUT + interval;
            for got in 0..n {
                let message = tokio::time::timeout(wait, stream.message())
                    .await
                    .map_err(|_| {
                        anyhow!(
                            "gRPC Count via {addr}: no message within {wait:?} after {got} of {n}"
                        )
                    })?
                    .map_err(|s| anyhow!("gRPC Count via {addr}: {s}"))?;
                let Some(m) = message else {
                    bail!("gRPC Count via {addr}: the stream ended after {got} of {n} messages");
                };
                println!("{} {}", m.name, m.i);
                // Each message as it arrives, also into a pipe.
                std::io::stdout().flush()?;
            }
            Ok(())
        }
        Command::TcpEcho { addr, text } => {
            let mut client = TcpEchoClient::connect_addr(resolve(&addr).await?).await?;
            println!("{}", client.say(&text).await?);
            Ok(())
        }
        Command::UdpEcho { addr, text } => {
            println!(
                "{}",
                udp_echo_addr(resolve(&addr).await?, &text, CALL_TIMEOUT).await?
            );
            Ok(())
        }
    }
}

/// `HOST:PORT` (a name or an address) to its first address.
async fn resolve(addr: &str) -> anyhow::Result<SocketAddr> {
    tokio::net::lookup_host(addr)
        .await
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| anyhow!("--addr {addr:?}: expected HOST:PORT of a reachable host"))
}

/// Runs the server until SIGTERM (`docker stop`) or SIGINT; dropping it stops it.
async fn serve(name: &str, port: u16, proto: Proto) -> anyhow::Result<()> {
    let addr: SocketAddr = ([0, 0, 0, 0], port).into();
    let (_server, what): (Box<dyn std::any::Any>, &str) = match proto {
        Proto::Http => (Box::new(serve_http(name, addr).await?), "HTTP/1.1"),
        Proto::H2c => (Box::new(H2App::start_on(name, addr).await?), "h2c"),
        Proto::Grpc => (Box::new(GrpcApp::start_on(name, addr).await?), "gRPC"),
        Proto::Tcp => (Box::new(TcpEcho::start_on(name, addr).await?), "TCP echo"),
        Proto::Udp => (Box::new(UdpEcho::start_on(name, addr).await?), "UDP echo"),
    };
    eprintln!("protocol-demo: {name}: {what} on {addr}");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}

/// Aborts the accept loop (and with it the server) on drop.
struct Aborting(tokio::task::JoinHandle<()>);

impl Drop for Aborting {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// An HTTP/1.1 server answering every request `200` with `<name> <path and query>`: what a
/// proxy's path routing and prefix stripping did shows in the answer.
async fn serve_http(name: &str, addr: SocketAddr) -> anyhow::Result<Aborting> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding TCP {addr}: expected a free local address"))?;
    let name: Arc<str> = name.into();
    Ok(Aborting(tokio::spawn(async move {
        loop {
            let sock = match listener.accept().await {
                Ok((sock, _)) => sock,
                // Out of file descriptors, say: the next accept may succeed.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let name = name.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
                    let body = format!("{name} {path}\n");
                    async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body)))) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(sock), svc)
                    .await;
            });
        }
    })))
}
