//! The only module of the hive that creates processes (clippy's
//! `disallowed-methods` refuses `Command::new` everywhere else).
//!
//! Every process is forked by one thread, `worker-launcher`, that lives as
//! long as the hive. That matters because a child's parent-death signal
//! (`PR_SET_PDEATHSIG`, which the worker sets on itself at startup when
//! given `--parent-pid`) fires when the *thread* that forked it exits, and
//! tokio's blocking threads exit when idle. Each worker also leads its own
//! process group, which the hive signals to stop it and anything it started.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::sync::oneshot;

/// What to start.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    /// The program.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// Variables to set (on top of the hive's environment minus secrets).
    pub env: Vec<(String, String)>,
    /// Working directory.
    pub dir: PathBuf,
    /// File receiving stdout and stderr.
    pub log: PathBuf,
}

/// Variables never passed on to a worker: the hive's own credentials, and
/// systemd's notification socket (the unit's readiness is the hive's).
const SCRUBBED_ENV: &[&str] = &[
    "NOTIFY_SOCKET",
    "LLORCH_API_TOKEN",
    "LLORCH_API_TOKEN_FILE",
    "CREDENTIALS_DIRECTORY",
    "HF_TOKEN",
    "HF_TOKEN_PATH",
];

enum Job {
    Spawn(
        LaunchSpec,
        oneshot::Sender<std::io::Result<tokio::process::Child>>,
    ),
    Probe(PathBuf, Vec<String>, oneshot::Sender<Option<String>>),
}

/// A handle to the launcher thread.
#[derive(Debug, Clone)]
pub struct Launcher {
    jobs: mpsc::Sender<Job>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Job")
    }
}

impl Launcher {
    /// Start the launcher thread. Must be called inside a tokio runtime
    /// (children are registered with its reaper).
    pub fn start() -> std::io::Result<Self> {
        let runtime = tokio::runtime::Handle::current();
        let (jobs, queue) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("worker-launcher".to_owned())
            .spawn(move || {
                let _runtime = runtime.enter();
                for job in queue {
                    match job {
                        Job::Spawn(spec, reply) => {
                            let _ = reply.send(spawn(&spec));
                        }
                        Job::Probe(program, args, reply) => {
                            let _ = reply.send(probe(&program, &args));
                        }
                    }
                }
            })?;
        Ok(Self { jobs })
    }

    /// Start a worker process in its own process group.
    pub async fn spawn(&self, spec: LaunchSpec) -> std::io::Result<tokio::process::Child> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Job::Spawn(spec, tx))
            .map_err(|_| std::io::Error::other("the launcher thread has stopped"))?;
        rx.await
            .map_err(|_| std::io::Error::other("the launcher thread has stopped"))?
    }

    /// Run a short-lived program (a version or GPU query) and return its
    /// stdout, or `None` when it is missing, fails or takes over 10 s.
    pub async fn probe(&self, program: impl Into<PathBuf>, args: &[&str]) -> Option<String> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Job::Probe(
                program.into(),
                args.iter().map(|a| (*a).to_owned()).collect(),
                tx,
            ))
            .ok()?;
        rx.await.ok().flatten()
    }
}

#[expect(
    clippy::disallowed_methods,
    reason = "the launcher is the one place that creates processes"
)]
fn spawn(spec: &LaunchSpec) -> std::io::Result<tokio::process::Child> {
    use std::os::unix::process::CommandExt;
    std::fs::create_dir_all(&spec.dir)?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&spec.log)?;
    let mut cmd = std::process::Command::new(&spec.program);
    cmd.args(&spec.args)
        .current_dir(&spec.dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0);
    for key in SCRUBBED_ENV {
        cmd.env_remove(key);
    }
    for (k, v) in &spec.env {
        cmd.env(k, v);
    }
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(false);
    cmd.spawn()
}

#[expect(
    clippy::disallowed_methods,
    reason = "the launcher is the one place that creates processes"
)]
fn probe(program: &PathBuf, args: &[String]) -> Option<String> {
    let mut child = std::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let started = std::time::Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => break,
            Ok(Some(_)) | Err(_) => return None,
            Ok(None) if started.elapsed() > Duration::from_secs(10) => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take()?, &mut out).ok()?;
    Some(out)
}

/// Send `signal` to the process `pid` alone (not its group); true when sent.
pub fn signal_pid(pid: u32, signal: Signal) -> bool {
    i32::try_from(pid)
        .ok()
        .is_some_and(|pid| nix::sys::signal::kill(Pid::from_raw(pid), signal).is_ok())
}

/// Send `signal` to the process group led by `pid`.
pub fn signal_group(pid: u32, signal: Signal) -> bool {
    i32::try_from(pid)
        .ok()
        .is_some_and(|pid| killpg(Pid::from_raw(pid), signal).is_ok())
}
