//! The SVG picture of one QP: a histogram per stage, one bar per non-empty log2 bucket,
//! hand-written (no dependencies). Only bars are `<rect>`s; frames and axes are lines.

use std::fmt::Write as _;

use crate::pvrdma::profile::{BUCKETS, Histogram, QpStats, Stage};

const WIDTH: u32 = 760;
const LEFT: u32 = 70;
const RIGHT: u32 = 740;
const TITLE: u32 = 48;
const PANEL: u32 = 170;
const PLOT: u32 = 110;

/// Buckets shown at least (a narrow range would make very wide bars).
const MIN_SHOWN: usize = 10;

/// The histograms of QP `qp` of device `device` as one SVG document.
pub fn render(device: usize, qp: u32, stats: &QpStats) -> String {
    let (lo, hi) = shown_range(stats);
    let height = TITLE + PANEL * Stage::ALL.len() as u32 + 10;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(
        out,
        r#"<text x="{}" y="20" font-size="15" text-anchor="middle">{}</text>"#,
        WIDTH / 2,
        escape(&format!(
            "vfio-user-pvrdma profiler: device {device}, QP {qp} — stage latencies"
        ))
    );
    let _ = writeln!(
        out,
        r##"<text x="{}" y="37" text-anchor="middle" fill="#555">{}</text>"##,
        WIDTH / 2,
        escape(&format!(
            "{} doorbells, {} WQEs completed, {} errors, {} B sent, {} B received, {} RNR stalls",
            stats.doorbells,
            stats.wqes_completed,
            stats.completion_errors,
            stats.bytes_sent,
            stats.bytes_received,
            stats.rnr_stalls
        ))
    );
    for (i, stage) in Stage::ALL.into_iter().enumerate() {
        let top = TITLE + PANEL * i as u32;
        panel(&mut out, top, stage, stats.stage(stage), lo, hi);
    }
    out.push_str("</svg>\n");
    out
}

/// The buckets every panel shows: the non-empty ones of any stage, widened to
/// [`MIN_SHOWN`].
fn shown_range(stats: &QpStats) -> (usize, usize) {
    let used = |i: usize| stats.stages.iter().any(|h| h.buckets[i] > 0);
    let lo = (0..BUCKETS).find(|&i| used(i));
    let hi = (0..BUCKETS).rev().find(|&i| used(i));
    let (mut lo, mut hi) = match (lo, hi) {
        (Some(lo), Some(hi)) => (lo, hi),
        _ => (6, 6),
    };
    while hi - lo + 1 < MIN_SHOWN {
        if hi + 1 < BUCKETS {
            hi += 1;
        }
        if hi - lo + 1 < MIN_SHOWN && lo > 0 {
            lo -= 1;
        }
    }
    (lo, hi)
}

fn panel(out: &mut String, top: u32, stage: Stage, h: &Histogram, lo: usize, hi: usize) {
    let plot_top = top + 26;
    let base = plot_top + PLOT;
    let summary = if h.count == 0 {
        "no samples".to_string()
    } else {
        format!(
            "{} samples, mean {} µs, p50 ≤ {} µs, p99 ≤ {} µs, max {} µs",
            h.count,
            us(h.mean_ns().round() as u64),
            us(h.quantile_ns(0.5)),
            us(h.quantile_ns(0.99)),
            us(h.max_ns)
        )
    };
    let _ = writeln!(
        out,
        r##"<text x="{LEFT}" y="{}" font-weight="bold">{}</text><text x="{RIGHT}" y="{}" text-anchor="end" fill="#555">{}</text>"##,
        top + 18,
        escape(&format!("{} ({})", stage.name(), stage.span())),
        top + 18,
        escape(&summary)
    );
    // Axes.
    let _ = writeln!(
        out,
        r##"<path d="M{LEFT} {plot_top} V{base} H{RIGHT}" fill="none" stroke="#333"/>"##
    );
    let max = h.buckets[lo..=hi].iter().copied().max().unwrap_or(0);
    let _ = writeln!(
        out,
        r#"<text x="{}" y="{}" text-anchor="end">{max}</text><text x="{}" y="{base}" text-anchor="end">0</text>"#,
        LEFT - 6,
        plot_top + 8,
        LEFT - 6
    );
    let _ = writeln!(
        out,
        r#"<text x="16" y="{}" transform="rotate(-90 16 {})" text-anchor="middle">WQEs</text>"#,
        plot_top + PLOT / 2,
        plot_top + PLOT / 2
    );
    let n = (hi - lo + 1) as u32;
    let step = f64::from(RIGHT - LEFT) / f64::from(n);
    let every = n.div_ceil(12).max(1) as usize;
    for (k, i) in (lo..=hi).enumerate() {
        let x = f64::from(LEFT) + step * k as f64;
        let count = h.buckets[i];
        if count > 0 {
            let bar = (count as f64 / max as f64 * f64::from(PLOT)).max(1.0);
            let _ = writeln!(
                out,
                r##"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="#4878a8"><title>{}</title></rect>"##,
                x + 1.0,
                f64::from(base) - bar,
                (step - 2.0).max(1.0),
                bar,
                escape(&bucket_label(i, count))
            );
        }
        if k % every == 0 {
            label(out, x, base, Histogram::bucket_range(i).0);
        }
    }
    if let Some(high) = Histogram::bucket_range(hi).1 {
        label(out, f64::from(RIGHT), base, high);
    }
    let _ = writeln!(
        out,
        r##"<text x="{}" y="{}" text-anchor="middle" fill="#555">latency (µs, log2 buckets)</text>"##,
        (LEFT + RIGHT) / 2,
        base + 30
    );
}

fn label(out: &mut String, x: f64, base: u32, ns: u64) {
    let _ = writeln!(
        out,
        r##"<path d="M{x:.1} {base} v4" stroke="#333"/><text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"##,
        base + 15,
        us(ns)
    );
}

fn bucket_label(i: usize, count: u64) -> String {
    match Histogram::bucket_range(i) {
        (low, Some(high)) => format!("{}–{} µs: {count}", us(low), us(high)),
        (low, None) => format!("≥ {} µs: {count}", us(low)),
    }
}

/// Nanoseconds as µs with about three significant digits.
fn us(ns: u64) -> String {
    let v = ns as f64 / 1e3;
    if ns == 0 {
        "0".into()
    } else if v < 0.01 {
        format!("{v:.4}")
    } else if v < 1.0 {
        format!("{v:.3}")
    } else if v < 10.0 {
        format!("{v:.2}")
    } else if v < 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.0}")
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_rect_per_non_empty_bucket_and_well_formed() {
        let mut s = QpStats::default();
        for ns in [100, 120, 1_000, 1_500, 70_000] {
            s.stages[Stage::Place as usize].record(ns);
        }
        s.stages[Stage::Pickup as usize].record(0);
        s.stages[Stage::Interrupt as usize].record(3 << 40);
        let svg = render(1, 7, &s);
        assert!(svg.starts_with("<svg "), "{svg}");
        assert!(svg.trim_end().ends_with("</svg>"));
        let non_empty: usize = s
            .stages
            .iter()
            .map(|h| h.buckets.iter().filter(|&&n| n > 0).count())
            .sum();
        assert_eq!(non_empty, 6);
        assert_eq!(svg.matches("<rect").count(), non_empty);
        assert_eq!(svg.matches("<rect").count(), svg.matches("</rect>").count());
        assert_eq!(svg.matches("<text").count(), svg.matches("</text>").count());
        assert!(svg.contains("no samples"), "the cqe stage is empty");
        assert!(svg.contains("device 1, QP 7"));
        assert!(!svg.contains("<<") && !svg.contains("& "));
    }

    #[test]
    fn an_empty_qp_draws_axes_and_no_bars() {
        let svg = render(0, 2, &QpStats::default());
        assert!(svg.starts_with("<svg "));
        assert_eq!(svg.matches("<rect").count(), 0);
        assert_eq!(svg.matches("no samples").count(), 4);
    }

    #[test]
    fn microsecond_labels() {
        assert_eq!(us(0), "0");
        assert_eq!(us(64), "0.064");
        assert_eq!(us(1024), "1.02");
        assert_eq!(us(65_536), "65.5");
        assert_eq!(us(1 << 20), "1049");
    }
}
