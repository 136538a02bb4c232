//! The HTTP-01 responder: `GET /.well-known/acme-challenge/<token>` answered from the store,
//! so any confd answers a challenge whichever confd ordered.

use super::storage::challenge_key;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;
use switchboard::store::KvStore;
use switchboard::Shutdown;
use tokio::net::TcpListener;

const PATH: &str = "/.well-known/acme-challenge/";

/// Binds `addr`, failing with one line naming it.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| format!("acme.challenge_addr {addr}: cannot listen: {e}"))
}

/// Answers challenges until `shutdown`.
pub async fn serve(listener: TcpListener, store: KvStore, shutdown: Shutdown) {
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!("ACME challenge listener cannot accept a connection: {e}");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                        _ = shutdown.cancelled() => return,
                    }
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        let store = store.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let store = store.clone();
                async move { Ok::<_, Infallible>(answer(&req, &store).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

async fn answer<B>(req: &Request<B>, store: &KvStore) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, body: Vec<u8>| {
        Response::builder()
            .status(status)
            .header("content-type", "text/plain")
            .body(Full::new(Bytes::from(body)))
            .expect("static response")
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, b"expected GET\n".to_vec());
    }
    let Some(key) = req.uri().path().strip_prefix(PATH).and_then(challenge_key) else {
        return reply(StatusCode::NOT_FOUND, b"no such challenge\n".to_vec());
    };
    match store.get(&key).await {
        Ok(Some(v)) => reply(StatusCode::OK, v.value),
        Ok(None) => reply(StatusCode::NOT_FOUND, b"no such challenge\n".to_vec()),
        Err(e) => {
            tracing::warn!(error = %e, "ACME challenge: cannot read the store");
            reply(
                StatusCode::SERVICE_UNAVAILABLE,
                b"store unavailable\n".to_vec(),
            )
        }
    }
}
