//! A minimal userspace kube-proxy: every Service ClusterIP goes on a host dummy interface
//! (a portless bridge where the kernel has no dummy driver)
//! and the stand-in listens on ClusterIP:port for each TCP port. A connection is spliced
//! to an endpoint of the Service's EndpointSlices (the port with the Service port's name),
//! chosen round-robin among the ready ones, or among the serving-and-terminating ones when
//! none is ready (kube-proxy's rule); with no endpoint the connection is closed. Services
//! and slices are followed with watches.
//!
//! `default/kubernetes` is special: when the stand-in reaches the API server on a loopback
//! address, the API server may listen only there, while its EndpointSlice advertises an
//! address that may not even exist on this host; that Service then goes to the address
//! in the stand-in's kubeconfig.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::WatchStreamExt;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::env::cluster_ip;
use crate::net::ip;

const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The Service port a ClusterIP:port listener stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub namespace: String,
    pub service: String,
    /// The Service port's name ("" when unnamed): slices name their ports the same.
    pub port_name: String,
}

impl Target {
    fn is_api_server(&self) -> bool {
        self.namespace == "default" && self.service == "kubernetes"
    }
}

/// Every TCP ClusterIP:port of the Services (IPv4).
pub fn desired(services: &[Arc<Service>]) -> BTreeMap<SocketAddrV4, Target> {
    let mut out = BTreeMap::new();
    for svc in services {
        let Some(ip) = cluster_ip(svc).and_then(|ip| ip.parse::<Ipv4Addr>().ok()) else {
            continue;
        };
        let namespace = svc.metadata.namespace.clone().unwrap_or_default();
        let service = svc.metadata.name.clone().unwrap_or_default();
        for port in svc.spec.iter().flat_map(|s| s.ports.iter().flatten()) {
            if port.protocol.as_deref().is_some_and(|p| p != "TCP") {
                continue;
            }
            let Ok(number) = u16::try_from(port.port) else {
                continue;
            };
            out.insert(
                SocketAddrV4::new(ip, number),
                Target {
                    namespace: namespace.clone(),
                    service: service.clone(),
                    port_name: port.name.clone().unwrap_or_default(),
                },
            );
        }
    }
    out
}

/// The endpoints a new connection may go to: the ready ones, else the serving and
/// terminating ones.
pub fn serving_endpoints(slices: &[Arc<EndpointSlice>], target: &Target) -> Vec<SocketAddr> {
    let (mut ready, mut terminating) = (Vec::new(), Vec::new());
    for slice in slices {
        let ns = slice.metadata.namespace.as_deref().unwrap_or_default();
        let owner = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL));
        if ns != target.namespace || owner != Some(&target.service) {
            continue;
        }
        let port = slice
            .ports
            .iter()
            .flatten()
            .filter(|p| p.protocol.as_deref().is_none_or(|p| p == "TCP"))
            .find(|p| p.name.as_deref().unwrap_or("") == target.port_name)
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok());
        let Some(port) = port else {
            continue;
        };
        for ep in &slice.endpoints {
            let Some(addr) = ep.addresses.first().and_then(|a| a.parse::<IpAddr>().ok()) else {
                continue;
            };
            let c = ep.conditions.as_ref();
            let is_ready = c.and_then(|c| c.ready).unwrap_or(true);
            let serving = c.and_then(|c| c.serving).unwrap_or(is_ready);
            let is_terminating = c.and_then(|c| c.terminating).unwrap_or(false);
            let sa = SocketAddr::new(addr, port);
            if is_ready && !is_terminating {
                ready.push(sa);
            } else if serving && is_terminating {
                terminating.push(sa);
            }
        }
    }
    let mut chosen = if ready.is_empty() { terminating } else { ready };
    chosen.sort();
    chosen.dedup();
    chosen
}

struct Listener {
    target: watch::Sender<Target>,
    task: JoinHandle<()>,
}

/// The proxy's state: the dummy interface, its addresses and the listeners.
pub struct Proxy {
    iface: String,
    /// `host:port` of the API server for `default/kubernetes` (see the module docs).
    api_upstream: Option<String>,
    slices: Store<EndpointSlice>,
    addresses: BTreeSet<Ipv4Addr>,
    listeners: HashMap<SocketAddrV4, Listener>,
}

impl Proxy {
    /// (Re)creates the dummy interface; an earlier run's addresses go with the old one.
    pub async fn new(
        iface: &str,
        api_upstream: Option<String>,
        slices: Store<EndpointSlice>,
    ) -> Result<Self, crate::net::NetError> {
        let _ = ip(&["link", "del", iface], None).await;
        // A kernel without the dummy driver: a bridge without ports holds local
        // addresses just the same.
        if let Err(e) = ip(&["link", "add", iface, "type", "dummy"], None).await {
            warn!(error = %e, "no dummy interfaces here, using a portless bridge");
            ip(&["link", "add", iface, "type", "bridge"], None).await?;
        }
        ip(&["link", "set", iface, "up"], None).await?;
        Ok(Self {
            iface: iface.into(),
            api_upstream,
            slices,
            addresses: BTreeSet::new(),
            listeners: HashMap::new(),
        })
    }

    /// Makes the addresses and listeners match `want`.
    async fn reconcile(&mut self, want: BTreeMap<SocketAddrV4, Target>) {
        let ips: BTreeSet<Ipv4Addr> = want.keys().map(|a| *a.ip()).collect();
        let mut batch = String::new();
        for add in ips.difference(&self.addresses) {
            batch.push_str(&format!("addr add {add}/32 dev {}\n", self.iface));
        }
        self.listeners.retain(|addr, l| {
            let keep = want.contains_key(addr);
            if !keep {
                l.task.abort();
            }
            keep
        });
        for gone in self.addresses.difference(&ips) {
            batch.push_str(&format!("addr del {gone}/32 dev {}\n", self.iface));
        }
        if !batch.is_empty()
            && let Err(e) = ip(&["-force", "-batch", "-"], Some(&batch)).await
        {
            warn!(error = %e, "updating service addresses");
        }
        self.addresses = ips;

        for (addr, target) in want {
            if let Some(l) = self.listeners.get(&addr) {
                l.target.send_if_modified(|t| {
                    let changed = *t != target;
                    *t = target.clone();
                    changed
                });
                continue;
            }
            match TcpListener::bind(SocketAddr::V4(addr)).await {
                Ok(listener) => {
                    debug!(%addr, service = %format!("{}/{}", target.namespace, target.service), "listening");
                    let (tx, rx) = watch::channel(target);
                    let task = tokio::spawn(serve(
                        listener,
                        rx,
                        self.slices.clone(),
                        self.api_upstream.clone(),
                    ));
                    self.listeners.insert(addr, Listener { target: tx, task });
                }
                Err(e) => warn!(%addr, error = %e, "cannot listen on a ClusterIP"),
            }
        }
    }

    /// Stops listening and removes the interface with its addresses.
    pub async fn close(self) {
        for l in self.listeners.values() {
            l.task.abort();
        }
        let _ = ip(&["link", "del", &self.iface], None).await;
    }
}

async fn serve(
    listener: TcpListener,
    target: watch::Receiver<Target>,
    slices: Store<EndpointSlice>,
    api_upstream: Option<String>,
) {
    let next = Arc::new(AtomicUsize::new(0));
    loop {
        let (inbound, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let target = target.borrow().clone();
        let upstreams: Vec<String> = match (&api_upstream, target.is_api_server()) {
            (Some(api), true) => vec![api.clone()],
            _ => serving_endpoints(&slices.state(), &target)
                .into_iter()
                .map(|a| a.to_string())
                .collect(),
        };
        let start = next.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(splice(inbound, upstreams, start));
    }
}

/// Connects to the upstreams in turn from `start` and splices the first that answers.
async fn splice(mut inbound: TcpStream, upstreams: Vec<String>, start: usize) {
    let n = upstreams.len();
    for i in 0..n {
        let addr = &upstreams[(start + i) % n];
        match timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(mut outbound)) => {
                let _ = inbound.set_nodelay(true);
                let _ = outbound.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                return;
            }
            Ok(Err(e)) => debug!(%addr, error = %e, "endpoint refused"),
            Err(_) => debug!(%addr, "endpoint connect timed out"),
        }
    }
}

/// Follows the Services (filling `services`, which pods read for their environment) and
/// keeps the proxy in step until `shutdown`. `ready` fires after the first full sync.
pub async fn run(
    client: Client,
    mut proxy: Proxy,
    services: reflector::store::Writer<Service>,
    ready: oneshot::Sender<()>,
    shutdown: CancellationToken,
) {
    let api: Api<Service> = Api::all(client);
    let reader = services.as_reader();
    let mut stream =
        reflector::reflector(services, watcher::watcher(api, watcher::Config::default()))
            .default_backoff()
            .boxed();
    let mut ready = Some(ready);
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => break,
            event = stream.next() => event,
        };
        match event {
            Some(Ok(Event::InitDone | Event::Apply(_) | Event::Delete(_))) => {
                proxy.reconcile(desired(&reader.state())).await;
                if let Some(r) = ready.take() {
                    info!(listeners = proxy.listeners.len(), "service proxy ready");
                    let _ = r.send(());
                }
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => warn!(error = %e, "service watch"),
            None => break,
        }
    }
    proxy.close().await;
}

/// Keeps an EndpointSlice store filled until `shutdown`.
pub async fn follow_slices(
    client: Client,
    writer: reflector::store::Writer<EndpointSlice>,
    shutdown: CancellationToken,
) {
    let api: Api<EndpointSlice> = Api::all(client);
    let mut stream =
        reflector::reflector(writer, watcher::watcher(api, watcher::Config::default()))
            .default_backoff()
            .boxed();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            event = stream.next() => match event {
                Some(Err(e)) => warn!(error = %e, "endpointslice watch"),
                None => return,
                Some(Ok(_)) => {}
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn svc(v: serde_json::Value) -> Arc<Service> {
        Arc::new(serde_json::from_value(v).unwrap())
    }

    fn slice(
        ns: &str,
        svc: &str,
        port: serde_json::Value,
        endpoints: serde_json::Value,
    ) -> Arc<EndpointSlice> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": format!("{svc}-x"), "namespace": ns,
                             "labels": {SERVICE_NAME_LABEL: svc}},
                "addressType": "IPv4",
                "ports": [port],
                "endpoints": endpoints,
            }))
            .unwrap(),
        )
    }

    fn target(port_name: &str) -> Target {
        Target {
            namespace: "ns".into(),
            service: "web".into(),
            port_name: port_name.into(),
        }
    }

    #[test]
    fn listeners_for_tcp_ports_of_cluster_ip_services() {
        let services = vec![
            svc(json!({"metadata": {"name": "web", "namespace": "ns"},
                "spec": {"clusterIP": "10.96.1.2", "ports": [
                    {"name": "http", "port": 80}, {"name": "dns", "port": 53, "protocol": "UDP"}]}})),
            svc(json!({"metadata": {"name": "db", "namespace": "ns"},
                "spec": {"clusterIP": "None", "ports": [{"port": 5432}]}})),
            svc(
                json!({"metadata": {"name": "kubernetes", "namespace": "default"},
                "spec": {"clusterIP": "10.96.0.1", "ports": [{"name": "https", "port": 443}]}}),
            ),
        ];
        let want = desired(&services);
        assert_eq!(want.len(), 2);
        assert_eq!(want[&"10.96.1.2:80".parse().unwrap()], target("http"));
        assert!(want[&"10.96.0.1:443".parse().unwrap()].is_api_server());
    }

    #[test]
    fn ready_endpoints_first_then_serving_terminating_ones() {
        let slices = vec![
            slice(
                "ns",
                "web",
                json!({"name": "http", "port": 8080}),
                json!([
                    {"addresses": ["10.244.0.2"], "conditions": {"ready": true}},
                    {"addresses": ["10.244.0.3"], "conditions": {"ready": false, "serving": true, "terminating": true}},
                    {"addresses": ["10.244.0.4"]},
                    {"addresses": ["10.244.0.5"], "conditions": {"ready": false}},
                ]),
            ),
            slice(
                "other",
                "web",
                json!({"name": "http", "port": 8080}),
                json!([
                {"addresses": ["10.244.9.9"]}]),
            ),
            slice(
                "ns",
                "web",
                json!({"name": "metrics", "port": 9090}),
                json!([
                {"addresses": ["10.244.0.2"]}]),
            ),
        ];
        assert_eq!(
            serving_endpoints(&slices, &target("http")),
            vec![
                "10.244.0.2:8080".parse::<SocketAddr>().unwrap(),
                "10.244.0.4:8080".parse().unwrap()
            ]
        );
        let terminating = vec![slice(
            "ns",
            "web",
            json!({"name": "http", "port": 8080}),
            json!([
                {"addresses": ["10.244.0.3"], "conditions": {"ready": false, "serving": true, "terminating": true}},
                {"addresses": ["10.244.0.6"], "conditions": {"ready": false, "serving": false, "terminating": true}},
            ]),
        )];
        assert_eq!(
            serving_endpoints(&terminating, &target("http")),
            vec!["10.244.0.3:8080".parse::<SocketAddr>().unwrap()]
        );
        assert!(serving_endpoints(&slices, &target("nope")).is_empty());
    }

    #[test]
    fn unnamed_ports_match_unnamed_slice_ports() {
        let slices = vec![slice(
            "ns",
            "web",
            json!({"port": 8080}),
            json!([{"addresses": ["10.244.0.2"]}]),
        )];
        assert_eq!(serving_endpoints(&slices, &target("")).len(), 1);
    }

    #[tokio::test]
    async fn splice_goes_to_the_first_endpoint_that_answers() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up_addr = upstream.local_addr().unwrap();
        let dead = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead_addr = dead.local_addr().unwrap();
        drop(dead);
        tokio::spawn(async move {
            let (mut s, _) = upstream.accept().await.unwrap();
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).await.unwrap();
            s.write_all(&buf).await.unwrap();
        });
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let front_addr = front.local_addr().unwrap();
        tokio::spawn(async move {
            let (s, _) = front.accept().await.unwrap();
            splice(s, vec![dead_addr.to_string(), up_addr.to_string()], 0).await;
        });
        let mut client = TcpStream::connect(front_addr).await.unwrap();
        client.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        client.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
    }
}
