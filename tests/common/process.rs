//! linkgate as a child process (the real binary), with its JSON log lines
//! parsed as they arrive, and reading the JSON it prints.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use super::HANG_GUARD;

/// linkgate as a child process with JSON logs on stderr.
pub struct Process {
    pub child: Child,
    pub lines: mpsc::Receiver<serde_json::Value>,
    pub https: SocketAddr,
    pub http: SocketAddr,
    pub admin: SocketAddr,
    /// The HTTP/3 (UDP) socket, when `listen.http3` is set.
    pub http3: Option<SocketAddr>,
}

impl Process {
    pub fn start(config: &std::path::Path) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_linkgate"));
        cmd.args(["serve", "--config"]).arg(config);
        Self::spawn(cmd)
    }

    /// Like [`Process::start`], with the open-file limit (`ulimit -n`) set to `limit`.
    pub fn start_with_fd_limit(config: &std::path::Path, limit: u32) -> Self {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!("ulimit -n {limit} && exec \"$0\" serve --config \"$1\""))
            .arg(env!("CARGO_BIN_EXE_linkgate"))
            .arg(config);
        Self::spawn(cmd)
    }

    /// Resident memory of the process, from /proc.
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).expect("proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .expect("VmRSS")
            * 1024
    }

    fn spawn(mut cmd: Command) -> Self {
        let mut child = cmd
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("start linkgate");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                match serde_json::from_str::<serde_json::Value>(&line) {
                    Ok(v) => {
                        if tx.send(v).is_err() {
                            return;
                        }
                    }
                    Err(_) => eprintln!("linkgate (not JSON): {line}"),
                }
            }
        });
        let listening = wait_line(&lines, |v| v["message"] == "linkgate listening");
        let addr = |k: &str| listening[k].as_str().and_then(|s| s.parse::<SocketAddr>().ok());
        let none = SocketAddr::from(([0, 0, 0, 0], 0));
        Self {
            https: addr("https").expect("https address in the log"),
            http: addr("http").unwrap_or(none),
            admin: addr("admin").unwrap_or(none),
            http3: addr("http3"),
            child,
            lines,
        }
    }

    pub fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .args([format!("-{sig}"), self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(st.success());
    }

    pub fn wait(&mut self) -> i32 {
        let deadline = std::time::Instant::now() + HANG_GUARD;
        loop {
            if let Some(st) = self.child.try_wait().expect("wait") {
                return st.code().unwrap_or(-1);
            }
            assert!(std::time::Instant::now() < deadline, "linkgate did not exit");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// True when the JSON value (a log field, a report cell) is a string containing `needle`.
pub fn has(value: &serde_json::Value, needle: &str) -> bool {
    value.as_str().is_some_and(|s| s.contains(needle))
}

/// The next log line that `want` accepts; panics (at the caller's line) if
/// none arrives within [`HANG_GUARD`].
#[track_caller]
pub fn wait_line(
    lines: &mpsc::Receiver<serde_json::Value>,
    want: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = std::time::Instant::now() + HANG_GUARD;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match lines.recv_timeout(left) {
            Ok(v) if want(&v) => return v,
            Ok(_) => {}
            Err(_) => panic!("log line not seen"),
        }
    }
}

/// The first log line each of `wants` accepts, in whatever order they come;
/// panics (at the caller's line) if they do not all arrive within [`HANG_GUARD`].
#[track_caller]
pub fn wait_lines<const N: usize>(
    lines: &mpsc::Receiver<serde_json::Value>,
    wants: [&dyn Fn(&serde_json::Value) -> bool; N],
) -> [serde_json::Value; N] {
    let deadline = std::time::Instant::now() + HANG_GUARD;
    let mut found: [Option<serde_json::Value>; N] = std::array::from_fn(|_| None);
    while found.iter().any(Option::is_none) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let Ok(v) = lines.recv_timeout(left) else {
            let missing: Vec<usize> = (0..N).filter(|&i| found[i].is_none()).collect();
            panic!("log lines not seen: wants {missing:?}");
        };
        if let Some(i) = (0..N).find(|&i| found[i].is_none() && wants[i](&v)) {
            found[i] = Some(v);
        }
    }
    found.map(|v| v.expect("found"))
}
