//! The benchmark report every `cargo xtask bench` prints: a readable table,
//! then one last line `BENCH {json}` in the format PRODUCT.md defines.

use serde::Serialize;

/// One measured figure, ours beside the peer's when a peer ran.
#[derive(Debug, Clone, Serialize)]
pub struct Metric {
    pub name: String,
    pub unit: String,
    pub ours: f64,
    pub peer: Option<String>,
    pub peer_value: Option<f64>,
    /// `ours / peer_value`.
    pub ratio: Option<f64>,
}

impl Metric {
    /// A figure with no peer to compare against.
    pub fn alone(name: &str, unit: &str, ours: f64) -> Self {
        Self {
            name: name.into(),
            unit: unit.into(),
            ours,
            peer: None,
            peer_value: None,
            ratio: None,
        }
    }

    /// A figure beside the peer's; the ratio is ours over theirs.
    pub fn versus(name: &str, unit: &str, ours: f64, peer: &str, peer_value: f64) -> Self {
        let ratio = (peer_value != 0.0).then(|| ours / peer_value);
        Self {
            name: name.into(),
            unit: unit.into(),
            ours,
            peer: Some(peer.into()),
            peer_value: Some(peer_value),
            ratio,
        }
    }
}

/// A whole benchmark's result.
#[derive(Debug, Serialize)]
pub struct Report {
    pub bench: String,
    pub metrics: Vec<Metric>,
}

impl Report {
    pub fn new(bench: &str) -> Self {
        Self {
            bench: bench.into(),
            metrics: Vec::new(),
        }
    }

    pub fn push(&mut self, metric: Metric) {
        self.metrics.push(metric);
    }

    /// The readable table.
    pub fn table(&self) -> String {
        let mut out = format!(
            "{:<28} {:>12} {:>6}  {:<10} {:>12} {:>8}\n",
            "metric", "ours", "unit", "peer", "peer value", "ratio"
        );
        for m in &self.metrics {
            out.push_str(&format!(
                "{:<28} {:>12.3} {:>6}  {:<10} {:>12} {:>8}\n",
                m.name,
                m.ours,
                m.unit,
                m.peer.as_deref().unwrap_or("-"),
                m.peer_value.map_or("-".into(), |v| format!("{v:.3}")),
                m.ratio.map_or("-".into(), |r| format!("{r:.3}x")),
            ));
        }
        out
    }

    /// The last line: `BENCH {json}`.
    pub fn bench_line(&self) -> String {
        let json = serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
        format!("BENCH {json}")
    }

    /// Prints the table, then the BENCH line.
    pub fn print(&self) {
        print!("{}", self.table());
        println!("{}", self.bench_line());
    }
}

/// Summary statistics over samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    pub min: f64,
    pub median: f64,
    pub p99: f64,
    pub max: f64,
}

impl Stats {
    /// `None` for no samples.
    pub fn of(samples: &[f64]) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        // Nearest rank: the sample at ceil(q * n), counting from 1.
        let at = |q_percent: usize| {
            let rank = (q_percent * sorted.len()).div_ceil(100).max(1);
            sorted[rank.min(sorted.len()) - 1]
        };
        Some(Self {
            min: sorted[0],
            median: at(50),
            p99: at(99),
            max: sorted[sorted.len() - 1],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bench_line_has_the_product_format() {
        let mut report = Report::new("boot");
        report.push(Metric::versus("boot_ms_median", "ms", 10.0, "qemu", 50.0));
        report.push(Metric::alone("overhead_mib", "MiB", 3.5));
        let line = report.bench_line();
        let json: serde_json::Value =
            serde_json::from_str(line.strip_prefix("BENCH ").unwrap()).unwrap();
        assert_eq!(json["bench"], "boot");
        assert_eq!(json["metrics"][0]["name"], "boot_ms_median");
        assert_eq!(json["metrics"][0]["peer"], "qemu");
        assert!((json["metrics"][0]["ratio"].as_f64().unwrap() - 0.2).abs() < 1e-9);
        assert!(json["metrics"][1]["peer"].is_null());
        assert!(json["metrics"][1]["ratio"].is_null());
        assert!(report.table().contains("0.200x"));
    }

    #[test]
    fn stats_pick_order_statistics() {
        let s = Stats::of(&[5.0, 1.0, 3.0, 2.0, 4.0]).unwrap();
        assert_eq!((s.min, s.median, s.max), (1.0, 3.0, 5.0));
        assert_eq!(Stats::of(&[]), None);
    }
}
