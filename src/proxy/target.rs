//! The request target: normalised once on arrival (so routing, the key and the origin
//! see one path), and given the normalised query when a request goes to the origin.

use http::request;

use crate::error::ProxyError;

/// Normalises the request path in place (see [`crate::cache::key::normalise_path`]).
pub(super) fn normalise(parts: &mut request::Parts) -> Result<(), ProxyError> {
    let bad = |_| ProxyError::BadRequest("malformed percent-encoding in the request target");
    let path = crate::cache::key::normalise_path(parts.uri.path()).map_err(bad)?;
    if let std::borrow::Cow::Owned(path) = path {
        let query = parts.uri.query().map(str::to_owned);
        replace_path_and_query(parts, &path, query.as_deref())?;
    }
    Ok(())
}

/// Rebuilds the request URI with another path and query, keeping scheme and authority.
fn replace_path_and_query(parts: &mut request::Parts, path: &str, query: Option<&str>) -> Result<(), ProxyError> {
    let target = match query {
        Some(q) if !q.is_empty() => format!("{path}?{q}"),
        _ => path.to_owned(),
    };
    let mut builder = http::Uri::builder().path_and_query(target);
    if let Some(scheme) = parts.uri.scheme() {
        builder = builder.scheme(scheme.clone());
    }
    if let Some(authority) = parts.uri.authority() {
        builder = builder.authority(authority.clone());
    }
    parts.uri = builder.build().map_err(|_| ProxyError::BadRequest("request target cannot be normalised"))?;
    Ok(())
}

/// The request as it goes to the origin: its query replaced by the normalised one.
pub(super) fn for_origin(mut parts: request::Parts, query: &str) -> request::Parts {
    if parts.uri.query().unwrap_or("") != query {
        let path = parts.uri.path().to_owned();
        // Cannot fail: both parts come from a valid URI and were only normalised.
        if let Err(err) = replace_path_and_query(&mut parts, &path, Some(query)) {
            tracing::warn!(error = %err, "normalised request target rejected; the origin gets the client's");
        }
    }
    parts
}
