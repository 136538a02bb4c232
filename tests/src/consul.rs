//! A Consul dev agent on free loopback ports: plain (script checks enabled), with an agent
//! configuration of the test's own, or secured (ACLs in default-deny mode, HTTPS), and the
//! API reads tests make of it.
//!
//! Store clusters (three servers and a client agent) are in [`crate::cluster`].

use crate::poll::{free_port, wait_for};
use crate::process::{find_program, Process};
use std::time::Duration;

/// When a Consul agent the tests start counts as ready.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ConsulReady {
    /// Its catalog lists its own `consul` service (so its registrations show at once).
    Catalog,
    /// It has a leader (`/v1/status/leader`, which needs no ACL token): with ACLs in
    /// default-deny mode an anonymous reader sees no catalog.
    Leader,
}

/// A Consul dev agent on free loopback ports. Dev mode keeps nothing on disk, so a restart
/// forgets every registration: exactly the outage registrator must recover from.
pub struct Consul {
    /// HTTP API port.
    pub port: u16,
    ports: [u16; 4],
    hcl: String,
    /// When the agent counts as ready.
    ready: ConsulReady,
    proc: Option<Process>,
}

impl Consul {
    /// Starts an agent (script checks enabled) and waits until it is ready.
    pub async fn start() -> Consul {
        Consul::start_with("enable_script_checks = true").await
    }

    /// Starts an agent with this agent configuration (HCL) and waits until it is ready.
    pub async fn start_with(hcl: &str) -> Consul {
        let mut c = Consul {
            port: free_port(),
            ports: [free_port(), free_port(), free_port(), free_port()],
            hcl: hcl.to_string(),
            ready: ConsulReady::Catalog,
            proc: None,
        };
        c.launch().await;
        c
    }

    /// Starts an agent whose configuration (HCL) may enable ACLs in default-deny mode or
    /// HTTPS, and waits only for a leader (the plain HTTP port stays open on loopback for
    /// that, and for the test's own setup requests).
    pub async fn start_secure(hcl: &str) -> Consul {
        let mut c = Consul {
            port: free_port(),
            ports: [free_port(), free_port(), free_port(), free_port()],
            hcl: hcl.to_string(),
            ready: ConsulReady::Leader,
            proc: None,
        };
        c.launch().await;
        c
    }

    async fn launch(&mut self) {
        let bin = find_program("consul", &["/usr/local/bin", "/opt/switchboard/bin"]);
        let [dns, serf_lan, serf_wan, server] = self.ports.map(|p| p.to_string());
        let http = self.port.to_string();
        let args = [
            "agent",
            "-dev",
            "-bind",
            "127.0.0.1",
            "-client",
            "127.0.0.1",
            "-http-port",
            &http,
            "-dns-port",
            &dns,
            "-serf-lan-port",
            &serf_lan,
            "-serf-wan-port",
            &serf_wan,
            "-server-port",
            &server,
            "-grpc-port",
            "-1",
            "-node",
            "sbtest",
            "-hcl",
            &self.hcl,
        ];
        self.proc = Some(Process::spawn(&bin, &args, &[]));
        // A leader alone is not enough: the agent registers its node and its own `consul`
        // service in the catalog a moment after the election (anti-entropy), and until then
        // the catalog answers without them and the agent's own registrations do not show in
        // catalog or health queries yet. Callers rely on all of it, so wait for that sync.
        let url = format!("{}/v1/catalog/services", self.http());
        let client = reqwest::Client::new();
        if self.ready == ConsulReady::Leader {
            let url = format!("{}/v1/status/leader", self.http());
            wait_for("consul leader", Duration::from_secs(30), || {
                let client = client.clone();
                let url = url.clone();
                async move {
                    let r = client.get(&url).send().await.ok()?;
                    let v: String = r.json().await.ok()?;
                    (!v.is_empty()).then_some(())
                }
            })
            .await;
            return;
        }
        wait_for(
            "consul leader and its own catalog entry",
            Duration::from_secs(30),
            || {
                let client = client.clone();
                let url = url.clone();
                async move {
                    let r = client.get(&url).send().await.ok()?;
                    if !r.status().is_success() {
                        return None;
                    }
                    let v: serde_json::Value = r.json().await.ok()?;
                    v.get("consul").map(|_| ())
                }
            },
        )
        .await;
    }

    /// `http://127.0.0.1:<port>`.
    pub fn http(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `consul://127.0.0.1:<port>`.
    pub fn uri(&self) -> String {
        format!("consul://127.0.0.1:{}", self.port)
    }

    /// Stops the agent (`kill -9`).
    pub fn stop(&mut self) {
        self.proc = None;
    }

    /// Starts it again on the same ports, empty (dev mode).
    pub async fn restart(&mut self) {
        self.stop();
        self.launch().await;
    }

    /// GET a JSON document from the API (panics on transport errors).
    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        reqwest::get(format!("{}{path}", self.http()))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// IDs of the services registered with the agent.
    pub async fn agent_service_ids(&self) -> Vec<String> {
        let v = self.get_json("/v1/agent/services").await;
        let mut ids: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        ids.sort();
        ids
    }

    /// The agent's view of one service instance (`/v1/agent/services`), if registered.
    pub async fn agent_service(&self, id: &str) -> Option<serde_json::Value> {
        self.get_json("/v1/agent/services").await.get(id).cloned()
    }

    /// One check of the agent (`/v1/agent/checks`), if it exists.
    pub async fn agent_check(&self, check_id: &str) -> Option<serde_json::Value> {
        self.get_json("/v1/agent/checks")
            .await
            .get(check_id)
            .cloned()
    }
}
