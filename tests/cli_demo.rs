//! `bulwark demo` runs on a bare machine and prints the per-pool table.

use std::process::Command;

#[test]
fn demo_runs_self_contained_and_prints_the_pool_table() {
    let out = Command::new(env!("CARGO_BIN_EXE_bulwark"))
        .args(["demo", "--requests", "400", "--concurrency", "16"])
        .env_remove("RUST_LOG")
        .output()
        .expect("run bulwark demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "demo failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("400 requests in"), "{stdout}");
    assert!(stdout.contains(", 0 failed"), "{stdout}");
    let row = |pool: &str| -> Vec<String> {
        let line = stdout.lines().find(|l| l.starts_with(pool)).unwrap_or_else(|| panic!("no {pool} row: {stdout}"));
        line.split_whitespace().map(str::to_owned).collect()
    };
    let (pdp, general) = (row("pdp "), row("general "));
    let requests: f64 = pdp[1].parse::<f64>().expect("requests") + general[1].parse::<f64>().expect("requests");
    assert_eq!(requests, 400.0, "{stdout}");
    assert!(pdp[5].ends_with('%') && general[5].ends_with('%'), "{stdout}");
    // Coalescing: one origin request per distinct page however many clients asked.
    let last = stdout.lines().last().unwrap_or_default();
    let words: Vec<&str> = last.split_whitespace().collect();
    assert_eq!(words.get(3), words.get(6), "origin requests must equal distinct pages requested: {last}");
}

#[test]
fn demo_keep_prints_the_dashboard_and_stays_up_until_interrupted() {
    use std::io::BufRead;
    let mut child = Command::new(env!("CARGO_BIN_EXE_bulwark"))
        .args(["demo", "--requests", "200", "--concurrency", "8", "--keep"])
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run bulwark demo --keep");
    let mut lines = std::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut dashboard = None;
    for line in lines.by_ref() {
        let line = line.expect("a line");
        if let Some(url) = line.strip_prefix("dashboard: ") {
            dashboard = Some(url.to_owned());
        }
        if line.starts_with("staying up") {
            break;
        }
    }
    let dashboard = dashboard.expect("the dashboard's address is printed");
    let addr = dashboard.trim_start_matches("http://").split('/').next().expect("host:port").to_owned();
    // Still up after the spike: the page and its data answer.
    let get = |path: &str| {
        let mut stream = std::net::TcpStream::connect(&addr).expect("the demo stayed up");
        std::io::Write::write_all(&mut stream, format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).expect("write");
        let mut answer = String::new();
        std::io::Read::read_to_string(&mut stream, &mut answer).expect("read");
        answer
    };
    assert!(get("/dashboard").starts_with("HTTP/1.1 200"), "the dashboard answers");
    std::thread::sleep(std::time::Duration::from_millis(2500));
    assert!(get("/stats.json").contains("\"product-detail\""), "light traffic shows on the dashboard");
    // SIGINT, as Ctrl-C sends: it stops by itself.
    let status = Command::new("kill").args(["-INT", &child.id().to_string()]).status().expect("kill");
    assert!(status.success());
    let exit = child.wait().expect("demo exits");
    assert!(exit.success(), "{exit:?}");
}
