//! The synthetic registry every confd measurement uses, so render times, reload latencies and
//! RSS figures describe the same shape of data.
//!
//! N instances spread over `max(N / 10, 1)` services (10 instances each), each with two tags
//! and a few meta values. Half the services carry a virtual host: every fourth through meta
//! `vhost`, every fourth through `hostname` + `domain`, so both routes through
//! `Instance::vhost` are exercised. Every eighth has a `check_path`.

use std::collections::BTreeMap;
use switchboard::Service;

/// How many services N instances are spread over.
pub fn services_for(n: usize) -> usize {
    (n / 10).max(1)
}

/// The `i`-th of `n` instances.
pub fn service(i: usize, n: usize) -> Service {
    let k = i % services_for(n);
    let name = format!("app{k}");
    let mut meta = BTreeMap::from([
        ("env".to_string(), "prod".to_string()),
        ("version".to_string(), format!("1.{}", i % 5)),
    ]);
    match k % 4 {
        0 => {
            meta.insert("vhost".into(), format!("{name}.bench.test"));
        }
        1 => {
            meta.insert("hostname".into(), name.clone());
            meta.insert("domain".into(), "bench.test".into());
        }
        _ => {}
    }
    if k % 8 == 2 {
        meta.insert("check_path".into(), "/health".into());
    }
    Service {
        id: format!("benchhost:{name}-{i}:80"),
        address: format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255),
        port: 20_000 + (i % 10_000) as u16,
        tags: vec!["backend".into(), format!("v{}", i % 3)],
        meta,
        name,
        check: None,
        ttl: None,
        docker_health: None,
    }
}

/// The same instance as confd's model holds it (what the etcd source builds from a value).
pub fn instance(i: usize, n: usize) -> confd::model::Instance {
    confd::model::Instance::from_service(service(i, n), String::new(), "passing".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape() {
        let cases = [(1, 1), (10, 1), (1_000, 100), (10_000, 1_000)];
        for (n, services) in cases {
            assert_eq!(services_for(n), services);
            let snap = confd::model::Snapshot::build(
                (0..n).map(|i| instance(i, n)),
                Default::default(),
                &[],
            );
            assert_eq!(snap.total_instances(), n, "every address valid, IDs unique");
            assert_eq!(snap.services.len(), services);
        }
        assert_eq!(service(0, 1_000).meta["vhost"], "app0.bench.test");
        assert_eq!(
            instance(1, 1_000).vhost().as_deref(),
            Some("app1.bench.test")
        );
    }
}
