//! `expertmesh loadgen` against `expertmesh up` on the tiny model: zero failures, the
//! client's token count equal to the server's usage, the JSON report's fields, SVG plots,
//! and an HTML page that a headless Chromium renders with its plots drawn.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use expertmesh_loadgen::plot;
use serde_json::Value;

/// An SVG document with something drawn in it.
fn assert_svg(path: &Path) {
    let svg = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
        "{}",
        path.display()
    );
    assert!(
        svg.contains("<rect") || svg.contains("<circle") || svg.contains("<polyline"),
        "{} is blank",
        path.display()
    );
}

/// A headless Chromium on this machine: CI installs one (`.ci/run`) and sets
/// `EXPERTMESH_REQUIRE_BROWSER=1`, so there a missing browser fails instead of skipping.
fn chromium() -> Option<&'static str> {
    let found = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| {
            Command::new(b)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        });
    assert!(
        found.is_some() || std::env::var_os("EXPERTMESH_REQUIRE_BROWSER").is_none(),
        "no chromium on PATH and EXPERTMESH_REQUIRE_BROWSER is set"
    );
    found
}

/// Opens `page` in headless Chromium and checks in a screenshot that its plots were drawn:
/// each series colour covers the area of real bars and points, which a broken image or an
/// SVG the browser refused would not.
fn assert_renders(page: &Path, dir: &Path) {
    let Some(browser) = chromium() else {
        eprintln!("no chromium: the page was not opened in a browser");
        return;
    };
    let shot = dir.join("page.png");
    let mut child = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1000,4200",
            &format!("--screenshot={}", shot.display()),
            &format!("file://{}", page.display()),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let give_up = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > give_up {
            let _ = child.kill();
            panic!("chromium did not finish in 60 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let file = std::fs::File::open(&shot).expect("chromium wrote no screenshot");
    let mut reader = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    let step = info.color_type.samples();
    let near = |px: &[u8], c: [u8; 3]| (0..3).all(|k| px[k].abs_diff(c[k]) <= 4);
    let count = |c: [u8; 3]| buf.chunks_exact(step).filter(|px| near(px, c)).count();
    let [blue, orange] = [plot::BLUE, plot::ORANGE].map(|c| count([c.0, c.1, c.2]));
    // Histogram bars, the worker bars and the points: thousands of pixels of each colour.
    assert!(
        blue > 3000 && orange > 3000,
        "the plots did not render: {blue} blue and {orange} orange pixels in {}",
        shot.display()
    );
}

#[test]
fn loadgen_against_up() {
    let dir = tempfile::tempdir().unwrap();
    // The API on a port `up` picks itself (the up file says which): a port found free here
    // could be taken by the other test's processes before `up` binds it.
    let (_up, cluster) = common::start_up(
        &["--tls", "--http", "127.0.0.1:0"],
        &dir.path().join("up.json"),
    );
    let http = cluster["api"]
        .as_str()
        .expect("the up file names the API")
        .to_owned();
    let out = dir.path().join("report.json");
    let plots = dir.path().join("plots");
    let page = dir.path().join("report.html");
    let url = format!("http://{http}/v1");
    let run = common::expertmesh(&[
        "loadgen",
        "--url",
        &url,
        "--concurrency",
        "4",
        "--duration",
        "3s",
        "--warmup",
        "500ms",
        "--slo",
        "ttft_ms=60000,tpot_ms=60000",
        "--prompt-len",
        "uniform:4-40",
        "--output-len",
        "uniform:2-12",
        "--seed",
        "7",
        "--out",
        out.to_str().unwrap(),
        "--plot",
        plots.to_str().unwrap(),
        "--html",
        page.to_str().unwrap(),
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(r["requests_failed"], 0, "{r}");
    assert!(r["requests_ok"].as_u64().unwrap() > 10, "{r}");
    assert_eq!(
        r["output_tokens"], r["client_counted_tokens"],
        "client and server disagree"
    );
    for key in ["output_tokens", "duration_s", "output_tokens_per_s"] {
        assert!(r[key].as_f64().unwrap() > 0.0, "{key}");
    }
    for lat in ["ttft_ms", "itl_ms", "e2e_ms"] {
        for p in ["p50", "p90", "p99", "max"] {
            assert!(r[lat][p].as_f64().is_some(), "{lat}.{p}");
        }
        assert!(r[lat]["p50"].as_f64().unwrap() <= r[lat]["max"].as_f64().unwrap());
    }
    for svg in ["latency.svg", "timeline.svg", "experts.svg", "workers.svg"] {
        assert_svg(&plots.join(svg));
    }
    // Goodput against a generous SLO: every request; vLLM's result keys beside ours.
    assert_eq!(r["goodput"]["requests_met"], r["requests_ok"], "{r}");
    assert_eq!(r["completed"], r["requests_ok"]);
    assert!(r["request_goodput"].as_f64().unwrap() > 0.0);
    assert!(r["median_tpot_ms"].as_f64().unwrap() > 0.0);
    let html = std::fs::read_to_string(&page).unwrap();
    assert!(html.contains("<table>") && html.matches("data:image/svg+xml;base64,").count() == 4);
    // A sweep writes one report per level and the throughput-latency curve.
    let run = common::expertmesh(&[
        "loadgen",
        "--url",
        &url,
        "--sweep",
        "concurrency=1,3",
        "--requests",
        "6",
        "--chat",
        "--turns",
        "2",
        "--workload",
        "shared-prefix",
        "--prefix-len",
        "64",
        "--prefix-groups",
        "2",
        "--out",
        out.to_str().unwrap(),
        "--plot",
        plots.to_str().unwrap(),
        "--html",
        page.to_str().unwrap(),
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let levels: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(levels.as_array().unwrap().len(), 2);
    assert_eq!(levels[1]["label"], "concurrency=3");
    assert_eq!(levels[1]["requests_ok"], 6);
    assert_svg(&plots.join("sweep.svg"));
    assert_svg(&plots.join("pareto.svg"));
    let html = std::fs::read_to_string(&page).unwrap();
    assert_eq!(html.matches("data:image/svg+xml;base64,").count(), 6);
    assert_renders(&page, dir.path());
    let table = String::from_utf8_lossy(&run.stdout);
    assert!(
        table.contains("concurrency=1") && table.contains("concurrency=3"),
        "{table}"
    );
    // Repeated runs: each figure's mean and confidence interval over them.
    let run = common::expertmesh(&[
        "loadgen",
        "--url",
        &url,
        "--requests",
        "4",
        "--concurrency",
        "2",
        "--repeat",
        "3",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(r["runs"].as_array().unwrap().len(), 3);
    let s = &r["summaries"][0];
    assert_eq!(s["runs"], 3);
    assert!(
        s["output_tokens_per_s"]["mean"].as_f64().unwrap() > 0.0,
        "{s}"
    );
    assert!(
        s["output_tokens_per_s"]["ci95"].as_f64().unwrap() >= 0.0,
        "{s}"
    );
    assert!(String::from_utf8_lossy(&run.stdout).contains("over 3 runs (mean ± 95% CI)"));
}

/// `loadgen experts` drives the expert tier alone and reports per worker.
#[test]
fn loadgen_experts_against_expert_workers() {
    let model = common::fixture("tiny-maverick").display().to_string();
    let (coordinator, _data) = common::start_coordinator(&model);
    let c = coordinator.address.as_str();
    let worker = || {
        common::start(&[
            "expert-worker",
            "--coordinator",
            c,
            "--listen",
            "127.0.0.1:0",
            "--model",
            &model,
        ])
    };
    let (_a, _b) = (worker(), worker());
    let give_up = Instant::now() + Duration::from_secs(30);
    let report = loop {
        let out = common::expertmesh(&[
            "loadgen",
            "experts",
            "--coordinator",
            c,
            "--model",
            &model,
            "--tokens",
            "64",
            "--skew",
            "zipf:1.2",
            "--duration",
            "1",
            "--json",
        ]);
        let v: Option<Value> = serde_json::from_slice(&out.stdout).ok();
        // Until both workers have registered, the placement has one worker only.
        match v {
            Some(v) if v["workers"].as_array().map_or(0, Vec::len) == 2 => break v,
            _ => {
                assert!(
                    Instant::now() < give_up,
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    };
    assert!(report["batches"].as_u64().unwrap() > 0, "{report}");
    assert!(report["tokens_per_s"].as_f64().unwrap() > 0.0);
    for w in report["workers"].as_array().unwrap() {
        assert_eq!(w["failed"], 0, "{w}");
        assert!(w["rtt_ms"]["p99"].as_f64().unwrap() >= w["rtt_ms"]["p50"].as_f64().unwrap());
    }
}
