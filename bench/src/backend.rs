//! The backend of every data-path run: a hyper HTTP/1.1 server answering every request
//! with the same small body, so what is measured is the proxy in front of it, not the
//! application. The cold-start runs start it as a Function's replica, so its own start
//! time (process exec to accepting connections) is measured with the same binary.

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use bytes::Bytes;
use http::{Request, Response, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::error::{Context, Result};

/// The body of every answer: small, like a health check or a tiny JSON reply.
pub const BODY: &[u8] = b"hello from the zeroscale bench backend\n";

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Port to listen on (loopback only).
    #[arg(long, env = "PORT")]
    pub port: u16,
    /// Address to listen on; only loopback addresses are accepted.
    #[arg(long, default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
    pub address: IpAddr,
    /// Runtime worker threads (default: one per CPU, like the proxies in front of it).
    #[arg(long)]
    pub threads: Option<usize>,
}

pub fn main(args: Args) -> Result<()> {
    if !args.address.is_loopback() {
        return Err(crate::error::Error::msg(
            "the bench backend listens on loopback addresses only",
        ));
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.threads {
        builder.worker_threads(n.max(1));
    }
    let runtime = builder
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(serve(SocketAddr::new(args.address, args.port)))
}

async fn serve(addr: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .context(format!("binding {addr}"))?;
    let body = Bytes::from_static(BODY);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(a) => a,
            // Out of descriptors and the like: the run will show errors; keep serving.
            Err(_) => continue,
        };
        let _ = stream.set_nodelay(true);
        let body = body.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |_req: Request<Incoming>| {
                let mut resp = Response::new(Full::new(body.clone()));
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("text/plain"),
                );
                async move { Ok::<_, Infallible>(resp) }
            });
            // A client closing its connection is the normal end; nothing to report.
            let _ = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
