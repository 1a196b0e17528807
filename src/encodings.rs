//! Content codings: the set of codings (gzip, br, zstd) a client accepts, reduced to
//! what its origin produces. A leaf: the cache keys on it, the configuration names what
//! an origin produces with it.

use http::HeaderValue;

/// A set of content codings among the few the cache keeps apart (gzip, br, zstd): what a
/// client accepts, reduced to what its origin produces, so that the many spellings of
/// `Accept-Encoding`, and codings the origin would never use, do not multiply the
/// stored variants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Encodings(u8);

impl Encodings {
    pub const IDENTITY: Encodings = Encodings(0);
    pub const GZIP: Encodings = Encodings(1);
    pub const BR: Encodings = Encodings(2);
    pub const BR_GZIP: Encodings = Encodings(3);
    pub const ZSTD: Encodings = Encodings(4);
    /// What an origin is taken to produce unless its `content_codings` say otherwise.
    pub const ORIGIN_DEFAULT: Encodings = Encodings::BR_GZIP;
    const KEY: [&'static str; 8] = ["identity", "gzip", "br", "br,gzip", "zstd", "gzip,zstd", "br,zstd", "br,gzip,zstd"];
    const HEADER: [&'static str; 8] = ["identity", "gzip", "br", "br, gzip", "zstd", "gzip, zstd", "br, zstd", "br, gzip, zstd"];

    /// Every set of codings, for finding all of a URL's primary keys.
    pub fn all_sets() -> impl Iterator<Item = Encodings> {
        (0..8).map(Encodings)
    }

    /// One coding by name (`gzip`, `br`, `zstd`; `identity`, the empty set, adds
    /// nothing), for configuration.
    pub fn named(name: &str) -> Option<Encodings> {
        match name.to_ascii_lowercase().as_str() {
            "identity" => Some(Encodings::IDENTITY),
            "gzip" => Some(Encodings::GZIP),
            "br" => Some(Encodings::BR),
            "zstd" => Some(Encodings::ZSTD),
            _ => None,
        }
    }

    pub fn union(self, other: Encodings) -> Encodings {
        Encodings(self.0 | other.0)
    }

    /// The codings of this set that `produced` also holds.
    pub fn within(self, produced: Encodings) -> Encodings {
        Encodings(self.0 & produced.0)
    }

    /// Reduces the `Accept-Encoding` field lines (RFC 9110 section 12.5.3): codings with
    /// `q=0` are refused, and `*` stands for every coding not listed otherwise.
    pub fn from_headers<'a>(values: impl IntoIterator<Item = &'a HeaderValue>) -> Encodings {
        let (mut accepted, mut listed, mut star) = (0u8, 0u8, false);
        let items = values.into_iter().filter_map(|v| v.to_str().ok()).flat_map(|text| text.split(','));
        for item in items {
            let mut parts = item.split(';');
            let coding = parts.next().unwrap_or("").trim();
            let refused = parts.any(|p| {
                let p = p.trim();
                p.get(..2).is_some_and(|q| q.eq_ignore_ascii_case("q=")) && p[2..].trim().parse::<f32>().is_ok_and(|q| q <= 0.0)
            });
            let bit = if coding.eq_ignore_ascii_case("gzip") || coding.eq_ignore_ascii_case("x-gzip") {
                Encodings::GZIP.0
            } else if coding.eq_ignore_ascii_case("br") {
                Encodings::BR.0
            } else if coding.eq_ignore_ascii_case("zstd") {
                Encodings::ZSTD.0
            } else {
                if coding == "*" {
                    star = !refused;
                }
                continue;
            };
            listed |= bit;
            if !refused {
                accepted |= bit;
            }
        }
        Encodings(if star { accepted | (7 & !listed) } else { accepted })
    }

    /// The `Accept-Encoding` sent to the origin, so its answer fits every client in the
    /// group (`identity` explicitly: with no header the origin may pick any coding).
    pub fn header_value(self) -> HeaderValue {
        HeaderValue::from_static(Encodings::HEADER[usize::from(self.0 & 7)])
    }

    pub(crate) fn as_str(self) -> &'static str {
        Encodings::KEY[usize::from(self.0 & 7)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ae(v: &str) -> Encodings {
        Encodings::from_headers([&HeaderValue::from_str(v).expect("header")])
    }

    #[test]
    fn accept_encoding_groups() {
        assert_eq!(Encodings::from_headers([]), Encodings::IDENTITY);
        let two_lines = [HeaderValue::from_static("gzip"), HeaderValue::from_static("br")];
        assert_eq!(Encodings::from_headers(&two_lines), Encodings::BR_GZIP);
        assert_eq!(ae("gzip, deflate, br"), Encodings::BR_GZIP);
        assert_eq!(ae("gzip;q=1.0, br;q=0"), Encodings::GZIP);
        assert_eq!(ae("BR"), Encodings::BR);
        assert_eq!(ae("deflate"), Encodings::IDENTITY);
        assert_eq!(ae("*"), Encodings::BR_GZIP.union(Encodings::ZSTD));
        assert_eq!(ae("*, gzip;q=0"), Encodings::BR.union(Encodings::ZSTD), "* does not bring back a refused coding");
        assert_eq!(ae("gzip;Q=0, br"), Encodings::BR, "parameter names are case-insensitive");
        assert_eq!(ae("*;q=0"), Encodings::IDENTITY);
        assert_eq!(ae("zstd, br, gzip").within(Encodings::ORIGIN_DEFAULT), Encodings::BR_GZIP, "reduced to what the origin produces");
        assert_eq!(ae("br").within(Encodings::GZIP), Encodings::IDENTITY);
        assert_eq!(ae("zstd, gzip").within(Encodings::ZSTD).header_value(), "zstd");
    }
}
