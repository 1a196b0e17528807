use std::path::Path;

use super::*;

const MINIMAL: &str = r#"
[[origins]]
name = "catalog"
url = "http://127.0.0.1:8081"

[[pools]]
name = "pdp"

[[routes]]
name = "product-detail"
path_prefix = "/products/"
pool = "pdp"
origin = "catalog"
"#;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new("bulwark.toml"))
}

fn error_of(text: &str) -> String {
    parse(text).expect_err("config should be rejected").to_string()
}

#[test]
fn minimal_config_gets_the_documented_defaults() {
    let config = parse(MINIMAL).expect("minimal config is valid");
    assert_eq!(config.server.listen.to_string(), "0.0.0.0:8080");
    assert_eq!(config.server.admin_listen.to_string(), "127.0.0.1:9901");
    assert_eq!(config.server.keepalive_idle, Duration::from_secs(75));
    let pool = &config.pools[0];
    assert_eq!(pool.key_prefix, "bulwark:pdp:");
    assert_eq!(pool.l1_max_bytes, 256 << 20);
    assert_eq!(pool.max_object_bytes, 8 << 20);
    assert!(pool.shared.is_none());
    assert_eq!(config.origins[0].max_concurrency, 256);
    assert_eq!(config.routes[0].pool, Some(0));
    assert!(config.routes[0].cacheable);
    assert_eq!(config.routes[0].mode, RouteMode::Normal);
}

#[test]
fn unknown_key_names_key_and_line() {
    let text = MINIMAL.replace("name = \"pdp\"", "name = \"pdp\"\nl1_max_byte = \"1MiB\"");
    let message = error_of(&text);
    assert!(message.starts_with("bulwark.toml:8:1: "), "{message}");
    assert!(message.contains("l1_max_byte"), "{message}");
}

#[test]
fn bad_duration_points_at_value() {
    let text = MINIMAL.replace("url = \"http://127.0.0.1:8081\"", "url = \"http://127.0.0.1:8081\"\ntimeout = \"10 parsecs\"");
    let message = error_of(&text);
    assert!(message.starts_with("bulwark.toml:5:11: "), "{message}");
    assert!(message.contains("parsecs"), "{message}");
}

#[test]
fn route_naming_missing_pool_is_rejected_at_its_line() {
    let text = MINIMAL.replace("pool = \"pdp\"", "pool = \"pdq\"");
    let message = error_of(&text);
    assert!(message.starts_with("bulwark.toml:12:8: "), "{message}");
    assert!(message.contains("unknown pool \"pdq\""), "{message}");
}

#[test]
fn other_cross_checks() {
    assert!(error_of(&MINIMAL.replace("path_prefix = \"/products/\"", "path_prefix = \"products/\"")).contains("must start with '/'"));
    assert!(error_of(&MINIMAL.replace("http://127", "ftp://127")).contains("http:// or https://"));
    assert!(error_of(&MINIMAL.replace("name = \"pdp\"", "name = \"pdp\"\nredis_timeout = \"5ms\"")).contains("only allowed with redis_url"));
    assert!(error_of(&format!("{MINIMAL}\nmode = \"fallback\"")).contains("needs a `fallback`"));
    assert!(error_of(&format!("{MINIMAL}\nmode = \"sideways\"")).contains("sideways"));
    assert!(error_of(&format!("{MINIMAL}\n[[pools]]\nname = \"pdp\"")).contains("duplicate pool name"));
    assert!(error_of(&MINIMAL.replace("name = \"pdp\"", "name = \"pdp\"\nredis_url = \"nope://x\"")).contains("invalid Redis URL"));
    let both = MINIMAL.replace("name = \"pdp\"", "name = \"pdp\"\nredis_url = \"redis://a\"\nredis_cluster_nodes = [\"redis://b\"]");
    assert!(error_of(&both).contains("not both"));
    let cluster = MINIMAL
        .replace("name = \"pdp\"", "name = \"pdp\"\nredis_cluster_nodes = [\"redis://10.0.0.1:7000\", \"redis://10.0.0.2:7000\"]\nredis_timeout = \"20ms\"");
    let shared = parse(&cluster).expect("cluster config").pools[0].shared.clone().expect("shared tier");
    assert_eq!(shared.endpoint, RedisEndpoint::Cluster(vec!["redis://10.0.0.1:7000".into(), "redis://10.0.0.2:7000".into()]));
    assert!(error_of("[server]\ntrusted_proxies = [\"10.0.0.0/33\"]").contains("prefix length"));
    assert!(error_of("[server]\nlisten = \"localhost\"").starts_with("bulwark.toml:2:10: "));
    assert!(error_of("[server]\nkeepalive_idle = \"0s\"").contains("keepalive_idle must be greater than zero"));
    assert!(
        error_of(&MINIMAL.replace("url = \"http://127.0.0.1:8081\"", "url = \"http://127.0.0.1:8081\"\ntimeout = \"0ms\""))
            .starts_with("bulwark.toml:5:11: timeout must be greater than zero")
    );
}

#[test]
fn fallback_and_host_are_typed() {
    let text = format!(
        "{MINIMAL}host = \"*.Shop.example\"\nmode = \"fallback\"\nfallback = {{ status = 200, headers = {{ \"content-type\" = \"application/json\" }}, body = \"[]\" }}\n"
    );
    let config = parse(&text).expect("valid");
    let route = &config.routes[0];
    assert_eq!(route.host, Some(HostMatch::Suffix(".shop.example".into())));
    assert!(route.host.as_ref().is_some_and(|h| h.matches("www.shop.example") && !h.matches("shop.example")));
    let fallback = route.fallback.as_ref().expect("fallback");
    assert_eq!(&fallback.body[..], b"[]");
    assert_eq!(fallback.headers["content-type"], "application/json");
}

#[test]
fn cidr_matching() {
    let net = Cidr::parse("10.1.0.0/16").expect("valid");
    assert!(net.contains("10.1.200.3".parse().expect("ip")));
    assert!(!net.contains("10.2.0.1".parse().expect("ip")));
    assert!(net.contains("::ffff:10.1.0.9".parse().expect("ip")));
    assert!(Cidr::parse("0.0.0.0/0").expect("valid").contains("8.8.8.8".parse().expect("ip")));
    assert!(Cidr::parse("::1").expect("valid").contains("::1".parse().expect("ip")));
}

#[test]
fn shipped_example_configs_are_valid() {
    for file in ["config/bulwark.example.toml", "config/local.toml"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
        Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
fn config_embedded_in_the_kubernetes_configmap_is_the_shop_example() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let manifest = std::fs::read_to_string(root.join("k8s/configmap.yaml")).expect("configmap");
    let (_, body) = manifest.split_once("bulwark.toml: |\n").expect("configmap embeds bulwark.toml");
    let toml: String = body.lines().map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l))).collect();
    let shop = std::fs::read_to_string(root.join("config/shop.toml")).expect("config/shop.toml");
    assert!(toml == shop, "k8s/configmap.yaml must embed config/shop.toml as it is");
    let env = |name: &str| (name == "REDIS_PASSWORD").then(|| "from-a-secret".to_owned());
    Config::parse_with_env(&toml, Path::new("k8s/configmap.yaml"), env).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn ignore_cookies_takes_names_and_prefixes() {
    let config = parse(&format!("{MINIMAL}ignore_cookies = [\"_ga*\", \"_fbp\"]\n")).expect("valid");
    let ignored = &config.routes[0].cache.ignore_cookies;
    assert_eq!(ignored, &[ParamPattern::Prefix("_ga".into()), ParamPattern::Exact("_fbp".into())]);
    let bad = error_of(&format!("{MINIMAL}ignore_cookies = [\"a=b\"]\n"));
    assert!(bad.contains("bulwark.toml:14:") && bad.contains("ignore_cookies") && bad.contains("not a cookie name"), "{bad}");
}

#[test]
fn query_params_is_an_allow_list_and_excludes_ignore_query_params() {
    let config = parse(&format!("{MINIMAL}query_params = [\"page\", \"f_*\"]\n")).expect("valid");
    let rules = &config.routes[0].cache;
    assert_eq!(rules.query_params, Some(vec![ParamPattern::Exact("page".into()), ParamPattern::Prefix("f_".into())]));
    assert!(rules.keeps_query_param("page") && rules.keeps_query_param("f_size") && !rules.keeps_query_param("utm_source"));
    assert!(parse(MINIMAL).expect("valid").routes[0].cache.keeps_query_param("anything"), "no allow-list: every parameter kept");
    let both = error_of(&format!("{MINIMAL}query_params = [\"page\"]\nignore_query_params = [\"utm_*\"]\n"));
    assert!(both.contains("bulwark.toml:14:") && both.contains("not both"), "{both}");
    let bad = error_of(&format!("{MINIMAL}query_params = [\"a&b\"]\n"));
    assert!(bad.contains("bulwark.toml:14:") && bad.contains("query_params"), "{bad}");
}

#[test]
fn admission_budgets_are_validated_and_per_client_needs_trusted_proxies() {
    let with = |server: &str, admission: &str| format!("[server]\n{server}\n{}admission = {admission}\n", MINIMAL.trim_start());
    let behind_alb = parse(&with("trusted_proxies = [\"10.0.0.0/8\"]", r#"{ per_client = "20/s", new_keys = "600/m" }"#)).expect("valid");
    let admission = behind_alb.routes[0].admission.clone().expect("admission");
    assert_eq!(admission.per_client.map(|b| (b.rate.per_second(), b.burst)), Some((20.0, 20)), "burst: one second's worth");
    assert_eq!(admission.new_keys.map(|b| (b.rate.per_second(), b.burst)), Some((10.0, 10)));
    assert_eq!((admission.client, admission.methods), (ClientBy::Address, vec![http::Method::GET, http::Method::HEAD]));
    assert_eq!(admission.lease_block, 10);
    let one_by_one = parse(&with("", r#"{ new_keys = "100/s", lease_block = 1 }"#)).expect("valid");
    assert_eq!(one_by_one.routes[0].admission.as_ref().map(|a| a.lease_block), Some(1));
    // Behind a load balancer every peer is one of its nodes: a budget per peer would
    // throttle the whole site, so check refuses it (with the line).
    let open = error_of(&with("", r#"{ per_client = "20/s" }"#));
    assert!(open.contains("bulwark.toml:") && open.contains("trusted_proxies"), "{open}");
    assert!(parse(&with("", r#"{ per_client = "20/s", client = "peer" }"#)).is_ok());
    assert!(parse(&with("", r#"{ new_keys = "100/s" }"#)).is_ok(), "new_keys needs no client");
    for (bad, says) in [
        (r#"{ per_client = "20" }"#, "rate"),
        (r#"{ per_client = "0/s", client = "peer" }"#, "more than zero"),
        (r#"{ per_client = "5/s", per_client_burst = 0, client = "peer" }"#, "per_client_burst"),
        (r#"{ per_client_burst = 5 }"#, "without per_client"),
        (r#"{ new_keys = "5/s", client = "ip" }"#, "client"),
        (r#"{ new_keys = "5/s", methods = ["get"] }"#, "method"),
        (r#"{ }"#, "per_client or new_keys"),
        (r#"{ per_minute = 5 }"#, "unknown field"),
        (r#"{ new_keys = "5/s", methods = [] }"#, "methods is empty"),
        (r#"{ new_keys = "5/s", client = "header:X-Forwarded-For" }"#, "written by the client"),
        (r#"{ new_keys = "5/s", client = "header:forwarded" }"#, "written by the client"),
        (r#"{ new_keys = "5/s", lease_block = 0 }"#, "lease_block"),
        (r#"{ new_keys = "5/s", lease_block = 101 }"#, "lease_block"),
    ] {
        let message = error_of(&with("", bad));
        assert!(message.contains("bulwark.toml:") && message.contains(says), "{bad}: {message}");
    }
}

#[test]
fn force_ttl_on_a_route_that_keeps_session_cookies_is_warned_about() {
    assert!(parse(MINIMAL).expect("valid").warnings().is_empty());
    let forced = parse(&format!("{MINIMAL}force_ttl = \"30s\"\n")).expect("valid");
    let warnings = forced.warnings();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("\"product-detail\"") && warnings[0].contains("Cookie"), "{warnings:?}");
    for lifted in ["strip_cookies = true", "key_headers = [\"Cookie\"]"] {
        let config = parse(&format!("{MINIMAL}force_ttl = \"30s\"\n{lifted}\n")).expect("valid");
        assert!(config.warnings().is_empty(), "{lifted}");
    }
}

#[test]
fn only_a_pass_through_route_may_have_no_pool() {
    let without_pool = MINIMAL.replace("pool = \"pdp\"\norigin", "origin");
    let refused = error_of(&without_pool);
    assert!(refused.contains("bulwark.toml:10:") && refused.contains("needs a `pool`"), "{refused}");
    let pass_through = parse(&format!("{without_pool}cache = false\n")).expect("valid");
    assert_eq!((pass_through.routes[0].pool, pass_through.routes[0].cacheable), (None, false));
}

#[test]
fn listen_backlog_is_a_positive_number() {
    assert_eq!(parse(MINIMAL).expect("valid").server.listen_backlog, 4096);
    let set = parse(&format!("[server]\nlisten_backlog = 1000\n{MINIMAL}")).expect("valid");
    assert_eq!(set.server.listen_backlog, 1000);
    for bad in ["0", "-1", "5000000000"] {
        let refused = error_of(&format!("[server]\nlisten_backlog = {bad}\n{MINIMAL}"));
        assert!(refused.contains("bulwark.toml:2:") && refused.contains("listen_backlog"), "{bad}: {refused}");
    }
}

#[test]
fn a_zero_queue_timeout_or_breaker_open_for_is_refused_at_its_line() {
    let origins = "[[origins]]\nname = \"catalog\"\nurl = \"http://127.0.0.1:8081\"\n";
    let rest = MINIMAL.replacen("[[origins]]\nname = \"catalog\"\nurl = \"http://127.0.0.1:8081\"\n", "", 1);
    for key in ["queue_timeout", "breaker_open_for"] {
        let text = format!("{origins}{key} = \"0s\"\n{rest}");
        let refused = error_of(&text);
        assert!(refused.contains("bulwark.toml:4:") && refused.contains(&format!("{key} must be greater than zero")), "{refused}");
    }
    let no_queue = parse(&format!("{origins}max_queue = 0\n{rest}")).expect("max_queue = 0 means no queue");
    assert_eq!(no_queue.origins[0].max_queue, 0);
}

#[test]
fn a_replica_id_with_spaces_is_rejected_and_a_given_one_is_kept() {
    let message = error_of(&format!("[server]\nreplica_id = \"pod a\"\n{MINIMAL}"));
    assert!(message.contains("bulwark.toml:2") && message.contains("replica_id"), "{message}");
    let config = parse(&format!("[server]\nreplica_id = \"web-7f9c\"\n{MINIMAL}")).expect("valid");
    assert_eq!(config.server.replica_id, "web-7f9c");
}

#[test]
fn check_warns_of_objects_that_could_never_be_stored_or_written() {
    let text = MINIMAL
        .replace("name = \"pdp\"", "name = \"pdp\"\nmax_object_bytes = \"8MiB\"\nredis_url = \"redis://127.0.0.1:6379\"\nredis_write_queue_bytes = \"10MiB\"");
    let config = parse(&format!("[server]\nmax_inflight_body_bytes = \"4MiB\"\n{text}")).expect("valid");
    let warnings = config.warnings();
    assert!(warnings.iter().any(|w| w.contains("max_inflight_body_bytes")), "{warnings:?}");
    assert!(warnings.iter().any(|w| w.contains("redis_write_queue_bytes")), "{warnings:?}");
    assert!(warnings.iter().any(|w| w.contains("stream_window") && w.contains("never coalesced")), "{warnings:?}");
    assert!(parse(MINIMAL).expect("valid").warnings().is_empty(), "the defaults warn of nothing");
}

#[test]
fn stream_window_defaults_to_16mib_and_a_bad_one_names_its_line() {
    assert_eq!(parse(MINIMAL).expect("valid").pools[0].stream_window, 16 << 20);
    let text = MINIMAL.replace("name = \"pdp\"", "name = \"pdp\"\nstream_window = \"4MiB\"");
    assert_eq!(parse(&text).expect("valid").pools[0].stream_window, 4 << 20);
    let refused = error_of(&MINIMAL.replace("name = \"pdp\"", "name = \"pdp\"\nstream_window = \"100B\""));
    assert!(refused.contains("stream_window must be between 1KiB and 4GiB") && refused.contains("bulwark.toml:"), "{refused}");
}

#[test]
fn origin_endpoints_health_check_and_ejection_are_read_with_their_defaults() {
    let config = parse(MINIMAL).expect("valid");
    let origin = &config.origins[0];
    assert_eq!(origin.endpoints, EndpointSource::Url);
    assert!(origin.health_check.is_none());
    assert_eq!(origin.ejection, Ejection { after_failures: 5, duration: Duration::from_secs(10), max_percent: 50 });
    assert_eq!(origin.slow_start, Duration::from_secs(30));

    let listed = MINIMAL.replace(
        "url = \"http://127.0.0.1:8081\"",
        "endpoints = [\"http://10.0.0.5:8080\", \"http://10.0.0.6:8080\"]\nhealth_check = { path = \"/healthz\" }\nmax_ejected_percent = 34",
    );
    let origin = parse(&listed).expect("valid").origins.remove(0);
    let addresses: Vec<String> = match &origin.endpoints {
        EndpointSource::Static(list) => list.iter().map(ToString::to_string).collect(),
        other => panic!("{other:?}"),
    };
    assert_eq!(addresses, ["10.0.0.5:8080", "10.0.0.6:8080"]);
    let check = origin.health_check.expect("health check");
    assert_eq!(
        (check.path.as_str(), check.interval, check.timeout, check.unhealthy_after, check.healthy_after),
        ("/healthz", Duration::from_secs(2), Duration::from_secs(1), 3, 2)
    );
    assert_eq!(origin.ejection.max_percent, 34);

    let dns = MINIMAL.replace("url = \"http://127.0.0.1:8081\"", "url = \"https://catalog.shop.svc\"\ndiscovery = \"dns\"\nresolve_interval = \"2s\"");
    let origin = parse(&dns).expect("valid").origins.remove(0);
    assert_eq!(origin.endpoints, EndpointSource::Dns { host: "catalog.shop.svc".into(), port: 443, interval: Duration::from_secs(2) });
}

#[test]
fn bad_endpoints_are_rejected_at_their_line() {
    let cases = [
        ("endpoints = [\"http://10.0.0.5:8080\"]", "url or endpoints, not both"),
        ("discovery = \"srv\"", "unknown discovery"),
        ("discovery = \"dns\"", "needs a host name in url"),
        ("health_check = { path = \"healthz\" }", "health_check.path must be a path"),
        ("health_check = { path = \"/h\", interval = \"1s\", timeout = \"2s\" }", "not be longer than its interval"),
        ("health_check = { path = \"/h\", healthy_after = 0 }", "health_check.healthy_after must be a positive integer"),
        ("health_check = { path = \"/h\", interval = \"500ms\" }", "not be longer than its interval"),
        ("eject_after_failures = 0", "eject_after_failures must be a positive integer"),
        ("max_ejected_percent = 101", "between 0 and 100"),
        ("eject_for = \"10m\"", "at most 5m"),
        ("tls_server_name = \"not a name\"", "tls_server_name"),
    ];
    for (line, expected) in cases {
        let text = MINIMAL.replace("url = \"http://127.0.0.1:8081\"", &format!("url = \"http://127.0.0.1:8081\"\n{line}"));
        let message = error_of(&text);
        assert!(message.starts_with("bulwark.toml:5:") || message.starts_with("bulwark.toml:4:"), "{line}: {message}");
        assert!(message.contains(expected), "{line}: {message}");
    }
    let listed = |list: &str| MINIMAL.replace("url = \"http://127.0.0.1:8081\"", &format!("endpoints = {list}"));
    assert!(error_of(&listed("[]")).contains("endpoints must not be empty"));
    assert!(error_of(&listed("[\"http://a:1\", \"https://b:1\"]")).contains("same scheme"));
    assert!(error_of(&listed("[\"http://a:1/v1\"]")).contains("has no path"));
    assert!(error_of(&listed("[\"http://a:1\", \"http://a:1\"]")).contains("listed twice"));
    let neither = MINIMAL.replace("url = \"http://127.0.0.1:8081\"\n", "");
    let message = error_of(&neither);
    assert!(message.starts_with("bulwark.toml:3:") && message.contains("needs url or endpoints"), "{message}");
}

#[test]
fn origin_tls_files_are_read_and_checked_with_the_configuration() {
    let with = |lines: &str| MINIMAL.replace("url = \"http://127.0.0.1:8081\"", &format!("url = \"https://127.0.0.1:8443\"\n{lines}"));
    let message = error_of(&with("ca_file = \"/nonexistent/ca.pem\""));
    assert!(message.starts_with("bulwark.toml:5:") && message.contains("ca_file: cannot read /nonexistent/ca.pem"), "{message}");
    let not_pem = std::env::temp_dir().join(format!("bulwark-not-pem-{}", std::process::id()));
    std::fs::write(&not_pem, "hello").expect("write");
    let message = error_of(&with(&format!("ca_file = {:?}", not_pem.display().to_string())));
    assert!(message.contains("holds no PEM certificate"), "{message}");
    let message = error_of(&with(&format!("client_cert = {:?}", not_pem.display().to_string())));
    assert!(message.contains("client_cert and client_key go together"), "{message}");
    let _ = std::fs::remove_file(&not_pem);
}

#[test]
fn tracing_is_off_unless_an_endpoint_is_given_and_its_values_are_checked() {
    assert_eq!(parse(MINIMAL).expect("valid").tracing, None);
    assert_eq!(parse(&format!("{MINIMAL}\n[tracing]\nsample = 0.5\n")).expect("valid").tracing, None, "a sample without an endpoint traces nothing");
    let on = parse(&format!("{MINIMAL}\n[tracing]\notlp_endpoint = \"http://otel-collector:4318\"\n")).expect("valid").tracing.expect("on");
    assert_eq!((on.otlp_endpoint.to_string().as_str(), on.sample), ("http://otel-collector:4318/v1/traces", 0.01), "the base URL gets the traces path");
    let exact =
        parse(&format!("{MINIMAL}\n[tracing]\notlp_endpoint = \"https://c.example/otlp/v1/traces\"\nsample = 1.0\n")).expect("valid").tracing.expect("on");
    assert_eq!(exact.otlp_endpoint.to_string(), "https://c.example/otlp/v1/traces");
    for (fragment, message) in [
        ("otlp_endpoint = \"http://c:4318\"\nsample = 1.5", "tracing.sample must be between 0.0 and 1.0"),
        ("otlp_endpoint = \"c:4318\"", "must be an http:// or https:// URL"),
        ("otlp_endpoint = \"http://c:4318\"\nratio = 0.1", "unknown field `ratio`"),
    ] {
        let error = error_of(&format!("{MINIMAL}\n[tracing]\n{fragment}\n"));
        assert!(error.contains(message), "{fragment}: {error}");
        assert!(error.contains("bulwark.toml:"), "the error names the file and line: {error}");
    }
}

#[test]
fn environment_references_fill_string_values_and_an_unset_one_is_named_with_its_line() {
    let env = |name: &str| (name == "PDP_REDIS_PASSWORD").then(|| "s3cret".to_owned());
    let text = format!("{MINIMAL}\n").replace("name = \"pdp\"", "name = \"pdp\"\nredis_url = \"redis://:${PDP_REDIS_PASSWORD}@redis-pdp:6379/0\"");
    let config = Config::parse_with_env(&text, Path::new("bulwark.toml"), env).expect("valid");
    let url = config.pools[0].shared.as_ref().map(|s| format!("{s:?}")).unwrap_or_default();
    assert!(url.contains("s3cret@redis-pdp"), "{url}");
    let missing = text.replace("PDP_REDIS_PASSWORD", "PDP_REDIS_PASS");
    let err = Config::parse_with_env(&missing, Path::new("bulwark.toml"), env).expect_err("unset").to_string();
    let line = missing.lines().position(|l| l.starts_with("redis_url")).expect("line") + 1;
    assert!(err.starts_with(&format!("bulwark.toml:{line}:23:")) && err.contains("PDP_REDIS_PASS is not set"), "{err}");
    // An error after a replaced value is placed where it is in the file.
    let bad = format!("{text}\n[server]\nlisten = \"nowhere\"\n");
    let err = Config::parse_with_env(&bad, Path::new("bulwark.toml"), env).expect_err("bad listen").to_string();
    let line = bad.lines().position(|l| l.starts_with("listen")).expect("line") + 1;
    assert!(err.starts_with(&format!("bulwark.toml:{line}:10:")), "{err}");
}

#[test]
fn a_bad_redis_url_is_reported_without_its_password() {
    assert_eq!(validate::redacted("redis://:s3cret@redis-pdp:6379/0"), "redis://:***@redis-pdp:6379/0");
    assert_eq!(validate::redacted("rediss://user:pa@ss@h:1"), "rediss://user:***@h:1");
    assert_eq!(validate::redacted("redis://h:6379"), "redis://h:6379");
    let text = MINIMAL.replace("name = \"pdp\"", "name = \"pdp\"\nredis_url = \"redis://:s3cret@redis-pdp:notaport/0\"");
    let err = error_of(&text);
    assert!(err.contains("invalid Redis URL") && !err.contains("s3cret"), "{err}");
}
