//! The trace context of an HTTP request: the W3C `traceparent` and
//! `tracestate` headers, taken without copying the rest of the headers,
//! and the span a command or query runs in.

use std::convert::Infallible;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue};
use eventplane_telemetry::trace::{self, Carrier};
use tracing::Span;

const TRACESTATE: &str = "tracestate";

/// A request's trace context headers.
#[derive(Default)]
pub struct Incoming {
    traceparent: Option<HeaderValue>,
    tracestate: Option<HeaderValue>,
}

impl Incoming {
    pub fn from_headers(headers: &HeaderMap) -> Self {
        Incoming {
            traceparent: headers.get(trace::TRACEPARENT).cloned(),
            tracestate: headers.get(TRACESTATE).cloned(),
        }
    }

    /// The span `make` creates, in the request's trace, when spans are
    /// exported or the request belongs to a trace; else no span at all,
    /// which keeps the cache-hit path free of span bookkeeping. Returns the
    /// span and the `traceparent` of the work it covers.
    pub fn span(&self, make: impl FnOnce() -> Span) -> (Span, Option<String>) {
        if !trace::exporting() && self.traceparent.is_none() {
            return (Span::none(), None);
        }
        let span = make();
        let traceparent = trace::continue_remote(&span, &trace::extract(self));
        (span, traceparent)
    }
}

/// A span under `parent`, or none when `parent` is none: work inside a
/// request that is not traced adds no span of its own.
pub fn child(parent: &Span, make: impl FnOnce() -> Span) -> Span {
    if parent.is_none() {
        Span::none()
    } else {
        parent.in_scope(make)
    }
}

impl Carrier for Incoming {
    fn get(&self, key: &str) -> Option<&str> {
        let value = match key {
            trace::TRACEPARENT => self.traceparent.as_ref(),
            TRACESTATE => self.tracestate.as_ref(),
            _ => None,
        };
        value.and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        vec![trace::TRACEPARENT, TRACESTATE]
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Incoming {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Infallible> {
        Ok(Incoming::from_headers(&parts.headers))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_without_trace_context_gets_no_span_while_nothing_exports() {
        let (span, traceparent) = Incoming::default().span(|| tracing::info_span!("query.handle"));
        assert!(span.is_none());
        assert_eq!(traceparent, None);
    }

    #[test]
    fn a_request_traceparent_is_passed_on_even_when_nothing_exports() {
        let mut headers = HeaderMap::new();
        let sent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        headers.insert(trace::TRACEPARENT, HeaderValue::from_static(sent));
        let (_, traceparent) =
            Incoming::from_headers(&headers).span(|| tracing::info_span!("command.handle"));
        assert_eq!(traceparent.as_deref(), Some(sent));
    }

    #[test]
    fn a_malformed_traceparent_is_dropped() {
        let mut headers = HeaderMap::new();
        headers.insert(trace::TRACEPARENT, HeaderValue::from_static("00-zz-yy-01"));
        let (_, traceparent) =
            Incoming::from_headers(&headers).span(|| tracing::info_span!("command.handle"));
        assert_eq!(traceparent, None);
    }
}
