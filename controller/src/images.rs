//! Image content on a controller: the files of uploaded images
//! (`Images/UploadImage`), under `<data-dir>/images/`, one directory per
//! image content (`<image-id>-<16 hex digits of its checksum>`), and the
//! sweep that removes what no image in the state refers to.
//!
//! An upload is written to a staging directory (`.upload-*`) and checked
//! file by file against its manifest (size and SHA-256) before it is
//! renamed into place; only then is the image proposed. So the state never
//! names content that no controller has whole, and a failed upload leaves
//! nothing behind.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use nephele_proto::compute::v1 as pb;
use nephele_proto::image::{FileSink, SinkError};
use nephele_proto::node::v1::FetchImageRequest;
use nephele_proto::node::v1::node_agent_client::NodeAgentClient;
use nephele_state::model::Image;
use tonic::Status;
use tonic::transport::Channel;

use crate::api::errors::ApiError;

/// How long an uploader may stay silent before the upload is dropped.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Room left free on the controller's disk beside an upload.
const HEADROOM_BYTES: u64 = 256 << 20;

/// The staging prefix.
const STAGING: &str = ".upload-";

/// The image content one controller holds.
#[derive(Debug, Clone)]
pub struct ImageContent {
    dir: PathBuf,
}

/// The directory name of an image's content.
fn content_name(image: &str, checksum: &str) -> String {
    let id = image.strip_prefix("images/").unwrap_or(image);
    let hex = checksum.strip_prefix("sha256:").unwrap_or(checksum);
    format!("{id}-{}", hex.get(..16).unwrap_or(hex))
}

fn sink_error(e: SinkError) -> ApiError {
    if e.is_storage_full() {
        ApiError::StorageFull(format!(
            "the controller's disk is full ({e}); free space on it or upload through another controller"
        ))
    } else if let SinkError::Io { .. } = e {
        ApiError::Internal(e.to_string())
    } else {
        ApiError::InvalidArgument(format!(
            "{e}: nothing was created; check the files and upload again"
        ))
    }
}

impl ImageContent {
    /// Content under `dir` (created when missing). Staging directories
    /// left by an earlier process are removed.
    pub fn open(dir: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        for entry in std::fs::read_dir(&dir)?.flatten() {
            if entry.file_name().to_string_lossy().starts_with(STAGING) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        Ok(ImageContent { dir })
    }

    /// The file of `image` for `role`, when this controller holds it.
    pub fn file(&self, image: &Image, role: &str) -> Option<PathBuf> {
        let name = nephele_proto::image::file_name(role)?;
        let path = self
            .dir
            .join(content_name(&image.name, &image.checksum))
            .join(name);
        path.is_file().then_some(path)
    }

    /// Takes the content of image `image_id` (manifest `files`, whose
    /// checksum is `checksum`): the bytes of `first` and then of every
    /// further message of `rest`, checked against the manifest. On success
    /// the content is in place, ready to be named by the state.
    pub async fn receive(
        &self,
        image_id: &str,
        checksum: &str,
        files: &[pb::ImageFile],
        first: Vec<u8>,
        rest: &mut tonic::Streaming<pb::UploadImageRequest>,
    ) -> Result<(), ApiError> {
        let total = files
            .iter()
            .map(|f| f.size_bytes)
            .fold(0u64, u64::saturating_add);
        let free = free_bytes(&self.dir)
            .map_err(|e| ApiError::Internal(format!("cannot stat {}: {e}", self.dir.display())))?;
        if free < total.saturating_add(HEADROOM_BYTES) {
            return Err(ApiError::StorageFull(format!(
                "the image has {total} bytes and the controller has {free} bytes free (keeping {HEADROOM_BYTES} spare); free space on it or upload through another controller"
            )));
        }
        let staging = self.stage(image_id).await?;
        let result = write_files(&staging, files, first, rest).await;
        let result = match result {
            Ok(()) => {
                self.place(&staging, &content_name(image_id, checksum))
                    .await
            }
            Err(e) => Err(e),
        };
        if staging.exists() {
            let _ = tokio::fs::remove_dir_all(&staging).await;
        }
        result
    }

    /// A new staging directory for content of `image_id`.
    async fn stage(&self, image_id: &str) -> Result<PathBuf, ApiError> {
        let nonce = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let staging = self.dir.join(format!("{STAGING}{image_id}-{nonce}"));
        tokio::fs::create_dir(&staging)
            .await
            .map_err(|e| ApiError::Internal(format!("cannot create {}: {e}", staging.display())))?;
        Ok(staging)
    }

    /// Whether every file of `image` is here.
    pub fn holds(&self, image: &Image) -> bool {
        image
            .files
            .iter()
            .all(|f| self.file(image, &f.role).is_some())
    }

    /// Copies the content of `image` from another controller (`peer`, its
    /// `NodeAgent/FetchImage`), checked against the image's manifest.
    pub async fn mirror(&self, image: &Image, peer: Channel) -> Result<(), String> {
        let id = image.name.strip_prefix("images/").unwrap_or(&image.name);
        let staging = self.stage(id).await.map_err(|e| e.to_string())?;
        let copied = async {
            let mut client = NodeAgentClient::new(peer)
                .max_decoding_message_size(crate::api::MAX_DECODING_MESSAGE_SIZE);
            for f in &image.files {
                let name = nephele_proto::image::file_name(&f.role)
                    .ok_or_else(|| format!("unknown role {:?}", f.role))?;
                let entry = crate::api::convert::image_file(f);
                let mut stream = client
                    .fetch_image(FetchImageRequest {
                        node: String::new(),
                        image: image.name.clone(),
                        role: f.role.clone(),
                    })
                    .await
                    .map_err(|s| s.message().to_owned())?
                    .into_inner();
                nephele_proto::image::receive_file(
                    &mut stream,
                    &entry,
                    &staging.join(name),
                    IDLE_TIMEOUT,
                )
                .await
                .map_err(|e| e.to_string())?;
            }
            self.place(&staging, &content_name(&image.name, &image.checksum))
                .await
                .map_err(|e| e.to_string())
        }
        .await;
        if staging.exists() {
            let _ = tokio::fs::remove_dir_all(&staging).await;
        }
        copied
    }

    /// Renames checked content into place; content already there (the
    /// same files, uploaded before) is kept.
    async fn place(&self, staging: &Path, name: &str) -> Result<(), ApiError> {
        let target = self.dir.join(name);
        let staging = staging.to_owned();
        let placed = tokio::task::spawn_blocking(move || {
            if target.is_dir() {
                return Ok(());
            }
            nephele_proto::image::install_dir(&staging, &target)
        })
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r);
        placed.map_err(|e| ApiError::Internal(format!("cannot place {name}: {e}")))
    }

    /// Removes content no image of `images` refers to, once it is older
    /// than `min_age` (content just placed is about to be named).
    /// Returns the names removed.
    pub fn sweep<'a>(
        &self,
        images: impl IntoIterator<Item = &'a Image>,
        min_age: Duration,
    ) -> Vec<String> {
        let keep: HashSet<String> = images
            .into_iter()
            .filter(|i| !i.files.is_empty())
            .map(|i| content_name(&i.name, &i.checksum))
            .collect();
        let mut removed = Vec::new();
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return removed;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(STAGING) || keep.contains(&name) {
                continue;
            }
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age >= min_age);
            if old && std::fs::remove_dir_all(entry.path()).is_ok() {
                removed.push(name);
            }
        }
        removed
    }
}

/// How often content is swept without a deletion to prompt it.
const SWEEP_EVERY: Duration = Duration::from_secs(300);

/// Content younger than this is never swept: it may have been placed by an
/// upload whose proposal is still on its way.
const SWEEP_MIN_AGE: Duration = Duration::from_secs(600);

/// Sweeps `content` whenever an image is deleted and every
/// [`SWEEP_EVERY`], until the store's watch closes.
pub fn keep_swept<S: crate::store::StateStore>(
    store: std::sync::Arc<S>,
    content: ImageContent,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut changes = store.watch();
        loop {
            let deleted = |c: &nephele_state::Command| {
                matches!(c, nephele_state::Command::DeleteImage { .. })
            };
            if !crate::store::wait_for_command(&mut changes, SWEEP_EVERY, deleted).await {
                return;
            }
            match store
                .read(|s| s.images.values().cloned().collect::<Vec<_>>())
                .await
            {
                Ok(images) => {
                    let content = content.clone();
                    let removed = tokio::task::spawn_blocking(move || {
                        content.sweep(images.iter(), SWEEP_MIN_AGE)
                    })
                    .await
                    .unwrap_or_default();
                    for name in removed {
                        tracing::info!(content = %name, "removed the content of a deleted image");
                    }
                }
                Err(e) => tracing::debug!(error = %e, "image content not swept this time"),
            }
        }
    })
}

/// How often a controller looks for content it lacks without an upload
/// to prompt it.
const MIRROR_EVERY: Duration = Duration::from_secs(10);

/// Copies the content of every uploaded image this controller lacks from
/// the other controllers (never itself; `tls`: its client configuration
/// for them), at
/// each upload and every [`MIRROR_EVERY`], until the store's watch
/// closes: an image stays available while any controller that holds it
/// runs, and every controller soon holds it.
pub fn keep_mirrored<S: crate::store::StateStore>(
    store: std::sync::Arc<S>,
    content: ImageContent,
    tls: std::sync::Arc<rustls::ClientConfig>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut changes = store.watch();
        let mut channels: std::collections::HashMap<String, Channel> = Default::default();
        loop {
            let me = store.leadership().member_id;
            let wanted = store
                .read(move |s| {
                    let images: Vec<Image> = s
                        .images
                        .values()
                        .filter(|i| !i.files.is_empty())
                        .cloned()
                        .collect();
                    let peers: Vec<String> = s
                        .controllers
                        .iter()
                        .filter(|(id, _)| **id != me)
                        .map(|(_, address)| address.clone())
                        .collect();
                    (images, peers)
                })
                .await;
            if let Ok((images, peers)) = wanted {
                for image in images.iter().filter(|i| !content.holds(i)) {
                    for peer in &peers {
                        let Some(channel) = peer_channel(&mut channels, peer, &tls) else {
                            continue;
                        };
                        match content.mirror(image, channel).await {
                            Ok(()) => {
                                tracing::info!(image = %image.name, from = %peer, "copied the image's content from another controller");
                                break;
                            }
                            Err(e) => {
                                tracing::debug!(image = %image.name, from = %peer, error = %e, "image content not copied from this controller")
                            }
                        }
                    }
                }
            }
            let uploaded = |c: &nephele_state::Command| {
                matches!(c, nephele_state::Command::CreateUploadedImage { .. })
            };
            if !crate::store::wait_for_command(&mut changes, MIRROR_EVERY, uploaded).await {
                return;
            }
        }
    })
}

/// A channel to the controller at `address` (`HOST:PORT`), made once.
fn peer_channel(
    channels: &mut std::collections::HashMap<String, Channel>,
    address: &str,
    tls: &std::sync::Arc<rustls::ClientConfig>,
) -> Option<Channel> {
    if let Some(c) = channels.get(address) {
        return Some(c.clone());
    }
    let endpoint = tonic::transport::Endpoint::from_shared(nephele_tls::channel_uri(address))
        .ok()?
        .connect_timeout(Duration::from_secs(2));
    let channel = nephele_tls::lazy_channel(endpoint, tls.clone());
    channels.insert(address.to_owned(), channel.clone());
    Some(channel)
}

/// Free bytes (for unprivileged users) where `dir` is.
fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let s = rustix::fs::statvfs(dir)?;
    Ok(s.f_bavail.saturating_mul(s.f_frsize))
}

/// Writes `files` into `dir` from the bytes of `first` and then of `rest`.
async fn write_files(
    dir: &Path,
    files: &[pb::ImageFile],
    first: Vec<u8>,
    rest: &mut tonic::Streaming<pb::UploadImageRequest>,
) -> Result<(), ApiError> {
    let mut pending = first;
    let mut at = 0usize;
    for f in files {
        let name = nephele_proto::image::file_name(&f.role)
            .ok_or_else(|| ApiError::InvalidArgument(format!("unknown role {:?}", f.role)))?;
        let mut sink = FileSink::create(&dir.join(name), f)
            .await
            .map_err(sink_error)?;
        while sink.remaining() > 0 {
            if at == pending.len() {
                match next_data(rest).await? {
                    Some(data) => {
                        pending = data;
                        at = 0;
                        continue;
                    }
                    None => break,
                }
            }
            let n = usize::try_from(sink.remaining())
                .unwrap_or(usize::MAX)
                .min(pending.len() - at);
            sink.write(&pending[at..at + n]).await.map_err(sink_error)?;
            at += n;
        }
        sink.finish().await.map_err(sink_error)?;
    }
    if at < pending.len() || next_data(rest).await?.is_some_and(|d| !d.is_empty()) {
        return Err(ApiError::InvalidArgument(
            "the upload has more bytes than its files announce: nothing was created; check the files and upload again".into(),
        ));
    }
    Ok(())
}

/// The first message of an upload, which names the image and its files.
pub async fn first_message(
    stream: &mut tonic::Streaming<pb::UploadImageRequest>,
) -> Result<pb::UploadImageRequest, ApiError> {
    next_message(stream).await?.ok_or_else(|| {
        ApiError::InvalidArgument(
            "the upload is empty: its first message names the image and its files".into(),
        )
    })
}

/// The next message's bytes; `None` at the end of the stream.
async fn next_data(
    rest: &mut tonic::Streaming<pb::UploadImageRequest>,
) -> Result<Option<Vec<u8>>, ApiError> {
    match next_message(rest).await? {
        None => Ok(None),
        Some(m) if m.create.is_some() || !m.files.is_empty() => Err(ApiError::InvalidArgument(
            "only the first message of an upload names the image and its files".into(),
        )),
        Some(m) => Ok(Some(m.data)),
    }
}

/// The next message; `None` at the end of the stream. An uploader silent
/// for [`IDLE_TIMEOUT`] is dropped.
async fn next_message(
    rest: &mut tonic::Streaming<pb::UploadImageRequest>,
) -> Result<Option<pb::UploadImageRequest>, ApiError> {
    tokio::time::timeout(IDLE_TIMEOUT, rest.message())
        .await
        .map_err(|_| {
            ApiError::InvalidArgument(format!(
                "the upload stalled for {IDLE_TIMEOUT:?}: nothing was created; upload again"
            ))
        })?
        .map_err(|s: Status| {
            ApiError::InvalidArgument(format!(
                "the upload broke off ({}): nothing was created; upload again",
                s.message()
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(id: &str, checksum: &str, with_files: bool) -> Image {
        Image {
            name: format!("images/{id}"),
            format: "pvh-elf".into(),
            size_bytes: 1,
            checksum: checksum.into(),
            state: nephele_state::model::ImageState::Active,
            create_time: 0,
            files: if with_files {
                vec![nephele_state::model::ImageFileRecord {
                    role: "kernel".into(),
                    size_bytes: 1,
                    checksum: "sha256:00".into(),
                }]
            } else {
                Vec::new()
            },
        }
    }

    #[test]
    fn staging_is_cleared_and_unnamed_content_swept() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("images");
        std::fs::create_dir_all(root.join(".upload-x-1")).unwrap();
        let store = ImageContent::open(root.clone()).unwrap();
        assert!(!root.join(".upload-x-1").exists());

        let kept = image("a", "sha256:0123456789abcdef0123", true);
        let name = content_name(&kept.name, &kept.checksum);
        assert_eq!(name, "a-0123456789abcdef");
        std::fs::create_dir_all(root.join(&name)).unwrap();
        std::fs::write(root.join(&name).join("kernel"), b"k").unwrap();
        std::fs::create_dir_all(root.join("gone-00")).unwrap();

        // Too young to sweep.
        assert!(store.sweep([&kept], Duration::from_secs(3600)).is_empty());
        assert_eq!(
            store.sweep([&kept], Duration::ZERO),
            vec!["gone-00".to_owned()]
        );
        assert_eq!(
            store.file(&kept, "kernel"),
            Some(root.join(&name).join("kernel"))
        );
        assert_eq!(store.file(&kept, "initrd"), None);
        assert_eq!(store.file(&kept, "bios"), None);
        // An image without files names no content.
        let bare = image("a", "sha256:0123456789abcdef0123", false);
        assert_eq!(store.sweep([&bare], Duration::ZERO), vec![name]);
    }
}
