//! What a scenario prints and writes: one table, one CSV, and the verdict
//! on each target (met, or missed by how much).

use std::{fmt::Write as _, fs, path::PathBuf, time::Duration};

/// One scenario's results.
#[derive(Debug)]
pub(crate) struct Report {
    pub(crate) scenario: String,
    header: Vec<String>,
    rows: Vec<Vec<String>>,
    csv: Vec<Vec<String>>,
    csv_header: Vec<String>,
    pub(crate) checks: Vec<Check>,
    pub(crate) notes: Vec<String>,
}

/// A target and whether it was met.
#[derive(Debug, Clone)]
pub(crate) struct Check {
    pub(crate) what: String,
    pub(crate) got: f64,
    pub(crate) bound: f64,
    /// Met when `got <= bound` (else when `got >= bound`).
    pub(crate) at_most: bool,
}

impl Check {
    pub(crate) fn met(&self) -> bool {
        if self.at_most {
            self.got <= self.bound
        } else {
            self.got >= self.bound
        }
    }

    pub(crate) fn line(&self) -> String {
        let op = if self.at_most { "≤" } else { "≥" };
        if self.met() {
            format!(
                "met     {}: {:.2} (target {op} {:.2})",
                self.what, self.got, self.bound
            )
        } else {
            let by = if self.bound != 0.0 {
                (self.got / self.bound - 1.0).abs() * 100.0
            } else {
                f64::INFINITY
            };
            format!(
                "MISSED  {}: {:.2} (target {op} {:.2}, off by {by:.0} %)",
                self.what, self.got, self.bound
            )
        }
    }
}

impl Report {
    pub(crate) fn new(scenario: &str, header: &[&str], csv_header: &[&str]) -> Self {
        Self {
            scenario: scenario.into(),
            header: header.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
            csv: Vec::new(),
            csv_header: csv_header.iter().map(|s| s.to_string()).collect(),
            checks: Vec::new(),
            notes: Vec::new(),
        }
    }

    pub(crate) fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub(crate) fn csv(&mut self, cells: Vec<String>) {
        self.csv.push(cells);
    }

    /// A target: `got` must be at most `bound`.
    pub(crate) fn at_most(&mut self, what: impl Into<String>, got: f64, bound: f64) {
        self.checks.push(Check {
            what: what.into(),
            got,
            bound,
            at_most: true,
        });
    }

    pub(crate) fn at_least(&mut self, what: impl Into<String>, got: f64, bound: f64) {
        self.checks.push(Check {
            what: what.into(),
            got,
            bound,
            at_most: false,
        });
    }

    pub(crate) fn note(&mut self, s: impl Into<String>) {
        self.notes.push(s.into());
    }

    /// The table as Markdown (aligned).
    pub(crate) fn table(&self) -> String {
        let cols = self.header.len();
        let mut width = vec![0usize; cols];
        for r in std::iter::once(&self.header).chain(&self.rows) {
            for (i, c) in r.iter().enumerate().take(cols) {
                width[i] = width[i].max(c.chars().count());
            }
        }
        let line = |r: &[String]| {
            let mut s = String::from("|");
            for (i, w) in width.iter().enumerate() {
                let c = r.get(i).map_or("", String::as_str);
                let _ = write!(s, " {c:<w$} |");
            }
            s
        };
        let mut out = String::new();
        let _ = writeln!(out, "{}", line(&self.header));
        let dashes: Vec<String> = width.iter().map(|w| "-".repeat(*w)).collect();
        let _ = writeln!(out, "{}", line(&dashes));
        for r in &self.rows {
            let _ = writeln!(out, "{}", line(r));
        }
        out
    }

    /// Prints the table and the verdicts, writes the CSV into `dir`;
    /// returns the CSV's path.
    pub(crate) fn finish(&self, dir: &std::path::Path) -> PathBuf {
        let _ = fs::create_dir_all(dir);
        let path = dir.join(format!("{}.csv", self.scenario));
        let mut csv = self.csv_header.join(",");
        csv.push('\n');
        for r in &self.csv {
            csv.push_str(&r.join(","));
            csv.push('\n');
        }
        if let Err(e) = fs::write(&path, csv) {
            eprintln!("lab: could not write {}: {e}", path.display());
        }
        println!("\n## {}\n\n{}", self.scenario, self.table());
        for c in &self.checks {
            println!("{}", c.line());
        }
        for n in &self.notes {
            println!("note: {n}");
        }
        println!("csv: {}", path.display());
        path
    }

    pub(crate) fn missed(&self) -> Vec<&Check> {
        self.checks.iter().filter(|c| !c.met()).collect()
    }
}

/// Seconds with two decimals.
pub(crate) fn secs(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64())
}

/// MiB with one decimal.
pub(crate) fn mib(b: u64) -> String {
    format!("{:.1}", b as f64 / (1u64 << 20) as f64)
}

pub(crate) fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => 0.0,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

pub(crate) fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(0.0, f64::max)
}
