//! The `registrator` binary and its stores: the writes of a pass overlap and late
//! registrations join them, `-cleanup` and `-ttl`, store and Docker engine outages and what
//! comes back after them, a store that never answers, and registrations that outlive the
//! registrator: a restarted registrator adopts what is registered instead of removing and
//! writing it again, and catches up with containers that came or went while none ran.
//!
//! As in the other `registrator_*` binaries, every assertion looks only at this test's own
//! containers (by service ID).

use std::time::Duration;
use switchboard_tests::registrator::*;
use switchboard_tests::*;

/// A registrator whose store is etcd behind a [`StoreFront`], registering only containers
/// with `label`.
fn registrator_behind(front: &StoreFront, label: &str) -> Process {
    registrator(
        &format!("etcd://127.0.0.1:{}/services", front.port()),
        &["--label-filter", label],
        &[],
    )
}

/// Waits until the front holds `n` writes (or more) at once.
async fn wait_outstanding(front: &StoreFront, n: usize, reg: &Process) {
    let reached = poll(WAIT, Duration::from_millis(20), || async {
        (front.outstanding() >= n).then_some(())
    })
    .await;
    assert!(
        reached.is_some(),
        "never {n} writes outstanding at once (at most {}); registrator's output:\n{}",
        front.max_outstanding(),
        reg.output()
    );
}

/// The writes of a pass overlap (one at a time, the last of a batch of containers started
/// together would wait for every write before it). Six containers already run when the
/// registrator starts, so its first pass has six registrations to write; the store front holds
/// every write until the test sees several outstanding at once, which one at a time never are.
#[tokio::test]
async fn writes_of_a_pass_overlap() {
    let etcd = Etcd::start().await;
    let front = StoreFront::start(etcd.port).await;
    let label = format!("switchboard.test.overlap={}", std::process::id());
    let containers: Vec<Container> = (0..6)
        .map(|i| web(&format!("reg-overlap{i}"), &["-l", &label]))
        .collect();
    front.close();
    let reg = registrator_behind(&front, &label);
    wait_outstanding(&front, 2, &reg).await;
    front.open();
    for c in &containers {
        wait_etcd(&etcd, "services", &id_of(c, "80")).await;
    }
}

/// A registration published while a pass's writes are out joins them, rather than waiting
/// for the slowest (etcd's p99). The front holds the first container's write, so that pass
/// cannot end; the second container's write must start all the same, while the first is
/// still out. (A pass that did not take it in would give the held write up at the
/// store client's 10 s request timeout, log the store unavailable and write both again in a
/// new pass: that is what the last assertion tells apart.)
#[tokio::test]
async fn a_registration_joins_a_running_pass() {
    let etcd = Etcd::start().await;
    let front = StoreFront::start(etcd.port).await;
    let label = format!("switchboard.test.joins={}", std::process::id());
    let reg = registrator_behind(&front, &label);
    let first = web("reg-joins-a", &["-l", &label]);
    wait_etcd(&etcd, "services", &id_of(&first, "80")).await;
    front.close();
    let held = web("reg-joins-b", &["-l", &label]);
    wait_outstanding(&front, 1, &reg).await;
    let joining = web("reg-joins-c", &["-l", &label]);
    wait_outstanding(&front, 2, &reg).await;
    front.open();
    for c in [&held, &joining] {
        wait_etcd(&etcd, "services", &id_of(c, "80")).await;
    }
    let out = reg.output();
    assert!(
        !out.contains("store unavailable"),
        "the held write was given up, so the second did not join it:\n{out}"
    );
}

#[tokio::test]
async fn cleanup_removes_only_this_hosts_stale_entries() {
    let consul = Consul::start().await;
    let mut first = registrator(&consul.uri(), &[], &[]);
    let c = web("reg-cleanup", &[]);
    let id = id_of(&c, "80");
    wait_consul(&consul, &id).await;
    // A registrator killed without a chance to deregister leaves its entry behind.
    first.kill9();
    drop(c);
    let other = serde_json::json!({
        "ID": "otherhost:web:80", "Name": "busybox", "Address": "10.0.0.9", "Port": 80
    });
    let resp = reqwest::Client::new()
        .put(format!("{}/v1/agent/service/register", consul.http()))
        .json(&other)
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success());
    assert!(consul.agent_service(&id).await.is_some());

    let reg = registrator(&consul.uri(), &["-cleanup"], &[]);
    wait_consul_gone(&consul, &id).await;
    reg.wait_output(&format!("deregistered {id}"), WAIT).await;
    assert!(consul.agent_service("otherhost:web:80").await.is_some());
}

#[tokio::test]
async fn ttl_expires_after_kill9_in_etcd_and_consul() {
    let etcd = Etcd::start().await;
    let consul = Consul::start().await;
    let ttl = ["-ttl", "3", "-ttl-refresh", "1"];
    let mut reg_e = registrator(&etcd.uri("ttl"), &ttl, &[]);
    let mut reg_c = registrator(&consul.uri(), &ttl, &[]);
    let c = web("reg-ttl", &[]);
    let id = id_of(&c, "80");
    wait_etcd(&etcd, "ttl", &id).await;
    wait_consul(&consul, &id).await;
    let check_id = format!("service:{id}:ttl");
    wait_for("TTL check passing", WAIT, || async {
        let ch = consul.agent_check(&check_id).await?;
        (ch["Status"] == "passing").then_some(())
    })
    .await;
    // Refreshes keep it alive past the TTL.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        assert!(etcd_service(&etcd, "ttl", &id).await.is_some());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    reg_e.kill9();
    reg_c.kill9();
    wait_etcd_gone(&etcd, "ttl", &id).await;
    wait_for("TTL check critical", WAIT, || async {
        let ch = consul.agent_check(&check_id).await?;
        (ch["Status"] == "critical").then_some(())
    })
    .await;
}

#[tokio::test]
async fn consul_restart_brings_registrations_back() {
    let mut consul = Consul::start().await;
    let reg = registrator(&consul.uri(), &[], &[]);
    let c = web("reg-consulrestart", &[]);
    let id = id_of(&c, "80");
    wait_consul(&consul, &id).await;
    consul.restart().await;
    wait_consul(&consul, &id).await;
    reg.wait_output("store lost", WAIT).await;
}

#[tokio::test]
async fn etcd_outage_and_recovery() {
    let mut etcd = Etcd::start().await;
    let reg = registrator(&etcd.uri("outage"), &[], &[]);
    let before = web("reg-etcd-before", &[]);
    wait_etcd(&etcd, "outage", &id_of(&before, "80")).await;
    etcd.stop();
    let during = web("reg-etcd-during", &[]);
    reg.wait_output("store unavailable", WAIT).await;
    etcd.restart().await;
    wait_etcd(&etcd, "outage", &id_of(&during, "80")).await;
    assert!(etcd_service(&etcd, "outage", &id_of(&before, "80"))
        .await
        .is_some());
    reg.wait_output("store reachable again", WAIT).await;
    let out = reg.output();
    assert_eq!(out.matches("store unavailable").count(), 1, "{out}");
}

#[tokio::test]
async fn docker_event_stream_loss_reconnects_and_resyncs() {
    let consul = Consul::start().await;
    let proxy = DockerProxy::start().await;
    let host = proxy.docker_host();
    let reg = registrator(&consul.uri(), &[], &[("DOCKER_HOST", &host)]);
    let removed = web("reg-proxy-removed", &[]);
    let removed_id = id_of(&removed, "80");
    wait_consul(&consul, &removed_id).await;

    proxy.cut();
    reg.wait_output("docker event stream", WAIT).await;
    let started = web("reg-proxy-started", &[]);
    drop(removed);
    proxy.restore();

    wait_consul(&consul, &id_of(&started, "80")).await;
    wait_consul_gone(&consul, &removed_id).await;
    reg.wait_output("docker engine reachable again", WAIT).await;
}

#[tokio::test]
async fn sigterm_leaves_registrations_and_deregister_on_exit_removes_them() {
    let consul = Consul::start().await;
    let c = web("reg-sigterm", &[]);
    let id = id_of(&c, "80");
    // The default, and `--keep-on-exit` (accepted for compatibility; it changes nothing):
    // they stay.
    for args in [&[][..], &["--keep-on-exit"][..]] {
        let mut reg = registrator(&consul.uri(), args, &[]);
        wait_consul(&consul, &id).await;
        // Its first sync is done (it was already there for the second run).
        reg.wait_output("adopted ", WAIT).await;
        reg.signal(libc::SIGTERM);
        let st = reg.wait_exit(WAIT).await;
        let out = reg.output();
        assert!(st.success(), "{args:?} {st:?}: {out}");
        assert!(consul.agent_service(&id).await.is_some(), "{args:?}: {out}");
        assert!(!out.contains(&format!("deregistered {id}")), "{out}");
        assert!(out.contains("leaving"), "{out}");
    }
    // The opt-in removes them.
    let mut reg = registrator(&consul.uri(), &["--deregister-on-exit"], &[]);
    wait_consul(&consul, &id).await;
    reg.wait_output("adopted ", WAIT).await;
    reg.signal(libc::SIGTERM);
    let st = reg.wait_exit(WAIT).await;
    assert!(st.success(), "{st:?}: {}", reg.output());
    assert!(consul.agent_service(&id).await.is_none());
    reg.wait_output(&format!("deregistered {id}"), WAIT).await;
}

#[tokio::test]
async fn unreachable_store_fails_after_retry_attempts() {
    let port = free_port(); // nothing listens there
    let uri = format!("consul://127.0.0.1:{port}");
    let mut reg = Process::spawn(
        &bin("registrator"),
        &["-retry-attempts", "2", "-retry-interval", "100", &uri],
        &[],
    );
    let st = reg.wait_exit(WAIT).await;
    assert_eq!(st.code(), Some(1), "{}", reg.output());
    let out = reg.output();
    let last = out
        .trim_end()
        .lines()
        .last()
        .unwrap_or_default()
        .to_string();
    assert!(last.starts_with("registrator: "), "{out}");
    assert!(last.contains(&format!("127.0.0.1:{port}")), "{out}");
    assert!(last.contains("after 3 attempt(s)"), "{out}");
    assert_eq!(out.matches("not reachable yet").count(), 2, "{out}");
}

/// How the registrator goes away in a restart.
#[derive(Debug, Clone, Copy)]
enum Stop {
    Sigterm,
    Kill9,
}

/// A running container stays registered through registrator restarts (SIGTERM, then
/// `kill -9`): never absent at any look of the monitor, never removed and written again
/// (same catalog indexes / etcd create_revision), and with `-ttl` kept alive by the new
/// process past the TTL (etcd: the key moves to the new process's lease). Containers that
/// stopped or started while no registrator ran are removed or added by the next one.
async fn restart_scenario(registry: Registry, ttl: bool) {
    // A TTL that covers the restart with room to spare on a loaded 2-core machine (the
    // registrator is gone for 1 to 3 s here), as a production TTL covers a restart.
    let ttl_secs = 5;
    let ttl_args: &[&str] = if ttl {
        &["-ttl", "5", "-ttl-refresh", "1"]
    } else {
        &[]
    };
    let name = unique_name("kept").replace('-', "");
    let kept = web("reg-kept", &["-e", &format!("SERVICE_NAME={name}")]);
    let kept_id = id_of(&kept, "80");
    let mut reg = registrator(&registry.uri(), ttl_args, &[]);
    registry.wait_present(&name, &kept_id).await;
    let identity = registry.identity(&name, &kept_id).await;
    let monitor = registry.monitor(&name, &kept_id);

    for how in [Stop::Sigterm, Stop::Kill9] {
        let gone = web("reg-gone", &["-e", &format!("SERVICE_NAME={name}")]);
        let gone_id = id_of(&gone, "80");
        registry.wait_present(&name, &gone_id).await;
        let old_lease = registry.lease(&name, &kept_id).await;
        match how {
            Stop::Sigterm => {
                reg.signal(libc::SIGTERM);
                let st = reg.wait_exit(WAIT).await;
                assert!(st.success(), "{st:?}: {}", reg.output());
            }
            Stop::Kill9 => reg.kill9(),
        }
        let stopped = std::time::Instant::now();
        // While no registrator runs (the monitor looks meanwhile: a registrator that
        // deregistered on exit would be caught here): one container goes away, another comes.
        monitor.cover(5).await;
        docker(&["kill", &gone.id]);
        let added = web("reg-added", &["-e", &format!("SERVICE_NAME={name}")]);
        let added_id = id_of(&added, "80");
        reg = registrator(&registry.uri(), ttl_args, &[]);
        registry.wait_present(&name, &added_id).await;
        registry.wait_absent(&name, &gone_id).await;
        reg.wait_output(&format!("deregistered {gone_id}"), WAIT)
            .await;
        reg.wait_output("adopted ", WAIT).await;
        if ttl {
            if let Registry::Etcd(_) = registry {
                let new_lease = wait_for("the kept key on the new lease", WAIT, || async {
                    let l = registry.lease(&name, &kept_id).await?;
                    (Some(&l) != old_lease.as_ref()).then_some(l)
                })
                .await;
                assert_ne!(new_lease, "0", "{how:?}");
            }
            // Past a TTL (and then some) after the old process went: only the new one keeps
            // it alive (etcd: the old lease has expired by then).
            let until = stopped + Duration::from_secs(ttl_secs + 2);
            while std::time::Instant::now() < until {
                assert!(
                    registry.present(&name, &kept_id).await,
                    "{how:?}: {}",
                    reg.output()
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        assert_eq!(
            registry.identity(&name, &kept_id).await,
            identity,
            "{how:?}: the kept registration was removed and written again"
        );
        let out = reg.output();
        assert!(!out.contains(&format!("deregistered {kept_id}")), "{out}");
        if !(ttl && matches!(registry, Registry::Etcd(_))) {
            // Adopted as it was: not a single write (etcd with -ttl rewrites it in place to
            // move it to the new lease).
            assert!(!out.contains(&format!("registered {kept_id}")), "{out}");
        }
        drop(added);
    }
    let (looks, misses) = monitor.finish().await;
    println!("kept registration watched {looks} times through two registrator restarts: absent {misses} times");
    assert_eq!(misses, 0, "absent at {misses} of {looks} looks");
}

#[tokio::test]
async fn restart_keeps_and_adopts_registrations_consul() {
    restart_scenario(Registry::Consul(Consul::start().await), false).await;
}

#[tokio::test]
async fn restart_keeps_and_adopts_registrations_consul_ttl() {
    restart_scenario(Registry::Consul(Consul::start().await), true).await;
}

#[tokio::test]
async fn restart_keeps_and_adopts_registrations_etcd() {
    restart_scenario(Registry::Etcd(Etcd::start().await), false).await;
}

#[tokio::test]
async fn restart_keeps_and_adopts_registrations_etcd_ttl() {
    restart_scenario(Registry::Etcd(Etcd::start().await), true).await;
}
