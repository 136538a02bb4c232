//! What every suite shares: clocks, percentiles, peak RSS, binary lookup, table formatting.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Wall clock in ns since the epoch: the unit `date +%s%N` and `docker events` speak, so
/// timestamps taken by other processes compare with ours.
pub fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
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
/// build says little (the harness's `bin` prefers debug, which suits tests).
pub fn release_bin(name: &str) -> PathBuf {
    let p = switchboard_tests::target_dir().join("release").join(name);
    if p.exists() {
        return p;
    }
    eprintln!("warning: no release build of {name}; measuring the debug build");
    switchboard_tests::bin(name)
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
}
