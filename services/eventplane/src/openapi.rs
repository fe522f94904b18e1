//! The OpenAPI document of the command and query APIs, made from the
//! handlers' own annotations (so it cannot drift from the routes), served
//! at `/openapi.json` and checked in as `services/eventplane/openapi.json`.

use utoipa::openapi::OpenApi;

pub fn document() -> OpenApi {
    let (_, mut document) = crate::command::api().split_for_parts();
    let (_, queries) = crate::query::api().split_for_parts();
    document.merge(queries);
    document.info.title = "Eventplane".into();
    document.info.version = env!("CARGO_PKG_VERSION").into();
    document.info.description = Some(
        "Append events to streams; read declared projections. Every error is \
         `{\"error\": {\"code\", \"message\"}}`. With authentication on, every \
         request carries `Authorization: Bearer <JWT>`."
            .into(),
    );
    document.info.license = Some(utoipa::openapi::License::new("Apache-2.0"));
    document.info.contact = None;
    document
}

/// The document as the checked-in file holds it.
pub fn text() -> String {
    let mut text = document()
        .to_pretty_json()
        .expect("the document serializes");
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHECKED_IN: &str = include_str!("../openapi.json");

    /// The checked-in document is the generated one; set
    /// `EVENTPLANE_WRITE_OPENAPI=1` to write it anew after an API change.
    #[test]
    fn the_checked_in_document_is_current() {
        let generated = text();
        if std::env::var_os("EVENTPLANE_WRITE_OPENAPI").is_some() {
            std::fs::write(
                concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json"),
                &generated,
            )
            .expect("openapi.json is writable");
            return;
        }
        assert!(
            generated == CHECKED_IN,
            "services/eventplane/openapi.json is stale: run \
             EVENTPLANE_WRITE_OPENAPI=1 cargo test -p eventplane --lib openapi"
        );
    }

    #[test]
    fn every_route_is_described() {
        let document = document();
        let paths: Vec<&String> = document.paths.paths.keys().collect();
        for path in [
            "/v1/streams/{stream}/events",
            "/v1/streams/{stream}",
            "/v1/jobs/{id}",
            "/v1/projections",
            "/v1/projections/{name}/status",
            "/v1/projections/{name}/rows/{key}",
            "/v1/projections/{name}/queries/{query}",
            "/v1/projections/{name}/dead-letters",
            "/v1/projections/{name}/dead-letters/replay",
            "/v1/subscriptions/events",
        ] {
            assert!(
                paths.iter().any(|p| p.as_str() == path),
                "{path} in {paths:?}"
            );
        }
        let schemas = &document.components.as_ref().unwrap().schemas;
        for schema in [
            "AppendBody",
            "AppendResult",
            "ErrorResponse",
            "ExpectedVersion",
        ] {
            assert!(schemas.contains_key(schema), "{schema}");
        }
    }
}
