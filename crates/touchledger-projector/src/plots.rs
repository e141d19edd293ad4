//! The evaluation's plots as standalone SVG files (`touchledger evaluate --svg DIR`), for
//! reports: the same three charts as the dashboard's Models page — customers by calibration
//! repeat purchases (FHL 2005 Figure 2), the weekly cumulative repeat purchase-days over
//! calibration and holdout (Figure 3) and the mean holdout purchases by calibration frequency
//! (Figure 4), each actual against BG/NBD.
//!
//! Pure: a function of the evaluation, no I/O; the caller writes the files.

use std::fmt::Write as _;

use touchledger_domain::evaluation::Evaluation;

/// One series of a chart.
struct Series<'a> {
    name: &'a str,
    color: &'a str,
    values: Vec<f64>,
    bars: bool,
}

const ACTUAL: &str = "#1a73e8";
const MODEL: &str = "#e8710a";

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A chart of `series` over `labels`, bars side by side for bar series and polylines for the
/// others, a dashed marker at label index `mark`.
fn chart(
    title: &str,
    id: &str,
    series: &[Series],
    labels: &[String],
    mark: Option<usize>,
) -> String {
    const W: f64 = 720.0;
    const H: f64 = 300.0;
    const PAD: f64 = 44.0;
    let hi = series
        .iter()
        .flat_map(|s| s.values.iter().copied())
        .filter(|v| v.is_finite())
        .fold(1.0f64, f64::max)
        * 1.05;
    let n = labels.len().max(1) as f64;
    let step = (W - 2.0 * PAD) / n;
    let cx = |i: usize| PAD + step * (i as f64 + 0.5);
    let y = |v: f64| H - PAD - v * (H - 2.0 * PAD) / hi;
    let mut out = String::new();
    let _ = write!(
        out,
        r##"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" width="{W}" height="{H}" data-chart="{id}" font-family="sans-serif">
<title>{}</title>
<rect width="{W}" height="{H}" fill="#fff"/>
<text x="{PAD}" y="18" font-size="14" fill="#1d2330">{}</text>
<line x1="{PAD}" y1="{y0}" x2="{x1}" y2="{y0}" stroke="#98a2b3"/>
<text x="4" y="{yh}" font-size="11" fill="#667085">{hi:.0}</text>
<text x="4" y="{y04}" font-size="11" fill="#667085">0</text>
"##,
        escape(title),
        escape(title),
        y0 = y(0.0),
        x1 = W - PAD,
        yh = y(hi) + 10.0,
        y04 = y(0.0) + 4.0,
    );
    let bars: Vec<&Series> = series.iter().filter(|s| s.bars).collect();
    let bw = step * 0.8 / bars.len().max(1) as f64;
    for (k, s) in bars.iter().enumerate() {
        for (i, v) in s.values.iter().enumerate() {
            if !v.is_finite() {
                continue;
            }
            let x0 = cx(i) - step * 0.4 + k as f64 * bw;
            let _ = writeln!(
                out,
                r#"<rect class="bar" data-series="{}" x="{x0:.2}" y="{:.2}" width="{:.2}" height="{:.2}" fill="{}"><title>{}: {v:.1}</title></rect>"#,
                escape(s.name),
                y(*v),
                bw * 0.9,
                y(0.0) - y(*v),
                s.color,
                escape(&labels[i]),
            );
        }
    }
    for s in series.iter().filter(|s| !s.bars) {
        let points: Vec<String> = s
            .values
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_finite())
            .map(|(i, v)| format!("{:.2},{:.2}", cx(i), y(*v)))
            .collect();
        let _ = writeln!(
            out,
            r#"<polyline class="series" data-series="{}" fill="none" stroke="{}" stroke-width="2" points="{}"/>"#,
            escape(s.name),
            s.color,
            points.join(" ")
        );
    }
    if let Some(m) = mark {
        let _ = writeln!(
            out,
            r##"<line x1="{x:.2}" y1="{top}" x2="{x:.2}" y2="{y0:.2}" stroke="#98a2b3" stroke-dasharray="4 3"/>"##,
            x = cx(m),
            top = PAD / 2.0,
            y0 = y(0.0),
        );
    }
    let every = labels.len().div_ceil(12).max(1);
    for (i, l) in labels.iter().enumerate().step_by(every) {
        let _ = writeln!(
            out,
            r##"<text x="{:.2}" y="{}" font-size="11" text-anchor="middle" fill="#667085">{}</text>"##,
            cx(i),
            H - 14.0,
            escape(l)
        );
    }
    for (k, s) in series.iter().enumerate() {
        let _ = writeln!(
            out,
            r#"<text x="{}" y="36" font-size="12" fill="{}">■ {}</text>"#,
            W - PAD - 220.0 + k as f64 * 110.0,
            s.color,
            escape(s.name)
        );
    }
    out.push_str("</svg>\n");
    out
}

/// The three plots of `e`: (file name, SVG document).
pub fn evaluation_svgs(e: &Evaluation) -> Vec<(&'static str, String)> {
    let bins: Vec<String> = e
        .frequency
        .iter()
        .map(|b| b.repeat_purchases.clone())
        .collect();
    let frequency = chart(
        "Customers by calibration repeat purchases (FHL 2005, fig. 2)",
        "frequency",
        &[
            Series {
                name: "actual",
                color: ACTUAL,
                values: e.frequency.iter().map(|b| b.actual as f64).collect(),
                bars: true,
            },
            Series {
                name: "BG/NBD",
                color: MODEL,
                values: e.frequency.iter().map(|b| b.predicted).collect(),
                bars: true,
            },
        ],
        &bins,
        None,
    );
    let weeks: Vec<String> = (1..=e.tracking.len()).map(|w| format!("w{w}")).collect();
    let tracking = chart(
        "Cumulative repeat purchase-days, week by week (FHL 2005, fig. 3; dashed: calibration end)",
        "tracking",
        &[
            Series {
                name: "actual",
                color: ACTUAL,
                values: e.tracking.iter().map(|p| p.actual as f64).collect(),
                bars: false,
            },
            Series {
                name: "BG/NBD",
                color: MODEL,
                values: e.tracking.iter().map(|p| p.predicted).collect(),
                bars: false,
            },
        ],
        &weeks,
        e.tracking.iter().position(|p| p.holdout),
    );
    let conditional = chart(
        "Mean holdout purchase-days by calibration repeat purchases (FHL 2005, fig. 4)",
        "conditional",
        &[
            Series {
                name: "actual",
                color: ACTUAL,
                values: e.conditional.iter().map(|b| b.actual_mean).collect(),
                bars: false,
            },
            Series {
                name: "BG/NBD",
                color: MODEL,
                values: e.conditional.iter().map(|b| b.predicted_mean).collect(),
                bars: false,
            },
        ],
        &bins,
        None,
    );
    vec![
        ("frequency.svg", frequency),
        ("tracking.svg", tracking),
        ("conditional.svg", conditional),
    ]
}
