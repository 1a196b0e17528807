//! Property tests for the parsing and normalisation that decide what is cached under
//! which key: `Cache-Control` (response, request and targeted), `Vary`, paths, queries
//! and variant keys. Arbitrary input never panics, and equivalent requests get the same
//! key while different ones do not. Entries read from Redis are input too: no bytes
//! make the decoder panic.

use bulwark::cache::Entry;
use bulwark::cache::key::{BadTarget, CacheKey, Vary, normalise_path, normalise_query};
use bulwark::cache::policy::{Directives, RequestDirectives, effective_headers};
use bulwark::config::{CacheRules, ParamPattern};
use bulwark::encodings::Encodings;
use http::{HeaderMap, HeaderName, HeaderValue};
use proptest::prelude::*;

/// Visible ASCII and spaces: what a header value may hold.
fn header_text() -> impl Strategy<Value = String> {
    proptest::string::string_regex("[ -~]{0,300}").expect("regex")
}

/// Text built from the pieces cache directives are made of, so that the parsers'
/// interesting paths (quotes, commas, equals signs, digits) are hit often.
fn directive_soup() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("max-age".to_owned()),
        Just("s-maxage".to_owned()),
        Just("no-cache".to_owned()),
        Just("private".to_owned()),
        Just("max-stale".to_owned()),
        Just("=".to_owned()),
        Just(",".to_owned()),
        Just("\"".to_owned()),
        Just(";".to_owned()),
        Just(" ".to_owned()),
        Just("?0".to_owned()),
        "[0-9]{1,25}",
        "[a-zA-Z*-]{1,8}",
    ];
    proptest::collection::vec(piece, 0..40).prop_map(|pieces| pieces.concat())
}

fn one_header(name: &'static str, value: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if let Ok(value) = HeaderValue::from_str(value) {
        headers.insert(name, value);
    }
    headers
}

/// A path segment of unreserved characters and a few reserved ones.
fn segment() -> impl Strategy<Value = String> {
    proptest::string::string_regex("[A-Za-z0-9._~!$&'()*+,;=:@-]{0,8}").expect("regex")
}

/// Percent-encodes unreserved characters at random and writes hex digits in either
/// case: a different spelling of the same path.
fn respell(text: &str, choices: &[bool]) -> String {
    let mut out = String::new();
    for (i, c) in text.chars().enumerate() {
        let unreserved = c.is_ascii_alphanumeric() || "-._~".contains(c);
        if unreserved && choices.get(i % choices.len().max(1)).copied().unwrap_or(false) {
            let hex = format!("%{:02X}", c as u32);
            out.push_str(&if i % 2 == 0 { hex.to_lowercase() } else { hex });
        } else {
            out.push(c);
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn cache_control_parsing_never_panics(text in prop_oneof![header_text(), directive_soup()]) {
        let headers = one_header("cache-control", &text);
        let d = Directives::parse(&headers);
        // Whatever it read is within the representable range.
        for value in [d.max_age, d.s_maxage, d.stale_while_revalidate, d.stale_if_error].into_iter().flatten() {
            prop_assert!(value <= bulwark::cache::policy::MAX_DELTA_SECONDS);
        }
        let r = RequestDirectives::parse(&headers);
        prop_assert!(r.max_age.is_none_or(|v| v <= bulwark::cache::policy::MAX_DELTA_SECONDS));
    }

    #[test]
    fn targeted_fields_never_panic(text in prop_oneof![header_text(), directive_soup()]) {
        let rules = CacheRules {
            targeted_cache_control: vec![HeaderName::from_static("cdn-cache-control"), HeaderName::from_static("surrogate-control")],
            ..CacheRules::default()
        };
        let mut headers = one_header("cdn-cache-control", &text);
        headers.insert("cache-control", HeaderValue::from_static("max-age=1"));
        let effective = effective_headers(&headers, &rules);
        // Whichever wins, the result is one Cache-Control that parses.
        let _ = Directives::parse(&effective);
        let surrogate_only = one_header("surrogate-control", &text);
        let surrogate = effective_headers(&surrogate_only, &rules);
        let _ = Directives::parse(&surrogate);
    }

    #[test]
    fn vary_parsing_never_panics_and_is_canonical(text in prop_oneof![header_text(), "[A-Za-z, -]{0,200}"]) {
        match Vary::parse(&one_header("vary", &text)) {
            Vary::Names(names) => {
                prop_assert!(!names.is_empty() && names.len() <= bulwark::cache::key::MAX_VARY_NAMES);
                prop_assert!(names.windows(2).all(|w| w[0].as_str() < w[1].as_str()), "sorted, no duplicates: {:?}", names);
                prop_assert!(!names.contains(&http::header::ACCEPT_ENCODING));
            }
            Vary::None | Vary::Star | Vary::Invalid => {}
        }
    }

    #[test]
    fn vary_names_are_order_and_case_insensitive(names in proptest::collection::vec("[a-z][a-z-]{0,10}", 1..10), seed in any::<u64>()) {
        let mut shuffled = names.clone();
        let n = shuffled.len();
        for i in 0..n {
            shuffled.swap(i, (seed as usize).wrapping_add(i * 7) % n);
        }
        let upper: Vec<String> = shuffled.iter().map(|s| s.to_uppercase()).collect();
        let a = Vary::parse(&one_header("vary", &names.join(", ")));
        let b = Vary::parse(&one_header("vary", &upper.join(",")));
        prop_assert_eq!(a, b);
    }

    #[test]
    fn path_normalisation_never_panics_and_is_idempotent(path in "/[ -~]{0,100}") {
        match normalise_path(&path) {
            Ok(once) => {
                let twice = normalise_path(&once).map(|p| p.into_owned());
                prop_assert_eq!(twice, Ok(once.clone().into_owned()));
                prop_assert!(once.starts_with('/'));
                prop_assert!(!once.split('/').any(|s| s == "." || s == ".."), "dot segment left in {}", once);
            }
            Err(BadTarget) => prop_assert!(path.contains('%')),
        }
    }

    #[test]
    fn equivalent_paths_give_the_same_key(segments in proptest::collection::vec(segment(), 1..6), choices in proptest::collection::vec(any::<bool>(), 1..8), dots in 0usize..3) {
        let plain = format!("/{}", segments.join("/"));
        let mut spelled = String::from("/");
        spelled.push_str(&respell(&segments.join("/"), &choices));
        // Detours through dot segments that lead back to the same path.
        for _ in 0..dots {
            spelled = spelled.replacen('/', "/./detour/../", 1);
        }
        let a = CacheKey::new("http", "h", &plain, None, Encodings::GZIP);
        let b = CacheKey::new("http", "h", &spelled, None, Encodings::GZIP);
        prop_assert_eq!(a, b, "{} vs {}", plain, spelled);
    }

    #[test]
    fn query_order_and_spelling_do_not_split_the_key(params in proptest::collection::btree_map("[a-z]{1,6}", "[a-zA-Z0-9~._-]{0,6}", 0..8), choices in proptest::collection::vec(any::<bool>(), 1..8), seed in any::<u64>()) {
        let pairs: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut shuffled: Vec<String> = pairs.iter().map(|p| respell(p, &choices)).collect();
        let n = shuffled.len();
        for i in 0..n {
            shuffled.swap(i, (seed as usize).wrapping_add(i * 13) % n.max(1));
        }
        let a = CacheKey::new("http", "h", "/p", Some(&pairs.join("&")), Encodings::IDENTITY);
        let b = CacheKey::new("http", "h", "/p", Some(&format!("&{}&", shuffled.join("&"))), Encodings::IDENTITY);
        prop_assert_eq!(a, b);
    }

    #[test]
    fn ignored_parameters_never_reach_the_key(kept in proptest::collection::btree_map("[a-s]{1,6}", "[a-z0-9]{0,6}", 0..5), noise in proptest::collection::vec(("utm_[a-z]{1,6}", "[a-z0-9]{0,6}"), 0..5)) {
        let ignored = [ParamPattern::Prefix("utm_".into())];
        let base: Vec<String> = kept.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut with_noise = base.clone();
        with_noise.extend(noise.iter().map(|(k, v)| format!("{k}={v}")));
        let a = normalise_query(&base.join("&"), &ignored).map(|q| q.into_owned());
        let b = normalise_query(&with_noise.join("&"), &ignored).map(|q| q.into_owned());
        prop_assert_eq!(a, b);
    }

    #[test]
    fn query_normalisation_never_panics(query in "[ -~]{0,200}") {
        if let Ok(once) = normalise_query(&query, &[ParamPattern::Exact("a".into())]) {
            let twice = normalise_query(&once, &[]).map(|q| q.into_owned());
            prop_assert_eq!(twice, Ok(once.into_owned()));
        }
    }

    #[test]
    fn variant_keys_ignore_whitespace_and_case_of_case_insensitive_fields(langs in proptest::collection::vec("[a-z]{2}(-[A-Z]{2})?", 1..4), spaces in proptest::collection::vec(0usize..3, 4)) {
        let primary = CacheKey::new("http", "h", "/p", None, Encodings::GZIP);
        let names = [http::header::ACCEPT_LANGUAGE];
        let tidy = langs.join(",");
        let loose: String = langs
            .iter()
            .enumerate()
            .map(|(i, l)| format!("{}{}", " ".repeat(spaces[i % spaces.len()]), l.to_uppercase()))
            .collect::<Vec<_>>()
            .join(" ,");
        let a = primary.variant(&names, &one_header("accept-language", &tidy));
        let b = primary.variant(&names, &one_header("accept-language", &loose));
        prop_assert_eq!(&a, &b, "{} vs {}", tidy, loose);
        let other = primary.variant(&names, &one_header("accept-language", &format!("{tidy},xx")));
        prop_assert_ne!(a, other);
    }

    #[test]
    fn arbitrary_header_values_make_variant_keys_without_panicking(value in proptest::collection::vec(any::<u8>(), 0..200)) {
        let primary = CacheKey::new("http", "h", "/p", None, Encodings::IDENTITY);
        let mut headers = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_bytes(&value) {
            headers.insert("x-any", v);
        }
        let key = primary.variant(&[HeaderName::from_static("x-any")], &headers);
        prop_assert!(key.text.starts_with(&primary.text));
        prop_assert_eq!(key.primary(), primary);
    }

    #[test]
    fn arbitrary_bytes_with_a_valid_checksum_never_panic_the_entry_decoder(body in proptest::collection::vec(any::<u8>(), 0..400)) {
        let mut bytes = b"BWK\x02".to_vec();
        bytes.extend_from_slice(&body);
        let _ = Entry::decode(&with_checksum(bytes));
    }

    #[test]
    fn mutated_entries_with_a_valid_checksum_decode_or_are_corrupt(edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..12), cut in any::<usize>()) {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("text/html"));
        headers.append("x-multi", HeaderValue::from_static("a"));
        let mut entry = Entry::decode(&bulwark_entry(headers)).expect("a valid entry");
        entry.tags = vec!["t1".into(), "t2".into()];
        let mut bytes = entry.encode().to_vec();
        bytes.truncate(bytes.len() - 8);
        for (at, value) in edits {
            let at = 4 + at % (bytes.len() - 4);
            bytes[at] = value;
        }
        if cut % 3 == 0 {
            bytes.truncate(4 + cut % (bytes.len() - 3));
        }
        bytes.extend_from_slice(&[0; 8]);
        if let Ok(decoded) = Entry::decode(&with_checksum(bytes)) {
            prop_assert_eq!(Entry::decode(&decoded.encode()), Ok(decoded));
        }
    }
}

/// `bytes` with its last 8 bytes replaced by a valid checksum (or 8 added when shorter).
fn with_checksum(mut bytes: Vec<u8>) -> bytes::Bytes {
    let keep = bytes.len().saturating_sub(8).max(4).min(bytes.len());
    bytes.truncate(keep);
    let checksum = xxhash_rust::xxh3::xxh3_64(&bytes);
    bytes.extend_from_slice(&checksum.to_be_bytes());
    bytes::Bytes::from(bytes)
}

/// A valid encoded entry with `headers`.
fn bulwark_entry(headers: HeaderMap) -> bytes::Bytes {
    let now = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
    Entry {
        key: "http://shop.example/p\nae=identity".into(),
        status: http::StatusCode::OK,
        headers,
        body: bytes::Bytes::from_static(b"body"),
        request_time: now,
        response_time: now,
        initial_age: std::time::Duration::ZERO,
        freshness_lifetime: std::time::Duration::from_secs(60),
        stale_while_revalidate: std::time::Duration::ZERO,
        stale_if_error: std::time::Duration::ZERO,
        no_stale: false,
        stale_on_error_always: false,
        tags: Vec::new(),
        invalidated: false,
        keep_for_revalidation: std::time::Duration::ZERO,
        variants: false,
        last_used: Default::default(),
    }
    .encode()
}
