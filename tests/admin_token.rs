//! With BULWARK_ADMIN_TOKEN set, /admin/* needs the bearer token; health and metrics
//! stay open. (Its own test binary: the token is read from the process environment.)

mod support;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use support::{Bulwark, Origin, simple_config};

#[tokio::test]
async fn admin_endpoints_need_the_token_and_probes_do_not() {
    // SAFETY: this test binary has this one test, so no other thread reads the
    // environment while it is written.
    unsafe { std::env::set_var(bulwark::admin::ADMIN_TOKEN_ENV, "s3cret-token") };
    let origin = Origin::start().await;
    let bulwark = Bulwark::start(&simple_config(&origin.url(), None, "")).await;
    let admin = |path: &str, token: Option<&str>| {
        let mut req = Request::get(format!("http://{}{}", bulwark.admin_addr, path));
        if let Some(token) = token {
            req = req.header("authorization", token);
        }
        req.body(Full::<Bytes>::default()).expect("request")
    };
    assert_eq!(bulwark.request(admin("/admin/routes", None)).await.status, 401);
    assert_eq!(bulwark.request(admin("/admin/routes", Some("Bearer wrong-token!"))).await.status, 401);
    assert_eq!(bulwark.request(admin("/admin/routes", Some("Bearer s3cret-tok"))).await.status, 401);
    assert_eq!(bulwark.request(admin("/admin/routes", Some("s3cret-token"))).await.status, 401);
    assert_eq!(bulwark.request(admin("/admin/routes", Some("Bearer s3cret-token"))).await.status, 200);
    let purge = Request::post(format!("http://{}/admin/purge", bulwark.admin_addr)).body(Full::new(Bytes::from_static(br#"{"tags":["x"]}"#))).expect("request");
    assert_eq!(bulwark.request(purge).await.status, 401);
    for open in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(bulwark.request(admin(open, None)).await.status, 200, "{open}");
    }
}
