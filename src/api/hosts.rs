//! Which Host names reach which Function, decided the same way by every component.
//!
//! A Function answers at `<name>.<namespace>`, `<name>.<namespace>.svc` and
//! `<name>.<namespace>.svc.<cluster domain>` (reserved for it: no other Function may take
//! them) and at each entry of its `spec.hosts`. When two Functions list the same extra
//! host, the older one (creation time, then namespace/name) keeps it. The activator
//! routes by [`claim_hosts`]; the operator reports the losers on their status with the
//! same function, so both always agree.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};

use kube::ResourceExt;

use super::{Function, FunctionKey};

/// The names a Function is always reachable at.
pub fn service_hosts(key: &FunctionKey, cluster_domain: &str) -> [String; 3] {
    let base = format!("{}.{}", key.name, key.namespace);
    [
        base.clone(),
        format!("{base}.svc"),
        format!("{base}.svc.{cluster_domain}"),
    ]
}

/// Normalises a `Host` header (or `:authority`) for lookup: strips the port and a trailing
/// dot, lower-cases. Returns `None` for an empty or malformed value.
pub fn normalize_host(raw: &str) -> Option<String> {
    normalize_host_ref(raw).map(Cow::into_owned)
}

/// [`normalize_host`] borrowing from `raw` when it is already lower case (what clients
/// send), so routing a request allocates nothing.
pub fn normalize_host_ref(raw: &str) -> Option<Cow<'_, str>> {
    // What clients send most: a lower-case name without port or trailing dot, already
    // normal. One look at each byte, instead of the trims and searches below.
    if let [.., last] = raw.as_bytes()
        && *last != b'.'
        && raw.len() <= 253
        && raw
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
    {
        return Some(Cow::Borrowed(raw));
    }
    let raw = raw.trim();
    let host = if let Some(rest) = raw.strip_prefix('[') {
        // IPv6 literal: [::1]:8080
        let end = rest.find(']')?;
        &rest[..end]
    } else {
        match raw.rsplit_once(':') {
            Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
            Some(_) => return None,
            None => raw,
        }
    };
    let host = host.trim_end_matches('.');
    if host.is_empty() || host.len() > 253 {
        return None;
    }
    Some(if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    })
}

/// RFC 1123 host name: dot-separated labels of `[a-z0-9-]`, not starting or ending with `-`.
pub fn is_valid_hostname(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

/// Whether a host has the shape of a cluster service name (`x.y.svc` or `x.y.svc.<...>`),
/// which only the Function it names may answer to.
pub fn is_reserved_host(host: &str) -> bool {
    let labels: Vec<&str> = host.split('.').collect();
    labels.len() >= 3 && labels[2] == "svc"
}

/// Who answers at each host, and which Functions lost a host to an older one.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct HostClaims {
    /// Host -> the Function it routes to.
    pub owners: HashMap<String, FunctionKey>,
    /// Function -> the hosts it asked for but did not get, with who has them.
    pub conflicts: BTreeMap<FunctionKey, Vec<(String, FunctionKey)>>,
}

/// Decides which Function answers at each host. Service names always belong to the
/// Function they name; an extra host goes to the oldest Function listing it.
pub fn claim_hosts<'a>(
    functions: impl IntoIterator<Item = &'a Function>,
    cluster_domain: &str,
) -> HostClaims {
    let mut claims = HostClaims::default();
    let mut ordered: Vec<&Function> = functions.into_iter().collect();
    ordered.sort_by(|a, b| {
        let ta = a.creation_timestamp().map(|t| t.0);
        let tb = b.creation_timestamp().map(|t| t.0);
        // Objects without a timestamp (not yet stored) sort last.
        (ta.is_none(), ta, a.key()).cmp(&(tb.is_none(), tb, b.key()))
    });
    for f in &ordered {
        let key = f.key();
        for h in service_hosts(&key, cluster_domain) {
            claims.owners.insert(h, key.clone());
        }
    }
    for f in &ordered {
        let key = f.key();
        for raw in &f.spec.hosts {
            let Some(host) = normalize_host(raw) else {
                continue;
            };
            if is_reserved_host(&host) || !is_valid_hostname(&host) {
                continue; // refused by validation; never routed
            }
            match claims.owners.get(&host) {
                Some(owner) if *owner != key => claims
                    .conflicts
                    .entry(key.clone())
                    .or_default()
                    .push((host, owner.clone())),
                Some(_) => {}
                None => {
                    claims.owners.insert(host, key.clone());
                }
            }
        }
    }
    claims
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{FunctionSpec, PodTemplate};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn function(ns: &str, name: &str, age_secs: i64, hosts: &[&str]) -> Function {
        let mut f = Function::new(
            name,
            FunctionSpec {
                template: Some(PodTemplate::default()),
                hosts: hosts.iter().map(|h| h.to_string()).collect(),
                ..FunctionSpec::default()
            },
        );
        f.metadata.namespace = Some(ns.into());
        f.metadata.creation_timestamp = Some(Time(
            jiff::Timestamp::from_second(1_700_000_000 - age_secs).unwrap(),
        ));
        f
    }

    #[test]
    fn host_header_normalisation() {
        assert_eq!(
            normalize_host("Hello.Default:8080").as_deref(),
            Some("hello.default")
        );
        assert_eq!(
            normalize_host("hello.default.svc.cluster.local.").as_deref(),
            Some("hello.default.svc.cluster.local")
        );
        assert_eq!(normalize_host("[::1]:80").as_deref(), Some("::1"));
        assert_eq!(normalize_host("a.b..").as_deref(), Some("a.b"));
        assert_eq!(normalize_host("."), None);
        assert_eq!(normalize_host(&"a".repeat(254)), None);
        assert_eq!(normalize_host("a:b"), None);
        assert_eq!(normalize_host(""), None);
        // The common cases cost no allocation.
        assert!(matches!(
            normalize_host_ref("hello-1.default"),
            Some(Cow::Borrowed("hello-1.default"))
        ));
        assert!(matches!(
            normalize_host_ref("hello.default:80"),
            Some(Cow::Borrowed("hello.default"))
        ));
        assert!(matches!(
            normalize_host_ref("Hello.default"),
            Some(Cow::Owned(_))
        ));
    }

    #[test]
    fn service_names_route_to_their_function() {
        let a = function("default", "hello", 10, &[]);
        let claims = claim_hosts([&a], "cluster.local");
        for h in [
            "hello.default",
            "hello.default.svc",
            "hello.default.svc.cluster.local",
        ] {
            assert_eq!(claims.owners.get(h), Some(&a.key()), "{h}");
        }
    }

    #[test]
    fn older_function_keeps_a_contested_host() {
        let old = function("team-a", "old", 100, &["api.example.com"]);
        let new = function("team-b", "new", 5, &["api.example.com"]);
        let claims = claim_hosts([&new, &old], "cluster.local");
        assert_eq!(claims.owners.get("api.example.com"), Some(&old.key()));
        assert_eq!(
            claims.conflicts.get(&new.key()),
            Some(&vec![("api.example.com".to_string(), old.key())])
        );
        assert!(!claims.conflicts.contains_key(&old.key()));
    }

    #[test]
    fn a_function_cannot_take_another_namespaces_service_name() {
        let victim = function("prod", "db", 5, &[]);
        let thief = function("dev", "x", 100, &["db.prod.svc.cluster.local", "db.prod"]);
        let claims = claim_hosts([&thief, &victim], "cluster.local");
        assert_eq!(
            claims.owners.get("db.prod.svc.cluster.local"),
            Some(&victim.key())
        );
        // `db.prod` has the two-label form of a service name: it stays the victim's.
        assert_eq!(claims.owners.get("db.prod"), Some(&victim.key()));
    }

    #[test]
    fn reserved_and_valid_names() {
        assert!(is_reserved_host("a.b.svc"));
        assert!(is_reserved_host("a.b.svc.cluster.local"));
        assert!(!is_reserved_host("api.example.com"));
        assert!(is_valid_hostname("api.example.com"));
        assert!(!is_valid_hostname("-bad.example.com"));
        assert!(!is_valid_hostname("UPPER.example.com"));
    }
}
