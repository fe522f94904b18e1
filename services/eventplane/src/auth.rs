//! Who may do what over the HTTP API. With a JWKS configured, every API
//! request carries `Authorization: Bearer <JWT>`: signed by a key of the
//! set (asymmetric algorithms only), unexpired, from the configured issuer
//! for the configured audience (with a clock leeway). Its scopes grant:
//!
//! - `append:<streams>`: appends to matching streams (and async job status);
//! - `read:<projection>`: rows, queries and status of a projection;
//! - `read-stream:<streams>`: a stream's events, and a subscription to
//!   the events of every stream under a prefix the pattern covers;
//! - `replay:<projection>`: replaying a projection's dead letters.
//!
//! A pattern is a name, `*`, or a prefix ending in `*` (`append:order-*`).
//! Scopes come from the `scope` claim (space-separated) or the `scp`
//! claim (a list). A missing or bad token answers 401, a scope that does
//! not grant the request 403. Without a JWKS every request may do
//! everything (`eventplane dev`). Metrics and health are served on the
//! admin listener and need no token.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use axum::extract::Request;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::api_error::ApiError;
use crate::gate::Gate;

#[derive(Clone, Debug)]
pub struct AuthConfig {
    /// A JWKS document (`{"keys": [...]}`); in a cluster, a file mounted
    /// from a Secret. Re-read when it changes, so keys can rotate.
    pub jwks: PathBuf,
    /// The `iss` tokens must carry, if set.
    pub issuer: Option<String>,
    /// The `aud` tokens must carry, if set.
    pub audience: Option<String>,
    /// Clock skew tolerated on `exp` and `nbf`.
    pub leeway: Duration,
}

/// How often the JWKS file is looked at for a change.
const JWKS_RECHECK: Duration = Duration::from_secs(10);

/// One scope's name pattern: exact, everything, or a prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pattern {
    Exact(String),
    Prefix(String),
}

impl Pattern {
    fn parse(s: &str) -> Self {
        match s.strip_suffix('*') {
            Some(prefix) => Pattern::Prefix(prefix.to_string()),
            None => Pattern::Exact(s.to_string()),
        }
    }

    fn matches(&self, name: &str) -> bool {
        match self {
            Pattern::Exact(exact) => exact == name,
            Pattern::Prefix(prefix) => name.starts_with(prefix.as_str()),
        }
    }

    /// Whether every name starting with `prefix` matches. A name pattern
    /// covers no prefix: longer names start with it too.
    fn covers(&self, prefix: &str) -> bool {
        match self {
            Pattern::Exact(_) => false,
            Pattern::Prefix(p) => prefix.starts_with(p.as_str()),
        }
    }
}

/// What a request is about to do.
#[derive(Clone, Copy, Debug)]
pub enum Access<'a> {
    Append(&'a str),
    ReadStream(&'a str),
    /// The events of every stream whose id starts with the prefix (`""`:
    /// every stream), as a subscription reads them.
    ReadStreamsUnder(&'a str),
    Read(&'a str),
    Replay(&'a str),
    /// Async job status: whoever may append somewhere.
    Jobs,
}

/// What the request's token grants; every request carries one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Grants {
    /// No JWKS is configured: everything.
    All,
    Scoped {
        subject: Option<String>,
        append: Vec<Pattern>,
        read: Vec<Pattern>,
        read_stream: Vec<Pattern>,
        replay: Vec<Pattern>,
    },
}

impl Grants {
    fn from_scopes<'a>(subject: Option<String>, scopes: impl Iterator<Item = &'a str>) -> Self {
        let (mut append, mut read, mut read_stream, mut replay) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for scope in scopes {
            if let Some(p) = scope.strip_prefix("append:") {
                append.push(Pattern::parse(p));
            } else if let Some(p) = scope.strip_prefix("replay:") {
                replay.push(Pattern::parse(p));
            } else if let Some(p) = scope.strip_prefix("read-stream:") {
                read_stream.push(Pattern::parse(p));
            } else if let Some(p) = scope.strip_prefix("read:") {
                read.push(Pattern::parse(p));
            }
        }
        Grants::Scoped {
            subject,
            append,
            read,
            read_stream,
            replay,
        }
    }

    pub fn allows(&self, access: Access<'_>) -> bool {
        let Grants::Scoped {
            append,
            read,
            read_stream,
            replay,
            ..
        } = self
        else {
            return true;
        };
        let any = |patterns: &[Pattern], name: &str| patterns.iter().any(|p| p.matches(name));
        match access {
            Access::Append(stream) => any(append, stream),
            Access::ReadStream(stream) => any(read_stream, stream),
            Access::ReadStreamsUnder(prefix) => read_stream.iter().any(|p| p.covers(prefix)),
            Access::Read(projection) => any(read, projection),
            Access::Replay(projection) => any(replay, projection),
            Access::Jobs => !append.is_empty(),
        }
    }

    /// `Ok` if the token grants `access`, else the 403 that names what is
    /// missing.
    pub fn require(&self, access: Access<'_>) -> Result<(), ApiError> {
        if self.allows(access) {
            return Ok(());
        }
        let needed = match access {
            Access::Append(stream) => format!("append to stream {stream:?} (scope append:…)"),
            Access::ReadStream(stream) => {
                format!("read stream {stream:?} (scope read-stream:…)")
            }
            Access::ReadStreamsUnder(prefix) => format!(
                "read every stream starting with {prefix:?} (scope read-stream:<prefix>* covering it)"
            ),
            Access::Read(projection) => format!("read projection {projection:?} (scope read:…)"),
            Access::Replay(projection) => {
                format!("replay the dead letters of {projection:?} (scope replay:…)")
            }
            Access::Jobs => "read async jobs (any append:… scope)".to_string(),
        };
        Err(ApiError::Forbidden {
            message: format!("the token does not grant: {needed}"),
        })
    }
}

#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    scp: Option<Vec<String>>,
}

struct Keys {
    set: JwkSet,
    modified: Option<SystemTime>,
    checked: Instant,
}

/// Checks bearer tokens against the configured JWKS.
pub struct Authenticator {
    config: AuthConfig,
    keys: RwLock<Keys>,
}

impl Authenticator {
    /// Loads the JWKS; a missing or malformed file fails the start.
    pub fn new(config: AuthConfig) -> anyhow::Result<Arc<Self>> {
        let (set, modified) = read_jwks(&config.jwks)?;
        if set.keys.is_empty() {
            anyhow::bail!("{}: the JWKS holds no key", config.jwks.display());
        }
        Ok(Arc::new(Authenticator {
            keys: RwLock::new(Keys {
                set,
                modified,
                checked: Instant::now(),
            }),
            config,
        }))
    }

    /// Reloads the JWKS when its file changed (at most every
    /// `JWKS_RECHECK`); a file that no longer parses keeps the old keys.
    fn refresh(&self) {
        let due = self.keys.read().expect("not poisoned").checked.elapsed() >= JWKS_RECHECK;
        if !due {
            return;
        }
        let mut keys = self.keys.write().expect("not poisoned");
        keys.checked = Instant::now();
        let modified = std::fs::metadata(&self.config.jwks)
            .and_then(|m| m.modified())
            .ok();
        if modified == keys.modified {
            return;
        }
        match read_jwks(&self.config.jwks) {
            Ok((set, modified)) if !set.keys.is_empty() => {
                tracing::info!(keys = set.keys.len(), "JWKS reloaded");
                keys.set = set;
                keys.modified = modified;
            }
            Ok(_) => tracing::warn!("the new JWKS holds no key; keeping the old keys"),
            Err(err) => {
                tracing::warn!(error = %err, "the JWKS no longer reads; keeping the old keys")
            }
        }
    }

    /// The grants of a bearer token, or why it is refused.
    pub fn grants(&self, token: &str) -> Result<Grants, String> {
        self.refresh();
        let header = jsonwebtoken::decode_header(token).map_err(|e| format!("not a JWT: {e}"))?;
        if matches!(
            header.alg,
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512
        ) {
            return Err("symmetric signatures are not accepted".into());
        }
        let key = {
            let keys = self.keys.read().expect("not poisoned");
            let jwk = match &header.kid {
                Some(kid) => keys.set.find(kid),
                None if keys.set.keys.len() == 1 => keys.set.keys.first(),
                None => None,
            }
            .ok_or("no key of the JWKS matches the token's kid")?;
            DecodingKey::from_jwk(jwk).map_err(|e| format!("unusable key: {e}"))?
        };
        let mut validation = Validation::new(header.alg);
        validation.leeway = self.config.leeway.as_secs();
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp"]);
        if let Some(issuer) = &self.config.issuer {
            validation.set_issuer(&[issuer]);
        }
        match &self.config.audience {
            Some(audience) => validation.set_audience(&[audience]),
            None => validation.validate_aud = false,
        }
        let claims = jsonwebtoken::decode::<Claims>(token, &key, &validation)
            .map_err(|e| format!("token refused: {e}"))?
            .claims;
        let listed = claims.scp.unwrap_or_default();
        let spaced = claims.scope.unwrap_or_default();
        let scopes = listed
            .iter()
            .map(String::as_str)
            .chain(spaced.split_whitespace());
        Ok(Grants::from_scopes(claims.sub, scopes))
    }
}

fn read_jwks(path: &std::path::Path) -> anyhow::Result<(JwkSet, Option<SystemTime>)> {
    let text =
        std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let set: JwkSet = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: not a JWKS: {e}", path.display()))?;
    let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    Ok((set, modified))
}

/// The gate every API request crosses: attaches the request's [`Grants`],
/// or answers 401.
pub fn gate(
    auth: Option<Arc<Authenticator>>,
) -> Gate<impl Fn(&mut Request) -> Option<Response> + Clone> {
    Gate::new(move |request: &mut Request| {
        let grants = match &auth {
            None => Grants::All,
            Some(auth) => {
                let bearer = request
                    .headers()
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| {
                        v.strip_prefix("Bearer ")
                            .or_else(|| v.strip_prefix("bearer "))
                    });
                let granted = match bearer {
                    None => {
                        Err("a bearer token is required (Authorization: Bearer <JWT>)".to_string())
                    }
                    Some(token) => auth.grants(token.trim()),
                };
                match granted {
                    Ok(grants) => grants,
                    Err(message) => {
                        return Some(ApiError::Unauthorized { message }.into_response());
                    }
                }
            }
        };
        request.extensions_mut().insert(grants);
        None
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grants(scopes: &str) -> Grants {
        Grants::from_scopes(None, scopes.split_whitespace())
    }

    #[test]
    fn scopes_grant_by_stream_prefix_and_by_projection() {
        let g = grants("append:order-* read:orders read-stream:order-1 unknown:x");
        assert!(g.allows(Access::Append("order-7")));
        assert!(!g.allows(Access::Append("invoice-1")));
        assert!(g.allows(Access::Read("orders")));
        assert!(!g.allows(Access::Read("invoices")));
        assert!(g.allows(Access::ReadStream("order-1")));
        assert!(!g.allows(Access::ReadStream("order-12")));
        assert!(g.allows(Access::Jobs));
        assert!(!grants("read:*").allows(Access::Jobs));
        assert!(grants("read:*").allows(Access::Read("anything")));
        assert!(Grants::All.allows(Access::Append("x")));
    }

    #[test]
    fn a_subscription_needs_a_pattern_covering_its_whole_prefix() {
        let g = grants("read-stream:order-* read-stream:invoice-1");
        assert!(g.allows(Access::ReadStreamsUnder("order-")));
        assert!(g.allows(Access::ReadStreamsUnder("order-12")));
        assert!(!g.allows(Access::ReadStreamsUnder("order")));
        assert!(!g.allows(Access::ReadStreamsUnder("")));
        // `invoice-1` grants that stream, not `invoice-12` under its prefix.
        assert!(!g.allows(Access::ReadStreamsUnder("invoice-1")));
        assert!(grants("read-stream:*").allows(Access::ReadStreamsUnder("")));
        assert!(!grants("read:* append:*").allows(Access::ReadStreamsUnder("x")));
        assert!(Grants::All.allows(Access::ReadStreamsUnder("")));
    }

    #[test]
    fn a_refusal_names_what_is_missing() {
        let err = grants("append:order-*")
            .require(Access::Append("invoice-1"))
            .unwrap_err();
        assert!(err.to_string().contains("invoice-1"), "{err}");
        assert_eq!(err.status(), axum::http::StatusCode::FORBIDDEN);
    }
}
