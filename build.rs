//! Compiles `proto/` into Rust (tonic + prost) and a descriptor set for server reflection.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = [
        "proto/pixiu/pkg/metadata/metadata.proto",
        "proto/pixiu/pkg/metadata/mapping.proto",
        "proto/dubbo/networking/v1alpha1/service_name_mapping.proto",
        "proto/pixiu/api/v1/extension.proto",
        "proto/dubbo/networking/v1alpha1/service_metadata.proto",
    ];
    tonic_prost_build::configure()
        // Ordered maps encode deterministically, so versions hashed from the bytes are stable.
        .btree_map(".pixiu.api.v1")
        .file_descriptor_set_path(out_dir.join("pixiu_descriptor.bin"))
        .compile_protos(&protos, &["proto"])?;
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    Ok(())
}
