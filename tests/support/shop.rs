//! The shipped shop configuration (`config/shop.toml`) pointed at a local origin and Redis:
//! the same routes, pools and budgets.

/// The shop config as shipped.
pub const SHOP: &str = include_str!("../../config/shop.toml");

/// [`SHOP`] with every origin at `origin_url` (as `localhost`, a host name, which DNS
/// discovery needs) and every Redis on the redis-server at `redis_port` (one database
/// each), access lines off.
pub fn local_shop(origin_url: &str, redis_port: u16) -> String {
    let mut text = SHOP.to_owned();
    let here = origin_url.replace("127.0.0.1", "localhost");
    for service in ["catalog", "search", "storefront"] {
        text = text.replace(&format!("http://{service}-pods.shop.svc.cluster.local:8080"), &here);
    }
    for (n, server) in ["control", "pdp", "general"].into_iter().enumerate() {
        text = text.replace(&format!("redis://:${{REDIS_PASSWORD}}@redis-{server}:6379/0"), &format!("redis://127.0.0.1:{redis_port}/{n}"));
    }
    assert!(!text.contains("svc.cluster.local") && !text.contains("${"), "every remote address replaced");
    // Sampled access lines would only clutter a test's output.
    text.replace("access_log = \"json\"", "access_log = \"off\"")
}
