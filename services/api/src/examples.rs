//! The bundled sample projections: `orders`, one row per order, and
//! `customer-stats`, an aggregate per customer over the same events. What
//! `eventplane dev` serves, what the README shows, and the fixtures the
//! crates' tests share.

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

/// `services/api/examples/customer_stats.yaml`, the aggregate sample.
pub const CUSTOMER_STATS: &str = include_str!("../examples/customer_stats.yaml");

/// The aggregate sample manifest, parsed.
pub fn customer_stats_manifest() -> ProjectionManifest {
    load_manifests(CUSTOMER_STATS)
        .expect("the bundled sample is valid")
        .remove(0)
}
