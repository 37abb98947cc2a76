//! The Kubernetes API access each component's code uses. The Helm chart and the
//! kustomize RBAC grant exactly this, and a packaging test compares them, so a new API
//! call without its grant (or a grant nothing uses) fails CI instead of a cluster.

/// Where a rule applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Every watched namespace (ClusterRole, or a Role per namespace when scoped).
    Watched,
    /// Only the namespace zeroscale is installed in (a Role).
    OwnNamespace,
}

/// One RBAC rule: verbs on resources of an API group.
#[derive(Debug, Clone, Copy)]
pub struct Rule {
    pub api_group: &'static str,
    pub resources: &'static [&'static str],
    pub verbs: &'static [&'static str],
    pub scope: Scope,
}

const fn rule(
    api_group: &'static str,
    resources: &'static [&'static str],
    verbs: &'static [&'static str],
    scope: Scope,
) -> Rule {
    Rule {
        api_group,
        resources,
        verbs,
        scope,
    }
}

/// What `zeroscale operator` (reconciler, autoscaler, leader election) calls. Objects
/// are written with server-side apply (PATCH), which creates them too; nothing is
/// created with POST, replaced with PUT or deleted (owner references let the garbage
/// collector delete).
pub const OPERATOR_RULES: &[Rule] = &[
    // Reconciler and autoscaler watches.
    rule(
        "zeroscale.dev",
        &["functions"],
        &["list", "watch"],
        Scope::Watched,
    ),
    // Status: the reconciler's and the autoscaler's fields, by server-side apply.
    rule(
        "zeroscale.dev",
        &["functions/status"],
        &["patch"],
        Scope::Watched,
    ),
    // Owned Deployments: watched, read before a first apply, applied. `get` also backs
    // the autoscaler's replica counts.
    rule(
        "apps",
        &["deployments"],
        &["get", "list", "watch", "patch"],
        Scope::Watched,
    ),
    // The autoscaler and wakes: read, replace with a resourceVersion, or merge-patch.
    rule(
        "apps",
        &["deployments/scale"],
        &["get", "patch", "update"],
        Scope::Watched,
    ),
    rule(
        "",
        &["services"],
        &["get", "list", "watch", "patch"],
        Scope::Watched,
    ),
    // The activator slices the operator writes, and the pod slices the platform reads.
    rule(
        "discovery.k8s.io",
        &["endpointslices"],
        &["get", "list", "watch", "patch"],
        Scope::Watched,
    ),
    // The activator Service's slices (they live in zeroscale's own namespace, which a
    // namespace-scoped install does not watch otherwise).
    rule(
        "discovery.k8s.io",
        &["endpointslices"],
        &["list", "watch"],
        Scope::OwnNamespace,
    ),
    // Startup failures (image pull, crash loop, unschedulable) come from the pods.
    rule("", &["pods"], &["list", "watch"], Scope::Watched),
    rule(
        "events.k8s.io",
        &["events"],
        &["create", "patch"],
        Scope::Watched,
    ),
    rule(
        "coordination.k8s.io",
        &["leases"],
        &["get", "create", "update"],
        Scope::OwnNamespace,
    ),
];

/// What `zeroscale activator` calls.
pub const ACTIVATOR_RULES: &[Rule] = &[
    rule(
        "zeroscale.dev",
        &["functions"],
        &["list", "watch"],
        Scope::Watched,
    ),
    rule(
        "discovery.k8s.io",
        &["endpointslices"],
        &["list", "watch"],
        Scope::Watched,
    ),
    rule(
        "apps",
        &["deployments/scale"],
        &["get", "patch", "update"],
        Scope::Watched,
    ),
];
