//! Prometheus as operators run it: the rules in `deploy/prometheus/`
//! through `promtool`, every metric name the rules and the Grafana
//! dashboard use found in a live scrape, and a real Prometheus server
//! running the shipped configuration against the stack.

use std::process::Command;
use std::time::Duration;

use rbee_system_tests::http::{client, default_ref, send, wait_for};
use rbee_system_tests::ops::{deploy, ops_tools, run_tool};
use rbee_system_tests::queen::{
    hive_with_model, queen_spec, ready_queen, wait_ready_workers, EventStream,
};
use rbee_system_tests::{DaemonSpec, TEST_TOKEN};
use serde_json::json;

/// The texts that name metrics: alert and recording rules, their unit
/// tests, the Grafana dashboard.
fn deploy_texts() -> Vec<(String, String)> {
    [
        "prometheus/rbee-rules.yml",
        "prometheus/rbee-rules.test.yml",
        "grafana/rbee.json",
    ]
    .iter()
    .map(|p| {
        let text = std::fs::read_to_string(deploy(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
        ((*p).to_owned(), text)
    })
    .collect()
}

/// Names the recording rules define (`record: NAME`).
fn recorded_names() -> Vec<String> {
    let rules = std::fs::read_to_string(deploy("prometheus/rbee-rules.yml")).expect("rules");
    rules
        .lines()
        .filter_map(|l| {
            l.trim()
                .strip_prefix("- record:")
                .or(l.trim().strip_prefix("record:"))
        })
        .map(|n| n.trim().to_owned())
        .collect()
}

/// Every `rbee_*` metric name in `text`, after removing recorded names
/// (`model:rbee_queen_...:p99_5m` names no exposed metric).
fn metric_names_in(text: &str, recorded: &[String]) -> std::collections::BTreeSet<String> {
    let mut text = text.to_owned();
    for name in recorded {
        text = text.replace(name.as_str(), " ");
    }
    let bytes = text.as_bytes();
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut names = std::collections::BTreeSet::new();
    let mut i = 0;
    while let Some(found) = text[i..].find("rbee_") {
        let start = i + found;
        let mut end = start;
        while end < bytes.len() && word(bytes[end]) {
            end += 1;
        }
        if start == 0 || !(word(bytes[start - 1]) || bytes[start - 1] == b':') {
            names.insert(text[start..end].to_owned());
        }
        i = end;
    }
    names
}

/// The sample names a scrape can hold: from `# TYPE` lines (families with
/// no sample yet included) and from the samples themselves.
fn exposed_names(scrape: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    for line in scrape.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            match kind {
                "counter" => {
                    names.insert(format!("{name}_total"));
                }
                "histogram" => {
                    for suffix in ["_bucket", "_sum", "_count"] {
                        names.insert(format!("{name}{suffix}"));
                    }
                }
                _ => {
                    names.insert(name.to_owned());
                }
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_owned());
        }
    }
    names
}

fn scrape(url: &str) -> String {
    client()
        .get(url)
        .send()
        .and_then(reqwest::blocking::Response::text)
        .unwrap_or_else(|e| panic!("scrape {url}: {e}"))
}

/// A real Prometheus server (Debian's package), killed on drop.
struct Prometheus {
    child: std::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// The shipped `deploy/prometheus/prometheus.yml` with the example hosts
    /// replaced by `queen` and `hive`, 1 s intervals, and the shipped rules.
    fn scrape_stack(queen: &str, hive: &str, token: &str) -> Self {
        ops_tools();
        let dir = tempfile::tempdir().expect("prometheus dir");
        let token_file = dir.path().join("rbee-api-token");
        std::fs::write(&token_file, token).expect("token file");
        let config = std::fs::read_to_string(deploy("prometheus/prometheus.yml"))
            .expect("prometheus.yml")
            .replace("queen.example:8080", queen)
            .replace("gpu1.example:9200", hive)
            .replace(
                "/etc/prometheus/rbee-api-token",
                token_file.to_str().expect("utf-8"),
            )
            .replace("scrape_interval: 15s", "scrape_interval: 1s")
            .replace("evaluation_interval: 30s", "evaluation_interval: 1s")
            .replace("refresh_interval: 15s", "refresh_interval: 1s");
        assert!(!config.contains(".example"), "{config}");
        let rules = std::fs::read_to_string(deploy("prometheus/rbee-rules.yml"))
            .expect("rules")
            .replace("interval: 30s", "interval: 1s");
        std::fs::write(dir.path().join("prometheus.yml"), config).expect("write config");
        std::fs::write(dir.path().join("rbee-rules.yml"), rules).expect("write rules");
        let (ok, report) = run_tool(
            Command::new("promtool")
                .args(["check", "config"])
                .arg(dir.path().join("prometheus.yml")),
        );
        assert!(ok, "promtool check config:\n{report}");
        let port = rbee_system_tests::free_port();
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start prometheus");
        let server = Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        };
        wait_for(Duration::from_secs(30), "prometheus to be ready", || {
            client()
                .get(format!("{}/-/ready", server.url))
                .send()
                .is_ok_and(|r| r.status() == 200)
        });
        server
    }

    /// `GET /api/v1/query`: the API's `data.result`, or its error.
    fn query(&self, promql: &str) -> Result<Vec<serde_json::Value>, String> {
        let body: serde_json::Value = client()
            .get(format!("{}/api/v1/query", self.url))
            .query(&[("query", promql)])
            .send()
            .and_then(reqwest::blocking::Response::json)
            .map_err(|e| e.to_string())?;
        if body["status"] != "success" {
            return Err(body.to_string());
        }
        Ok(body["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// The single value of `promql`, if it has one.
    fn value(&self, promql: &str) -> Option<f64> {
        let result = self.query(promql).ok()?;
        result.first()?["value"][1].as_str()?.parse().ok()
    }
}

#[test]
fn alert_and_recording_rules_pass_promtool_and_every_alert_has_a_test() {
    let dir = deploy("prometheus");
    for args in [
        ["check", "rules", "rbee-rules.yml"],
        ["test", "rules", "rbee-rules.test.yml"],
    ] {
        let (ok, report) = run_tool(Command::new("promtool").args(args).current_dir(&dir));
        assert!(ok, "promtool {args:?}:\n{report}");
    }
    let rules = std::fs::read_to_string(dir.join("rbee-rules.yml")).expect("rules");
    let tests = std::fs::read_to_string(dir.join("rbee-rules.test.yml")).expect("tests");
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert:"))
        .map(str::trim)
        .collect();
    for required in [
        "RbeeWorkerRestartLoop",
        "RbeeCircuitBreakerOpen",
        "RbeeNoReadyWorkers",
        "RbeeQueueSaturated",
        "RbeeTimeToFirstTokenHigh",
        "RbeeDeadlineExceededRate",
        "RbeeAuditEventsDropped",
        "RbeeHiveUnreachable",
    ] {
        assert!(alerts.contains(&required), "no alert {required}");
    }
    for alert in &alerts {
        // Each alert is tested firing (exp_labels) at least once.
        let tested = tests
            .split("alertname: ")
            .skip(1)
            .any(|t| t.starts_with(alert) && t.contains("exp_labels"));
        assert!(tested, "alert {alert} has no firing test");
    }

    // The check can fail: a rule test expecting the wrong value.
    let broken = tempfile::tempdir().expect("dir");
    std::fs::copy(
        dir.join("rbee-rules.yml"),
        broken.path().join("rbee-rules.yml"),
    )
    .expect("copy");
    std::fs::write(
        broken.path().join("t.yml"),
        tests.replace("value: 0.2485", "value: 0.5"),
    )
    .expect("write");
    let (ok, _) = run_tool(
        Command::new("promtool")
            .args(["test", "rules", "t.yml"])
            .current_dir(broken.path()),
    );
    assert!(!ok, "promtool accepted a wrong expectation");
}

#[test]
fn prometheus_scrapes_the_running_stack_and_every_deployed_metric_name_exists() {
    let hive = hive_with_model(DaemonSpec::new("rbee-hive").with_token(), Some(TEST_TOKEN));
    let queen = ready_queen(&queen_spec(&[&hive]).with_token(), Some(TEST_TOKEN));
    for i in 0..3 {
        let mut stream = EventStream::open(
            client()
                .post(queen.url("/v1/inference"))
                .bearer_auth(TEST_TOKEN)
                .json(
                    &json!({"prompt": format!("Count to {i}:"), "max_tokens": 4, "stream": true}),
                ),
        );
        assert_eq!(stream.status, 200);
        let events = stream.rest();
        assert!(events.iter().any(|e| e["type"] == "token"), "{events:?}");
    }
    let workers = wait_ready_workers(&queen, 1, Some(TEST_TOKEN));
    let worker_url = workers[0]["url"].as_str().expect("worker url").to_owned();

    // Every metric name the deployed files use is exposed by a daemon.
    let mut exposed = std::collections::BTreeSet::new();
    for url in [
        queen.url("/metrics"),
        hive.url("/metrics"),
        format!("{worker_url}/metrics"),
    ] {
        exposed.extend(exposed_names(&scrape(&url)));
    }
    assert!(exposed.contains("rbee_queen_requests_total"), "{exposed:?}");
    let recorded = recorded_names();
    assert!(recorded.len() >= 5, "{recorded:?}");
    for (file, text) in deploy_texts() {
        let used = metric_names_in(&text, &recorded);
        assert!(!used.is_empty(), "{file} names no metric");
        let invented: Vec<_> = used.difference(&exposed).collect();
        assert!(
            invented.is_empty(),
            "{file} uses names no daemon exposes: {invented:?}"
        );
    }
    // The check can fail.
    assert!(!exposed.contains("rbee_queen_requests_totl"));
    let typo = metric_names_in("rate(rbee_queen_requests_totl[5m])", &recorded);
    assert!(typo.difference(&exposed).next().is_some());

    // A real Prometheus scrapes the shipped config, workers found through the hive.
    let prom =
        Prometheus::scrape_stack(&queen.addr.to_string(), &hive.addr.to_string(), TEST_TOKEN);
    let started = std::time::Instant::now();
    while prom
        .value(r#"count(count by (job) (up{job=~"queen-rbee|rbee-hive|llm-worker-rbee"} == 1))"#)
        != Some(3.0)
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "not every job is up; targets: {}\nhive: {:?}",
            scrape(&format!("{}/api/v1/targets", prom.url)),
            hive.logs()
                .iter()
                .filter(|l| l.contains("metrics-targets") || l.contains("auth"))
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let ok = prom
        .value(r#"sum(rbee_queen_requests_total{outcome="ok"})"#)
        .expect("queen requests");
    assert!(ok >= 3.0, "queen ok requests {ok}");
    let tokens = prom
        .value("sum(rbee_worker_generation_tokens_total)")
        .expect("generated tokens");
    assert!((1.0..=12.0).contains(&tokens), "generated tokens {tokens}");
    assert_eq!(
        prom.value(r#"sum(rbee_queen_hives{state="reachable"})"#),
        Some(1.0)
    );
    assert_eq!(prom.value("count(rbee_build_info)"), Some(3.0));
    let worker_labels = prom
        .query(r#"rbee_worker_slots_total{job="llm-worker-rbee"}"#)
        .expect("worker slots");
    assert_eq!(worker_labels.len(), 1, "{worker_labels:?}");
    assert_eq!(worker_labels[0]["metric"]["model"], default_ref());
    assert_eq!(worker_labels[0]["metric"]["hive"], hive.addr.to_string());
    // The hive's own discovery route names the same worker.
    let (status, groups, _) = send(
        client()
            .get(hive.url("/v1/workers/metrics-targets"))
            .bearer_auth(TEST_TOKEN),
    );
    assert_eq!(status, 200, "{groups}");
    assert_eq!(
        groups[0]["targets"][0].as_str(),
        worker_labels[0]["metric"]["instance"].as_str(),
        "{groups}"
    );
    // The requests came before the first scrape: their mean, not a rate.
    assert!(
        prom.value("sum(rbee_queen_time_to_first_token_seconds_count)") >= Some(3.0),
        "ttft histogram count"
    );
    let ttft = prom
        .value("sum(rbee_queen_time_to_first_token_seconds_sum) / sum(rbee_queen_time_to_first_token_seconds_count)")
        .expect("ttft");
    assert!(ttft > 0.0 && ttft < 60.0, "ttft {ttft}");

    // The rules load and evaluate without error; a recording rule has data.
    wait_for(
        Duration::from_secs(30),
        "a recording rule to have data",
        || {
            prom.query("model_outcome:rbee_queen_requests:rate5m")
                .is_ok_and(|r| !r.is_empty())
        },
    );
    let rules: serde_json::Value = client()
        .get(format!("{}/api/v1/rules", prom.url))
        .send()
        .and_then(reqwest::blocking::Response::json)
        .expect("rules");
    let groups = rules["data"]["groups"].as_array().expect("groups");
    let all: Vec<&serde_json::Value> = groups
        .iter()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .collect();
    assert!(all.len() >= 15, "{} rules loaded", all.len());
    for rule in all {
        assert_eq!(rule["health"], "ok", "{rule}");
    }

    // Every dashboard query is valid PromQL against this server.
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(deploy("grafana/rbee.json")).expect("json"))
            .expect("dashboard json");
    let mut queries = 0;
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("expr");
            let expr = expr
                .replace("$model", ".*")
                .replace("$__rate_interval", "1m");
            prom.query(&expr)
                .unwrap_or_else(|e| panic!("{}: {expr}: {e}", panel["title"]));
            queries += 1;
        }
    }
    assert!(queries >= 20, "{queries} dashboard queries");
}
