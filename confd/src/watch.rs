//! Watching template files on disk, so an edited template is rendered again at once.
//!
//! The parent directory of each template is watched (not the file): editors save by writing a
//! new file and renaming it over the old one, which a watch on the old inode would miss.

use notify::{EventKind, RecursiveMode, Watcher};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use tokio::sync::mpsc::UnboundedSender;

/// Keeps the OS watch alive; dropping it stops watching.
pub struct TemplateWatcher {
    _inner: notify::RecommendedWatcher,
}

/// Sends the index of a template in `srcs` each time its file is written, created or renamed.
pub fn watch_templates(
    srcs: &[PathBuf],
    tx: UnboundedSender<usize>,
) -> notify::Result<TemplateWatcher> {
    let abs: Vec<PathBuf> = srcs.iter().map(|p| absolute(p)).collect();
    let targets = abs.clone();
    let mut w = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let Ok(ev) = res else { return };
        if !matches!(
            ev.kind,
            EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_)
        ) {
            return;
        }
        for p in &ev.paths {
            for (i, t) in targets.iter().enumerate() {
                if p == t {
                    let _ = tx.send(i);
                }
            }
        }
    })?;
    let dirs: BTreeSet<PathBuf> = abs
        .iter()
        .filter_map(|p| p.parent().map(Path::to_path_buf))
        .collect();
    for d in dirs {
        w.watch(&d, RecursiveMode::NonRecursive)?;
    }
    Ok(TemplateWatcher { _inner: w })
}

/// Sends `()` each time a file in `dir` is written, created, removed or renamed (the
/// certificates directory: a pair is replaced by writing or renaming its files).
pub fn watch_dir(dir: &Path, tx: UnboundedSender<()>) -> notify::Result<TemplateWatcher> {
    let mut w = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let Ok(ev) = res else { return };
        if matches!(
            ev.kind,
            EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_)
        ) {
            let _ = tx.send(());
        }
    })?;
    w.watch(&absolute(dir), RecursiveMode::NonRecursive)?;
    Ok(TemplateWatcher { _inner: w })
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn reports_edits_by_write_and_by_rename() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.hbs");
        let b = dir.path().join("b.hbs");
        std::fs::write(&a, "1").unwrap();
        std::fs::write(&b, "1").unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let _w = watch_templates(&[a.clone(), b.clone()], tx).unwrap();
        std::fs::write(&b, "2").unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap();
        assert_eq!(got, Some(1));
        let tmp = dir.path().join("a.hbs.swp");
        std::fs::write(&tmp, "3").unwrap();
        std::fs::rename(&tmp, &a).unwrap();
        // b's write may still have events on their way (truncating and writing are two
        // modifications, reported one after the other): skip those, and wait for a's.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let got = tokio::time::timeout_at(deadline, rx.recv())
                .await
                .expect("no event for a.hbs, renamed over");
            match got {
                Some(0) => break,
                Some(1) => continue,
                other => panic!("unexpected {other:?}"),
            }
        }
    }
}
