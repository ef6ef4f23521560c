//! The directory store: manifests in, status files out.
//!
//! Reads every `*.yaml`/`*.yml` under the directory (recursively; hidden folders such as
//! `.status` and `.runs` are skipped) and keeps one status file per object at
//! `.status/<namespace>/<Kind>/<name>.yaml`, written atomically (temp file + rename).

use crate::api::API_VERSION;
use crate::manifest::{Kind, Loaded, ManifestError, StoreKind, parse_file};
use crate::{Error, Result, files, limits};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const STATUS_DIR: &str = ".status";
pub const ERRORS_FILE: &str = "errors.yaml";
pub const ANN_SPEC_HASH: &str = "dagster-slurm.io/spec-hash";
pub const ANN_SOURCE: &str = "dagster-slurm.io/source";
pub const ANN_ASSET_KEY: &str = "dagster-slurm.io/asset-key";
pub const ANN_CLUSTER: &str = "dagster-slurm.io/cluster";

/// Identity of an object in the store.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.kind.as_str(), self.namespace, self.name)
    }
}

impl Loaded {
    pub fn key(&self) -> ObjectKey {
        ObjectKey {
            kind: self.kind,
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }
}

/// Everything one scan found.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub objects: BTreeMap<ObjectKey, Loaded>,
    pub errors: Vec<ManifestError>,
}

/// What a status file remembers about an object across operator restarts.
#[derive(Clone, Debug, PartialEq)]
pub struct Stored {
    pub uid: String,
    pub generation: i64,
    pub spec_hash: String,
    pub deleted: bool,
    /// `spec.clusterRef` of the object as last seen: where its job runs even after its
    /// manifest is gone.
    pub cluster_ref: Option<String>,
    pub status: Value,
}

/// Reads all manifests under `dir`. Files are visited in sorted order, so when two documents
/// claim one name the first (by path) keeps it and the later one gets the error.
pub fn scan(dir: &Path) -> Snapshot {
    let mut snap = Snapshot::default();
    let mut files = vec![];
    let root = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let mut truncated = false;
    collect(&root, 0, &mut files, &mut truncated);
    if truncated {
        snap.errors.push(ManifestError {
            file: dir.to_path_buf(),
            document: None,
            reason: format!(
                "more than {} manifest files or folders deeper than {}: the rest are ignored",
                limits::MAX_MANIFEST_FILES,
                limits::MAX_DIR_DEPTH
            ),
        });
    }
    files.sort();
    for file in files {
        let (objects, errors) = read_manifests(&root, &file);
        snap.errors.extend(errors);
        for obj in objects {
            let key = obj.key();
            if let Some(first) = snap.objects.get(&key) {
                snap.errors.push(duplicate_error(&obj, first));
            } else {
                snap.objects.insert(key, obj);
            }
        }
    }
    snap
}

/// The objects one manifest file defines, and its errors. A file that is gone defines none.
pub fn read_manifests(root: &Path, file: &Path) -> (Vec<Loaded>, Vec<ManifestError>) {
    let error = |reason: String| ManifestError {
        file: file.to_path_buf(),
        document: None,
        reason,
    };
    // Regular files inside the directory only (symlinks are followed but confined), never
    // larger than the cap: a FIFO, /dev/zero or a 200 MB file cannot stall the operator.
    let text = match files::read_confined(root, file, limits::MAX_MANIFEST_BYTES) {
        Ok(bytes) => match String::from_utf8(bytes) {
            Ok(t) => t,
            Err(_) => return (vec![], vec![error("not UTF-8 text".into())]),
        },
        Err(files::ReadError::Missing(_)) if fs::symlink_metadata(file).is_err() => {
            return (vec![], vec![]);
        }
        Err(e) => {
            return (
                vec![],
                vec![error(format!("not read: {}", reason_only(&e)))],
            );
        }
    };
    let mut objects = vec![];
    let mut errors = vec![];
    for doc in parse_file(file, &text, StoreKind::Standalone) {
        match doc {
            Err(e) => errors.push(e),
            Ok(obj) => objects.push(obj),
        }
    }
    (objects, errors)
}

/// The error of a document that names an object another document defined first.
pub fn duplicate_error(obj: &Loaded, first: &Loaded) -> ManifestError {
    let key = obj.key();
    ManifestError {
        file: obj.file.clone(),
        document: Some(obj.document),
        reason: format!(
            "metadata.name: duplicate {} {:?} in namespace {:?}, already defined in {} (document {}); this one is ignored",
            key.kind.as_str(),
            key.name,
            key.namespace,
            first.file.display(),
            first.document
        ),
    }
}

/// Whether a path is one the store reads as a manifest (under `root`, no hidden component,
/// a `.yaml`/`.yml` name).
pub fn is_manifest_path(root: &Path, path: &Path) -> bool {
    path.strip_prefix(root).is_ok_and(|rel| {
        !rel.components()
            .any(|c| c.as_os_str().to_string_lossy().starts_with('.'))
            && rel.components().count() <= limits::MAX_DIR_DEPTH + 1
    }) && path
        .file_name()
        .map(|n| n.to_string_lossy())
        .is_some_and(|n| n.ends_with(".yaml") || n.ends_with(".yml"))
}

/// The reason of a read error without the path (the manifest error names the file already).
fn reason_only(e: &files::ReadError) -> String {
    use files::ReadError::*;
    match e {
        Missing(_) => "it does not exist or its link is broken".into(),
        Outside(_, root) => format!("it resolves outside {root}"),
        NotRegular(_) => "not a regular file".into(),
        TooLarge(_, cap) => format!("larger than the limit of {cap} bytes"),
        Io(_, why) => why.clone(),
    }
}

fn collect(dir: &Path, depth: usize, out: &mut Vec<PathBuf>, truncated: &mut bool) {
    if depth > limits::MAX_DIR_DEPTH {
        *truncated = true;
        return;
    }
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') {
            continue;
        }
        let Ok(ft) = e.file_type() else { continue };
        // Symlinked folders are not followed (no loops, no escapes).
        if ft.is_dir() {
            collect(&path, depth + 1, out, truncated);
        } else if name.ends_with(".yaml") || name.ends_with(".yml") {
            // Counted after hidden entries are skipped: `.status` is not a manifest.
            if out.len() >= limits::MAX_MANIFEST_FILES {
                *truncated = true;
                return;
            }
            out.push(path);
        }
    }
}

/// Longest object name kept whole in a status file name (file names stop at 255 bytes).
const MAX_PLAIN_NAME: usize = 200;

pub fn status_path(dir: &Path, key: &ObjectKey) -> PathBuf {
    dir.join(STATUS_DIR)
        .join(&key.namespace)
        .join(key.kind.as_str())
        .join(status_file_name(&key.name))
}

/// `<name>.yaml`; a long name is cut and completed with a hash of the whole name.
fn status_file_name(name: &str) -> String {
    if name.len() <= MAX_PLAIN_NAME {
        return format!("{name}.yaml");
    }
    let hash = crate::manifest::hash_value(&json!(name));
    format!("{}-{hash}.yaml", &name[..MAX_PLAIN_NAME])
}

/// Reads an object's status file, if any.
pub fn read_stored(dir: &Path, key: &ObjectKey) -> Option<Stored> {
    read_stored_at(&status_path(dir, key))
}

/// Reads the status file at `path`, if any.
pub fn read_stored_at(path: &Path) -> Option<Stored> {
    let text = read_status_text(path)?;
    let v: Value = serde_saphyr::from_str(&text).ok()?;
    let meta = v.get("metadata")?;
    let ann = |k: &str| {
        meta.get("annotations")
            .and_then(|a| a.get(k))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    Some(Stored {
        uid: meta.get("uid")?.as_str()?.to_string(),
        generation: meta.get("generation").and_then(Value::as_i64).unwrap_or(1),
        spec_hash: ann(ANN_SPEC_HASH).unwrap_or_default(),
        deleted: meta.get("deletionTimestamp").is_some(),
        cluster_ref: ann(ANN_CLUSTER),
        status: v.get("status").cloned().unwrap_or(Value::Null),
    })
}

/// Status files are the operator's own, but live in a user's directory: read them as carefully.
const MAX_STATUS_FILE: u64 = 8 << 20;

fn read_status_text(path: &Path) -> Option<String> {
    files::read_regular(path, MAX_STATUS_FILE)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
}

/// Renders a whole object as its status file holds it.
pub fn render_object(
    key: &ObjectKey,
    stored: &Stored,
    source: Option<&Path>,
    asset_key: Option<&str>,
    labels: Option<&BTreeMap<String, String>>,
    deleted_at: Option<jiff::Timestamp>,
) -> Result<String> {
    let mut annotations = serde_json::Map::new();
    annotations.insert(ANN_SPEC_HASH.into(), json!(stored.spec_hash));
    if let Some(s) = source {
        annotations.insert(ANN_SOURCE.into(), json!(s.display().to_string()));
    }
    if let Some(a) = asset_key {
        annotations.insert(
            ANN_ASSET_KEY.into(),
            json!(limits::truncate(a, limits::MAX_ASSET_KEY)),
        );
    }
    if let Some(c) = &stored.cluster_ref {
        annotations.insert(ANN_CLUSTER.into(), json!(c));
    }
    let mut metadata = json!({
        "name": key.name,
        "namespace": key.namespace,
        "uid": stored.uid,
        "generation": stored.generation,
        "annotations": annotations,
    });
    if let Some(l) = labels.filter(|l| !l.is_empty()) {
        metadata["labels"] = json!(l);
    }
    if let Some(t) = deleted_at {
        metadata["deletionTimestamp"] = json!(t.to_string());
    }
    let obj = json!({
        "apiVersion": API_VERSION,
        "kind": key.kind.as_str(),
        "metadata": metadata,
        "status": stored.status,
    });
    serde_saphyr::to_string(&obj).map_err(|e| Error::Serialize {
        what: key.to_string(),
        reason: e.to_string(),
    })
}

/// Permissions of what the operator writes under a directory: never more readable than the
/// directory itself (a private directory gets private status files).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Modes {
    pub file: u32,
    pub dir: u32,
}

impl Modes {
    pub fn of(dir: &Path) -> Modes {
        use std::os::unix::fs::PermissionsExt;
        let m = fs::metadata(dir)
            .map(|m| m.permissions().mode())
            .unwrap_or(0o700);
        Modes {
            file: m & 0o644,
            dir: (m & 0o755) | 0o700,
        }
    }
}

impl Default for Modes {
    fn default() -> Self {
        Modes {
            file: 0o600,
            dir: 0o700,
        }
    }
}

static TMP_COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Writes `content` to `path` atomically: a temp file in the same folder, then rename. The
/// temp name is short, so that any file name that fits also fits its temp file.
pub fn write_atomic(path: &Path, content: &str, modes: Modes) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    let parent = path.parent().unwrap_or(Path::new("."));
    fs::DirBuilder::new()
        .recursive(true)
        .mode(modes.dir)
        .create(parent)
        .map_err(|e| Error::io(parent, e))?;
    let tmp = parent.join(format!(
        ".tmp-{}-{}",
        std::process::id(),
        TMP_COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(modes.file)
        .open(&tmp)
        .map_err(|e| Error::io(&tmp, e))?;
    // The umask may have narrowed the mode; a pre-existing file may have a wider one.
    f.set_permissions(fs::Permissions::from_mode(modes.file))
        .and_then(|_| f.write_all(content.as_bytes()))
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::io(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

/// Writes `.status/errors.yaml`: the manifest errors that no object's status can carry.
pub fn write_errors(dir: &Path, errors: &[ManifestError], modes: Modes) -> Result<()> {
    let list: Vec<Value> = errors
        .iter()
        .map(|e| {
            json!({
                "file": e.file.display().to_string(),
                "document": e.document,
                "message": e.to_string(),
            })
        })
        .collect();
    let text =
        serde_saphyr::to_string(&json!({ "errors": list })).map_err(|e| Error::Serialize {
            what: ERRORS_FILE.into(),
            reason: e.to_string(),
        })?;
    let path = dir.join(STATUS_DIR).join(ERRORS_FILE);
    if fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
        write_atomic(&path, &text, modes)?;
    }
    Ok(())
}

/// Reads every status file of `kind` under `dir` (for the `status` command and the sensor).
pub fn list_status_files(dir: &Path, kind: Kind) -> Vec<(PathBuf, Value)> {
    let mut out = vec![];
    visit_status_files(dir, kind, |p, text| {
        if let Ok(v) = serde_saphyr::from_str::<Value>(text) {
            out.push((p.to_path_buf(), v));
        }
    });
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// The objects that have a status file of this kind, read one file at a time (only their
/// names are kept: at start-up over 10,000 objects, holding every parsed file would cost
/// more memory than the operator needs afterwards).
pub fn status_keys(dir: &Path, kind: Kind) -> Vec<ObjectKey> {
    #[derive(serde::Deserialize)]
    struct Meta {
        namespace: Option<String>,
        name: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct Head {
        metadata: Meta,
    }
    let mut keys = vec![];
    visit_status_files(dir, kind, |_, text| {
        if let Ok(Head { metadata }) = serde_saphyr::from_str::<Head>(text)
            && let Some(name) = metadata.name.filter(|n| !n.is_empty())
        {
            keys.push(ObjectKey {
                kind,
                namespace: metadata.namespace.unwrap_or_else(|| "default".into()),
                name,
            });
        }
    });
    keys.sort();
    keys
}

fn visit_status_files(dir: &Path, kind: Kind, mut visit: impl FnMut(&Path, &str)) {
    let root = dir.join(STATUS_DIR);
    let Ok(namespaces) = fs::read_dir(&root) else {
        return;
    };
    for ns in namespaces.flatten() {
        let kdir = ns.path().join(kind.as_str());
        let Ok(files) = fs::read_dir(&kdir) else {
            continue;
        };
        for f in files.flatten() {
            let p = f.path();
            if p.extension().is_some_and(|e| e == "yaml")
                && let Some(text) = read_status_text(&p)
            {
                visit(&p, &text);
            }
        }
    }
}

/// Remembers what was last written per path, so unchanged status is never rewritten.
#[derive(Default, Debug)]
pub struct WriteCache {
    /// Length and hash of the last content written per path: a fingerprint, not the
    /// content, so that 10,000 tracked objects do not keep 10,000 status files in memory.
    last: HashMap<PathBuf, (usize, u64)>,
    pub modes: Modes,
}

fn fingerprint(content: &str) -> (usize, u64) {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    content.hash(&mut h);
    (content.len(), h.finish())
}

impl WriteCache {
    pub fn new(modes: Modes) -> Self {
        WriteCache {
            last: HashMap::new(),
            modes,
        }
    }

    /// Writes when the content differs from the last write (or from the file on disk).
    pub fn write(&mut self, path: &Path, content: String) -> Result<bool> {
        let print = fingerprint(&content);
        let same = match self.last.get(path) {
            Some(prev) => *prev == print,
            None => read_status_text(path).as_deref() == Some(content.as_str()),
        };
        if !same {
            write_atomic(path, &content, self.modes)?;
        }
        self.last.insert(path.to_path_buf(), print);
        Ok(!same)
    }
}
