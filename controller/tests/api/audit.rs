//! The audit trail (`ListEvents` with `audit`) and token revocation: who,
//! what, when, from where and with what result, for people's changes and
//! for every refused call; who may read which records; the per-controller
//! budget that keeps a flood of refused calls from flooding the log.

use nephele_proto::compute::v1 as compute;
use nephele_proto::iam::v1 as iam;
use nephele_proto::ops::v1 as ops;
use tonic::Code;

use super::support::*;

async fn audit_of(c: &mut Clients) -> anyhow::Result<Vec<ops::Event>> {
    let mut out = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = c
            .events
            .list_events(ops::ListEventsRequest {
                audit: true,
                page_size: 500,
                page_token,
                ..Default::default()
            })
            .await?
            .into_inner();
        out.extend(page.events);
        if page.next_page_token.is_empty() {
            return Ok(out);
        }
        page_token = page.next_page_token;
    }
}

fn group(id: &str) -> compute::CreateServerGroupRequest {
    compute::CreateServerGroupRequest {
        parent: "projects/p1".into(),
        server_group_id: id.into(),
        server_group: Some(compute::ServerGroup {
            policy: compute::GroupPolicy::AntiAffinity as i32,
            ..Default::default()
        }),
        request_id: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_and_refusals_are_audited_with_who_what_where_and_result() -> anyhow::Result<()> {
    let mut env = start().await?;
    let (alice_t, bob_t, carol_t) = populate(&mut env.admin).await?;
    let mut alice = clients(&env.channel, Some(&alice_t));
    let mut bob = clients(&env.channel, Some(&bob_t));
    let mut carol = clients(&env.channel, Some(&carol_t));
    let mut nobody = clients(&env.channel, None);
    let mut forged = clients(
        &env.channel,
        Some(&format!("{}x", &alice_t[..alice_t.len() - 1])),
    );

    // A change that works, one the state refuses, one authorization
    // refuses, and two authentication refuses.
    alice.groups.create_server_group(group("web")).await?;
    assert_err(
        alice.groups.create_server_group(group("web")).await,
        Code::AlreadyExists,
        "ALREADY_EXISTS",
    );
    assert_err(
        bob.groups.create_server_group(group("db")).await,
        Code::PermissionDenied,
        "PERMISSION_DENIED",
    );
    assert_err(
        carol
            .iam
            .get_project(iam::GetProjectRequest {
                name: "projects/p1".into(),
            })
            .await,
        Code::PermissionDenied,
        "PERMISSION_DENIED",
    );
    assert_err(
        nobody.groups.create_server_group(group("x")).await,
        Code::Unauthenticated,
        "UNAUTHENTICATED",
    );
    assert_err(
        forged.groups.create_server_group(group("y")).await,
        Code::Unauthenticated,
        "UNAUTHENTICATED",
    );

    let all = audit_of(&mut env.admin).await?;
    let create_rpc = "/nephele.compute.v1.ServerGroups/CreateServerGroup";
    let find = |actor: &str, result_prefix: &str| {
        all.iter()
            .find(|r| {
                r.actor == actor && r.rpc == create_rpc && r.result.starts_with(result_prefix)
            })
            .unwrap_or_else(|| panic!("no {actor} {result_prefix} record in {all:#?}"))
    };
    let ok = find("users/alice", "ok");
    assert_eq!(ok.kind, "audit");
    assert_eq!(ok.resource, "projects/p1/serverGroups/web");
    assert!(ok.peer.starts_with("127.0.0.1:"), "{ok:?}");
    assert!(ok.time.is_some());
    assert!(
        all.iter().any(|r| r.actor == "users/alice"
            && r.rpc == create_rpc
            && r.result.contains("exists")),
        "{all:#?}"
    );
    let denied = find("users/bob", "PERMISSION_DENIED");
    assert_eq!(denied.resource, "projects/p1");
    assert!(denied.peer.starts_with("127.0.0.1:"));
    let read_denied = all
        .iter()
        .find(|r| r.actor == "users/carol" && r.rpc == "/nephele.iam.v1.Iam/GetProject")
        .expect("carol's refused read is audited");
    assert!(read_denied.result.starts_with("PERMISSION_DENIED"));
    let anonymous: Vec<_> = all
        .iter()
        .filter(|r| r.actor == "anonymous" && r.result.starts_with("UNAUTHENTICATED"))
        .collect();
    assert_eq!(anonymous.len(), 2, "{anonymous:#?}");
    // Sequence numbers grow and are never reused.
    assert!(all.windows(2).all(|w| w[0].seq < w[1].seq));

    // Who reads what: alice sees what happened in p1 (refusals of others
    // there too) and nothing of the admin's setup elsewhere; carol (of p2)
    // none of p1's records but her own refusal there.
    let alices = audit_of(&mut alice).await?;
    assert!(alices.iter().any(|r| r.actor == "users/bob"));
    assert!(alices.iter().any(|r| r.actor == "anonymous"));
    assert!(
        alices
            .iter()
            .all(|r| r.resource.starts_with("projects/p1") || r.actor == "users/alice"),
        "{alices:#?}"
    );
    assert!(all.iter().any(|r| r.resource == "projects/p2"));
    let carols = audit_of(&mut carol).await?;
    assert!(!carols.is_empty());
    assert!(
        carols
            .iter()
            .all(|r| r.resource.starts_with("projects/p2") || r.actor == "users/carol"),
        "{carols:#?}"
    );
    assert!(carols.iter().any(|r| r.actor == "users/carol"));
    // The trail itself needs a valid token.
    assert_err(
        nobody
            .events
            .list_events(ops::ListEventsRequest {
                audit: true,
                ..Default::default()
            })
            .await,
        Code::Unauthenticated,
        "UNAUTHENTICATED",
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_stops_working_at_once() -> anyhow::Result<()> {
    let mut env = start().await?;
    let (alice_t, _, _) = populate(&mut env.admin).await?;
    let mut alice = clients(&env.channel, Some(&alice_t));
    let second = alice
        .iam
        .create_token(iam::CreateTokenRequest {
            parent: "users/alice".into(),
            token_id: "laptop".into(),
            token: None,
        })
        .await?
        .into_inner();
    let mut laptop = clients(&env.channel, Some(&second.secret));
    // Used once, so this controller has verified (and cached) it.
    laptop.iam.get_caller(iam::GetCallerRequest {}).await?;
    alice
        .iam
        .delete_token(iam::DeleteTokenRequest {
            name: "users/alice/tokens/laptop".into(),
        })
        .await?;
    assert_err(
        laptop.iam.get_caller(iam::GetCallerRequest {}).await,
        Code::Unauthenticated,
        "UNAUTHENTICATED",
    );
    // The other token is unaffected.
    alice.iam.get_caller(iam::GetCallerRequest {}).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_refused_calls_is_audited_within_a_budget() -> anyhow::Result<()> {
    let mut env = start().await?;
    let mut nobody = clients(&env.channel, None);
    const FLOOD: usize = 400;
    for _ in 0..FLOOD {
        assert_err(
            nobody.iam.get_caller(iam::GetCallerRequest {}).await,
            Code::Unauthenticated,
            "UNAUTHENTICATED",
        );
    }
    // Let the budget refill a little, then one more refusal: its record
    // says how many were left out.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let _ = nobody.iam.get_caller(iam::GetCallerRequest {}).await;
    let refused: Vec<_> = audit_of(&mut env.admin)
        .await?
        .into_iter()
        .filter(|r| r.actor == "anonymous")
        .collect();
    assert!(
        refused.len() >= 50 && refused.len() < FLOOD,
        "{} of {FLOOD} recorded",
        refused.len()
    );
    let note = refused.last().expect("some recorded");
    assert!(note.result.contains("were not recorded"), "{note:?}");
    Ok(())
}
