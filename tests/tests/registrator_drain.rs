//! The `registrator` binary and containers that stop: a container's stop signal withdraws its
//! registrations while it still finishes its work (a reload signal withdraws nothing), a stop
//! signal the container ignores is served again, custom stop signals and the opt-out, and
//! `-deregister on-success` for containers that crash.
//!
//! As in the other `registrator_*` binaries, every assertion looks only at this test's own
//! containers (by service ID).

use std::time::Duration;
use switchboard_tests::registrator::*;
use switchboard_tests::*;

/// A busybox container serving HTTP on a published port 80 that finishes its work on `TERM`
/// for 3 s (then exits 0) and treats `HUP` as a reload, as apps behind a proxy do.
/// `opts` go before the image.
fn draining_web(tag: &str, name: &str, opts: &[&str]) -> Container {
    let service = format!("SERVICE_NAME={name}");
    let mut args = vec!["-p", "80", "-e", &service];
    args.extend_from_slice(opts);
    args.extend_from_slice(&[
        TEST_IMAGE,
        "sh",
        "-c",
        "trap 'sleep 3; exit 0' TERM; trap 'echo reload' HUP; httpd -p 80 -h /www; \
         while true; do sleep 1; done",
    ]);
    Container::run(tag, &args)
}

/// Nanoseconds since the epoch, now.
fn unix_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64
}

/// `timeNano` of the first `kill` event with `signal` Docker logged for container `id` since
/// `since_ns`.
fn kill_event_ns(id: &str, signal: &str, since_ns: i64) -> i64 {
    let since = (since_ns / 1_000_000_000 - 1).to_string();
    let until = (unix_ns() / 1_000_000_000 + 1).to_string();
    let filter = format!("container={id}");
    let out = docker(&[
        "events",
        "--since",
        &since,
        "--until",
        &until,
        "--filter",
        &filter,
        "--filter",
        "event=kill",
        "--format",
        "{{.TimeNano}} {{index .Actor.Attributes \"signal\"}}",
    ]);
    out.lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(_, sig)| *sig == signal)
        .and_then(|(t, _)| t.parse().ok())
        .unwrap_or_else(|| panic!("no kill {signal} event for {id}: {out}"))
}

/// Nanoseconds into the (UTC) day of a log line's timestamp (`2026-11-26T14:27:06.919209Z ...`,
/// tracing's format), to compare with an event's time of day.
fn log_time_of_day_ns(line: &str) -> Option<i64> {
    let t = line.get(11..)?.split(['Z', ' ']).next()?;
    let (hms, frac) = t.split_once('.').unwrap_or((t, "0"));
    let mut parts = hms.split(':').map(|p| p.parse::<i64>().ok());
    let (h, m, sec) = (parts.next()??, parts.next()??, parts.next()??);
    let frac_ns = format!("{frac:0<9}").get(..9)?.parse::<i64>().ok()?;
    Some(((h * 60 + m) * 60 + sec) * 1_000_000_000 + frac_ns)
}

fn running(c: &Container) -> bool {
    docker(&["inspect", "-f", "{{.State.Running}}", &c.id]) == "true"
}

/// Asserts `present` holds at every look for `window`: a bounded negative check.
async fn stays_for<F, Fut>(window: Duration, what: &str, present: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = std::time::Instant::now() + window;
    while std::time::Instant::now() < until {
        assert!(present().await, "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `docker kill -s HUP` withdraws nothing; `docker stop` withdraws at the signal, while the
/// container still runs (finishing its work), and the time from the `docker stop` call to
/// the store no longer having it is printed.
async fn drain_scenario(registry: Registry) {
    let name = unique_name("drain").replace('-', "");
    let reg = registrator(&registry.uri(), &[], &[]);
    let c = draining_web("reg-drain", &name, &[]);
    let id = id_of(&c, "80");
    registry.wait_present(&name, &id).await;

    docker(&["kill", "-s", "HUP", &c.id]);
    stays_for(Duration::from_secs(2), "registered after HUP", || {
        registry.present(&name, &id)
    })
    .await;
    assert!(running(&c));

    let cid = c.id.clone();
    let called = std::time::Instant::now();
    let called_ns = unix_ns();
    let stop = tokio::task::spawn_blocking(move || {
        docker(&["stop", "-t", "10", &cid]);
        std::time::Instant::now()
    });
    let (gone, gone_ns) = poll(WAIT, Duration::from_millis(2), || async {
        (!registry.present(&name, &id).await).then(|| (std::time::Instant::now(), unix_ns()))
    })
    .await
    .expect("withdrawn on docker stop");
    // The container is still finishing its work: it was withdrawn before it exited.
    assert!(running(&c), "the container exited before it was withdrawn");
    assert!(!stop.is_finished());
    let returned = stop.await.unwrap();
    assert!(!running(&c));
    // From Docker's kill event: to the registrator's log line, and to a reader seeing it gone.
    let kill_ns = kill_event_ns(&c.id, "15", called_ns);
    let needle = format!("deregistered {id}");
    let out = reg.output();
    let line = out
        .lines()
        .find(|l| l.contains(&needle))
        .unwrap_or_default();
    let day = 86_400 * 1_000_000_000i64;
    let logged = log_time_of_day_ns(line)
        .map(|t| ((t - kill_ns.rem_euclid(day)).rem_euclid(day)) as f64 / 1e6);
    println!(
        "drain ({}): docker stop called -> gone from the store {:.1} ms; kill event -> \
         registrator logged the deregistration {:.1} ms, -> a reader saw it gone {:.1} ms; \
         the container exited {:.0} ms after the call",
        registry.name(),
        (gone - called).as_secs_f64() * 1000.0,
        logged.unwrap_or(f64::NAN),
        (gone_ns - kill_ns) as f64 / 1e6,
        (returned - called).as_secs_f64() * 1000.0
    );
    assert!(
        gone - called < Duration::from_secs(2),
        "{:?}",
        gone - called
    );
}

#[tokio::test]
async fn stop_signal_drains_before_exit_reload_signal_does_not_consul() {
    drain_scenario(Registry::Consul(Consul::start().await)).await;
}

#[tokio::test]
async fn stop_signal_drains_before_exit_reload_signal_does_not_etcd() {
    drain_scenario(Registry::Etcd(Etcd::start().await)).await;
}

/// A stop signal the container ignores (sent with `docker kill -s TERM`, so no SIGKILL
/// follows) withdraws it, and it is served again once its stop timeout (1 s) plus the 5 s
/// margin has passed and it still runs. A container whose stop signal is `SIGUSR1` drains on
/// USR1, not on TERM.
#[tokio::test]
async fn ignored_stop_signal_is_served_again_and_custom_stop_signals_drain() {
    let consul = Consul::start().await;
    let registry = Registry::Consul(consul);
    let name = unique_name("ignore").replace('-', "");
    let _reg = registrator(&registry.uri(), &[], &[]);
    let service = format!("SERVICE_NAME={name}");
    let deaf = Container::run(
        "reg-deaf",
        &[
            "-p",
            "80",
            "-e",
            &service,
            "--stop-timeout",
            "1",
            TEST_IMAGE,
            "sh",
            "-c",
            "trap '' TERM; httpd -p 80 -h /www; while true; do sleep 1; done",
        ],
    );
    let usr1 = Container::run(
        "reg-usr1",
        &[
            "-p",
            "80",
            "-e",
            &service,
            "--stop-signal",
            "SIGUSR1",
            TEST_IMAGE,
            "sh",
            "-c",
            "trap '' TERM; trap 'sleep 2; exit 0' USR1; httpd -p 80 -h /www; \
             while true; do sleep 1; done",
        ],
    );
    let (deaf_id, usr1_id) = (id_of(&deaf, "80"), id_of(&usr1, "80"));
    registry.wait_present(&name, &deaf_id).await;
    registry.wait_present(&name, &usr1_id).await;

    let killed = std::time::Instant::now();
    docker(&["kill", "-s", "TERM", &deaf.id]);
    docker(&["kill", "-s", "TERM", &usr1.id]);
    registry.wait_absent(&name, &deaf_id).await;
    let withdrawn = killed.elapsed();
    // TERM is not usr1's stop signal: nothing withdrawn.
    stays_for(Duration::from_secs(2), "usr1 registered after TERM", || {
        registry.present(&name, &usr1_id)
    })
    .await;
    let cid = usr1.id.clone();
    let stop = tokio::task::spawn_blocking(move || docker(&["stop", "-t", "10", &cid]));
    registry.wait_absent(&name, &usr1_id).await;
    assert!(running(&usr1), "usr1 exited before it was withdrawn");
    stop.await.unwrap();

    // The deaf container still runs after its stop timeout + margin: served again.
    registry.wait_present(&name, &deaf_id).await;
    let back = killed.elapsed();
    assert!(running(&deaf));
    println!("ignored TERM: withdrawn after {withdrawn:?}, registered again after {back:?}");
    assert!(withdrawn < Duration::from_secs(2), "{withdrawn:?}");
    assert!(back >= Duration::from_secs(5), "{back:?}");
}

/// `SERVICE_DRAIN=false`: the container stays registered through its stop signal and leaves
/// when it exits.
#[tokio::test]
async fn drain_opt_out_stays_registered_until_exit() {
    let consul = Consul::start().await;
    let registry = Registry::Consul(consul);
    let name = unique_name("optout").replace('-', "");
    let _reg = registrator(&registry.uri(), &[], &[]);
    let c = draining_web("reg-optout", &name, &["-l", "SERVICE_DRAIN=false"]);
    let id = id_of(&c, "80");
    registry.wait_present(&name, &id).await;
    let cid = c.id.clone();
    let stop = tokio::task::spawn_blocking(move || docker(&["stop", "-t", "10", &cid]));
    // It takes at least 2 s to exit (its TERM trap sleeps 3 s after the current `sleep 1`).
    stays_for(
        Duration::from_millis(1500),
        "registered while stopping",
        || registry.present(&name, &id),
    )
    .await;
    assert!(running(&c));
    stop.await.unwrap();
    registry.wait_absent(&name, &id).await;
}

#[tokio::test]
async fn deregister_on_success_keeps_crashed_containers_until_removed() {
    let consul = Consul::start().await;
    let _reg = registrator(&consul.uri(), &["-deregister", "on-success"], &[]);
    let crashed = web("reg-onsuccess-crash", &[]);
    let clean = Container::run(
        "reg-onsuccess-clean",
        &[
            "-p",
            "80",
            TEST_IMAGE,
            "sh",
            "-c",
            "trap 'exit 0' TERM; while true; do sleep 1; done",
        ],
    );
    let crashed_id = id_of(&crashed, "80");
    let clean_id = id_of(&clean, "80");
    wait_consul(&consul, &crashed_id).await;
    wait_consul(&consul, &clean_id).await;
    docker(&["kill", &crashed.id]); // exit status 137
    clean.stop(5); // exit status 0 via the trap
    wait_consul_gone(&consul, &clean_id).await;
    assert_eq!(
        docker(&["inspect", "-f", "{{.State.ExitCode}}", &crashed.id]),
        "137"
    );
    assert!(consul.agent_service(&crashed_id).await.is_some());
    drop(crashed);
    wait_consul_gone(&consul, &crashed_id).await;
}
