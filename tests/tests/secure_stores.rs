//! Both binaries against secured stores: Consul over HTTPS with a private CA, client
//! certificates (`verify_incoming_https`) and ACLs in default-deny mode; etcd with
//! client-certificate TLS and authentication. Certificates are made by the test (`openssl`).
//! The failures an operator meets (a wrong CA, no client certificate, a token without the
//! right, bad credentials) must each be one clear line, never showing a secret.

use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use switchboard_tests::registrator::{registrator, web};
use switchboard_tests::*;

const WAIT: Duration = Duration::from_secs(30);

/// A web container labelled `sbtest.group=<group>`: a registrator limited to that label
/// (`--label-filter`) counts only the test's own containers, whatever else runs on the
/// engine.
fn web_in(group: &str, tag: &str) -> Container {
    web(tag, &["--label", &format!("sbtest.group={group}")])
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

/// Runs a binary that must stop by itself (confd `--once`, registrator giving up).
async fn run_to_exit(mut p: Process) -> (bool, String) {
    let st = p.wait_exit(WAIT).await;
    (st.success(), p.output())
}

/// A Consul agent with HTTPS (client certificates required) and default-deny ACLs, and the
/// management token from bootstrapping it.
struct SecureConsul {
    consul: Consul,
    https_port: u16,
    management: String,
}

impl SecureConsul {
    async fn start(pki: &Pki) -> SecureConsul {
        let https_port = free_port();
        let hcl = format!(
            r#"ports {{ https = {https_port} }}
ca_file = "{ca}"
cert_file = "{cert}"
key_file = "{key}"
verify_incoming_https = true
acl {{
  enabled = true
  default_policy = "deny"
}}"#,
            ca = pki.path("ca.pem"),
            cert = pki.path("server.pem"),
            key = pki.path("server.key"),
        );
        let consul = Consul::start_secure(&hcl).await;
        // Bootstrapping answers an error until the ACL system is up after the election.
        let http = reqwest::Client::new();
        let url = format!("{}/v1/acl/bootstrap", consul.http());
        let management = wait_for("ACL bootstrap", WAIT, || async {
            let r = http.put(&url).send().await.ok()?;
            let v: Value = r.json().await.ok()?;
            v["SecretID"].as_str().map(String::from)
        })
        .await;
        let s = SecureConsul {
            consul,
            https_port,
            management,
        };
        // The agent's own token, so it may keep its node in the catalog.
        let agent = s
            .token("agent", r#"node_prefix "" { policy = "write" }"#)
            .await;
        s.api("PUT", "/v1/agent/token/agent", json!({ "Token": agent }))
            .await;
        s
    }

    /// A request over plain HTTP with the management token.
    async fn api(&self, method: &str, path: &str, body: Value) -> Value {
        let r = reqwest::Client::new()
            .request(
                method.parse().unwrap(),
                format!("{}{path}", self.consul.http()),
            )
            .header("X-Consul-Token", &self.management)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status();
        let text = r.text().await.unwrap();
        assert!(status.is_success(), "{method} {path}: {status} {text}");
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    /// Waits until Consul's answer about `service` has stopped changing: a blocking query
    /// from its current index runs its whole 1 s wait unanswered. An agent writes a service
    /// it has just registered to the catalog in more than one step, each moving the
    /// service's index; a policy narrowed during one of them is, to Consul 1.8's reader, the
    /// same as a removal (confd's Consul source documents that limit).
    async fn wait_settled(&self, service: &str) {
        let http = reqwest::Client::new();
        let url = format!("{}/v1/health/service/{service}", self.consul.http());
        let index = |r: &reqwest::Response| -> u64 {
            r.headers()["X-Consul-Index"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap()
        };
        wait_for(&format!("{service} settled in Consul"), WAIT, || async {
            let get = |q: String| {
                http.get(format!("{url}{q}"))
                    .header("X-Consul-Token", &self.management)
                    .send()
            };
            let now = index(&get(String::new()).await.ok()?);
            let later = index(&get(format!("?index={now}&wait=1s")).await.ok()?);
            (later == now).then_some(())
        })
        .await;
    }

    /// A new token with one policy of these rules.
    async fn token(&self, name: &str, rules: &str) -> String {
        self.api(
            "PUT",
            "/v1/acl/policy",
            json!({ "Name": name, "Rules": rules }),
        )
        .await;
        let t = self
            .api(
                "PUT",
                "/v1/acl/token",
                json!({ "Policies": [{ "Name": name }] }),
            )
            .await;
        t["SecretID"].as_str().unwrap().to_string()
    }

    /// Deletes the token whose secret is `secret`; returns what [`SecureConsul::restore`]
    /// needs to make it again.
    async fn revoke(&self, secret: &str) -> Value {
        let tokens = self.api("GET", "/v1/acl/tokens", Value::Null).await;
        for t in tokens.as_array().unwrap() {
            let accessor = t["AccessorID"].as_str().unwrap();
            let full = self
                .api("GET", &format!("/v1/acl/token/{accessor}"), Value::Null)
                .await;
            if full["SecretID"] == secret {
                self.api("DELETE", &format!("/v1/acl/token/{accessor}"), Value::Null)
                    .await;
                return full;
            }
        }
        panic!("no such token");
    }

    /// Makes a revoked token again, with the same secret.
    async fn restore(&self, token: &Value) {
        let body = json!({
            "AccessorID": token["AccessorID"],
            "SecretID": token["SecretID"],
            "Policies": token["Policies"],
        });
        self.api("PUT", "/v1/acl/token", body).await;
    }

    /// Replaces the rules of the policy named `name` (made by [`SecureConsul::token`]).
    async fn set_rules(&self, name: &str, rules: &str) {
        let p = self
            .api("GET", &format!("/v1/acl/policy/name/{name}"), Value::Null)
            .await;
        let id = p["ID"].as_str().unwrap();
        self.api(
            "PUT",
            &format!("/v1/acl/policy/{id}"),
            json!({ "Name": name, "Rules": rules }),
        )
        .await;
    }

    /// Registers an instance of `name` with the agent (management token).
    async fn register(&self, id: &str, name: &str, port: u16) {
        let body = json!({ "ID": id, "Name": name, "Address": "127.0.0.1", "Port": port });
        self.api("PUT", "/v1/agent/service/register", body).await;
    }

    /// A confd daemon reading this agent over HTTPS with `token`, rendering every service as
    /// `[name] id ...` lines into `<dir>/out.txt`, with `extra` YAML lines (`poll_wait`...).
    fn confd(&self, pki: &Pki, dir: &Path, token: &str, extra: &str) -> Process {
        let tpl = dir.join("t.hbs");
        write(
            &tpl,
            "{{#each services}}[{{name}}]{{#each instances}} {{id}}{{/each}}\n{{/each}}",
        );
        let token_file = dir.join("token");
        write(&token_file, token);
        let cfg = dir.join("confd.yaml");
        write(
            &cfg,
            &format!(
                "backend: {uri}\ntls:\n  ca_file: {ca}\n  cert_file: {cert}\n  key_file: {key}\n\
                 \x20 server_name: server.dc1.consul\ntoken_file: {tf}\nwait: {{ min: 0s, max: 0s }}\n\
                 {extra}templates:\n  - src: {src}\n    dest: {dest}\n",
                uri = self.uri(),
                ca = pki.path("ca.pem"),
                cert = pki.path("client.pem"),
                key = pki.path("client.key"),
                tf = token_file.display(),
                src = tpl.display(),
                dest = dir.join("out.txt").display(),
            ),
        );
        Process::spawn(
            &bin("confd"),
            &["--config", cfg.to_str().unwrap()],
            &[("RUST_LOG", "info")],
        )
    }

    fn uri(&self) -> String {
        format!("consul-tls://127.0.0.1:{}", self.https_port)
    }

    /// The agent's services, as the management token sees them.
    async fn service_ids(&self) -> Vec<String> {
        let v = self.api("GET", "/v1/agent/services", Value::Null).await;
        v.as_object().unwrap().keys().cloned().collect()
    }
}

/// The environment registrator needs for the secured Consul, with the client certificate
/// under Consul's own names.
fn consul_env(pki: &Pki, token: &str) -> Vec<(&'static str, String)> {
    vec![
        ("CONSUL_CACERT", pki.path("ca.pem")),
        ("CONSUL_CLIENT_CERT", pki.path("client.pem")),
        ("CONSUL_CLIENT_KEY", pki.path("client.key")),
        ("CONSUL_HTTP_TOKEN", token.to_string()),
    ]
}

fn env_refs<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

#[tokio::test]
async fn consul_https_with_client_certificates_and_acl_tokens() {
    let pki = Pki::generate("sbtest-ca");
    let sc = SecureConsul::start(&pki).await;
    let write_token = sc
        .token(
            "registrator",
            r#"service_prefix "" { policy = "write" }
node_prefix "" { policy = "read" }"#,
        )
        .await;
    let read_token = sc
        .token(
            "reader",
            r#"service_prefix "" { policy = "read" }
node_prefix "" { policy = "read" }"#,
        )
        .await;

    // registrator registers through HTTPS with the write token.
    let c = web("sec-consul", &[]);
    let id = format!("{}:{}:80", hostname(), c.name);
    let env = consul_env(&pki, &write_token);
    let reg = registrator(&sc.uri(), &[], &env_refs(&env));
    wait_for(&format!("{id} registered over HTTPS"), WAIT, || async {
        sc.service_ids().await.contains(&id).then_some(())
    })
    .await;
    assert!(!reg.output().contains(&write_token), "{}", reg.output());

    // confd renders through HTTPS with the read-only token, from its YAML keys alone
    // (gliderlabs' and Consul's variables are not set for it).
    let dir = tempfile::tempdir().unwrap();
    let tpl = dir.path().join("t.hbs");
    write(&tpl, "{{#each service.busybox}}{{id}} {{port}}\n{{/each}}");
    let token_file = dir.path().join("token");
    write(&token_file, &format!("{read_token}\n"));
    let dest = dir.path().join("out.txt");
    let cfg = dir.path().join("confd.yaml");
    write(
        &cfg,
        &format!(
            "backend: {uri}\ntls:\n  ca_file: {ca}\n  cert_file: {cert}\n  key_file: {key}\n\
             \x20 server_name: server.dc1.consul\ntoken_file: {tf}\ntemplates:\n  - src: {src}\n    dest: {dest}\n",
            uri = sc.uri(),
            ca = pki.path("ca.pem"),
            cert = pki.path("client.pem"),
            key = pki.path("client.key"),
            tf = token_file.display(),
            src = tpl.display(),
            dest = dest.display(),
        ),
    );
    let (ok, out) = run_to_exit(Process::spawn(
        &bin("confd"),
        &["--config", cfg.to_str().unwrap(), "--once"],
        &[],
    ))
    .await;
    assert!(ok, "{out}");
    let text = std::fs::read_to_string(&dest).unwrap();
    assert!(text.contains(&id), "{text}");

    // confd with a CA that did not sign the server's certificate: nothing rendered, the
    // reason in one line, the file left as it was.
    let other = Pki::generate("sbtest-other-ca");
    let bad_cfg = dir.path().join("bad.yaml");
    write(
        &bad_cfg,
        &format!(
            "{}once_timeout: 3s\n",
            std::fs::read_to_string(&cfg)
                .unwrap()
                .replace(&pki.path("ca.pem"), &other.path("ca.pem"))
        ),
    );
    let (ok, out) = run_to_exit(Process::spawn(
        &bin("confd"),
        &["--config", bad_cfg.to_str().unwrap(), "--once"],
        &[],
    ))
    .await;
    assert!(!ok, "{out}");
    assert!(
        out.lines()
            .any(|l| l.contains("server certificate verification failed")
                && l.contains(&format!("https://127.0.0.1:{}", sc.https_port))),
        "{out}"
    );
    assert_eq!(std::fs::read_to_string(&dest).unwrap(), text);

    // The read-only token (given as a file, the CA as a directory, the client certificate
    // under gliderlabs' names): its registration is refused with one clear line, and its
    // token is never shown.
    let ca_dir = dir.path().join("ca.d");
    std::fs::create_dir(&ca_dir).unwrap();
    std::fs::copy(pki.path("ca.pem"), ca_dir.join("ca.pem")).unwrap();
    let ro = registrator(
        &sc.uri(),
        &["-hostname", "readonly"],
        &[
            ("CONSUL_CAPATH", ca_dir.to_str().unwrap()),
            ("CONSUL_TLSCERT", &pki.path("client.pem")),
            ("CONSUL_TLSKEY", &pki.path("client.key")),
            ("CONSUL_HTTP_TOKEN_FILE", token_file.to_str().unwrap()),
        ],
    );
    let denied = format!(
        "https://127.0.0.1:{} denied PUT /v1/agent/service/register: Permission denied",
        sc.https_port
    );
    ro.wait_output(&denied, WAIT).await;
    assert!(!ro.output().contains(&read_token), "{}", ro.output());
    assert!(
        !sc.service_ids()
            .await
            .iter()
            .any(|s| s.starts_with("readonly:")),
        "the read-only token registered something"
    );
    drop(ro);

    // An unknown token: refused at start, after the retries.
    let mut env = consul_env(&pki, "00000000-0000-0000-0000-000000000001");
    env.retain(|(k, _)| *k != "CONSUL_HTTP_TOKEN");
    env.push(("CONSUL_HTTP_TOKEN", "not-a-real-token".into()));
    let (ok, out) = run_to_exit(registrator(
        &sc.uri(),
        &["-retry-attempts", "1", "-retry-interval", "100"],
        &env_refs(&env),
    ))
    .await;
    assert!(!ok, "{out}");
    let last = out.lines().last().unwrap_or_default();
    assert!(
        last.contains("cannot use the consul store") && last.contains("ACL not found"),
        "{out}"
    );
    assert!(!out.contains("not-a-real-token"), "{out}");

    // A CA that did not sign the server's certificate: verification fails, one line, exit 1.
    let mut env = consul_env(&pki, &write_token);
    env[0].1 = other.path("ca.pem");
    let (ok, out) = run_to_exit(registrator(
        &sc.uri(),
        &["-retry-attempts", "1", "-retry-interval", "100"],
        &env_refs(&env),
    ))
    .await;
    assert!(!ok, "{out}");
    let last = out.lines().last().unwrap_or_default();
    assert!(
        last.contains("server certificate verification failed")
            && last.contains(&format!("https://127.0.0.1:{}", sc.https_port)),
        "{out}"
    );

    // A server name the certificate does not carry: verification fails.
    let mut env = consul_env(&pki, &write_token);
    env.push(("CONSUL_TLS_SERVER_NAME", "other.example".into()));
    let (ok, out) = run_to_exit(registrator(
        &sc.uri(),
        &["-retry-attempts", "0"],
        &env_refs(&env),
    ))
    .await;
    assert!(!ok, "{out}");
    let last = out.lines().last().unwrap_or_default();
    assert!(
        last.contains("server certificate verification failed"),
        "{out}"
    );

    // No client certificate: the server refuses the handshake.
    let mut env = consul_env(&pki, &write_token);
    env.retain(|(k, _)| !k.starts_with("CONSUL_CLIENT"));
    let (ok, out) = run_to_exit(registrator(
        &sc.uri(),
        &["-retry-attempts", "0"],
        &env_refs(&env),
    ))
    .await;
    assert!(!ok, "{out}");
    let last = out.lines().last().unwrap_or_default();
    assert!(last.contains("TLS failed"), "{out}");

    // None of the failures touched the good registration.
    assert!(sc.service_ids().await.contains(&id));

    // The running registrator's token is revoked: its store checks are refused, one line
    // each, and its registration stays; once the token is back, it carries on.
    let revoked = sc.revoke(&write_token).await;
    reg.wait_output("ACL not found", WAIT).await;
    assert!(sc.service_ids().await.contains(&id));
    sc.restore(&revoked).await;
    let c2 = web("sec-consul2", &[]);
    let id2 = format!("{}:{}:80", hostname(), c2.name);
    wait_for(
        &format!("{id2} registered after the token came back"),
        WAIT,
        || async {
            let ids = sc.service_ids().await;
            (ids.contains(&id2) && ids.contains(&id)).then_some(())
        },
    )
    .await;
    assert!(!reg.output().contains(&write_token), "{}", reg.output());
    drop(reg);
}

/// Sets up auth on a fresh member: `root` (password `rootpw`) and `app` (password `apppw`),
/// whose role may read and write `/services/` only.
fn etcd_auth_setup(etcd: &Etcd, pki: &Pki) {
    for args in [
        &["user", "add", "root:rootpw", "--interactive=false"][..],
        &["role", "add", "switchboard"],
        &[
            "role",
            "grant-permission",
            "switchboard",
            "--prefix=true",
            "readwrite",
            "/services/",
        ],
        &["user", "add", "app:apppw", "--interactive=false"],
        &["user", "grant-role", "app", "switchboard"],
        &["auth", "enable"],
    ] {
        etcdctl(etcd, pki, args);
    }
}

/// etcdctl against the secured member, with the client certificate (and `args`).
fn etcdctl(etcd: &Etcd, pki: &Pki, args: &[&str]) -> String {
    let out = Command::new("etcdctl")
        .args([
            "--endpoints",
            &etcd.http(),
            "--cacert",
            &pki.path("ca.pem"),
            "--cert",
            &pki.path("client.pem"),
            "--key",
            &pki.path("client.key"),
        ])
        .args(args)
        .env("ETCDCTL_API", "3")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "etcdctl {args:?}: {text}");
    text
}

/// The environment registrator needs for the secured member, as user `app`.
fn etcd_env(pki: &Pki) -> Vec<(&'static str, String)> {
    vec![
        ("ETCDCTL_CACERT", pki.path("ca.pem")),
        ("ETCDCTL_CERT", pki.path("client.pem")),
        ("ETCDCTL_KEY", pki.path("client.key")),
        ("ETCDCTL_USER", "app".to_string()),
        ("ETCDCTL_PASSWORD", "apppw".to_string()),
    ]
}

/// The keys under `prefix`, read as root.
fn etcd_keys(etcd: &Etcd, pki: &Pki, prefix: &str) -> String {
    etcdctl(
        etcd,
        pki,
        &[
            "--user",
            "root:rootpw",
            "get",
            "--prefix",
            "--keys-only",
            prefix,
        ],
    )
}

#[tokio::test]
async fn etcd_client_certificates_and_a_user_limited_to_the_prefix() {
    let pki = Pki::generate("sbtest-etcd-ca");
    let etcd = Etcd::start_tls(&pki).await;
    etcd_auth_setup(&etcd, &pki);
    let uri = format!("etcds://127.0.0.1:{}/services", etcd.port);
    let env = etcd_env(&pki);
    let env_ref = env_refs(&env);

    let c = web("sec-etcd", &[]);
    let id = format!("{}:{}:80", hostname(), c.name);
    let reg = registrator(&uri, &[], &env_ref);
    let found = poll(WAIT, Duration::from_millis(200), || async {
        etcd_keys(&etcd, &pki, "/services/")
            .contains(&id)
            .then_some(())
    })
    .await;
    assert!(
        found.is_some(),
        "{id} not registered in etcd:\n{}",
        reg.output()
    );
    assert!(!reg.output().contains("apppw"), "{}", reg.output());

    // confd renders as the same user, from YAML keys (password) over the environment (user).
    let dir = tempfile::tempdir().unwrap();
    let tpl = dir.path().join("t.hbs");
    write(&tpl, "{{#each service.busybox}}{{id}} {{port}}\n{{/each}}");
    let dest = dir.path().join("out.txt");
    let cfg = dir.path().join("confd.yaml");
    write(
        &cfg,
        &format!(
            "backend: {uri}\ntls:\n  ca_file: {ca}\n  cert_file: {cert}\n  key_file: {key}\n\
             password: apppw\ntemplates:\n  - src: {src}\n    dest: {dest}\n",
            ca = pki.path("ca.pem"),
            cert = pki.path("client.pem"),
            key = pki.path("client.key"),
            src = tpl.display(),
            dest = dest.display(),
        ),
    );
    let (ok, out) = run_to_exit(Process::spawn(
        &bin("confd"),
        &["--config", cfg.to_str().unwrap(), "--once"],
        &[("ETCDCTL_USER", "app")],
    ))
    .await;
    assert!(ok, "{out}");
    let text = std::fs::read_to_string(&dest).unwrap();
    assert!(text.contains(&id), "{text}");

    // Bad credentials: refused at start with one line naming the user, never the password.
    let mut bad = env_ref.clone();
    bad.retain(|(k, _)| *k != "ETCDCTL_PASSWORD" && *k != "ETCDCTL_USER");
    bad.push(("ETCDCTL_USER", "app:wrong-password"));
    let (ok, out) = run_to_exit(registrator(
        &uri,
        &["-retry-attempts", "0", "-hostname", "badcreds"],
        &bad,
    ))
    .await;
    assert!(!ok, "{out}");
    let last = out.lines().last().unwrap_or_default();
    assert!(
        last.contains("denied authentication as etcd user \"app\"")
            && last.contains("invalid user ID or password"),
        "{out}"
    );
    assert!(!out.contains("wrong-password"), "{out}");

    // Outside its prefix, the user is denied, naming what was asked.
    let outside = format!("etcds://127.0.0.1:{}/elsewhere", etcd.port);
    let (ok, out) = run_to_exit(registrator(
        &outside,
        &["-retry-attempts", "0", "-hostname", "outside"],
        &env_ref,
    ))
    .await;
    assert!(!ok, "{out}");
    let last = out.lines().last().unwrap_or_default();
    assert!(
        last.contains("denied POST /v3/kv/range") && last.contains("permission denied"),
        "{out}"
    );

    // A wrong CA: verification fails, one line.
    let other = Pki::generate("sbtest-other-ca");
    let mut wrong = env_ref.clone();
    let other_ca = other.path("ca.pem");
    wrong[0] = ("ETCDCTL_CACERT", &other_ca);
    let (ok, out) = run_to_exit(registrator(&uri, &["-retry-attempts", "0"], &wrong)).await;
    assert!(!ok, "{out}");
    assert!(
        out.lines()
            .last()
            .unwrap_or_default()
            .contains("server certificate verification failed"),
        "{out}"
    );

    // None of it removed the registration.
    assert!(etcd_keys(&etcd, &pki, "/services/").contains(&id));
    drop(reg);
}

/// An expired auth token is replaced: the client authenticates again and retries once, so a
/// request after the token's lifetime still succeeds.
#[tokio::test]
async fn etcd_auth_token_is_renewed_when_it_expires() {
    use switchboard::store::{EtcdClient, EtcdUser, Secret, StoreSettings, TlsSettings};
    let pki = Pki::generate("sbtest-renew-ca");
    let etcd = Etcd::start_tls_with(&pki, &["--auth-token-ttl", "1"]).await;
    etcd_auth_setup(&etcd, &pki);
    let settings = StoreSettings {
        tls: TlsSettings {
            ca_file: Some(pki.path("ca.pem").into()),
            cert_file: Some(pki.path("client.pem").into()),
            key_file: Some(pki.path("client.key").into()),
            ..Default::default()
        },
        token: None,
        etcd_user: Some(EtcdUser {
            name: "app".into(),
            password: Secret::new("apppw"),
        }),
    };
    let uri = format!("etcds://127.0.0.1:{}/services", etcd.port);
    let endpoints = match switchboard::RegistryUri::parse(&uri).unwrap() {
        switchboard::RegistryUri::Etcd { endpoints, .. } => endpoints,
        other => panic!("{other:?}"),
    };
    let client = EtcdClient::with_settings(endpoints, &settings).unwrap();
    client.put("/services/a/1", b"one", None).await.unwrap();

    // A token taken after the client's: once it is refused as invalid, the client's (older,
    // unused since) has expired too.
    let http = pki.client();
    let auth = |body: Value| {
        let http = http.clone();
        let url = format!("{}/v3/auth/authenticate", etcd.http());
        async move {
            let r = http.post(url).json(&body).send().await.unwrap();
            r.json::<Value>().await.unwrap()
        }
    };
    let probe = auth(json!({"name": "app", "password": "apppw"})).await["token"]
        .as_str()
        .unwrap()
        .to_string();
    let range = format!("{}/v3/kv/range", etcd.http());
    // Each use extends a simple token's life, so the probe waits longer than the lifetime
    // between tries.
    let expired = poll(WAIT, Duration::from_millis(2500), || async {
        let r = http
            .post(&range)
            .header("Authorization", &probe)
            .json(&json!({"key": "L3NlcnZpY2VzLw=="}))
            .send()
            .await
            .ok()?;
        let text = r.text().await.ok()?;
        text.contains("invalid auth token").then_some(())
    })
    .await;
    assert!(expired.is_some(), "the probe token never expired");

    client.put("/services/a/2", b"two", None).await.unwrap();
    let keys = etcd_keys(&etcd, &pki, "/services/");
    assert!(keys.contains("/services/a/2"), "{keys}");
}

/// What the log says, once per removal, when the store refuses it.
fn refusal(id: &str) -> String {
    format!("store refused to deregister {id} ")
}

/// Waits until registrator's `/metrics` at `addr` shows `owed` removals owed and at least
/// `failures` refused attempts in all (so each was tried again), then checks `id`'s refusal
/// was logged once, not once per attempt.
async fn refused_and_retried(reg: &Process, addr: &str, id: &str, owed: f64, failures: f64) {
    let got = poll(WAIT, Duration::from_millis(200), || async {
        let m = scrape(addr).await;
        (m.sum("registrator_deregistrations_owed") == owed
            && m.sum("registrator_deregistration_failures_total") >= failures)
            .then_some(())
    })
    .await;
    assert!(
        got.is_some(),
        "{owed} removals owed, tried {failures} times: {}\n{}",
        scrape(addr).await.text,
        reg.output()
    );
    let out = reg.output();
    assert_eq!(out.matches(&refusal(id)).count(), 1, "{out}");
}

/// Waits until `gone` holds, timing it; panics with registrator's output after `bound`.
async fn removed_within<F, Fut>(reg: &Process, what: &str, bound: Duration, gone: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<()>>,
{
    let start = std::time::Instant::now();
    let done = poll(bound, Duration::from_millis(100), gone).await;
    assert!(
        done.is_some(),
        "{what} still there after {bound:?}:\n{}",
        reg.output()
    );
    start.elapsed()
}

/// Far below the 30 s after which a refused registration is first tried again: a refused
/// removal is urgent (traffic still goes to a container that is gone), and is retried from 1 s.
const REMOVAL_BOUND: Duration = Duration::from_secs(20);

/// A deregistration etcd refuses stays owed: with the role's permission on the prefix revoked,
/// a stopped container's key stays, and the refusal is logged once however often it is tried
/// again; a container started again meanwhile is no longer owed a removal (its registration
/// is). Once the permission is granted again, the stopped container's key goes within seconds.
#[tokio::test]
async fn etcd_a_refused_deregistration_is_retried_until_it_lands() {
    let pki = Pki::generate("sbtest-owed-etcd-ca");
    let etcd = Etcd::start_tls(&pki).await;
    etcd_auth_setup(&etcd, &pki);
    let uri = format!("etcds://127.0.0.1:{}/services", etcd.port);
    let env = etcd_env(&pki);
    let addr = format!("127.0.0.1:{}", free_port());
    let group = unique_name("owed-etcd");
    let gone = web_in(&group, "owed-etcd-gone");
    let back = web_in(&group, "owed-etcd-back");
    let gone_id = format!("{}:{}:80", hostname(), gone.name);
    let back_id = format!("{}:{}:80", hostname(), back.name);
    let filter = format!("sbtest.group={group}");
    let args = ["--metrics-addr", &addr, "--label-filter", &filter];
    let reg = registrator(&uri, &args, &env_refs(&env));
    let keys = || etcd_keys(&etcd, &pki, "/services/");
    wait_for("both registered", WAIT, || async {
        let k = keys();
        (k.contains(&gone_id) && k.contains(&back_id)).then_some(())
    })
    .await;

    let root = ["--user", "root:rootpw", "role"];
    let perm = ["switchboard", "--prefix=true"];
    etcdctl(
        &etcd,
        &pki,
        &[&root[..], &["revoke-permission"], &perm, &["/services/"]].concat(),
    );
    gone.stop(1);
    back.stop(1);
    reg.wait_output(&refusal(&gone_id), WAIT).await;
    refused_and_retried(&reg, &addr, &gone_id, 2.0, 6.0).await;
    let k = keys();
    assert!(k.contains(&gone_id) && k.contains(&back_id), "{k}");

    back.start();
    reg.wait_output(&format!("no longer owes the removal of {back_id} "), WAIT)
        .await;
    wait_for("one removal owed", WAIT, || async {
        (scrape(&addr).await.sum("registrator_deregistrations_owed") == 1.0).then_some(())
    })
    .await;

    etcdctl(
        &etcd,
        &pki,
        &[
            &root[..],
            &["grant-permission"],
            &perm,
            &["readwrite", "/services/"],
        ]
        .concat(),
    );
    let took = removed_within(&reg, &gone_id, REMOVAL_BOUND, || async {
        (!keys().contains(&gone_id)).then_some(())
    })
    .await;
    eprintln!("etcd: removal landed {took:?} after the permission came back");
    assert!(keys().contains(&back_id), "{}", reg.output());
    reg.wait_output(&format!("registered {back_id} "), Duration::from_secs(60))
        .await;
    let m = scrape(&addr).await;
    assert_eq!(m.sum("registrator_deregistrations_owed"), 0.0, "{}", m.text);
    assert_eq!(reg.output().matches(&refusal(&gone_id)).count(), 1);
    drop(reg);
}

/// The same on Consul with ACLs: the token's policy narrowed to read refuses the removal,
/// which stays owed and lands once the policy allows writes again.
#[tokio::test]
async fn consul_a_refused_deregistration_is_retried_until_it_lands() {
    let pki = Pki::generate("sbtest-owed-consul-ca");
    let sc = SecureConsul::start(&pki).await;
    let write = r#"service_prefix "" { policy = "write" }
node_prefix "" { policy = "read" }"#;
    let token = sc.token("registrator", write).await;
    let addr = format!("127.0.0.1:{}", free_port());
    let group = unique_name("owed-consul");
    let c = web_in(&group, "owed-consul");
    let id = format!("{}:{}:80", hostname(), c.name);
    let env = consul_env(&pki, &token);
    let filter = format!("sbtest.group={group}");
    let args = ["--metrics-addr", &addr, "--label-filter", &filter];
    let reg = registrator(&sc.uri(), &args, &env_refs(&env));
    wait_for(&format!("{id} registered"), WAIT, || async {
        sc.service_ids().await.contains(&id).then_some(())
    })
    .await;

    sc.set_rules(
        "registrator",
        r#"service_prefix "" { policy = "read" }
node_prefix "" { policy = "read" }"#,
    )
    .await;
    c.stop(1);
    reg.wait_output(&refusal(&id), WAIT).await;
    refused_and_retried(&reg, &addr, &id, 1.0, 3.0).await;
    assert!(sc.service_ids().await.contains(&id));

    sc.set_rules("registrator", write).await;
    let took = removed_within(&reg, &id, REMOVAL_BOUND, || async {
        (!sc.service_ids().await.contains(&id)).then_some(())
    })
    .await;
    eprintln!("consul: removal landed {took:?} after the policy came back");
    reg.wait_output(&format!("deregistered {id} "), WAIT).await;
    let out = reg.output();
    let landed = out
        .lines()
        .find(|l| l.contains(&format!("deregistered {id} ")));
    assert!(
        landed.is_some_and(|l| l.contains("(owed: the store had refused it")),
        "{out}"
    );
    assert_eq!(out.matches(&refusal(&id)).count(), 1, "{out}");
    assert!(!reg.output().contains(&token), "{}", reg.output());
    drop(reg);
}

/// Waits up to `within` until `<dir>/out.txt` satisfies `pred`; panics with the file and
/// confd's output otherwise.
async fn wait_rendered(
    confd: &Process,
    dir: &Path,
    what: &str,
    within: Duration,
    pred: impl Fn(&str) -> bool,
) -> String {
    let path = dir.join("out.txt");
    let found = poll(within, Duration::from_millis(100), || async {
        let text = std::fs::read_to_string(&path).ok()?;
        pred(&text).then_some(text)
    })
    .await;
    found.unwrap_or_else(|| {
        panic!(
            "{what}: not rendered within {within:?}; out.txt:\n{}\nconfd output:\n{}",
            std::fs::read_to_string(&path).unwrap_or_default(),
            confd.output()
        )
    })
}

const READ_ALL: &str = r#"service_prefix "" { policy = "read" }
node_prefix "" { policy = "read" }"#;

/// confd's `poll_wait` in the ACL test: a restored policy must show within it.
const ACL_POLL_WAIT: Duration = Duration::from_secs(6);
/// What a loaded machine adds to a bound (a render, a poll of the file).
const SLACK: Duration = Duration::from_secs(3);

/// confd's token loses `service:read` on `db`: Consul 1.8 then leaves db out of the catalog
/// and answers its health with `[]`, at unchanged indexes, with no header. confd warns once,
/// keeps db's last answer and renders every other change meanwhile; once the policy is
/// restored, db and a service registered while it was narrowed are rendered within
/// `poll_wait` (the catalog's blocking index does not move on an ACL change: without a re-read
/// they would stay out until their own health changed).
#[tokio::test]
async fn services_hidden_by_a_narrowed_acl_policy_are_kept_and_come_back() {
    let pki = Pki::generate("sbtest-ca");
    let sc = SecureConsul::start(&pki).await;
    let token = sc.token("confd-reader", READ_ALL).await;
    sc.register("web-1", "web", 8001).await;
    sc.register("db-1", "db", 8002).await;
    let dir = tempfile::tempdir().unwrap();
    let confd = sc.confd(&pki, dir.path(), &token, "poll_wait: 6s\n");
    wait_rendered(&confd, dir.path(), "web and db", WAIT, |t| {
        t.contains("[db] db-1") && t.contains("[web] web-1")
    })
    .await;

    sc.wait_settled("db").await;
    sc.wait_settled("web").await;
    sc.set_rules(
        "confd-reader",
        r#"service "web" { policy = "read" }
node_prefix "" { policy = "read" }"#,
    )
    .await;
    confd
        .wait_output(
            "service \"db\": the catalog no longer lists it",
            ACL_POLL_WAIT + SLACK,
        )
        .await;
    assert!(
        confd
            .output()
            .contains("confd's ACL token may not read it now"),
        "{}",
        confd.output()
    );
    // Other services go on; db keeps its last answer; a new service is not visible.
    sc.register("web-2", "web", 8003).await;
    sc.register("cache-1", "cache", 8004).await;
    let text = wait_rendered(&confd, dir.path(), "web-2", WAIT, |t| {
        t.contains("[web] web-1 web-2")
    })
    .await;
    assert!(
        text.contains("[db] db-1"),
        "db's last answer is kept:\n{text}"
    );
    assert!(!text.contains("cache"), "{text}");

    sc.set_rules("confd-reader", READ_ALL).await;
    let restored = Instant::now();
    wait_rendered(
        &confd,
        dir.path(),
        "the restored policy",
        ACL_POLL_WAIT + SLACK,
        |t| t.contains("[cache] cache-1") && t.contains("[db] db-1"),
    )
    .await;
    eprintln!(
        "rendered {:?} after the policy was restored (poll_wait {ACL_POLL_WAIT:?})",
        restored.elapsed()
    );
    confd
        .wait_output("Consul's catalog lists service \"db\" again", WAIT)
        .await;
    let warnings = confd.output().matches("may not read it now").count();
    assert_eq!(warnings, 1, "one warning for db:\n{}", confd.output());
}

/// `/healthz` and the log name the store's failure as it is now: Consul stopped (connection
/// refused), then back with a certificate from another CA (a TLS failure, named as one),
/// never the first error of the outage.
#[tokio::test]
async fn health_and_log_name_the_latest_store_failure() {
    let pki = Pki::generate("sbtest-ca");
    let mut sc = SecureConsul::start(&pki).await;
    let token = sc.token("confd-reader", READ_ALL).await;
    sc.register("web-1", "web", 8001).await;
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let confd = sc.confd(
        &pki,
        dir.path(),
        &token,
        &format!("poll_wait: 5s\nmetrics_addr: {addr}\n"),
    );
    wait_rendered(&confd, dir.path(), "web", WAIT, |t| t.contains("web-1")).await;
    wait_health(&confd, &addr, 200, WAIT).await;

    // Stopped: connections are refused.
    sc.consul.stop();
    let body = wait_health_body(&confd, &addr, "Connection refused").await;
    assert!(body.contains("unreachable"), "{body}");
    let refused_logged = log_lines(&confd, "Connection refused");
    assert!(refused_logged > 0, "{}", confd.output());

    // Back with a server certificate from another CA: a TLS failure, named.
    let other = Pki::generate("sbtest-other-ca");
    for f in ["server.pem", "server.key"] {
        std::fs::copy(other.path(f), pki.path(f)).unwrap();
    }
    sc.consul.restart().await;
    let body = wait_health_body(&confd, &addr, "TLS failed").await;
    assert!(
        body.contains("server certificate verification failed"),
        "{body}"
    );
    assert!(!body.contains("Connection refused"), "{body}");
    wait_for("the TLS failure in confd's log", WAIT, || async {
        (log_lines(&confd, "TLS failed") > 0).then_some(())
    })
    .await;
    // Logged when the cause changed, not at every retry.
    let lines = log_lines(&confd, "TLS failed");
    assert!(lines <= 3, "{lines} lines:\n{}", confd.output());
}

/// Waits until `/healthz` answers 503 with `needle` in its body; returns the body.
async fn wait_health_body(confd: &Process, addr: &str, needle: &str) -> String {
    let last = std::sync::Mutex::new(None);
    let found = poll(WAIT, Duration::from_millis(200), || async {
        let h = healthz(addr).await;
        *last.lock().unwrap() = h.clone();
        let (status, body) = h?;
        (status == 503 && body.contains(needle)).then_some(body)
    })
    .await;
    found.unwrap_or_else(|| {
        panic!(
            "/healthz never named {needle:?}; last: {:?}\nconfd output:\n{}",
            last.lock().unwrap(),
            confd.output()
        )
    })
}

/// confd's warnings about a failed Consul query that contain `needle`.
fn log_lines(confd: &Process, needle: &str) -> usize {
    confd
        .output()
        .lines()
        .filter(|l| l.contains("Consul query failed") && l.contains(needle))
        .count()
}

/// The virtual host of the ACME tests.
const ACME_HOST: &str = "app.example.test";

/// The `acme:` section (YAML lines) of a confd answering challenges for `pebble` on `port`.
fn acme_section(pebble: &Pebble, port: u16) -> String {
    format!(
        "acme:\n  directory: {}\n  ca_file: {}\n  challenge_addr: 127.0.0.1:{port}\n",
        pebble.directory(),
        pebble.ca_file().display()
    )
}

/// A shipped stack script, from the checkout.
fn stack_script(name: &str) -> String {
    std::fs::read_to_string(workspace_root().join("compose/secure").join(name)).unwrap()
}

/// confd with the token the secured Consul stack gives it (the rules of
/// `compose/secure/consul-acl-init.sh`, as shipped) takes the ACME lock and stores a
/// certificate.
#[tokio::test]
async fn consul_stack_token_lets_confd_keep_acme_state() {
    let script = stack_script("consul-acl-init.sh");
    let rules = script
        .lines()
        .find_map(|l| l.strip_prefix("policy confd '"))
        .and_then(|l| l.strip_suffix('\''))
        .expect("a `policy confd '...'` line in consul-acl-init.sh");
    let pki = Pki::generate("sbtest-acme-ca");
    let sc = SecureConsul::start(&pki).await;
    let token = sc.token("confd", rules).await;
    sc.api(
        "PUT",
        "/v1/agent/service/register",
        json!({ "ID": "web-acme", "Name": "web", "Address": "127.0.0.1", "Port": 8080,
                "Meta": { "vhost": ACME_HOST } }),
    )
    .await;
    let challenge = free_port();
    let pebble = Pebble::start(challenge).await;
    let dir = tempfile::tempdir().unwrap();
    let confd = sc.confd(&pki, dir.path(), &token, &acme_section(&pebble, challenge));
    let http = reqwest::Client::new();
    let url = format!(
        "{}/v1/kv/switchboard/acme/certs/{ACME_HOST}?raw",
        sc.consul.http()
    );
    let found = poll(
        Duration::from_secs(60),
        Duration::from_millis(200),
        || async {
            let r = http
                .get(&url)
                .header("X-Consul-Token", &sc.management)
                .send()
                .await
                .ok()?;
            r.status().is_success().then_some(())
        },
    )
    .await;
    let log = confd.output();
    assert!(found.is_some(), "no certificate stored:\n{log}");
    assert!(log.contains("acme: took the lock"), "{log}");
    assert!(!log.contains("denied"), "{log}");
    assert!(!log.contains(&token), "{log}");
}

/// confd as the user the secured etcd stack gives it (the grants of
/// `compose/secure/etcd-auth-init.sh`, as shipped) takes the ACME lock and stores a
/// certificate.
#[tokio::test]
async fn etcd_stack_user_lets_confd_keep_acme_state() {
    let script = stack_script("etcd-auth-init.sh");
    let mut grants: Vec<Vec<String>> = script
        .lines()
        .filter_map(|l| l.split_once("role grant-permission confd "))
        .map(|(_, rest)| {
            rest.split_whitespace()
                .take_while(|w| !w.starts_with('>'))
                .map(String::from)
                .collect()
        })
        .collect();
    grants.sort();
    grants.dedup();
    assert!(!grants.is_empty(), "no confd grants in etcd-auth-init.sh");
    let pki = Pki::generate("sbtest-acme-etcd-ca");
    let etcd = Etcd::start_tls(&pki).await;
    etcdctl(
        &etcd,
        &pki,
        &["user", "add", "root:rootpw", "--interactive=false"],
    );
    etcdctl(&etcd, &pki, &["role", "add", "confd"]);
    for g in &grants {
        let mut args = vec!["role", "grant-permission", "confd"];
        args.extend(g.iter().map(String::as_str));
        etcdctl(&etcd, &pki, &args);
    }
    etcdctl(
        &etcd,
        &pki,
        &["user", "add", "confd:confdpw", "--interactive=false"],
    );
    etcdctl(&etcd, &pki, &["user", "grant-role", "confd", "confd"]);
    etcdctl(&etcd, &pki, &["auth", "enable"]);
    let uri = format!("etcds://127.0.0.1:{}/services", etcd.port);
    let root = switchboard::store::StoreSettings {
        tls: switchboard::store::TlsSettings {
            ca_file: Some(pki.path("ca.pem").into()),
            cert_file: Some(pki.path("client.pem").into()),
            key_file: Some(pki.path("client.key").into()),
            ..Default::default()
        },
        token: None,
        etcd_user: Some(switchboard::store::EtcdUser {
            name: "root".into(),
            password: switchboard::store::Secret::new("rootpw"),
        }),
    };
    switchboard::Store::with_settings(&switchboard::RegistryUri::parse(&uri).unwrap(), &root)
        .unwrap()
        .register(&switchboard::Service {
            id: "h:web-acme:80".into(),
            name: "web".into(),
            address: "127.0.0.1".into(),
            port: 8080,
            tags: vec![],
            meta: [("vhost".to_string(), ACME_HOST.to_string())].into(),
            check: None,
            ttl: None,
            docker_health: None,
        })
        .await
        .unwrap();
    let challenge = free_port();
    let pebble = Pebble::start(challenge).await;
    let dir = tempfile::tempdir().unwrap();
    let tpl = dir.path().join("t.hbs");
    write(&tpl, "{{#each services}}{{name}}\n{{/each}}");
    let cfg = dir.path().join("confd.yaml");
    write(
        &cfg,
        &format!(
            "backend: {uri}\ntls:\n  ca_file: {ca}\n  cert_file: {cert}\n  key_file: {key}\n\
             password: confdpw\ntemplates:\n  - src: {src}\n    dest: {dest}\n{acme}",
            ca = pki.path("ca.pem"),
            cert = pki.path("client.pem"),
            key = pki.path("client.key"),
            src = tpl.display(),
            dest = dir.path().join("out.txt").display(),
            acme = acme_section(&pebble, challenge),
        ),
    );
    let confd = Process::spawn(
        &bin("confd"),
        &["--config", cfg.to_str().unwrap()],
        &[("ETCDCTL_USER", "confd"), ("RUST_LOG", "info")],
    );
    let key = format!("switchboard/acme/certs/{ACME_HOST}");
    let found = poll(
        Duration::from_secs(60),
        Duration::from_millis(500),
        || async {
            etcd_keys(&etcd, &pki, "switchboard/acme/")
                .contains(&key)
                .then_some(())
        },
    )
    .await;
    let log = confd.output();
    assert!(found.is_some(), "no certificate stored:\n{log}");
    assert!(log.contains("acme: took the lock"), "{log}");
    assert!(!log.contains("denied"), "{log}");
    assert!(!log.contains("confdpw"), "{log}");
}
