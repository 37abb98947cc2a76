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

/// What `zeroscale operator` (reconciler, autoscaler, leader election) calls.
pub const OPERATOR_RULES: &[Rule] = &[
    rule(
        "zeroscale.dev",
        &["functions"],
        &["get", "list", "watch"],
        Scope::Watched,
    ),
    rule(
        "zeroscale.dev",
        &["functions/status"],
        &["get", "patch", "update"],
        Scope::Watched,
    ),
    rule(
        "apps",
        &["deployments"],
        &["get", "list", "watch", "create", "patch", "update"],
        Scope::Watched,
    ),
    rule(
        "apps",
        &["deployments/scale"],
        &["get", "patch", "update"],
        Scope::Watched,
    ),
    rule(
        "",
        &["services"],
        &["get", "list", "watch", "create", "patch", "update"],
        Scope::Watched,
    ),
    rule(
        "discovery.k8s.io",
        &["endpointslices"],
        &[
            "get", "list", "watch", "create", "patch", "update", "delete",
        ],
        Scope::Watched,
    ),
    rule("", &["pods"], &["get", "list", "watch"], Scope::Watched),
    rule(
        "events.k8s.io",
        &["events"],
        &["create", "patch"],
        Scope::Watched,
    ),
    rule(
        "coordination.k8s.io",
        &["leases"],
        &["get", "create", "update", "patch"],
        Scope::OwnNamespace,
    ),
];

/// What `zeroscale activator` calls.
pub const ACTIVATOR_RULES: &[Rule] = &[
    rule(
        "zeroscale.dev",
        &["functions"],
        &["get", "list", "watch"],
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
