//! Harness for black-box tests: start the real rbee binaries on loopback,
//! on ports the OS chooses, read their logs, signal them, and kill them when
//! a test ends, even a failing one.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use parking_lot::Mutex;

pub mod fake_hub;
pub mod gguf;
pub mod hive;
pub mod http;
pub mod ops;
pub mod queen;
pub mod worker;

/// The three daemons.
pub const DAEMONS: [&str; 3] = ["queen-rbee", "rbee-hive", "llm-worker-rbee"];

/// A token long enough for the bind policy, used by tests that need one.
pub const TEST_TOKEN: &str = "rbee-test-token-7f3a9c1e5b";

/// How long a daemon may take to print its listening line.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Root of the workspace.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

/// Path to a freshly built binary of the workspace.
///
/// The first call in a test process runs `cargo build --workspace --bins`
/// (a no-op when up to date), so tests never run stale binaries.
///
/// It also builds the worker with the `fault-injection` feature and keeps
/// that binary as `llm-worker-rbee-fault-injection` (see
/// [`FAULT_INJECTION_WORKER`]); both builds share every dependency, and doing
/// them here, before any test starts a daemon, means no test ever runs a
/// binary while the other build replaces it.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let root = workspace_root();
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"))
            .join("debug");
        let cargo_build = |extra: &[&str]| {
            let status = Command::new(env!("CARGO"))
                .args(["build", "--workspace", "--bins", "--quiet"])
                .args(extra)
                .current_dir(&root)
                .status()
                .expect("cargo must be runnable from tests");
            assert!(status.success(), "building the daemons failed");
        };
        cargo_build(&["--features", "llm-worker-rbee/fault-injection"]);
        std::fs::copy(
            target.join("llm-worker-rbee"),
            target.join(FAULT_INJECTION_WORKER),
        )
        .expect("keep the fault-injection worker");
        cargo_build(&[]);
        target
    });
    dir.join(name)
}

/// The worker built with the `fault-injection` feature (tests only).
pub const FAULT_INJECTION_WORKER: &str = "llm-worker-rbee-fault-injection";

/// The default model (SmolLM2-135M-Instruct Q4_1 GGUF), fetched once into
/// the cache by `scripts/fetch-model.sh`.
pub fn default_model() -> PathBuf {
    static MODEL: OnceLock<PathBuf> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let out = Command::new("bash")
                .arg(workspace_root().join("scripts/fetch-model.sh"))
                .stderr(Stdio::inherit())
                .output()
                .expect("run scripts/fetch-model.sh");
            assert!(out.status.success(), "fetching the default model failed");
            PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
        })
        .clone()
}

/// How a daemon is to be started.
#[derive(Debug, Clone)]
pub struct DaemonSpec {
    name: String,
    binary: Option<String>,
    addr: String,
    model: Option<String>,
    args: Vec<String>,
    env: Vec<(String, String)>,
    scratch: Option<Arc<tempfile::TempDir>>,
    /// Run under `taskset -c CPU`: the process, and what it starts, may use
    /// that one CPU.
    cpu: Option<u32>,
    /// Run under `prlimit --nofile=N:N`: the process's descriptor limit,
    /// soft and hard.
    nofile: Option<u64>,
}

impl DaemonSpec {
    /// `name` on `127.0.0.1:0` with JSON logs, no token, `RUST_LOG=info`;
    /// the worker serves the default model; the hive gets a fresh models
    /// directory and the queen a fresh registry file (removed when the spec
    /// and its daemons are dropped) unless the test passes `--models-dir`
    /// or `--database`.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            binary: None,
            addr: "127.0.0.1:0".to_owned(),
            model: (name == "llm-worker-rbee").then(|| default_model().display().to_string()),
            args: vec!["--log-format".to_owned(), "json".to_owned()],
            env: vec![("RUST_LOG".into(), "info".into())],
            scratch: (name == "rbee-hive" || name == "queen-rbee")
                .then(|| Arc::new(tempfile::tempdir().expect("a scratch directory"))),
            cpu: None,
            nofile: None,
        }
    }

    /// Listen on `addr` instead of `127.0.0.1:0`.
    pub fn addr(mut self, addr: &str) -> Self {
        addr.clone_into(&mut self.addr);
        self
    }

    /// Serve `path` instead of the default model (worker only).
    pub fn model(mut self, path: &str) -> Self {
        self.model = Some(path.to_owned());
        self
    }

    /// Add arguments.
    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Set an environment variable.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Configure [`TEST_TOKEN`] through `LLORCH_API_TOKEN`.
    pub fn with_token(self) -> Self {
        self.env("LLORCH_API_TOKEN", TEST_TOKEN)
    }

    /// Allow the daemon, and the processes it starts, CPU `cpu` only (as a
    /// container's CPU limit or `taskset` would), through `taskset`.
    pub fn on_one_cpu(mut self, cpu: u32) -> Self {
        self.cpu = Some(cpu);
        self
    }

    /// Limit the daemon to `n` open descriptors (soft and hard, so it
    /// cannot raise its own), as `LimitNOFILE=` or a container would.
    pub fn descriptor_limit(mut self, n: u64) -> Self {
        self.nofile = Some(n);
        self
    }

    /// Run the `fault-injection` build of the worker instead.
    pub fn fault_injection(mut self) -> Self {
        self.binary = Some(FAULT_INJECTION_WORKER.to_owned());
        self
    }

    fn command(&self) -> Command {
        let mut argv: Vec<std::ffi::OsString> =
            vec![binary(self.binary.as_deref().unwrap_or(&self.name)).into()];
        if let Some(cpu) = self.cpu {
            argv.splice(
                0..0,
                ["taskset".into(), "-c".into(), cpu.to_string().into()],
            );
        }
        if let Some(n) = self.nofile {
            argv.splice(
                0..0,
                [
                    "prlimit".into(),
                    format!("--nofile={n}:{n}").into(),
                    "--".into(),
                ],
            );
        }
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]);
        cmd.arg("--addr").arg(&self.addr);
        if let Some(model) = &self.model {
            cmd.arg("--model").arg(model);
        }
        if let Some(scratch) = &self.scratch {
            if self.name == "rbee-hive" && !self.args.iter().any(|a| a == "--models-dir") {
                cmd.arg("--models-dir").arg(scratch.path());
            }
            if self.name == "queen-rbee" && !self.args.iter().any(|a| a == "--database") {
                cmd.arg("--database")
                    .arg(scratch.path().join("queen.sqlite3"));
            }
        }
        cmd.args(&self.args)
            .env_remove("RBEE_MODELS_DIR")
            .env_remove("HF_ENDPOINT")
            .env_remove("HF_TOKEN")
            .env_remove("HF_TOKEN_PATH")
            .env_remove("LLORCH_API_TOKEN")
            .env_remove("LLORCH_API_TOKEN_FILE")
            .env_remove("CREDENTIALS_DIRECTORY")
            .env_remove("RBEE_QUEEN_ADDR")
            .env_remove("RBEE_HIVE_ADDR")
            .env_remove("RBEE_WORKER_ADDR")
            .env_remove("RBEE_QUEEN_DATABASE")
            .env_remove("RBEE_QUEEN_HIVES")
            .env_remove("RBEE_QUEEN_CONFIG")
            .env_remove("RBEE_HIVE_CONFIG")
            .stdin(Stdio::null());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Run to completion (for startup failures and `--help`), killing it
    /// after `timeout`.
    pub fn run_to_exit(&self, timeout: Duration) -> Output {
        let mut child = self
            .command()
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn daemon");
        let started = Instant::now();
        while child.try_wait().expect("wait").is_none() {
            if started.elapsed() > timeout {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        child.wait_with_output().expect("collect output")
    }

    /// Start it and wait for its listening line.
    pub fn spawn(&self) -> RunningDaemon {
        let mut child = self
            .command()
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn daemon");
        let logs = Arc::new(Mutex::new(Vec::<String>::new()));
        let (tx, rx) = std::sync::mpsc::channel::<SocketAddr>();
        let stderr = child.stderr.take().expect("piped stderr");
        let sink = Arc::clone(&logs);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = listening_addr(&line) {
                    let _ = tx.send(addr);
                }
                sink.lock().push(line);
            }
        });
        let mut daemon = RunningDaemon {
            _scratch: self.scratch.clone(),
            name: self.name.clone(),
            child,
            logs,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        match rx.recv_timeout(START_TIMEOUT) {
            Ok(addr) => daemon.addr = addr,
            Err(_) => panic!(
                "{} did not start within {START_TIMEOUT:?}; logs:\n{}",
                self.name,
                daemon.logs().join("\n")
            ),
        }
        daemon
    }
}

fn listening_addr(line: &str) -> Option<SocketAddr> {
    let json: serde_json::Value = serde_json::from_str(line).ok()?;
    let fields = json.get("fields")?;
    if !fields.get("message")?.as_str()?.ends_with(" listening") {
        return None;
    }
    fields.get("addr")?.as_str()?.parse().ok()
}

/// A started daemon; killed on drop.
#[derive(Debug)]
pub struct RunningDaemon {
    _scratch: Option<Arc<tempfile::TempDir>>,
    name: String,
    child: Child,
    logs: Arc<Mutex<Vec<String>>>,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl RunningDaemon {
    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Its stderr lines so far.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().clone()
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Send a signal.
    pub fn signal(&self, signal: Signal) {
        let pid = i32::try_from(self.child.id()).expect("pid fits i32");
        kill(Pid::from_raw(pid), signal).expect("signal daemon");
    }

    /// Wait for exit up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                // Let the reader thread drain the last lines.
                std::thread::sleep(Duration::from_millis(50));
                return Some(status);
            }
            if started.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Poll the logs until one line contains `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let started = Instant::now();
        while started.elapsed() < timeout {
            if self.logs().iter().any(|l| l.contains(needle)) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// The daemon's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Poll `GET /v1/ready` until the worker reports ready (model loaded).
    pub fn wait_ready(&self, timeout: Duration) {
        let started = Instant::now();
        while started.elapsed() < timeout {
            if http_get(self.addr, "/v1/ready").is_some_and(|body| body.contains("\"ready\":true"))
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "{} not ready within {timeout:?}; logs:\n{}",
            self.name,
            self.logs().join("\n")
        );
    }
}

impl Drop for RunningDaemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// One service's audit trail: its `.jsonl` files under `dir`, in name
/// order, concatenated.
pub fn read_trail(dir: &Path) -> String {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("audit dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|p| std::fs::read_to_string(p).expect("trail"))
        .collect()
}

/// `rbee-audit verify dir`; panics with its report when a link is broken.
pub fn verify_trail(dir: &Path) {
    let out = Command::new(binary("rbee-audit"))
        .arg("verify")
        .arg(dir)
        .output()
        .expect("run rbee-audit");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// `token:<first 6 hex of sha256>`, computed with the system's `sha256sum`,
/// independently of the project's own code.
pub fn token_fingerprint(token: &str) -> String {
    use std::io::Write;
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum runs");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(token.as_bytes())
        .expect("write to sha256sum");
    let out = child.wait_with_output().expect("sha256sum output");
    format!("token:{}", &String::from_utf8_lossy(&out.stdout)[..6])
}

/// A minimal `GET` over a plain socket (no client library in the harness):
/// the whole response, or `None` when the daemon does not answer.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    Some(response)
}

/// One request a [`FakeHive`] received.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// Request path.
    pub path: String,
    /// The `Authorization` header, if any.
    pub authorization: Option<String>,
    /// The JSON body.
    pub body: serde_json::Value,
}

/// Test double standing in for `rbee-hive`'s worker callbacks: records every
/// request and answers 200, except the first `refuse_ready` ready callbacks,
/// which get 503.
#[derive(Debug)]
pub struct FakeHive {
    /// Where it listens.
    pub addr: SocketAddr,
    requests: Arc<Mutex<Vec<Recorded>>>,
}

impl FakeHive {
    /// Listen on an OS-chosen loopback port.
    pub fn start(refuse_ready: usize) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind fake hive");
        let addr = listener.local_addr().expect("fake hive address");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&requests);
        std::thread::spawn(move || {
            let mut refused = 0;
            for stream in listener.incoming().map_while(Result::ok) {
                let Some(recorded) = read_request(&stream) else {
                    continue;
                };
                let refuse = recorded.path.ends_with("/ready") && refused < refuse_ready;
                if refuse {
                    refused += 1;
                }
                sink.lock().push(recorded);
                let (status, body) = if refuse {
                    ("503 Service Unavailable", "{}")
                } else {
                    ("200 OK", "{}")
                };
                let _ = std::io::Write::write_all(
                    &mut &stream,
                    format!("HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).as_bytes(),
                );
            }
        });
        Self { addr, requests }
    }

    /// Its base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().clone()
    }
}

fn read_request(stream: &std::net::TcpStream) -> Option<Recorded> {
    use std::io::Read;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut reader = BufReader::new(stream);
    let mut request_line = String::new();
    reader.read_line(&mut request_line).ok()?;
    let path = request_line.split_whitespace().nth(1)?.to_owned();
    let mut length = 0usize;
    let mut authorization = None;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).ok()?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            match name.trim().to_ascii_lowercase().as_str() {
                "content-length" => length = value.trim().parse().ok()?,
                "authorization" => authorization = Some(value.trim().to_owned()),
                _ => {}
            }
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    Some(Recorded {
        path,
        authorization,
        body: serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
    })
}

/// True while `pid` exists and is not a zombie.
pub fn alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit(')')
                .next()
                .map(|rest| !rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// A loopback port that was free a moment ago (for a daemon that must come
/// back on the same address).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Processes whose command line mentions `needle` (a test's temp dir).
pub fn processes_mentioning(needle: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| alive(u64::from(*pid)))
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
        })
        .collect()
}
