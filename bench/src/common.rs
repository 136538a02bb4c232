//! What every suite shares: clocks, percentiles, peak RSS, binary lookup, table formatting,
//! the docker CLI and its event stream.

use crate::Which;
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use switchboard::store::Store;
use switchboard::RegistryUri;
use switchboard_tests::{Consul, Etcd};
use tokio::io::{AsyncBufReadExt, BufReader};

/// Wall clock in ns since the epoch: the unit `date +%s%N` and `docker events` speak, so
/// timestamps taken by other processes compare with ours.
pub fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// The timestamp that starts a log line of our daemons (tracing's default format: RFC 3339 in
/// UTC, `2026-11-26T15:21:28.973996Z`), in ns since the epoch: the clock [`now_ns`] and
/// `docker events` read, so a daemon's log line and a Docker event compare directly.
pub fn log_ts_ns(line: &str) -> Option<u128> {
    let ts = line.split_whitespace().next()?.strip_suffix('Z')?;
    let (date, time) = ts.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|v| v.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.splitn(3, ':').map(|v| v.parse::<i64>().ok());
    let (h, min, sec) = (t.next()??, t.next()??, t.next()??);
    if !(1..=12).contains(&m) || frac.is_empty() || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // Days from 1970-01-01 to the date (the proleptic Gregorian calendar, years from March
    // so that the leap day is the last of its year).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + day - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    let secs = days * 86_400 + h * 3_600 + min * 60 + sec;
    let digits = &frac[..frac.len().min(9)];
    let ns = digits.parse::<u128>().ok()? * 10u128.pow(9 - digits.len() as u32);
    Some(u128::try_from(secs).ok()? * 1_000_000_000 + ns)
}

/// `VmHWM` (peak resident set) of a process, in KiB; 0 when it cannot be read.
pub fn peak_rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// `VmRSS` (resident set now) of a process, in KiB; 0 when it cannot be read.
pub fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// CPU time the calling thread has used so far: unlike wall time, it does not grow when other
/// processes share the machine's cores.
pub fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// CPU time (user + system) a process has used so far, from `/proc/<pid>/stat`.
pub fn cpu_time(pid: u32) -> Duration {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces, hence the last `)`):
    // state is field 3, utime and stime are fields 14 and 15.
    let rest = s.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Duration::from_secs_f64(f.iter().sum::<u64>() as f64 / ticks)
}

/// CPU time (user + system) of every live process in process group `pgid` (a proxy's master
/// and workers), from `/proc/<pid>/stat`. A worker that exited since takes its time with it.
pub fn group_cpu_time(pgid: u32) -> Duration {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Duration::ZERO;
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // After the command name: state (field 3), ppid (4), pgrp (5).
            let rest = s.rsplit_once(')').map_or("", |(_, r)| r);
            rest.split_whitespace().nth(2).and_then(|v| v.parse().ok()) == Some(pgid)
        })
        .map(cpu_time)
        .sum()
}

/// Nearest-rank percentile of an ascending slice (`p` in 0..=1).
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

/// Median, p99 and max of a set of samples.
#[derive(Debug, Clone, Copy, Default)]
pub struct Summary {
    /// Number of samples.
    pub n: usize,
    /// 50th percentile.
    pub median: Duration,
    /// 90th percentile.
    pub p90: Duration,
    /// 99th percentile (with few samples, close to the max).
    pub p99: Duration,
    /// Largest sample.
    pub max: Duration,
}

impl Summary {
    /// Summarises `samples` (any order).
    pub fn of(mut samples: Vec<Duration>) -> Summary {
        samples.sort();
        Summary {
            n: samples.len(),
            median: percentile(&samples, 0.5),
            p90: percentile(&samples, 0.9),
            p99: percentile(&samples, 0.99),
            max: samples.last().copied().unwrap_or_default(),
        }
    }
}

/// Milliseconds with one decimal.
pub fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

/// Milliseconds with three decimals, for sub-millisecond renders.
pub fn ms3(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

/// KiB as MiB with one decimal.
pub fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

/// One of the project's binaries, the release build when there is one: a benchmark of a debug
/// build says little (the harness's `bin` prefers debug, which suits tests). registrator ships
/// built with the `lean` profile (see Cargo.toml), so that build comes first for it.
pub fn release_bin(name: &str) -> PathBuf {
    let target = switchboard_tests::target_dir();
    let lean = (name == "registrator").then(|| target.join("lean").join(name));
    let release = target.join("release").join(name);
    if let Some(p) = lean.into_iter().chain([release]).find(|p| p.exists()) {
        return p;
    }
    eprintln!("warning: no release build of {name}; measuring the debug build");
    switchboard_tests::bin(name)
}

/// A store started for one run (a Consul dev agent or an etcd member, stopped on drop), and a
/// client writing to it: the one registrator uses.
pub struct Backend {
    /// The store's URI, as registrator and confd take it.
    pub uri: String,
    /// A client of the store.
    pub store: Store,
    _consul: Option<Consul>,
    _etcd: Option<Etcd>,
}

impl Backend {
    /// Starts a fresh store of this kind and waits until it answers.
    pub async fn start(which: Which) -> Backend {
        let (uri, consul, etcd) = match which {
            Which::Consul => {
                let c = Consul::start().await;
                (c.uri(), Some(c), None)
            }
            Which::Etcd => {
                let e = Etcd::start().await;
                (e.uri("bench"), None, Some(e))
            }
        };
        let store = Store::new(&RegistryUri::parse(&uri).expect("store URI"));
        Backend {
            uri,
            store,
            _consul: consul,
            _etcd: etcd,
        }
    }
}

/// Runs the docker CLI without blocking the runtime; panics with its stderr on failure.
/// Returns trimmed stdout.
pub async fn docker_async(args: &[&str]) -> String {
    let out = tokio::process::Command::new("docker")
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .expect("docker CLI");
    assert!(
        out.status.success(),
        "docker {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// One kind of Docker container event (`start`, `kill`, ...) for the containers labelled
/// `switchboard.bench=<run>`: container name -> time (ns since the epoch) of its FIRST such
/// event, as the engine stamped it. A `docker events` child, killed on drop, fills it.
pub struct DockerEvents {
    seen: Arc<Mutex<HashMap<String, u128>>>,
    _child: tokio::process::Child,
}

impl DockerEvents {
    /// Subscribes to `event` for the run's containers.
    pub fn watch(run: &str, event: &str) -> DockerEvents {
        let seen = Arc::new(Mutex::new(HashMap::new()));
        let mut child = tokio::process::Command::new("docker")
            .args([
                "events",
                // Replays from a second ago: an event that comes before the subscription is
                // in place is still reported.
                "--since",
                &(now_ns() / 1_000_000_000 - 1).to_string(),
                "--filter",
                "type=container",
                "--filter",
                &format!("event={event}"),
                "--filter",
                &format!("label=switchboard.bench={run}"),
                "--format",
                "{{.Actor.Attributes.name}} {{.TimeNano}}",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("docker events");
        let out = child.stdout.take().unwrap();
        let s2 = seen.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(out).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let Some((name, ns)) = line.split_once(' ') else {
                    continue;
                };
                if let Ok(ns) = ns.parse::<u128>() {
                    s2.lock().unwrap().entry(name.to_string()).or_insert(ns);
                }
            }
        });
        DockerEvents {
            seen,
            _child: child,
        }
    }

    /// The time of `name`'s event, if it came.
    pub fn get(&self, name: &str) -> Option<u128> {
        self.seen.lock().unwrap().get(name).copied()
    }

    /// The time of `name`'s event, waiting up to `timeout` for it.
    pub async fn wait(&self, name: &str, timeout: Duration) -> Option<u128> {
        switchboard_tests::poll(timeout, Duration::from_millis(10), || async {
            self.get(name)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_of_samples() {
        let ms = Duration::from_millis;
        let cases: [(Vec<u64>, u64, u64, u64); 3] = [
            (vec![], 0, 0, 0),
            (vec![5], 5, 5, 5),
            ((1..=100).rev().collect(), 51, 99, 100),
        ];
        for (input, median, p99, max) in cases {
            let s = Summary::of(input.iter().map(|&v| ms(v)).collect());
            assert_eq!(s.n, input.len());
            assert_eq!((s.median, s.p99, s.max), (ms(median), ms(p99), ms(max)));
        }
    }

    #[test]
    fn log_timestamps() {
        let s = 1_000_000_000u128;
        let cases = [
            ("1970-01-01T00:00:00.000000Z  INFO x: y", Some(0)),
            ("2000-03-01T00:00:00.5Z", Some(951_868_800 * s + s / 2)),
            (
                "2024-02-29T23:59:59.000001Z",
                Some(1_709_251_199 * s + 1_000),
            ),
            (
                "2026-11-26T15:21:28.973996Z  INFO confd::runner: reloaded",
                Some(1_795_706_488 * s + 973_996_000),
            ),
            ("2026-11-26T15:21:28Z", Some(1_795_706_488 * s)),
            ("2026-11-26T15:21:28.973996", None),
            ("2026-13-26T15:21:28.9Z", None),
            ("  INFO confd: no timestamp", None),
            ("", None),
        ];
        for (line, want) in cases {
            assert_eq!(log_ts_ns(line), want, "{line:?}");
        }
    }
}
