//! The standalone source: `*.yaml` / `*.yml` manifests in a watched directory.
//!
//! Rules, each chosen so one bad file never disturbs another session:
//! - only regular files count; symlinks are refused (they could point anywhere);
//! - a file modified in the last [`SETTLE`] is not read yet, so a file caught mid-write
//!   is never acted on half-read;
//! - a file that was valid and turns invalid keeps serving its last valid version and
//!   reports the error; a file that never parsed protects the session name it claims;
//! - when two files claim one name, the file that held it first keeps it.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use super::{Rejected, Snapshot, Source, SourceError};
use crate::manifest::{self, MAX_MANIFEST_BYTES, Parsed};
use crate::pool::PortRange;
use crate::session::Validated;

/// How long a file must stay unmodified before it is read.
pub const SETTLE: Duration = Duration::from_millis(200);

#[derive(Clone, PartialEq, Eq, Debug)]
struct FileKey {
    mtime_ns: i128,
    size: u64,
    ino: u64,
}

/// A file claiming a session name: its path, its (last valid) manifest, a warning.
type Claim<'a> = (&'a PathBuf, &'a Parsed, Option<String>);

#[derive(Debug)]
struct FileState {
    key: FileKey,
    result: Result<Parsed, Unparsed>,
    last_good: Option<Parsed>,
}

/// A manifest file that did not parse: the session name it claims (when that much can be
/// read, so the name stays protected), and the error, which names the file.
#[derive(Debug)]
struct Unparsed {
    claims: Option<String>,
    error: String,
}

/// The directory source. See the module docs.
#[derive(Debug)]
pub struct DirSource {
    dir: PathBuf,
    pool: PortRange,
    files: BTreeMap<PathBuf, FileState>,
    owners: BTreeMap<String, PathBuf>,
    events: mpsc::Receiver<()>,
    _watcher: Option<notify::RecommendedWatcher>,
    /// Files skipped for a name that is not UTF-8, each logged once.
    unreadable_names: BTreeSet<PathBuf>,
}

impl DirSource {
    /// Watches `dir` (created if missing) for manifests validated against `pool`.
    pub fn watch(dir: &Path, pool: PortRange) -> Result<Self, SourceError> {
        std::fs::create_dir_all(dir).map_err(|source| SourceError::Dir {
            path: dir.to_owned(),
            source,
        })?;
        let (tx, rx) = mpsc::channel(1);
        let mut watcher =
            notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
                // inotify reports opens and reads too, including those of our own scans:
                // counting them as changes would make every pass trigger the next one.
                use notify::event::{AccessKind, AccessMode, EventKind};
                let read_only = res.as_ref().is_ok_and(|e| {
                    matches!(e.kind, EventKind::Access(k) if k != AccessKind::Close(AccessMode::Write))
                });
                if !read_only {
                    let _ = tx.try_send(());
                }
            })
            .map_err(|e| SourceError::Watch {
                path: dir.to_owned(),
                detail: e.to_string(),
            })?;
        watcher
            .watch(dir, RecursiveMode::NonRecursive)
            .map_err(|e| SourceError::Watch {
                path: dir.to_owned(),
                detail: e.to_string(),
            })?;
        Ok(Self::build(dir, pool, rx, Some(watcher)))
    }

    /// A source that reads `dir` when asked and never reports changes (for one-shot
    /// commands such as `vncd cleanup --once`).
    pub fn once(dir: &Path, pool: PortRange) -> Self {
        let (_tx, rx) = mpsc::channel(1);
        Self::build(dir, pool, rx, None)
    }

    fn build(
        dir: &Path,
        pool: PortRange,
        events: mpsc::Receiver<()>,
        w: Option<notify::RecommendedWatcher>,
    ) -> Self {
        DirSource {
            dir: dir.to_owned(),
            pool,
            files: BTreeMap::new(),
            owners: BTreeMap::new(),
            unreadable_names: BTreeSet::new(),
            events,
            _watcher: w,
        }
    }

    /// Reads the directory now.
    pub fn scan(&mut self) -> Result<Snapshot, SourceError> {
        let rd = std::fs::read_dir(&self.dir).map_err(|source| SourceError::Dir {
            path: self.dir.clone(),
            source,
        })?;
        let now = SystemTime::now();
        let mut snap = Snapshot::default();
        let mut seen = BTreeSet::new();
        let mut rejected_early = Vec::new();
        for entry in rd {
            let entry = entry.map_err(|source| SourceError::Dir {
                path: self.dir.clone(),
                source,
            })?;
            if let Some(r) = self.visit(entry.path(), now, &mut snap, &mut seen) {
                rejected_early.push(r);
            }
        }
        self.files.retain(|p, _| seen.contains(p));
        self.assemble(&mut snap);
        snap.rejected.extend(rejected_early);
        Ok(snap)
    }

    /// One directory entry: skipped, rejected (returned), left for later while it settles,
    /// or read into `self.files`. Paths of regular manifest files go into `seen`.
    fn visit(
        &mut self,
        path: PathBuf,
        now: SystemTime,
        snap: &mut Snapshot,
        seen: &mut BTreeSet<PathBuf>,
    ) -> Option<Rejected> {
        let Some(fname) = path.file_name().and_then(|n| n.to_str()) else {
            // No session can be named after it, so no status can carry the error:
            // the log says it once.
            if self.unreadable_names.insert(path.clone()) {
                tracing::warn!(file = %path.display(), "skipping a file whose name is not UTF-8; rename it to serve it");
            }
            return None;
        };
        let is_manifest = fname.ends_with(".yaml") || fname.ends_with(".yml");
        if fname.starts_with('.') || !is_manifest {
            return None;
        }
        let stem = fname.rsplit_once('.').map_or(fname, |(s, _)| s).to_owned();
        // None: vanished between listing and stat.
        let meta = std::fs::symlink_metadata(&path).ok()?;
        if !meta.file_type().is_file() {
            let what = if meta.file_type().is_symlink() {
                "is a symbolic link; only regular files are read"
            } else {
                "is not a regular file"
            };
            return Some(Rejected {
                name: stem,
                origin: path.display().to_string(),
                error: format!("{} {what}", path.display()),
            });
        }
        seen.insert(path.clone());
        let key = FileKey {
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            size: meta.size(),
            ino: meta.ino(),
        };
        if self.files.get(&path).is_some_and(|f| f.key == key) {
            return None; // unchanged since we last read it
        }
        let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        if now
            .duration_since(modified)
            .map_or(true, |age| age < SETTLE)
        {
            snap.unsettled = true; // keep the previous reading until it settles
            if !self.files.contains_key(&path) {
                // Never read (vncd just started, or a new path): until it settles, the
                // session it names is left alone, not taken for deleted.
                snap.protected
                    .insert(claimed_name(&path, meta.size()).unwrap_or(stem));
            }
            return None;
        }
        let result = read_manifest(&path, meta.size(), self.pool).map_err(|e| Unparsed {
            claims: claimed_name(&path, meta.size()),
            error: format!("{}: {e}", path.display()),
        });
        let last_good = match (&result, self.files.remove(&path)) {
            (Ok(p), _) => Some(p.clone()),
            (Err(_), Some(prev)) => prev.last_good,
            (Err(_), None) => None,
        };
        self.files.insert(
            path,
            FileState {
                key,
                result,
                last_good,
            },
        );
        None
    }

    fn assemble(&mut self, snap: &mut Snapshot) {
        // Which file serves each name: the previous owner if it still claims the name.
        let mut claims: BTreeMap<String, Vec<Claim<'_>>> = BTreeMap::new();
        for (path, f) in &self.files {
            match (&f.result, &f.last_good) {
                (Ok(p), _) => claims
                    .entry(p.session.name().to_owned())
                    .or_default()
                    .push((path, p, None)),
                (Err(Unparsed { error, .. }), Some(good)) => {
                    let note =
                        format!("{error}; still serving the last valid version of this file");
                    claims
                        .entry(good.session.name().to_owned())
                        .or_default()
                        .push((path, good, Some(note)));
                }
                (Err(Unparsed { claims, error }), None) => {
                    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned());
                    let name = claims.clone().or(stem).unwrap_or_default();
                    snap.protected.insert(name.clone());
                    snap.rejected.push(Rejected {
                        name,
                        origin: path.display().to_string(),
                        error: error.clone(),
                    });
                }
            }
        }
        let mut owners = BTreeMap::new();
        for (name, mut files) in claims {
            let prev = self.owners.get(&name);
            files.sort_by_key(|(p, ..)| (Some(*p) != prev, (*p).clone()));
            let mut iter = files.into_iter();
            if let Some((path, parsed, note)) = iter.next() {
                owners.insert(name.clone(), path.clone());
                match &parsed.session {
                    Validated::Ready(d) => {
                        snap.desired.insert(name.clone(), d.clone());
                    }
                    Validated::Domain(r) => {
                        snap.unresolved.insert(name.clone(), r.clone());
                    }
                }
                snap.objects.insert(name.clone(), parsed.object.clone());
                if let Some(note) = note {
                    snap.warnings.insert(name.clone(), note);
                }
                for (other, ..) in iter {
                    snap.rejected.push(Rejected {
                        name: name.clone(),
                        origin: other.display().to_string(),
                        error: format!(
                            "{}: duplicate name: session {name:?} is already defined in {}",
                            other.display(),
                            path.display()
                        ),
                    });
                }
            }
        }
        self.owners = owners;
    }
}

fn read_manifest(path: &Path, size: u64, pool: PortRange) -> Result<Parsed, String> {
    if size > MAX_MANIFEST_BYTES {
        return Err(manifest::ManifestError::TooLarge(size).to_string());
    }
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    manifest::parse_bytes(&bytes, pool).map_err(|e| e.to_string())
}

impl Source for DirSource {
    async fn snapshot(&mut self) -> Result<Snapshot, SourceError> {
        self.scan()
    }

    async fn changed(&mut self) {
        if self.events.recv().await.is_none() {
            std::future::pending::<()>().await;
        }
        // Let a burst of events (a hundred files written at once) settle into one pass.
        tokio::time::sleep(Duration::from_millis(50)).await;
        while self.events.try_recv().is_ok() {}
    }
}

/// The name a manifest claims, if it is small enough to read and names one: a file that
/// does not parse still protects the session it names.
fn claimed_name(path: &Path, size: u64) -> Option<String> {
    (size <= MAX_MANIFEST_BYTES)
        .then(|| std::fs::read_to_string(path).ok())
        .flatten()
        .and_then(|t| manifest::claimed_name(&t))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(name: &str, port: u16) -> String {
        format!(
            "apiVersion: vncd.io/v1alpha1\nkind: VncSession\nmetadata:\n  name: {name}\nspec:\n  target:\n    host: 127.0.0.1\n    port: {port}\n"
        )
    }

    fn write_old(path: &Path, text: &str) {
        std::fs::write(path, text).unwrap();
        let old = SystemTime::now() - Duration::from_secs(5);
        std::fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(old)
            .unwrap();
    }

    #[test]
    fn reads_valid_files_and_reports_bad_ones_without_dropping_others() {
        let d = tempfile::tempdir().unwrap();
        write_old(&d.path().join("a.yaml"), &manifest("a", 5901));
        write_old(&d.path().join("b.yml"), "not: [valid");
        write_old(&d.path().join("notes.txt"), "ignored");
        write_old(&d.path().join(".hidden.yaml"), "ignored");
        std::os::unix::fs::symlink("/etc/passwd", d.path().join("evil.yaml")).unwrap();
        let mut src = DirSource::once(d.path(), PortRange::default());
        let snap = src.scan().unwrap();
        assert_eq!(snap.desired.keys().collect::<Vec<_>>(), ["a"]);
        let names: BTreeSet<_> = snap.rejected.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, BTreeSet::from(["b", "evil"]));
        assert!(
            snap.rejected
                .iter()
                .any(|r| r.error.contains("symbolic link"))
        );
        assert!(snap.protected.contains("b"));
    }

    #[test]
    fn a_file_being_written_is_not_read_until_it_settles() {
        let d = tempfile::tempdir().unwrap();
        let mut src = DirSource::once(d.path(), PortRange::default());
        std::fs::write(
            d.path().join("a.yaml"),
            "apiVersion: vncd.io/v1alpha1\nkind: VncSess",
        )
        .unwrap();
        let snap = src.scan().unwrap();
        assert!(snap.unsettled);
        assert!(snap.rejected.is_empty() && snap.desired.is_empty());
        write_old(&d.path().join("a.yaml"), &manifest("a", 5901));
        let snap = src.scan().unwrap();
        assert!(!snap.unsettled);
        assert!(snap.desired.contains_key("a"));
    }

    #[test]
    fn a_file_too_fresh_to_read_at_the_first_scan_protects_its_session() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("vm.yaml"), manifest("vm1", 5901)).unwrap();
        std::fs::write(
            d.path().join("half.yaml"),
            "apiVersion: vncd.io/v1alpha1\nkind: Vnc",
        )
        .unwrap();
        let mut src = DirSource::once(d.path(), PortRange::default());
        let snap = src.scan().unwrap();
        assert!(snap.unsettled && snap.desired.is_empty());
        // Not desired yet, but not gone either: its lease and proxy must be left alone.
        assert_eq!(
            snap.protected,
            BTreeSet::from(["vm1".to_owned(), "half".to_owned()])
        );
    }

    #[test]
    fn a_broken_edit_keeps_serving_the_last_valid_version() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.yaml");
        write_old(&p, &manifest("a", 5901));
        let mut src = DirSource::once(d.path(), PortRange::default());
        src.scan().unwrap();
        write_old(&p, &manifest("a", 5901).replace("port: 5901", "port: nope"));
        let snap = src.scan().unwrap();
        assert!(snap.desired.contains_key("a"));
        assert!(
            snap.warnings["a"].contains("still serving"),
            "{:?}",
            snap.warnings
        );
    }

    #[test]
    fn duplicate_names_keep_the_first_owner() {
        let d = tempfile::tempdir().unwrap();
        write_old(&d.path().join("z.yaml"), &manifest("vm", 5901));
        let mut src = DirSource::once(d.path(), PortRange::default());
        assert_eq!(
            src.scan().unwrap().desired["vm"].target.to_string(),
            "127.0.0.1:5901"
        );
        // A file sorting earlier claims the same name later: it is the duplicate.
        write_old(&d.path().join("a.yaml"), &manifest("vm", 5902));
        let snap = src.scan().unwrap();
        assert_eq!(snap.desired["vm"].target.to_string(), "127.0.0.1:5901");
        assert_eq!(snap.rejected.len(), 1);
        assert!(
            snap.rejected[0].error.contains("duplicate name"),
            "{:?}",
            snap.rejected
        );
        assert!(snap.rejected[0].origin.ends_with("a.yaml"));
    }

    #[test]
    fn removed_files_drop_their_sessions() {
        let d = tempfile::tempdir().unwrap();
        write_old(&d.path().join("a.yaml"), &manifest("a", 5901));
        let mut src = DirSource::once(d.path(), PortRange::default());
        assert_eq!(src.scan().unwrap().desired.len(), 1);
        std::fs::remove_file(d.path().join("a.yaml")).unwrap();
        assert!(src.scan().unwrap().desired.is_empty());
    }

    #[tokio::test]
    async fn reading_the_directory_is_not_a_change_but_writing_a_manifest_is() {
        let d = tempfile::tempdir().unwrap();
        write_old(&d.path().join("a.yaml"), &manifest("a", 5901));
        let mut src = DirSource::watch(d.path(), PortRange::default()).unwrap();
        // Our own scans open the directory and read the file: no event may come of it,
        // or every pass would trigger the next one and an idle vncd would never rest.
        for _ in 0..3 {
            src.scan().unwrap();
        }
        let quiet = tokio::time::timeout(Duration::from_millis(500), src.changed()).await;
        assert!(quiet.is_err(), "a scan was reported as a change");
        std::fs::write(d.path().join("b.yaml"), manifest("b", 5901)).unwrap();
        tokio::time::timeout(Duration::from_secs(5), src.changed())
            .await
            .expect("a new manifest is reported");
    }

    #[test]
    fn an_unreadable_directory_is_an_error_not_an_empty_snapshot() {
        let mut src = DirSource::once(Path::new("/nonexistent/vncd-test"), PortRange::default());
        assert!(src.scan().is_err());
    }
}
