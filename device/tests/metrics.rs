//! The `--metrics` endpoint scraped as a monitoring system would: a real HTTP client, the
//! body checked line by line against Prometheus' text format and read with a parser of
//! it, and its figures equal to what the control socket's `stats json` says of the same
//! QPs.

mod driver;
#[allow(dead_code)] // Shared with the TCP suites.
mod two_servers;

use std::collections::HashSet;

use driver::socket_bus::SocketServer;
use driver::verbs::PINGPONG_SIZES;
use prometheus_parse::{Scrape, Value};
use two_servers::{LOG, connect, rc_verbs_cross, side_on};
use vfio_user_pvrdma::profiler::control::request;

/// Whether `name` is a metric or label name of the format.
fn is_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// `k="v",…` with the format's escapes; the pairs.
fn labels(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut pairs = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let (name, after) = rest
            .split_once("=\"")
            .ok_or(format!("no =\" in {rest:?}"))?;
        if !is_name(name) {
            return Err(format!("bad label name {name:?}"));
        }
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => return Err(format!("bad escape {other:?}")),
                },
                Some((_, '\n')) => return Err("a raw line feed".into()),
                Some((_, c)) => value.push(c),
                None => return Err(format!("unterminated value in {text:?}")),
            }
        };
        pairs.push((name.to_string(), value));
        rest = &after[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
    Ok(pairs)
}

/// Checks `body` against the text format (version 0.0.4): every line a comment, HELP,
/// TYPE or sample; each sample of a family whose TYPE came before it; TYPE once per
/// family; values that parse; histogram buckets cumulative, ending in +Inf = _count.
fn check_format(body: &str) {
    let mut typed: Vec<(String, String)> = Vec::new();
    let mut last_bucket: Option<(String, f64)> = None;
    for line in body.lines() {
        if let Some(comment) = line.strip_prefix("# ") {
            let mut words = comment.splitn(3, ' ');
            match (words.next(), words.next(), words.next()) {
                (Some("HELP"), Some(name), Some(_)) => assert!(is_name(name), "{line}"),
                (Some("TYPE"), Some(name), Some(kind)) => {
                    assert!(is_name(name), "{line}");
                    assert!(
                        ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                        "{line}"
                    );
                    assert!(
                        typed.iter().all(|(n, _)| n != name),
                        "TYPE twice for {name}"
                    );
                    typed.push((name.to_string(), kind.to_string()));
                }
                _ => panic!("a comment line that is neither HELP nor TYPE: {line:?}"),
            }
            continue;
        }
        assert!(!line.is_empty(), "an empty line");
        let (series, value) = line.rsplit_once(' ').expect("a sample: series value");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|e| panic!("{line:?}: value: {e}")),
        };
        let (name, label_text) = match series.split_once('{') {
            Some((name, rest)) => (name, rest.strip_suffix('}').expect("labels close")),
            None => (series, ""),
        };
        assert!(is_name(name), "{line:?}");
        let pairs = labels(label_text).unwrap_or_else(|e| panic!("{line:?}: {e}"));
        let (family, kind) = typed
            .iter()
            .rev()
            .find(|(family, kind)| {
                name == family
                    || (kind == "histogram"
                        && ["_bucket", "_sum", "_count"]
                            .iter()
                            .any(|suffix| name.strip_suffix(suffix) == Some(family)))
            })
            .unwrap_or_else(|| panic!("{line:?} before its TYPE"));
        if kind == "counter" {
            assert!(value >= 0.0, "{line:?}");
        }
        if kind == "histogram" && name.ends_with("_bucket") {
            let le = &pairs.iter().find(|(k, _)| k == "le").expect("le").1;
            let series: String = format!(
                "{family}{:?}",
                pairs.iter().filter(|(k, _)| k != "le").collect::<Vec<_>>()
            );
            if let Some((previous, count)) = &last_bucket
                && *previous == series
            {
                assert!(value >= *count, "buckets not cumulative at {line:?}");
            }
            last_bucket = (le != "+Inf").then_some((series, value));
        }
    }
}

fn scrape(url: &str) -> String {
    let mut response = ureq::get(url).call().expect("GET /metrics");
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    response.body_mut().read_to_string().expect("the body")
}

#[test]
fn the_metrics_endpoint_serves_the_profilers_figures_in_prometheus_format() {
    let server = SocketServer::start_with(
        2,
        LOG,
        &[
            "--metrics",
            "127.0.0.1:0",
            "--profile",
            "on",
            "--profile-every",
            "1",
        ],
    );
    let line = server.wait_for_server_line("metrics at http://");
    let url = line
        .rsplit("metrics at ")
        .next()
        .expect("the URL")
        .trim()
        .to_string();
    let mut a = side_on(&server, 0, [10, 1, 0, 1], PINGPONG_SIZES);
    let mut b = side_on(&server, 1, [10, 1, 0, 2], PINGPONG_SIZES);
    connect(&mut a, b.qp.qpn, b.gid);
    connect(&mut b, a.qp.qpn, a.gid);
    rc_verbs_cross(&mut a, &mut b);

    let body = scrape(&url);
    check_format(&body);
    let parsed =
        Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("prometheus-parse reads it");
    let socket_a = server.socket(0).display().to_string();
    let find = |metric: &str, qp: u32| {
        parsed
            .samples
            .iter()
            .find(|s| {
                s.metric == metric
                    && s.labels.get("socket") == Some(socket_a.as_str())
                    && s.labels.get("qp") == Some(qp.to_string().as_str())
            })
            .unwrap_or_else(|| panic!("no {metric} for QP {qp} of {socket_a}:\n{body}"))
            .value
            .clone()
    };

    // The same counters as the control socket's JSON (no traffic since).
    let json = request(
        server.control(),
        "stats json",
        std::time::Duration::from_secs(10),
    )
    .expect("stats json");
    let stats: serde_json::Value = serde_json::from_str(&json).expect("JSON");
    let qp_json = stats["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .flat_map(|d| d["qps"].as_array().cloned().unwrap_or_default())
        .find(|q| q["qp"] == a.qp.qpn)
        .expect("A's QP in the JSON");
    for (metric, key) in [
        ("pvrdma_qp_doorbells_total", "doorbells"),
        ("pvrdma_qp_wqes_posted_total", "wqes_posted"),
        ("pvrdma_qp_wqes_completed_total", "wqes_completed"),
        ("pvrdma_qp_sent_bytes_total", "bytes_sent"),
        ("pvrdma_qp_received_bytes_total", "bytes_received"),
    ] {
        let expected = qp_json[key].as_u64().expect(key) as f64;
        assert!(expected > 0.0, "{key} counted something");
        assert_eq!(find(metric, a.qp.qpn), Value::Counter(expected), "{metric}");
    }
    // Stage timing was on for every request: A's pickup histogram counts every send.
    let Value::Histogram(buckets) = find("pvrdma_qp_stage_seconds", a.qp.qpn) else {
        panic!("a histogram");
    };
    let total = buckets.last().expect("buckets");
    assert!(total.less_than.is_infinite());
    assert_eq!(
        total.count,
        qp_json["stages"]["pickup"]["count"]
            .as_u64()
            .expect("count") as f64
    );
    // Both devices are labelled by socket, attached, with their GUIDs.
    let attached: HashSet<String> = parsed
        .samples
        .iter()
        .filter(|s| s.metric == "pvrdma_device_client_attached" && s.value == Value::Gauge(1.0))
        .filter_map(|s| s.labels.get("socket").map(str::to_string))
        .collect();
    let expected: HashSet<String> = (0..2)
        .map(|i| server.socket(i).display().to_string())
        .collect();
    assert_eq!(attached, expected);
    assert!(
        body.contains(&format!(
            "pvrdma_qp_info{{socket=\"{socket_a}\",qp=\"{}\",path=\"memcpy\"}} 1",
            a.qp.qpn
        )),
        "{body}"
    );

    // Anything but GET /metrics is answered, not served.
    let missing = ureq::get(&url.replace("/metrics", "/nothing")).call();
    assert!(
        matches!(missing, Err(ureq::Error::StatusCode(404))),
        "{missing:?}"
    );
    drop((a, b));
}
