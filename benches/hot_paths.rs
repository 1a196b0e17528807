//! Criterion benches for the functions on the hit path: key building (with path and
//! query normalisation), entry encoding and decoding, an L1 hit (lookup plus building
//! the response), and an L1 hit on a URL whose responses vary.

use std::hint::black_box;
use std::time::{Duration, SystemTime};

use bulwark::cache::local::LocalTier;
use bulwark::cache::{CacheKey, Encodings, Entry};
use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, StatusCode};

fn entry(key: &CacheKey, body_len: usize) -> Entry {
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    headers.insert("cache-control", HeaderValue::from_static("max-age=60"));
    headers.insert("date", HeaderValue::from_static("Sun, 22 Nov 2026 08:00:00 GMT"));
    headers.insert("etag", HeaderValue::from_static("\"5f1e-abcdef\""));
    headers.insert("content-length", HeaderValue::from(body_len));
    Entry {
        key: key.text.clone(),
        status: StatusCode::OK,
        headers,
        body: Bytes::from(vec![b'x'; body_len]),
        request_time: SystemTime::now(),
        response_time: SystemTime::now(),
        initial_age: Duration::ZERO,
        freshness_lifetime: Duration::from_secs(3600),
        stale_while_revalidate: Duration::from_secs(30),
        stale_if_error: Duration::from_secs(600),
        no_stale: false,
        stale_on_error_always: false,
        tags: Vec::new(),
        invalidated: false,
        keep_for_revalidation: Duration::ZERO,
        variants: false,
        last_used: Default::default(),
    }
}

fn key_building(c: &mut Criterion) {
    let ae = HeaderValue::from_static("gzip, deflate, br, zstd");
    c.bench_function("key/build", |b| {
        b.iter(|| {
            let encodings = Encodings::from_headers([black_box(&ae)]);
            CacheKey::new("https", black_box("shop.example"), black_box("/products/12345"), Some(black_box("color=red&size=m&utm_source=x")), encodings)
        })
    });
}

fn entry_codec(c: &mut Criterion) {
    let key = CacheKey::new("https", "shop.example", "/products/1", None, Encodings::GZIP);
    let entry = entry(&key, 2048);
    let encoded = entry.encode();
    c.bench_function("entry/encode_2KiB", |b| b.iter(|| black_box(&entry).encode()));
    c.bench_function("entry/decode_2KiB", |b| b.iter(|| Entry::decode(black_box(&encoded))));
}

fn l1_hit(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let tier = LocalTier::new(64 << 20, bulwark::clock::Clock::system());
    let keys: Vec<CacheKey> = (0..1000).map(|i| CacheKey::new("https", "shop.example", &format!("/products/{i}"), None, Encodings::GZIP)).collect();
    runtime.block_on(async {
        for key in &keys {
            tier.insert(key, std::sync::Arc::new(entry(key, 2048))).await;
        }
    });
    let mut i = 0usize;
    c.bench_function("l1/hit_and_respond_2KiB", |b| {
        b.to_async(&runtime).iter(|| {
            i = (i + 1) % keys.len();
            let key = &keys[i];
            let tier = &tier;
            async move {
                let entry = tier.get(key).await.expect("warm key");
                bulwark::proxy::respond::from_entry(&entry, true, SystemTime::now())
            }
        })
    });
}

fn l1_variant_hit(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let tier = LocalTier::new(64 << 20, bulwark::clock::Clock::system());
    let names = [http::header::ACCEPT_LANGUAGE];
    let mut request = HeaderMap::new();
    request.insert(http::header::ACCEPT_LANGUAGE, HeaderValue::from_static("de-DE,de;q=0.9,en;q=0.5"));
    let primaries: Vec<CacheKey> = (0..1000).map(|i| CacheKey::new("https", "shop.example", &format!("/products/{i}"), None, Encodings::GZIP)).collect();
    runtime.block_on(async {
        for primary in &primaries {
            let key = primary.variant(&names, &request);
            let variant = std::sync::Arc::new(entry(&key, 2048));
            let marker = std::sync::Arc::new(Entry::variants_marker(primary.text.clone(), &names, &variant));
            tier.insert_variant(primary, marker, &key, variant, 32).await;
        }
    });
    let mut i = 0usize;
    c.bench_function("l1/variant_hit_and_respond_2KiB", |b| {
        b.to_async(&runtime).iter(|| {
            i = (i + 1) % primaries.len();
            let (primary, tier, request, names) = (&primaries[i], &tier, &request, &names);
            async move {
                let Some(bulwark::cache::Slot::Variants(variants)) = tier.get_slot(primary.hash).await else { panic!("warm variants") };
                let entry = variants.find(&primary.variant(names, request)).expect("warm variant");
                bulwark::proxy::respond::from_entry(&entry, true, SystemTime::now())
            }
        })
    });
}

criterion_group!(benches, key_building, entry_codec, l1_hit, l1_variant_hit);
criterion_main!(benches);
