//! Uploaded images on this node: before a VM of an uploaded image starts
//! (or arrives by migration), its files are fetched from the controllers
//! (`NodeAgent/FetchImage`, each controller in turn until one holds them),
//! checked against the image's manifest (size and SHA-256), and put in
//! place in the image directory as `<image-dir>/<image-id>/` in one rename,
//! with a `.checksum` file that says which content it is. Images without
//! files (content placed on the nodes by other means) are left alone.

use std::path::Path;
use std::time::Duration;

use nephele_proto::compute::v1 as compute;
use nephele_proto::node::v1 as pb;

use crate::controller::Controllers;

/// The file in an image directory naming the content it holds.
pub const CHECKSUM_FILE: &str = ".checksum";

/// How long a download may stall before it is tried again.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Attempts per file.
const ATTEMPTS: u32 = 3;

/// How long a fetched image no assigned instance uses stays on the node.
pub const CACHE_TTL: Duration = Duration::from_secs(3600);

/// Whether `dir` holds the content of `image` whole; if so, marks it used
/// now (the sweep keeps it another [`CACHE_TTL`]).
fn present(dir: &Path, image: &compute::Image) -> bool {
    let marker = dir.join(CHECKSUM_FILE);
    let whole = std::fs::read_to_string(&marker).is_ok_and(|c| c.trim() == image.checksum);
    if whole {
        let _ = std::fs::File::options()
            .append(true)
            .open(&marker)
            .and_then(|f| f.set_modified(std::time::SystemTime::now()));
    }
    whole
}

/// Makes sure the content of `image` is in `image_dir`, fetching it when
/// it is not (one fetch at a time under `lock`). The error is a failure
/// reason for the controllers.
pub async fn ensure(
    image_dir: &Path,
    ctl: &Controllers,
    node: &str,
    image: &compute::Image,
    lock: &tokio::sync::Mutex<()>,
) -> Result<(), String> {
    if image.files.is_empty() {
        return Ok(());
    }
    let id = crate::instance::image_id(&image.name)
        .ok_or_else(|| format!("bad image name {:?}", image.name))?;
    nephele_proto::image::check_files(&image.format, &image.files)
        .map_err(|e| format!("{}: {e}", image.name))?;
    let dir = image_dir.join(id);
    // An image already here does not wait for another one's download.
    if present(&dir, image) {
        return Ok(());
    }
    let _one_at_a_time = lock.lock().await;
    if present(&dir, image) {
        return Ok(());
    }
    let io = |what: &Path, e: std::io::Error| format!("cannot write {}: {e}", what.display());
    tokio::fs::create_dir_all(image_dir)
        .await
        .map_err(|e| io(image_dir, e))?;
    let staging = image_dir.join(format!(".fetch-{id}"));
    let _ = tokio::fs::remove_dir_all(&staging).await;
    tokio::fs::create_dir(&staging)
        .await
        .map_err(|e| io(&staging, e))?;
    let started = std::time::Instant::now();
    let fetched = async {
        for f in &image.files {
            let name = nephele_proto::image::file_name(&f.role)
                .ok_or_else(|| format!("unknown image file role {:?}", f.role))?;
            fetch_file(ctl, node, &image.name, f, &staging.join(name)).await?;
        }
        let marker = staging.join(CHECKSUM_FILE);
        tokio::fs::write(&marker, format!("{}\n", image.checksum))
            .await
            .map_err(|e| io(&marker, e))?;
        // Content of an earlier image of the same name goes (VMs that run
        // it loaded their kernel and copied their disk already).
        if dir.exists() {
            tokio::fs::remove_dir_all(&dir)
                .await
                .map_err(|e| io(&dir, e))?;
        }
        let (from, to) = (staging.clone(), dir.clone());
        tokio::task::spawn_blocking(move || nephele_proto::image::install_dir(&from, &to))
            .await
            .map_err(std::io::Error::other)
            .and_then(|r| r)
            .map_err(|e| io(&dir, e))
    }
    .await;
    if fetched.is_err() {
        let _ = tokio::fs::remove_dir_all(&staging).await;
    }
    fetched?;
    tracing::info!(
        image = %image.name,
        bytes = image.size_bytes,
        ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        "fetched the image from the controllers"
    );
    Ok(())
}

/// Removes fetched images (those with a [`CHECKSUM_FILE`]; content put
/// there by other means is never touched) that no image of `in_use` names
/// and that were not fetched or used for `ttl`, and staging directories.
/// The caller holds the fetch lock (no fetch runs). Returns the image ids
/// removed.
pub fn sweep(
    image_dir: &Path,
    in_use: &std::collections::HashSet<String>,
    ttl: Duration,
) -> Vec<String> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(image_dir) else {
        return removed;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(".fetch-") {
            let _ = std::fs::remove_dir_all(entry.path());
            continue;
        }
        if in_use.contains(&format!("images/{name}")) {
            continue;
        }
        let idle = std::fs::metadata(entry.path().join(CHECKSUM_FILE))
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok());
        if idle.is_some_and(|idle| idle >= ttl) && std::fs::remove_dir_all(entry.path()).is_ok() {
            removed.push(name);
        }
    }
    removed
}

/// Fetches one file into `path`, checked against `entry`; tries again
/// (from the start) when the stream breaks.
async fn fetch_file(
    ctl: &Controllers,
    node: &str,
    image: &str,
    entry: &compute::ImageFile,
    path: &Path,
) -> Result<(), String> {
    let mut last = String::new();
    for attempt in 1..=ATTEMPTS {
        match fetch_once(ctl, node, image, entry, path).await {
            Ok(()) => return Ok(()),
            Err(Failure::Final(e)) => return Err(e),
            Err(Failure::Retry(e)) => {
                tracing::warn!(image, role = %entry.role, attempt, error = %e, "image download failed; trying again");
                last = e;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    Err(format!(
        "cannot fetch the {} file of {image} from the controllers: {last}",
        entry.role
    ))
}

enum Failure {
    /// Worth another try (the stream broke, the content arrived wrong).
    Retry(String),
    /// Not (the controllers refused, the local disk failed).
    Final(String),
}

async fn fetch_once(
    ctl: &Controllers,
    node: &str,
    image: &str,
    entry: &compute::ImageFile,
    path: &Path,
) -> Result<(), Failure> {
    let mut stream = ctl
        .call(|mut c| {
            let req = pb::FetchImageRequest {
                node: node.to_owned(),
                image: image.to_owned(),
                role: entry.role.clone(),
            };
            async move { c.fetch_image(req).await.map(tonic::Response::into_inner) }
        })
        .await
        .map_err(|s| {
            let m = format!("{} ({:?})", s.message(), s.code());
            if crate::controller::retry_elsewhere(&s) {
                Failure::Retry(m)
            } else {
                Failure::Final(format!(
                    "the controllers refused the {} file of {image}: {m}",
                    entry.role
                ))
            }
        })?;
    nephele_proto::image::receive_file(&mut stream, entry, path, IDLE_TIMEOUT)
        .await
        .map_err(|e| match e {
            nephele_proto::image::ReceiveError::Local(_) => Failure::Final(e.to_string()),
            other => Failure::Retry(other.to_string()),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sweep_removes_only_idle_fetched_images_no_instance_uses() {
        let dir = tempfile::tempdir().unwrap();
        let mk = |name: &str, fetched: bool| {
            let d = dir.path().join(name);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("kernel"), b"k").unwrap();
            if fetched {
                std::fs::write(d.join(CHECKSUM_FILE), b"sha256:00\n").unwrap();
            }
        };
        mk("placed", false);
        mk("used", true);
        mk("idle", true);
        std::fs::create_dir_all(dir.path().join(".fetch-x")).unwrap();
        let in_use: std::collections::HashSet<String> = ["images/used".to_owned()].into();

        // Young images stay; staging goes.
        assert!(sweep(dir.path(), &in_use, CACHE_TTL).is_empty());
        assert!(!dir.path().join(".fetch-x").exists());
        // Once idle long enough (here: at once), only the unused fetched
        // image goes.
        assert_eq!(sweep(dir.path(), &in_use, Duration::ZERO), ["idle"]);
        assert!(dir.path().join("placed/kernel").exists());
        assert!(dir.path().join("used/kernel").exists());
    }
}
