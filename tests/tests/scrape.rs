//! The operator's scaling reads the query pods' `/metrics`: it must
//! understand what the services really export.

use eventplane::metrics::{Metrics, QueryType};
use eventplane_operator::projection::scaling::scrape::parse_metrics;

#[test]
fn the_operator_reads_the_query_latency_the_services_export() {
    let metrics = Metrics::new();
    for _ in 0..3 {
        metrics.observe_query(QueryType::Row, 0.0015);
    }
    metrics.observe_query(QueryType::List, 0.02);
    let text = metrics.encode();
    // What the query pods serve as `application/openmetrics-text`.
    assert!(text.contains("# TYPE query_latency histogram"), "{text}");
    assert!(text.trim_end().ends_with("# EOF"), "{text}");
    let sample = parse_metrics(&text);
    assert_eq!(sample.count, 4.0);
    assert_eq!(sample.buckets.last(), Some(&(f64::INFINITY, 4.0)));
    let under_2ms = sample.buckets.iter().find(|b| b.0 >= 0.0016).unwrap();
    assert_eq!(under_2ms.1, 3.0);
    assert!(
        sample
            .buckets
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1)
    );
}
