//! The Kubernetes API access each component's code uses, as the API *calls* it makes,
//! and the RBAC verbs the API server authorizes each call as. The Helm chart and the
//! kustomize RBAC grant exactly [`Rule::verbs`] of these, and a packaging test compares
//! them, so a new API call without its grant (or a grant nothing uses) fails CI instead
//! of a cluster.
//!
//! The mapping from a call to its verbs is where a mock and a real API server disagree,
//! so it is spelt out once here ([`Call::verbs`]) rather than left to each rule:
//! - a server-side apply is authorized as `patch` when the object exists and as
//!   `create` when it does not, so an applying controller needs both;
//! - a watch through `kube::runtime::watcher` lists first (and again after a gap), so it
//!   needs `list` and `watch`;
//! - with the `OwnerReferencesPermissionEnforcement` admission plugin (OpenShift and
//!   others), *changing* the owner references of an existing object needs `delete` on it,
//!   and setting `blockOwnerDeletion` needs `update` on the owner's `finalizers`.
//!   zeroscale sets owner references only when it creates an object and leaves
//!   `blockOwnerDeletion` unset (see [`super::build::owner_reference`]), so it needs
//!   neither: the e2e suite runs with that plugin on to keep this true;
//! - a Function's own finalizer (one that holds a scale target, see `target`) is a
//!   JSON patch of the Function's metadata: `patch` on `functions`, nothing on
//!   `functions/finalizers` (which only `blockOwnerDeletion` asks for).

/// Where a rule applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Every watched namespace (ClusterRole, or a Role per namespace when scoped).
    Watched,
    /// Only the namespace zeroscale is installed in (a Role).
    OwnNamespace,
}

/// One kind of API call the code makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// GET of one object.
    Get,
    /// A LIST.
    List,
    /// A reflector/watcher: a LIST, then a WATCH, and a LIST again after a gap.
    Watch,
    /// POST.
    Create,
    /// PUT (a replace, e.g. the scale subresource with a resourceVersion).
    Update,
    /// PATCH of an object that exists (merge, JSON or server-side apply of a subresource).
    Patch,
    /// Server-side apply of an object that may not exist yet.
    Apply,
}

impl Call {
    /// The RBAC verbs the API server checks for this call.
    pub const fn verbs(self) -> &'static [&'static str] {
        match self {
            Call::Get => &["get"],
            Call::List => &["list"],
            Call::Watch => &["list", "watch"],
            Call::Create => &["create"],
            Call::Update => &["update"],
            Call::Patch => &["patch"],
            Call::Apply => &["create", "patch"],
        }
    }
}

/// The calls one component makes on resources of an API group.
#[derive(Debug, Clone, Copy)]
pub struct Rule {
    pub api_group: &'static str,
    pub resources: &'static [&'static str],
    pub calls: &'static [Call],
    pub scope: Scope,
}

impl Rule {
    /// The verbs to grant, sorted and without duplicates.
    pub fn verbs(&self) -> Vec<&'static str> {
        let mut verbs: Vec<&'static str> = self
            .calls
            .iter()
            .flat_map(|c| c.verbs().iter().copied())
            .collect();
        verbs.sort_unstable();
        verbs.dedup();
        verbs
    }
}

const fn rule(
    api_group: &'static str,
    resources: &'static [&'static str],
    calls: &'static [Call],
    scope: Scope,
) -> Rule {
    Rule {
        api_group,
        resources,
        calls,
        scope,
    }
}

/// What `zeroscale operator` (reconciler, autoscaler, leader election) calls. Owned
/// objects are written with server-side apply; nothing is replaced with PUT but the
/// scale subresource, and nothing is deleted (owner references let the garbage collector
/// delete).
pub const OPERATOR_RULES: &[Rule] = &[
    // Reconciler and autoscaler watches; the finalizer of a Function that holds a scale
    // target (a JSON patch of its metadata, never of its spec).
    rule(
        "zeroscale.dev",
        &["functions"],
        &[Call::Watch, Call::Patch],
        Scope::Watched,
    ),
    // Status: the reconciler's and the autoscaler's fields, by server-side apply to the
    // status subresource of a Function that exists.
    rule(
        "zeroscale.dev",
        &["functions/status"],
        &[Call::Patch],
        Scope::Watched,
    ),
    // Owned Deployments: watched, read before a first apply (a same-named object that
    // is not ours is never taken over), applied. `get` also backs the autoscaler's
    // replica counts when its cache misses, and reads a scale target; the metadata-only
    // watch of scale targets is a list and a watch too.
    rule(
        "apps",
        &["deployments"],
        &[Call::Get, Call::Watch, Call::Apply],
        Scope::Watched,
    ),
    // StatefulSets are only ever scale targets: read (GET, metadata-only watch), never
    // written.
    rule(
        "apps",
        &["statefulsets"],
        &[Call::Get, Call::Watch],
        Scope::Watched,
    ),
    // The autoscaler and wakes: read, replace with a resourceVersion, or merge-patch; the
    // reconciler gives a target its replicas back the same way.
    rule(
        "apps",
        &["deployments/scale", "statefulsets/scale"],
        &[Call::Get, Call::Update, Call::Patch],
        Scope::Watched,
    ),
    rule(
        "",
        &["services"],
        &[Call::Get, Call::Watch, Call::Apply],
        Scope::Watched,
    ),
    // The activator slices the operator writes, and the pod slices the platform reads.
    rule(
        "discovery.k8s.io",
        &["endpointslices"],
        &[Call::Get, Call::Watch, Call::Apply],
        Scope::Watched,
    ),
    // The activator Service and its slices (they live in zeroscale's own namespace,
    // which a namespace-scoped install does not watch otherwise): the activator pods
    // every Function routes to, and the ClusterIP replicas' drain hooks call.
    rule(
        "discovery.k8s.io",
        &["endpointslices"],
        &[Call::Watch],
        Scope::OwnNamespace,
    ),
    rule("", &["services"], &[Call::Watch], Scope::OwnNamespace),
    // Startup failures (image pull, crash loop, unschedulable) come from the pods: the
    // Functions' own from a watch, a scale target's from a list by its selector.
    rule("", &["pods"], &[Call::Watch, Call::List], Scope::Watched),
    // kube's event Recorder creates an Event and patches its series on repeats.
    rule(
        "events.k8s.io",
        &["events"],
        &[Call::Create, Call::Patch],
        Scope::Watched,
    ),
    // Leader election: read the Lease, create it the first time, renew it by replace.
    rule(
        "coordination.k8s.io",
        &["leases"],
        &[Call::Get, Call::Create, Call::Update],
        Scope::OwnNamespace,
    ),
];

/// What `zeroscale activator` calls.
pub const ACTIVATOR_RULES: &[Rule] = &[
    rule(
        "zeroscale.dev",
        &["functions"],
        &[Call::Watch],
        Scope::Watched,
    ),
    rule(
        "discovery.k8s.io",
        &["endpointslices"],
        &[Call::Watch],
        Scope::Watched,
    ),
    // A wake from zero: read the scale, replace it with the read resourceVersion (of the
    // Function's Deployment, or of its scale target).
    rule(
        "apps",
        &["deployments/scale", "statefulsets/scale"],
        &[Call::Get, Call::Update],
        Scope::Watched,
    ),
    // A drain: which of a Function's pods are stopping (a fresh list, see
    // `activator::drain`).
    rule("", &["pods"], &[Call::List], Scope::Watched),
    // The peer activators a drain asks (the activator Service's slices).
    rule(
        "discovery.k8s.io",
        &["endpointslices"],
        &[Call::Watch],
        Scope::OwnNamespace,
    ),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn verbs_on(rules: &[Rule], group: &str, resource: &str) -> Vec<&'static str> {
        let mut v: Vec<&'static str> = rules
            .iter()
            .filter(|r| r.api_group == group && r.resources.contains(&resource))
            .filter(|r| r.scope == Scope::Watched)
            .flat_map(|r| r.verbs())
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// The first landing granted `patch` only for what the operator applies, and a real
    /// API server answered every first apply with 403: it authorizes it as `create`.
    #[test]
    fn what_the_operator_applies_it_may_create_and_patch() {
        for (group, resource) in [
            ("apps", "deployments"),
            ("", "services"),
            ("discovery.k8s.io", "endpointslices"),
        ] {
            let verbs = verbs_on(OPERATOR_RULES, group, resource);
            for needed in ["create", "patch"] {
                assert!(
                    verbs.contains(&needed),
                    "{group}/{resource}: {needed} missing from {verbs:?}"
                );
            }
        }
    }

    /// A Function's finalizer is a patch of the Function; `functions/finalizers` is only
    /// asked for by `blockOwnerDeletion`, which zeroscale never sets.
    #[test]
    fn nothing_is_deleted_and_no_finalizers_subresource_is_needed() {
        for rule in OPERATOR_RULES.iter().chain(ACTIVATOR_RULES) {
            assert!(!rule.verbs().contains(&"delete"), "{rule:?}");
            assert!(
                rule.resources.iter().all(|r| !r.ends_with("/finalizers")),
                "{rule:?}"
            );
        }
        let owner = crate::operator::build::owner_reference(&{
            let mut f = crate::api::Function::new(
                "hello",
                crate::api::FunctionSpec {
                    template: Some(crate::api::PodTemplate::default()),
                    ..crate::api::FunctionSpec::default()
                },
            );
            f.metadata.uid = Some("uid".into());
            f
        })
        .expect("an owner reference");
        assert_eq!(
            owner.block_owner_deletion, None,
            "blockOwnerDeletion needs update on functions/finalizers under \
             OwnerReferencesPermissionEnforcement"
        );
    }

    #[test]
    fn a_watch_lists_and_an_apply_creates_or_patches() {
        assert_eq!(Call::Watch.verbs(), &["list", "watch"]);
        assert_eq!(Call::Apply.verbs(), &["create", "patch"]);
        let r = rule(
            "",
            &["x"],
            &[Call::Apply, Call::Patch, Call::Get],
            Scope::Watched,
        );
        assert_eq!(r.verbs(), vec!["create", "get", "patch"]);
    }
}
