//! Readiness checks of local replicas: a TCP connect, an HTTP GET (2xx/3xx is ready, as
//! the kubelet decides) or a command that exits 0, each bounded by the probe's timeout.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Stdio;

use tokio::net::TcpStream;
use tokio::process::Command;

use super::template::{Check, Launch, PortTarget, ProbeSpec};

/// Runs one check against a replica serving on `local_port`. `launch` is the replica's
/// process (exec checks run with its environment and working directory).
pub async fn check(probe: &ProbeSpec, local_port: u16, launch: &Launch) -> Result<(), String> {
    let addr = |target: PortTarget| {
        let port = match target {
            PortTarget::Serving => local_port,
            PortTarget::Fixed(p) => p,
        };
        SocketAddr::from((Ipv4Addr::LOCALHOST, port))
    };
    let attempt = async {
        match &probe.check {
            Check::Tcp(target) => TcpStream::connect(addr(*target))
                .await
                .map(drop)
                .map_err(|e| format!("connect {}: {e}", addr(*target))),
            Check::Http {
                port,
                path,
                headers,
            } => http_get(addr(*port), path, headers).await,
            Check::Exec(words) => exec(words, launch).await,
        }
    };
    match tokio::time::timeout(probe.timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(format!("timed out after {:?}", probe.timeout)),
    }
}

async fn http_get(
    addr: SocketAddr,
    path: &str,
    headers: &[(String, String)],
) -> Result<(), String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    crate::platform::probe::http_get(stream, addr, path, headers, "zeroscale-dev-probe").await
}

async fn exec(words: &[String], launch: &Launch) -> Result<(), String> {
    let Some((program, args)) = words.split_first() else {
        return Err("empty command".into());
    };
    let mut command = Command::new(program);
    command
        .args(args)
        .envs(launch.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&launch.cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .kill_on_drop(true);
    let status = command
        .status()
        .await
        .map_err(|e| format!("running {program}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{program} {status}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::Empty;
    use hyper_util::rt::TokioIo;
    use std::time::Duration;

    fn probe(check: Check) -> ProbeSpec {
        ProbeSpec {
            check,
            ..ProbeSpec::default_tcp()
        }
    }

    fn launch() -> Launch {
        Launch {
            program: "x".into(),
            args: vec![],
            env: vec![("READY_FILE".into(), "/nonexistent/zeroscale".into())],
            cwd: std::env::temp_dir(),
        }
    }

    #[tokio::test]
    async fn tcp_check_follows_the_listener() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let p = probe(Check::Tcp(PortTarget::Serving));
        assert!(check(&p, port, &launch()).await.is_ok());
        drop(listener);
        assert!(check(&p, port, &launch()).await.is_err());
    }

    #[tokio::test]
    async fn http_check_wants_2xx_or_3xx() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let svc = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let status =
                            if req.uri().path() == "/ok" && req.headers().contains_key("x-probe") {
                                200
                            } else {
                                503
                            };
                        let mut r = http::Response::new(Empty::<Bytes>::new());
                        *r.status_mut() = http::StatusCode::from_u16(status).unwrap();
                        Ok::<_, std::convert::Infallible>(r)
                    },
                );
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc),
                );
            }
        });
        let http = |path: &str| {
            probe(Check::Http {
                port: PortTarget::Serving,
                path: path.into(),
                headers: vec![("X-Probe".into(), "1".into())],
            })
        };
        assert_eq!(check(&http("/ok"), port, &launch()).await, Ok(()));
        let err = check(&http("/down"), port, &launch()).await.unwrap_err();
        assert!(err.contains("503"), "{err}");
    }

    #[tokio::test]
    async fn exec_check_uses_the_replica_environment() {
        let words = |s: &str| s.split(' ').map(String::from).collect::<Vec<_>>();
        let p = probe(Check::Exec(vec![
            "sh".into(),
            "-c".into(),
            "test \"$READY_FILE\" = /nonexistent/zeroscale".into(),
        ]));
        assert_eq!(check(&p, 1, &launch()).await, Ok(()));
        let p = probe(Check::Exec(words("false")));
        assert!(check(&p, 1, &launch()).await.is_err());
        let mut slow = probe(Check::Exec(words("sleep 5")));
        slow.timeout = Duration::from_millis(200);
        let err = check(&slow, 1, &launch()).await.unwrap_err();
        assert!(err.contains("timed out"), "{err}");
    }
}
