//! End-to-end checks and the benchmark harness for Eventplane. The library
//! holds the harness so that its binaries stay thin.

pub mod bench;
