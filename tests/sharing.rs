//! Who may share a stored response (DESIGN.md): one user's page is never another's.
//! Requests with `Cookie` get no heuristic freshness, analytics cookies can be ignored,
//! and `Authorization` follows RFC 9111 section 3.5.

mod support;

use support::{Bulwark, Origin, Reply, TestConfig};

/// An origin that renders a page per session cookie, the way frameworks do by default:
/// no `Cache-Control` at all, unless `cache_control` is given.
fn per_session(origin: &Origin, cache_control: Option<&'static str>) {
    origin.set(move |parts| {
        let cookie = parts.headers.get("cookie").and_then(|v| v.to_str().ok()).unwrap_or("none").to_owned();
        let reply = Reply::ok(format!("hello {cookie}")).without_header("cache-control");
        match cache_control {
            Some(cc) => reply.header("cache-control", cc),
            None => reply,
        }
    });
}

#[tokio::test]
async fn a_page_rendered_for_one_session_is_never_served_to_another() {
    let origin = Origin::start().await;
    per_session(&origin, None);
    let bulwark = Bulwark::start(&TestConfig::new(&origin.url()).to_toml()).await;
    let alice = bulwark.get_with("/account", &[("cookie", "session=alice")]).await;
    assert_eq!((alice.text(), alice.cache_status()), ("hello session=alice", "bulwark; fwd=miss; detail=cookie-heuristic"));
    let bob = bulwark.get_with("/account", &[("cookie", "session=bob")]).await;
    assert_eq!((bob.text(), bob.cache_status()), ("hello session=bob", "bulwark; fwd=miss; detail=cookie-heuristic"));
    assert_eq!(origin.total(), 2);
    assert_eq!(bulwark.metric("bulwark_not_stored_total", &[("route", "all"), ("reason", "cookie-heuristic")]).await, 2.0);
    // Without a cookie the same answer is kept for default_ttl, as before.
    assert_eq!(bulwark.get("/account").await.cache_status(), "bulwark; fwd=miss; stored");
    let anonymous = bulwark.get("/account").await;
    assert_eq!((anonymous.text(), anonymous.cache_status()), ("hello none", "bulwark; hit; detail=l1"));
    // And a session's request is not answered with it either: nothing is shared by guess.
    let carol = bulwark.get_with("/account", &[("cookie", "session=carol")]).await;
    assert_eq!(carol.cache_status(), "bulwark; hit; detail=l1", "a stored anonymous page is what the origin gave everyone");
}

#[tokio::test]
async fn ignored_analytics_cookies_neither_block_caching_nor_reach_the_origin() {
    let origin = Origin::start().await;
    per_session(&origin, None);
    let config = TestConfig::new(&origin.url()).route("ignore_cookies", vec!["_ga*", "_gid"]).to_toml();
    let bulwark = Bulwark::start(&config).await;
    let first = bulwark.get_with("/products/1", &[("cookie", "_ga=GA1.2.3; _ga_XYZ=1; _gid=7")]).await;
    assert_eq!((first.text(), first.cache_status()), ("hello none", "bulwark; fwd=miss; stored"));
    assert!(origin.last_request().0.headers.get("cookie").is_none(), "ignored cookies do not reach the origin");
    let second = bulwark.get_with("/products/1", &[("cookie", "_ga=GA1.9.9")]).await;
    assert_eq!(second.cache_status(), "bulwark; hit; detail=l1");
    // A session cookie next to them still counts, and reaches the origin without them.
    let session = bulwark.get_with("/products/2", &[("cookie", "_ga=1; session=alice; _gid=2")]).await;
    assert_eq!((session.text(), session.cache_status()), ("hello session=alice", "bulwark; fwd=miss; detail=cookie-heuristic"));
}

#[tokio::test]
async fn explicit_freshness_shares_a_page_requested_with_a_cookie() {
    let origin = Origin::start().await;
    per_session(&origin, Some("public, max-age=60"));
    let bulwark = Bulwark::start(&TestConfig::new(&origin.url()).to_toml()).await;
    assert_eq!(bulwark.get_with("/catalog", &[("cookie", "session=alice")]).await.cache_status(), "bulwark; fwd=miss; stored");
    let bob = bulwark.get_with("/catalog", &[("cookie", "session=bob")]).await;
    assert_eq!((bob.text(), bob.cache_status()), ("hello session=alice", "bulwark; hit; detail=l1"), "the origin declared it shareable");
    assert_eq!(origin.total(), 1);
}

#[tokio::test]
async fn force_ttl_or_keying_on_cookie_lift_the_cookie_rule() {
    let origin = Origin::start().await;
    per_session(&origin, None);
    let forced = Bulwark::start(&TestConfig::new(&origin.url()).route("force_ttl", "60s").to_toml()).await;
    assert_eq!(forced.get_with("/f", &[("cookie", "session=alice")]).await.cache_status(), "bulwark; fwd=miss; stored");
    let keyed = Bulwark::start(&TestConfig::new(&origin.url()).route("key_headers", vec!["Cookie"]).to_toml()).await;
    assert_eq!(keyed.get_with("/k", &[("cookie", "session=alice")]).await.cache_status(), "bulwark; fwd=miss; stored");
    let bob = keyed.get_with("/k", &[("cookie", "session=bob")]).await;
    assert_eq!((bob.text(), bob.cache_status()), ("hello session=bob", "bulwark; fwd=miss; stored"), "each session its own copy");
    assert_eq!(keyed.get_with("/k", &[("cookie", "session=alice")]).await.text(), "hello session=alice");
}

#[tokio::test]
async fn an_authenticated_answer_with_max_age_alone_is_not_reused() {
    let origin = Origin::start().await;
    origin.set(|_| Reply::ok("account of the bearer").header("cache-control", "max-age=60"));
    let bulwark = Bulwark::start(&TestConfig::new(&origin.url()).to_toml()).await;
    for token in ["Bearer alice", "Bearer bob"] {
        let got = bulwark.get_with("/me", &[("authorization", token)]).await;
        assert_eq!(got.cache_status(), "bulwark; fwd=miss; detail=authorization", "{token}");
    }
    assert_eq!(origin.total(), 2);
}
