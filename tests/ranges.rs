//! `Range` answered from stored bodies (RFC 9110 section 14): 206 with `Content-Range` on
//! hits, stale copies, misses and collapsed answers; 416 past the end; `If-Range`; the
//! origin always asked for the whole object.

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::{Bulwark, Origin, Reply, TestConfig};

/// 1000 bytes, each its offset's last digit, so any part can be checked.
fn body() -> String {
    (0..1000).map(|i| char::from(b'0' + (i % 10) as u8)).collect()
}

fn part(start: usize, end: usize) -> String {
    body()[start..=end].to_owned()
}

async fn start(origin: &Origin) -> Bulwark {
    Bulwark::start(&TestConfig::new(&origin.url()).to_toml()).await
}

fn object_origin(origin: &Origin) {
    origin.set(|_| {
        Reply::ok(body())
            .header("cache-control", "max-age=2, stale-while-revalidate=60")
            .header("etag", "\"v1\"")
            .header("last-modified", "Tue, 01 Dec 2026 10:00:00 GMT")
    });
}

#[tokio::test]
async fn each_form_of_range_on_a_hit_is_answered_206_from_the_stored_body() {
    let origin = Origin::start().await;
    object_origin(&origin);
    let bulwark = start(&origin).await;
    assert_eq!(bulwark.get("/o").await.status, 200);
    for (range, start, end) in [("bytes=0-99", 0, 99), ("bytes=100-", 100, 999), ("bytes=-10", 990, 999), ("bytes=990-5000", 990, 999)] {
        let got = bulwark.get_with("/o", &[("range", range)]).await;
        assert_eq!(got.status, 206, "{range}");
        assert_eq!(got.cache_status(), "bulwark; hit; detail=l1", "{range}");
        assert_eq!(got.header("content-range"), Some(format!("bytes {start}-{end}/1000").as_str()), "{range}");
        assert_eq!(got.header("content-length"), Some((end - start + 1).to_string().as_str()), "{range}");
        assert_eq!(got.text(), part(start, end), "{range}");
        assert_eq!(got.header("etag"), Some("\"v1\""), "a 206 carries the stored response's fields");
    }
    assert_eq!(origin.total(), 1, "every range came from the stored copy");
}

#[tokio::test]
async fn a_range_past_the_end_gets_416_with_the_length_and_no_caching_fields() {
    let origin = Origin::start().await;
    object_origin(&origin);
    let bulwark = start(&origin).await;
    bulwark.get("/o").await;
    for range in ["bytes=1000-", "bytes=5000-6000", "bytes=-0"] {
        let got = bulwark.get_with("/o", &[("range", range)]).await;
        assert_eq!(got.status, 416, "{range}");
        assert_eq!(got.header("content-range"), Some("bytes */1000"), "{range}");
        assert_eq!(got.header("cache-control"), None, "a 416 must not look storable downstream");
    }
}

#[tokio::test]
async fn if_range_gives_the_part_only_for_the_stored_response() {
    let origin = Origin::start().await;
    object_origin(&origin);
    let bulwark = start(&origin).await;
    bulwark.get("/o").await;
    let matching = bulwark.get_with("/o", &[("range", "bytes=0-9"), ("if-range", "\"v1\"")]).await;
    assert_eq!((matching.status.as_u16(), matching.text()), (206, part(0, 9).as_str()));
    let changed = bulwark.get_with("/o", &[("range", "bytes=0-9"), ("if-range", "\"v0\"")]).await;
    assert_eq!((changed.status.as_u16(), changed.text().len()), (200, 1000), "another version: the whole body");
    let weak = bulwark.get_with("/o", &[("range", "bytes=0-9"), ("if-range", "W/\"v1\"")]).await;
    assert_eq!(weak.status, 200, "a weak entity tag never matches If-Range");
    let older = bulwark.get_with("/o", &[("range", "bytes=0-9"), ("if-range", "Mon, 30 Nov 2026 10:00:00 GMT")]).await;
    assert_eq!(older.status, 200);
}

#[tokio::test]
async fn several_ranges_and_head_are_answered_whole() {
    let origin = Origin::start().await;
    object_origin(&origin);
    let bulwark = start(&origin).await;
    bulwark.get("/o").await;
    let several = bulwark.get_with("/o", &[("range", "bytes=0-9,20-29")]).await;
    assert_eq!((several.status.as_u16(), several.text().len()), (200, 1000));
    let head = bulwark.request(http::Request::head(bulwark.url("/o")).header("range", "bytes=0-9").body(Default::default()).expect("request")).await;
    assert_eq!((head.status.as_u16(), head.header("content-length")), (200, Some("1000")));
}

#[tokio::test]
async fn a_range_on_a_miss_fetches_the_whole_object_stores_it_and_answers_the_part() {
    let origin = Origin::start().await;
    object_origin(&origin);
    let bulwark = start(&origin).await;
    let got = bulwark.get_with("/o", &[("range", "bytes=10-19"), ("if-range", "\"v1\"")]).await;
    assert_eq!((got.status.as_u16(), got.cache_status(), got.text()), (206, "bulwark; fwd=miss; stored", part(10, 19).as_str()));
    let (asked, _) = origin.last_request();
    assert_eq!(asked.headers.get("range"), None, "the origin is asked for the whole object");
    assert_eq!(asked.headers.get("if-range"), None);
    let whole = bulwark.get("/o").await;
    assert_eq!((whole.status.as_u16(), whole.cache_status(), whole.text().len()), (200, "bulwark; hit; detail=l1", 1000));
}

#[tokio::test]
async fn a_stale_copy_serves_ranges_too() {
    let origin = Origin::start().await;
    object_origin(&origin);
    let bulwark = start(&origin).await;
    bulwark.get("/o").await;
    bulwark.advance(Duration::from_secs(5));
    let got = bulwark.get_with("/o", &[("range", "bytes=-5")]).await;
    assert_eq!(got.cache_status(), "bulwark; hit; fwd=stale; detail=stale-while-revalidate");
    assert_eq!((got.status.as_u16(), got.text()), (206, part(995, 999).as_str()));
    // If-Range on the stale copy: its validator gives the part, another the whole.
    let matching = bulwark.get_with("/o", &[("range", "bytes=0-9"), ("if-range", "\"v1\"")]).await;
    assert_eq!((matching.status.as_u16(), matching.text()), (206, part(0, 9).as_str()));
    let changed = bulwark.get_with("/o", &[("range", "bytes=0-9"), ("if-range", "\"v0\"")]).await;
    assert_eq!((changed.status.as_u16(), changed.text().len()), (200, 1000));
}

#[tokio::test]
async fn a_range_on_a_miss_with_an_if_range_for_another_version_gets_the_whole_object() {
    let origin = Origin::start().await;
    object_origin(&origin);
    let bulwark = start(&origin).await;
    let got = bulwark.get_with("/o", &[("range", "bytes=10-19"), ("if-range", "\"v0\"")]).await;
    assert_eq!((got.status.as_u16(), got.cache_status(), got.text().len()), (200, "bulwark; fwd=miss; stored", 1000));
    assert_eq!(got.header("content-range"), None);
    let (asked, _) = origin.last_request();
    assert_eq!((asked.headers.get("range"), asked.headers.get("if-range")), (None, None), "the origin is asked for the whole object");
}

#[tokio::test]
async fn a_range_request_and_a_plain_one_for_a_cold_key_share_one_fetch_and_each_get_their_answer() {
    let origin = Origin::start().await;
    origin.set(|_| Reply::ok(body()).header("cache-control", "max-age=60").delay(Duration::from_millis(300)));
    let bulwark = Arc::new(start(&origin).await);
    let ranged = {
        let bulwark = bulwark.clone();
        tokio::spawn(async move { bulwark.get_with("/cold", &[("range", "bytes=500-509")]).await })
    };
    let plain = {
        let bulwark = bulwark.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            bulwark.get("/cold").await
        })
    };
    let (ranged, plain) = (ranged.await.expect("ranged"), plain.await.expect("plain"));
    assert_eq!((ranged.status.as_u16(), ranged.text()), (206, part(500, 509).as_str()));
    assert_eq!((plain.status.as_u16(), plain.text().len()), (200, 1000));
    assert_eq!(origin.total(), 1, "one fetch for both");
}

/// An origin that answers ranges itself, with a body that is never stored.
fn ranging_origin(origin: &Origin) {
    origin.set(|parts| {
        let unstored = |reply: Reply| reply.header("cache-control", "no-store").header("etag", "\"v1\"");
        match parts.headers.get("range").and_then(|v| v.to_str().ok()) {
            Some("bytes=0-9") => unstored(Reply::ok(part(0, 9))).status(206).header("content-range", "bytes 0-9/1000"),
            _ => unstored(Reply::ok(body())),
        }
    });
}

#[tokio::test]
async fn a_range_for_a_key_known_not_to_be_stored_goes_to_the_origin_unchanged() {
    let origin = Origin::start().await;
    ranging_origin(&origin);
    let bulwark = start(&origin).await;
    let first = bulwark.get_with("/live", &[("range", "bytes=0-9")]).await;
    assert_eq!((first.status.as_u16(), first.text().len()), (200, 1000), "not known yet: the whole object was asked for");
    assert_eq!(origin.last_request().0.headers.get("range"), None);
    // Now hit-for-miss: the client's Range and If-Range go on as they are.
    let second = bulwark.get_with("/live", &[("range", "bytes=0-9"), ("if-range", "\"v1\"")]).await;
    assert_eq!((second.status.as_u16(), second.header("content-range"), second.text()), (206, Some("bytes 0-9/1000"), part(0, 9).as_str()));
    let (asked, _) = origin.last_request();
    assert_eq!(asked.headers.get("range").map(|v| v.as_bytes()), Some(&b"bytes=0-9"[..]));
    assert_eq!(asked.headers.get("if-range").map(|v| v.as_bytes()), Some(&b"\"v1\""[..]));
    let plain = bulwark.get("/live").await;
    assert_eq!((plain.status.as_u16(), plain.text().len()), (200, 1000), "the origin's 206 was not kept for anyone");
    assert_eq!(origin.last_request().0.headers.get("range"), None);
}

#[tokio::test]
async fn a_head_for_a_key_known_not_to_be_stored_sends_no_range_and_gets_the_whole_length() {
    let origin = Origin::start().await;
    ranging_origin(&origin);
    let bulwark = start(&origin).await;
    bulwark.get("/live").await;
    let head = bulwark.request(http::Request::head(bulwark.url("/live")).header("range", "bytes=0-9").body(Default::default()).expect("request")).await;
    assert_eq!((head.status.as_u16(), head.header("content-length"), head.header("content-range")), (200, Some("1000"), None));
    assert_eq!(origin.last_request().0.headers.get("range"), None, "range handling is defined for GET only");
}

/// Hit-for-miss lasts 5 s from the last answer that was not storable: a key that stays
/// uncacheable keeps sending its ranges to the origin, not through a flight that would
/// ask for (and send) the whole object.
#[tokio::test]
async fn a_key_that_stays_uncacheable_keeps_passing_ranges_on() {
    let origin = Origin::start().await;
    ranging_origin(&origin);
    let bulwark = start(&origin).await;
    bulwark.get("/live").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(bulwark.get("/live").await.status, 200, "answered directly, and remembered again");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let seek = bulwark.get_with("/live", &[("range", "bytes=0-9")]).await;
    assert_eq!((seek.status.as_u16(), seek.text()), (206, part(0, 9).as_str()), "6 s after the first answer, the key is still hit-for-miss");
}

#[tokio::test]
async fn a_conditional_that_matches_wins_over_the_range() {
    let origin = Origin::start().await;
    object_origin(&origin);
    let bulwark = start(&origin).await;
    bulwark.get("/o").await;
    let got = bulwark.get_with("/o", &[("range", "bytes=0-9"), ("if-none-match", "\"v1\"")]).await;
    assert_eq!(got.status, 304);
}

#[tokio::test]
async fn if_range_with_the_stored_last_modified_gives_the_part() {
    let origin = Origin::start().await;
    let modified = httpdate::fmt_http_date(std::time::SystemTime::now() - Duration::from_secs(3600));
    let stored = modified.clone();
    origin.set(move |_| Reply::ok(body()).header("cache-control", "max-age=60").header("last-modified", &stored));
    let bulwark = start(&origin).await;
    bulwark.get("/m").await;
    let got = bulwark.get_with("/m", &[("range", "bytes=0-9"), ("if-range", &modified)]).await;
    assert_eq!((got.status.as_u16(), got.text()), (206, part(0, 9).as_str()));
}

#[tokio::test]
async fn a_part_carries_no_digest_of_the_whole() {
    let origin = Origin::start().await;
    origin.set(|_| Reply::ok(body()).header("cache-control", "max-age=60").header("content-digest", "sha-256=:AAAA:"));
    let bulwark = start(&origin).await;
    bulwark.get("/d").await;
    let got = bulwark.get_with("/d", &[("range", "bytes=0-9")]).await;
    assert_eq!((got.status.as_u16(), got.header("content-digest")), (206, None));
    assert_eq!(bulwark.get("/d").await.header("content-digest"), Some("sha-256=:AAAA:"), "the whole keeps it");
}
