//! The operator: reconciles Functions into Deployments, Services and activator routing,
//! and runs the autoscaler. Two replicas run for availability; a Lease elects the one
//! that works ([`leader`]). The reconcile pipeline is in [`reconcile`], its pure steps in
//! [`build`] and [`status`].

pub mod activators;
pub mod build;
pub mod cache;
pub mod events;
pub mod leader;
pub mod metrics;
pub mod rbac;
pub mod reconcile;
pub mod status;
pub mod target;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{self, Controller};
use kube::runtime::events::Reporter;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{PredicateConfig, WatchStreamExt, predicates, watcher};
use kube::{Resource, ResourceExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::api::{Defaults, FUNCTION_LABEL, Function, TargetKind};
use crate::platform::kube::{KubePlatform, paged_watch};
use crate::telemetry::{self, Readiness};

/// Reconciles in flight at once.
pub const RECONCILE_CONCURRENCY: u16 = 32;

/// Errors of the operator, one variant per pipeline step.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("building objects: {0}")]
    Build(#[from] build::BuildError),
    #[error("reading {kind} {name}: {source}")]
    Read {
        kind: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("applying {kind} {name}: {source}")]
    Apply {
        kind: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("{kind} {name} changed while it was being applied; retrying")]
    Conflict { kind: String, name: String },
    #[error("writing the Function status: {0}")]
    Status(#[source] kube::Error),
    #[error("the caches have not been listed yet")]
    NotSynced,
    #[error("invalid flag: {0}")]
    Config(String),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("lost the leader lease; exiting so a fresh process can stand for election")]
    LeadershipLost,
    #[error("the controller or the autoscaler stopped unexpectedly")]
    Stopped,
}

impl Error {
    /// A short, bounded label for metrics (`reason="apply"`...).
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Build(_) => "build",
            Error::Read { .. } => "read",
            Error::Apply { .. } => "apply",
            Error::Conflict { .. } => "conflict",
            Error::Status(_) => "status",
            Error::NotSynced => "not_synced",
            Error::Config(_) => "config",
            Error::Metrics(_) => "metrics",
            Error::LeadershipLost => "leadership",
            Error::Stopped => "stopped",
        }
    }
}

/// Flags of `zeroscale operator`.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Only reconcile Functions in this namespace (empty: all namespaces).
    #[arg(long, env = "ZEROSCALE_NAMESPACE", default_value = "")]
    pub namespace: String,
    /// The activator Service (`namespace/name`) whose ready pods every Function's
    /// Service points at; its port named `http` carries the traffic.
    #[arg(
        long,
        env = "ZEROSCALE_ACTIVATOR_SERVICE",
        default_value = "zeroscale-system/zeroscale-activator"
    )]
    pub activator_service: String,
    /// Where `/metrics`, `/healthz` and `/readyz` are served. The default differs from
    /// the activator's admin port (9090), so both can run on one machine.
    #[arg(long, env = "ZEROSCALE_ADMIN_LISTEN", default_value = "0.0.0.0:9091")]
    pub admin_listen: SocketAddr,
    /// Elect a leader through a Lease, so several replicas can run with one active.
    #[arg(
        long,
        env = "ZEROSCALE_LEADER_ELECT",
        default_value_t = true,
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub leader_elect: bool,
    /// The name of the leader Lease.
    #[arg(
        long,
        env = "ZEROSCALE_LEASE_NAME",
        default_value = "zeroscale-operator"
    )]
    pub lease_name: String,
    /// The namespace of the leader Lease. Default: the pod's namespace (`POD_NAMESPACE`),
    /// else the namespace of `--activator-service`, which is where zeroscale is
    /// installed (and where a namespace-scoped install may keep a Lease), also when the
    /// operator runs outside the cluster.
    #[arg(long, env = "POD_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// This replica's identity in the Lease and in Events (default: the host name).
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,
    /// Most rewrites per second of the activator EndpointSlices when the activator pods
    /// change (every Function has one; a new Function's first slice is not paced). An
    /// activator pod change reaches every Function in about Functions / this many
    /// seconds; the activators' lame-duck time must cover that (the chart computes it).
    #[arg(long, env = "ZEROSCALE_SLICE_WRITES_PER_SECOND", default_value_t = 50)]
    pub slice_writes_per_second: u32,
    #[command(flatten)]
    pub shared: crate::api::config::SharedArgs,
}

/// Splits `namespace/name`.
pub fn parse_service(s: &str) -> Result<(String, String), Error> {
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok((ns.to_string(), name.to_string()))
        }
        _ => Err(Error::Config(format!(
            "--activator-service must be namespace/name, got {s:?}"
        ))),
    }
}

/// The namespace of the leader Lease: the flag (or `POD_NAMESPACE`), else the activator
/// Service's namespace. Never the kubeconfig's default namespace, which out of a pod is
/// usually `default`, a namespace a scoped install has no right to.
pub fn lease_namespace(config: &Config, activator_namespace: &str) -> String {
    config
        .lease_namespace
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| activator_namespace.to_string())
}

fn identity(config: &Config) -> String {
    config
        .pod_name
        .clone()
        .filter(|n| !n.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|n| !n.is_empty()))
        .unwrap_or_else(|| format!("zeroscale-operator-{:08x}", rand::random::<u32>()))
}

/// Runs the operator until SIGTERM.
pub async fn run(config: Config) -> crate::Result<()> {
    let defaults = Defaults::load(config.shared.defaults_file.as_deref())?;
    let (activator_ns, activator_svc) = parse_service(&config.activator_service)?;
    let namespace = Some(config.namespace.clone()).filter(|n| !n.is_empty());
    let identity = identity(&config);
    let registry = prometheus::Registry::new();
    telemetry::ProcessMemory::register(&registry).map_err(Error::from)?;
    let client = crate::platform::client::client(&registry, "operator").await?;
    let metrics = metrics::Metrics::new(&registry).map_err(Error::from)?;
    let shutdown = CancellationToken::new();
    let readiness = Readiness::default();
    let listener = telemetry::bind(config.admin_listen, "admin").await?;
    let admin = tokio::spawn(telemetry::serve_admin(
        listener,
        registry.clone(),
        readiness.clone(),
        None,
        shutdown.clone(),
    ));
    {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            telemetry::shutdown_signal().await;
            shutdown.cancel();
        });
    }
    // Live and ready as a standby too: readiness must not depend on leadership, or a
    // rolling update of the operator would wait on the standby forever.
    readiness.set(true);

    let (leading_tx, mut leading) = watch::channel(!config.leader_elect);
    let elector_stop = CancellationToken::new();
    let elector = if config.leader_elect {
        let lease_ns = lease_namespace(&config, &activator_ns);
        info!(%identity, lease = %format!("{lease_ns}/{}", config.lease_name), "standing for election");
        let store = leader::KubeLeaseStore::new(client.clone(), &lease_ns, &config.lease_name);
        let elector = leader::Elector::new(store, identity.clone(), leader::Timing::default());
        Some(tokio::spawn(elector.run(leading_tx, elector_stop.clone())))
    } else {
        drop(leading_tx);
        None
    };

    let result = async {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            became = leading.wait_for(|l| *l) => if became.is_err() && config.leader_elect {
                return Ok(());
            },
        }
        metrics.leader.set(1);
        let work = shutdown.child_token();
        let (deployments, deployment_writer) = deployment_cache();
        let autoscaler = crate::autoscaler::Autoscaler::new(
            Arc::new(
                KubePlatform::new(client.clone(), namespace.clone())
                    .with_deployment_store(deployments),
            ),
            Arc::new(crate::autoscaler::collector::HttpSource::new(
                client.clone(),
                activator_ns.clone(),
                activator_svc.clone(),
            )),
            defaults.clone(),
            &registry,
        )?;
        let settings = reconcile::Settings {
            cluster_domain: config.shared.cluster_domain.clone(),
            defaults,
        };
        // The autoscaler and the controller live and die together: if one stops on its
        // own, the other is stopped too and the process exits (and is restarted), rather
        // than running half an operator.
        let leader_work = async {
            let autoscaler = async {
                let r = autoscaler.run(work.clone()).await;
                work.cancel();
                r
            };
            let controller = async {
                run_controller(
                    client.clone(),
                    ControllerArgs {
                        namespace: namespace.clone(),
                        activator: (activator_ns.clone(), activator_svc.clone()),
                        settings,
                        identity: identity.clone(),
                        slice_writes_per_second: config.slice_writes_per_second,
                    },
                    deployment_writer,
                    metrics.clone(),
                    work.clone(),
                )
                .await;
                work.cancel();
            };
            let (a, ()) = tokio::join!(autoscaler, controller);
            if shutdown.is_cancelled() {
                return a;
            }
            match a {
                Err(e) => Err(e),
                Ok(()) => Err(Error::Stopped.into()),
            }
        };
        let lost = async {
            if config.leader_elect {
                let _ = leading.wait_for(|l| !*l).await;
                true
            } else {
                std::future::pending::<bool>().await
            }
        };
        tokio::pin!(leader_work);
        let outcome = tokio::select! {
            r = &mut leader_work => r,
            lost = lost => {
                work.cancel();
                let r = leader_work.await;
                if lost && !shutdown.is_cancelled() {
                    Err(Error::LeadershipLost.into())
                } else {
                    r
                }
            }
        };
        metrics.leader.set(0);
        outcome
    }
    .await;

    // Work has stopped: only now give the Lease up.
    elector_stop.cancel();
    if let Some(e) = elector {
        let _ = e.await;
    }
    shutdown.cancel();
    let _ = admin.await;
    result
}

fn api<K>(client: &kube::Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// What the controller watches and how it writes (parsed once from flags).
#[derive(Debug, Clone)]
pub struct ControllerArgs {
    /// Only this namespace, or all.
    pub namespace: Option<String>,
    /// The activator Service: namespace and name.
    pub activator: (String, String),
    pub settings: reconcile::Settings,
    /// This replica's name in Events.
    pub identity: String,
    pub slice_writes_per_second: u32,
}

/// The cache of the Functions' Deployments, one for the whole operator: the reconciler's
/// watch fills it (through the writer given to [`run_controller`]) and the autoscaler
/// reads scales from it (`KubePlatform::with_deployment_store`).
pub fn deployment_cache() -> (
    cache::PackedStore<Deployment>,
    cache::PackedWriter<Deployment>,
) {
    cache::packed_store()
}

/// Runs the reconcile controller and the activator-endpoints follower until `stop`
/// (the leader's work, besides the autoscaler).
///
/// `deployment_writer` fills the Deployment cache the reconciler reads, which the
/// autoscaler shares (see [`deployment_cache`]).
pub async fn run_controller(
    client: kube::Client,
    args: ControllerArgs,
    deployment_writer: cache::PackedWriter<Deployment>,
    metrics: metrics::Metrics,
    stop: CancellationToken,
) {
    let ControllerArgs {
        namespace,
        activator: (activator_ns, activator_svc),
        settings,
        identity,
        slice_writes_per_second,
    } = args;
    let ns = namespace.as_deref();
    let labelled = paged_watch().labels(FUNCTION_LABEL);

    // Every cached object is trimmed to what is read before it is stored, and the
    // objects a Function owns are packed (see `cache`).
    let deployments = deployment_writer.as_reader();
    let deployment_events = owned_events(
        api::<Deployment>(&client, ns),
        labelled.clone(),
        deployment_writer,
    );
    let (services, writer) = cache::packed_store();
    let service_events = owned_events(api::<Service>(&client, ns), labelled.clone(), writer);
    // Only the activator slices the operator writes: the pod slices of the private
    // Services carry the Function label too, but the reconciler never reads them.
    let (slices, writer) = cache::packed_store();
    let slice_events = owned_events(
        api::<EndpointSlice>(&client, ns),
        paged_watch().labels(&format!(
            "{FUNCTION_LABEL},endpointslice.kubernetes.io/managed-by={}",
            build::SLICE_MANAGER
        )),
        writer,
    );
    let (pods, writer) = reflector::store::<Pod>();
    let pod_events = reflector::reflector(
        writer,
        watcher(api(&client, ns), labelled)
            .default_backoff()
            .modify(cache::trim_pod),
    )
    .touched_objects();

    // Functions; a change to one's hosts re-checks the others that list the same host, and
    // a change to one's scale target the others that name the same target.
    let (functions, writer) = reflector::store::<Function>();
    let (host_tx, host_rx) = futures::channel::mpsc::unbounded();
    let host_reader = functions.clone();
    let targets = target::TargetIndex::default();
    let index = targets.clone();
    let function_events = reflector::reflector(
        writer,
        watcher(api::<Function>(&client, ns), paged_watch())
            .default_backoff()
            .modify(cache::trim_function),
    )
    .inspect(move |event| {
        let Ok(event) = event else { return };
        for other in index.handle(event) {
            let _ = host_tx.unbounded_send(other);
        }
        if let watcher::Event::Apply(f) | watcher::Event::Delete(f) = event {
            for other in sharing_hosts(&host_reader, f) {
                let _ = host_tx.unbounded_send(other);
            }
        }
    })
    .applied_objects()
    // Only spec changes need a reconcile: status writes (ours, and the autoscaler's
    // lastRequestTime under traffic) would otherwise trigger one each.
    .predicate_filter(predicates::generation, PredicateConfig::default());

    // Scale targets are the users' objects, without zeroscale's label: a metadata-only
    // watch of every Deployment (StatefulSet) says when one changed, and is only started
    // once some Function names a target of that kind. Nothing is cached: the reconcile
    // GETs the target it needs.
    let deployment_targets =
        target_events::<Deployment>(&client, ns, &targets, TargetKind::Deployment);
    let stateful_set_targets =
        target_events::<StatefulSet>(&client, ns, &targets, TargetKind::StatefulSet);

    let (activators_tx, activators_rx) = watch::channel(None);
    let follower = tokio::spawn(activators::follow(
        client.clone(),
        activator_ns,
        activator_svc,
        activators_tx,
        stop.clone(),
    ));
    let activator_changes = futures::stream::unfold(activators_rx.clone(), |mut rx| async move {
        rx.changed().await.ok().map(|_| ((), rx))
    });

    // Never reconcile before the activator endpoints are known: a Function's Service
    // would otherwise be reported unroutable (or pointed nowhere) at every restart.
    let mut known = activators_rx.clone();
    tokio::select! {
        _ = stop.cancelled() => return,
        r = known.wait_for(Option::is_some) => if r.is_err() { return },
    }
    let context = Arc::new(reconcile::Context {
        client: client.clone(),
        settings,
        stores: reconcile::Stores {
            functions: functions.clone(),
            deployments,
            services,
            slices,
            pods,
        },
        activators: activators_rx,
        events: events::Events::new(
            client,
            Reporter {
                controller: "zeroscale-operator".into(),
                instance: Some(identity),
            },
        ),
        metrics,
        slice_limiter: reconcile::RateLimiter::new(slice_writes_per_second),
        failures: reconcile::Failures::default(),
        targets: targets.clone(),
        fights: Default::default(),
    });
    info!(namespace = ns.unwrap_or("<all>"), "reconciling Functions");
    let pruning = {
        let (context, stop) = (context.clone(), stop.clone());
        tokio::spawn(async move { context.events.prune_until(stop).await })
    };
    Controller::for_stream(function_events, functions)
        // Bounded parallelism, and a short debounce so a burst of pod status updates
        // during a rollout becomes one reconcile. A new Function's reconcile is about ten
        // sequential API calls, so their pace is the API server's latency, not CPU: at 8
        // at once, 10,000 Functions applied together became Ready at about 5 a second on
        // a loaded v1.24 (issue 16).
        .with_config(
            controller::Config::default()
                .concurrency(RECONCILE_CONCURRENCY)
                .debounce(Duration::from_millis(500)),
        )
        .owns_stream(deployment_events)
        .owns_stream(service_events)
        .owns_stream(slice_events)
        .watches_stream(pod_events, |pod: Pod| {
            let name = pod.labels().get(FUNCTION_LABEL).cloned();
            let ns = pod.namespace();
            name.zip(ns)
                .map(|(name, ns)| ObjectRef::<Function>::new(&name).within(&ns))
        })
        .watches_stream(
            deployment_targets,
            target_mapper(&targets, TargetKind::Deployment),
        )
        .watches_stream(
            stateful_set_targets,
            target_mapper(&targets, TargetKind::StatefulSet),
        )
        .reconcile_on(host_rx)
        .reconcile_all_on(activator_changes)
        .graceful_shutdown_on(stop.clone().cancelled_owned())
        .run(reconcile::reconcile, reconcile::error_policy, context)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "controller");
            }
        })
        .await;
    stop.cancel();
    pruning.abort();
    let _ = tokio::time::timeout(Duration::from_secs(5), follower).await;
    info!("controller stopped");
}

/// The watch of one kind of object a Function owns: packed into the cache `writer`
/// fills, and given to the controller (trimmed, whole) as the objects it touched or that
/// vanished in a relist (see [`cache::touched_or_vanished`]).
fn owned_events<K>(
    api: Api<K>,
    config: watcher::Config,
    writer: cache::PackedWriter<K>,
) -> impl futures::Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: cache::Pack + std::fmt::Debug + Send + Sync + 'static,
{
    let store = writer.as_reader();
    cache::touched_or_vanished(
        cache::reflect(
            writer,
            watcher(api, config)
                .default_backoff()
                .modify(<K as cache::Pack>::trim),
        ),
        store,
    )
}

/// Metadata-only events of the workloads of `kind` in the watched namespaces, from the
/// moment some Function names a target of that kind.
fn target_events<K>(
    client: &kube::Client,
    namespace: Option<&str>,
    index: &target::TargetIndex,
    kind: TargetKind,
) -> impl futures::Stream<Item = Result<PartialObjectMeta<K>, watcher::Error>> + Send + 'static
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    let api = api::<PartialObjectMeta<K>>(client, namespace);
    let index = index.clone();
    futures::stream::once(async move { index.wanted(kind).await }).flat_map(move |()| {
        watcher(api.clone(), paged_watch())
            .default_backoff()
            .touched_objects()
    })
}

/// Maps a workload's event to the Functions that name it as their target.
fn target_mapper<K: Resource>(
    index: &target::TargetIndex,
    kind: TargetKind,
) -> impl Fn(PartialObjectMeta<K>) -> Vec<ObjectRef<Function>> + Send + Sync + 'static {
    let index = index.clone();
    move |meta| {
        let (Some(namespace), Some(name)) = (meta.metadata.namespace, meta.metadata.name) else {
            return Vec::new();
        };
        index.functions(&target::TargetKey {
            kind,
            namespace,
            name,
        })
    }
}

/// Other Functions listing one of `f`'s hosts.
fn sharing_hosts(store: &Store<Function>, f: &Function) -> Vec<ObjectRef<Function>> {
    if f.spec.hosts.is_empty() {
        return Vec::new();
    }
    let mine: Vec<String> = f
        .spec
        .hosts
        .iter()
        .map(|h| h.to_ascii_lowercase())
        .collect();
    store
        .state()
        .iter()
        .filter(|o| o.key() != f.key())
        .filter(|o| {
            o.spec
                .hosts
                .iter()
                .any(|h| mine.contains(&h.to_ascii_lowercase()))
        })
        .map(|o| ObjectRef::from_obj(o.as_ref()))
        .collect()
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        config: Config,
    }

    fn parse(args: &[&str]) -> Config {
        let mut all = vec!["operator"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all).expect("flags parse").config
    }

    #[test]
    fn flags_have_the_documented_defaults() {
        let c = parse(&[]);
        assert_eq!(c.namespace, "");
        assert_eq!(c.activator_service, "zeroscale-system/zeroscale-activator");
        assert_eq!(c.admin_listen.to_string(), "0.0.0.0:9091");
        assert!(c.leader_elect);
        assert_eq!(c.lease_name, "zeroscale-operator");
        assert_eq!(c.shared.cluster_domain, "cluster.local");
    }

    /// Out of a pod there is no POD_NAMESPACE: the Lease must still live in zeroscale's
    /// own namespace (the first landing took the kubeconfig's `default`).
    #[test]
    fn the_lease_lives_next_to_the_activator_unless_told_otherwise() {
        let c = parse(&["--activator-service", "zs/zeroscale-activator"]);
        assert_eq!(lease_namespace(&c, "zs"), "zs");
        let c = parse(&["--lease-namespace", "elsewhere"]);
        assert_eq!(lease_namespace(&c, "zeroscale-system"), "elsewhere");
        let c = parse(&["--lease-namespace", ""]);
        assert_eq!(lease_namespace(&c, "zeroscale-system"), "zeroscale-system");
    }

    /// A laptop against a cluster (and the e2e suite) runs both components on one
    /// machine: their default listen addresses must not collide.
    #[test]
    fn operator_and_activator_defaults_can_run_on_one_machine() {
        #[derive(Parser)]
        struct Activator {
            #[command(flatten)]
            config: crate::activator::Config,
        }
        let a = Activator::try_parse_from(["activator"])
            .expect("flags parse")
            .config;
        let o = parse(&[]);
        let taken = [a.listen.port(), a.admin_listen.port()];
        assert!(
            !taken.contains(&o.admin_listen.port()),
            "operator admin {} collides with the activator's {taken:?}",
            o.admin_listen
        );
    }

    #[test]
    fn leader_election_can_be_turned_off() {
        assert!(!parse(&["--leader-elect", "false"]).leader_elect);
        assert!(!parse(&["--leader-elect=false"]).leader_elect);
        assert!(parse(&["--leader-elect"]).leader_elect);
    }

    #[test]
    fn a_host_change_rechecks_the_functions_listing_that_host() {
        use kube::runtime::reflector::store::Writer;
        let function = |name: &str, hosts: &[&str]| {
            let mut f = Function::new(
                name,
                crate::api::FunctionSpec {
                    template: Some(crate::api::PodTemplate::default()),
                    hosts: hosts.iter().map(|h| h.to_string()).collect(),
                    ..crate::api::FunctionSpec::default()
                },
            );
            f.metadata.namespace = Some("default".into());
            f
        };
        let mut writer: Writer<Function> = Writer::default();
        for f in [
            function("a", &["api.example.com"]),
            function("b", &["API.example.com", "other.example.com"]),
            function("c", &["other.example.com"]),
            function("d", &[]),
        ] {
            writer.apply_watcher_event(&watcher::Event::Apply(f));
        }
        let store = writer.as_reader();
        let names = |f: &Function| {
            let mut n: Vec<String> = sharing_hosts(&store, f)
                .into_iter()
                .map(|r| r.name)
                .collect();
            n.sort();
            n
        };
        assert_eq!(names(&function("a", &["api.example.com"])), vec!["b"]);
        assert_eq!(
            names(&function("x", &["api.example.com", "other.example.com"])),
            vec!["a", "b", "c"]
        );
        assert!(names(&function("d", &[])).is_empty());
    }

    #[test]
    fn the_activator_service_is_namespace_slash_name() {
        assert_eq!(
            parse_service("zeroscale-system/zeroscale-activator").unwrap(),
            ("zeroscale-system".into(), "zeroscale-activator".into())
        );
        for bad in ["zeroscale-activator", "/x", "x/", "a/b/c"] {
            assert!(parse_service(bad).is_err(), "{bad}");
        }
    }
}
