//! Purge targets: what an admin purge or an unsafe method's invalidation removes (every
//! variant of a URL, every host's copy of a path, every entry with a tag), normalised
//! like the key so that a target finds the entries it names.

use xxhash_rust::xxh3::xxh3_128;

use super::key::{CacheKey, normalise_path, path_part, push_normalised_query, url_part};
use crate::config::CacheRules;
use crate::encodings::Encodings;

/// What a purge removes: every variant of one URL, every host's copy of one path, or
/// every entry carrying a tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PurgeTarget {
    /// `scheme://host/path?query`, normalised like a key's [`url_part`].
    Url(String),
    /// Hash of `/path?query` (see [`path_part`]).
    Path(u128),
    Tag(String),
}

/// A purge URL or path, parsed and normalised but for its query.
struct PurgeUrl<'a> {
    /// `scheme://host[:port]`, for an absolute URL.
    origin: Option<String>,
    /// The URL's host (lowercase, no port), for routing.
    host: Option<String>,
    path: String,
    query: Option<&'a str>,
}

impl<'a> PurgeUrl<'a> {
    fn parse(text: &'a str) -> Result<PurgeUrl<'a>, String> {
        let text = text.trim();
        if text.starts_with('/') {
            let (path, query) = text.split_once('?').map_or((text, None), |(p, q)| (p, Some(q)));
            let path = normalise_path(path).map_err(|_| format!("malformed percent-encoding: {text:?}"))?.into_owned();
            return Ok(PurgeUrl { origin: None, host: None, path, query });
        }
        if text.contains(['#', ' ', '\t', '\n']) {
            return Err(format!("URL must not contain a fragment or whitespace: {text:?}"));
        }
        let uri: http::Uri = text.parse().map_err(|_| format!("not a URL or a path: {text:?}"))?;
        let scheme = match uri.scheme_str() {
            Some(s) if s.eq_ignore_ascii_case("http") || s.eq_ignore_ascii_case("https") => s.to_ascii_lowercase(),
            _ => return Err(format!("URL must be http:// or https://, or a path starting with '/': {text:?}")),
        };
        let host = uri.host().ok_or_else(|| format!("URL has no host: {text:?}"))?.to_ascii_lowercase();
        let default_port = if scheme == "https" { 443 } else { 80 };
        let mut origin = format!("{scheme}://{host}");
        if let Some(port) = uri.port_u16().filter(|p| *p != default_port) {
            origin.push_str(&format!(":{port}"));
        }
        let path = normalise_path(uri.path()).map_err(|_| format!("malformed percent-encoding: {text:?}"))?.into_owned();
        // The query as written (borrowed from `text`, which the URI was parsed from).
        let query = text.split_once('?').map(|(_, q)| q);
        Ok(PurgeUrl { origin: Some(origin), host: Some(host), path, query })
    }

    /// The target, keeping the query parameters `keep` accepts.
    fn target(&self, keep: impl Fn(&str) -> bool) -> PurgeTarget {
        let mut out = self.origin.clone().unwrap_or_default();
        out.push_str(&self.path);
        if let Some(query) = self.query {
            push_normalised_query(&mut out, query, keep);
        }
        match self.origin {
            Some(_) => PurgeTarget::Url(out),
            None => PurgeTarget::Path(xxh3_128(out.as_bytes())),
        }
    }
}

impl PurgeTarget {
    /// Parses an absolute URL (`http://shop.example/products/1?color=red`: every variant
    /// of it) or a bare path (`/products/1`: every host's), normalising like the key.
    pub fn from_url(text: &str) -> Result<PurgeTarget, String> {
        let parsed = PurgeUrl::parse(text)?;
        Ok(parsed.target(|_| true))
    }

    /// Like [`PurgeTarget::from_url`], with the query normalised as the routes the URL
    /// may take normalise theirs: `rules_for(host, path)` gives their rules (one route
    /// for a URL; for a bare path, every route whose prefix matches, on any host). One
    /// target per distinct normalisation.
    pub fn from_url_routed<'r>(text: &str, rules_for: impl Fn(Option<&str>, &str) -> Vec<&'r CacheRules>) -> Result<Vec<PurgeTarget>, String> {
        let parsed = PurgeUrl::parse(text)?;
        let rules = match parsed.query {
            Some(_) => rules_for(parsed.host.as_deref(), &parsed.path),
            None => Vec::new(),
        };
        if rules.is_empty() {
            return Ok(vec![parsed.target(|_| true)]);
        }
        let mut targets: Vec<PurgeTarget> = Vec::with_capacity(rules.len());
        for rules in rules {
            let target = parsed.target(|name| rules.keeps_query_param(name));
            if !targets.contains(&target) {
                targets.push(target);
            }
        }
        Ok(targets)
    }

    /// A tag target; tags are single words of at most 128 bytes (as stored).
    pub fn tag(tag: &str) -> Result<PurgeTarget, String> {
        let tag = tag.trim();
        if tag.is_empty() || tag.len() > 128 || tag.contains(char::is_whitespace) {
            return Err(format!("a tag is one word of 1 to 128 bytes: {tag:?}"));
        }
        Ok(PurgeTarget::Tag(tag.to_owned()))
    }

    /// The URL target of a request: every variant stored for it.
    pub fn for_request(scheme: &str, host: &str, path: &str, query: Option<&str>) -> PurgeTarget {
        let key = CacheKey::new(scheme, host, path, query, Encodings::IDENTITY);
        PurgeTarget::Url(url_part(&key.text).to_owned())
    }

    /// For a URL target, the hashes of all its primary keys (one per `Accept-Encoding`
    /// group; each holds all of its variants).
    pub fn variant_hashes(&self) -> Option<Vec<u128>> {
        let PurgeTarget::Url(url) = self else { return None };
        Some(Encodings::all_sets().map(|e| xxh3_128(format!("{url}\nae={}", e.as_str()).as_bytes())).collect())
    }

    pub fn matches(&self, key_text: &str, tags: &[String]) -> bool {
        match self {
            PurgeTarget::Url(url) => url_part(key_text) == url,
            PurgeTarget::Path(hash) => xxh3_128(path_part(key_text).as_bytes()) == *hash,
            PurgeTarget::Tag(tag) => tags.iter().any(|t| t == tag),
        }
    }

    /// The name of the Redis index set listing the entries this target covers.
    pub fn index_name(&self) -> String {
        match self {
            PurgeTarget::Url(url) => format!("url:{:032x}", xxh3_128(url.as_bytes())),
            PurgeTarget::Path(hash) => format!("path:{hash:032x}"),
            PurgeTarget::Tag(tag) => format!("tag:{tag}"),
        }
    }

    /// The targets an entry is indexed under: its URL, its path, its tags.
    pub fn of_entry(key_text: &str, tags: &[String]) -> Vec<PurgeTarget> {
        let mut out = vec![PurgeTarget::Url(url_part(key_text).to_owned()), PurgeTarget::Path(xxh3_128(path_part(key_text).as_bytes()))];
        out.extend(tags.iter().cloned().map(PurgeTarget::Tag));
        out
    }
}

#[cfg(test)]
mod purge_tests {
    use super::*;

    #[test]
    fn purge_targets_match_every_variant_and_every_host() {
        let gzip = CacheKey::new("http", "shop.example", "/products/1", Some("size=m&color=red"), Encodings::GZIP);
        let plain = CacheKey::new("http", "shop.example", "/products/1", Some("color=red&size=m"), Encodings::IDENTITY);
        let other_host = CacheKey::new("https", "eu.shop.example", "/products/1", Some("color=red&size=m"), Encodings::BR);
        let url = PurgeTarget::from_url("http://Shop.Example:80/products/1?size=m&color=red").expect("url");
        assert!(url.matches(&gzip.text, &[]) && url.matches(&plain.text, &[]));
        assert!(!url.matches(&other_host.text, &[]));
        let path = PurgeTarget::from_url("/products/1?color=red&size=m").expect("path");
        assert!(path.matches(&gzip.text, &[]) && path.matches(&other_host.text, &[]));
        assert!(!PurgeTarget::from_url("/products/1").expect("path").matches(&gzip.text, &[]));
        assert!(PurgeTarget::Tag("p1".into()).matches(&gzip.text, &["x".into(), "p1".into()]));
        assert!(PurgeTarget::from_url("ftp://x/").is_err());
        assert!(PurgeTarget::from_url("http://x/a#frag").is_err());
        assert!(PurgeTarget::tag("two words").is_err() && PurgeTarget::tag("").is_err() && PurgeTarget::tag("ok:tag-1").is_ok());
        let variants = url.variant_hashes().expect("url target");
        assert!(variants.contains(&gzip.hash) && variants.contains(&plain.hash));
        assert!(PurgeTarget::from_url("products/1").is_err());
        let indexed = PurgeTarget::of_entry(&gzip.text, &["t".into()]);
        assert!(indexed.contains(&url) && indexed.contains(&path) && indexed.contains(&PurgeTarget::Tag("t".into())));
    }
}

/// Purges recently applied to a pool (here, or told by another replica), numbered by an
/// epoch: a fetch that started before a purge covering its answer does not store that
/// answer after it, and a request that arrives after such a purge does not join a fill
/// that started before it. Only misses look here; hits never do.
#[derive(Debug, Default)]
pub struct PurgeLog {
    epoch: std::sync::atomic::AtomicU64,
    recent: std::sync::Mutex<std::collections::VecDeque<(u64, PurgeTarget)>>,
}

/// Purges remembered; a fetch older than all of them counts as covered by one.
const PURGES_REMEMBERED: usize = 4096;

impl PurgeLog {
    /// The epoch now: the number of purges applied so far.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Records a purge of `target`, applied from now on.
    pub fn record(&self, target: &PurgeTarget) {
        let mut recent = self.lock();
        let epoch = self.epoch.fetch_add(1, std::sync::atomic::Ordering::AcqRel) + 1;
        recent.push_back((epoch, target.clone()));
        if recent.len() > PURGES_REMEMBERED {
            recent.pop_front();
        }
    }

    /// The newest purge since `since` that covers a response stored under `key_text`
    /// with `tags` (any tag purge, when the tags are not known yet), or `None`.
    pub fn covering_since(&self, since: u64, key_text: &str, tags: Option<&[String]>) -> Option<u64> {
        if self.epoch() == since {
            return None;
        }
        let recent = self.lock();
        // Older than everything remembered: assume the worst.
        if recent.front().is_some_and(|(oldest, _)| *oldest > since + 1) {
            return Some(self.epoch());
        }
        recent.iter().rev().take_while(|(epoch, _)| *epoch > since).find(|(_, target)| covers(target, key_text, tags)).map(|(epoch, _)| *epoch)
    }

    /// The purges recorded since `since`; `None` when some of them are no longer remembered.
    pub fn since(&self, since: u64) -> Option<Vec<PurgeTarget>> {
        let recent = self.lock();
        if self.epoch() > since && recent.front().is_none_or(|(oldest, _)| *oldest > since + 1) {
            return None;
        }
        Some(recent.iter().filter(|(epoch, _)| *epoch > since).map(|(_, target)| target.clone()).collect())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::VecDeque<(u64, PurgeTarget)>> {
        self.recent.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn covers(target: &PurgeTarget, key_text: &str, tags: Option<&[String]>) -> bool {
    match (target, tags) {
        (PurgeTarget::Tag(_), None) => true,
        (target, tags) => target.matches(key_text, tags.unwrap_or_default()),
    }
}

#[cfg(test)]
mod log_tests {
    use super::*;

    #[test]
    fn a_purge_covers_fetches_started_before_it_only() {
        let log = PurgeLog::default();
        let before = log.epoch();
        let key = "http://shop.example/p/1\nae=identity";
        log.record(&PurgeTarget::Url("http://shop.example/p/2".into()));
        assert_eq!(log.covering_since(before, key, Some(&[])), None, "another URL");
        log.record(&PurgeTarget::Url("http://shop.example/p/1".into()));
        assert_eq!(log.covering_since(before, key, Some(&[])), Some(2));
        assert_eq!(log.covering_since(log.epoch(), key, Some(&[])), None, "started after it");
        let after = log.epoch();
        log.record(&PurgeTarget::tag("sale").expect("tag"));
        assert_eq!(log.covering_since(after, key, Some(&["other".into()])), None);
        assert_eq!(log.covering_since(after, key, Some(&["sale".into()])), Some(3));
        assert_eq!(log.covering_since(after, key, None), Some(3), "tags not known yet: any tag purge may cover it");
    }

    #[test]
    fn a_fetch_older_than_everything_remembered_counts_as_covered() {
        let log = PurgeLog::default();
        for i in 0..(PURGES_REMEMBERED + 10) {
            log.record(&PurgeTarget::Url(format!("http://shop.example/other/{i}")));
        }
        assert!(log.covering_since(0, "http://shop.example/p/1\nae=identity", Some(&[])).is_some());
        assert_eq!(log.covering_since(log.epoch() - 1, "http://shop.example/p/1\nae=identity", Some(&[])), None);
    }
}
