//! Graceful shutdown as a load balancer needs it, in-process and as a real process.

mod support;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{Bulwark, Origin, Reply, ServeProcess, TestConfig, free_port, simple_config};

#[tokio::test]
async fn drain_then_stop_accepting_and_finish_in_flight_requests() {
    let origin = Origin::start().await;
    origin.set(|parts| {
        let reply = Reply::ok(format!("body of {}", parts.uri.path())).header("cache-control", "no-store");
        if parts.uri.path() == "/slow" { reply.delay(Duration::from_millis(1500)) } else { reply }
    });
    let config = TestConfig::new(&origin.url()).server("drain_delay", "600ms").to_toml();
    let mut bulwark = Bulwark::start(&config).await;
    let url = bulwark.url("/slow");
    let in_flight = tokio::spawn(async move {
        let client = support::client();
        let res = client.get(url.parse().expect("uri")).await.expect("in-flight request");
        let status = res.status();
        let body = http_body_util::BodyExt::collect(res.into_body()).await.expect("body").to_bytes();
        (status, body)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(bulwark.admin("/readyz").await.status, 200);

    bulwark.begin_shutdown();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(bulwark.admin("/readyz").await.status, 503, "readyz turns 503 at once");
    assert_eq!(bulwark.admin("/healthz").await.status, 200);
    // Still serving during the drain, asking HTTP/1 clients to close.
    let during = bulwark.get("/during").await;
    assert_eq!(during.status, 200);
    assert_eq!(during.header("connection"), Some("close"));

    tokio::time::sleep(Duration::from_millis(800)).await;
    let refused = tokio::net::TcpStream::connect(bulwark.addr).await;
    assert!(refused.is_err(), "listener must be closed after the drain delay");

    let (status, body) = in_flight.await.expect("in-flight task");
    assert_eq!((status.as_u16(), &body[..]), (200, &b"body of /slow"[..]));
    bulwark.wait().await.expect("run returns Ok");
}

fn write_config(text: &str) -> tempfile_path::TempPath {
    tempfile_path::TempPath::new(text)
}

/// A config file in the system temp directory, removed on drop.
mod tempfile_path {
    pub struct TempPath(pub std::path::PathBuf);

    impl TempPath {
        pub fn new(text: &str) -> TempPath {
            let path = std::env::temp_dir().join(format!("bulwark-test-{}-{}.toml", std::process::id(), super::free_port()));
            std::fs::write(&path, text).expect("write config");
            TempPath(path)
        }
    }

    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

#[tokio::test]
async fn serve_process_exits_zero_after_sigterm() {
    let origin = Origin::start().await;
    let mut serve = ServeProcess::start(&simple_config(&origin.url(), None, ""), Stdio::null(), Stdio::piped()).await;
    let client = support::client();
    let res = client.get(serve.url("/x").parse().expect("uri")).await.expect("proxy request");
    assert_eq!(res.status(), 200);
    serve.signal("-TERM");
    let deadline = Instant::now() + Duration::from_secs(10);
    let exit = loop {
        if let Some(exit) = serve.child.try_wait().expect("try_wait") {
            break exit;
        }
        assert!(Instant::now() < deadline, "bulwark serve did not exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut stderr = String::new();
    let _ = serve.child.stderr.take().expect("stderr").read_to_string(&mut stderr);
    assert!(exit.success(), "exit status {exit:?}; stderr: {stderr}");
}

#[test]
fn check_and_serve_reject_a_bad_config_with_its_location() {
    let file = write_config("[[pools]]\nname = \"pdp\"\ndefault_ttl = \"ten seconds\"\n");
    for subcommand in ["check", "serve"] {
        let out = Command::new(env!("CARGO_BIN_EXE_bulwark")).args([subcommand, "--config"]).arg(&file.0).output().expect("run");
        assert!(!out.status.success(), "{subcommand} must fail");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let expected = format!("{}:3:15: ", file.0.display());
        assert!(stderr.contains(&expected), "{subcommand}: {stderr}");
        assert!(stderr.contains("ten seconds"), "{subcommand}: {stderr}");
    }
    let missing = Command::new(env!("CARGO_BIN_EXE_bulwark")).args(["check", "--config", "/nonexistent/b.toml"]).output().expect("run");
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/b.toml: cannot read config file"));
    let good = Command::new(env!("CARGO_BIN_EXE_bulwark"))
        .args(["check", "--config", concat!(env!("CARGO_MANIFEST_DIR"), "/config/bulwark.example.toml")])
        .output()
        .expect("run");
    assert!(good.status.success(), "{}", String::from_utf8_lossy(&good.stderr));
}

#[tokio::test]
async fn sighup_reloads_the_config_file() {
    let origin = Origin::start().await;
    let serve = ServeProcess::start(&simple_config(&origin.url(), None, ""), Stdio::null(), Stdio::null()).await;
    let reloads = async || -> Option<f64> { Some(support::metric_value(&serve.metrics().await?, "bulwark_config_reloads_total", &[("result", "ok")])) };
    assert_eq!(reloads().await, Some(0.0));
    // The file is unchanged, so only the signal can cause this reload.
    serve.signal("-HUP");
    let deadline = Instant::now() + Duration::from_secs(5);
    while reloads().await != Some(1.0) {
        assert!(Instant::now() < deadline, "SIGHUP did not reload");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
