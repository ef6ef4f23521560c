//! Which manifest file defines which object: what lets a change to one file cost work in
//! proportion to that file, not to the directory. Pure: fed the objects a file holds, it says
//! what changed.

use super::store::{ObjectKey, duplicate_error};
use crate::manifest::{Loaded, ManifestError};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Objects and errors by file.
#[derive(Debug, Default)]
pub struct ManifestIndex {
    /// The keys each file defines (the first definition of a key wins).
    sources: HashMap<PathBuf, Vec<ObjectKey>>,
    /// The file and document that define each key.
    owner: HashMap<ObjectKey, (PathBuf, usize)>,
    errors: BTreeMap<PathBuf, Vec<ManifestError>>,
}

/// What a file's new content changes.
#[derive(Debug, Default)]
pub struct FileChange {
    /// Objects the file defines now (new or possibly changed).
    pub upserts: Vec<Loaded>,
    /// Objects the file defined and no longer does.
    pub removed: Vec<ObjectKey>,
}

impl ManifestIndex {
    /// The index of a full scan's objects (errors come from the scan as they are).
    pub fn of_scan<'a>(
        objects: impl Iterator<Item = &'a Loaded>,
        errors: &[ManifestError],
    ) -> Self {
        let mut index = ManifestIndex::default();
        for obj in objects {
            let key = obj.key();
            index
                .sources
                .entry(obj.file.clone())
                .or_default()
                .push(key.clone());
            index.owner.insert(key, (obj.file.clone(), obj.document));
        }
        for e in errors {
            index
                .errors
                .entry(e.file.clone())
                .or_default()
                .push(e.clone());
        }
        index
    }

    /// Takes a file's current content: `objects` and `errors` as read from it (none: the
    /// file is gone).
    pub fn apply_file(
        &mut self,
        file: &Path,
        objects: Vec<Loaded>,
        mut errors: Vec<ManifestError>,
    ) -> FileChange {
        let old = self.sources.remove(file).unwrap_or_default();
        // A file that does not read or parse cleanly (say, caught half-written) removes
        // nothing: an object it defined keeps running until the file says otherwise.
        let hold = !errors.is_empty();
        let mut change = FileChange::default();
        let mut keys = vec![];
        for obj in objects {
            let key = obj.key();
            match self.owner.get(&key) {
                Some((f, doc)) if f != file => {
                    let first = Loaded {
                        file: f.clone(),
                        document: *doc,
                        ..obj.clone()
                    };
                    errors.push(duplicate_error(&obj, &first));
                }
                _ if keys.contains(&key) => {
                    let (f, doc) = self.owner[&key].clone();
                    let first = Loaded {
                        file: f,
                        document: doc,
                        ..obj.clone()
                    };
                    errors.push(duplicate_error(&obj, &first));
                }
                _ => {
                    self.owner
                        .insert(key.clone(), (file.to_path_buf(), obj.document));
                    keys.push(key);
                    change.upserts.push(obj);
                }
            }
        }
        for key in old {
            if keys.contains(&key) {
                continue;
            }
            if hold {
                keys.push(key);
            } else {
                self.owner.remove(&key);
                change.removed.push(key);
            }
        }
        if keys.is_empty() {
            self.sources.remove(file);
        } else {
            self.sources.insert(file.to_path_buf(), keys);
        }
        if errors.is_empty() {
            self.errors.remove(file);
        } else {
            self.errors.insert(file.to_path_buf(), errors);
        }
        change
    }

    /// Every file's errors, by file.
    pub fn errors(&self) -> Vec<ManifestError> {
        self.errors.values().flatten().cloned().collect()
    }

    #[cfg(test)]
    pub fn defines(&self, file: &Path) -> bool {
        self.sources.contains_key(file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{StoreKind, parse_file};

    fn objects(file: &str, text: &str) -> (Vec<Loaded>, Vec<ManifestError>) {
        let mut objs = vec![];
        let mut errs = vec![];
        for d in parse_file(Path::new(file), text, StoreKind::Standalone) {
            match d {
                Ok(o) => objs.push(o),
                Err(e) => errs.push(e),
            }
        }
        (objs, errs)
    }

    fn asset(name: &str, cmd: &str) -> String {
        format!(
            "apiVersion: dagster-slurm.io/v1alpha1\nkind: SlurmAsset\nmetadata: {{name: {name}}}\n\
             spec: {{assetKey: a/{name}, payload: {{inline: {cmd:?}}}}}\n"
        )
    }

    fn names(keys: &[ObjectKey]) -> Vec<&str> {
        keys.iter().map(|k| k.name.as_str()).collect()
    }

    #[test]
    fn a_file_change_reports_only_that_files_objects() {
        let mut index = ManifestIndex::default();
        let (o, e) = objects(
            "/d/x.yaml",
            &format!("{}---\n{}", asset("a", "true"), asset("b", "true")),
        );
        let c = index.apply_file(Path::new("/d/x.yaml"), o, e);
        assert_eq!(c.upserts.len(), 2);
        assert!(c.removed.is_empty());
        // One document removed from the file: that object alone is removed.
        let (o, e) = objects("/d/x.yaml", &asset("a", "false"));
        let c = index.apply_file(Path::new("/d/x.yaml"), o, e);
        assert_eq!(c.upserts.len(), 1);
        assert_eq!(names(&c.removed), ["b"]);
        // The file gone: its last object goes too.
        let c = index.apply_file(Path::new("/d/x.yaml"), vec![], vec![]);
        assert_eq!(names(&c.removed), ["a"]);
        assert!(!index.defines(Path::new("/d/x.yaml")));
    }

    #[test]
    fn a_name_defined_elsewhere_is_a_duplicate_and_keeps_its_first_definition() {
        let mut index = ManifestIndex::default();
        let (o, e) = objects("/d/x.yaml", &asset("a", "true"));
        index.apply_file(Path::new("/d/x.yaml"), o, e);
        let (o, e) = objects("/d/y.yaml", &asset("a", "false"));
        let c = index.apply_file(Path::new("/d/y.yaml"), o, e);
        assert!(c.upserts.is_empty() && c.removed.is_empty());
        let errors = index.errors();
        assert_eq!(errors.len(), 1);
        assert!(errors[0].reason.contains("duplicate") && errors[0].reason.contains("x.yaml"));
        // Fixing the second file clears its error; the first definition never moved.
        let c = index.apply_file(Path::new("/d/y.yaml"), vec![], vec![]);
        assert!(c.removed.is_empty());
        assert!(index.errors().is_empty());
        assert!(index.defines(Path::new("/d/x.yaml")));
    }

    #[test]
    fn a_file_that_stops_parsing_removes_nothing() {
        let mut index = ManifestIndex::default();
        let (o, e) = objects("/d/x.yaml", &asset("a", "true"));
        index.apply_file(Path::new("/d/x.yaml"), o, e);
        let (o, e) = objects(
            "/d/x.yaml",
            "apiVersion: dagster-slurm.io/v1alpha1\nkind: [",
        );
        let c = index.apply_file(Path::new("/d/x.yaml"), o, e);
        assert!(c.removed.is_empty(), "a half-written file must not delete");
        assert_eq!(index.errors().len(), 1);
        // Once it parses without the object, the object is removed.
        let c = index.apply_file(Path::new("/d/x.yaml"), vec![], vec![]);
        assert_eq!(names(&c.removed), ["a"]);
    }

    #[test]
    fn errors_are_kept_per_file_and_replaced_on_change() {
        let mut index = ManifestIndex::default();
        let (o, e) = objects("/d/bad.yaml", "kind: [");
        assert!(!e.is_empty());
        index.apply_file(Path::new("/d/bad.yaml"), o, e);
        assert_eq!(index.errors().len(), 1);
        let (o, e) = objects("/d/bad.yaml", &asset("c", "true"));
        let c = index.apply_file(Path::new("/d/bad.yaml"), o, e);
        assert_eq!(c.upserts.len(), 1);
        assert!(index.errors().is_empty());
    }
}
