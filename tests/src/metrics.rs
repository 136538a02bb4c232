//! The project's telemetry endpoints as a scraper and a health probe see them: `/metrics`
//! parsed strictly ([`Scrape`]), `/healthz` read and waited for.

use crate::poll::poll;
use crate::process::Process;
use std::collections::BTreeMap;
use std::time::Duration;

/// A `/metrics` answer, parsed: every sample's series (`name` or `name{labels}`, as written)
/// and its value. Parsing is strict (OpenMetrics text as Prometheus reads it: `# HELP`,
/// `# TYPE`, `# UNIT` comments, `series value` lines, `# EOF` last), so a malformed
/// exposition fails the test that scrapes it.
#[derive(Debug, Clone)]
pub struct Scrape {
    /// Series -> value.
    pub samples: BTreeMap<String, f64>,
    /// The raw text, for failure messages.
    pub text: String,
}

impl Scrape {
    /// Parses an exposition; the error names the first bad line.
    pub fn parse(text: &str) -> Result<Scrape, String> {
        let body = text
            .strip_suffix("# EOF\n")
            .ok_or("the exposition does not end with `# EOF`")?;
        let mut samples = BTreeMap::new();
        for line in body.lines() {
            if let Some(c) = line.strip_prefix("# ") {
                let kind = c.split(' ').next().unwrap_or_default();
                if !matches!(kind, "HELP" | "TYPE" | "UNIT") {
                    return Err(format!("unexpected comment line {line:?}"));
                }
                continue;
            }
            let (series, value) = line
                .rsplit_once(' ')
                .ok_or_else(|| format!("no value in line {line:?}"))?;
            let name = series.split('{').next().unwrap_or_default();
            let name_ok = !name.is_empty()
                && !name.starts_with(|c: char| c.is_ascii_digit())
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
            let labels_ok = series == name || (series.ends_with('}') && series.contains("=\""));
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v
                    .parse()
                    .map_err(|_| format!("bad value in line {line:?}"))?,
            };
            if !name_ok || !labels_ok {
                return Err(format!("bad series in line {line:?}"));
            }
            if samples.insert(series.to_string(), value).is_some() {
                return Err(format!("series repeated: {series}"));
            }
        }
        Ok(Scrape {
            samples,
            text: text.to_string(),
        })
    }

    /// The sum of every sample of metric `name` (all label sets); 0 when there is none.
    pub fn sum(&self, name: &str) -> f64 {
        self.samples
            .iter()
            .filter(|(s, _)| s.split('{').next() == Some(name))
            .map(|(_, v)| v)
            .sum()
    }

    /// Whether any sample of metric `name` exists.
    pub fn has(&self, name: &str) -> bool {
        self.samples
            .keys()
            .any(|s| s.split('{').next() == Some(name))
    }
}

/// GETs `http://<addr>/metrics` and parses it (panics when it does not answer or parse).
pub async fn scrape(addr: &str) -> Scrape {
    let r = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap_or_else(|e| panic!("GET {addr}/metrics: {e}"));
    assert_eq!(r.status(), 200, "GET {addr}/metrics");
    let ct = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(
        ct.starts_with("application/openmetrics-text"),
        "content type {ct:?}"
    );
    let text = r.text().await.unwrap();
    Scrape::parse(&text).unwrap_or_else(|e| panic!("{addr}/metrics: {e}:\n{text}"))
}

/// GETs `http://<addr>/healthz`: the status and body, or `None` when nothing answers.
pub async fn healthz(addr: &str) -> Option<(u16, String)> {
    let r = reqwest::get(format!("http://{addr}/healthz")).await.ok()?;
    let status = r.status().as_u16();
    Some((status, r.text().await.ok()?))
}

/// Waits until `/healthz` at `addr` answers `status`; returns the body. On timeout panics
/// with the last answer and `p`'s output.
pub async fn wait_health(p: &Process, addr: &str, status: u16, timeout: Duration) -> String {
    let last = std::sync::Mutex::new(None);
    let last_ref = &last;
    let got = poll(timeout, Duration::from_millis(100), || async move {
        let h = healthz(addr).await;
        *last_ref.lock().unwrap() = h.clone();
        h.filter(|(s, _)| *s == status).map(|(_, b)| b)
    })
    .await;
    match got {
        Some(b) => b,
        None => panic!(
            "timed out after {timeout:?} waiting for /healthz {status} at {addr}; last answer {:?}; output:\n{}",
            last.lock().unwrap(),
            p.output()
        ),
    }
}
