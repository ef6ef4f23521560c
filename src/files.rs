//! Reading files that users name: manifests and payload scripts. Every such read goes through
//! [`read_confined`]: the file must resolve (symlinks followed) to a regular file inside a
//! root directory, it is opened without blocking (a FIFO never hangs the operator) and read up
//! to a size cap. Errors name the path and the reason, never the file's contents.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Why a user-named file was not read. The message never quotes the file.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    #[error("{0}: does not exist or cannot be resolved")]
    Missing(String),
    #[error("{0}: resolves outside {1} (only files inside it may be read)")]
    Outside(String, String),
    #[error("{0}: not a regular file")]
    NotRegular(String),
    #[error("{0}: larger than the limit of {1} bytes")]
    TooLarge(String, u64),
    #[error("{0}: cannot be read: {1}")]
    Io(String, String),
}

/// The rest of `p` after a leading `~`, `$HOME` or `${HOME}` (and its `/`), if it has one:
/// the one spelling of "in the home directory", locally and on a cluster.
pub fn home_relative(p: &str) -> Option<&str> {
    ["~", "$HOME", "${HOME}"].iter().find_map(|h| {
        let r = p.strip_prefix(h)?;
        (r.is_empty() || r.starts_with('/')).then(|| r.trim_start_matches('/'))
    })
}

/// A local path as users write it (no shell expands it for us): `~`, `~/x`, `$HOME/x` and
/// `${HOME}/x` start at the home directory (`HOME`); relative paths at `dir`.
pub fn expand_home(dir: &Path, p: &str) -> PathBuf {
    match home_relative(p) {
        Some(rest) => {
            let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/"), PathBuf::from);
            if rest.is_empty() {
                home
            } else {
                home.join(rest)
            }
        }
        None => dir.join(p),
    }
}

/// Reads `path` (relative paths are taken from `root`) when it resolves, after following
/// every symlink, to a regular file under `root`, of at most `cap` bytes.
pub fn read_confined(root: &Path, path: &Path, cap: u64) -> Result<Vec<u8>, ReadError> {
    let (f, shown) = open_confined(root, path, cap)?;
    read_capped(f, &shown, cap)
}

/// Checks, without reading it, that [`read_confined`] would accept the file.
pub fn check_confined(root: &Path, path: &Path, cap: u64) -> Result<(), ReadError> {
    open_confined(root, path, cap).map(|_| ())
}

/// Opens what [`read_confined`] reads; errors name the path as the user wrote it.
fn open_confined(root: &Path, path: &Path, cap: u64) -> Result<(File, String), ReadError> {
    let shown = path.display().to_string();
    let root = root
        .canonicalize()
        .map_err(|_| ReadError::Missing(root.display().to_string()))?;
    let resolved = resolve_confined(&root, path)?;
    Ok((open_capped(&resolved, &shown, cap)?, shown))
}

/// The canonical path of `path` (relative to `root`), if it lies under the canonical `root`.
pub fn resolve_confined(root: &Path, path: &Path) -> Result<PathBuf, ReadError> {
    let shown = path.display().to_string();
    let full = if path.is_absolute() {
        path.to_path_buf()
    } else {
        root.join(path)
    };
    let resolved = full
        .canonicalize()
        .map_err(|_| ReadError::Missing(shown.clone()))?;
    if !resolved.starts_with(root) {
        return Err(ReadError::Outside(shown, root.display().to_string()));
    }
    Ok(resolved)
}

/// Reads a regular file of at most `cap` bytes. Opened with `O_NONBLOCK | O_NOCTTY`, so that a
/// FIFO or a device never blocks; anything but a regular file is refused before reading.
pub fn read_regular(path: &Path, cap: u64) -> Result<Vec<u8>, ReadError> {
    let shown = path.display().to_string();
    read_capped(open_capped(path, &shown, cap)?, &shown, cap)
}

/// Opens `path` for reading if it is a regular file, without blocking on special files.
pub fn open_regular(path: &Path) -> Result<File, ReadError> {
    open_capped(path, &path.display().to_string(), u64::MAX)
}

/// Opens a regular file of at most `cap` bytes; errors name it `shown`.
fn open_capped(path: &Path, shown: &str, cap: u64) -> Result<File, ReadError> {
    let io = |e: std::io::Error| ReadError::Io(shown.to_string(), e.kind().to_string());
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ReadError::Missing(shown.to_string()),
            _ => io(e),
        })?;
    let meta = f.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(ReadError::NotRegular(shown.to_string()));
    }
    if meta.len() > cap {
        return Err(ReadError::TooLarge(shown.to_string(), cap));
    }
    Ok(f)
}

/// Reads an opened file, never past `cap` bytes (it may grow while it is read).
fn read_capped(f: File, shown: &str, cap: u64) -> Result<Vec<u8>, ReadError> {
    let mut buf = Vec::new();
    f.take(cap + 1)
        .read_to_end(&mut buf)
        .map_err(|e| ReadError::Io(shown.to_string(), e.kind().to_string()))?;
    if buf.len() as u64 > cap {
        return Err(ReadError::TooLarge(shown.to_string(), cap));
    }
    Ok(buf)
}

/// Writes a private (0600) file of credential material once: a file already holding `content`
/// is left alone (no rewrite under a reader's feet), and a new one is written to a temp file
/// and renamed into place, so that ssh never reads it half-written.
pub fn write_private_once(path: &Path, content: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    if read_regular(path, 1 << 20).is_ok_and(|old| old == content) {
        return Ok(());
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".write-")
        .permissions(std::fs::Permissions::from_mode(0o600))
        .tempfile_in(dir)?;
    tmp.write_all(content)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn home_is_expanded_in_local_paths() {
        let home = PathBuf::from(std::env::var_os("HOME").unwrap());
        let dir = Path::new("/manifests");
        assert_eq!(expand_home(dir, "~/.ssh/id"), home.join(".ssh/id"));
        assert_eq!(expand_home(dir, "$HOME/.ssh/id"), home.join(".ssh/id"));
        assert_eq!(expand_home(dir, "${HOME}/k"), home.join("k"));
        assert_eq!(expand_home(dir, "~"), home);
        assert_eq!(expand_home(dir, "keys/id"), dir.join("keys/id"));
        assert_eq!(expand_home(dir, "/etc/k"), PathBuf::from("/etc/k"));
        // Another user's home and look-alikes are not ours to guess.
        assert_eq!(expand_home(dir, "~bob/k"), dir.join("~bob/k"));
        assert_eq!(expand_home(dir, "$HOMEX/k"), dir.join("$HOMEX/k"));
    }

    #[test]
    fn confinement_size_and_special_files() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let r = root.path();
        std::fs::write(r.join("ok.sh"), "echo ok").unwrap();
        std::fs::write(outside.path().join("secret"), "TOPSECRET").unwrap();
        std::fs::create_dir(r.join("sub")).unwrap();
        symlink(r.join("ok.sh"), r.join("sub/inside-link")).unwrap();
        symlink(outside.path().join("secret"), r.join("escape")).unwrap();
        symlink("/dev/zero", r.join("zero")).unwrap();
        let fifo = r.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);

        assert_eq!(
            read_confined(r, Path::new("ok.sh"), 100).unwrap(),
            b"echo ok"
        );
        assert_eq!(
            read_confined(r, Path::new("sub/inside-link"), 100).unwrap(),
            b"echo ok"
        );
        for bad in ["escape", "../x", "/etc/passwd", "zero", "fifo", "sub"] {
            let e = read_confined(r, Path::new(bad), 100).unwrap_err();
            assert!(!e.to_string().contains("TOPSECRET"), "{e}");
            assert!(e.to_string().starts_with(bad), "{bad}: {e}");
        }
        assert!(matches!(
            read_confined(r, Path::new("escape"), 100),
            Err(ReadError::Outside(..))
        ));
        assert!(matches!(
            read_confined(r, Path::new("fifo"), 100),
            Err(ReadError::NotRegular(_))
        ));
        assert!(matches!(
            read_confined(r, Path::new("ok.sh"), 3),
            Err(ReadError::TooLarge(_, 3))
        ));
    }
}
