//! Writing key and certificate files: private (0600) and atomic, so a
//! reader ([`crate::reload`]) never sees half a file.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

/// Writes `bytes` to `path` with mode 0600. With `replace`, an existing
/// file is replaced atomically (written beside it, then renamed over it);
/// without, an existing file is an error (`AlreadyExists`).
pub fn write_private(path: &Path, bytes: &[u8], replace: bool) -> std::io::Result<()> {
    let target = if replace {
        let mut name = path
            .file_name()
            .ok_or_else(|| std::io::Error::other("the path names no file"))?
            .to_os_string();
        name.push(".tmp");
        path.with_file_name(name)
    } else {
        path.to_path_buf()
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).mode(0o600);
    if replace {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    let mut f = options.open(&target)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    if replace {
        std::fs::rename(&target, path)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace_is_atomic_and_create_refuses_existing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.pem");
        write_private(&p, b"one", false).unwrap();
        let e = write_private(&p, b"two", false).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);
        write_private(&p, b"three", true).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"three");
        assert!(!dir.path().join("k.pem.tmp").exists());
    }
}
