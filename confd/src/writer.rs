//! Atomic replacement of a destination file.
//!
//! The new content is staged in a temp file in the destination's own directory (so the final
//! `rename` is atomic: same filesystem), fsynced, given the old file's mode and owner (or the
//! configured mode), checked by the caller, then renamed over the destination and the directory
//! fsynced. A reader (nginx, HAProxy) thus sees the old file or the new one, never a half.
//!
//! A staged file is removed when it is dropped, which a crash or `kill -9` between stage and
//! commit skips: [`remove_staged`] removes those leftovers when confd starts. It knows them by
//! name alone ([`is_staged`]: `.<destination>.confd-` and [`STAGE_RANDOM`] letters or digits,
//! nothing before or after), so it never touches another program's files or another
//! destination's.

use std::ffi::OsStr;
use std::fs;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Mode of a new destination when neither an old file nor the config says otherwise.
const DEFAULT_MODE: u32 = 0o644;

/// How many random letters or digits end a staged file's name.
pub const STAGE_RANDOM: usize = 6;

/// What every file staged for the destination named `dest_name` starts with.
fn stage_prefix(dest_name: &OsStr) -> String {
    format!(".{}.confd-", dest_name.to_string_lossy())
}

/// Whether `file`, a name in the destination's directory, is one [`stage`] makes for the
/// destination named `dest_name`: its prefix and then exactly [`STAGE_RANDOM`] ASCII letters
/// or digits (what the temp file's random part is made of).
pub fn is_staged(dest_name: &OsStr, file: &OsStr) -> bool {
    let prefix = stage_prefix(dest_name);
    file.as_bytes()
        .strip_prefix(prefix.as_bytes())
        .is_some_and(|rest| {
            rest.len() == STAGE_RANDOM && rest.iter().all(u8::is_ascii_alphanumeric)
        })
}

/// Removes the staged files an earlier run left beside `dest` ([`is_staged`]; regular files
/// only, and never one of `keep`, the destinations themselves), logging each; what it removed.
/// A directory that does not exist yet has nothing to remove.
pub fn remove_staged(dest: &Path, keep: &[PathBuf]) -> Vec<PathBuf> {
    let Some(dest_name) = dest.file_name() else {
        return Vec::new();
    };
    let dir = stage_dir(dest);
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot look for staged files left by an earlier run");
            }
            return Vec::new();
        }
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !is_staged(dest_name, &name) {
            continue;
        }
        let path = dir.join(&name);
        if keep.contains(&path) {
            continue;
        }
        // Not followed: a link or a directory by that name is not one confd made.
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        if !meta.is_file() {
            continue;
        }
        match fs::remove_file(&path) {
            Ok(()) => {
                tracing::info!(
                    dest = %dest.display(),
                    file = %path.display(),
                    bytes = meta.len(),
                    "removed a staged file an earlier run left (it stopped between staging and replacing)"
                );
                removed.push(path);
            }
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cannot remove a staged file an earlier run left")
            }
        }
    }
    removed
}

/// The directory `dest` is staged in: its own.
fn stage_dir(dest: &Path) -> &Path {
    match dest.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// New content waiting in the destination's directory. Dropping it removes the temp file.
pub struct Staged {
    file: tempfile::NamedTempFile,
    dest: PathBuf,
}

impl Staged {
    /// Path of the staged file (what a check command validates).
    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// Renames the staged file over the destination and syncs the directory.
    pub fn commit(self) -> io::Result<()> {
        let dest = self.dest;
        self.file.persist(&dest).map_err(|e| e.error)?;
        sync_dir(&dest);
        Ok(())
    }
}

/// The destination's current content, `None` if it does not exist.
pub fn read_current(dest: &Path) -> io::Result<Option<Vec<u8>>> {
    match fs::read(dest) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether writing `new` would change anything.
pub fn changed(current: Option<&[u8]>, new: &[u8]) -> bool {
    current != Some(new)
}

/// Writes `content` to a temp file beside `dest`, fsynced, with `mode` (or the old file's
/// mode) and the old file's owner.
pub fn stage(dest: &Path, content: &[u8], mode: Option<u32>) -> io::Result<Staged> {
    let dir = stage_dir(dest);
    let name = dest.file_name().unwrap_or_default();
    let mut file = tempfile::Builder::new()
        .prefix(&stage_prefix(name))
        .rand_bytes(STAGE_RANDOM)
        .tempfile_in(dir)?;
    file.write_all(content)?;
    file.flush()?;
    let old = fs::metadata(dest).ok();
    let mode = mode
        .or_else(|| old.as_ref().map(|m| m.mode() & 0o7777))
        .unwrap_or(DEFAULT_MODE);
    file.as_file()
        .set_permissions(fs::Permissions::from_mode(mode))?;
    if let Some(m) = &old {
        let f = file.as_file().metadata()?;
        if f.uid() != m.uid() || f.gid() != m.gid() {
            // Only root (or the owner, for the group) may do this; failing to keep the owner is
            // worth a warning, not a refused update.
            if let Err(e) = std::os::unix::fs::fchown(file.as_file(), Some(m.uid()), Some(m.gid()))
            {
                tracing::warn!(dest = %dest.display(), error = %e, "cannot keep the owner of the file");
            }
        }
    }
    file.as_file().sync_all()?;
    Ok(Staged {
        file,
        dest: dest.to_path_buf(),
    })
}

/// Puts `previous` back at `dest` (atomically), or removes `dest` if there was nothing before.
pub fn restore(dest: &Path, previous: Option<&[u8]>, mode: Option<u32>) -> io::Result<()> {
    match previous {
        Some(p) => stage(dest, p, mode)?.commit(),
        None => match fs::remove_file(dest) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        },
    }
}

/// A unified diff from the current content to `new`, headed with the destination's path.
pub fn diff(dest: &Path, current: Option<&[u8]>, new: &[u8]) -> String {
    let old = String::from_utf8_lossy(current.unwrap_or_default());
    let new = String::from_utf8_lossy(new);
    let d = dest.display().to_string();
    let old_header = if current.is_some() {
        d.clone()
    } else {
        "/dev/null".into()
    };
    similar::TextDiff::from_lines(old.as_ref(), new.as_ref())
        .unified_diff()
        .context_radius(3)
        .header(&old_header, &d)
        .to_string()
}

/// fsync the directory so the rename itself survives a crash. Best effort.
fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn change_detection() {
        assert!(changed(None, b""));
        assert!(changed(Some(b"a"), b"b"));
        assert!(!changed(Some(b"a"), b"a"));
    }

    #[test]
    fn stage_commit_keeps_mode_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("x.conf");
        // New file: default mode.
        stage(&dest, b"one", None).unwrap().commit().unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"one");
        assert_eq!(fs::metadata(&dest).unwrap().mode() & 0o777, 0o644);
        // Existing file's mode is kept.
        fs::set_permissions(&dest, fs::Permissions::from_mode(0o600)).unwrap();
        stage(&dest, b"two", None).unwrap().commit().unwrap();
        assert_eq!(fs::metadata(&dest).unwrap().mode() & 0o777, 0o600);
        // Configured mode wins.
        stage(&dest, b"three", Some(0o640))
            .unwrap()
            .commit()
            .unwrap();
        assert_eq!(fs::metadata(&dest).unwrap().mode() & 0o777, 0o640);
        // A dropped stage leaves the destination and no temp file.
        let s = stage(&dest, b"four", None).unwrap();
        assert!(s.path().starts_with(dir.path()));
        drop(s);
        assert_eq!(fs::read(&dest).unwrap(), b"three");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn staged_names_are_told_from_look_alikes() {
        let cases = [
            // What `stage` makes for `nginx.conf`.
            (".nginx.conf.confd-a1B2c3", true),
            (".nginx.conf.confd-ZZZZZZ", true),
            (".nginx.conf.confd-000000", true),
            // Look-alikes: another destination's, another program's, edited or partial names.
            (".haproxy.cfg.confd-a1B2c3", false),
            (".nginx.confd-a1B2c3", false),
            ("nginx.conf.confd-a1B2c3", false),
            (".nginx.conf.confd-", false),
            (".nginx.conf.confd-a1B2c", false),
            (".nginx.conf.confd-a1B2c3d", false),
            (".nginx.conf.confd-a1B2c3.bak", false),
            (".nginx.conf.confd-a1B2-3", false),
            (".nginx.conf.confd-a1B2c\u{e9}", false),
            (".nginx.conf.swp", false),
            (".nginx.conf.confd-x.a1B2c3", false),
            ("..nginx.conf.confd-a1B2c3", false),
            ("nginx.conf", false),
        ];
        for (file, want) in cases {
            assert_eq!(
                is_staged(OsStr::new("nginx.conf"), OsStr::new(file)),
                want,
                "{file}"
            );
        }
        // Whatever `stage` makes is recognised, for that destination only.
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("x.conf");
        let s = stage(&dest, b"one", None).unwrap();
        let name = s.path().file_name().unwrap();
        assert!(is_staged(OsStr::new("x.conf"), name), "{name:?}");
        assert!(!is_staged(OsStr::new("x.con"), name), "{name:?}");
    }

    #[test]
    fn leftovers_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let dest = d.join("x.conf");
        fs::write(&dest, "live").unwrap();
        let leftovers = [".x.conf.confd-AbC123", ".x.conf.confd-zzzzzz"];
        let others = [
            ".x.conf.confd-AbC123.bak",
            ".y.conf.confd-AbC123",
            "x.conf.confd-AbC123",
        ];
        for f in leftovers.iter().chain(&others) {
            fs::write(d.join(f), "x").unwrap();
        }
        // A directory by that name, and a destination that happens to match, stay too.
        fs::create_dir(d.join(".x.conf.confd-dir123")).unwrap();
        let other_dest = d.join(".x.conf.confd-DEST00");
        fs::write(&other_dest, "another destination").unwrap();
        let mut removed = remove_staged(&dest, &[dest.clone(), other_dest.clone()]);
        removed.sort();
        let want: Vec<PathBuf> = leftovers.iter().map(|f| d.join(f)).collect();
        assert_eq!(removed, want);
        for f in leftovers {
            assert!(!d.join(f).exists(), "{f}");
        }
        for f in others {
            assert!(d.join(f).exists(), "{f}");
        }
        assert!(d.join(".x.conf.confd-dir123").is_dir());
        assert!(other_dest.exists());
        assert_eq!(fs::read(&dest).unwrap(), b"live");
        // A directory that does not exist yet: nothing to do.
        assert!(remove_staged(&d.join("no/such/dir/x.conf"), &[]).is_empty());
    }

    #[test]
    fn restore_puts_back_or_removes() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("x.conf");
        fs::write(&dest, "new").unwrap();
        restore(&dest, Some(b"old"), None).unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"old");
        restore(&dest, None, None).unwrap();
        assert!(!dest.exists());
        restore(&dest, None, None).unwrap();
    }

    #[test]
    fn unified_diff() {
        let d = diff(Path::new("/etc/x"), Some(b"a\nb\n"), b"a\nc\n");
        assert!(d.contains("--- /etc/x") && d.contains("+++ /etc/x"), "{d}");
        assert!(d.contains("-b\n") && d.contains("+c\n"), "{d}");
        let d = diff(Path::new("/etc/x"), None, b"a\n");
        assert!(d.contains("--- /dev/null") && d.contains("+a"), "{d}");
    }
}
