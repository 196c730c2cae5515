//! The custom resources, one per record [`Kind`], and the mapping between them and records.
//!
//! The Rust types are the source of the CRD YAML (`pixiu-metadata crds`, `deploy/crds.yaml`).
//! Everything kind-specific in the Kubernetes backend is in this file: a new kind needs a new
//! `#[derive(CustomResource)]` type and one arm in each `match` below.
//!
//! Every object carries two things besides its spec:
//! - the annotation [`REFRESHED_AT`]: the lease stamp, RFC 3339 in UTC with milliseconds
//!   (`2026-12-01T18:00:00.123Z`). An object without it (made with kubectl) counts as
//!   refreshed at its `creationTimestamp`.
//! - for metadata, the label [`APPLICATION_LABEL`]: the application, encoded as a label value
//!   (see [`names::label_value`]), so `kubectl get md -l` selects by application.

use std::collections::BTreeMap;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{
    CustomResourceExt,
    core::{ApiResource, DynamicObject, ObjectMeta},
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::names;
use crate::model::{Key, Kind};

/// The annotation holding a record's lease stamp.
pub const REFRESHED_AT: &str = "pixiu.dubbo.io/refreshed-at";

/// The label holding a metadata record's application (encoded).
pub const APPLICATION_LABEL: &str = "metadata.networking.dubbo.io/application";

/// The label every object written by pixiu-metadata carries.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";

/// The value of [`MANAGED_BY_LABEL`].
pub const MANAGED_BY: &str = "pixiu-metadata";

/// One application revision's metadata (`kubectl get md`).
#[derive(kube::CustomResource, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, JsonSchema)]
#[kube(
    group = "metadata.networking.dubbo.io",
    version = "v1",
    kind = "Metadata",
    singular = "metadata",
    plural = "metadata",
    shortname = "md",
    namespaced,
    doc = "Metadata of one revision of a Dubbo application, as published to pixiu-metadata.",
    printcolumn = r#"{"name": "Application", "type": "string", "jsonPath": ".spec.application"}"#,
    printcolumn = r#"{"name": "Revision", "type": "string", "jsonPath": ".spec.revision"}"#,
    printcolumn = r#"{"name": "Last Refresh", "type": "date", "jsonPath": ".metadata.annotations.pixiu\\.dubbo\\.io/refreshed-at"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct MetadataSpec {
    /// The application name, exactly as published.
    pub application: String,
    /// The revision, exactly as published.
    pub revision: String,
    /// The raw metadata, byte for byte as published. Absent or null reads as empty: an
    /// API server may store an empty string as null (kube-apiserver 1.20 as built from
    /// Debian's source does), so the schema allows it.
    #[serde(default)]
    pub metadata_info: Option<String>,
}

/// One service definition (`kubectl get sd`).
#[derive(kube::CustomResource, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, JsonSchema)]
#[kube(
    group = "service-definition.networking.dubbo.io",
    version = "v1",
    kind = "ServiceDefinition",
    singular = "servicedefinition",
    plural = "servicedefinitions",
    shortname = "sd",
    namespaced,
    doc = "A Dubbo service definition, as published to pixiu-metadata.",
    printcolumn = r#"{"name": "Identifier", "type": "string", "jsonPath": ".spec.identifier"}"#,
    printcolumn = r#"{"name": "Last Refresh", "type": "date", "jsonPath": ".metadata.annotations.pixiu\\.dubbo\\.io/refreshed-at"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ServiceDefinitionSpec {
    /// The service identifier, exactly as published.
    pub identifier: String,
    /// The raw definition, byte for byte as published. Absent or null reads as empty, as
    /// `metadataInfo`.
    #[serde(default)]
    pub definition: Option<String>,
}

/// One service-name mapping: an application providing an interface (`kubectl get sm`).
#[derive(kube::CustomResource, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, JsonSchema)]
#[kube(
    group = "service-mapping.networking.dubbo.io",
    version = "v1",
    kind = "ServiceMapping",
    singular = "servicemapping",
    plural = "servicemappings",
    shortname = "sm",
    namespaced,
    doc = "A Dubbo service-name mapping: one application that provides one interface.",
    printcolumn = r#"{"name": "Interface", "type": "string", "jsonPath": ".spec.interface"}"#,
    printcolumn = r#"{"name": "Application", "type": "string", "jsonPath": ".spec.application"}"#,
    printcolumn = r#"{"name": "Last Refresh", "type": "date", "jsonPath": ".metadata.annotations.pixiu\\.dubbo\\.io/refreshed-at"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ServiceMappingSpec {
    /// The interface, exactly as registered.
    pub interface: String,
    /// The providing application, exactly as registered.
    pub application: String,
}

/// The CRD of every kind, in [`Kind::ALL`] order.
pub fn crds() -> Vec<CustomResourceDefinition> {
    Kind::ALL
        .into_iter()
        .map(|kind| match kind {
            Kind::Metadata => Metadata::crd(),
            Kind::Definition => ServiceDefinition::crd(),
            Kind::Mapping => ServiceMapping::crd(),
        })
        .collect()
}

/// Every CRD as one multi-document YAML stream (what `pixiu-metadata crds` prints).
pub fn crds_yaml() -> String {
    let mut out = String::from(
        "# The custom resources of pixiu-metadata's Kubernetes store.\n\
         # Generated by `pixiu-metadata crds` from the Rust types; do not edit.\n",
    );
    for crd in crds() {
        out.push_str("---\n");
        out.push_str(&serde_norway::to_string(&crd).expect("a CRD serializes to YAML"));
    }
    out
}

/// The API resource (group, version, plural) of a kind.
pub(crate) fn api_resource(kind: Kind) -> ApiResource {
    match kind {
        Kind::Metadata => ApiResource::erase::<Metadata>(&()),
        Kind::Definition => ApiResource::erase::<ServiceDefinition>(&()),
        Kind::Mapping => ApiResource::erase::<ServiceMapping>(&()),
    }
}

/// What an object says about its record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Parsed {
    /// The record's name (`<application>/<revision>` or the identifier).
    pub(crate) name: String,
    /// The raw value.
    pub(crate) value: String,
}

/// Reads the record out of an object's spec; `None` (with the reason) when the spec is not one.
pub(crate) fn parse_spec(kind: Kind, object: &DynamicObject) -> Result<Parsed, String> {
    let spec = object
        .data
        .get("spec")
        .cloned()
        .ok_or_else(|| "the object has no spec".to_string())?;
    let invalid = |e: serde_json::Error| format!("the spec is not a {kind} spec: {e}");
    match kind {
        Kind::Metadata => {
            let spec: MetadataSpec = serde_json::from_value(spec).map_err(invalid)?;
            let key = Key::metadata("", &spec.application, &spec.revision);
            crate::model::check_application(&spec.application).map_err(|e| e.to_string())?;
            crate::model::check_name("revision", &spec.revision).map_err(|e| e.to_string())?;
            Ok(Parsed {
                name: key.name,
                value: spec.metadata_info.unwrap_or_default(),
            })
        }
        Kind::Definition => {
            let spec: ServiceDefinitionSpec = serde_json::from_value(spec).map_err(invalid)?;
            crate::model::check_name("identifier", &spec.identifier).map_err(|e| e.to_string())?;
            Ok(Parsed {
                name: spec.identifier,
                value: spec.definition.unwrap_or_default(),
            })
        }
        Kind::Mapping => {
            let spec: ServiceMappingSpec = serde_json::from_value(spec).map_err(invalid)?;
            crate::model::check_interface(&spec.interface).map_err(|e| e.to_string())?;
            crate::model::check_application(&spec.application).map_err(|e| e.to_string())?;
            Ok(Parsed {
                name: crate::model::mapping_name(&spec.interface, &spec.application),
                value: String::new(),
            })
        }
    }
}

/// The spec of `key`'s record holding `value`, and the labels that go with it.
pub(crate) fn spec_of(key: &Key, value: &str) -> (serde_json::Value, BTreeMap<String, String>) {
    let mut labels = BTreeMap::from([(MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string())]);
    let spec = match key.kind {
        Kind::Metadata => {
            let (application, revision) = key
                .application_revision()
                .unwrap_or((key.name.as_str(), ""));
            labels.insert(
                APPLICATION_LABEL.to_string(),
                names::label_value(application),
            );
            serde_json::to_value(MetadataSpec {
                application: application.to_string(),
                revision: revision.to_string(),
                metadata_info: Some(value.to_string()),
            })
        }
        Kind::Definition => serde_json::to_value(ServiceDefinitionSpec {
            identifier: key.name.clone(),
            definition: Some(value.to_string()),
        }),
        // The key says everything; a mapping's value is always empty.
        Kind::Mapping => {
            let (interface, application) = key
                .interface_application()
                .unwrap_or((key.name.as_str(), ""));
            labels.insert(
                APPLICATION_LABEL.to_string(),
                names::label_value(application),
            );
            serde_json::to_value(ServiceMappingSpec {
                interface: interface.to_string(),
                application: application.to_string(),
            })
        }
    };
    (spec.expect("a spec of strings serializes to JSON"), labels)
}

/// An object for `key` holding `value`, refreshed at `refreshed_at_ms`, on top of `meta`
/// (the current object's metadata when replacing, so labels and annotations others set stay).
pub(crate) fn object_of(
    key: &Key,
    value: &str,
    refreshed_at_ms: u64,
    mut meta: ObjectMeta,
) -> DynamicObject {
    let (spec, labels) = spec_of(key, value);
    meta.labels.get_or_insert_default().extend(labels);
    meta.annotations
        .get_or_insert_default()
        .insert(REFRESHED_AT.to_string(), format_stamp(refreshed_at_ms));
    meta.managed_fields = None;
    let mut object = DynamicObject::new("", &api_resource(key.kind));
    object.metadata = meta;
    object.data = serde_json::json!({ "spec": spec });
    object
}

/// A lease stamp as RFC 3339 in UTC with milliseconds.
pub(crate) fn format_stamp(ms: u64) -> String {
    let ms = i64::try_from(ms).unwrap_or(i64::MAX);
    match k8s_openapi::jiff::Timestamp::from_millisecond(ms) {
        Ok(ts) => format!("{ts:.3}"),
        Err(_) => k8s_openapi::jiff::Timestamp::MAX.to_string(),
    }
}

/// Parses a lease stamp written by [`format_stamp`] (or any RFC 3339 time).
pub(crate) fn parse_stamp(stamp: &str) -> Option<u64> {
    let ts: k8s_openapi::jiff::Timestamp = stamp.parse().ok()?;
    u64::try_from(ts.as_millisecond()).ok()
}

/// The lease stamp of an object: its annotation, else its creation time, else 0.
pub(crate) fn refreshed_at_ms(meta: &ObjectMeta) -> u64 {
    meta.annotations
        .as_ref()
        .and_then(|a| a.get(REFRESHED_AT))
        .and_then(|s| parse_stamp(s))
        .or_else(|| {
            meta.creation_timestamp
                .as_ref()
                .and_then(|t| u64::try_from(t.0.as_millisecond()).ok())
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_round_trip() {
        for ms in [0, 1, 1_767_225_600_123, 4_102_444_800_000] {
            assert_eq!(
                parse_stamp(&format_stamp(ms)),
                Some(ms),
                "{}",
                format_stamp(ms)
            );
        }
        assert_eq!(format_stamp(1_767_225_600_123), "2026-01-01T00:00:00.123Z");
        assert_eq!(format_stamp(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(parse_stamp("yesterday"), None);
    }

    #[test]
    fn specs_round_trip() {
        let md = Key::metadata("ns", "Greeter App", "a/b");
        let object = object_of(&md, "raw\n", 5, ObjectMeta::default());
        assert_eq!(
            parse_spec(Kind::Metadata, &object).unwrap(),
            Parsed {
                name: "Greeter App/a/b".into(),
                value: "raw\n".into()
            }
        );
        let labels = object.metadata.labels.clone().unwrap();
        assert_eq!(labels[APPLICATION_LABEL], names::label_value("Greeter App"));
        assert_eq!(refreshed_at_ms(&object.metadata), 5);

        let def = Key::definition("ns", "org.example.Svc:1.0");
        let object = object_of(&def, "{}", 5, ObjectMeta::default());
        assert_eq!(
            parse_spec(Kind::Definition, &object).unwrap().name,
            def.name
        );
        assert!(parse_spec(Kind::Metadata, &object).is_err());

        let mapping = Key::mapping("ns", "org.apache.dubbo.Greeter", "greeter-app");
        let object = object_of(&mapping, "", 5, ObjectMeta::default());
        assert_eq!(
            parse_spec(Kind::Mapping, &object).unwrap(),
            Parsed {
                name: mapping.name.clone(),
                value: String::new()
            }
        );
    }

    #[test]
    fn crds_have_the_seed_names() {
        let crds = crds();
        let names: Vec<_> = crds
            .iter()
            .map(|c| c.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "metadata.metadata.networking.dubbo.io",
                "servicedefinitions.service-definition.networking.dubbo.io",
                "servicemappings.service-mapping.networking.dubbo.io"
            ]
        );
        assert_eq!(crds[0].spec.names.short_names, Some(vec!["md".to_string()]));
        assert_eq!(crds[1].spec.names.short_names, Some(vec!["sd".to_string()]));
        assert_eq!(crds[0].spec.scope, "Namespaced");
        let yaml = crds_yaml();
        assert!(yaml.contains("metadataInfo"), "{yaml}");
        assert!(yaml.contains("Last Refresh"));
    }
}
