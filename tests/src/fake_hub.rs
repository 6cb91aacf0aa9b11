//! Test double standing in for Hugging Face: a loopback HTTP server with
//! the Hub's file layout and API, started by the test that uses it.
//!
//! It serves `GET /api/models/{org}/{repo}/revision/{rev}` (with `blobs`
//! sizes and LFS hashes) and `GET /{org}/{repo}/resolve/{rev}/{file}` with
//! `Range`, `ETag`, `X-Linked-Etag`, `X-Linked-Size` and `X-Repo-Commit`,
//! answers unknown repositories, revisions and files with 404 and the Hub's
//! `X-Error-Code`, and gated repositories with 401 unless the right token
//! comes. Knobs let a test throttle transfers, drop a connection mid-file
//! or advertise a wrong checksum; every request is recorded.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, MutexGuard};
use sha2::{Digest, Sha256};

/// One file of a fake repository.
#[derive(Debug, Clone)]
pub struct HubFile {
    name: String,
    content: Arc<Vec<u8>>,
    lfs: bool,
    advertised_sha256: Option<String>,
}

impl HubFile {
    /// A file stored with Git LFS (the Hub reports its SHA-256).
    pub fn lfs(name: &str, content: Vec<u8>) -> Self {
        Self {
            name: name.to_owned(),
            content: Arc::new(content),
            lfs: true,
            advertised_sha256: None,
        }
    }

    /// A small file stored in Git (no SHA-256 reported).
    pub fn git(name: &str, content: &[u8]) -> Self {
        Self {
            name: name.to_owned(),
            content: Arc::new(content.to_vec()),
            lfs: false,
            advertised_sha256: None,
        }
    }

    /// Advertise a SHA-256 that does not match the content.
    pub fn with_wrong_sha256(mut self) -> Self {
        self.advertised_sha256 = Some("0".repeat(64));
        self
    }

    fn sha256(&self) -> String {
        self.advertised_sha256
            .clone()
            .unwrap_or_else(|| sha256_hex(&self.content))
    }

    fn etag(&self) -> String {
        if self.lfs {
            self.sha256()
        } else {
            sha256_hex(&self.content)[..40].to_owned()
        }
    }
}

/// SHA-256 of `bytes`, lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[derive(Debug, Clone)]
struct HubRepo {
    commit: String,
    files: Vec<HubFile>,
    token: Option<String>,
}

/// One request the fake Hub received.
#[derive(Debug, Clone)]
pub struct HubRequest {
    /// Path and query.
    pub target: String,
    /// The `Range` header.
    pub range: Option<String>,
    /// The `Authorization` header.
    pub authorization: Option<String>,
}

#[derive(Debug, Default)]
struct State {
    repos: HashMap<String, HubRepo>,
    requests: Vec<HubRequest>,
    bytes_per_sec: Option<u64>,
    drop_after: HashMap<String, u64>,
    served: HashMap<String, u64>,
}

/// The fake Hub; the listening thread lives as long as the test process.
#[derive(Debug, Clone)]
pub struct FakeHub {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
}

impl FakeHub {
    /// Listen on an OS-chosen loopback port.
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind fake hub");
        let addr = listener.local_addr().expect("fake hub address");
        let hub = Self {
            addr,
            state: Arc::default(),
        };
        let server = hub.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                let server = server.clone();
                std::thread::spawn(move || server.serve(stream));
            }
        });
        hub
    }

    /// Its base URL, for `HF_ENDPOINT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock()
    }

    /// Add `repo` (`ORG/NAME`) with `files`; returns its commit id.
    pub fn add_repo(&self, repo: &str, files: Vec<HubFile>) -> String {
        let commit = sha256_hex(repo.as_bytes())[..40].to_owned();
        self.lock().repos.insert(
            repo.to_owned(),
            HubRepo {
                commit: commit.clone(),
                files,
                token: None,
            },
        );
        commit
    }

    /// Require `Authorization: Bearer <token>` for `repo`.
    pub fn gate(&self, repo: &str, token: &str) {
        if let Some(r) = self.lock().repos.get_mut(repo) {
            r.token = Some(token.to_owned());
        }
    }

    /// Limit every transfer to about `bytes_per_sec` (None: unlimited).
    pub fn throttle(&self, bytes_per_sec: Option<u64>) {
        self.lock().bytes_per_sec = bytes_per_sec;
    }

    /// Close the connection of the next request for `file` whose range
    /// covers the file offset `offset`, right before that byte.
    pub fn drop_once(&self, file: &str, offset: u64) {
        self.lock().drop_after.insert(file.to_owned(), offset);
    }

    /// Requests so far.
    pub fn requests(&self) -> Vec<HubRequest> {
        self.lock().requests.clone()
    }

    /// Body bytes sent for `file` so far (metadata probes included).
    pub fn bytes_served(&self, file: &str) -> u64 {
        self.lock().served.get(file).copied().unwrap_or(0)
    }

    fn serve(&self, stream: TcpStream) {
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        let mut reader = BufReader::new(&stream);
        let mut line = String::new();
        if reader.read_line(&mut line).is_err() {
            return;
        }
        let target = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
        let mut range = None;
        let mut authorization = None;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).is_err() {
                return;
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                match name.trim().to_ascii_lowercase().as_str() {
                    "range" => range = Some(value.trim().to_owned()),
                    "authorization" => authorization = Some(value.trim().to_owned()),
                    _ => {}
                }
            }
        }
        self.lock().requests.push(HubRequest {
            target: target.clone(),
            range: range.clone(),
            authorization: authorization.clone(),
        });
        let path = target.split('?').next().unwrap_or("").replace("%2F", "/");
        let mut out = &stream;
        if let Some(rest) = path.strip_prefix("/api/models/") {
            self.serve_info(&mut out, rest, authorization.as_deref());
        } else if let Some((repo, rev_file)) = path
            .trim_start_matches('/')
            .split_once("/resolve/")
            .map(|(r, f)| (r.to_owned(), f.to_owned()))
        {
            self.serve_file(
                &mut out,
                &repo,
                &rev_file,
                range.as_deref(),
                authorization.as_deref(),
            );
        } else {
            respond(&mut out, "404 Not Found", &[], b"{\"error\":\"not found\"}");
        }
    }

    /// Look up `repo` at `rev`, or write the Hub's error.
    fn find_repo(
        &self,
        out: &mut &TcpStream,
        repo: &str,
        rev: &str,
        authorization: Option<&str>,
    ) -> Option<HubRepo> {
        let found = self.lock().repos.get(repo).cloned();
        let Some(found) = found else {
            respond(
                out,
                "404 Not Found",
                &[("X-Error-Code", "RepoNotFound")],
                b"{\"error\":\"Repository not found\"}",
            );
            return None;
        };
        if let Some(token) = &found.token {
            if authorization != Some(&format!("Bearer {token}")) {
                respond(
                    out,
                    "401 Unauthorized",
                    &[("X-Error-Code", "GatedRepo")],
                    b"{\"error\":\"Access to this model is restricted\"}",
                );
                return None;
            }
        }
        if rev != "main" && rev != found.commit {
            respond(
                out,
                "404 Not Found",
                &[("X-Error-Code", "RevisionNotFound")],
                b"{\"error\":\"Invalid rev id\"}",
            );
            return None;
        }
        Some(found)
    }

    fn serve_info(&self, out: &mut &TcpStream, rest: &str, authorization: Option<&str>) {
        let Some((repo, rev)) = rest.split_once("/revision/") else {
            respond(out, "404 Not Found", &[], b"{}");
            return;
        };
        let Some(found) = self.find_repo(out, repo, rev, authorization) else {
            return;
        };
        let siblings: Vec<serde_json::Value> = found
            .files
            .iter()
            .map(|f| {
                let mut s = serde_json::json!({
                    "rfilename": f.name,
                    "size": f.content.len(),
                    "blobId": f.etag(),
                });
                if f.lfs {
                    s["lfs"] = serde_json::json!({
                        "sha256": f.sha256(),
                        "size": f.content.len(),
                        "pointerSize": 134,
                    });
                }
                s
            })
            .collect();
        let body = serde_json::json!({ "id": repo, "sha": found.commit, "siblings": siblings });
        respond(
            out,
            "200 OK",
            &[("Content-Type", "application/json")],
            body.to_string().as_bytes(),
        );
    }

    fn serve_file(
        &self,
        out: &mut &TcpStream,
        repo_path: &str,
        rev_file: &str,
        range: Option<&str>,
        authorization: Option<&str>,
    ) {
        // The revision may itself contain '/', so try each split.
        let known: Vec<String> = self.lock().repos.keys().cloned().collect();
        let Some(repo) = known.iter().find(|r| *r == repo_path) else {
            respond(
                out,
                "404 Not Found",
                &[("X-Error-Code", "RepoNotFound")],
                b"{}",
            );
            return;
        };
        let Some((rev, file)) = rev_file.split_once('/') else {
            respond(
                out,
                "404 Not Found",
                &[("X-Error-Code", "EntryNotFound")],
                b"{}",
            );
            return;
        };
        let Some(found) = self.find_repo(out, repo, rev, authorization) else {
            return;
        };
        let Some(f) = found.files.iter().find(|f| f.name == file).cloned() else {
            respond(
                out,
                "404 Not Found",
                &[("X-Error-Code", "EntryNotFound")],
                b"{}",
            );
            return;
        };
        let len = f.content.len() as u64;
        let (start, end) = parse_range(range, len);
        if start >= len || start > end {
            respond(
                out,
                "416 Range Not Satisfiable",
                &[("Content-Range", &format!("bytes */{len}"))],
                b"",
            );
            return;
        }
        let etag = format!("\"{}\"", f.etag());
        let size = len.to_string();
        let content_range = format!("bytes {start}-{end}/{len}");
        let mut headers = vec![
            ("X-Repo-Commit", found.commit.as_str()),
            ("ETag", etag.as_str()),
            ("Accept-Ranges", "bytes"),
            ("Content-Type", "application/octet-stream"),
        ];
        if range.is_some() {
            headers.push(("Content-Range", content_range.as_str()));
        }
        if f.lfs {
            headers.push(("X-Linked-Etag", etag.as_str()));
            headers.push(("X-Linked-Size", size.as_str()));
        }
        let body = &f.content[start as usize..=end as usize];
        let is_probe = end == start;
        let (limit, rate) = {
            let mut state = self.lock();
            let covers = state
                .drop_after
                .get(&f.name)
                .is_some_and(|&offset| !is_probe && start <= offset && offset <= end);
            let limit = if covers {
                state
                    .drop_after
                    .remove(&f.name)
                    .map(|offset| offset - start)
            } else {
                None
            };
            (limit, state.bytes_per_sec)
        };
        let status = if range.is_some() {
            "206 Partial Content"
        } else {
            "200 OK"
        };
        let mut head = format!(
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
            body.len()
        );
        for (k, v) in &headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        if out.write_all(head.as_bytes()).is_err() {
            return;
        }
        let to_send = limit.map_or(body.len(), |l| (l as usize).min(body.len()));
        for piece in body[..to_send].chunks(64 * 1024) {
            if out.write_all(piece).is_err() {
                return;
            }
            *self.lock().served.entry(f.name.clone()).or_default() += piece.len() as u64;
            if let Some(rate) = rate {
                std::thread::sleep(Duration::from_secs_f64(piece.len() as f64 / rate as f64));
            }
        }
        let _ = out.flush();
        if limit.is_some() {
            let _ = out.shutdown(std::net::Shutdown::Both);
        }
    }
}

fn parse_range(range: Option<&str>, len: u64) -> (u64, u64) {
    let last = len.saturating_sub(1);
    let Some(spec) = range.and_then(|r| r.strip_prefix("bytes=")) else {
        return (0, last);
    };
    let (a, b) = spec.split_once('-').unwrap_or((spec, ""));
    let start = a.trim().parse().unwrap_or(0);
    let end = b.trim().parse().map_or(last, |e: u64| e.min(last));
    (start, end)
}

fn respond(out: &mut &TcpStream, status: &str, headers: &[(&str, &str)], body: &[u8]) {
    let mut head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let _ = out.write_all(head.as_bytes());
    let _ = out.write_all(body);
    let _ = out.flush();
}
