//! pixiu-metadata: a metadata control plane for Pixiu and Dubbo meshes.

pub mod model;
pub mod pb;
pub mod store;
