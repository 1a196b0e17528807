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
