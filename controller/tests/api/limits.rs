//! Oversized requests: the API refuses a message larger than its explicit
//! limit (`api::MAX_DECODING_MESSAGE_SIZE`) with OUT_OF_RANGE (tonic's code
//! for it) before any handler sees it, changes nothing, and keeps serving.

use neph_controller::api::MAX_DECODING_MESSAGE_SIZE;
use nephele_proto::iam::v1 as iam;
use tonic::Code;

use super::support::*;

fn project(id: &str, display_name: String) -> iam::CreateProjectRequest {
    iam::CreateProjectRequest {
        project_id: id.into(),
        project: Some(iam::Project {
            display_name,
            ..Default::default()
        }),
        request_id: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_request_is_refused_and_changes_nothing() -> anyhow::Result<()> {
    let mut env = start().await?;
    let before = env
        .admin
        .iam
        .list_projects(iam::ListProjectsRequest::default())
        .await?;
    let huge = "x".repeat(MAX_DECODING_MESSAGE_SIZE + 1);
    let e = env
        .admin
        .iam
        .create_project(project("big", huge))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    // Not created, and nothing else either.
    assert_eq!(
        env.admin
            .iam
            .list_projects(iam::ListProjectsRequest::default())
            .await?
            .into_inner(),
        before.into_inner()
    );
    // The server keeps serving, on the same channel.
    env.admin
        .iam
        .create_project(project("small", "fits".into()))
        .await?;
    Ok(())
}
