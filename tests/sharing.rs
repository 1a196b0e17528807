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

#[tokio::test]
async fn a_response_marked_shared_serves_other_authenticated_requests() {
    let origin = Origin::start().await;
    origin.set(|parts| match parts.uri.path() {
        "/shared" => Reply::ok("catalogue for members").header("cache-control", "public, max-age=60"),
        _ => Reply::ok("anonymous copy").header("cache-control", "max-age=60"),
    });
    let bulwark = Bulwark::start(&TestConfig::new(&origin.url()).to_toml()).await;
    assert_eq!(bulwark.get_with("/shared", &[("authorization", "Bearer alice")]).await.cache_status(), "bulwark; fwd=miss; stored");
    let bob = bulwark.get_with("/shared", &[("authorization", "Bearer bob")]).await;
    assert_eq!((bob.text(), bob.cache_status()), ("catalogue for members", "bulwark; hit; detail=l1"));
    // A copy stored for an anonymous request without public/s-maxage/must-revalidate is
    // not served to an authenticated one: the origin is asked.
    assert_eq!(bulwark.get("/plain").await.cache_status(), "bulwark; fwd=miss; stored");
    let authed = bulwark.get_with("/plain", &[("authorization", "Bearer alice")]).await;
    assert_eq!(authed.cache_status(), "bulwark; fwd=miss; detail=authorization");
    assert_eq!(origin.count("/plain"), 2);
    assert_eq!(bulwark.get("/plain").await.cache_status(), "bulwark; hit; detail=l1", "the anonymous copy stays");
}

/// Sends `first` alone, then (while the origin holds it) 100 plain requests for the same
/// key; returns their statuses and Cache-Status values.
async fn herd_behind(bulwark: &std::sync::Arc<Bulwark>, path: &'static str, first: &'static [(&'static str, &'static str)]) -> Vec<(u16, String)> {
    let leader = {
        let b = bulwark.clone();
        tokio::spawn(async move { b.get_with(path, first).await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let herd: Vec<_> = (0..100)
        .map(|_| {
            let b = bulwark.clone();
            tokio::spawn(async move { b.get(path).await })
        })
        .collect();
    let _ = leader.await.expect("leader task");
    let mut out = Vec::new();
    for task in herd {
        let got = task.await.expect("task");
        out.push((got.status.as_u16(), got.cache_status().to_owned()));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_provoking_a_4xx_does_not_hand_it_to_the_herd_or_switch_coalescing_off() {
    let origin = Origin::start().await;
    origin.set(|parts| {
        let reply = Reply::ok("page").delay(std::time::Duration::from_millis(300));
        if parts.headers.get("x-huge").is_some_and(|v| v.len() > 16 * 1024) { reply.status(431).without_header("cache-control") } else { reply }
    });
    let bulwark = std::sync::Arc::new(Bulwark::start(&TestConfig::new(&origin.url()).to_toml()).await);
    let huge: &'static str = Box::leak("h".repeat(20 * 1024).into_boxed_str());
    let first: &'static [(&str, &str)] = Box::leak(vec![("x-huge", huge)].into_boxed_slice());
    let herd = herd_behind(&bulwark, "/p", first).await;
    assert!(herd.iter().all(|(status, _)| *status == 200), "{herd:?}");
    assert!(origin.total() <= 2, "the herd coalesced behind one new fetch: {} origin requests", origin.total());
    // Nothing was remembered against the key.
    assert_eq!(bulwark.get("/p").await.cache_status(), "bulwark; hit; detail=l1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_with_a_session_cookie_does_not_switch_coalescing_off() {
    let origin = Origin::start().await;
    origin.set(|parts| {
        let cookie = parts.headers.get("cookie").and_then(|v| v.to_str().ok()).unwrap_or("none").to_owned();
        Reply::ok(format!("hello {cookie}")).without_header("cache-control").delay(std::time::Duration::from_millis(300))
    });
    let bulwark = std::sync::Arc::new(Bulwark::start(&TestConfig::new(&origin.url()).to_toml()).await);
    let herd = herd_behind(&bulwark, "/home", &[("cookie", "x=1")]).await;
    assert!(herd.iter().all(|(status, cache)| *status == 200 && !cache.contains("cookie-heuristic")), "the leader's page went to the herd: {herd:?}");
    assert!(origin.total() <= 2, "the herd coalesced behind one new fetch: {} origin requests", origin.total());
    assert_eq!(bulwark.get("/home").await.text(), "hello none", "no client got the cookie's page");
}

#[tokio::test]
async fn a_pass_through_route_never_looks_up_stores_or_coalesces() {
    let origin = Origin::start().await;
    origin.set(|parts| Reply::ok(format!("page {}", parts.uri.path())).header("cache-control", "public, max-age=60"));
    let config = TestConfig::new(&origin.url()).with_route("name = \"account\"\npath_prefix = \"/account\"\norigin = \"catalog\"\ncache = false").to_toml();
    let bulwark = Bulwark::start(&config).await;
    for _ in 0..3 {
        let got = bulwark.get_with("/account/orders", &[("cookie", "session=alice")]).await;
        assert_eq!((got.text(), got.cache_status()), ("page /account/orders", "bulwark; fwd=bypass"));
    }
    assert_eq!(origin.count("/account/orders"), 3, "every request reaches the origin");
    // Concurrent requests are not coalesced either: each is its own user's.
    let bulwark = std::sync::Arc::new(bulwark);
    origin.set(|parts| {
        Reply::ok(format!("page {}", parts.uri.path())).header("cache-control", "public, max-age=60").delay(std::time::Duration::from_millis(200))
    });
    let together: Vec<_> = (0..5)
        .map(|_| {
            let b = bulwark.clone();
            tokio::spawn(async move { b.get("/account/cart").await.cache_status().to_owned() })
        })
        .collect();
    for task in together {
        assert_eq!(task.await.expect("task"), "bulwark; fwd=bypass");
    }
    assert_eq!(origin.count("/account/cart"), 5);
    assert_eq!(bulwark.metric("bulwark_requests_total", &[("route", "account"), ("pool", ""), ("cache", "bypass")]).await, 8.0);
    // The same answer on a caching route is stored.
    assert_eq!(bulwark.get("/other").await.cache_status(), "bulwark; fwd=miss; stored");
    assert_eq!(bulwark.get("/other").await.cache_status(), "bulwark; hit; detail=l1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_no_store_on_a_route_that_ignores_it_does_not_switch_caching_off() {
    let origin = Origin::start().await;
    origin.set(|_| Reply::ok("page").header("cache-control", "max-age=60").delay(std::time::Duration::from_millis(300)));
    let bulwark = std::sync::Arc::new(Bulwark::start(&TestConfig::new(&origin.url()).route("ignore_request_cache_control", true).to_toml()).await);
    let herd = herd_behind(&bulwark, "/pdp", &[("cache-control", "no-store")]).await;
    assert!(herd.iter().all(|(status, cache)| *status == 200 && cache == "bulwark; fwd=miss; collapsed"), "{herd:?}");
    assert_eq!(origin.total(), 1, "the leader's answer was stored for everyone");
    assert_eq!(bulwark.get("/pdp").await.cache_status(), "bulwark; hit; detail=l1");
}

#[tokio::test]
async fn an_authenticated_answer_marked_shared_gets_no_guessed_lifetime() {
    let origin = Origin::start().await;
    origin.set(|parts| {
        let who = parts.headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("anonymous").to_owned();
        Reply::ok(format!("page of {who}")).header("cache-control", "must-revalidate")
    });
    let bulwark = Bulwark::start(&TestConfig::new(&origin.url()).to_toml()).await;
    let alice = bulwark.get_with("/me", &[("authorization", "Bearer alice")]).await;
    assert_eq!(alice.cache_status(), "bulwark; fwd=miss; detail=authorization", "must-revalidate says shareable, not for how long");
    let anonymous = bulwark.get("/me").await;
    assert_eq!(anonymous.text(), "page of anonymous");
}

/// Sends `n` requests for `path` with `headers` at once; returns their statuses, bodies
/// and Cache-Status values.
async fn at_once(
    bulwark: &std::sync::Arc<Bulwark>,
    n: usize,
    path: &'static str,
    headers: &'static [(&'static str, &'static str)],
) -> Vec<(u16, String, String)> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let b = bulwark.clone();
            tokio::spawn(async move { b.get_with(path, headers).await })
        })
        .collect();
    let mut out = Vec::new();
    for task in tasks {
        let got = task.await.expect("task");
        out.push((got.status.as_u16(), got.text().to_owned(), got.cache_status().to_owned()));
    }
    out
}

const NO_STORE: &[(&str, &str)] = &[("cache-control", "no-store")];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_herd_of_no_store_requests_is_one_origin_request_and_stores_nothing() {
    let origin = Origin::start().await;
    origin.set(|_| Reply::ok("page").header("cache-control", "max-age=60").delay(std::time::Duration::from_millis(500)));
    let bulwark = std::sync::Arc::new(Bulwark::start(&TestConfig::new(&origin.url()).to_toml()).await);
    let herd = at_once(&bulwark, 100, "/pdp", NO_STORE).await;
    assert!(herd.iter().all(|(status, body, cache)| (*status, body.as_str(), cache.as_str()) == (200, "page", "bulwark; fwd=bypass")), "{herd:?}");
    assert_eq!(origin.total(), 1, "the herd shared one origin request");
    support::eventually("every request is recorded", std::time::Duration::from_secs(5), async || {
        bulwark.metric("bulwark_requests_total", &[("cache", "bypass")]).await == 100.0
    })
    .await;
    assert_eq!(bulwark.metric("bulwark_not_stored_total", &[]).await, 0.0, "a bypass is not a fill that was not stored");
    assert_eq!(bulwark.get("/pdp").await.cache_status(), "bulwark; fwd=miss; stored", "nothing of the no-store requests was stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_store_requests_never_join_a_fill_that_stores_nor_lend_theirs_to_one() {
    let origin = Origin::start().await;
    origin.set(|_| Reply::ok("page").header("cache-control", "max-age=60").delay(std::time::Duration::from_millis(400)));
    let bulwark = std::sync::Arc::new(Bulwark::start(&TestConfig::new(&origin.url()).to_toml()).await);
    let plain = {
        let b = bulwark.clone();
        tokio::spawn(async move { at_once(&b, 10, "/pdp", &[]).await })
    };
    let unstored = at_once(&bulwark, 10, "/pdp", NO_STORE).await;
    let plain = plain.await.expect("plain requests");
    assert!(unstored.iter().all(|(_, _, cache)| cache == "bulwark; fwd=bypass"), "{unstored:?}");
    let stored = plain.iter().filter(|(_, _, cache)| cache == "bulwark; fwd=miss; stored").count();
    let collapsed = plain.iter().filter(|(_, _, cache)| cache == "bulwark; fwd=miss; collapsed").count();
    assert_eq!((stored, collapsed), (1, 9), "{plain:?}");
    assert_eq!(origin.total(), 2, "one fill that stores, one that does not");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_answer_to_a_no_store_request_is_never_shared_with_another() {
    let origin = Origin::start().await;
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = seen.clone();
    origin.set(move |_| {
        let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Reply::ok(format!("page {n}")).header("cache-control", "private").delay(std::time::Duration::from_millis(300))
    });
    let bulwark = std::sync::Arc::new(Bulwark::start(&TestConfig::new(&origin.url()).to_toml()).await);
    let herd = at_once(&bulwark, 10, "/me", NO_STORE).await;
    let mut bodies: Vec<_> = herd.iter().map(|(_, body, _)| body.clone()).collect();
    bodies.sort();
    bodies.dedup();
    assert_eq!(bodies.len(), 10, "each its own answer: {herd:?}");
    assert!(herd.iter().all(|(_, _, cache)| cache == "bulwark; fwd=bypass"), "{herd:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_store_requests_share_the_origins_failure_without_storing_or_blaming_the_cache() {
    let origin = Origin::start().await;
    origin.set(|_| Reply::ok("down").status(503).delay(std::time::Duration::from_millis(300)));
    let bulwark = std::sync::Arc::new(Bulwark::start(&TestConfig::new(&origin.url()).to_toml()).await);
    let herd = at_once(&bulwark, 20, "/pdp", NO_STORE).await;
    assert!(herd.iter().all(|(status, body, cache)| (*status, body.as_str(), cache.as_str()) == (503, "down", "bulwark; fwd=bypass")), "{herd:?}");
    assert_eq!(origin.total(), 1);
}
