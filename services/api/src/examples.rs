//! The bundled sample projection, `orders`: what `eventplane dev` serves,
//! what the README shows, and the fixture the crates' tests share.

use crate::types::{ProjectionManifest, ProjectionSpec, load_manifests};

/// `services/api/examples/orders.yaml`, the sample manifest.
pub const ORDERS: &str = include_str!("../examples/orders.yaml");

/// The sample manifest, parsed.
pub fn orders_manifest() -> ProjectionManifest {
    load_manifests(ORDERS)
        .expect("the bundled sample is valid")
        .remove(0)
}

/// The sample's spec.
pub fn orders() -> ProjectionSpec {
    orders_manifest().spec
}
