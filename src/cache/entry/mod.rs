//! A stored response and its versioned binary format.
//!
//! Layout of format version 2 (all integers big-endian):
//!
//! ```text
//! "BWK" u8:version | u16:status | u64:request_time_ms | u64:response_time_ms
//! | u64:initial_age_ms | u64:freshness_ms | u64:swr_ms | u64:sie_ms
//! | u64:keep_for_revalidation_ms | u8:flags
//! | u32:key_len key | u16:header_count (u16:name_len name u32:value_len value)*
//! | u16:tag_count (u16:tag_len tag)* | u32:body_len body
//! | u64:xxh3 checksum of everything before it
//! ```
//!
//! The version is both in the Redis key and in the payload: replicas of another version
//! never read these entries (rolling deploys), and a payload that fails any check is
//! reported as corrupt so the caller can delete and count it, never serve it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use xxhash_rust::xxh3::xxh3_64;

mod build;
pub use build::{StoreFor, set_date_if_missing, take_tags};

pub const FORMAT_VERSION: u8 = 2;

/// Bytes of [`Entry::encoded_head`]: magic, version, status, seven times, flags.
pub const HEAD_LEN: usize = 3 + 1 + 2 + 7 * 8 + 1;
const MAGIC: &[u8; 3] = b"BWK";
const FLAG_NO_STALE: u8 = 1;
const FLAG_STALE_ON_ERROR_ALWAYS: u8 = 2;
const FLAG_INVALIDATED: u8 = 4;
const FLAG_VARIANTS: u8 = 8;

/// A stored response.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Full key text: compared on every read so that a hash collision is a miss.
    pub key: String,
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub request_time: SystemTime,
    pub response_time: SystemTime,
    /// `corrected_initial_age` of RFC 9111 section 4.2.3.
    pub initial_age: Duration,
    pub freshness_lifetime: Duration,
    pub stale_while_revalidate: Duration,
    pub stale_if_error: Duration,
    /// `must-revalidate`, `proxy-revalidate` or `s-maxage`: never served stale.
    pub no_stale: bool,
    /// The route serves stale copies on origin errors even when `no_stale` (a deliberate
    /// deviation, `stale_on_error = "always"`), so the entry is kept for that window.
    pub stale_on_error_always: bool,
    /// Purge tags (from the pool's `tag_header`).
    pub tags: Vec<String>,
    /// Soft-purged: no longer fresh, but still usable within its stale windows.
    pub invalidated: bool,
    /// How long past its stale windows the entry is kept, if it has a validator, only
    /// to be revalidated with a conditional request.
    pub keep_for_revalidation: Duration,
    /// Not a response: the marker stored under a primary key whose responses vary,
    /// naming (in its `Vary` header) the request headers that select a variant.
    pub variants: bool,
    /// When L1 last served it (not stored in Redis, not part of its value).
    pub last_used: LastUsed,
}

/// When an entry was last served from L1, in seconds of the pool's clock: what a reload
/// that shrinks L1 keeps first. A clone copies the time; it never makes two entries differ.
#[derive(Debug, Default)]
pub struct LastUsed(std::sync::atomic::AtomicU64);

impl LastUsed {
    pub fn get(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Records a use at `secs` (a store only once per second per entry, so hot entries
    /// do not bounce a cache line between cores on every hit).
    pub fn touch(&self, secs: u64) {
        if self.get() < secs {
            self.0.store(secs, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

impl Clone for LastUsed {
    fn clone(&self) -> LastUsed {
        LastUsed(std::sync::atomic::AtomicU64::new(self.get()))
    }
}

impl PartialEq for LastUsed {
    fn eq(&self, _: &LastUsed) -> bool {
        true
    }
}

/// Why a payload could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Written by a replica using another format version: a miss, left alone.
    #[error("entry has format version {0}, this build reads version {FORMAT_VERSION}")]
    OtherVersion(u8),
    /// Truncated, bad checksum, bad status or header: a miss, deleted and counted.
    #[error("corrupt entry: {0}")]
    Corrupt(&'static str),
}

impl Entry {
    /// Age of the entry now (RFC 9111 section 4.2.3 `current_age`).
    pub fn age(&self, now: SystemTime) -> Duration {
        self.initial_age.saturating_add(now.duration_since(self.response_time).unwrap_or_default())
    }

    pub fn is_fresh(&self, now: SystemTime) -> bool {
        !self.invalidated && self.age(now) < self.freshness_lifetime
    }

    /// A soft-purged copy: stale from now on, still within its stale windows.
    pub fn soft_purged(&self) -> Entry {
        Entry { invalidated: true, ..self.clone() }
    }

    /// How long past freshness the entry stays useful: its stale windows, and for an
    /// entry with a validator (or a variants marker, which must outlive the variants that
    /// renewed it) the time it is kept for revalidation.
    pub fn stale_window(&self) -> Duration {
        let serve = match (self.no_stale, self.stale_on_error_always) {
            (false, _) => self.stale_while_revalidate.max(self.stale_if_error),
            (true, true) => self.stale_if_error,
            (true, false) => Duration::ZERO,
        };
        if self.variants || self.has_validator() { serve.saturating_add(self.keep_for_revalidation) } else { serve }
    }

    /// Whether a conditional request can revalidate it (`ETag` or `Last-Modified`).
    pub fn has_validator(&self) -> bool {
        self.headers.contains_key(http::header::ETAG) || self.headers.contains_key(http::header::LAST_MODIFIED)
    }

    /// The marker for a primary key whose responses vary on `names`, living as long as
    /// `variant` (each stored variant renews it).
    pub fn variants_marker(primary_key: String, names: &[HeaderName], variant: &Entry) -> Entry {
        let mut headers = HeaderMap::with_capacity(1);
        let list = names.iter().map(HeaderName::as_str).collect::<Vec<_>>().join(", ");
        if let Ok(value) = HeaderValue::from_str(&list) {
            headers.insert(http::header::VARY, value);
        }
        Entry { key: primary_key, status: StatusCode::OK, headers, body: Bytes::new(), variants: true, ..variant.clone() }
    }

    /// Whether it may be served now, stale, while a refresh runs (RFC 5861).
    pub fn within_stale_while_revalidate(&self, now: SystemTime) -> bool {
        !self.no_stale && self.age(now) < self.freshness_lifetime.saturating_add(self.stale_while_revalidate)
    }

    /// Whether it may be served now in place of a failed origin response.
    pub fn within_stale_if_error(&self, now: SystemTime) -> bool {
        (!self.no_stale || self.stale_on_error_always) && self.age(now) < self.freshness_lifetime.saturating_add(self.stale_if_error)
    }

    /// How long, from now, the entry is worth keeping: freshness left plus the stale
    /// windows (and the revalidation window).
    pub fn keep_for(&self, now: SystemTime) -> Duration {
        self.freshness_lifetime.saturating_add(self.stale_window()).saturating_sub(self.age(now))
    }

    /// Bytes this entry occupies, for the L1 weigher: everything it holds (body, header
    /// fields, key, tags) and the bookkeeping around them.
    pub fn weight(&self) -> u32 {
        let headers: usize = self.headers.iter().map(|(n, v)| n.as_str().len() + v.len() + 32).sum();
        let tags: usize = self.tags.iter().map(|t| t.len() + std::mem::size_of::<String>()).sum();
        let total = self.body.len() + headers + self.key.len() + tags + std::mem::size_of::<Entry>();
        u32::try_from(total).unwrap_or(u32::MAX)
    }

    /// The fixed-size head of the encoding: format, status, times, windows and flags.
    /// Two encodings with the same head are the same stored response as far as a replica
    /// checking its copy after a link gap is concerned (the same fill, purged or not).
    pub fn encoded_head(&self) -> [u8; HEAD_LEN] {
        let mut out = BytesMut::with_capacity(HEAD_LEN);
        out.put_slice(MAGIC);
        out.put_u8(FORMAT_VERSION);
        out.put_u16(self.status.as_u16());
        out.put_u64(millis_since_epoch(self.request_time));
        out.put_u64(millis_since_epoch(self.response_time));
        out.put_u64(duration_millis(self.initial_age));
        out.put_u64(duration_millis(self.freshness_lifetime));
        out.put_u64(duration_millis(self.stale_while_revalidate));
        out.put_u64(duration_millis(self.stale_if_error));
        out.put_u64(duration_millis(self.keep_for_revalidation));
        let flags = if self.no_stale { FLAG_NO_STALE } else { 0 }
            | if self.stale_on_error_always { FLAG_STALE_ON_ERROR_ALWAYS } else { 0 }
            | if self.invalidated { FLAG_INVALIDATED } else { 0 }
            | if self.variants { FLAG_VARIANTS } else { 0 };
        out.put_u8(flags);
        let mut head = [0u8; HEAD_LEN];
        head.copy_from_slice(&out);
        head
    }

    pub fn encode(&self) -> Bytes {
        let headers_len: usize = self.headers.iter().map(|(n, v)| 6 + n.as_str().len() + v.len()).sum();
        let mut out = BytesMut::with_capacity(64 + self.key.len() + headers_len + self.body.len());
        out.put_slice(&self.encoded_head());
        put_bytes32(&mut out, self.key.as_bytes());
        let count = u16::try_from(self.headers.len()).unwrap_or(u16::MAX);
        out.put_u16(count);
        for (name, value) in self.headers.iter().take(usize::from(count)) {
            let name = name.as_str().as_bytes();
            out.put_u16(u16::try_from(name.len()).unwrap_or(0));
            out.put_slice(&name[..name.len().min(usize::from(u16::MAX))]);
            put_bytes32(&mut out, value.as_bytes());
        }
        let tags: Vec<&String> = self.tags.iter().filter(|t| t.len() <= usize::from(u16::MAX)).take(usize::from(u16::MAX)).collect();
        out.put_u16(u16::try_from(tags.len()).unwrap_or(0));
        for tag in tags {
            out.put_u16(u16::try_from(tag.len()).unwrap_or(0));
            out.put_slice(tag.as_bytes());
        }
        put_bytes32(&mut out, &self.body);
        let checksum = xxh3_64(&out);
        out.put_u64(checksum);
        out.freeze()
    }

    pub fn decode(payload: &Bytes) -> Result<Entry, DecodeError> {
        use DecodeError::Corrupt;
        if payload.len() < MAGIC.len() + 1 || &payload[..3] != MAGIC {
            return Err(Corrupt("bad magic"));
        }
        if payload[3] != FORMAT_VERSION {
            return Err(DecodeError::OtherVersion(payload[3]));
        }
        if payload.len() < 8 + 4 {
            return Err(Corrupt("truncated"));
        }
        let (content, checksum) = payload.split_at(payload.len() - 8);
        if xxh3_64(content) != u64::from_be_bytes(checksum.try_into().map_err(|_| Corrupt("truncated"))?) {
            return Err(Corrupt("checksum mismatch"));
        }
        let mut buf = payload.slice(4..payload.len() - 8);
        let status = StatusCode::from_u16(get_u16(&mut buf)?).map_err(|_| Corrupt("bad status"))?;
        let request_time = UNIX_EPOCH + Duration::from_millis(get_u64(&mut buf)?);
        let response_time = UNIX_EPOCH + Duration::from_millis(get_u64(&mut buf)?);
        let initial_age = Duration::from_millis(get_u64(&mut buf)?);
        let freshness_lifetime = Duration::from_millis(get_u64(&mut buf)?);
        let stale_while_revalidate = Duration::from_millis(get_u64(&mut buf)?);
        let stale_if_error = Duration::from_millis(get_u64(&mut buf)?);
        let keep_for_revalidation = Duration::from_millis(get_u64(&mut buf)?);
        let flags = get_u8(&mut buf)?;
        let key = String::from_utf8(get_bytes32(&mut buf)?.to_vec()).map_err(|_| Corrupt("key is not UTF-8"))?;
        // Counts read from Redis are input: no capacity beyond what the bytes left can hold
        // (a field takes at least 7 bytes, a tag 2), and no field beyond what a HeaderMap
        // holds (`append` panics past it).
        let count = get_u16(&mut buf)?;
        let mut headers = HeaderMap::try_with_capacity(usize::from(count).min(buf.remaining() / 7)).map_err(|_| Corrupt("too many header fields"))?;
        for _ in 0..count {
            let name_len = usize::from(get_u16(&mut buf)?);
            let name = take(&mut buf, name_len)?;
            let name = HeaderName::from_bytes(&name).map_err(|_| Corrupt("bad header name"))?;
            let value = get_bytes32(&mut buf)?;
            let value = HeaderValue::from_maybe_shared(value).map_err(|_| Corrupt("bad header value"))?;
            headers.try_append(name, value).map_err(|_| Corrupt("too many header fields"))?;
        }
        let tag_count = get_u16(&mut buf)?;
        let mut tags = Vec::with_capacity(usize::from(tag_count).min(buf.remaining() / 2));
        for _ in 0..tag_count {
            let len = usize::from(get_u16(&mut buf)?);
            let tag = take(&mut buf, len)?;
            tags.push(String::from_utf8(tag.to_vec()).map_err(|_| Corrupt("tag is not UTF-8"))?);
        }
        let body = get_bytes32(&mut buf)?;
        if buf.has_remaining() {
            return Err(Corrupt("trailing bytes"));
        }
        Ok(Entry {
            key,
            status,
            headers,
            body,
            request_time,
            response_time,
            initial_age,
            freshness_lifetime,
            stale_while_revalidate,
            stale_if_error,
            no_stale: flags & FLAG_NO_STALE != 0,
            stale_on_error_always: flags & FLAG_STALE_ON_ERROR_ALWAYS != 0,
            tags,
            invalidated: flags & FLAG_INVALIDATED != 0,
            keep_for_revalidation,
            variants: flags & FLAG_VARIANTS != 0,
            last_used: LastUsed::default(),
        })
    }
}

fn millis_since_epoch(time: SystemTime) -> u64 {
    duration_millis(time.duration_since(UNIX_EPOCH).unwrap_or_default())
}

fn duration_millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn put_bytes32(out: &mut BytesMut, bytes: &[u8]) {
    // Entries are bounded by max_object_bytes (< 4 GiB, checked at config load).
    out.put_u32(u32::try_from(bytes.len()).unwrap_or(u32::MAX));
    out.put_slice(bytes);
}

fn take(buf: &mut Bytes, len: usize) -> Result<Bytes, DecodeError> {
    if buf.remaining() < len {
        return Err(DecodeError::Corrupt("truncated"));
    }
    Ok(buf.split_to(len))
}

fn get_u8(buf: &mut Bytes) -> Result<u8, DecodeError> {
    Ok(take(buf, 1)?[0])
}

fn get_u16(buf: &mut Bytes) -> Result<u16, DecodeError> {
    Ok(take(buf, 2)?.get_u16())
}

fn get_u64(buf: &mut Bytes) -> Result<u64, DecodeError> {
    Ok(take(buf, 8)?.get_u64())
}

fn get_bytes32(buf: &mut Bytes) -> Result<Bytes, DecodeError> {
    let len = take(buf, 4)?.get_u32();
    take(buf, usize::try_from(len).map_err(|_| DecodeError::Corrupt("length overflow"))?)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample() -> Entry {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.append("x-multi", HeaderValue::from_static("a"));
        headers.append("x-multi", HeaderValue::from_static("b"));
        Entry {
            key: "http://shop.example/products/1\nae=gzip".into(),
            status: StatusCode::OK,
            headers,
            body: Bytes::from_static(b"{\"id\":1}"),
            request_time: UNIX_EPOCH + Duration::from_millis(1_700_000_000_000),
            response_time: UNIX_EPOCH + Duration::from_millis(1_700_000_000_200),
            initial_age: Duration::from_secs(3),
            freshness_lifetime: Duration::from_secs(60),
            stale_while_revalidate: Duration::from_secs(30),
            stale_if_error: Duration::from_secs(600),
            no_stale: false,
            stale_on_error_always: false,
            tags: vec!["product-1".into(), "category-7".into()],
            invalidated: false,
            keep_for_revalidation: Duration::from_secs(600),
            variants: false,
            last_used: LastUsed::default(),
        }
    }

    #[test]
    fn round_trip() {
        let entry = sample();
        assert_eq!(Entry::decode(&entry.encode()), Ok(entry));
    }

    #[test]
    fn the_head_is_the_start_of_the_encoding_and_tells_a_soft_purge() {
        let entry = sample();
        assert_eq!(&entry.encode()[..HEAD_LEN], &entry.encoded_head());
        assert_ne!(entry.soft_purged().encoded_head(), entry.encoded_head());
    }

    #[test]
    fn other_version_is_not_corrupt() {
        let mut bytes = sample().encode().to_vec();
        bytes[3] = 1;
        assert_eq!(Entry::decode(&Bytes::from(bytes)), Err(DecodeError::OtherVersion(1)));
    }

    #[test]
    fn every_damage_is_detected() {
        let good = sample().encode();
        for i in 4..good.len() {
            let mut bad = good.to_vec();
            bad[i] ^= 0x40;
            assert!(matches!(Entry::decode(&Bytes::from(bad)), Err(DecodeError::Corrupt(_))), "flip at {i}");
        }
        for len in 0..good.len() {
            assert!(Entry::decode(&good.slice(..len)).is_err(), "truncated to {len}");
        }
        assert!(matches!(Entry::decode(&Bytes::from_static(b"garbage")), Err(DecodeError::Corrupt(_))));
    }

    /// Re-encodes `entry`'s bytes with a valid checksum after `edit`, the way a crafted
    /// value planted in Redis would look.
    pub(crate) fn with_valid_checksum(mut bytes: Vec<u8>) -> Bytes {
        bytes.truncate(bytes.len() - 8);
        let checksum = xxh3_64(&bytes);
        bytes.extend_from_slice(&checksum.to_be_bytes());
        Bytes::from(bytes)
    }

    /// The header count sits right after the key.
    fn header_count_offset(entry: &Entry) -> usize {
        4 + 2 + 7 * 8 + 1 + 4 + entry.key.len()
    }

    #[test]
    fn a_crafted_header_count_is_corrupt_not_a_panic_or_a_huge_allocation() {
        let entry = sample();
        let at = header_count_offset(&entry);
        let mut bytes = entry.encode().to_vec();
        assert_eq!(u16::from_be_bytes([bytes[at], bytes[at + 1]]), 3, "the count is where the test expects it");
        bytes[at..at + 2].copy_from_slice(&0xFFFFu16.to_be_bytes());
        assert!(matches!(Entry::decode(&with_valid_checksum(bytes)), Err(DecodeError::Corrupt(_))));
        // The 80-byte value of the report: magic, version, a count of 0xFFFF, nothing else.
        let mut tiny = vec![0u8; at + 2 + 8];
        tiny[..4].copy_from_slice(b"BWK\x02");
        tiny[4..6].copy_from_slice(&200u16.to_be_bytes());
        tiny[at..at + 2].copy_from_slice(&0xFFFFu16.to_be_bytes());
        let key_len_at = at - entry.key.len() - 4;
        tiny[key_len_at..key_len_at + 4].copy_from_slice(&u32::try_from(entry.key.len()).expect("short key").to_be_bytes());
        assert_eq!(Entry::decode(&with_valid_checksum(tiny)), Err(DecodeError::Corrupt("truncated")));
    }

    #[test]
    fn more_fields_than_a_header_map_holds_are_corrupt() {
        // 40,000 one-byte-name fields: past http's limit of 32,768 entries.
        let mut entry = sample();
        entry.headers = HeaderMap::new();
        let mut bytes = entry.encode().to_vec();
        let at = header_count_offset(&entry);
        let mut fields = Vec::new();
        for _ in 0..40_000u32 {
            fields.extend_from_slice(&1u16.to_be_bytes());
            fields.push(b'x');
            fields.extend_from_slice(&0u32.to_be_bytes());
        }
        bytes[at..at + 2].copy_from_slice(&40_000u16.to_be_bytes());
        bytes.splice(at + 2..at + 2, fields);
        assert_eq!(Entry::decode(&with_valid_checksum(bytes)), Err(DecodeError::Corrupt("too many header fields")));
    }

    #[test]
    fn extreme_durations_saturate() {
        let mut entry = sample();
        entry.freshness_lifetime = Duration::MAX;
        entry.stale_if_error = Duration::MAX;
        entry.initial_age = Duration::MAX;
        let later = entry.response_time + Duration::from_secs(1);
        assert_eq!(entry.age(later), Duration::MAX);
        assert_eq!(entry.keep_for(later), Duration::ZERO);
        assert!(Entry::decode(&entry.encode()).is_ok());
    }

    #[test]
    fn the_weight_counts_tags_too() {
        let mut entry = sample();
        let without = entry.weight();
        entry.tags = (0..1000).map(|i| format!("tag-{i:04}")).collect();
        assert!(entry.weight() >= without + 1000 * 8, "1,000 tags of 8 bytes weigh at least 8,000 bytes");
    }

    #[test]
    fn freshness_and_age() {
        let entry = sample();
        let now = entry.response_time + Duration::from_secs(10);
        assert_eq!(entry.age(now), Duration::from_secs(13));
        assert!(entry.is_fresh(now));
        assert!(!entry.is_fresh(entry.response_time + Duration::from_secs(57)));
        assert_eq!(entry.keep_for(now), Duration::from_secs(60 + 600 - 13));
    }
}
