//! https origins on a private CA: `ca_file`, `tls_server_name`, and client certificates
//! (`client_cert`, `client_key`) for origins that require them.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use support::{Bulwark, TestConfig};

/// A private CA, and the files a test writes its certificates to (removed on drop).
struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
    dir: PathBuf,
}

impl Pki {
    fn new() -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, "bulwark test CA");
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("CA");
        let dir = std::env::temp_dir().join(format!("bulwark-tls-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).expect("temp dir");
        Pki { ca, dir }
    }

    /// A certificate signed by the CA for `names` and `purpose`: (certificate, key) PEM.
    fn issue(&self, names: &[&str], purpose: ExtendedKeyUsagePurpose) -> (String, String) {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>()).expect("params");
        params.extended_key_usages = vec![purpose];
        let cert = params.signed_by(&key, &self.ca).expect("sign");
        (cert.pem(), key.serialize_pem())
    }

    fn write(&self, name: &str, pem: &str) -> String {
        let path = self.dir.join(name);
        std::fs::write(&path, pem).expect("write PEM");
        path.display().to_string()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An https origin answering "secure" with `cert`; with `client_ca`, it requires a client
/// certificate signed by it.
async fn tls_origin(cert: &str, key: &str, client_ca: Option<&str>) -> SocketAddr {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert.as_bytes()).collect::<Result<_, _>>().expect("certificate");
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("key");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions().expect("versions");
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(CertificateDer::from_pem_slice(ca.as_bytes()).expect("CA")).expect("root");
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).build().expect("verifier");
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key).expect("server config");
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else { return };
                let service = service_fn(|_req: http::Request<Incoming>| async {
                    let mut res = http::Response::new(Full::new(bytes::Bytes::from_static(b"secure")));
                    res.headers_mut().insert("cache-control", http::HeaderValue::from_static("no-store"));
                    Ok::<_, Infallible>(res)
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), service).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_origin_on_a_private_ca_is_reached_under_its_tls_server_name() {
    let pki = Pki::new();
    let (cert, key) = pki.issue(&["catalog.internal"], ExtendedKeyUsagePurpose::ServerAuth);
    let addr = tls_origin(&cert, &key, None).await;
    let ca_file = pki.write("ca.pem", &pki.ca.pem());
    let url = format!("https://{addr}");

    let trusted = Bulwark::start(&TestConfig::new(&url).origin("ca_file", ca_file.as_str()).origin("tls_server_name", "catalog.internal").to_toml()).await;
    let got = trusted.get("/p").await;
    assert_eq!((got.status.as_u16(), got.text()), (200, "secure"));

    // Without the CA the certificate is not trusted; without the name it does not match.
    let untrusted = Bulwark::start(&TestConfig::new(&url).origin("tls_server_name", "catalog.internal").to_toml()).await;
    assert_eq!(untrusted.get("/p").await.status, 502);
    let unnamed = Bulwark::start(&TestConfig::new(&url).origin("ca_file", ca_file.as_str()).to_toml()).await;
    assert_eq!(unnamed.get("/p").await.status, 502);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_requiring_a_client_certificate_gets_the_configured_one() {
    let pki = Pki::new();
    let (cert, key) = pki.issue(&["catalog.internal"], ExtendedKeyUsagePurpose::ServerAuth);
    let ca = pki.ca.pem();
    let addr = tls_origin(&cert, &key, Some(&ca)).await;
    let (client_cert, client_key) = pki.issue(&["bulwark"], ExtendedKeyUsagePurpose::ClientAuth);
    let base = TestConfig::new(&format!("https://{addr}")).origin("ca_file", pki.write("ca.pem", &ca).as_str()).origin("tls_server_name", "catalog.internal");

    let anonymous = Bulwark::start(&base.clone().to_toml()).await;
    assert_eq!(anonymous.get("/p").await.status, 502, "the origin took a request without a client certificate");
    let config = base.origin("client_cert", pki.write("client.pem", &client_cert).as_str()).origin("client_key", pki.write("client.key", &client_key).as_str());
    let identified = Bulwark::start(&config.to_toml()).await;
    let got = identified.get("/p").await;
    assert_eq!((got.status.as_u16(), got.text()), (200, "secure"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_discovered_https_endpoint_is_checked_against_the_url_host_and_ca_file_is_read_again_on_reload() {
    let pki = Pki::new();
    let host = format!("pods-{}.tls.test", fastrand::u64(..));
    let (cert, key) = pki.issue(&[host.as_str()], ExtendedKeyUsagePurpose::ServerAuth);
    let addr = tls_origin(&cert, &key, None).await;
    bulwark::origin::discovery::pin_answer(&host, Some(vec![addr.ip()]));
    // First another CA's certificate in ca_file: not trusted.
    let ca_file = pki.write("ca.pem", &Pki::new().ca.pem());
    let config = TestConfig::new(&format!("https://{host}:{}", addr.port())).origin("discovery", "dns").origin("ca_file", ca_file.as_str());
    let path = pki.dir.join("bulwark.toml");
    std::fs::write(&path, config.to_toml()).expect("write config");
    let bulwark = Bulwark::start_with_file(&path).await;
    assert_eq!(bulwark.get("/p").await.status, 502);
    // The right CA written to the same file: a reload reads it.
    pki.write("ca.pem", &pki.ca.pem());
    let reloaded = bulwark.admin_send(http::Method::POST, "/admin/reload", "").await;
    assert_eq!(reloaded.status, 200, "{}", reloaded.text());
    let got = bulwark.get("/p").await;
    assert_eq!((got.status.as_u16(), got.text()), (200, "secure"), "addressed to {addr}, checked as {host}");
}

/// A redis-server answering TLS on its second port with a certificate of `pki`'s CA for
/// `localhost`; the `rediss://` URL of that port.
fn tls_redis(pki: &Pki) -> (support::RedisServer, String) {
    let (cert, key) = pki.issue(&["localhost"], ExtendedKeyUsagePurpose::ServerAuth);
    let tls_port = support::free_port();
    let args = [
        "--tls-port",
        &tls_port.to_string(),
        "--tls-cert-file",
        &pki.write("redis.pem", &cert),
        "--tls-key-file",
        &pki.write("redis.key", &key),
        "--tls-auth-clients",
        "no",
    ];
    let redis = support::RedisServer::start_with(args.iter().map(|a| (*a).to_owned()).collect());
    (redis, format!("rediss://localhost:{tls_port}/0"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_and_the_control_channel_reach_redis_over_tls_on_a_private_ca() {
    let pki = Pki::new();
    let ca = pki.write("ca.pem", &pki.ca.pem());
    let (redis, url) = tls_redis(&pki);
    let origin = support::Origin::start().await;
    origin.set(|_| support::Reply::ok("page").header("cache-control", "max-age=60"));
    let replica = |id: &str| {
        TestConfig::new(&origin.url())
            .redis(&url)
            .pool("redis_timeout", "500ms")
            .pool("redis_ca_file", ca.as_str())
            .server("control_redis_url", url.as_str())
            .server("control_redis_ca_file", ca.as_str())
            .server("replica_id", id)
            .to_toml()
    };
    let (first, second) = (Bulwark::start(&replica("r1")).await, Bulwark::start(&replica("r2")).await);
    first.wait_for_subscription().await;
    second.wait_for_subscription().await;
    // One host for both (each replica's own address would make two keys).
    let host = [("host", "shop.example")];
    assert_eq!(first.get_with("/products/1", &host).await.cache_status(), "bulwark; fwd=miss; stored");
    support::eventually("the entry written over TLS", Duration::from_secs(5), async || redis.entries("bulwark:pdp:").len() == 1).await;
    assert_eq!(second.get_with("/products/1", &host).await.cache_status(), "bulwark; hit; detail=l2", "read from Redis over TLS");
    // A route mode set on one replica reaches the other through the control Redis.
    let set = first.admin_send(http::Method::PUT, "/admin/routes/all/mode", r#"{"mode": "off"}"#).await;
    assert_eq!(set.status, 200, "{}", set.text());
    support::eventually("the mode on the other replica", Duration::from_secs(5), async || second.get("/products/2").await.status == 503).await;
    assert_eq!(first.metric("bulwark_redis_errors_total", &[("pool", "pdp"), ("op", "get")]).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_certificate_not_signed_by_a_trusted_root_is_refused_and_requests_are_still_served() {
    let pki = Pki::new();
    let (_redis, url) = tls_redis(&pki);
    let origin = support::Origin::start().await;
    origin.set(|_| support::Reply::ok("page").header("cache-control", "max-age=60"));
    // The public roots only: the private CA's certificate must not be accepted.
    let bulwark = Bulwark::start(&TestConfig::new(&origin.url()).redis(&url).to_toml()).await;
    for i in 0..3 {
        let got = bulwark.get(&format!("/products/{i}")).await;
        assert_eq!((got.status.as_u16(), got.text()), (200, "page"), "a Redis it cannot trust costs a miss, never a request");
    }
    let errors = bulwark.metric("bulwark_redis_errors_total", &[("pool", "pdp"), ("op", "get")]).await;
    assert!(errors >= 1.0, "the handshake failures were not counted ({errors})");
}

#[test]
fn redis_ca_file_needs_rediss_urls() {
    let pki = Pki::new();
    let ca = pki.write("ca.pem", &pki.ca.pem());
    let plain = TestConfig::new("http://127.0.0.1:1").redis("redis://127.0.0.1:6390/0").pool("redis_ca_file", ca.as_str()).to_toml();
    let err = bulwark::Config::parse(&plain, std::path::Path::new("shop.toml")).expect_err("a CA file for a plain Redis URL");
    assert!(err.to_string().contains("redis_ca_file needs rediss://"), "{err}");
    let tls = TestConfig::new("http://127.0.0.1:1").redis("rediss://redis.internal:6390/0").pool("redis_ca_file", ca.as_str()).to_toml();
    bulwark::Config::parse(&tls, std::path::Path::new("shop.toml")).expect("rediss:// with a CA file");
}
