//! One odd container, one refused item or one store restart must never stall
//! everyone else. Real Docker, Consul and etcd, the real `registrator` and `confd` binaries.
//!
//! The hostile containers come first; a normal container started after them must be
//! registered and rendered within seconds ([`SOON`]), while each hostile one is refused with
//! one short warning and nothing escapes the stores' key layouts. The failures these guard
//! against: a `.` name freezing confd for every service, a 2 MB tag label holding the
//! registrator for 51 s, a Consul agent restart leaving confd blind for a full `poll_wait`,
//! one bad instance freezing every template, a SIGHUP burst exhausting Consul's connections.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use switchboard::{RegistryUri, Service, Store};
use switchboard_tests::registrator::registrator;
use switchboard_tests::*;

/// Bound for setup waits (a store starting, a first render).
const WAIT: Duration = Duration::from_secs(30);
/// How soon a normal container must be registered and rendered after its start, or a change
/// must reach the rendered file after a store restart. The bugs took 30 to 67 s; a healthy
/// pipeline takes well under a second, so this leaves room for a loaded 2-core machine.
const SOON: Duration = Duration::from_secs(12);
/// Longest line the daemons may print: a hostile value is quoted shortened.
const MAX_LINE: usize = 2048;

/// The template every test renders: one line per service, `[name] id=port ...`.
const TEMPLATE: &str =
    "{{#each services}}[{{name}}]{{#each instances}} {{id}}={{port}}{{/each}}\n{{/each}}";

/// confd rendering [`TEMPLATE`] from `backend` into `<dir>/out.txt`, with no quiescence
/// window and the given `poll_wait`.
fn confd(dir: &Path, backend: &str, poll_wait: &str) -> Process {
    let src = dir.join("services.hbs");
    std::fs::write(&src, TEMPLATE).unwrap();
    let cfg = format!(
        "backend: {backend}\nwait: {{ min: 0s, max: 0s }}\npoll_wait: {poll_wait}\n\
         templates:\n  - src: {}\n    dest: {}\n",
        src.display(),
        dir.join("out.txt").display()
    );
    let cfg_path = dir.join("confd.yaml");
    std::fs::write(&cfg_path, cfg).unwrap();
    Process::spawn(
        &bin("confd"),
        &["--config", cfg_path.to_str().unwrap()],
        &[("RUST_LOG", "info")],
    )
}

fn out_path(dir: &Path) -> PathBuf {
    dir.join("out.txt")
}

/// Waits up to `within` until the rendered file satisfies `pred`; panics with the file and
/// confd's output otherwise.
async fn wait_rendered(
    confd: &Process,
    dir: &Path,
    what: &str,
    within: Duration,
    pred: impl Fn(&str) -> bool,
) -> String {
    let path = out_path(dir);
    let found = poll(within, Duration::from_millis(100), || async {
        let text = std::fs::read_to_string(&path).ok()?;
        pred(&text).then_some(text)
    })
    .await;
    match found {
        Some(text) => text,
        None => panic!(
            "{what}: not rendered within {within:?}; {}:\n{}\nconfd output:\n{}",
            path.display(),
            std::fs::read_to_string(&path).unwrap_or_default(),
            confd.output()
        ),
    }
}

/// A container with port 80 published and nothing listening: enough to be registered.
fn idle(tag: &str, opts: &[&str]) -> Container {
    let mut args = vec!["-p", "80"];
    args.extend_from_slice(opts);
    args.extend_from_slice(&[TEST_IMAGE, "sleep", "600"]);
    Container::run(tag, &args)
}

/// `<hostname>:<container>:80`, the default ID.
fn id_of(c: &Container) -> String {
    format!("{}:{}:80", hostname(), c.name)
}

/// `POST <path>` with a JSON body (none for `Value::Null`) to the Docker engine's API
/// socket; the status code.
///
/// For what the docker CLI cannot send: a label of megabytes is neither a command-line
/// argument (Linux caps one at 128 KiB) nor a `--label-file` line (the CLI reads those with a
/// 64 KiB line limit), but the API takes it, so a hostile user can create one.
async fn docker_api_post(path: &str, body: &Value) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = match body {
        Value::Null => Vec::new(),
        v => serde_json::to_vec(v).unwrap(),
    };
    let mut sock = tokio::net::UnixStream::connect("/var/run/docker.sock")
        .await
        .unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: docker\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    sock.write_all(head.as_bytes()).await.unwrap();
    sock.write_all(&body).await.unwrap();
    // The status line is all that is needed; the engine may reset the connection after it.
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    while !reply.windows(2).any(|w| w == b"\r\n") {
        match sock.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => reply.extend_from_slice(&buf[..n]),
        }
    }
    let reply = String::from_utf8_lossy(&reply);
    let status = reply.split(' ').nth(1).and_then(|s| s.parse().ok());
    status.unwrap_or_else(|| panic!("docker answered {reply:?}"))
}

/// An idle container like [`idle`], with `labels`, created through the API (see
/// [`docker_api_post`]).
async fn idle_via_api(tag: &str, labels: &[(&str, &str)]) -> Container {
    ensure_test_image();
    let name = unique_name(tag);
    let mut all: serde_json::Map<String, Value> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), Value::from(*v)))
        .collect();
    let (k, v) = TEST_LABEL.split_once('=').unwrap();
    all.insert(k.into(), v.into());
    let spec = serde_json::json!({
        "Image": TEST_IMAGE,
        "Cmd": ["sleep", "600"],
        "Labels": all,
        "ExposedPorts": {"80/tcp": {}},
        "HostConfig": {"PortBindings": {"80/tcp": [{"HostIp": "", "HostPort": ""}]}},
    });
    let created = docker_api_post(&format!("/containers/create?name={name}"), &spec).await;
    // Removed on drop from here on, whatever happens next (the API takes names as IDs).
    let c = Container {
        id: name.clone(),
        name,
    };
    assert_eq!(created, 201, "creating {}", c.name);
    let started = docker_api_post(&format!("/containers/{}/start", c.name), &Value::Null).await;
    assert_eq!(started, 204, "starting {}", c.name);
    c
}

/// The hostile containers, each waited for until the registrator has warned
/// about it (so the normal container is surely started after they were handled).
struct Hostile {
    dot_name: Container,
    dotdot_name: Container,
    dotdot_id: Container,
    huge_tags: Container,
}

impl Hostile {
    async fn start(reg: &Process) -> Hostile {
        // 200,000 tags, 1,488,889 bytes.
        let tags: Vec<String> = (0..200_000).map(|i| format!("t{i}")).collect();
        let h = Hostile {
            dot_name: idle("iso-dot", &["-l", "SERVICE_NAME=."]),
            dotdot_name: idle("iso-dotdot", &["-l", "SERVICE_NAME=.."]),
            dotdot_id: idle("iso-dotdot-id", &["-l", "SERVICE_ID=.."]),
            huge_tags: idle_via_api("iso-tags", &[("SERVICE_TAGS", &tags.join(","))]).await,
        };
        for (c, warning) in [
            (&h.dot_name, r#"ignoring SERVICE_NAME=".""#),
            (&h.dotdot_name, r#"ignoring SERVICE_NAME="..""#),
            (&h.dotdot_id, r#"ignoring SERVICE_ID="..""#),
            (&h.huge_tags, "ignoring SERVICE_TAGS="),
        ] {
            let line = format!("container {}: {warning}", c.name);
            reg.wait_output(&line, WAIT).await;
        }
        h
    }

    /// The IDs the hostile containers would have had.
    fn ids(&self) -> Vec<String> {
        [&self.dot_name, &self.dotdot_name, &self.dotdot_id]
            .into_iter()
            .map(id_of)
            .chain(["..".to_string()])
            .collect()
    }
}

/// Every line of `output` is short, and the 2 MB value was quoted with its length.
fn assert_short_lines(who: &str, output: &str) {
    for line in output.lines() {
        assert!(
            line.len() <= MAX_LINE,
            "{who} printed a {} byte line: {}…",
            line.len(),
            &line[..200]
        );
    }
}

/// Runs `docker run` for the normal container and returns it with its start instant.
fn start_normal(name: &str) -> (Container, Instant) {
    let started = Instant::now();
    let c = idle("iso-normal", &["-l", &format!("SERVICE_NAME={name}")]);
    (c, started)
}

/// Every key in Consul KV (none yet: empty).
async fn consul_kv_keys(consul: &Consul) -> Vec<String> {
    let r = reqwest::get(format!("{}/v1/kv/?keys", consul.http()))
        .await
        .unwrap();
    r.json::<Vec<String>>().await.unwrap_or_default()
}

/// PUT a registration straight to the agent, bypassing registrator's validation: what an old
/// registrator (or any other tool) may have left in Consul.
async fn consul_register_raw(consul: &Consul, body: Value) {
    let r = reqwest::Client::new()
        .put(format!("{}/v1/agent/service/register", consul.http()))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{body}: {:?}", r.text().await);
}

#[tokio::test]
async fn consul_hostile_names_stall_neither_registrator_nor_confd() {
    let consul = Consul::start().await;
    // What confd must never be stalled by, whoever wrote it: Consul answers 400 to a health
    // query for `.`, and a 1.2 MB name made every query about it fail.
    let huge = "n".repeat(1_200_000);
    for (id, name) in [("raw-dot", "."), ("..", "raw"), ("raw-huge", huge.as_str())] {
        let body = serde_json::json!({"ID": id, "Name": name, "Address": "127.0.0.1", "Port": 9});
        consul_register_raw(&consul, body).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let confd = confd(dir.path(), &consul.uri(), "60s");
    let reg = registrator(&consul.uri(), &[], &[("RUST_LOG", "info")]);
    let reg_kv = registrator(
        &format!("consulkv://127.0.0.1:{}/svc/reg", consul.port),
        &[],
        &[("RUST_LOG", "info")],
    );
    let hostile = Hostile::start(&reg).await;
    for c in [&hostile.dot_name, &hostile.dotdot_name, &hostile.dotdot_id] {
        reg_kv
            .wait_output(&format!("container {}: ignoring", c.name), WAIT)
            .await;
    }

    let (normal, started) = start_normal("iso-normal-consul");
    let id = id_of(&normal);
    let port = normal.host_port("80/tcp");
    let services = wait_for(&format!("{id} in Consul"), SOON, || async {
        let all = consul.get_json("/v1/agent/services").await;
        all.get(&id).is_some().then_some(all)
    })
    .await;
    let registered = started.elapsed();
    let rendered = wait_rendered(&confd, dir.path(), "the normal container", SOON, |t| {
        t.contains(&format!("[iso-normal-consul] {id}={port}"))
    })
    .await;
    let rendered_after = started.elapsed();
    eprintln!(
        "normal container: registered after {registered:?}, rendered after {rendered_after:?}"
    );
    assert!(rendered_after < SOON, "{rendered_after:?}");

    // The hostile containers: refused, nothing registered under their names or IDs; the
    // huge tag list dropped but its container registered (without it).
    for hid in hostile.ids() {
        let s = services.get(&hid);
        assert!(
            s.is_none() || s.unwrap()["Service"] == "raw",
            "{hid} registered: {s:?}"
        );
    }
    let tags_svc = &services[&id_of(&hostile.huge_tags)];
    assert_eq!(tags_svc["Tags"], serde_json::json!([]), "{tags_svc}");
    // The raw `.` and huge services are left out of the render, the rest goes on.
    assert!(!rendered.contains("[.]"), "{rendered}");
    assert!(rendered.len() < 10_000, "the huge name was rendered");
    assert!(!rendered.contains(" ..="), "{rendered}");
    // Each refused once in confd's log, however many times Consul repeats them.
    let out = confd.output();
    assert_eq!(out.matches(r#"leaving service ".""#).count(), 1, "{out}");
    assert_eq!(out.matches("leaving service \"nnnn").count(), 1, "{out}");
    assert_eq!(
        out.matches(r#"leaving instance ".. of service raw""#)
            .count(),
        1
    );
    for (who, p) in [("registrator", &reg), ("registrator (consulkv)", &reg_kv)] {
        let o = p.output();
        assert_short_lines(who, &o);
        assert!(o.contains("(1488889 bytes)"), "{who}: {o}");
    }
    assert_short_lines("confd", &out);

    // consulkv: every key stays at `svc/reg/<name>/<id>`.
    let kv_id = id.clone();
    let keys = wait_for("the normal container in Consul KV", SOON, || async {
        let keys = consul_kv_keys(&consul).await;
        keys.iter().any(|k| k.ends_with(&kv_id)).then_some(keys)
    })
    .await;
    for k in &keys {
        let rest = k
            .strip_prefix("svc/reg/")
            .unwrap_or_else(|| panic!("{k} escaped"));
        let parts: Vec<&str> = rest.split('/').collect();
        assert_eq!(parts.len(), 2, "{k}");
        assert!(
            parts
                .iter()
                .all(|p| !p.is_empty() && *p != "." && *p != ".."),
            "{k}"
        );
    }
}

#[tokio::test]
async fn etcd_hostile_names_stay_inside_the_prefix_and_stall_nothing() {
    let etcd = Etcd::start().await;
    // A key an old registrator left: `..` as a name inside the prefix.
    let old = Service {
        id: "old".into(),
        name: "..".into(),
        address: "127.0.0.1".into(),
        port: 9,
        tags: vec![],
        meta: Default::default(),
        check: None,
        ttl: None,
        docker_health: None,
    };
    let store = Store::new(&RegistryUri::parse(&etcd.uri("svc/reg")).unwrap());
    assert!(
        matches!(
            store.register(&old).await,
            Err(switchboard::StoreError::Invalid(_))
        ),
        "the store client refuses it"
    );
    put_raw(
        &etcd,
        "/svc/reg/../old",
        &serde_json::to_string(&serde_json::json!({
            "id": "old", "name": "..", "address": "127.0.0.1", "port": 9
        }))
        .unwrap(),
    )
    .await;

    let dir = tempfile::tempdir().unwrap();
    let confd = confd(dir.path(), &etcd.uri("svc/reg"), "60s");
    let reg = registrator(&etcd.uri("svc/reg"), &[], &[("RUST_LOG", "info")]);
    let hostile = Hostile::start(&reg).await;

    let (normal, started) = start_normal("iso-normal-etcd");
    let id = id_of(&normal);
    let port = normal.host_port("80/tcp");
    wait_for(&format!("{id} in etcd"), SOON, || async {
        let kvs = etcd.get_prefix("/svc/reg/").await;
        kvs.iter().any(|(k, _)| k.ends_with(&id)).then_some(())
    })
    .await;
    let registered = started.elapsed();
    wait_rendered(&confd, dir.path(), "the normal container", SOON, |t| {
        t.contains(&format!("[iso-normal-etcd] {id}={port}"))
    })
    .await;
    let rendered_after = started.elapsed();
    eprintln!(
        "normal container: registered after {registered:?}, rendered after {rendered_after:?}"
    );
    assert!(rendered_after < SOON, "{rendered_after:?}");

    // Every key the registrator wrote is `/svc/reg/<name>/<id>`; only the planted one is odd.
    let all = etcd.get_prefix("/").await;
    let hostile_ids = hostile.ids();
    for (k, v) in &all {
        if k == "/svc/reg/../old" {
            continue;
        }
        let rest = k
            .strip_prefix("/svc/reg/")
            .unwrap_or_else(|| panic!("{k} escaped"));
        let parts: Vec<&str> = rest.split('/').collect();
        assert_eq!(parts.len(), 2, "{k}");
        assert!(parts.iter().all(|p| *p != "." && *p != ".."), "{k}");
        assert!(!hostile_ids.iter().any(|h| h == parts[1]), "{k} registered");
        if parts[1] == id_of(&hostile.huge_tags) {
            let v: Value = serde_json::from_str(v).unwrap();
            assert_eq!(v["tags"], serde_json::json!([]), "{v}");
        }
    }
    let rendered = std::fs::read_to_string(out_path(dir.path())).unwrap();
    assert!(!rendered.contains("[..]"), "{rendered}");
    let out = confd.output();
    assert_eq!(
        out.matches(r#"leaving instance "old of service ..""#)
            .count(),
        1,
        "{out}"
    );
    assert_short_lines("registrator", &reg.output());
    assert_short_lines("confd", &out);
}

/// Writes a key straight through etcd's JSON gateway, bypassing every client check.
async fn put_raw(etcd: &Etcd, key: &str, value: &str) {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let body = serde_json::json!({"key": b64.encode(key), "value": b64.encode(value)});
    let r = reqwest::Client::new()
        .post(format!("{}/v3/kv/put", etcd.http()))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
}

/// `X-Consul-Index` of a health query for `name`.
async fn health_index(consul: &Consul, name: &str) -> u64 {
    let r = reqwest::get(format!("{}/v1/health/service/{name}", consul.http()))
        .await
        .unwrap();
    r.headers()["X-Consul-Index"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

fn web(id: &str, port: u16, version: usize) -> Service {
    Service {
        id: id.into(),
        name: "web".into(),
        address: "127.0.0.1".into(),
        port,
        tags: vec![format!("v{version}")],
        meta: Default::default(),
        check: None,
        ttl: None,
        docker_health: None,
    }
}

/// confd with `poll_wait: 60s` sees changes made right after a Consul agent restart: the
/// restarted agent's index is lower than the one confd held, and a blocking query from the
/// old index would wait the full 60 s.
#[tokio::test]
async fn confd_sees_changes_soon_after_a_consul_agent_restart() {
    let mut consul = Consul::start().await;
    let store = Store::new(&RegistryUri::parse(&consul.uri()).unwrap());
    // Push the service's index well above where a fresh agent starts.
    for v in 0..40 {
        store.register(&web("web-a", 8001, v)).await.unwrap();
    }
    wait_for("the last update in the catalog", WAIT, || async {
        let v = consul.get_json("/v1/health/service/web").await;
        (v[0]["Service"]["Tags"][0] == "v39").then_some(())
    })
    .await;
    let old_index = health_index(&consul, "web").await;

    let dir = tempfile::tempdir().unwrap();
    let confd = confd(dir.path(), &consul.uri(), "60s");
    wait_rendered(&confd, dir.path(), "web-a", WAIT, |t| {
        t.contains("web-a=8001")
    })
    .await;

    consul.restart().await;
    let started = Instant::now();
    store.register(&web("web-a", 8001, 0)).await.unwrap();
    store.register(&web("web-b", 8002, 0)).await.unwrap();
    let mut api = web("api-1", 8003, 0);
    api.name = "api".into();
    store.register(&api).await.unwrap();
    let new_index = health_index(&consul, "web").await;
    assert!(
        new_index < old_index,
        "the restarted agent's index ({new_index}) must be below the old one ({old_index}), \
         or this test proves nothing"
    );
    // A new instance of a followed service (its per-service poller) and a new service (the
    // catalog poller) both show up soon.
    wait_rendered(&confd, dir.path(), "changes after the restart", SOON, |t| {
        t.contains("web-b=8002") && t.contains("[api] api-1=8003")
    })
    .await;
    eprintln!("rendered {:?} after the restart", started.elapsed());
}

/// Services registered with the agent, by ID.
/// Item 2: one registration the agent refuses with a 5xx (a script check on an agent with
/// script checks off: `500 Scripts are disabled on this agent`) is that item's failure, not an
/// outage: a normal container started after it is registered, and removed, within seconds;
/// the refusal is one warning. Two containers asking for one `SERVICE_ID` get one
/// registration, and the refused one is named in one warning.
#[tokio::test]
async fn a_refused_registration_and_a_duplicate_id_stall_nothing() {
    let consul = Consul::start_with("enable_script_checks = false").await;
    let reg = registrator(&consul.uri(), &[], &[("RUST_LOG", "info")]);
    let scripted = idle(
        "iso-script",
        &[
            "-l",
            "SERVICE_NAME=scripted",
            "-l",
            "SERVICE_CHECK_SCRIPT=true",
        ],
    );
    reg.wait_output("store refused", WAIT).await;
    let dup_id = format!("iso-dup-{}", std::process::id());
    let dup_a = idle("iso-dup", &["-l", &format!("SERVICE_ID={dup_id}")]);
    let dup_b = idle("iso-dup", &["-l", &format!("SERVICE_ID={dup_id}")]);

    let (normal, started) = start_normal("iso-normal-after-refusal");
    let normal_id = id_of(&normal);
    wait_for("the normal container registered", SOON, || async {
        consul
            .agent_service_ids()
            .await
            .contains(&normal_id)
            .then_some(())
    })
    .await;
    eprintln!(
        "registered {:?} after docker run, with a refused registration pending",
        started.elapsed()
    );
    let ids = consul.agent_service_ids().await;
    assert!(!ids.iter().any(|i| i.contains("iso-script")), "{ids:?}");
    assert_eq!(ids.iter().filter(|i| **i == dup_id).count(), 1, "{ids:?}");

    let t = Instant::now();
    normal.stop(1);
    wait_for("the normal container removed", SOON, || async {
        (!consul.agent_service_ids().await.contains(&normal_id)).then_some(())
    })
    .await;
    eprintln!("removed {:?} after docker stop", t.elapsed());

    let out = reg.output();
    assert_eq!(out.matches("store refused").count(), 1, "{out}");
    assert!(out.contains("Scripts are disabled"), "{out}");
    assert!(!out.contains("store unavailable"), "{out}");
    let dup_lines: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("already registered for container"))
        .collect();
    assert_eq!(dup_lines.len(), 1, "{out}");
    let short = |c: &Container| c.id[..12].to_string();
    assert!(
        dup_lines[0].contains(&short(&dup_a)) && dup_lines[0].contains(&short(&dup_b)),
        "{}",
        dup_lines[0]
    );
    assert_short_lines("registrator", &out);
    drop(scripted);
}

/// A store written to around every client check, as any writer (an operator, another tool,
/// an old registrator) could: where the bad-instance cases plant their entries.
enum Raw<'a> {
    Consul(&'a Consul),
    /// Services under `/svc/`.
    Etcd(&'a Etcd),
}

impl Raw<'_> {
    fn uri(&self) -> String {
        match self {
            Raw::Consul(c) => c.uri(),
            Raw::Etcd(e) => e.uri("svc"),
        }
    }

    /// Registers instance `id` of service `name` at `address` and `port` (any JSON value).
    async fn put(&self, name: &str, id: &str, address: &str, port: Value) {
        match self {
            Raw::Consul(c) => {
                let body =
                    serde_json::json!({"ID": id, "Name": name, "Address": address, "Port": port});
                consul_register_raw(c, body).await;
            }
            Raw::Etcd(e) => {
                let value =
                    serde_json::json!({"id": id, "name": name, "address": address, "port": port});
                put_raw(e, &format!("/svc/{name}/{id}"), &value.to_string()).await;
            }
        }
    }

    /// Removes instance `id` of service `name`.
    async fn delete(&self, name: &str, id: &str) {
        let (url, body) = match self {
            Raw::Consul(c) => (
                format!("{}/v1/agent/service/deregister/{id}", c.http()),
                None,
            ),
            Raw::Etcd(e) => {
                use base64::Engine;
                let key =
                    base64::engine::general_purpose::STANDARD.encode(format!("/svc/{name}/{id}"));
                (
                    format!("{}/v3/kv/deleterange", e.http()),
                    Some(serde_json::json!({ "key": key })),
                )
            }
        };
        let req = match body {
            None => reqwest::Client::new().put(url),
            Some(b) => reqwest::Client::new().post(url).json(&b),
        };
        let r = req.send().await.unwrap();
        assert!(
            r.status().is_success(),
            "deleting {id}: {:?}",
            r.text().await
        );
    }
}

/// confd rendering the SHIPPED nginx and HAProxy templates, each checked by the real proxy
/// (`nginx -t`, `haproxy -c`), with no quiescence window and `/metrics` served.
struct Shipped {
    dir: tempfile::TempDir,
    confd: Process,
    metrics: String,
}

impl Shipped {
    fn start(backend: &str) -> Shipped {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display().to_string();
        let metrics = format!("127.0.0.1:{}", free_port());
        let cfg = format!(
            r#"backend: {backend}
wait: {{ min: 0s, max: 0s }}
poll_wait: 60s
metrics_addr: {metrics}
vars:
  listen: {listen}
  bind_address: 127.0.0.1
  pid: {d}/nginx.pid
  error_log: {d}/error.log
  access_log: {d}/access.log
  temp_dir: {d}
templates:
  - src: {tpl}/nginx.conf.hbs
    dest: {d}/nginx.conf
    check: "nginx -t -q -e {d}/check.log -c {{{{staged}}}}"
  - src: {tpl}/haproxy.cfg.hbs
    dest: {d}/haproxy.cfg
    check: "haproxy -c -q -f {{{{staged}}}}"
"#,
            listen = free_port(),
            tpl = workspace_root().join("templates").display(),
        );
        let cfg_path = dir.path().join("confd.yaml");
        std::fs::write(&cfg_path, cfg).unwrap();
        let confd = Process::spawn(
            &bin("confd"),
            &["--config", cfg_path.to_str().unwrap()],
            &[("RUST_LOG", "info")],
        );
        Shipped {
            dir,
            confd,
            metrics,
        }
    }

    /// Both rendered files (empty before the first render).
    fn files(&self) -> [(&'static str, String); 2] {
        ["nginx.conf", "haproxy.cfg"].map(|f| {
            let text = std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default();
            (f, text)
        })
    }

    /// Waits up to `within` until both rendered files satisfy `pred`; fails at once if either
    /// ever contains one of `never`.
    async fn wait(
        &self,
        what: &str,
        within: Duration,
        never: &[&str],
        pred: impl Fn(&str) -> bool,
    ) {
        let found = poll(within, Duration::from_millis(50), || async {
            let files = self.files();
            for (f, text) in &files {
                for n in never {
                    assert!(
                        !text.contains(n),
                        "{what}: {f} contains {n:?}:\n{text}\nconfd output:\n{}",
                        self.confd.output()
                    );
                }
            }
            files.iter().all(|(_, t)| pred(t)).then_some(())
        })
        .await;
        if found.is_none() {
            let [(_, nginx), (_, haproxy)] = self.files();
            panic!(
                "{what}: not rendered within {within:?}\nnginx.conf:\n{nginx}\nhaproxy.cfg:\n\
                 {haproxy}\nconfd output:\n{}",
                self.confd.output()
            );
        }
    }

    /// `confd_instances_refused_total{reason}` (0 before the first such refusal).
    async fn refused(&self, reason: &str) -> f64 {
        let series = format!("confd_instances_refused_total{{reason=\"{reason}\"}}");
        scrape(&self.metrics)
            .await
            .samples
            .get(&series)
            .copied()
            .unwrap_or(0.0)
    }
}

/// One bad instance planted in a store.
struct BadCase {
    what: &'static str,
    address: &'static str,
    port: Value,
    /// The `reason` label it is counted under.
    reason: &'static str,
}

/// `127.0.0.1:<port>`, as both shipped templates write a good instance's server.
fn server(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

/// The bad-instance cases against one store, with confd rendering the shipped templates: for
/// each case, while its bad entry is present, a good instance of ANOTHER service added after
/// it reaches both files, a good instance of the SAME service added after it appears and a
/// withdrawn one disappears; the bad one is never in either file (both checked by the real
/// proxies), and it is counted under its reason and logged once.
async fn bad_instances_stall_nothing(raw: Raw<'_>, cases: &[BadCase]) {
    raw.put("iso-base", "base-1", "127.0.0.1", 20000.into())
        .await;
    let shipped = Shipped::start(&raw.uri());
    shipped
        .wait("the first render", WAIT, &[], |t| {
            t.contains(&server(20000))
        })
        .await;
    let markers = ["127.0.0.9", "no-such-host", "bad-"];
    for (n, case) in cases.iter().enumerate() {
        let what = case.what;
        let svc = format!("iso-svc{n}");
        let other = format!("iso-other{n}");
        let bad_id = format!("bad-{n}");
        let port = |k: u16| 20100 + 10 * n as u16 + k;
        raw.put(&svc, "good-1", "127.0.0.1", port(1).into()).await;
        shipped
            .wait(&format!("{what}: good-1"), SOON, &markers, |t| {
                t.contains(&server(port(1)))
            })
            .await;

        let before = shipped.refused(case.reason).await;
        raw.put(&svc, &bad_id, case.address, case.port.clone())
            .await;
        let started = Instant::now();
        wait_for(
            &format!("{what}: counted as {}", case.reason),
            SOON,
            || async { (shipped.refused(case.reason).await > before).then_some(()) },
        )
        .await;
        raw.put(&other, "other-1", "127.0.0.1", port(2).into())
            .await;
        shipped
            .wait(&format!("{what}: another service"), SOON, &markers, |t| {
                t.contains(&server(port(2)))
            })
            .await;
        raw.put(&svc, "good-2", "127.0.0.1", port(3).into()).await;
        shipped
            .wait(
                &format!("{what}: same service, added"),
                SOON,
                &markers,
                |t| t.contains(&server(port(3))),
            )
            .await;
        raw.delete(&svc, "good-1").await;
        shipped
            .wait(
                &format!("{what}: same service, withdrawn"),
                SOON,
                &markers,
                |t| !t.contains(&server(port(1))) && t.contains(&server(port(3))),
            )
            .await;
        eprintln!(
            "{what}: added, withdrawn and another service rendered within {:?}",
            started.elapsed()
        );
        assert_eq!(
            shipped.refused(case.reason).await,
            before + 1.0,
            "{what}: counted once"
        );
        let line = format!(r#"leaving instance "{bad_id} of service {svc}""#);
        let out = shipped.confd.output();
        assert_eq!(out.matches(&line).count(), 1, "{what}: logged once\n{out}");
        raw.delete(&svc, &bad_id).await;
    }
}

#[tokio::test]
async fn consul_bad_instances_are_left_out_and_stall_nothing() {
    let consul = Consul::start().await;
    let cases = [
        BadCase {
            what: "port 0",
            address: "127.0.0.9",
            port: 0.into(),
            reason: "port",
        },
        BadCase {
            what: "port 65536",
            address: "127.0.0.9",
            port: 65536.into(),
            reason: "port",
        },
        BadCase {
            what: "port -5",
            address: "127.0.0.9",
            port: (-5).into(),
            reason: "port",
        },
        BadCase {
            what: "unresolvable address",
            address: "no-such-host.invalid",
            port: 8080.into(),
            reason: "unresolvable",
        },
    ];
    bad_instances_stall_nothing(Raw::Consul(&consul), &cases).await;
}

#[tokio::test]
async fn etcd_bad_instances_are_left_out_and_stall_nothing() {
    let etcd = Etcd::start().await;
    let cases = [
        BadCase {
            what: "port 0",
            address: "127.0.0.9",
            port: 0.into(),
            reason: "port",
        },
        BadCase {
            what: "port 65536",
            address: "127.0.0.9",
            port: 65536.into(),
            reason: "port",
        },
        BadCase {
            what: "unresolvable address",
            address: "no-such-host.invalid",
            port: 8080.into(),
            reason: "unresolvable",
        },
        BadCase {
            what: "port as text",
            address: "127.0.0.9",
            port: "80".into(),
            reason: "decode",
        },
    ];
    bad_instances_stall_nothing(Raw::Etcd(&etcd), &cases).await;
}

/// An instance whose name does not resolve comes in, under its name, once it is changed to
/// one that does; a name that stops being used is dropped.
#[tokio::test]
async fn an_unresolvable_instance_comes_in_once_its_name_resolves() {
    let consul = Consul::start().await;
    let raw = Raw::Consul(&consul);
    raw.put("iso-dns", "ip-1", "127.0.0.1", 20001.into()).await;
    raw.put("iso-dns", "named-1", "no-such-host.invalid", 20002.into())
        .await;
    let shipped = Shipped::start(&raw.uri());
    shipped
        .wait("the first render", WAIT, &["no-such-host"], |t| {
            t.contains(&server(20001))
        })
        .await;
    wait_for("counted as unresolvable", SOON, || async {
        (shipped.refused("unresolvable").await >= 1.0).then_some(())
    })
    .await;
    raw.put("iso-dns", "named-1", "localhost", 20002.into())
        .await;
    shipped
        .wait("the name that resolves", SOON, &["no-such-host"], |t| {
            t.contains("localhost:20002") && t.contains(&server(20001))
        })
        .await;
    let out = shipped.confd.output();
    let refusals = out
        .lines()
        .filter(|l| l.contains(r#"leaving instance "named-1 of service iso-dns""#))
        .collect::<Vec<_>>();
    assert_eq!(refusals.len(), 1, "{out}");
    assert!(
        refusals[0].contains(r#"address "no-such-host.invalid" does not resolve"#),
        "{}",
        refusals[0]
    );
}

/// The TCP connections process `pid` holds ESTABLISHED to `127.0.0.1:<port>`: its socket
/// inodes (`/proc/<pid>/fd`) matched against the table of its network namespace
/// (`/proc/<pid>/net/tcp`, which lists every process's sockets).
fn established_to(pid: u32, port: u16) -> usize {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter_map(|l| {
                    let l = l.to_string_lossy().into_owned();
                    Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
                })
                .collect()
        })
        .unwrap_or_default();
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap_or_default();
    let remote = format!("0100007F:{port:04X}");
    table
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f.len() > 9 && f[2] == remote && f[3] == "01" && inodes.contains(f[9]))
        .count()
}

/// One request from a new connection to the agent: whether it answered 200. An agent at its
/// per-client connection limit refuses it, as it would refuse registrator's writes.
async fn consul_accepts(consul: &Consul) -> bool {
    let r = fresh_client()
        .get(format!("{}/v1/status/leader", consul.http()))
        .send()
        .await;
    matches!(r, Ok(r) if r.status().is_success())
}

/// The services confd follows in the SIGHUP test, one long poll each, plus the catalog's.
const SIGHUP_SERVICES: [&str; 3] = ["web", "api", "db"];
/// Connections confd may hold to the agent: its long polls, and as many again at most that its
/// pool keeps idle (one is opened when a poll asks again before its last connection is back in
/// the pool). A leak is one more set of long polls per SIGHUP.
const MAX_CONFD_CONNECTIONS: usize = 2 * (1 + SIGHUP_SERVICES.len());

/// A burst of 100 SIGHUPs in about a second, against an agent that lets one address hold
/// only 20 connections (Consul keeps a blocking query, and its place in that count, until its
/// `wait` ends even when the client has closed it): the burst is one reload, the source and
/// its long polls are kept, no connection is refused during or after it, and confd still
/// renders what changes next. A reload that does change the store settings stops the old
/// source, and closes its connections, before the new one starts. A source restarted per signal
/// would leave its abandoned queries counted until their `wait` ends, and the agent would
/// refuse every new connection from the host meanwhile.
#[tokio::test]
async fn a_sighup_burst_opens_no_connection_to_consul() {
    let consul = Consul::start_with("limits { http_max_conns_per_client = 20 }").await;
    let store = Store::new(&RegistryUri::parse(&consul.uri()).unwrap());
    for (i, name) in SIGHUP_SERVICES.iter().enumerate() {
        let mut s = web(&format!("{name}-1"), 8001 + i as u16, 0);
        s.name = name.to_string();
        store.register(&s).await.unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let confd = confd(dir.path(), &consul.uri(), "30s");
    wait_rendered(&confd, dir.path(), "three services", WAIT, |t| {
        t.contains("api-1=8002") && t.contains("db-1=8003") && t.contains("web-1=8001")
    })
    .await;
    let pid = confd.pid();
    let before = established_to(pid, consul.port);
    assert!(
        (1 + SIGHUP_SERVICES.len()..=MAX_CONFD_CONNECTIONS).contains(&before),
        "{before} connections before the burst"
    );

    // 100 signals paced over about a second; the agent is asked from a new connection after
    // every tenth, and must answer every time.
    let started = Instant::now();
    let mut pace = tokio::time::interval(Duration::from_millis(10));
    for i in 1..=100 {
        pace.tick().await;
        confd.signal(libc::SIGHUP);
        if i % 10 == 0 {
            assert!(
                consul_accepts(&consul).await,
                "the agent refused a connection after {i} SIGHUPs; confd:\n{}",
                confd.output()
            );
        }
    }
    eprintln!("100 SIGHUPs sent in {:?}", started.elapsed());
    confd
        .wait_output("the store source and its long polls are kept", WAIT)
        .await;
    // After the burst, for 3 s: every probe answers and confd holds no more connections
    // than before (the agent would have refused for far longer).
    let mut pace = tokio::time::interval(Duration::from_millis(150));
    for _ in 0..20 {
        pace.tick().await;
        assert!(consul_accepts(&consul).await, "refused after the burst");
        let now = established_to(pid, consul.port);
        assert!(
            now <= MAX_CONFD_CONNECTIONS,
            "{now} connections after the burst"
        );
    }
    let out = confd.output();
    let reloads = out.matches("SIGHUP: configuration re-read").count();
    assert!(
        (1..=3).contains(&reloads),
        "100 SIGHUPs in about a second must be one reload (two or three on a slow machine), \
         not {reloads}:\n{out}"
    );
    assert!(!out.contains("Consul query failed"), "{out}");
    eprintln!("{before} connections before the burst, {reloads} reload(s) for 100 SIGHUPs");
    store.register(&web("web-2", 8004, 0)).await.unwrap();
    wait_rendered(&confd, dir.path(), "web-2 after the burst", SOON, |t| {
        t.contains("web-2=8004")
    })
    .await;

    // A reload that changes how the store is watched restarts the source: the old one's
    // connections are closed on confd's side before the new one's open, so confd's count
    // stays bounded, and the agent still answers.
    let cfg_path = dir.path().join("confd.yaml");
    let cfg = std::fs::read_to_string(&cfg_path).unwrap();
    std::fs::write(&cfg_path, cfg.replace("poll_wait: 30s", "poll_wait: 20s")).unwrap();
    confd.signal(libc::SIGHUP);
    confd
        .wait_output("the store settings changed: restarting the source", WAIT)
        .await;
    store.register(&web("web-3", 8005, 0)).await.unwrap();
    wait_rendered(
        &confd,
        dir.path(),
        "web-3 after the source restarted",
        SOON,
        |t| t.contains("web-3=8005") && t.contains("db-1=8003"),
    )
    .await;
    let now = established_to(pid, consul.port);
    assert!(
        now <= MAX_CONFD_CONNECTIONS,
        "{now} connections once the source restarted"
    );
    assert!(consul_accepts(&consul).await);
    assert!(
        !confd.output().contains("Consul query failed"),
        "{}",
        confd.output()
    );
}

/// confd with several templates, `(file name, source)` rendered into `<dir>/<file name>.out`,
/// with no quiescence window and `extra` YAML at the top level; the command line runs through
/// `wrap` (e.g. `prlimit`), if given.
fn confd_templates(
    dir: &Path,
    backend: &str,
    extra: &str,
    templates: &[(&str, &str)],
    wrap: &[&str],
) -> Process {
    let mut cfg = format!("backend: {backend}\nwait: {{ min: 0s, max: 0s }}\n{extra}templates:\n");
    for (name, body) in templates {
        let src = dir.join(name);
        std::fs::write(&src, body).unwrap();
        cfg += &format!(
            "  - {{ src: {}, dest: {} }}\n",
            src.display(),
            dir.join(format!("{name}.out")).display()
        );
    }
    let cfg_path = dir.join("confd.yaml");
    std::fs::write(&cfg_path, cfg).unwrap();
    let confd = bin("confd");
    let mut argv: Vec<&str> = wrap.to_vec();
    argv.extend([
        confd.to_str().unwrap(),
        "--config",
        cfg_path.to_str().unwrap(),
    ]);
    Process::spawn(Path::new(argv[0]), &argv[1..], &[("RUST_LOG", "info")])
}

/// `/proc/<pid>/stat` of a process: its state letter and the CPU time it used.
fn proc_stat(pid: u32) -> Option<(char, Duration)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat[stat.rfind(')')? + 2..].split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().ok()? + fields[12].parse::<u64>().ok()?;
    // SAFETY: sysconf reads a constant of the system.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Some((
        fields[0].chars().next()?,
        Duration::from_millis(ticks * 1000 / hz),
    ))
}

/// A field of `/proc/<pid>/status` (e.g. `VmHWM`), as printed.
fn proc_status(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.trim().to_string())
        .unwrap_or_default()
}

/// A self-recursive inline partial costs its own template only. confd runs under a 512 MB
/// address-space limit (an allocation past it aborts the process): the recursive template
/// fails at the depth bound with one line naming it and keeps its previous file, while the
/// normal template goes on following the store; confd stays up, and obeys SIGTERM after.
#[tokio::test]
async fn a_self_recursive_template_fails_alone_within_a_memory_limit() {
    const LIMIT: &str = "--as=536870912";
    let etcd = Etcd::start().await;
    let store = Store::new(&RegistryUri::parse(&etcd.uri("svc/reg")).unwrap());
    store.register(&web("web-a", 8001, 0)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let recursive_out = dir.path().join("recursive.hbs.out");
    std::fs::write(&recursive_out, "previous\n").unwrap();
    let mut confd = confd_templates(
        dir.path(),
        &etcd.uri("svc/reg"),
        "",
        &[
            (
                "recursive.hbs",
                "{{#*inline \"a\"}}x{{> a}}{{/inline}}{{> a}}",
            ),
            ("services.hbs", TEMPLATE),
        ],
        &["prlimit", LIMIT, "--"],
    );
    let normal = dir.path().join("services.hbs.out");
    let refusal = format!(
        "{}: blocks and partials nest deeper than max_render_depth (64)",
        dir.path().join("recursive.hbs").display()
    );
    confd.wait_output(&refusal, WAIT).await;
    wait_for(
        "web-a rendered beside the refused template",
        WAIT,
        || async {
            let t = std::fs::read_to_string(&normal).ok()?;
            t.contains("web-a=8001").then_some(())
        },
    )
    .await;
    // The store changes: the normal template follows, the recursive one is refused again.
    store.register(&web("web-b", 8002, 0)).await.unwrap();
    wait_for("web-b rendered", SOON, || async {
        let t = std::fs::read_to_string(&normal).ok()?;
        t.contains("web-b=8002").then_some(())
    })
    .await;
    wait_for("the recursive template refused again", SOON, || async {
        (confd.output().matches(&refusal).count() >= 2).then_some(())
    })
    .await;
    let out = confd.output();
    let (state, cpu) = proc_stat(confd.pid()).expect("confd is running");
    eprintln!(
        "confd under prlimit {LIMIT}: state {state}, CPU {cpu:?}, peak RSS {}, peak VM {}",
        proc_status(confd.pid(), "VmHWM"),
        proc_status(confd.pid(), "VmPeak")
    );
    assert_ne!(state, 'Z', "confd died: {out}");
    for crash in ["memory allocation", "overflowed its stack", "panicked"] {
        assert!(!out.contains(crash), "{crash}: {out}");
    }
    assert_eq!(
        std::fs::read_to_string(&recursive_out).unwrap(),
        "previous\n"
    );
    let line = out.lines().find(|l| l.contains(&refusal)).unwrap();
    assert!(line.contains("previous file kept"), "{line}");
    assert_short_lines("confd", &out);
    confd.signal(libc::SIGTERM);
    let st = confd.wait_exit(WAIT).await;
    assert!(st.success(), "{st:?}: {}", confd.output());
}

/// SIGTERM ends a render in progress: one that would run for ever without writing (10^9
/// loop iterations, under a time bound of an hour) stops, and confd exits within 5 s.
#[tokio::test]
async fn sigterm_ends_a_render_in_progress() {
    let etcd = Etcd::start().await;
    let dir = tempfile::tempdir().unwrap();
    let n: Vec<String> = (0..1000).map(|i| i.to_string()).collect();
    let mut confd = confd_templates(
        dir.path(),
        &etcd.uri("svc/reg"),
        &format!("max_render_time: 1h\nvars: {{ n: [{}] }}\n", n.join(",")),
        &[(
            "endless.hbs",
            "{{#each vars.n}}{{#each @root.vars.n}}{{#each @root.vars.n}}{{/each}}{{/each}}{{/each}}",
        )],
        &[],
    );
    // Rendering is all this confd has to do: once it has used 2 s of CPU, it is in the render.
    let pid = confd.pid();
    wait_for("confd busy rendering", WAIT, || async {
        let (_, cpu) = proc_stat(pid)?;
        (cpu >= Duration::from_secs(2)).then_some(())
    })
    .await;
    let t = Instant::now();
    confd.signal(libc::SIGTERM);
    let st = confd.wait_exit(Duration::from_secs(5)).await;
    let took = t.elapsed();
    eprintln!("confd exited {took:?} after SIGTERM, in a render");
    let out = confd.output();
    assert!(st.success(), "{st:?}: {out}");
    assert!(
        out.contains("endless.hbs: render stopped: confd is stopping"),
        "{out}"
    );
    assert!(!dir.path().join("endless.hbs.out").exists());
}

/// Staged files a crash left beside the destination (`kill -9` between staging and renaming)
/// are removed when confd starts: exactly those of its own destinations, and nothing that
/// only looks like one.
#[tokio::test]
async fn staged_files_left_by_a_crash_are_removed_at_start() {
    let etcd = Etcd::start().await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(out_path(d), "previous\n").unwrap();
    let leftovers = [".out.txt.confd-AbC123", ".out.txt.confd-x9Y8z7"];
    let look_alikes = [
        ".out.txt.confd-AbC123.keep",
        ".other.txt.confd-AbC123",
        "out.txt.confd-AbC123",
        ".out.txt.confd-AbC12",
        ".out.txt.swp",
    ];
    let big = vec![b'x'; 4 << 20];
    for f in leftovers.iter().chain(&look_alikes) {
        std::fs::write(d.join(f), &big).unwrap();
    }
    let confd = confd(d, &etcd.uri("svc/reg"), "60s");
    wait_rendered(&confd, d, "the first render", WAIT, |t| t.is_empty()).await;
    let out = confd.output();
    for f in leftovers {
        assert!(!d.join(f).exists(), "{f} left: {out}");
        let line = out
            .lines()
            .find(|l| l.contains(&d.join(f).display().to_string()))
            .unwrap_or_else(|| panic!("{f} not logged: {out}"));
        assert!(
            line.contains("removed a staged file") && line.contains("bytes=4194304"),
            "{line}"
        );
    }
    for f in look_alikes {
        assert_eq!(
            std::fs::metadata(d.join(f)).map(|m| m.len()).ok(),
            Some(4 << 20),
            "{f}"
        );
    }
}
