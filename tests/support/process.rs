//! A `bulwark serve` process, for what only a whole process shows (signals, exit,
//! replicas that die).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;

use super::bulwark::client;
use super::free_port;

/// A `bulwark serve` process on free ports, from a config written to a temporary file;
/// killed (and its file removed) on drop.
pub struct ServeProcess {
    pub child: Child,
    pub port: u16,
    pub admin_port: u16,
    pub config: std::path::PathBuf,
}

impl ServeProcess {
    /// Starts `bulwark serve` on `config` (its `[server]` section gets the listen
    /// addresses, set as TOML keys) and waits until `/healthz` answers.
    pub async fn start(config: &str, stdout: Stdio, stderr: Stdio) -> ServeProcess {
        let (port, admin_port) = (free_port(), free_port());
        let mut doc: toml::Table = config.parse().unwrap_or_else(|e| panic!("a test config is TOML: {e}"));
        let server = doc.entry("server").or_insert_with(|| toml::Table::new().into());
        let server = server.as_table_mut().expect("[server] is a table");
        server.insert("listen".into(), format!("127.0.0.1:{port}").into());
        server.insert("admin_listen".into(), format!("127.0.0.1:{admin_port}").into());
        let text = toml::to_string(&doc).expect("the config renders as TOML");
        let path = std::env::temp_dir().join(format!("bulwark-serve-{}-{port}.toml", std::process::id()));
        std::fs::write(&path, text).expect("write config");
        let child = Command::new(env!("CARGO_BIN_EXE_bulwark"))
            .args(["serve", "--config"])
            .arg(&path)
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("spawn bulwark serve");
        let process = ServeProcess { child, port, admin_port, config: path };
        let client = client();
        let health = format!("http://127.0.0.1:{admin_port}/healthz");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !client.get(health.parse().expect("uri")).await.is_ok_and(|r| r.status() == 200) {
            assert!(Instant::now() < deadline, "bulwark serve did not come up");
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        process
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// `/metrics` of the process, or `None` if it does not answer.
    pub async fn metrics(&self) -> Option<String> {
        let res = client().get(format!("http://127.0.0.1:{}/metrics", self.admin_port).parse().ok()?).await.ok()?;
        let body = res.into_body().collect().await.ok()?.to_bytes();
        Some(String::from_utf8_lossy(&body).into_owned())
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill").args([signal, &self.child.id().to_string()]).status().expect("kill");
        assert!(status.success(), "kill {signal}");
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.config);
    }
}
