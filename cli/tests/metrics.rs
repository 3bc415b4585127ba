//! Every role's `/metrics` (`up` gives each process one and prints where): each parses as
//! Prometheus text, and the workers' figures move under load.

mod common;

use std::collections::BTreeMap;

use serde_json::json;

/// The samples of a Prometheus text page, by series (name and labels); panics on a line
/// that is neither a comment nor `series value`.
fn parse(page: &str) -> BTreeMap<String, f64> {
    let body = page.split("\r\n\r\n").nth(1).expect("an HTTP answer");
    let mut samples = BTreeMap::new();
    for line in body.lines().filter(|l| !l.is_empty()) {
        if let Some(comment) = line.strip_prefix("# ") {
            assert!(
                comment.starts_with("HELP ") || comment.starts_with("TYPE "),
                "{line}"
            );
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line}"));
        let name = series.split('{').next().unwrap();
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "{line}"
        );
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("{line}"));
        samples.insert(series.to_owned(), value);
    }
    samples
}

#[test]
fn every_role_serves_metrics_that_move_under_load() {
    let dir = tempfile::tempdir().unwrap();
    let (_up, cluster, printed) = common::start_up_printing(
        &["--http", "127.0.0.1:0", "--expert-workers", "2"],
        &dir.path().join("up.json"),
    );
    // "  expert worker 2 (63 experts)  127.0.0.1:P (pid N, metrics http://ADDR/metrics)"
    let endpoints: Vec<(String, String)> = printed
        .iter()
        .filter_map(|l| {
            let (_, rest) = l.split_once("metrics http://")?;
            let address = rest.split('/').next()?.to_owned();
            Some((l.trim().split("  ").next()?.to_owned(), address))
        })
        .collect();
    let roles = |r: &str| endpoints.iter().filter(|(l, _)| l.starts_with(r)).count();
    assert_eq!(
        (
            roles("coordinator"),
            roles("expert worker"),
            roles("attention worker")
        ),
        (1, 2, 1),
        "{printed:#?}"
    );
    let scrape = || -> Vec<BTreeMap<String, f64>> {
        endpoints
            .iter()
            .map(|(_, a)| parse(&common::metrics(a)))
            .collect()
    };
    let before = scrape();
    let http = cluster["http"][0].as_str().unwrap();
    for i in 0..3u32 {
        let body = json!({"prompt": [10 + i, 20, 30, 40], "max_tokens": 5, "temperature": 0});
        common::post(http, "/v1/completions", &body).unwrap();
    }
    let after = scrape();
    // The worker that joined second loaded the experts a re-plan moved to it.
    let loaded: f64 = after
        .iter()
        .filter_map(|m| m.get("expertmesh_expert_loaded_bytes_total"))
        .sum();
    assert!(loaded > 0.0, "no expert bytes were moved by a placement");
    for (((label, _), b), a) in endpoints.iter().zip(&before).zip(&after) {
        let moved =
            |name: &str| a.get(name).copied().unwrap_or(0.0) > b.get(name).copied().unwrap_or(0.0);
        if label.starts_with("coordinator") {
            assert_eq!(a["expertmesh_raft_is_leader"], 1.0, "{label}: {a:?}");
            assert!(a["expertmesh_placement_epoch"] >= 1.0, "{label}: {a:?}");
            assert!(
                a["expertmesh_raft_leader_changes_total"] >= 1.0,
                "{label}: {a:?}"
            );
        } else if label.starts_with("expert worker") {
            assert!(
                moved("expertmesh_expert_dispatches_total"),
                "{label}: {b:?} -> {a:?}"
            );

            assert!(a
                .keys()
                .any(|k| k.starts_with("expertmesh_expert_compute_seconds_total{layer=")));
        } else {
            assert!(
                moved("expertmesh_engine_steps_total"),
                "{label}: {b:?} -> {a:?}"
            );
            assert!(moved("expertmesh_engine_tokens_generated_total"), "{label}");
        }
    }
}
