//! Request to route: the longest `path_prefix` that matches, among routes whose `host`
//! matches (or that have none). On equal prefixes an exact host beats a wildcard, and a
//! wildcard beats no host.

use crate::config::{HostMatch, RouteConfig};

pub struct Router {
    /// (route index, prefix, host), longest prefix first, then most specific host.
    entries: Vec<(usize, String, Option<HostMatch>)>,
}

fn host_rank(host: &Option<HostMatch>) -> u8 {
    match host {
        Some(HostMatch::Exact(_)) => 2,
        Some(HostMatch::Suffix(_)) => 1,
        None => 0,
    }
}

impl Router {
    pub fn new(routes: &[RouteConfig]) -> Router {
        let mut entries: Vec<_> = routes.iter().enumerate().map(|(i, r)| (i, r.path_prefix.clone(), r.host.clone())).collect();
        entries.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then(host_rank(&b.2).cmp(&host_rank(&a.2))));
        Router { entries }
    }

    /// Index of the route for `host` (lowercase, no port) and `path`.
    pub fn route(&self, host: &str, path: &str) -> Option<usize> {
        self.entries.iter().find(|(_, prefix, h)| path.starts_with(prefix.as_str()) && h.as_ref().is_none_or(|h| h.matches(host))).map(|(i, _, _)| *i)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::Config;

    #[test]
    fn longest_prefix_and_host_specificity() {
        let text = r#"
            [[origins]]
            name = "o"
            url = "http://127.0.0.1:1"
            [[pools]]
            name = "p"
            [[routes]]
            name = "all"
            path_prefix = "/"
            pool = "p"
            origin = "o"
            [[routes]]
            name = "products"
            path_prefix = "/products/"
            pool = "p"
            origin = "o"
            [[routes]]
            name = "shop-products"
            path_prefix = "/products/"
            host = "shop.example"
            pool = "p"
            origin = "o"
            [[routes]]
            name = "any-shop-products"
            path_prefix = "/products/"
            host = "*.shop.example"
            pool = "p"
            origin = "o"
            [[routes]]
            name = "search"
            path_prefix = "/search"
            pool = "p"
            origin = "o"
        "#;
        let config = Config::parse(text, Path::new("t.toml")).expect("valid");
        let router = Router::new(&config.routes);
        let name = |host: &str, path: &str| router.route(host, path).map(|i| config.routes[i].name.as_str());
        assert_eq!(name("other", "/products/1"), Some("products"));
        assert_eq!(name("shop.example", "/products/1"), Some("shop-products"));
        assert_eq!(name("eu.shop.example", "/products/1"), Some("any-shop-products"));
        assert_eq!(name("shop.example", "/cart"), Some("all"));
        assert_eq!(name("x", "/search?q=1"), Some("search"));
        assert_eq!(name("x", "/products"), Some("all"));

        let only_products = Router::new(&config.routes[1..2]);
        assert_eq!(only_products.route("x", "/cart"), None);
    }
}
