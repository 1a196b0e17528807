//! What happened to a request, as one type: the `Cache-Status` header value and the
//! `cache` metric label are both derived from it, so they cannot disagree.

use http::HeaderValue;

/// Which cache tier served a hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    L1,
    L2,
}

/// Why a stored copy was served past its freshness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StaleReason {
    WhileRevalidate,
    IfError,
    /// The route is in `cache-only`: the operator chose stored copies over the origin.
    CacheOnly,
    /// Over an admission budget, with a copy within its stale-if-error window.
    Limited,
}

/// Why a fill's answer was not stored: the `reason` label of `bulwark_not_stored_total`
/// and the `detail` of its `Cache-Status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotStored {
    NoStore,
    Private,
    SetCookie,
    /// The request carried `Authorization` and the response is not marked shareable
    /// (`public`, `s-maxage`, `must-revalidate`: RFC 9111 section 3.5).
    Authorization,
    /// The request carried `Cookie` and the response has no explicit freshness: one
    /// user's page is not kept on a guess.
    CookieHeuristic,
    NoCacheNoValidator,
    VaryStar,
    VaryInvalid,
    /// A status (or method) a shared cache may not store.
    Status,
    /// No freshness at all, and no validator to revalidate it with.
    NoFreshness,
    /// Larger than `max_object_bytes`.
    TooLarge,
    /// Already stale when it arrived, with no validator.
    StaleOnArrival,
    /// A HEAD found another representation: the URL's stored copies were soft-purged.
    Purged,
    /// The process's `max_inflight_body_bytes` was spent: streamed through, not kept.
    Memory,
}

impl NotStored {
    /// Every reason label, in a fixed order; [`NotStored::index`] points into it.
    pub const LABELS: [&'static str; 14] = [
        "no-store",
        "private",
        "set-cookie",
        "authorization",
        "cookie-heuristic",
        "no-cache-no-validator",
        "vary-star",
        "vary-invalid",
        "status",
        "no-freshness",
        "too-large",
        "stale-on-arrival",
        "purged",
        "memory",
    ];

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn as_str(self) -> &'static str {
        Self::LABELS[self.index()]
    }

    /// The `Cache-Status` of a miss that was not stored for this reason.
    fn cache_status(self) -> &'static str {
        match self {
            NotStored::NoStore => "bulwark; fwd=miss; detail=no-store",
            NotStored::Private => "bulwark; fwd=miss; detail=private",
            NotStored::SetCookie => "bulwark; fwd=miss; detail=set-cookie",
            NotStored::Authorization => "bulwark; fwd=miss; detail=authorization",
            NotStored::CookieHeuristic => "bulwark; fwd=miss; detail=cookie-heuristic",
            NotStored::NoCacheNoValidator => "bulwark; fwd=miss; detail=no-cache-no-validator",
            NotStored::VaryStar => "bulwark; fwd=miss; detail=vary-star",
            NotStored::VaryInvalid => "bulwark; fwd=miss; detail=vary-invalid",
            NotStored::Status => "bulwark; fwd=miss; detail=status",
            NotStored::NoFreshness => "bulwark; fwd=miss; detail=no-freshness",
            NotStored::TooLarge => "bulwark; fwd=miss; detail=too-large",
            NotStored::StaleOnArrival => "bulwark; fwd=miss; detail=stale-on-arrival",
            NotStored::Purged => "bulwark; fwd=miss; detail=purged",
            NotStored::Memory => "bulwark; fwd=miss; detail=memory",
        }
    }
}

/// Whether a miss's answer was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    Stored,
    Not(NotStored),
}

/// Why a request was not eligible for the cache at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BypassReason {
    /// Not GET or HEAD.
    Method,
    /// The request said `Cache-Control: no-store`.
    RequestNoStore,
    /// The route is a pass-through (`cache = false`).
    Route,
}

/// The outcome of one request, one variant per `cache` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Hit(Tier),
    /// Looked up, fetched from the origin; whether the response was kept, and if not why.
    Miss(Store),
    /// Waited for another request's fill.
    Collapsed,
    /// A stale entry that the origin confirmed with 304.
    Revalidated,
    Stale(StaleReason),
    Bypass(BypassReason),
    Fallback,
    Off,
    Shed,
    /// No response from the origin and nothing stored.
    Error,
    /// Over an admission budget, nothing stored to serve: 429.
    Limited,
}

impl Outcome {
    /// Every `cache` label value, in a fixed order; [`Outcome::index`] points into it.
    pub const LABELS: [&'static str; 15] = [
        "hit_l1",
        "hit_l2",
        "miss",
        "collapsed",
        "revalidated",
        "stale_while_revalidate",
        "stale_if_error",
        "stale_cache_only",
        "bypass",
        "fallback",
        "off",
        "shed",
        "error",
        "stale_limited",
        "limited",
    ];

    /// Position of this outcome's label in [`Outcome::LABELS`].
    pub fn index(self) -> usize {
        match self {
            Outcome::Hit(Tier::L1) => 0,
            Outcome::Hit(Tier::L2) => 1,
            Outcome::Miss(_) => 2,
            Outcome::Collapsed => 3,
            Outcome::Revalidated => 4,
            Outcome::Stale(StaleReason::WhileRevalidate) => 5,
            Outcome::Stale(StaleReason::IfError) => 6,
            Outcome::Stale(StaleReason::CacheOnly) => 7,
            Outcome::Bypass(_) => 8,
            Outcome::Fallback => 9,
            Outcome::Off => 10,
            Outcome::Shed => 11,
            Outcome::Error => 12,
            Outcome::Stale(StaleReason::Limited) => 13,
            Outcome::Limited => 14,
        }
    }

    /// The `cache` metric label.
    pub fn as_str(self) -> &'static str {
        Self::LABELS[self.index()]
    }

    /// The RFC 9211 `Cache-Status` value.
    pub fn cache_status(self) -> &'static str {
        match self {
            Outcome::Hit(Tier::L1) => "bulwark; hit; detail=l1",
            Outcome::Hit(Tier::L2) => "bulwark; hit; detail=l2",
            Outcome::Miss(Store::Stored) => "bulwark; fwd=miss; stored",
            Outcome::Miss(Store::Not(reason)) => reason.cache_status(),
            Outcome::Collapsed => "bulwark; fwd=miss; collapsed",
            Outcome::Revalidated => "bulwark; fwd=stale; fwd-status=304; stored",
            Outcome::Stale(StaleReason::WhileRevalidate) => "bulwark; hit; fwd=stale; detail=stale-while-revalidate",
            Outcome::Stale(StaleReason::IfError) => "bulwark; hit; detail=stale-if-error",
            Outcome::Stale(StaleReason::CacheOnly) => "bulwark; hit; detail=stale-cache-only",
            Outcome::Bypass(_) => "bulwark; fwd=bypass",
            Outcome::Fallback => "bulwark; detail=fallback",
            Outcome::Off => "bulwark; detail=off",
            Outcome::Shed => "bulwark; detail=shed",
            Outcome::Error => "bulwark; fwd=miss; detail=error",
            Outcome::Stale(StaleReason::Limited) => "bulwark; hit; detail=stale-limited",
            Outcome::Limited => "bulwark; detail=limited",
        }
    }

    pub fn cache_status_header(self) -> HeaderValue {
        HeaderValue::from_static(self.cache_status())
    }

    /// Whether the response was built from a stored entry (and so carries `Age`).
    pub fn from_store(self) -> bool {
        matches!(self, Outcome::Hit(_) | Outcome::Collapsed | Outcome::Revalidated | Outcome::Stale(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_indices_agree() {
        let all = [
            Outcome::Hit(Tier::L1),
            Outcome::Hit(Tier::L2),
            Outcome::Miss(Store::Stored),
            Outcome::Collapsed,
            Outcome::Revalidated,
            Outcome::Stale(StaleReason::WhileRevalidate),
            Outcome::Stale(StaleReason::IfError),
            Outcome::Stale(StaleReason::CacheOnly),
            Outcome::Bypass(BypassReason::Method),
            Outcome::Fallback,
            Outcome::Off,
            Outcome::Shed,
            Outcome::Error,
            Outcome::Stale(StaleReason::Limited),
            Outcome::Limited,
        ];
        assert_eq!(all.len(), Outcome::LABELS.len(), "one label per outcome");
        for (i, outcome) in all.iter().enumerate() {
            assert_eq!(outcome.index(), i);
            assert!(outcome.cache_status().starts_with("bulwark;"));
        }
    }

    #[test]
    fn every_not_stored_reason_has_its_label_in_cache_status() {
        use NotStored::*;
        let all = [
            NoStore,
            Private,
            SetCookie,
            Authorization,
            CookieHeuristic,
            NoCacheNoValidator,
            VaryStar,
            VaryInvalid,
            Status,
            NoFreshness,
            TooLarge,
            StaleOnArrival,
            Purged,
            Memory,
        ];
        assert_eq!(all.len(), NotStored::LABELS.len(), "one label per reason");
        for (i, reason) in all.iter().enumerate() {
            assert_eq!(reason.index(), i);
            let status = Outcome::Miss(Store::Not(*reason)).cache_status();
            assert_eq!(status, format!("bulwark; fwd=miss; detail={}", reason.as_str()));
        }
    }
}
