//! Image content as it travels: the files an uploaded image holds, their
//! names on disk, and a sink that writes one file from a stream of chunks
//! while checking its size and SHA-256. The controllers use it to take an
//! upload (`Images/UploadImage`), the node agents to take a download
//! (`NodeAgent/FetchImage`): neither ever keeps bytes that do not match
//! the manifest.

use std::path::{Path, PathBuf};

use sha2::Digest as _;
use tokio::io::AsyncWriteExt as _;

use crate::compute::v1::ImageFile;

/// Largest chunk a sender puts in one message (the servers accept 4 MiB).
pub const CHUNK_BYTES: usize = 1 << 20;

/// Largest image file taken (a raw disk): 256 GiB.
pub const MAX_FILE_BYTES: u64 = 256 << 30;

/// Largest `cmdline`: the kernel's own limit on x86 is 2 KiB.
pub const MAX_CMDLINE_BYTES: u64 = 2048;

/// The roles an image file can have, with the name it has in an image
/// directory (`<image-dir>/<image-id>/<name>`, what the node agents boot).
pub const ROLES: [(&str, &str); 4] = [
    ("kernel", "kernel"),
    ("initrd", "initrd"),
    ("cmdline", "cmdline"),
    ("disk", "disk.raw"),
];

/// The file name of `role` in an image directory.
pub fn file_name(role: &str) -> Option<&'static str> {
    ROLES.iter().find(|(r, _)| *r == role).map(|(_, f)| *f)
}

/// `sha256:<64 lowercase hex digits>`.
pub fn sha256_checksum(digest: &[u8]) -> String {
    let mut s = String::with_capacity(7 + 2 * digest.len());
    s.push_str("sha256:");
    for b in digest {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// The `sha256:` checksum of `data`.
pub fn sha256_of(data: &[u8]) -> String {
    sha256_checksum(&sha2::Sha256::digest(data))
}

fn is_sha256_checksum(s: &str) -> bool {
    s.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// Checks the files of an image of `format`: known roles, each once, a
/// kernel always, a disk exactly when the format is `raw`, sizes within
/// limits, checksums `sha256:<hex>`. The error says what to fix.
pub fn check_files(format: &str, files: &[ImageFile]) -> Result<(), String> {
    let mut seen: Vec<&str> = Vec::new();
    for f in files {
        if file_name(&f.role).is_none() {
            return Err(format!(
                "unknown image file role {:?}; roles are kernel, initrd, cmdline and disk",
                f.role
            ));
        }
        if seen.contains(&f.role.as_str()) {
            return Err(format!("the image has two {} files", f.role));
        }
        seen.push(&f.role);
        if !is_sha256_checksum(&f.checksum) {
            return Err(format!(
                "the {} file's checksum {:?} is not sha256:<64 hex digits>",
                f.role, f.checksum
            ));
        }
        let limit = if f.role == "cmdline" {
            MAX_CMDLINE_BYTES
        } else {
            MAX_FILE_BYTES
        };
        if f.size_bytes > limit {
            return Err(format!(
                "the {} file has {} bytes, more than the {limit} taken",
                f.role, f.size_bytes
            ));
        }
    }
    if !seen.contains(&"kernel") {
        return Err("an image needs a kernel file".into());
    }
    match (format == "raw", seen.contains(&"disk")) {
        (true, false) => Err("an image of format raw needs a disk file".into()),
        (false, true) => Err(format!(
            "a disk file makes an image of format raw, not {format:?}"
        )),
        _ => Ok(()),
    }
}

/// Why a [`FileSink`] refused its bytes.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// More bytes than the manifest says.
    #[error("the {role} file is longer than the {expected} bytes announced")]
    TooLong {
        /// The file's role.
        role: String,
        /// What the manifest said.
        expected: u64,
    },
    /// The stream ended early.
    #[error("the {role} file ended after {got} of {expected} bytes")]
    TooShort {
        /// The file's role.
        role: String,
        /// Bytes received.
        got: u64,
        /// What the manifest said.
        expected: u64,
    },
    /// The content is not what the manifest says.
    #[error("the {role} file's checksum is {got}, not the {expected} announced")]
    Checksum {
        /// The file's role.
        role: String,
        /// The checksum of what arrived.
        got: String,
        /// What the manifest said.
        expected: String,
    },
    /// The local file system failed (a full disk is `StorageFull`).
    #[error("cannot write {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
}

impl SinkError {
    /// Whether the disk is full (the sender can do nothing about it).
    pub fn is_storage_full(&self) -> bool {
        matches!(self, SinkError::Io { source, .. }
            if matches!(source.kind(), std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded))
    }
}

/// One image file being written from a stream: at `path`, it must end up
/// with exactly the size and SHA-256 of its manifest entry.
#[derive(Debug)]
pub struct FileSink {
    entry: ImageFile,
    path: PathBuf,
    file: tokio::fs::File,
    hasher: sha2::Sha256,
    written: u64,
}

impl FileSink {
    /// Creates (truncating) the file at `path` for `entry`.
    pub async fn create(path: &Path, entry: &ImageFile) -> Result<Self, SinkError> {
        let file = tokio::fs::File::create(path)
            .await
            .map_err(|source| SinkError::Io {
                path: path.to_owned(),
                source,
            })?;
        Ok(FileSink {
            entry: entry.clone(),
            path: path.to_owned(),
            file,
            hasher: sha2::Sha256::new(),
            written: 0,
        })
    }

    /// Bytes still expected.
    pub fn remaining(&self) -> u64 {
        self.entry.size_bytes.saturating_sub(self.written)
    }

    /// Appends `data`; refuses bytes beyond the announced size.
    pub async fn write(&mut self, data: &[u8]) -> Result<(), SinkError> {
        let len = u64::try_from(data.len()).unwrap_or(u64::MAX);
        if len > self.remaining() {
            return Err(SinkError::TooLong {
                role: self.entry.role.clone(),
                expected: self.entry.size_bytes,
            });
        }
        self.hasher.update(data);
        self.file
            .write_all(data)
            .await
            .map_err(|source| SinkError::Io {
                path: self.path.clone(),
                source,
            })?;
        self.written += len;
        Ok(())
    }

    /// Checks size and checksum and makes the file durable.
    pub async fn finish(mut self) -> Result<(), SinkError> {
        if self.remaining() > 0 {
            return Err(SinkError::TooShort {
                role: self.entry.role,
                got: self.written,
                expected: self.entry.size_bytes,
            });
        }
        let got = sha256_checksum(&self.hasher.finalize());
        if got != self.entry.checksum {
            return Err(SinkError::Checksum {
                role: self.entry.role,
                got,
                expected: self.entry.checksum,
            });
        }
        let io = |source| SinkError::Io {
            path: self.path.clone(),
            source,
        };
        self.file.flush().await.map_err(io)?;
        self.file.sync_all().await.map_err(io)?;
        Ok(())
    }
}

/// Why [`receive_file`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    /// The sender's stream failed or stalled: try again.
    #[error("the stream broke: {0}")]
    Stream(String),
    /// What arrived is not the file (size or checksum): try again.
    #[error(transparent)]
    Content(SinkError),
    /// The local disk failed: trying again will not help.
    #[error(transparent)]
    Local(SinkError),
}

impl From<SinkError> for ReceiveError {
    fn from(e: SinkError) -> Self {
        match e {
            SinkError::Io { .. } => ReceiveError::Local(e),
            other => ReceiveError::Content(other),
        }
    }
}

/// Writes the file `entry` at `path` from the chunks of `stream`
/// (`NodeAgent/FetchImage`), checked against `entry`; gives up when no
/// chunk comes for `idle`.
pub async fn receive_file(
    stream: &mut tonic::Streaming<crate::node::v1::ImageChunk>,
    entry: &ImageFile,
    path: &Path,
    idle: std::time::Duration,
) -> Result<(), ReceiveError> {
    let mut sink = FileSink::create(path, entry).await?;
    loop {
        match tokio::time::timeout(idle, stream.message()).await {
            Ok(Ok(Some(chunk))) => sink.write(&chunk.data).await?,
            Ok(Ok(None)) => break,
            Ok(Err(s)) => return Err(ReceiveError::Stream(s.message().to_owned())),
            Err(_) => return Err(ReceiveError::Stream(format!("no bytes for {idle:?}"))),
        }
    }
    sink.finish().await?;
    Ok(())
}

/// The checksum of a whole image: SHA-256 over its manifest (each file's
/// role, size and checksum, in order), so two images with the same files
/// have the same checksum.
pub fn manifest_checksum(files: &[ImageFile]) -> String {
    let mut h = sha2::Sha256::new();
    for f in files {
        h.update(format!("{} {} {}\n", f.role, f.size_bytes, f.checksum).as_bytes());
    }
    sha256_checksum(&h.finalize())
}

/// Makes a directory entry change (a rename into `dir`) durable.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Puts the checked files of `staging` in place as `target` (which must
/// not exist) in one rename, durably: the staging directory's entries
/// first, then the rename in `target`'s parent. Blocking: call it off the
/// async runtime.
pub fn install_dir(staging: &Path, target: &Path) -> std::io::Result<()> {
    sync_dir(staging)?;
    std::fs::rename(staging, target)?;
    sync_dir(target.parent().unwrap_or(Path::new(".")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(role: &str, data: &[u8]) -> ImageFile {
        ImageFile {
            role: role.into(),
            size_bytes: data.len() as u64,
            checksum: sha256_of(data),
        }
    }

    #[test]
    fn checksums_match_known_digests() {
        let hex = sha256_of;
        assert_eq!(
            hex(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            hex(b"abc"),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            hex(&[b'a'; 1000]),
            "sha256:41edece42d63e8d9bf515a9ba6932e1c20cbc9f5a5d134645adb5db1b9737ea3"
        );
    }

    #[test]
    fn files_are_checked_against_the_format() {
        let k = entry("kernel", b"k");
        let d = entry("disk", b"d");
        assert!(check_files("pvh-elf", std::slice::from_ref(&k)).is_ok());
        assert!(check_files("raw", &[k.clone(), d.clone()]).is_ok());
        assert!(
            check_files("raw", std::slice::from_ref(&k))
                .unwrap_err()
                .contains("needs a disk")
        );
        assert!(
            check_files("pvh-elf", &[k.clone(), d])
                .unwrap_err()
                .contains("format raw")
        );
        assert!(check_files("pvh-elf", &[]).unwrap_err().contains("kernel"));
        assert!(
            check_files("pvh-elf", &[k.clone(), k.clone()])
                .unwrap_err()
                .contains("two")
        );
        let mut odd = k.clone();
        odd.role = "bios".into();
        assert!(
            check_files("pvh-elf", &[odd])
                .unwrap_err()
                .contains("unknown")
        );
        let mut bad = k.clone();
        bad.checksum = "md5:00".into();
        assert!(
            check_files("pvh-elf", &[bad])
                .unwrap_err()
                .contains("sha256")
        );
        let mut long = entry("cmdline", b"console=ttyS0");
        long.size_bytes = MAX_CMDLINE_BYTES + 1;
        assert!(
            check_files("pvh-elf", &[k, long])
                .unwrap_err()
                .contains("more than")
        );
    }

    #[test]
    fn the_manifest_checksum_covers_every_field() {
        let a = vec![entry("kernel", b"k")];
        let mut b = a.clone();
        b[0].size_bytes += 1;
        assert_ne!(manifest_checksum(&a), manifest_checksum(&b));
        assert_eq!(manifest_checksum(&a), manifest_checksum(&a.clone()));
        assert!(is_sha256_checksum(&manifest_checksum(&a)));
    }

    #[tokio::test]
    async fn a_sink_keeps_only_the_announced_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kernel");
        let e = entry("kernel", b"hello world");

        let mut ok = FileSink::create(&path, &e).await.unwrap();
        ok.write(b"hello ").await.unwrap();
        ok.write(b"world").await.unwrap();
        ok.finish().await.unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"hello world");

        let mut long = FileSink::create(&path, &e).await.unwrap();
        long.write(b"hello world").await.unwrap();
        assert!(matches!(
            long.write(b"!").await,
            Err(SinkError::TooLong { .. })
        ));

        let mut short = FileSink::create(&path, &e).await.unwrap();
        short.write(b"hello").await.unwrap();
        assert!(matches!(
            short.finish().await,
            Err(SinkError::TooShort { got: 5, .. })
        ));

        let mut other = FileSink::create(&path, &e).await.unwrap();
        other.write(b"hello wOrld").await.unwrap();
        let err = other.finish().await.unwrap_err();
        assert!(matches!(err, SinkError::Checksum { .. }));
        assert!(!err.is_storage_full());
    }
}
