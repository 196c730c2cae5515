//! Who may do what in which namespace: the one namespace decision, as a pure function.
//!
//! [`decide`] takes the caller's [`Identity`], the namespace the request names (header,
//! node metadata, or none), the [`Operation`] and the [`Policy`], and returns the namespace
//! the request acts in, or why it is [`Denied`]. Every entry point (unary RPCs, ADS views,
//! CSDS) calls it; nothing else decides.
//!
//! The rule: an authenticated client acts in its own namespace (from its SPIFFE ID or its
//! token's entry), and in another one only when a [`Grant`] of the policy names its
//! identity, that namespace and the operation. An anonymous client is accepted only when
//! the server has no authentication configured, and then keeps the behaviour of a
//! development server: the namespace it names, else the default.

use std::{fmt, path::Path};

use serde::Deserialize;

use super::identity::Identity;

/// What a request does, as the policy sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Operation {
    /// `Publish` of metadata or a definition.
    Publish,
    /// `Get`.
    Get,
    /// `List`.
    List,
    /// `Delete`.
    Delete,
    /// An ADS subscription (SotW or Delta), by name or wildcard.
    Subscribe,
    /// Reading other clients' sync status (CSDS).
    Status,
}

impl Operation {
    /// Every operation.
    pub const ALL: [Operation; 6] = [
        Operation::Publish,
        Operation::Get,
        Operation::List,
        Operation::Delete,
        Operation::Subscribe,
        Operation::Status,
    ];

    /// A short stable label (`publish`, `get`, ...), for metrics, logs and policy files.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Publish => "publish",
            Operation::Get => "get",
            Operation::List => "list",
            Operation::Delete => "delete",
            Operation::Subscribe => "subscribe",
            Operation::Status => "status",
        }
    }

    /// Whether the operation only reads (`read` in a policy file grants exactly these).
    pub fn is_read(self) -> bool {
        match self {
            Operation::Get | Operation::List | Operation::Subscribe | Operation::Status => true,
            Operation::Publish | Operation::Delete => false,
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a request is refused. Its message never contains the namespace or identity asked
/// about, so a denial reveals nothing of what exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// No identity, and the server requires one (`UNAUTHENTICATED`). Retrying with a client
    /// certificate or a bearer token helps.
    #[error("authentication required: present a client certificate or a bearer token")]
    Unauthenticated,
    /// The credentials presented were not accepted (`UNAUTHENTICATED`): an unknown token,
    /// a certificate without a SPIFFE workload ID.
    #[error("credentials not accepted")]
    BadCredentials,
    /// The identity may not do this in that namespace (`PERMISSION_DENIED`). Retrying does
    /// not help without a policy change.
    #[error("permission denied for this operation in the requested namespace")]
    PermissionDenied,
}

impl Denied {
    /// The gRPC code of the denial (`crate::status` maps every other error).
    pub fn code(self) -> tonic::Code {
        match self {
            Denied::Unauthenticated | Denied::BadCredentials => tonic::Code::Unauthenticated,
            Denied::PermissionDenied => tonic::Code::PermissionDenied,
        }
    }
}

impl Denied {
    /// A short stable label, for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Denied::Unauthenticated => "unauthenticated",
            Denied::BadCredentials => "bad_credentials",
            Denied::PermissionDenied => "permission_denied",
        }
    }
}

/// The policy file: grants beyond a client's own namespace.
///
/// ```toml
/// [[grant]]
/// identities = ["spiffe://cluster.local/ns/ops/sa/*", "token:dashboard"]
/// namespaces = ["*"]
/// operations = ["read"]
/// ```
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// The grants; none by default, so every client is confined to its own namespace.
    #[serde(default, rename = "grant")]
    pub grants: Vec<Grant>,
}

/// One grant: these identities may do these operations in these namespaces.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    /// Principals (`spiffe://...` or `token:<name>`); a trailing `*` matches any suffix.
    pub identities: Vec<String>,
    /// Namespaces; `*` is every namespace, a trailing `*` matches any suffix.
    pub namespaces: Vec<String>,
    /// Operation labels (`publish`, `get`, `list`, `delete`, `subscribe`, `status`), or
    /// `read` (get, list, subscribe, status), `write` (publish, delete), `*` (all).
    pub operations: Vec<String>,
}

/// Why a policy file was refused.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file could not be read.
    #[error("reading the policy file {path}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid policy TOML.
    #[error("parsing the policy file {path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// A grant names an unknown operation.
    #[error("unknown operation {0:?} in the policy file")]
    UnknownOperation(String),
}

impl Policy {
    /// Parses policy TOML and checks every operation label.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        let policy: Policy = toml::from_str(text).map_err(|e| e.to_string())?;
        for grant in &policy.grants {
            for operation in &grant.operations {
                if !matches!(operation.as_str(), "read" | "write" | "*")
                    && !Operation::ALL.iter().any(|o| o.as_str() == operation)
                {
                    return Err(PolicyError::UnknownOperation(operation.clone()).to_string());
                }
            }
        }
        Ok(policy)
    }

    /// Reads and parses a policy file.
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml(&text).map_err(|message| PolicyError::Parse {
            path: path.display().to_string(),
            message,
        })
    }

    /// Whether some grant lets `principal` do `operation` in `namespace`.
    pub fn allows(&self, principal: &str, namespace: &str, operation: Operation) -> bool {
        self.grants.iter().any(|grant| {
            grant.identities.iter().any(|p| matches(p, principal))
                && grant.namespaces.iter().any(|n| matches(n, namespace))
                && grant.operations.iter().any(|o| match o.as_str() {
                    "*" => true,
                    "read" => operation.is_read(),
                    "write" => !operation.is_read(),
                    label => label == operation.as_str(),
                })
        })
    }
}

/// `pattern` equals `value`, or ends in `*` and `value` starts with what precedes it.
fn matches(pattern: &str, value: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => value.starts_with(prefix),
        None => pattern == value,
    }
}

/// The namespace a request acts in, or why it may not.
///
/// - `identity`: who the transport and the token layer say the caller is.
/// - `requested`: the namespace the request names (header, node metadata), already checked
///   to be a well-formed namespace; `None` when it names none.
/// - `auth_required`: whether the server has authentication configured; then anonymous
///   callers are refused.
/// - `default_namespace`: where an anonymous caller on a development server lands.
pub fn decide(
    identity: &Identity,
    requested: Option<&str>,
    operation: Operation,
    policy: &Policy,
    auth_required: bool,
    default_namespace: &str,
) -> Result<String, Denied> {
    match identity {
        Identity::Anonymous if auth_required => Err(Denied::Unauthenticated),
        Identity::Anonymous => Ok(requested.unwrap_or(default_namespace).to_string()),
        Identity::Rejected => Err(Denied::BadCredentials),
        Identity::Workload(workload) => {
            let target = requested.unwrap_or(&workload.namespace);
            if target == workload.namespace || policy.allows(&workload.principal, target, operation)
            {
                Ok(target.to_string())
            } else {
                Err(Denied::PermissionDenied)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::security::identity::Workload;

    fn policy() -> Policy {
        Policy::from_toml(
            r#"
            [[grant]]
            identities = ["spiffe://td/ns/ops/sa/*"]
            namespaces = ["*"]
            operations = ["read"]

            [[grant]]
            identities = ["token:deployer"]
            namespaces = ["team-*"]
            operations = ["publish"]
            "#,
        )
        .unwrap()
    }

    fn spiffe(ns: &str, sa: &str) -> Identity {
        Identity::Workload(Workload::spiffe("td", ns, sa))
    }

    #[test]
    fn decision_table() {
        use Operation::*;
        let deployer = Identity::Workload(Workload::token("deployer", "ci"));
        let ok = |ns: &str| Ok::<String, Denied>(ns.to_string());
        type Case<'a> = (
            Identity,
            Option<&'a str>,
            Operation,
            bool,
            Result<String, Denied>,
        );
        let cases: Vec<Case<'_>> = vec![
            // Development server: anonymous callers pick their namespace.
            (Identity::Anonymous, None, Publish, false, ok("default")),
            (Identity::Anonymous, Some("a"), Delete, false, ok("a")),
            (Identity::Anonymous, Some("b"), Subscribe, false, ok("b")),
            // Authentication configured: anonymous callers are refused.
            (
                Identity::Anonymous,
                None,
                Get,
                true,
                Err(Denied::Unauthenticated),
            ),
            (
                Identity::Anonymous,
                Some("a"),
                Status,
                true,
                Err(Denied::Unauthenticated),
            ),
            (
                Identity::Rejected,
                None,
                Get,
                false,
                Err(Denied::BadCredentials),
            ),
            // Own namespace, implicit or named: every operation.
            (spiffe("a", "app"), None, Publish, true, ok("a")),
            (spiffe("a", "app"), Some("a"), Delete, true, ok("a")),
            (spiffe("a", "app"), Some("a"), Subscribe, true, ok("a")),
            // Another namespace without a grant: denied, for reads and writes.
            (
                spiffe("a", "app"),
                Some("b"),
                Get,
                true,
                Err(Denied::PermissionDenied),
            ),
            (
                spiffe("a", "app"),
                Some("b"),
                Subscribe,
                true,
                Err(Denied::PermissionDenied),
            ),
            (
                spiffe("a", "app"),
                Some("b"),
                Publish,
                true,
                Err(Denied::PermissionDenied),
            ),
            // Operators: cluster-wide read, no write.
            (spiffe("ops", "dash"), Some("b"), List, true, ok("b")),
            (spiffe("ops", "dash"), Some("b"), Status, true, ok("b")),
            (spiffe("ops", "dash"), Some("b"), Subscribe, true, ok("b")),
            (
                spiffe("ops", "dash"),
                Some("b"),
                Delete,
                true,
                Err(Denied::PermissionDenied),
            ),
            // The trust domain is part of the principal.
            (
                Identity::Workload(Workload::spiffe("other", "ops", "dash")),
                Some("b"),
                Get,
                true,
                Err(Denied::PermissionDenied),
            ),
            // A token grant scoped by namespace prefix and operation.
            (
                deployer.clone(),
                Some("team-x"),
                Publish,
                true,
                ok("team-x"),
            ),
            (
                deployer.clone(),
                Some("team-x"),
                Get,
                true,
                Err(Denied::PermissionDenied),
            ),
            (
                deployer.clone(),
                Some("prod"),
                Publish,
                true,
                Err(Denied::PermissionDenied),
            ),
            (deployer, None, Get, true, ok("ci")),
        ];
        let policy = policy();
        for (identity, requested, operation, auth_required, expected) in cases {
            assert_eq!(
                decide(
                    &identity,
                    requested,
                    operation,
                    &policy,
                    auth_required,
                    "default"
                ),
                expected,
                "{identity:?} {requested:?} {operation}"
            );
        }
    }

    #[test]
    fn unknown_operations_and_fields_are_refused() {
        assert!(
            Policy::from_toml(
                "[[grant]]\nidentities=[\"x\"]\nnamespaces=[\"*\"]\noperations=[\"rm\"]"
            )
            .is_err()
        );
        assert!(Policy::from_toml("[[grant]]\nidentity=\"x\"").is_err());
        assert_eq!(Policy::from_toml("").unwrap(), Policy::default());
    }

    #[test]
    fn denials_name_nothing() {
        for denied in [
            Denied::Unauthenticated,
            Denied::BadCredentials,
            Denied::PermissionDenied,
        ] {
            assert!(!denied.to_string().contains("spiffe"));
        }
    }
}
