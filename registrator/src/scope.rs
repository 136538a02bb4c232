//! `--scope-label KEY`: register only the containers that share registrator's own value of a
//! label, e.g. `com.docker.compose.project`, so a registrator started by a compose project
//! registers that project's containers and nothing else on the host.
//!
//! A compose file cannot name its own project (compose v1 has no nested interpolation and
//! `-p` sets no variable), so the value is read where it is certain: on registrator's own
//! container, found through the engine. The container ID comes from `/proc/self/mountinfo`
//! (Docker bind-mounts `<data-root>/containers/<id>/{hostname,hosts,resolv.conf}` into every
//! container, whatever `hostname:` says) or, failing that, `/proc/self/cgroup` (cgroup v1
//! paths end in the ID). Every way this can fail stops registrator at start with one line:
//! a scope that silently matched everything would register other projects' containers.

use crate::derive::LabelMatch;
use anyhow::{anyhow, Context};

/// The ID of the container this process runs in, from the text of `/proc/self/mountinfo`
/// and `/proc/self/cgroup`; `None` outside a container (or a runtime that leaves no trace).
pub fn own_container_id(mountinfo: &str, cgroup: &str) -> Option<String> {
    let from_mounts = mountinfo.lines().find_map(|line| {
        // Field 4 is the mount's root within its filesystem.
        let root = line.split_whitespace().nth(3)?;
        let (_, rest) = root.split_once("/containers/")?;
        let id = rest.split('/').next()?;
        is_container_id(id).then(|| id.to_string())
    });
    from_mounts.or_else(|| {
        cgroup.lines().find_map(|line| {
            let last = line.rsplit('/').next()?;
            let id = last
                .strip_prefix("docker-")
                .and_then(|s| s.strip_suffix(".scope"))
                .unwrap_or(last);
            is_container_id(id).then(|| id.to_string())
        })
    })
}

/// A full container ID: 64 lowercase hex digits.
fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The filter `--scope-label KEY` stands for: `KEY=<value on registrator's own container>`.
pub async fn resolve(docker: &bollard::Docker, key: &str) -> anyhow::Result<LabelMatch> {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let id = own_container_id(&read("/proc/self/mountinfo"), &read("/proc/self/cgroup"))
        .ok_or_else(|| {
            anyhow!(
                "--scope-label {key}: registrator does not run in a container (no container ID in /proc/self/mountinfo or /proc/self/cgroup); expected to run in one, or use --label-filter {key}=VALUE"
            )
        })?;
    let short = &id[..12];
    let info = docker
        .inspect_container(&id, None)
        .await
        .with_context(|| {
            format!("--scope-label {key}: cannot inspect registrator's own container {short} (is DOCKER_HOST the engine registrator runs on?)")
        })?;
    let value = info
        .config
        .and_then(|c| c.labels)
        .and_then(|mut l| l.remove(key))
        .ok_or_else(|| {
            anyhow!("--scope-label {key}: registrator's own container {short} has no label {key:?}; expected it to carry the label to scope by")
        })?;
    Ok(LabelMatch {
        key: key.to_string(),
        value: Some(value),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f4e8a1c2b7d9e0f1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7081";

    #[test]
    fn finds_the_container_id() {
        let mount = |root: &str| {
            format!("1 0 0:1 / / rw - overlay overlay rw\n812 790 254:1 {root} /etc/hostname rw,relatime - ext4 /dev/vda rw\n")
        };
        // (what, mountinfo, cgroup, expected)
        let table: Vec<(&str, String, String, Option<&str>)> = vec![
            (
                "default data root",
                mount(&format!("/var/lib/docker/containers/{ID}/hostname")),
                "0::/\n".into(),
                Some(ID),
            ),
            (
                "another data root",
                mount(&format!("/srv/d/containers/{ID}/resolv.conf")),
                String::new(),
                Some(ID),
            ),
            (
                "cgroup v1 path",
                mount("/"),
                format!("12:pids:/docker/{ID}\n"),
                Some(ID),
            ),
            (
                "systemd cgroup driver",
                mount("/"),
                format!("0::/system.slice/docker-{ID}.scope\n"),
                Some(ID),
            ),
            ("not in a container", mount("/"), "0::/\n".into(), None),
            (
                "a short ID is not one",
                mount("/var/lib/docker/containers/3f4e8a1c2b7d/hostname"),
                String::new(),
                None,
            ),
            (
                "upper case is not Docker's",
                mount(&format!(
                    "/var/lib/docker/containers/{}/hostname",
                    ID.to_uppercase()
                )),
                String::new(),
                None,
            ),
        ];
        for (what, mountinfo, cgroup, want) in table {
            assert_eq!(
                own_container_id(&mountinfo, &cgroup).as_deref(),
                want,
                "{what}"
            );
        }
    }
}
