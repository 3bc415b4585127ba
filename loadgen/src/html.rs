//! One self-contained HTML page of a run: the table of every level, the plots inlined as
//! SVG data URLs (as images, so nothing in them runs), and the JSON of each level — a file to mail or attach, that opens with no
//! server and nothing beside it.

use std::fmt::Write;

use base64::Engine as _;

use crate::report::{Percentiles, Report};

/// A plot for the page: its caption and its SVG document.
pub struct Figure {
    pub caption: String,
    pub svg: String,
}

/// Text made safe inside HTML.
fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The page for `reports` (one per level) with `figures`, titled `title`.
pub fn page(title: &str, reports: &[Report], figures: &[Figure]) -> String {
    let mut out = String::new();
    let title = escape(title);
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title>\
         <style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}\
         td,th{{border:1px solid #bbb;padding:.3em .6em;text-align:right}}\
         th:first-child,td:first-child{{text-align:left}}figure{{margin:1.5em 0}}\
         img{{max-width:100%}}</style></head><body>\n<h1>{title}</h1>\n"
    );
    out += "<table>\n<tr><th>level</th><th>ok</th><th>failed</th><th>req/s</th>\
            <th>output tok/s</th><th>TTFT ms p50/p90/p99</th><th>TPOT ms p50/p90/p99</th>\
            <th>ITL ms p50/p90/p99</th><th>e2e ms p50/p90/p99</th><th>goodput req/s</th></tr>\n";
    let p = |x: &Percentiles| format!("{:.1} / {:.1} / {:.1}", x.p50, x.p90, x.p99);
    for r in reports {
        let goodput = r.goodput.map_or("-".to_owned(), |g| {
            format!("{:.2} ({:.0}%)", g.request_goodput, g.met_share * 100.0)
        });
        let _ = writeln!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{:.2}</td><td>{:.1}</td><td>{}</td>\
             <td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&r.label),
            r.requests_ok,
            r.requests_failed,
            r.requests_per_s,
            r.output_tokens_per_s,
            p(&r.ttft_ms),
            p(&r.tpot_ms),
            p(&r.itl_ms),
            p(&r.e2e_ms),
            goodput
        );
    }
    out += "</table>\n";
    for f in figures {
        let data = base64::engine::general_purpose::STANDARD.encode(&f.svg);
        let caption = escape(&f.caption);
        let _ = writeln!(
            out,
            "<figure><img alt=\"{caption}\" src=\"data:image/svg+xml;base64,{data}\">\
             <figcaption>{caption}</figcaption></figure>"
        );
    }
    for r in reports {
        let json = serde_json::to_string_pretty(&r.to_json()).unwrap_or_default();
        let _ = writeln!(
            out,
            "<details><summary>{} as JSON</summary><pre>{}</pre></details>",
            escape(&r.label),
            escape(&json)
        );
    }
    out += "</body></html>\n";
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The page holds the table, each figure as an SVG that decodes back to its text, and
    /// no unescaped markup from a label.
    #[test]
    fn the_page_holds_the_table_and_the_figures() {
        let report = Report {
            label: "c=<4>".into(),
            requests_ok: 7,
            ..Report::default()
        };
        let svg = "<svg><rect/></svg>".to_owned();
        let html = page(
            "run & done",
            &[report],
            &[Figure {
                caption: "latency".into(),
                svg: svg.clone(),
            }],
        );
        assert!(html.starts_with("<!DOCTYPE html>"));
        assert!(html.contains("<title>run &amp; done</title>"));
        assert!(html.contains("<td>c=&lt;4&gt;</td><td>7</td>"));
        assert!(!html.contains("<4>"));
        let data = html
            .split("data:image/svg+xml;base64,")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .unwrap();
        let back = base64::engine::general_purpose::STANDARD
            .decode(data)
            .unwrap();
        assert_eq!(back, svg.as_bytes());
        assert!(
            html.contains("&quot;completed&quot;: 7"),
            "the vLLM keys in the JSON"
        );
    }
}
