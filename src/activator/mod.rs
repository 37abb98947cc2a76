//! The activator: the HTTP data plane every request to a Function passes through. It
//! routes by Host, holds requests while a Function wakes from zero, balances across
//! replicas and streams the exchange, following the platform's watches (never polling).
//!
//! Layers, each in its module: `lane` (the HTTP/1.1 fast lane: the common exchange
//! proxied as bytes, the rest through `proxy` or hyper's server), `routing` (Host ->
//! Function, replicas), `gate` (queue and wake), `early` (cold starts served by
//! replicas probed before the platform lists them), `balancer` (P2C least in flight,
//! per-replica caps), `pool` (keep-alive connections per replica), `proxy` (headers,
//! bodies, upgrades, retries), `stats` (autoscaler counters, Prometheus) and `error`
//! (the one mapping from typed failures to HTTP answers); `client` is a client
//! connection's state and timer, `workers` the data plane's thread per core.
//!
//! Answers hyper gives itself (the lane hands it such requests), before a request
//! reaches the proxy: 400 for a malformed request and 431 for a head larger than
//! `max_header_bytes` (HTTP/1.1); a client that does not finish its head within
//! `header_read_timeout` is disconnected (that timeout also closes client keep-alive
//! connections idle that long, in the lane too). `timeouts.request` bounds
//! the wait for a replica's response head; a streamed body may then take longer. Both
//! run on one timer per client connection (`client`), not on a timer per request.

mod balancer;
mod client;
pub mod drain;
mod early;
mod error;
mod gate;
pub mod lameduck;
mod lane;
mod pool;
mod proxy;
mod routing;
mod stats;
mod workers;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::api::Defaults;
use crate::api::duration::parse_duration;
use crate::platform::{EndpointsEvent, FunctionEvent, Platform};
use crate::stats::StatsSnapshot;
use crate::telemetry::{self, AdminRoute, Readiness};

use self::client::{ClientBody, ClientConn, ClientIo, Drain, DrainWatch, Watched};
use self::routing::{Conf, Table};
use self::stats::Metrics;
use self::workers::{OpenConn, Workers};

/// Errors of the activator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Other(String),
    #[error("registering metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// Flags of `zeroscale activator`.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Address for Function traffic.
    #[arg(long, env = "ZEROSCALE_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// Address for `/metrics`, `/stats`, `/healthz` and `/readyz`.
    #[arg(long, env = "ZEROSCALE_ADMIN_LISTEN", default_value = "0.0.0.0:9090")]
    pub admin_listen: SocketAddr,
    /// Namespace whose Functions to serve; empty for all namespaces.
    #[arg(long, env = "ZEROSCALE_NAMESPACE", default_value = "")]
    pub namespace: String,
    /// The activator Service (`namespace/name`) whose ready pods are this activator's
    /// peers: a replica's drain waits until none of them has a request in flight to it.
    /// Empty: no peers (a single activator).
    #[arg(long, env = "ZEROSCALE_ACTIVATOR_SERVICE", default_value = "")]
    pub activator_service: String,
    /// This activator's name in its stats (the pod name); a random id when unset.
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,
    /// Largest request body accepted, in bytes (413 beyond, also for chunked bodies).
    #[arg(long, env = "ZEROSCALE_MAX_BODY_BYTES", default_value_t = Settings::default().max_body_bytes)]
    pub max_body_bytes: u64,
    /// Largest request head accepted, in bytes (431 beyond; at least 8192).
    #[arg(long, env = "ZEROSCALE_MAX_HEADER_BYTES", default_value_t = Settings::default().max_header_bytes)]
    pub max_header_bytes: usize,
    /// Time a client has to send its request head (e.g. `10s`).
    #[arg(long, env = "ZEROSCALE_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = duration_arg)]
    pub header_read_timeout: Duration,
    /// This pod's IP (`status.podIP`). With it, a stopping activator keeps serving new
    /// connections until no Function's routing lists it any more (see `lameduck`).
    #[arg(long, env = "POD_IP")]
    pub pod_ip: Option<std::net::IpAddr>,
    /// How long a stopping activator keeps accepting connections while Functions'
    /// routing still points at it (e.g. `5m`): the time the operator should need to
    /// drop it from every Function's slice. Past it, it keeps waiting only while that
    /// routing is still shrinking, up to `--lame-duck-limit`; the drain comes after.
    #[arg(long, env = "ZEROSCALE_LAME_DUCK_TIMEOUT", default_value = "5m", value_parser = duration_arg)]
    pub lame_duck_timeout: Duration,
    /// Longest a stopping activator keeps accepting connections in any case (default:
    /// 5/3 of `--lame-duck-timeout`, so 500 s for 300 s). The pod's termination grace
    /// period must cover it plus `--drain-timeout`.
    #[arg(long, env = "ZEROSCALE_LAME_DUCK_LIMIT", value_parser = duration_arg)]
    pub lame_duck_limit: Option<Duration>,
    /// Time in-flight requests get to finish on shutdown (e.g. `30s`).
    #[arg(long, env = "ZEROSCALE_DRAIN_TIMEOUT", default_value = "30s", value_parser = duration_arg)]
    pub drain_timeout: Duration,
    /// Peers whose `X-Forwarded-*` headers are trusted and extended (comma-separated
    /// CIDRs or addresses, e.g. an ingress controller's pod network). Others' are replaced.
    #[arg(long, env = "ZEROSCALE_TRUSTED_PROXIES", value_delimiter = ',', value_parser = cidr_arg)]
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Threads serving Function traffic, each with its own event loop (default: one per
    /// CPU the process may use).
    #[arg(long, env = "ZEROSCALE_DATA_PLANE_THREADS")]
    pub data_plane_threads: Option<usize>,
    /// Serve a cold start before the platform lists a replica ready: while a Function
    /// wakes, watch its pods, probe each new one with its own readiness check (httpGet
    /// or tcpSocket probe, else a TCP connect to the port) and send replayable waiting
    /// requests to it as soon as that passes. Needs `list`/`watch` on pods. `false`
    /// waits for the EndpointSlice, as before.
    #[arg(
        long,
        env = "ZEROSCALE_COLD_START_PROBE",
        default_value_t = true,
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        default_missing_value = "true",
        require_equals = true
    )]
    pub cold_start_probe: bool,
    /// Proxy the common HTTP/1.1 exchange (a head in origin form, no body or a short
    /// one with a length, for a Function with a replica ready) as bytes, without
    /// hyper's machinery on either side; everything else, and everything with `false`,
    /// goes the full way (see BENCHMARKS.md for what it saves).
    #[arg(
        long,
        env = "ZEROSCALE_FAST_LANE",
        default_value_t = true,
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        default_missing_value = "true",
        require_equals = true
    )]
    pub fast_lane: bool,
    #[command(flatten)]
    pub shared: crate::api::config::SharedArgs,
}

fn duration_arg(s: &str) -> Result<Duration, String> {
    parse_duration(s).map_err(|e| e.to_string())
}

fn cidr_arg(s: &str) -> Result<ipnet::IpNet, String> {
    let s = s.trim();
    s.parse::<ipnet::IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("{s:?} is not a CIDR (10.0.0.0/8) or an IP address"))
}

/// Runs the activator until SIGTERM.
pub async fn run(config: Config) -> crate::Result<()> {
    let defaults = Defaults::load(config.shared.defaults_file.as_deref())?;
    let settings = Settings {
        cluster_domain: config.shared.cluster_domain.clone(),
        defaults,
        id: config
            .pod_name
            .clone()
            .unwrap_or_else(|| format!("activator-{:08x}", rand::random::<u32>())),
        max_body_bytes: config.max_body_bytes,
        max_header_bytes: config.max_header_bytes,
        header_read_timeout: config.header_read_timeout,
        drain_timeout: config.drain_timeout,
        trusted_proxies: config.trusted_proxies.clone(),
        workers: config
            .data_plane_threads
            .unwrap_or_else(Settings::threads_per_cpu),
        cold_start_probe: config.cold_start_probe,
        fast_lane: config.fast_lane,
        ..Settings::default()
    };
    let registry = prometheus::Registry::new();
    telemetry::ProcessMemory::register(&registry).map_err(Error::from)?;
    let client = crate::platform::client::client(&registry, "activator").await?;
    let namespace = (!config.namespace.is_empty()).then(|| config.namespace.clone());
    let lame_duck = (client.clone(), namespace.clone());
    let platform = Arc::new(crate::platform::kube::KubePlatform::new(
        client.clone(),
        namespace,
    ));
    let activator = Activator::new(platform, settings, &registry)?;
    if !config.activator_service.is_empty() {
        let (ns, name) = crate::operator::parse_service(&config.activator_service)
            .map_err(|e| Error::Other(e.to_string()))?;
        activator.set_drain_peers(Arc::new(
            crate::platform::directory::ActivatorDirectory::new(client, ns, name),
        ));
    }

    let listener = telemetry::bind(config.listen, "traffic").await?;
    let admin = telemetry::bind(config.admin_listen, "admin").await?;
    let readiness = Readiness::default();
    let shutdown = CancellationToken::new();
    let admin_shutdown = CancellationToken::new();
    let admin_task = tokio::spawn(telemetry::serve_admin(
        admin,
        registry,
        readiness.clone(),
        Some(activator.admin_route()),
        admin_shutdown.clone(),
    ));
    {
        let (activator, readiness, shutdown) =
            (activator.clone(), readiness.clone(), shutdown.clone());
        tokio::spawn(async move {
            activator.synced().await;
            if !shutdown.is_cancelled() {
                info!("routing table synced; ready");
                readiness.set(true);
            }
        });
    }
    {
        let (readiness, shutdown) = (readiness.clone(), shutdown.clone());
        let (pod_ip, timeout) = (config.pod_ip, config.lame_duck_timeout);
        let limit = config.lame_duck_limit.unwrap_or(timeout * 5 / 3);
        let activator = activator.clone();
        tokio::spawn(async move {
            telemetry::shutdown_signal().await;
            // Fail readiness first so endpoints stop sending, keep serving while routing
            // still points here, then stop accepting and drain.
            readiness.set(false);
            match pod_ip {
                Some(ip) => {
                    let (client, namespace) = lame_duck;
                    let unrouted = move || activator.close_connections();
                    tokio::select! {
                        _ = lameduck::wait_until_unrouted(client, namespace.as_deref(), ip, timeout, limit, unrouted) => {}
                        _ = telemetry::shutdown_signal() => info!("second signal: stopping now"),
                    }
                }
                None => warn!(
                    "no --pod-ip: stopping without waiting for routing to drop this activator"
                ),
            }
            shutdown.cancel();
        });
    }
    let result = activator.run(listener, shutdown).await;
    admin_shutdown.cancel();
    let _ = admin_task.await;
    result
}

/// How an activator behaves (parsed once from flags, or built by `dev` and tests).
#[derive(Debug, Clone)]
pub struct Settings {
    pub cluster_domain: String,
    pub defaults: Defaults,
    /// Identifies this activator in its stats (pod name, or a random id).
    pub id: String,
    /// Largest request body accepted (413 beyond).
    pub max_body_bytes: u64,
    /// Largest request head accepted (431 beyond).
    pub max_header_bytes: usize,
    /// Time a client has to send its request head.
    pub header_read_timeout: Duration,
    /// Time in-flight requests get to finish on shutdown.
    pub drain_timeout: Duration,
    /// Peers whose `X-Forwarded-*` headers are kept and extended rather than replaced.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Longest a TCP connect to a replica may take before another replica is tried.
    pub connect_timeout: Duration,
    /// Idle keep-alive connections to replicas are closed after this.
    pub pool_idle_timeout: Duration,
    /// Data-plane threads (`workers`), each a single-threaded runtime serving the
    /// connections handed to it; 0 serves every connection on the runtime that calls
    /// [`Activator::run`] (what the tests do, to control its clock).
    pub workers: usize,
    /// Route replayable requests of a waking Function to replicas the activator probed
    /// itself before the platform lists them ready (see `early`), where the platform
    /// offers candidates.
    pub cold_start_probe: bool,
    /// Serve the common HTTP/1.1 exchange in the fast lane (`lane`) rather than through
    /// hyper.
    pub fast_lane: bool,
}

impl Settings {
    /// One data-plane thread per CPU this process may use.
    pub fn threads_per_cpu() -> usize {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            cluster_domain: "cluster.local".into(),
            defaults: Defaults::default(),
            id: "activator".into(),
            max_body_bytes: 64 * 1024 * 1024,
            max_header_bytes: 64 * 1024,
            header_read_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(30),
            trusted_proxies: Vec::new(),
            connect_timeout: Duration::from_secs(3),
            pool_idle_timeout: Duration::from_secs(90),
            workers: 0,
            cold_start_probe: true,
            fast_lane: true,
        }
    }
}

/// The data plane: routing table, queues, balancer and proxy.
pub struct Activator {
    settings: Settings,
    platform: Arc<dyn Platform>,
    table: RwLock<Table>,
    metrics: Metrics,
    /// Bit 0: Functions listed; bit 1: endpoints listed.
    synced: watch::Sender<u8>,
    /// The other activators, for drains (none: this one's view is the whole view).
    peers: OnceLock<Arc<dyn drain::DrainPeers>>,
    /// Set once no Function's routing lists this activator: every HTTP/1 response then
    /// ends its connection, so keep-alive clients reconnect (to another activator) on
    /// their next request instead of having an idle connection closed under them by the
    /// drain.
    closing: std::sync::atomic::AtomicBool,
}

impl Activator {
    /// Builds an activator over a platform, registering its metrics in `registry`.
    pub fn new(
        platform: Arc<dyn Platform>,
        settings: Settings,
        registry: &prometheus::Registry,
    ) -> crate::Result<Arc<Self>> {
        let metrics = Metrics::new(registry).map_err(Error::from)?;
        Ok(Arc::new(Self {
            table: RwLock::new(Table::new(&settings.cluster_domain, settings.workers)),
            settings,
            platform,
            metrics,
            synced: watch::Sender::new(0),
            peers: OnceLock::new(),
            closing: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    fn table(&self) -> RwLockReadGuard<'_, Table> {
        self.table.read().unwrap_or_else(|p| p.into_inner())
    }

    fn table_mut(&self) -> RwLockWriteGuard<'_, Table> {
        self.table.write().unwrap_or_else(|p| p.into_inner())
    }

    /// From now on every HTTP/1 response carries `Connection: close` (see `lameduck`):
    /// clients leave this activator one request at a time, before the drain closes what
    /// is left.
    pub fn close_connections(&self) {
        self.closing
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Tells the activator where its peers are, so a drain waits for their requests too
    /// (see [`drain`]). Set once; later calls are ignored.
    pub fn set_drain_peers(&self, peers: Arc<dyn drain::DrainPeers>) {
        let _ = self.peers.set(peers);
    }

    /// Resolves once the first full list of Functions and of endpoints is applied: from
    /// then on the activator routes what the platform knows.
    pub async fn synced(&self) {
        let mut rx = self.synced.subscribe();
        let _ = rx.wait_for(|v| *v == 3).await;
    }

    /// Follows the platform's Functions and endpoints and serves traffic on `listener`
    /// until `shutdown`, then drains in-flight requests.
    pub async fn run(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> crate::Result<()> {
        let follower = tokio::spawn(self.clone().follow(shutdown.clone()));
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            // The connection's own timer enforces it (see `client`), not one per request.
            .header_read_timeout(None)
            .max_buf_size(self.settings.max_header_bytes.max(8192))
            // Head and body copied into one buffer and written with one `write`, not
            // queued for `writev`: for the small messages most are, the queue's
            // bookkeeping costs more than the copy (BENCHMARKS.md, "Data-plane steps").
            .writev(false);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(
                u32::try_from(self.settings.max_header_bytes).unwrap_or(u32::MAX),
            );
        let drain = Drain::new();
        let workers = match self.settings.workers {
            0 => None,
            n => {
                let (act, builder) = (self.clone(), builder.clone());
                let serve = move |stream, peer, drain, open| {
                    act.serve(&builder, stream, peer, drain, Some(open));
                };
                Some(Workers::start(n, serve).map_err(|source| crate::Error::Io {
                    context: "starting the data-plane threads".into(),
                    source,
                })?)
            }
        };
        info!(addr = ?listener.local_addr().ok(), id = %self.settings.id,
            threads = self.settings.workers, "activator listening");
        loop {
            let (stream, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: pause instead of spinning.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            match &workers {
                Some(w) => w.hand_off(stream, peer, drain.watcher()),
                None => self.serve(&builder, stream, peer, drain.watcher(), None),
            }
        }
        drop(listener);
        info!(timeout = ?self.settings.drain_timeout, "stopped accepting; draining");
        match tokio::time::timeout(self.settings.drain_timeout, drain.drain()).await {
            Ok(()) => info!("drained"),
            Err(_) => warn!("drain timeout passed; cutting the remaining connections"),
        }
        if let Some(w) = workers {
            w.stop().await;
        }
        follower.abort();
        Ok(())
    }

    /// Serves one client connection on the current runtime, in a task of its own: in the
    /// fast lane while its requests are the lane's kind, through hyper from the first
    /// one that is not.
    fn serve(
        self: &Arc<Self>,
        builder: &auto::Builder<TokioExecutor>,
        stream: TcpStream,
        peer: SocketAddr,
        drain: DrainWatch,
        open: Option<OpenConn>,
    ) {
        let client = ClientConn::new(
            peer,
            &self.settings.trusted_proxies,
            self.settings.header_read_timeout,
        );
        let act = self.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let _open = open;
            let (stream, read, drain) = if act.settings.fast_lane {
                let again = drain.again();
                let lane = lane::serve(&act, &client, stream);
                let lane = Watched::new(lane, client.clone(), drain, |_| client.shut_down());
                match lane.await {
                    None => {
                        debug!(%peer, "no request head within the header read timeout");
                        return;
                    }
                    Some(lane::Ended::Closed) => return,
                    Some(lane::Ended::Handoff { stream, read }) => (stream, read, again),
                }
            } else {
                (stream, Vec::new(), drain)
            };
            let io = ClientIo::with_read(stream, read, client.clone());
            match act.serve_hyper(&builder, io, client, drain).await {
                Some(Err(e)) => {
                    debug!(%peer, error = %e, "client connection ended with an error");
                }
                None => debug!(%peer, "no request head within the header read timeout"),
                Some(Ok(())) => {}
            }
        });
    }

    /// Serves a client connection through hyper until it ends.
    async fn serve_hyper(
        self: &Arc<Self>,
        builder: &auto::Builder<TokioExecutor>,
        io: ClientIo,
        client: Arc<ClientConn>,
        drain: DrainWatch,
    ) -> Option<Result<(), Box<dyn std::error::Error + Send + Sync>>> {
        let act = self.clone();
        let svc_client = client.clone();
        let svc = service_fn(move |req: Request<Incoming>| {
            let act = act.clone();
            let active = svc_client.request_started(req.version());
            async move {
                let http1 = req.version() < http::Version::HTTP_2;
                let mut resp = proxy::handle(&act, active.client(), req).await;
                if http1 && act.closing.load(std::sync::atomic::Ordering::Relaxed) {
                    resp.headers_mut().insert(
                        http::header::CONNECTION,
                        http::HeaderValue::from_static("close"),
                    );
                }
                Ok::<_, Infallible>(resp.map(|body| ClientBody::new(body, active)))
            }
        });
        let conn = builder.serve_connection_with_upgrades(io, svc).into_owned();
        Watched::new(conn, client, drain, |c| c.graceful_shutdown()).await
    }

    /// Applies the platform's events to the routing table until `shutdown`.
    async fn follow(self: Arc<Self>, shutdown: CancellationToken) {
        let mut functions = self.platform.functions();
        let mut endpoints = self.platform.endpoints();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                Some(ev) = functions.next() => self.on_function_event(ev),
                Some(ev) = endpoints.next() => self.on_endpoints_event(ev),
                else => {
                    warn!("the platform's watches ended");
                    return;
                }
            }
        }
    }

    fn on_function_event(&self, ev: FunctionEvent) {
        // Specs are resolved before the table is locked, so requests never wait on it.
        let defaults = &self.settings.defaults;
        let deleted = match ev {
            FunctionEvent::Applied(f) => {
                let conf = Conf::resolve(&f, defaults);
                self.table_mut().apply(&f, conf);
                Vec::new()
            }
            FunctionEvent::Deleted(key) => self.table_mut().delete(&key).into_iter().collect(),
            FunctionEvent::Reset(all) => {
                let n = all.len();
                let resolved = all
                    .into_iter()
                    .map(|f| {
                        let conf = Conf::resolve(&f, defaults);
                        (f, conf)
                    })
                    .collect();
                let deleted = self.table_mut().reset(resolved);
                info!(functions = n, "Functions listed");
                self.synced.send_modify(|v| *v |= 1);
                deleted
            }
        };
        for fs in deleted {
            if let Some(t) = fs.traffic_if_any() {
                self.metrics.forget(&fs.key, &t.metrics);
            }
        }
    }

    fn on_endpoints_event(&self, ev: EndpointsEvent) {
        match ev {
            EndpointsEvent::Updated(key, eps) => self.table_mut().set_endpoints(&key, &eps),
            EndpointsEvent::Reset(all) => {
                self.table_mut().reset_endpoints(&all);
                self.synced.send_modify(|v| *v |= 2);
            }
        }
    }

    /// The per-Function counters the autoscaler reads.
    pub fn snapshot(&self) -> StatsSnapshot {
        let now = tokio::time::Instant::now();
        let table = self.table();
        let functions = table
            .states()
            .filter_map(|fs| Some(fs.traffic_if_any()?.counters.read(&fs.key, now)))
            .collect();
        StatsSnapshot {
            activator: self.settings.id.clone(),
            taken_unix_ms: jiff::Timestamp::now().as_millisecond(),
            functions,
        }
    }

    /// Number of Functions in the routing table.
    pub fn function_count(&self) -> usize {
        self.table().len()
    }

    /// Whether a raw `Host` value routes to a Function: the normalisation and table
    /// lookup a request pays, exposed so the benchmark harness (`bench/`) can time it.
    pub fn routes(&self, host: &str) -> bool {
        crate::api::hosts::normalize_host_ref(host)
            .is_some_and(|h| self.table().lookup(&h).is_some())
    }

    /// Routes the replica at `addr` early for `fs` (see `early`); whether it was added.
    fn add_early(&self, fs: &routing::FunctionState, addr: SocketAddr) -> bool {
        let added = self.table_mut().add_early(fs, addr);
        if added {
            self.metrics
                .early_routes
                .with_label_values(&["routed"])
                .inc();
        }
        added
    }

    /// Takes the replica at `addr` out of `fs`'s early routes for good (`why` labels the
    /// metric when it was routed).
    fn demote_early(&self, fs: &routing::FunctionState, addr: SocketAddr, why: &str) {
        if let Some(t) = fs.traffic_if_any()
            && t.early.demote(addr)
        {
            self.metrics.early_routes.with_label_values(&[why]).inc();
        }
    }

    /// Drops every early route of `fs`.
    fn clear_early(&self, fs: &routing::FunctionState) {
        self.table_mut().clear_early(fs);
    }

    /// Whether the platform has listed replica `name` of `key` ready before.
    fn was_listed_ready(
        &self,
        key: &crate::api::FunctionKey,
        name: &str,
        addr: SocketAddr,
    ) -> bool {
        self.table().was_listed_ready(key, name, addr)
    }

    /// Requests in flight to one replica now; `dev` waits for zero before it stops a
    /// replica, so a scale-down never cuts a request.
    pub fn endpoint_in_flight(&self, addr: SocketAddr) -> u64 {
        self.table().endpoint_in_flight(addr)
    }

    /// The `/stats` and `/drain-status` routes for the admin endpoint.
    pub fn admin_route(self: &Arc<Self>) -> AdminRoute {
        let weak = Arc::downgrade(self);
        Arc::new(move |path: &str| {
            if path.starts_with("/drain-status") {
                return drain::status_route(&*weak.upgrade()?, path);
            }
            if path != "/stats" && !path.starts_with("/stats?") {
                return None;
            }
            let act = weak.upgrade()?;
            Some(match serde_json::to_vec(&act.snapshot()) {
                Ok(body) => {
                    let mut resp = Response::new(Full::new(Bytes::from(body)));
                    resp.headers_mut().insert(
                        header::CONTENT_TYPE,
                        header::HeaderValue::from_static("application/json"),
                    );
                    resp
                }
                Err(e) => telemetry::text_response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("encoding stats: {e}"),
                ),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        config: Config,
    }

    #[test]
    fn flags_parse_into_typed_settings() {
        let c = Cli::try_parse_from([
            "activator",
            "--listen",
            "127.0.0.1:8081",
            "--trusted-proxies",
            "10.0.0.0/8, 192.168.1.7",
            "--drain-timeout",
            "5s",
            "--header-read-timeout",
            "1m",
            "--max-body-bytes",
            "1024",
            "--cluster-domain",
            "example.internal",
        ])
        .unwrap()
        .config;
        assert_eq!(c.listen, "127.0.0.1:8081".parse().unwrap());
        assert_eq!(
            c.trusted_proxies,
            vec![
                "10.0.0.0/8".parse::<ipnet::IpNet>().unwrap(),
                "192.168.1.7/32".parse().unwrap()
            ]
        );
        assert_eq!(c.drain_timeout, Duration::from_secs(5));
        assert_eq!(c.header_read_timeout, Duration::from_secs(60));
        assert_eq!(c.max_body_bytes, 1024);
        assert_eq!(c.shared.cluster_domain, "example.internal");
        assert!(Cli::try_parse_from(["activator", "--trusted-proxies", "nonsense"]).is_err());
    }
}
