//! The migration half of `nephele.node.v1.NodeAgent`: what a migration's
//! source and target nodes are told in their assignments, their progress
//! reports, and the switchover request, which answers yes only once the
//! switchover is decided in the log (`Command::SwitchMigration`: the
//! migration goes SWITCHING).
//!
//! How a decided switchover ends (see `docs/migration.md`): the source's
//! VMM pauses the VM, sends the rest and `Complete`, and the target's runs
//! it. Then either side reports `completed` (the source on the target's
//! acknowledgement, the target once its VMM runs the VM) and the instance
//! moves. If the source fails before `Complete` went out, it reports
//! `failed` and keeps the VM. If `Complete` went out and no acknowledgement
//! came back, the source reports `in_doubt` (IN_DOUBT) and keeps the VM
//! paused; the target's agent, told `in_doubt`, freezes its VMM and looks
//! for the arrival file the VMM writes before the VM first runs: found, it
//! reports `completed`; not found, it kills the VMM and reports `failed`,
//! and the source resumes the VM.

use nephele_proto::node::v1 as pb;
use nephele_state::model::{Migration, MigrationProgress, MigrationState, State};
use nephele_state::names;
use nephele_state::{Command, Response};

use super::errors::ApiError;
use super::{Api, convert};
use crate::store::StateStore;

/// What `node` is told about `instance`'s migration, if it takes part.
pub fn assignment_of(s: &State, node: &str, instance: &str) -> Option<pb::MigrationAssignment> {
    let m = s.migration_of(instance)?;
    let (role, peer, peer_node) = if m.source == node {
        (
            pb::MigrationRole::MigrationSource,
            m.target_address.clone(),
            m.target.clone(),
        )
    } else if m.target == node {
        (
            pb::MigrationRole::MigrationTarget,
            String::new(),
            m.source.clone(),
        )
    } else {
        return None;
    };
    Some(pb::MigrationAssignment {
        migration: m.name.clone(),
        role: role as i32,
        peer_address: peer,
        max_downtime_ms: m.max_downtime_ms,
        decided: m.state.is_switching(),
        in_doubt: m.state == MigrationState::InDoubt,
        peer_node,
    })
}

/// Instances migrating to `node` (placed elsewhere until the switchover).
pub fn incoming<'a>(s: &'a State, node: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    s.unfinished_migrations()
        .filter(move |m| m.target == node)
        .map(|m| m.instance.as_str())
}

fn progress_in(p: Option<&pb::MigrationProgress>) -> Option<MigrationProgress> {
    p.map(|p| MigrationProgress {
        round: p.round,
        bytes_sent: p.bytes_sent,
        bytes_remaining: p.bytes_remaining,
        dirty_rate_bps: p.dirty_rate_bps,
        throughput_bps: p.throughput_bps,
        expected_downtime_ms: p.expected_downtime_ms,
        throttle_percent: p.throttle_percent,
        downtime_us: p.downtime_us,
    })
}

fn migration_of(r: Response) -> Result<Migration, ApiError> {
    match r {
        Response::Migration(m) => Ok(m),
        other => Err(ApiError::Internal(format!("unexpected answer {other:?}"))),
    }
}

impl<S: StateStore> Api<S> {
    /// `ReportMigration`, after authorization.
    pub(super) async fn report_migration_checked(
        &self,
        r: pb::ReportMigrationRequest,
    ) -> Result<pb::ReportMigrationResponse, ApiError> {
        names::parse(&r.node, names::NODE)?;
        names::parse(&r.migration, names::MIGRATION)?;
        let progress = progress_in(r.progress.as_ref());
        let m = if r.completed {
            self.complete_migration(&r.node, &r.migration, progress)
                .await?
        } else if r.in_doubt {
            let name = r.migration.clone();
            let source = self
                .read_try(move |s| {
                    s.migrations
                        .get(&name)
                        .map(|m| m.source.clone())
                        .ok_or_else(|| ApiError::not_found(name))
                })
                .await?;
            if source != r.node {
                return Err(ApiError::FailedPrecondition(format!(
                    "only the source {source} can be in doubt about {}",
                    r.migration
                )));
            }
            let command = Command::SetMigrationState {
                migration: r.migration,
                state: MigrationState::InDoubt,
                bytes_copied: progress.map_or(0, |p| p.bytes_sent),
                reason: r.reason,
            };
            migration_of(self.propose(&r.node, None, command).await?)?
        } else if r.failed || r.cancelled {
            // The source ends it (the VM resumed there); the target may
            // only fail it (its VMM is gone). Either way the log orders it
            // against the switchover: once failed, no switchover commits.
            let name = r.migration.clone();
            let (source, target) = self
                .read_try(move |s| {
                    s.migrations
                        .get(&name)
                        .map(|m| (m.source.clone(), m.target.clone()))
                        .ok_or_else(|| ApiError::not_found(name))
                })
                .await?;
            let target_fails = r.node == target && r.failed && !r.cancelled;
            if source != r.node && !target_fails {
                return Err(ApiError::FailedPrecondition(format!(
                    "only the source {source} can end {} (its target can fail it)",
                    r.migration
                )));
            }
            let state = if r.cancelled {
                MigrationState::Cancelled
            } else {
                MigrationState::Failed
            };
            let command = Command::SetMigrationState {
                migration: r.migration,
                state,
                bytes_copied: progress.map_or(0, |p| p.bytes_sent),
                reason: r.reason,
            };
            migration_of(self.propose(&r.node, None, command).await?)?
        } else {
            let command = Command::UpdateMigration {
                migration: r.migration,
                node: r.node.clone(),
                target_address: r.target_address,
                progress,
            };
            migration_of(self.propose(&r.node, None, command).await?)?
        };
        Ok(pb::ReportMigrationResponse {
            migration: Some(convert::migration(&m)),
        })
    }

    /// A `completed` report from the migration's source or target: the
    /// instance moves (once; a repeated report finds it done), and the
    /// source's figures (its measured downtime) are kept.
    async fn complete_migration(
        &self,
        node: &str,
        migration: &str,
        progress: Option<MigrationProgress>,
    ) -> Result<Migration, ApiError> {
        let name = migration.to_owned();
        let (source, target) = self
            .read_try(move |s| {
                s.migrations
                    .get(&name)
                    .map(|m| (m.source.clone(), m.target.clone()))
                    .ok_or_else(|| ApiError::not_found(name))
            })
            .await?;
        if node != source && node != target {
            return Err(ApiError::FailedPrecondition(format!(
                "{node} takes no part in {migration}"
            )));
        }
        let command = Command::SetMigrationState {
            migration: migration.to_owned(),
            state: MigrationState::Completed,
            bytes_copied: progress.map_or(0, |p| p.bytes_sent),
            reason: String::new(),
        };
        let done = match self.propose(node, None, command).await {
            Ok(r) => Some(migration_of(r)?),
            // Completed already (the other side said so first): fine.
            Err(ApiError::FailedPrecondition(why)) => {
                let name = migration.to_owned();
                let m = self
                    .read_try(move |s| {
                        s.migrations
                            .get(&name)
                            .cloned()
                            .ok_or_else(|| ApiError::not_found(name))
                    })
                    .await?;
                if m.state != MigrationState::Completed {
                    return Err(ApiError::FailedPrecondition(why));
                }
                Some(m)
            }
            Err(e) => return Err(e),
        };
        if node == source && progress.is_some() {
            let command = Command::UpdateMigration {
                migration: migration.to_owned(),
                node: node.to_owned(),
                target_address: String::new(),
                progress,
            };
            return migration_of(self.propose(node, None, command).await?);
        }
        done.ok_or_else(|| ApiError::Internal("no migration".into()))
    }

    /// `RequestSwitchover`, after authorization: yes only once committed.
    pub(super) async fn request_switchover_checked(
        &self,
        r: pb::RequestSwitchoverRequest,
    ) -> Result<pb::RequestSwitchoverResponse, ApiError> {
        names::parse(&r.node, names::NODE)?;
        names::parse(&r.migration, names::MIGRATION)?;
        let command = Command::SwitchMigration {
            migration: r.migration.clone(),
            node: r.node.clone(),
            progress: progress_in(r.progress.as_ref()),
        };
        match self.propose(&r.node, None, command).await {
            // Decided (now, or by an earlier request whose answer was
            // lost: the state machine answers that one yes again).
            Ok(_) => {
                tracing::info!(migration = %r.migration, "switchover decided");
                Ok(pb::RequestSwitchoverResponse {
                    allowed: true,
                    reason: String::new(),
                })
            }
            // Refused by the state machine: a definite no.
            Err(ApiError::FailedPrecondition(why)) => Ok(pb::RequestSwitchoverResponse {
                allowed: false,
                reason: why,
            }),
            // Anything else (no leader, timeout) is an error: the source
            // treats it as no as well.
            Err(e) => Err(e),
        }
    }
}
