//! `/metricsz`, parsed, and checked by Prometheus' own promtool.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::process::binary_on_path;

fn promtool() -> PathBuf {
    binary_on_path(
        "promtool",
        ".ci/run installs it from Debian's prometheus package (or `apt-get install prometheus`)",
    )
}

/// Runs `promtool check <what>` with `input` on stdin (or a file in `args`); panics with its
/// output unless it passes without a single remark.
pub fn promtool_check(args: &[&str], input: &str) {
    use std::io::Write;
    let mut child = Command::new(promtool())
        .arg("check")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let remarks = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "promtool check {args:?} failed:\n{remarks}\n--- input ---\n{input}"
    );
    assert!(
        args[0] != "metrics" || remarks.trim().is_empty(),
        "promtool check metrics remarks:\n{remarks}"
    );
}

/// One scrape of `/metricsz`: its text, which promtool accepted, and its samples by series
/// as written (`name` or `name{label="value"}`).
pub struct Scrape {
    pub text: String,
    samples: std::collections::BTreeMap<String, f64>,
}

impl Scrape {
    /// Scrapes over a new HTTP/1.1 connection.
    pub async fn of(addr: SocketAddr) -> Self {
        let response = reqwest::get(format!("http://{addr}/metricsz"))
            .await
            .expect("/metricsz answers");
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers()["content-type"],
            "text/plain; version=0.0.4"
        );
        Self::parse(response.text().await.unwrap())
    }

    /// Checks `text` with `promtool check metrics` and reads its samples.
    pub fn parse(text: String) -> Self {
        promtool_check(&["metrics"], &text);
        let samples = text
            .lines()
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .map(|line| {
                let (series, value) = line
                    .rsplit_once(' ')
                    .unwrap_or_else(|| panic!("sample without a value: {line:?}"));
                let value = value
                    .parse()
                    .unwrap_or_else(|_| panic!("bad sample value: {line:?}"));
                (series.to_owned(), value)
            })
            .collect();
        Self { text, samples }
    }

    /// The value of `series`; panics if the scrape does not have it.
    pub fn value(&self, series: &str) -> f64 {
        *self
            .samples
            .get(series)
            .unwrap_or_else(|| panic!("{series} is not in the scrape:\n{}", self.text))
    }

    /// The metric names of every sample (histograms: `_bucket`, `_sum`, `_count`).
    pub fn names(&self) -> std::collections::BTreeSet<&str> {
        self.samples
            .keys()
            .map(|series| series.split('{').next().unwrap())
            .collect()
    }
}

/// Scrapes until `check` holds for a scrape (10 s at most) and returns that scrape.
pub async fn scrape_until(addr: SocketAddr, what: &str, check: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let scrape = Scrape::of(addr).await;
        if check(&scrape) {
            return scrape;
        }
        assert!(
            Instant::now() < deadline,
            "never saw {what} within 10 s; last scrape:\n{}",
            scrape.text
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
