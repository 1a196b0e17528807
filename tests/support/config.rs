//! The configs tests start from, built as typed TOML tables: one origin `catalog`, one
//! pool `pdp`, one catch-all route `all`. Setting a key replaces its value, so a test's
//! change always takes effect (a text patch whose pattern is missing changes nothing and
//! says nothing), and `Config::parse` still validates the result like any file.

use toml::{Table, Value};

#[derive(Clone, Debug)]
pub struct TestConfig {
    server: Table,
    origin: Table,
    pool: Table,
    route: Table,
    /// Further routes, after `all` (the router takes the longest prefix, not the first).
    routes: Vec<Table>,
    /// Further origins, after `catalog`.
    origins: Vec<Table>,
}

fn table(pairs: &[(&str, Value)]) -> Table {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect()
}

impl TestConfig {
    /// Origin `catalog` at `origin_url` (timeout 5 s), pool `pdp` without Redis, route
    /// `all` for every path, no drain delay.
    pub fn new(origin_url: &str) -> TestConfig {
        TestConfig {
            server: table(&[("drain_delay", "0s".into())]),
            origin: table(&[("name", "catalog".into()), ("url", origin_url.into()), ("timeout", "5s".into())]),
            pool: table(&[("name", "pdp".into())]),
            route: table(&[("name", "all".into()), ("path_prefix", "/".into()), ("pool", "pdp".into()), ("origin", "catalog".into())]),
            routes: Vec::new(),
            origins: Vec::new(),
        }
    }

    /// The pool on the Redis at `url`, with a 50 ms deadline.
    pub fn redis(self, url: &str) -> TestConfig {
        self.pool("redis_url", url).pool("redis_timeout", "50ms")
    }

    /// The pool on a Redis Cluster, with a 100 ms deadline.
    pub fn cluster(self, nodes: &[String]) -> TestConfig {
        let nodes: Vec<Value> = nodes.iter().map(|n| n.as_str().into()).collect();
        self.pool("redis_cluster_nodes", nodes).pool("redis_timeout", "100ms")
    }

    /// The origin `catalog` on these endpoints instead of one `url`.
    pub fn endpoints(mut self, urls: &[String]) -> TestConfig {
        self.origin.remove("url");
        self.origin.insert("endpoints".to_owned(), Value::Array(urls.iter().map(|u| Value::from(u.as_str())).collect()));
        self
    }

    pub fn server(mut self, key: &str, value: impl Into<Value>) -> TestConfig {
        self.server.insert(key.to_owned(), value.into());
        self
    }

    pub fn origin(mut self, key: &str, value: impl Into<Value>) -> TestConfig {
        self.origin.insert(key.to_owned(), value.into());
        self
    }

    pub fn pool(mut self, key: &str, value: impl Into<Value>) -> TestConfig {
        self.pool.insert(key.to_owned(), value.into());
        self
    }

    /// A key of the route `all`.
    pub fn route(mut self, key: &str, value: impl Into<Value>) -> TestConfig {
        self.route.insert(key.to_owned(), value.into());
        self
    }

    /// Sets every key of `fragment` (TOML `key = value` lines) in `[server]`.
    pub fn server_toml(mut self, fragment: &str) -> TestConfig {
        self.server.extend(parse_fragment(fragment));
        self
    }

    /// Sets every key of `fragment` in the origin `catalog`.
    pub fn origin_toml(mut self, fragment: &str) -> TestConfig {
        self.origin.extend(parse_fragment(fragment));
        self
    }

    /// Sets every key of `fragment` in the pool.
    pub fn pool_toml(mut self, fragment: &str) -> TestConfig {
        self.pool.extend(parse_fragment(fragment));
        self
    }

    /// Sets every key of `fragment` in the route `all`.
    pub fn route_toml(mut self, fragment: &str) -> TestConfig {
        self.route.extend(parse_fragment(fragment));
        self
    }

    /// Another route, given as TOML `key = value` lines.
    pub fn with_route(mut self, fragment: &str) -> TestConfig {
        self.routes.push(parse_fragment(fragment));
        self
    }

    /// Another origin, given as TOML `key = value` lines.
    pub fn with_origin(mut self, fragment: &str) -> TestConfig {
        self.origins.push(parse_fragment(fragment));
        self
    }

    pub fn to_toml(&self) -> String {
        let mut doc = Table::new();
        doc.insert("server".into(), Value::Table(self.server.clone()));
        let origins = std::iter::once(&self.origin).chain(&self.origins).map(|o| Value::Table(o.clone())).collect();
        doc.insert("origins".into(), Value::Array(origins));
        doc.insert("pools".into(), Value::Array(vec![Value::Table(self.pool.clone())]));
        let routes = std::iter::once(&self.route).chain(&self.routes).map(|r| Value::Table(r.clone())).collect();
        doc.insert("routes".into(), Value::Array(routes));
        toml::to_string(&doc).expect("a test config renders as TOML")
    }
}

fn parse_fragment(fragment: &str) -> Table {
    fragment.parse::<Table>().unwrap_or_else(|e| panic!("test config fragment {fragment:?}: {e}"))
}
