//! A load balancer as the reference stacks run it: the real `confd` rendering a shipped
//! template (`templates/haproxy.cfg.hbs` or `nginx.conf.hbs`) with its check and reload
//! commands and, when `live` is set, its live channel (HAProxy's admin socket, nginx's Lua
//! peers endpoint on a unix socket); and the real proxy serving the result on 127.0.0.1.
//!
//! It starts as the reference images' entrypoints do: `confd --once` (no commands) until the
//! file holds what the caller waits for, then the proxy on that file, then the confd daemon.
//! So the daemon finds the proxy running on the current file: no reload is owed at the start,
//! and every reload or live update counted afterwards answers a change made by the bench.
//!
//! What confd did is read from its log alone, as an operator would: every `reloaded` and
//! `applied live` line carries the running totals `reloads=N live_updates=M` and a timestamp
//! on the wall clock `docker events` uses.

use crate::common::{log_ts_ns, release_bin};
use confd::live::haproxy::cli::Cli;
use std::path::{Path, PathBuf};
use std::time::Duration;
use switchboard_tests::{free_port, poll, signal_reload, wait_pid_file, workspace_root, Process};

/// Upper bound for each wait while a stack starts.
const START: Duration = Duration::from_secs(30);

/// The proxy behind confd.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Proxy {
    /// HAProxy 2.6 in master-worker mode, reloaded with SIGUSR2; live: its admin socket.
    Haproxy,
    /// nginx with Debian's Lua module, reloaded with SIGHUP; live: the Lua peers endpoint.
    Nginx,
}

impl Proxy {
    /// Name used in tables.
    pub fn name(self) -> &'static str {
        match self {
            Proxy::Haproxy => "haproxy",
            Proxy::Nginx => "nginx",
        }
    }
}

/// How confd is configured for one run.
#[derive(Clone, Copy, Debug)]
pub struct Settings<'a> {
    /// The proxy.
    pub proxy: Proxy,
    /// With the live channel (membership without reloads), or the plain reload path.
    pub live: bool,
    /// Quiescence window `(min, max)` as confd reads it, e.g. `("200ms", "2s")`.
    pub wait: (&'a str, &'a str),
    /// Run the proxy's config check on every render (the reference stacks do).
    pub check: bool,
    /// The service that is the default backend (`vars.default_service`).
    pub service: &'a str,
    /// nginx: also listen for HTTP/2 with prior knowledge on a port of its own
    /// (`vars.h2c_listen`), which h2c and gRPC clients need there. HAProxy takes them on its
    /// one port either way.
    pub h2c_listen: bool,
}

impl Settings<'_> {
    /// `live` or `reload`, for tables.
    pub fn channel(&self) -> &'static str {
        if self.live {
            "live"
        } else {
            "reload only"
        }
    }
}

/// What kind of change a line of confd's log reports as applied.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Applied {
    /// The reload command ran.
    Reload,
    /// A membership change went through the live channel.
    Live,
}

/// Running totals from confd's log.
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub struct Counters {
    /// Reload commands run.
    pub reloads: u64,
    /// Changes applied through the live channel.
    pub live: u64,
}

impl std::ops::Add for Counters {
    type Output = Counters;
    fn add(self, o: Counters) -> Counters {
        Counters {
            reloads: self.reloads + o.reloads,
            live: self.live + o.live,
        }
    }
}

impl std::ops::Sub for Counters {
    type Output = Counters;
    fn sub(self, o: Counters) -> Counters {
        Counters {
            reloads: self.reloads - o.reloads,
            live: self.live - o.live,
        }
    }
}

/// confd and a proxy; both stop (process group killed) on drop, before their directory goes.
pub struct Lb {
    /// The proxy's port on 127.0.0.1 (`vars.listen`).
    pub port: u16,
    /// The port HTTP/2 clients with prior knowledge use: nginx's `vars.h2c_listen` when
    /// [`Settings::h2c_listen`] is set, else [`Lb::port`].
    pub h2c_port: u16,
    confd: Process,
    _proxy: Process,
    admin: Option<Cli>,
    dest: PathBuf,
    _dir: tempfile::TempDir,
}

impl Lb {
    /// Starts confd on `backend_uri` and the proxy once the rendered file satisfies `ready`.
    pub async fn start(backend_uri: &str, s: Settings<'_>, ready: impl Fn(&str) -> bool) -> Lb {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let port = free_port();
        let h2c_port = match s.proxy {
            Proxy::Nginx if s.h2c_listen => free_port(),
            _ => port,
        };
        let dest = d.join(match s.proxy {
            Proxy::Haproxy => "haproxy.cfg",
            Proxy::Nginx => "nginx.conf",
        });

        let once_cfg = d.join("confd-once.yaml");
        std::fs::write(
            &once_cfg,
            config(d, (port, h2c_port), backend_uri, s, false),
        )
        .unwrap();
        let rendered = poll(START, Duration::from_millis(100), || async {
            let mut once = Process::spawn(
                &release_bin("confd"),
                &["--config", once_cfg.to_str().unwrap(), "--once"],
                &[],
            );
            once.wait_exit(START).await;
            std::fs::read_to_string(&dest)
                .is_ok_and(|t| ready(&t))
                .then_some(())
        })
        .await;
        assert!(
            rendered.is_some(),
            "{} never held what the run waits for",
            dest.display()
        );

        let path = |name: &str| d.join(name).display().to_string();
        let proxy = match s.proxy {
            Proxy::Haproxy => Process::spawn(
                Path::new("haproxy"),
                &["-W", "-f", &path("haproxy.cfg"), "-p", &path("haproxy.pid")],
                &[],
            ),
            Proxy::Nginx => Process::spawn(
                Path::new("nginx"),
                &[
                    "-e",
                    &path("nginx-start.log"),
                    "-c",
                    &path("nginx.conf"),
                    "-g",
                    "daemon off;",
                ],
                &[],
            ),
        };
        let pid_file = d.join(match s.proxy {
            Proxy::Haproxy => "haproxy.pid",
            Proxy::Nginx => "nginx.pid",
        });
        wait_pid_file(&pid_file, START).await;
        let addr = format!("127.0.0.1:{port}");
        let up = poll(START, Duration::from_millis(50), || async {
            std::net::TcpStream::connect(&addr).ok().map(|_| ())
        })
        .await;
        assert!(
            up.is_some(),
            "{} not listening on {addr}: {}",
            s.proxy.name(),
            proxy.output()
        );

        let cfg = d.join("confd.yaml");
        std::fs::write(&cfg, config(d, (port, h2c_port), backend_uri, s, true)).unwrap();
        let confd = Process::spawn(
            &release_bin("confd"),
            &["--config", cfg.to_str().unwrap()],
            &[("RUST_LOG", "info")],
        );
        confd.wait_output("snapshot updated", START).await;
        let admin = (s.proxy == Proxy::Haproxy).then(|| Cli::new(&d.join("admin.sock")));
        Lb {
            port,
            h2c_port,
            confd,
            _proxy: proxy,
            admin,
            dest,
            _dir: dir,
        }
    }

    /// The proxy's PID, which leads its process group (master and workers).
    pub fn proxy_pid(&self) -> u32 {
        self._proxy.pid()
    }

    /// The rendered file as it is now.
    pub fn file(&self) -> String {
        std::fs::read_to_string(&self.dest).unwrap_or_default()
    }

    /// confd's log so far.
    pub fn log(&self) -> String {
        self.confd.output()
    }

    /// Lines in confd's log so far: a mark to look for what comes after.
    pub fn mark(&self) -> usize {
        self.log().lines().count()
    }

    /// See [`first_applied`].
    pub fn applied_after(&self, mark: usize, pool: &str) -> Option<(u128, Applied)> {
        first_applied(&self.log(), mark, pool)
    }

    /// See [`most_services`].
    pub fn most_services(&self) -> usize {
        most_services(&self.log())
    }

    /// See [`counters`].
    pub fn counters(&self) -> Counters {
        counters(&self.log())
    }

    /// See [`settled`].
    pub fn settled(&self) -> bool {
        settled(&self.log())
    }

    /// HAProxy only: whether the running process no longer sends new requests to the server
    /// at `addr` of `backend` (gone, drained or in maintenance), as `show servers state` says.
    /// `None` for nginx, or when the socket does not answer.
    pub async fn out_of_proxy(&self, backend: &str, addr: (std::net::IpAddr, u16)) -> Option<bool> {
        let servers = self.admin.as_ref()?.servers(backend).await.ok()?;
        Some(
            servers
                .iter()
                .find(|r| r.addr == Some(addr))
                .map_or(true, |r| r.idle_by_admin()),
        )
    }
}

/// Whether a rendered file (either template) lists a server at `addr` (`ip:port`): HAProxy's
/// `server <name> <addr> check ...` and nginx's `server <addr> max_fails=...` both have it
/// between spaces.
pub fn lists(file: &str, addr: &str) -> bool {
    file.contains(&format!(" {addr} "))
}

/// The first change to `pool` that confd's `log` shows applied after line `mark`: when (its
/// line's timestamp) and how. A live line names the pools it changed; a reload line names
/// none and is taken as applying every change before it.
pub fn first_applied(log: &str, mark: usize, pool: &str) -> Option<(u128, Applied)> {
    let quoted = format!("\"{pool}\"");
    log.lines().skip(mark).find_map(|l| {
        let a = applied(l)?;
        if a == Applied::Live && !l.contains(&quoted) {
            return None;
        }
        Some((log_ts_ns(l)?, a))
    })
}

/// The most services a snapshot held (`snapshot updated services=N`): more than a run
/// registered means another run's containers reached its store.
pub fn most_services(log: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("snapshot updated"))
        .filter_map(|l| number_after(l, " services="))
        .max()
        .map_or(0, |n| n as usize)
}

/// The running totals, from the last line that carries each.
pub fn counters(log: &str) -> Counters {
    let last = |key: &str| {
        log.lines()
            .rev()
            .find_map(|l| number_after(l, key))
            .unwrap_or(0)
    };
    Counters {
        reloads: last(" reloads="),
        live: last(" live_updates="),
    }
}

/// Whether the last file confd replaced has been applied: a render that goes the reload way
/// logs `rendered and replaced` before its `reloaded` line (a live one logs a single line once
/// applied).
pub fn settled(log: &str) -> bool {
    log.lines()
        .rev()
        .find(|l| l.contains("rendered and replaced") || applied(l).is_some())
        .map_or(true, |l| applied(l).is_some())
}

/// The number right after `key` in `line`.
fn number_after(line: &str, key: &str) -> Option<u64> {
    let v = line.split(key).nth(1)?;
    v.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// What a log line says was applied, if anything.
fn applied(line: &str) -> Option<Applied> {
    if line.contains("applied live, no reload") {
        Some(Applied::Live)
    } else if line.contains("confd::runner: reloaded reload=") {
        Some(Applied::Reload)
    } else {
        None
    }
}

/// confd's config file for the stack in `dir`. Without `commands`, only the render (for
/// `--once` before the proxy runs). Mirrors `compose/images/lb-*/confd.yaml`, with paths in
/// `dir` and the proxy on 127.0.0.1:`port` (and nginx's HTTP/2 port, when
/// [`Settings::h2c_listen`] is set, on 127.0.0.1:`h2c_port`).
fn config(
    dir: &Path,
    (port, h2c_port): (u16, u16),
    backend_uri: &str,
    s: Settings<'_>,
    commands: bool,
) -> String {
    let d = dir.display();
    let (min, max) = s.wait;
    let q = |v: String| serde_json::to_string(&v).unwrap();
    let (template, vars, check, reload, live) = match s.proxy {
        Proxy::Haproxy => (
            "haproxy.cfg.hbs",
            format!(
                "  listen: {port}\n  bind_address: 127.0.0.1\n  pid: {d}/haproxy.pid\n  \
                 stats_socket: {d}/admin.sock\n"
            ),
            "haproxy -c -q -f {{staged}}".to_string(),
            signal_reload(&dir.join("haproxy.pid"), "USR2"),
            format!("{{ haproxy: {{ socket: {d}/admin.sock, drain_timeout: 30s }} }}"),
        ),
        Proxy::Nginx => (
            "nginx.conf.hbs",
            format!(
                "  listen: 127.0.0.1:{port}\n  pid: {d}/nginx.pid\n  error_log: {d}/nginx-error.log\n  \
                 access_log: {d}/nginx-access.log\n  temp_dir: {d}\n  lua_peers: {}\n  \
                 lua_peers_socket: {d}/peers.sock\n",
                s.live
            ),
            format!("nginx -t -q -e {d}/nginx-check.log -c {{{{staged}}}}"),
            signal_reload(&dir.join("nginx.pid"), "HUP"),
            format!("{{ nginx_lua: {{ socket: {d}/peers.sock }} }}"),
        ),
    };
    let h2c = if s.proxy == Proxy::Nginx && s.h2c_listen {
        format!("  h2c_listen: 127.0.0.1:{h2c_port}\n")
    } else {
        String::new()
    };
    let mut cfg = format!(
        "backend: {backend_uri}\nwait: {{ min: {min}, max: {max} }}\nvars:\n  default_service: {}\n\
         {vars}{h2c}templates:\n  - src: {}\n    dest: {d}/{}\n    min_instances: 0\n",
        s.service,
        workspace_root().join("templates").join(template).display(),
        template.trim_end_matches(".hbs"),
    );
    if commands {
        if s.check {
            cfg.push_str(&format!("    check: {}\n", q(check)));
        }
        cfg.push_str(&format!("    reload: {}\n", q(reload)));
        if s.live {
            cfg.push_str(&format!("    live: {live}\n"));
        }
    }
    cfg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn applied_lines() {
        let cases = [
            (
                "2026-11-26T15:21:28.973996Z  INFO confd::runner: rendered and replaced; \
                 applied live, no reload: +0 -1 ~0 servers template=x reloads=0 live_updates=3",
                Some(Applied::Live),
            ),
            (
                "2026-11-26T15:21:28.973996Z  INFO confd::runner: reloaded reload=kill \
                 reloads=2 live_updates=0",
                Some(Applied::Reload),
            ),
            (
                "2026-11-26T15:21:28.973996Z  INFO confd::runner: reloaded with the previous files",
                None,
            ),
            (
                "2026-11-26T15:21:28.973996Z  INFO confd::runner: rendered and replaced template=x",
                None,
            ),
        ];
        for (line, want) in cases {
            assert_eq!(applied(line), want, "{line}");
        }
    }

    /// A confd log as the runs see it: a live removal from pool `svc_a`, one from another
    /// service's pool, a render waiting for its reload, then the reload.
    const LOG: &str = "\
2026-11-26T15:00:00.000000Z  INFO confd::source: snapshot updated services=1 instances=3 long_polls=0 refused=0
2026-11-26T15:00:00.100000Z  INFO confd::runner: rendered and replaced; applied live, no reload: +0 -1 ~0 servers template=t changed=[\"svc_a\"] pools=1 peers=2 reloads=0 live_updates=1
2026-11-26T15:00:00.200000Z  INFO confd::source: snapshot updated services=2 instances=3 long_polls=1 refused=0
2026-11-26T15:00:00.300000Z  INFO confd::runner: rendered and replaced; applied live, no reload: +1 -0 ~0 servers template=t changed=[\"svc_ab\"] pools=2 peers=3 reloads=0 live_updates=2
2026-11-26T15:00:00.400000Z  INFO confd::runner: rendered and replaced template=t bytes=10
2026-11-26T15:00:00.500000Z  INFO confd::runner: reloaded reload=kill templates=[\"t\"] output= reloads=1 live_updates=2
";

    #[test]
    fn reading_the_log() {
        let at = |ms: u128| 1_795_705_200_000_000_000 + ms * 1_000_000;
        let cases = [
            (0, "svc_a", Some((at(100), Applied::Live))),
            (2, "svc_a", Some((at(500), Applied::Reload))),
            (2, "svc_ab", Some((at(300), Applied::Live))),
            (6, "svc_a", None),
        ];
        for (mark, pool, want) in cases {
            assert_eq!(first_applied(LOG, mark, pool), want, "{mark} {pool}");
        }
        assert_eq!(most_services(LOG), 2);
        assert_eq!(
            counters(LOG),
            Counters {
                reloads: 1,
                live: 2
            }
        );
        assert_eq!(counters(""), Counters::default());
        let lines: Vec<&str> = LOG.lines().collect();
        for (upto, want) in [(0, true), (2, true), (4, true), (5, false), (6, true)] {
            assert_eq!(
                settled(&lines[..upto].join("\n")),
                want,
                "first {upto} lines"
            );
        }
    }

    #[test]
    fn config_mirrors_the_reference_stacks() {
        let dir = Path::new("/tmp/lb");
        // (proxy, live, check, commands) -> lines that must be there, lines that must not.
        type Case = (
            Proxy,
            bool,
            bool,
            bool,
            &'static [&'static str],
            &'static [&'static str],
        );
        let cases: [Case; 5] = [
            (
                Proxy::Haproxy,
                true,
                true,
                true,
                &[
                    "wait: { min: 200ms, max: 2s }",
                    "  stats_socket: /tmp/lb/admin.sock",
                    "    check: \"haproxy -c -q -f {{staged}}\"",
                    "kill -USR2",
                    "    live: { haproxy: { socket: /tmp/lb/admin.sock, drain_timeout: 30s } }",
                ],
                &[],
            ),
            (
                Proxy::Haproxy,
                true,
                false,
                true,
                &["    live: { haproxy:"],
                &["check:"],
            ),
            (
                Proxy::Haproxy,
                false,
                true,
                true,
                &["    check:"],
                &["live:"],
            ),
            (
                Proxy::Nginx,
                true,
                true,
                false,
                &[
                    "  lua_peers: true",
                    "  listen: 127.0.0.1:8080",
                    "  h2c_listen: 127.0.0.1:8081",
                ],
                &["check:", "reload:", "live:"],
            ),
            (
                Proxy::Nginx,
                false,
                true,
                true,
                &[
                    "  lua_peers: false",
                    "    check: \"nginx -t -q",
                    "kill -HUP",
                ],
                &["live:"],
            ),
        ];
        for (proxy, live, check, commands, has, lacks) in cases {
            let s = Settings {
                proxy,
                live,
                wait: ("200ms", "2s"),
                check,
                service: "web",
                h2c_listen: proxy == Proxy::Nginx,
            };
            let cfg = config(
                dir,
                (8080, 8081),
                "etcd://127.0.0.1:2379/bench",
                s,
                commands,
            );
            assert!(cfg.contains("  default_service: web\n"), "{cfg}");
            for line in has {
                assert!(
                    cfg.contains(line),
                    "{proxy:?} live={live}: no {line:?} in\n{cfg}"
                );
            }
            for line in lacks {
                assert!(
                    !cfg.contains(line),
                    "{proxy:?} live={live}: {line:?} in\n{cfg}"
                );
            }
        }
    }
}
