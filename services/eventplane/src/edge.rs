//! The HTTP edge every request crosses before a handler: limits on the
//! request target and the headers, and answers for unknown routes and
//! methods, all as the JSON error body every other answer uses.
//!
//! Requests the HTTP parser itself cannot read (a malformed request line,
//! more than 100 headers, a head over hyper's buffer) are refused by it
//! with a bare status before they get here.

use axum::Router;
use axum::extract::Request;
use axum::http::{Method, Uri};
use axum::response::{IntoResponse, Response};
use tower::Layer as _;

use crate::api_error::ApiError;
use crate::gate::{Gate, Gated};

/// Longest request target (path and query) accepted.
pub const MAX_URI_BYTES: usize = 8 * 1024;
/// Most bytes of header names and values accepted in one request.
pub const MAX_HEADER_BYTES: usize = 32 * 1024;

/// A router with the edge around it, ready to serve
/// (`axum::ServiceExt::into_make_service`).
pub type Edge = Gated<Router, fn(&mut Request) -> Option<Response>>;

/// `router` with the edge around it. The gate wraps the router from the
/// outside rather than as a router layer, which would box the service and
/// its future for every request.
pub fn around(router: Router) -> Edge {
    let router = router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed);
    Gate::new(limits as fn(&mut Request) -> Option<Response>).layer(router)
}

/// The answer for a request over the limits, if it is.
fn limits(request: &mut Request) -> Option<Response> {
    let uri = request.uri();
    // The length `uri.to_string()` would have, without building it.
    let uri = uri.scheme_str().map_or(0, |s| s.len() + "://".len())
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path_and_query().map_or(0, |pq| pq.as_str().len());
    if uri > MAX_URI_BYTES {
        return Some(
            ApiError::UriTooLong {
                message: format!(
                    "the request target is {uri} bytes; at most {MAX_URI_BYTES} are accepted"
                ),
            }
            .into_response(),
        );
    }
    let headers: usize = request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum();
    if headers > MAX_HEADER_BYTES {
        return Some(
            ApiError::HeadersTooLarge {
                message: format!(
                    "the request headers are {headers} bytes; at most {MAX_HEADER_BYTES} are accepted"
                ),
            }
            .into_response(),
        );
    }
    None
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::not_found("route_not_found", format!("no route for {}", uri.path()))
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed {
        message: format!("{method} is not allowed on {}", uri.path()),
    }
}
