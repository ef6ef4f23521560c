//! Manifest changes from the file watcher, each with when to act on it. A manifest whose
//! writer is done (closed after writing, renamed or linked into place) is read at once: no
//! debounce on the path of a new manifest. A file still being written, or removed, is read
//! once it has been quiet for [`SETTLE`]: an editor's save is several events, and a file
//! caught half-written or briefly absent must not delete its objects.

use super::store::is_manifest_path;
use notify::EventKind;
use notify::event::{AccessKind, AccessMode, ModifyKind};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::time::Instant;

/// How long a file being written or removed must be quiet before it is read.
pub const SETTLE: Duration = Duration::from_millis(250);

#[derive(Debug, PartialEq)]
pub enum Change {
    /// Read this manifest file at the given time (or at once, if that has passed).
    File(PathBuf, Instant),
    /// The watcher lost events or a folder changed: read the whole directory.
    Rescan,
    /// Read the whole directory again at this time: files written into a new folder before
    /// the watcher watched it raise no event of their own.
    RescanAt(Instant),
}

/// The changes one watcher event means (none for reads, our own writes under hidden folders,
/// and files that are not manifests).
pub fn classify(root: &Path, event: &notify::Result<notify::Event>, now: Instant) -> Vec<Change> {
    let ev = match event {
        Ok(ev) => ev,
        Err(_) => return vec![Change::Rescan],
    };
    if ev.need_rescan() {
        return vec![Change::Rescan];
    }
    let mut out = vec![];
    for path in &ev.paths {
        let hidden = path.strip_prefix(root).map_or(true, |rel| {
            rel.components()
                .any(|c| c.as_os_str().to_string_lossy().starts_with('.'))
        });
        if hidden {
            continue;
        }
        if !is_manifest_path(root, path) {
            // A folder created, removed or renamed: its manifests came or went with it.
            if matches!(
                ev.kind,
                EventKind::Create(_)
                    | EventKind::Remove(_)
                    | EventKind::Modify(ModifyKind::Name(_))
            ) && !path.is_file()
            {
                out.push(Change::Rescan);
                if !matches!(ev.kind, EventKind::Remove(_)) {
                    out.push(Change::RescanAt(now + SETTLE));
                }
            }
            continue;
        }
        let at = match ev.kind {
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => now,
            EventKind::Access(_) => continue,
            // Linked or renamed into place: complete. Created empty: its data is coming.
            EventKind::Create(_) | EventKind::Modify(ModifyKind::Name(_)) => {
                if std::fs::metadata(path).is_ok_and(|m| m.len() > 0) {
                    now
                } else {
                    now + SETTLE
                }
            }
            _ => now + SETTLE,
        };
        out.push(Change::File(path.clone(), at));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{CreateKind, DataChange, RemoveKind};

    fn event(kind: EventKind, path: &Path) -> notify::Result<notify::Event> {
        Ok(notify::Event::new(kind).add_path(path.to_path_buf()))
    }

    #[test]
    fn finished_writes_are_read_at_once_and_the_rest_after_settling() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let full = root.join("a.yaml");
        std::fs::write(&full, "kind: SlurmAsset\n").unwrap();
        let empty = root.join("b.yaml");
        std::fs::write(&empty, "").unwrap();
        let now = Instant::now();
        let at = |kind, path: &Path| classify(root, &event(kind, path), now);
        let closed = EventKind::Access(AccessKind::Close(AccessMode::Write));
        assert_eq!(at(closed, &full), [Change::File(full.clone(), now)]);
        assert_eq!(
            at(EventKind::Create(CreateKind::File), &full),
            [Change::File(full.clone(), now)],
            "linked into place"
        );
        assert_eq!(
            at(EventKind::Create(CreateKind::File), &empty),
            [Change::File(empty.clone(), now + SETTLE)],
            "created empty: the data is still coming"
        );
        assert_eq!(
            at(EventKind::Modify(ModifyKind::Data(DataChange::Any)), &full),
            [Change::File(full.clone(), now + SETTLE)]
        );
        assert_eq!(
            at(EventKind::Remove(RemoveKind::File), &root.join("gone.yaml")),
            [Change::File(root.join("gone.yaml"), now + SETTLE)]
        );
        // Reads, our own status files and other files are no change.
        assert!(at(EventKind::Access(AccessKind::Read), &full).is_empty());
        assert!(at(closed, &root.join(".status/x.yaml")).is_empty());
        assert!(at(closed, &root.join("notes.txt")).is_empty());
        // A folder removed: rescan.
        assert_eq!(
            at(EventKind::Remove(RemoveKind::Folder), &root.join("sub")),
            [Change::Rescan]
        );
        // A folder created: rescan now, and once more when files written into it before it
        // was watched have landed.
        std::fs::create_dir(root.join("new")).unwrap();
        assert_eq!(
            at(EventKind::Create(CreateKind::Folder), &root.join("new")),
            [Change::Rescan, Change::RescanAt(now + SETTLE)]
        );
        assert_eq!(
            classify(root, &Err(notify::Error::generic("overflow")), now),
            [Change::Rescan]
        );
    }
}
