//! Image uploads: the content is checked against its manifest before
//! anything is created, kept by the controller that took it, and served to
//! nodes (`NodeAgent/FetchImage`); bad uploads leave nothing behind.

use nephele_proto::compute::v1 as compute;
use nephele_proto::node::v1 as node;
use tonic::Code;

use super::support::*;

fn entry(role: &str, data: &[u8]) -> compute::ImageFile {
    compute::ImageFile {
        role: role.into(),
        size_bytes: data.len() as u64,
        checksum: nephele_proto::image::sha256_of(data),
    }
}

/// The messages of an upload of `files` (manifest) carrying `bytes`, in
/// chunks of `chunk`.
fn messages(
    id: &str,
    format: &str,
    request_id: &str,
    files: Vec<compute::ImageFile>,
    bytes: &[u8],
    chunk: usize,
) -> Vec<compute::UploadImageRequest> {
    let mut out = vec![compute::UploadImageRequest {
        create: Some(compute::CreateImageRequest {
            image_id: id.into(),
            image: Some(compute::Image {
                format: format.into(),
                ..Default::default()
            }),
            request_id: request_id.into(),
        }),
        files,
        data: Vec::new(),
    }];
    out.extend(bytes.chunks(chunk).map(|c| compute::UploadImageRequest {
        data: c.to_vec(),
        ..Default::default()
    }));
    out
}

async fn upload(
    c: &mut Clients,
    messages: Vec<compute::UploadImageRequest>,
) -> Result<compute::Image, tonic::Status> {
    c.images
        .upload_image(tokio_stream::iter(messages))
        .await
        .map(tonic::Response::into_inner)
}

async fn fetch(n: &mut FakeNode, image: &str, role: &str) -> Result<Vec<u8>, tonic::Status> {
    let mut stream = n
        .agent
        .fetch_image(node::FetchImageRequest {
            node: n.name.clone(),
            image: image.into(),
            role: role.into(),
        })
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(chunk) = stream.message().await? {
        assert!(chunk.data.len() <= nephele_proto::image::CHUNK_BYTES);
        out.extend_from_slice(&chunk.data);
    }
    Ok(out)
}

fn entries(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_are_checked_kept_and_served_to_nodes() -> anyhow::Result<()> {
    let content = tempfile::tempdir()?;
    let mut options = test_options();
    options.api.image_dir = Some(content.path().to_owned());
    let mut env = start_with(options).await?;
    let (alice_t, _, _) = populate(&mut env.admin).await?;
    let mut alice = clients(&env.channel, Some(&alice_t));
    let mut n1 = FakeNode::register(&env.admin, "n1", 4, 4096).await?;

    // 3 MB: more than one message and more than one chunk back.
    let kernel: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let cmdline = b"console=ttyS0 quiet".to_vec();
    let manifest = vec![entry("kernel", &kernel), entry("cmdline", &cmdline)];
    let good: Vec<u8> = [kernel.clone(), cmdline.clone()].concat();

    // Content that is not what the manifest says, in every way: refused,
    // nothing created, nothing kept.
    let mut flipped = good.clone();
    flipped[1_500_000] ^= 1;
    let short = &good[..good.len() - 1];
    let long = [good.clone(), b"x".to_vec()].concat();
    for (bytes, says) in [
        (flipped.as_slice(), "checksum"),
        (short, "ended after"),
        (long.as_slice(), "more bytes"),
    ] {
        let err = upload(
            &mut env.admin,
            messages("up", "pvh-elf", "", manifest.clone(), bytes, 1 << 20),
        )
        .await
        .expect_err("a bad upload is refused");
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert_eq!(reason(&err), "INVALID_ARGUMENT");
        assert!(err.message().contains(says), "{}", err.message());
        assert!(
            err.message().contains("nothing was created"),
            "{}",
            err.message()
        );
    }
    // Manifests that can never boot, and a message after the first that
    // names files again.
    let disk = entry("disk", b"d");
    for (format, files, says) in [
        ("raw", vec![manifest[0].clone()], "needs a disk"),
        ("pvh-elf", vec![manifest[0].clone(), disk], "format raw"),
        ("pvh-elf", vec![manifest[1].clone()], "needs a kernel"),
        ("qcow2", manifest.clone(), "qcow2"),
    ] {
        let err = upload(
            &mut env.admin,
            messages("up", format, "", files, &good, 1 << 20),
        )
        .await
        .expect_err("refused");
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(says), "{}", err.message());
    }
    let mut renamed = messages("up", "pvh-elf", "", manifest.clone(), &good, 1 << 20);
    renamed[1].files = manifest.clone();
    let err = upload(&mut env.admin, renamed).await.expect_err("refused");
    assert!(err.message().contains("only the first message"), "{err:?}");
    // Tenants cannot upload.
    assert_err(
        upload(
            &mut alice,
            messages("up", "pvh-elf", "", manifest.clone(), &good, 1 << 20),
        )
        .await,
        Code::PermissionDenied,
        "PERMISSION_DENIED",
    );
    assert_err(
        env.admin
            .images
            .get_image(compute::GetImageRequest {
                name: "images/up".into(),
            })
            .await,
        Code::NotFound,
        "NOT_FOUND",
    );
    // More than the controller's disk has free: refused before a byte is
    // stored (on a disk with more than 256 GiB free this cannot be shown).
    let huge = compute::ImageFile {
        size_bytes: nephele_proto::image::MAX_FILE_BYTES,
        ..manifest[0].clone()
    };
    let free = rustix::fs::statvfs(content.path()).map(|s| s.f_bavail * s.f_frsize)?;
    if free < huge.size_bytes {
        let err = upload(
            &mut env.admin,
            messages("up", "pvh-elf", "", vec![huge], &kernel, 1 << 20),
        )
        .await
        .expect_err("more than the disk holds");
        assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
        assert_eq!(reason(&err), "STORAGE_FULL");
        assert!(err.message().contains("free"), "{}", err.message());
    } else {
        eprintln!("not checked: {free} bytes free is more than an image file may have");
    }
    assert!(
        entries(content.path()).is_empty(),
        "{:?}",
        entries(content.path())
    );

    // The good upload, in odd-sized chunks.
    let image = upload(
        &mut env.admin,
        messages("up", "pvh-elf", "r-1", manifest.clone(), &good, 777_777),
    )
    .await?;
    assert_eq!(image.name, "images/up");
    assert_eq!(image.state, compute::ImageState::Active as i32);
    assert_eq!(image.files, manifest);
    assert_eq!(image.size_bytes, good.len() as u64);
    assert_eq!(
        image.checksum,
        nephele_proto::image::manifest_checksum(&manifest)
    );
    assert_eq!(entries(content.path()).len(), 1);
    // Its retry answers the same, without sending the bytes again.
    let again = upload(
        &mut env.admin,
        messages("up", "pvh-elf", "r-1", manifest.clone(), &[], 1),
    )
    .await?;
    assert_eq!(again, image);
    // The name is taken for anyone else.
    assert_err(
        upload(
            &mut env.admin,
            messages("up", "pvh-elf", "", manifest.clone(), &good, 1 << 20),
        )
        .await,
        Code::AlreadyExists,
        "ALREADY_EXISTS",
    );

    // A node gets every byte back, file by file.
    assert_eq!(fetch(&mut n1, "images/up", "kernel").await?, kernel);
    assert_eq!(fetch(&mut n1, "images/up", "cmdline").await?, cmdline);
    let err = fetch(&mut n1, "images/up", "initrd")
        .await
        .expect_err("no initrd");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_err(
        fetch(&mut n1, "images/nope", "kernel").await,
        Code::NotFound,
        "NOT_FOUND",
    );
    // A controller without the content sends the node elsewhere.
    for e in std::fs::read_dir(content.path())?.flatten() {
        std::fs::remove_dir_all(e.path())?;
    }
    let err = fetch(&mut n1, "images/up", "kernel")
        .await
        .expect_err("not here");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(reason(&err), "IMAGE_CONTENT_ELSEWHERE");
    Ok(())
}
