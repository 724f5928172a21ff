//! Where a provider is: its base URL, parsed once.

use std::fmt;

/// Where a provider lives: scheme and authority, plus an optional path prefix that is put in
/// front of every forwarded path; and the credential the provider asks of its callers, if it
/// asks one (`upstream_api_key`).
#[derive(Clone, Debug)]
pub struct Upstream {
    pub scheme: http::uri::Scheme,
    pub authority: http::uri::Authority,
    /// Empty, or a prefix starting with `/` and without a trailing `/`.
    pub path_prefix: String,
    /// `Bearer <upstream_api_key>`, marked sensitive (its `Debug` says `Sensitive`, and
    /// HTTP/2 never indexes it). Not part of the `Display`, which is the URL.
    authorization: Option<http::HeaderValue>,
}

impl Upstream {
    /// This upstream, with the provider's credential sent as `Authorization: Bearer <key>`
    /// on the proxy's own calls (see [`Upstream::authorize`]). `key` is printable ASCII
    /// (config validation checks it); anything else is refused here too.
    pub fn with_api_key(mut self, key: &str) -> Result<Self, http::header::InvalidHeaderValue> {
        let mut v = http::HeaderValue::try_from(format!("Bearer {key}"))?;
        v.set_sensitive(true);
        self.authorization = Some(v);
        Ok(self)
    }

    /// Whether the provider is given a credential.
    pub fn has_api_key(&self) -> bool {
        self.authorization.is_some()
    }

    /// Puts the provider's credential on `headers`, replacing any `Authorization` there; with
    /// none configured, leaves them alone.
    pub fn authorize(&self, headers: &mut http::HeaderMap) {
        if let Some(v) = &self.authorization {
            headers.insert(http::header::AUTHORIZATION, v.clone());
        }
    }
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}://{}{}",
            self.scheme, self.authority, self.path_prefix
        )
    }
}

/// Parses an upstream base URL: `http://host:port[/prefix]`.
pub fn parse_upstream(s: &str) -> Result<Upstream, String> {
    let uri: http::Uri = s
        .parse()
        .map_err(|_| format!("`{s}` is not a URL like `http://127.0.0.1:11434`"))?;
    let scheme = uri
        .scheme()
        .cloned()
        .ok_or_else(|| format!("`{s}` needs a scheme (`http://`)"))?;
    if scheme != http::uri::Scheme::HTTP {
        return Err(format!(
            "`{s}`: only http:// upstreams are supported (local providers speak plain HTTP)"
        ));
    }
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| format!("`{s}` needs a host"))?;
    if uri.query().is_some() {
        return Err(format!("`{s}` must not have a query string"));
    }
    let path_prefix = uri.path().trim_end_matches('/').to_string();
    Ok(Upstream {
        scheme,
        authority,
        path_prefix,
        authorization: None,
    })
}
