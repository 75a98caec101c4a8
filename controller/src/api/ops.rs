//! `nephele.ops.v1`: long-running operations and the event log.

use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use nephele_proto::ops::v1 as pb;
use nephele_proto::ops::v1::events_server::Events;
use nephele_proto::ops::v1::operations_server::Operations;
use nephele_state::names;
use tokio::sync::broadcast::error::RecvError;
use tonic::{Request, Response as Reply, Status};

use super::auth::Caller;
use super::authz::Target;
use super::errors::ApiError;
use super::{Api, Page, convert, project_target};
use crate::store::StateStore;

const OPS: &str = "/nephele.ops.v1.Operations/";
const EVENTS: &str = "/nephele.ops.v1.Events/";
/// WaitOperation's wait when the request does not say.
const DEFAULT_WAIT: Duration = Duration::from_secs(30);

/// Whether `caller` may see things about `resource`: admins everything,
/// others what is in a project they have a role in.
fn visible(caller: &Caller, resource: &str) -> bool {
    caller.admin || names::project_of(resource).is_some_and(|p| caller.can_read(p))
}

/// Validates a `project` filter; readers may only filter on their own.
fn project_filter(project: &str) -> Result<Option<String>, ApiError> {
    if project.is_empty() {
        return Ok(None);
    }
    names::parse(project, names::PROJECT)?;
    Ok(Some(format!("{project}/")))
}

/// Up to `size` of `items` (sequence number, message) and, when there are
/// more, the sequence number to continue after.
fn first_page(
    mut items: impl Iterator<Item = (u64, pb::Event)>,
    size: usize,
) -> (Vec<pb::Event>, Option<u64>) {
    let mut out = Vec::new();
    let mut last = None;
    for (seq, event) in items.by_ref() {
        if out.len() == size {
            return (out, last);
        }
        out.push(event);
        last = Some(seq);
    }
    (out, None)
}

impl<S: StateStore> Api<S> {
    /// The operation `name`, if the caller may read what it is about.
    async fn operation_for<'a>(
        &self,
        call: impl Into<super::Call<'a>>,
        rpc: &str,
        name: String,
    ) -> Result<pb::Operation, ApiError> {
        let call = call.into();
        names::parse(&name, names::OPERATION)?;
        let caller = match self.authenticate(call.metadata).await {
            Ok(c) => c,
            Err(e) => {
                let origin = super::origin(call, rpc);
                self.record_denial("anonymous".into(), origin, Target::Cluster, &e)
                    .await;
                return Err(e);
            }
        };
        let op = self
            .get_one(name, |s| &s.operations, convert::operation)
            .await?;
        let target = project_target(&op.target);
        if let Err(e) = super::authz::authorize(&caller, rpc, target) {
            let origin = super::origin(call, rpc);
            self.record_denial(caller.user, origin, target, &e).await;
            return Err(e);
        }
        Ok(op)
    }
}

#[tonic::async_trait]
impl<S: StateStore> Operations for Api<S> {
    async fn get_operation(
        &self,
        req: Request<pb::GetOperationRequest>,
    ) -> Result<Reply<pb::Operation>, Status> {
        let name = req.get_ref().name.clone();
        let op = self
            .operation_for(&req, &format!("{OPS}GetOperation"), name)
            .await?;
        Ok(Reply::new(op))
    }

    async fn list_operations(
        &self,
        req: Request<pb::ListOperationsRequest>,
    ) -> Result<Reply<pb::ListOperationsResponse>, Status> {
        let caller = self
            .authorize(&req, &format!("{OPS}ListOperations"), Target::Cluster)
            .await?;
        let r = req.into_inner();
        let page = Page::parse(r.page_size, &r.page_token)?;
        let project = project_filter(&r.project)?;
        let only_pending = r.only_pending;
        let (operations, next_page_token) = self
            .read(move |s| {
                page.take(&s.operations, "operations/", |o| {
                    let keep = visible(&caller, &o.target)
                        && project
                            .as_ref()
                            .is_none_or(|p| o.target.starts_with(p.as_str()))
                        && (!only_pending || !o.done);
                    keep.then(|| convert::operation(o))
                })
            })
            .await?;
        Ok(Reply::new(pb::ListOperationsResponse {
            operations,
            next_page_token,
        }))
    }

    async fn wait_operation(
        &self,
        req: Request<pb::WaitOperationRequest>,
    ) -> Result<Reply<pb::Operation>, Status> {
        let rpc = format!("{OPS}WaitOperation");
        let r = req.get_ref().clone();
        let wait = r
            .timeout
            .as_ref()
            .map(|d| Duration::from_millis(convert::duration_ms(d)))
            .unwrap_or(DEFAULT_WAIT)
            .min(self.inner.config.max_wait);
        let deadline = tokio::time::Instant::now() + wait;
        let mut changes = self.store().watch();
        let mut op = self.operation_for(&req, &rpc, r.name.clone()).await?;
        while !op.done {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => break,
                got = changes.recv() => {
                    if let Err(RecvError::Closed) = got {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        changes = self.store().watch();
                    }
                }
            }
            let name = r.name.clone();
            if let Some(o) = self
                .read(move |s| s.operations.get(&name).map(convert::operation))
                .await?
            {
                op = o;
            }
        }
        Ok(Reply::new(op))
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::Event, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl<S: StateStore> Events for Api<S> {
    async fn list_events(
        &self,
        req: Request<pb::ListEventsRequest>,
    ) -> Result<Reply<pb::ListEventsResponse>, Status> {
        let caller = self
            .authorize(&req, &format!("{EVENTS}ListEvents"), Target::Cluster)
            .await?;
        let r = req.into_inner();
        let page = Page::parse(r.page_size, &r.page_token)?;
        // Events are a sequence, not a map: the token is the last seq.
        let after: u64 = match &page.after {
            None => 0,
            Some(a) => a.parse().map_err(|_| {
                ApiError::InvalidArgument("page_token is not one this API returned".into())
            })?,
        };
        let project = project_filter(&r.project)?;
        let (resource, audit) = (r.resource, r.audit);
        let size = page.size;
        let (events, last) = self
            .read(move |s| {
                let wanted = |about: &str, by: &str| {
                    (visible(&caller, about) || (audit && by == caller.user))
                        && project.as_ref().is_none_or(|p| {
                            about.starts_with(p.as_str()) || Some(about) == p.strip_suffix('/')
                        })
                        && (resource.is_empty() || about == resource)
                };
                if audit {
                    first_page(
                        s.audit
                            .iter()
                            .filter(|a| a.seq > after && wanted(&a.resource, &a.actor))
                            .map(|a| (a.seq, convert::audit(a))),
                        size,
                    )
                } else {
                    first_page(
                        s.events
                            .iter()
                            .filter(|e| e.seq > after && wanted(&e.resource, &e.actor))
                            .map(|e| (e.seq, convert::event(e))),
                        size,
                    )
                }
            })
            .await?;
        Ok(Reply::new(pb::ListEventsResponse {
            events,
            next_page_token: last
                .map(|l| super::encode_token(&l.to_string()))
                .unwrap_or_default(),
        }))
    }

    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        req: Request<pb::WatchEventsRequest>,
    ) -> Result<Reply<EventStream>, Status> {
        let caller = self
            .authorize(&req, &format!("{EVENTS}WatchEvents"), Target::Cluster)
            .await?;
        let r = req.into_inner();
        let project = project_filter(&r.project)?;
        let mut changes = self.store().watch();
        let mut last = if r.after_seq == 0 {
            self.read(|s| s.next_event_seq).await?
        } else {
            r.after_seq
        };
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        let api = self.clone();
        tokio::spawn(async move {
            loop {
                let (caller, project) = (caller.clone(), project.clone());
                let batch = api
                    .read(move |s| {
                        s.events
                            .iter()
                            .filter(|e| e.seq > last)
                            .map(|e| {
                                let keep = visible(&caller, &e.resource)
                                    && project
                                        .as_ref()
                                        .is_none_or(|p| e.resource.starts_with(p.as_str()));
                                (e.seq, keep.then(|| convert::event(e)))
                            })
                            .collect::<Vec<_>>()
                    })
                    .await;
                let batch = match batch {
                    Ok(b) => b,
                    Err(e) => {
                        let _ = tx.send(Err(Status::from(e))).await;
                        return;
                    }
                };
                for (seq, event) in batch {
                    last = seq;
                    if let Some(e) = event
                        && tx.send(Ok(e)).await.is_err()
                    {
                        return;
                    }
                }
                tokio::select! {
                    _ = tx.closed() => return,
                    got = changes.recv() => match got {
                        Ok(_) | Err(RecvError::Lagged(_)) => {}
                        Err(RecvError::Closed) => {
                            let _ = tx.send(Err(Status::unavailable("the controller is stopping; watch again elsewhere"))).await;
                            return;
                        }
                    },
                }
            }
        });
        Ok(Reply::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
