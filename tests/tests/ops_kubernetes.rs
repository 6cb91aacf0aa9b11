//! The Kubernetes manifests in `deploy/kubernetes/` against the API's
//! schemas (`kubernetes-validate --strict`) and the Prometheus Operator's
//! CRD schemas.

use std::path::PathBuf;
use std::process::Command;

use rbee_system_tests::ops::{deploy, ops_tools, run_tool};
use rbee_system_tests::workspace_root;

fn kubernetes_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy("kubernetes"))
        .expect("deploy/kubernetes")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

/// `kubernetes-validate --strict` (unknown fields are errors): its exit
/// status and output.
fn kubernetes_validate(files: &[PathBuf]) -> (bool, String) {
    run_tool(
        Command::new(&ops_tools().python)
            .args(["-m", "kubernetes_validate", "--strict", "-k", "1.34.0"])
            .args(files),
    )
}

/// `scripts/validate-crds.mjs` on `files`: exit status and output.
fn validate_crds(files: &[PathBuf]) -> (bool, String) {
    run_tool(
        Command::new("node")
            .arg(workspace_root().join("scripts/validate-crds.mjs"))
            .arg(&ops_tools().node_modules)
            .args(files),
    )
}

#[test]
fn kubernetes_manifests_pass_the_api_schemas_and_the_operator_crds() {
    let files = kubernetes_files();
    assert!(files.len() >= 5, "{files:?}");
    let (ok, report) = kubernetes_validate(&files);
    assert!(ok, "kubernetes-validate:\n{report}");
    let passed = report
        .lines()
        .filter(|l| l.contains(" passed for resource "))
        .count();
    for kind in [
        "namespace/rbee",
        "secret/rbee-api-token",
        "deployment/queen-rbee",
        "service/queen-rbee",
        "poddisruptionbudget/queen-rbee",
        "daemonset/rbee-hive",
    ] {
        assert!(
            report.contains(&format!("passed for resource {kind} ")),
            "{kind}:\n{report}"
        );
    }
    // The only objects it has no schema for are the operator's; they are
    // checked against the CRDs' schemas next, never skipped.
    for line in report
        .lines()
        .filter(|l| l.contains("Couldn't find schema"))
    {
        assert!(line.contains("monitoring.coreos.com"), "{line}");
    }

    let (ok, crd_report) = validate_crds(&files);
    assert!(ok, "CRD validation:\n{crd_report}");
    for object in [
        "ServiceMonitor/queen-rbee",
        "PodMonitor/rbee-hive",
        "ScrapeConfig/llm-worker-rbee",
    ] {
        assert!(
            crd_report.contains(&format!(
                "ok {}: {object}",
                deploy("kubernetes/monitoring.yaml").display()
            )),
            "{object}:\n{crd_report}"
        );
    }
    let unchecked = report
        .lines()
        .filter(|l| l.contains("Couldn't find schema"))
        .count();
    assert_eq!(unchecked, 3, "{report}");
    assert!(passed >= 7, "{report}");

    // Both checks can fail: an unknown field, a wrongly typed CRD field.
    let dir = tempfile::tempdir().expect("dir");
    let queen = std::fs::read_to_string(deploy("kubernetes/queen.yaml")).expect("queen.yaml");
    let typo = dir.path().join("typo.yaml");
    std::fs::write(
        &typo,
        queen.replace(
            "terminationGracePeriodSeconds",
            "terminationGracePeriodSecond",
        ),
    )
    .expect("write");
    let (ok, report) = kubernetes_validate(&[typo]);
    assert!(
        !ok,
        "kubernetes-validate accepted an unknown field:\n{report}"
    );
    let monitoring =
        std::fs::read_to_string(deploy("kubernetes/monitoring.yaml")).expect("monitoring");
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, monitoring.replace("interval: 15s", "interval: 15")).expect("write");
    let (ok, _) = validate_crds(&[bad]);
    assert!(!ok, "a numeric interval passed the CRD schema");

    // What the issue asks of them, beyond being valid.
    let hive = std::fs::read_to_string(deploy("kubernetes/hive.yaml")).expect("hive.yaml");
    for (name, text) in [("queen.yaml", &queen), ("hive.yaml", &hive)] {
        for required in [
            "path: /health/live",
            "path: /health/ready",
            "preStop:",
            "terminationGracePeriodSeconds:",
            "secretName: rbee-api-token",
            "defaultMode: 0400",
            "LLORCH_API_TOKEN_FILE",
            "runAsNonRoot: true",
        ] {
            assert!(text.contains(required), "{name} lacks {required}");
        }
    }
    for required in [
        "kind: DaemonSet",
        "nvidia.com/gpu: 1",
        "hostPath:",
        "RBEE_QUEEN_URL",
    ] {
        assert!(hive.contains(required), "hive.yaml lacks {required}");
    }
}
