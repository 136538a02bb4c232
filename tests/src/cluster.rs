//! Real store clusters on loopback ports: three Consul servers with a client agent, and three
//! etcd members. Production stores are clusters; these let tests kill the leader (or any
//! member) under load and watch what registrator, confd and the proxy do about it.

use crate::poll::{free_port, poll, wait_for};
use crate::process::{find_program, Process};
use std::time::Duration;

/// How long a cluster gets to form (or re-elect).
const FORM: Duration = Duration::from_secs(60);

/// The ports one Consul agent uses.
#[derive(Debug, Clone, Copy)]
struct ConsulPorts {
    http: u16,
    dns: u16,
    serf_lan: u16,
    serf_wan: u16,
    server: u16,
}

impl ConsulPorts {
    fn free() -> ConsulPorts {
        ConsulPorts {
            http: free_port(),
            dns: free_port(),
            serf_lan: free_port(),
            serf_wan: free_port(),
            server: free_port(),
        }
    }
}

struct ConsulAgent {
    name: String,
    ports: ConsulPorts,
    proc: Option<Process>,
    _data: tempfile::TempDir,
}

/// Three Consul servers and one client agent, all on 127.0.0.1. Registrator and confd talk to
/// the client agent, as they do in production; the servers hold the catalog and elect a
/// leader among themselves.
pub struct ConsulCluster {
    servers: Vec<ConsulAgent>,
    client: ConsulAgent,
}

impl ConsulCluster {
    /// Starts the cluster and waits until it has a leader and the client agent is a member
    /// whose catalog answers.
    pub async fn start() -> ConsulCluster {
        let bin = find_program("consul", &["/usr/local/bin", "/opt/switchboard/bin"]);
        let server_ports: Vec<ConsulPorts> = (0..3).map(|_| ConsulPorts::free()).collect();
        let joins: Vec<String> = server_ports
            .iter()
            .map(|p| format!("127.0.0.1:{}", p.serf_lan))
            .collect();
        let launch = |name: &str, ports: ConsulPorts, server: bool| {
            let data = tempfile::tempdir().unwrap();
            let (http, dns, lan, wan, srv) = (
                ports.http.to_string(),
                ports.dns.to_string(),
                ports.serf_lan.to_string(),
                ports.serf_wan.to_string(),
                ports.server.to_string(),
            );
            let mut args: Vec<String> = [
                "agent",
                "-node",
                name,
                "-data-dir",
                data.path().to_str().unwrap(),
                "-bind",
                "127.0.0.1",
                "-client",
                "127.0.0.1",
                "-http-port",
                &http,
                "-dns-port",
                &dns,
                "-serf-lan-port",
                &lan,
                "-serf-wan-port",
                &wan,
                "-server-port",
                &srv,
                "-grpc-port",
                "-1",
                "-hcl",
                "performance { raft_multiplier = 1 }",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            if server {
                args.extend(["-server", "-bootstrap-expect", "3"].map(String::from));
            }
            for j in &joins {
                args.push("-retry-join".into());
                args.push(j.clone());
            }
            let argv: Vec<&str> = args.iter().map(String::as_str).collect();
            ConsulAgent {
                name: name.to_string(),
                ports,
                proc: Some(Process::spawn(&bin, &argv, &[])),
                _data: data,
            }
        };
        let servers: Vec<ConsulAgent> = server_ports
            .iter()
            .enumerate()
            .map(|(i, p)| launch(&format!("sbtest-s{i}"), *p, true))
            .collect();
        let client = launch("sbtest-client", ConsulPorts::free(), false);
        let c = ConsulCluster { servers, client };
        c.wait_formed().await;
        c
    }

    /// Waits until a leader is elected, the client agent sees it, and its catalog lists every
    /// live agent's node and Consul's own service.
    pub async fn wait_formed(&self) {
        let live = 1 + self.servers.iter().filter(|s| s.proc.is_some()).count();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        let base = self.http();
        // What the last poll saw, for the failure message: a cluster that never forms is
        // diagnosed from this and the agents' logs, not re-run in the hope it passes.
        let seen = std::sync::Mutex::new(String::from("no answer yet"));
        let formed = poll(FORM, Duration::from_millis(100), || {
            let (http, base, seen) = (http.clone(), base.clone(), &seen);
            async move {
                let get = |path: &'static str| {
                    let (http, base) = (http.clone(), base.clone());
                    async move {
                        match http.get(format!("{base}{path}")).send().await {
                            Ok(r) => r.text().await.map_err(|e| format!("{path}: {e}")),
                            Err(e) => Err(format!("{path}: {e}")),
                        }
                    }
                };
                let note = |msg: String| *seen.lock().unwrap() = msg;
                let leader = get("/v1/status/leader").await.map_err(note).ok()?;
                if leader.len() <= 2 {
                    note(format!("no leader yet ({leader:?})"));
                    return None;
                }
                let nodes = get("/v1/catalog/nodes").await.map_err(note).ok()?;
                let services = get("/v1/catalog/services").await.map_err(note).ok()?;
                let n = serde_json::from_str::<serde_json::Value>(&nodes)
                    .ok()
                    .and_then(|v| v.as_array().map(Vec::len))
                    .unwrap_or(0);
                let has_consul = serde_json::from_str::<serde_json::Value>(&services)
                    .ok()
                    .is_some_and(|v| v.get("consul").is_some());
                note(format!(
                    "leader {leader}, {n} of {live} nodes in the catalog, consul service listed: {has_consul}"
                ));
                (n >= live && has_consul).then_some(())
            }
        })
        .await;
        if formed.is_none() {
            for agent in self.servers.iter().chain(std::iter::once(&self.client)) {
                let log = agent.proc.as_ref().map(Process::output).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                eprintln!("--- {} ({:?}), last lines:", agent.name, agent.ports);
                for line in tail.iter().rev() {
                    eprintln!("{line}");
                }
            }
            panic!(
                "timed out after {FORM:?} waiting for a Consul cluster with a leader; last seen: {}",
                seen.lock().unwrap()
            );
        }
    }

    /// The client agent's HTTP API: `http://127.0.0.1:<port>`.
    pub fn http(&self) -> String {
        format!("http://127.0.0.1:{}", self.client.ports.http)
    }

    /// `consul://` URI of the client agent.
    pub fn uri(&self) -> String {
        format!("consul://127.0.0.1:{}", self.client.ports.http)
    }

    /// Index of the current leader among the servers.
    pub async fn leader(&self) -> usize {
        let http = reqwest::Client::new();
        let url = format!("{}/v1/status/leader", self.http());
        wait_for("the Consul leader's address", FORM, || {
            let (http, url) = (http.clone(), url.clone());
            async move {
                let text = http.get(&url).send().await.ok()?.text().await.ok()?;
                let addr: String = serde_json::from_str(&text).ok()?;
                self.servers.iter().position(|s| {
                    s.proc.is_some() && addr == format!("127.0.0.1:{}", s.ports.server)
                })
            }
        })
        .await
    }

    /// `kill -9` of server `i`; returns its node name.
    pub fn kill_server(&mut self, i: usize) -> String {
        self.servers[i].proc = None;
        self.servers[i].name.clone()
    }
}

/// Three etcd members on loopback ports, bootstrapped together.
pub struct EtcdCluster {
    members: Vec<EtcdMember>,
}

struct EtcdMember {
    client: u16,
    proc: Option<Process>,
    _data: tempfile::TempDir,
}

impl EtcdCluster {
    /// Starts the members and waits until every one answers with a leader elected.
    pub async fn start() -> EtcdCluster {
        let bin = find_program("etcd", &["/usr/bin", "/opt/switchboard/bin"]);
        let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
        let initial = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let members = ports
            .iter()
            .enumerate()
            .map(|(i, (client, peer))| {
                let data = tempfile::tempdir().unwrap();
                let (c, p) = (
                    format!("http://127.0.0.1:{client}"),
                    format!("http://127.0.0.1:{peer}"),
                );
                let dir = data.path().join("member");
                let name = format!("m{i}");
                let args = [
                    "--name",
                    &name,
                    "--data-dir",
                    dir.to_str().unwrap(),
                    "--listen-client-urls",
                    &c,
                    "--advertise-client-urls",
                    &c,
                    "--listen-peer-urls",
                    &p,
                    "--initial-advertise-peer-urls",
                    &p,
                    "--initial-cluster",
                    &initial,
                    "--initial-cluster-state",
                    "new",
                    "--heartbeat-interval",
                    "100",
                    "--election-timeout",
                    "1000",
                ];
                EtcdMember {
                    client: *client,
                    proc: Some(Process::spawn(
                        &bin,
                        &args,
                        &[("ETCD_UNSUPPORTED_ARCH", "")],
                    )),
                    _data: data,
                }
            })
            .collect();
        let c = EtcdCluster { members };
        for i in 0..3 {
            c.wait_member(i).await;
        }
        c
    }

    async fn status(&self, i: usize) -> Option<serde_json::Value> {
        reqwest::Client::new()
            .post(format!(
                "http://127.0.0.1:{}/v3/maintenance/status",
                self.members[i].client
            ))
            .body("{}")
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()
    }

    async fn wait_member(&self, i: usize) {
        wait_for(&format!("etcd member {i} with a leader"), FORM, || async {
            let s = self.status(i).await?;
            let leader = s["leader"].as_str().filter(|l| *l != "0")?;
            // A write must go through too (the member is caught up with the leader).
            let ok = reqwest::Client::new()
                .post(format!(
                    "http://127.0.0.1:{}/v3/kv/put",
                    self.members[i].client
                ))
                .body(r#"{"key":"c2J0ZXN0LXJlYWR5","value":"MQ=="}"#)
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .ok()?
                .status()
                .is_success();
            ok.then(|| leader.to_string())
        })
        .await;
    }

    /// `etcd://h1,h2,h3/<prefix>`: every member, for failover.
    pub fn uri(&self, prefix: &str) -> String {
        let hosts: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("127.0.0.1:{}", m.client))
            .collect();
        format!("etcd://{}/{prefix}", hosts.join(","))
    }

    /// Index of the current leader.
    pub async fn leader(&self) -> usize {
        wait_for("the etcd leader", FORM, || async {
            for i in 0..self.members.len() {
                if self.members[i].proc.is_none() {
                    continue;
                }
                let s = self.status(i).await?;
                if s["header"]["member_id"] == s["leader"] {
                    return Some(i);
                }
            }
            None
        })
        .await
    }

    /// `kill -9` of member `i`, then waits until the others have a leader again.
    pub async fn kill_member(&mut self, i: usize) {
        self.members[i].proc = None;
        for j in 0..self.members.len() {
            if self.members[j].proc.is_some() {
                self.wait_member(j).await;
            }
        }
    }
}
