//! Generated protobuf and gRPC code. No logic lives here.
#![allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]

/// `pixiu.pkg.metadata`: the seed's services and the xDS resource messages.
pub mod metadata {
    tonic::include_proto!("pixiu.pkg.metadata");
}

/// `pixiu.api.v1`: Pixiu's xDS model (listeners and clusters carried by ECDS).
pub mod pixiu_api {
    tonic::include_proto!("pixiu.api.v1");
}

/// `dubbo.networking.v1alpha1`: upstream Pixiu's metadata and service-name mapping APIs.
pub mod dubbo_networking {
    tonic::include_proto!("dubbo.networking.v1alpha1");
}

/// The encoded `FileDescriptorSet` of every proto in `proto/`, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("pixiu_descriptor");

/// Type URL of the `Metadata` xDS resource.
pub const METADATA_TYPE_URL: &str = "type.googleapis.com/pixiu.pkg.metadata.Metadata";
/// Type URL of the `ServiceDefinition` xDS resource.
pub const SERVICE_DEFINITION_TYPE_URL: &str =
    "type.googleapis.com/pixiu.pkg.metadata.ServiceDefinition";

/// Type URL of the `ServiceMapping` xDS resource.
pub const SERVICE_MAPPING_TYPE_URL: &str = "type.googleapis.com/pixiu.pkg.metadata.ServiceMapping";
/// Type URL of upstream's service-name mapping resource (no `type.googleapis.com/` prefix).
pub const UPSTREAM_MAPPING_TYPE_URL: &str = "dubbo.networking.v1alpha1.v1.servicenamemapping";

#[cfg(test)]
mod tests {
    use prost::Message;

    #[test]
    fn descriptor_set_decodes_and_lists_the_seed_services() {
        let set = prost_types::FileDescriptorSet::decode(super::FILE_DESCRIPTOR_SET).unwrap();
        let services: Vec<_> = set
            .file
            .iter()
            .flat_map(|f| f.service.iter().map(|s| s.name().to_string()))
            .collect();
        assert!(services.contains(&"MetadataService".to_string()));
        assert!(services.contains(&"ServiceDefinitionService".to_string()));
        assert!(services.contains(&"ServiceMappingService".to_string()));
        assert!(services.contains(&"ServiceNameMappingService".to_string()));
    }
}
