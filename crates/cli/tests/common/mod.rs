//! Helpers shared by the end-to-end tests that start the real binary.

#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A child process killed (SIGKILL) when dropped, so a failing test leaves nothing running.
pub struct Proc {
    pub child: Child,
    pub name: &'static str,
    pub log: Option<PathBuf>,
}

impl Proc {
    pub fn spawn(name: &'static str, args: &[&str], log_path: &Path) -> Self {
        let log = std::fs::File::create(log_path).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_stardust"))
            .args(args)
            .env("STARDUST_LOG", "info,stardust_node=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Self {
            child,
            name,
            log: Some(log_path.to_path_buf()),
        }
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill9(mut self) {
        self.child.kill().expect("kill -9");
        self.child.wait().expect("reap");
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn terminate(mut self, within: Duration) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill -TERM");
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            if start.elapsed() > within {
                let log = self
                    .log
                    .as_ref()
                    .and_then(|p| std::fs::read_to_string(p).ok())
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                panic!(
                    "{} did not exit within {within:?} of SIGTERM; log tail:\n{}",
                    self.name,
                    tail.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

pub fn cli(args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_stardust"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("spawn");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stardust {args:?} failed: {}{}",
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{args:?}: {e}: {stdout}"))
}

pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn healthy(url: &str) -> bool {
    let out = Command::new(env!("CARGO_BIN_EXE_stardust"))
        .args(["nodes", "--domain", url, "--json"])
        .output();
    out.is_ok_and(|o| o.status.success())
}

/// Starts `stardust domain` on a free loopback port with its data in `dir/domain` and
/// `extra` flags; waits until it answers. Returns the process and its URL.
pub fn start_domain(dir: &Path, extra: &[&str]) -> (Proc, String) {
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let listen = format!("127.0.0.1:{port}");
    let data = dir.join("domain");
    let mut args = vec![
        "domain",
        "--listen",
        &listen,
        "--data",
        data.to_str().expect("utf-8"),
    ];
    args.extend(extra);
    let domain = Proc::spawn("domain", &args, &dir.join("domain.log"));
    wait_until("the domain", Duration::from_secs(30), || healthy(&url));
    (domain, url)
}

/// Starts `count` node processes (`--no-bench`) with `slots` slots each, data in
/// `dir/node0`, `dir/node1`, ….
pub fn start_nodes(url: &str, dir: &Path, count: usize, slots: u32) -> Vec<Proc> {
    let slots = slots.to_string();
    (0..count)
        .map(|i| {
            let data = dir.join(format!("node{i}"));
            Proc::spawn(
                "node",
                &[
                    "node",
                    "--domain",
                    url,
                    "--data",
                    data.to_str().expect("utf-8"),
                    "--slots",
                    &slots,
                    "--no-bench",
                    // Tests share two cores with every other test: a node at its
                    // default nice 19 can starve for seconds (the default has a test
                    // of its own in lifecycle.rs).
                    "--nice",
                    "0",
                ],
                &dir.join(format!("node{i}.log")),
            )
        })
        .collect()
}

/// Whether the browser tooling is here; under CI it must be.
pub fn browser_tooling() -> Result<(), String> {
    let node = Command::new("node").arg("--version").output();
    if !node.is_ok_and(|o| o.status.success()) {
        return Err("node is not installed".into());
    }
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if !std::path::Path::new(&chromium).exists() {
        return Err(format!(
            "no Chromium at {chromium} (apt-get install chromium)"
        ));
    }
    if !root().join("web/node_modules/playwright-core").exists() {
        return Err("playwright-core is not installed (npm ci --prefix web)".into());
    }
    Ok(())
}

/// Whether a browser test can run here. Under CI the tooling must be present; elsewhere a
/// missing tool skips the test, printing why.
pub fn browser_available(test: &str) -> bool {
    match browser_tooling() {
        Ok(()) => true,
        Err(why) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must provide the browser tooling: {why}"
            );
            eprintln!("SKIPPED {test}: {why}");
            false
        }
    }
}
