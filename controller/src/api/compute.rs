//! `nephele.compute.v1`: flavors, images, instances and server groups.

use super::auth::Caller;
use nephele_proto::compute::v1 as pb;
use nephele_proto::compute::v1::flavors_server::Flavors;
use nephele_proto::compute::v1::images_server::Images;
use nephele_proto::compute::v1::instances_server::Instances;
use nephele_proto::compute::v1::server_groups_server::ServerGroups;
use nephele_proto::ops::v1 as ops_pb;
use nephele_state::model::{ImageState, InstanceState, State};
use nephele_state::names;
use nephele_state::{Command, InstanceSpec, MAX_BATCH_CREATE, NewInstance, Response};
use tonic::{Request, Response as Reply, Status, Streaming};

use super::authz::Target;
use super::errors::ApiError;
use super::{Api, Page, console, convert, derived_id, project_target, request_id};
use crate::reconcile;
use crate::store::StateStore;

fn unexpected(r: Response) -> ApiError {
    ApiError::Internal(format!("unexpected answer from the state machine: {r:?}"))
}

fn operation_of(r: Response) -> Result<ops_pb::Operation, ApiError> {
    match r {
        Response::Instance {
            operation: Some(op),
            ..
        } => Ok(convert::operation(&op)),
        other => Err(unexpected(other)),
    }
}

/// Image formats compute nodes boot (`compute-node/agent/src/instance.rs`,
/// `image_files`).
const BOOTABLE_FORMATS: [&str; 3] = ["pvh-elf", "bzimage", "raw"];

/// Refuses an image format nodes cannot boot, saying what to do instead.
fn check_image_format(format: &str) -> Result<(), ApiError> {
    match format {
        f if BOOTABLE_FORMATS.contains(&f) => Ok(()),
        "qcow2" => Err(ApiError::InvalidArgument(
            "image format qcow2 is not supported yet; convert it to raw (`qemu-img convert -O raw IMAGE.qcow2 disk.raw`) and register it with format raw".into(),
        )),
        "" => Err(ApiError::InvalidArgument(
            "image.format is required: pvh-elf, bzimage or raw".into(),
        )),
        other => Err(ApiError::InvalidArgument(format!(
            "unknown image format {other:?}; nodes boot pvh-elf, bzimage or raw"
        ))),
    }
}

/// What a create needs checked before anything is proposed, so that a
/// create that cannot succeed creates nothing: references, quota for all
/// `count` instances, and whether any node could take them.
fn precheck_create(
    s: &State,
    project: &str,
    flavor: &str,
    image: &str,
    group: Option<&str>,
    count: u32,
) -> Result<(), ApiError> {
    let p = s
        .projects
        .get(project)
        .ok_or_else(|| ApiError::not_found(project))?;
    let res = s
        .flavors
        .get(flavor)
        .ok_or_else(|| ApiError::not_found(flavor))?
        .resources;
    let img = s
        .images
        .get(image)
        .ok_or_else(|| ApiError::not_found(image))?;
    if img.state != ImageState::Active {
        return Err(ApiError::FailedPrecondition(format!(
            "{image} is not active; wait for its upload or pick another image"
        )));
    }
    if !BOOTABLE_FORMATS.contains(&img.format.as_str()) {
        return Err(ApiError::FailedPrecondition(format!(
            "{image} has format {:?}, which compute nodes cannot boot ({}); pick another image",
            img.format,
            BOOTABLE_FORMATS.join(", ")
        )));
    }
    if let Some(g) = group
        && !s.server_groups.contains_key(g)
    {
        return Err(ApiError::not_found(g));
    }
    let n = u64::from(count);
    if p.instance_count + n > p.quota.instances {
        return Err(ApiError::QuotaExceeded {
            project: project.to_owned(),
            message: format!(
                "quota of {project} exceeded: {} of {} instances used, {n} more asked; delete instances or ask an admin to raise the quota",
                p.instance_count, p.quota.instances
            ),
        });
    }
    let mut usage = p.usage;
    for _ in 0..count {
        usage = usage.plus(res);
    }
    if !usage.fits_in(p.quota.resources) {
        return Err(ApiError::QuotaExceeded {
            project: project.to_owned(),
            message: format!(
                "quota of {project} exceeded: would use {} vCPUs, {} MiB, {} GiB of {} vCPUs, {} MiB, {} GiB; pick a smaller flavor or ask an admin to raise the quota",
                usage.vcpus,
                usage.memory_mib,
                usage.disk_gib,
                p.quota.resources.vcpus,
                p.quota.resources.memory_mib,
                p.quota.resources.disk_gib
            ),
        });
    }
    let snap = reconcile::snapshot(s);
    let mut scheduler =
        nephele_scheduler::Scheduler::new(&snap).map_err(|e| ApiError::Internal(e.to_string()))?;
    let req = reconcile::request(
        format!("precheck/{project}"),
        res,
        group.map(str::to_owned),
        count,
    );
    match scheduler.place(&req, nephele_scheduler::Explain::Summary) {
        Ok(_) => Ok(()),
        Err(nephele_scheduler::PlaceError::NoValidHost(e)) => {
            Err(ApiError::NoValidHost(e.to_string()))
        }
        Err(e) => Err(ApiError::InvalidArgument(e.to_string())),
    }
}

/// Whether the node of the stopped instance `instance` can hold it as
/// `flavor` under the scheduler's overcommit ratios: NO_VALID_HOST with the
/// dimension that does not fit when it cannot. Returns the node's limit for
/// the command, so the state machine checks the same bound against the
/// allocation it applies to (another instance may land there meanwhile).
/// Anything else wrong with the request is the state machine's to refuse.
fn resize_room(
    s: &State,
    instance: &str,
    flavor: &str,
) -> Result<Option<nephele_state::model::Resources>, ApiError> {
    let (Some(i), Some(f)) = (s.instances.get(instance), s.flavors.get(flavor)) else {
        return Ok(None);
    };
    let Some(n) = i.node.as_ref().and_then(|n| s.nodes.get(n)) else {
        return Ok(None);
    };
    let limit = reconcile::node_limit(n.capacity);
    let (old, new) = (i.resources, f.resources);
    let held = n.allocated.minus(old).plus(new);
    if i.state != InstanceState::Stopped || new.fits_in(old) || held.fits_in(limit) {
        return Ok(Some(limit));
    }
    let ratios = reconcile::overcommit();
    let free = |limit: u64, allocated: u64| limit.saturating_sub(allocated);
    // What the node holds without this instance, against which its new
    // size is weighed.
    let old_held = n.allocated.minus(old);
    let short = if held.vcpus > limit.vcpus {
        format!(
            "vcpus: needs {}, {} free after ratio {}",
            new.vcpus,
            free(limit.vcpus, old_held.vcpus),
            ratios.cpu
        )
    } else if held.memory_mib > limit.memory_mib {
        format!(
            "memory: needs {} MiB, {} MiB free after ratio {}",
            new.memory_mib,
            free(limit.memory_mib, old_held.memory_mib),
            ratios.ram
        )
    } else {
        format!(
            "disk: needs {} GiB, {} GiB free after ratio {}",
            new.disk_gib,
            free(limit.disk_gib, old_held.disk_gib),
            ratios.disk
        )
    };
    Err(ApiError::NoValidHost(format!(
        "{} cannot hold {instance} as {flavor} ({short}); its disk stays on that node, so stop or delete other instances there, or pick a smaller flavor",
        n.name
    )))
}

/// A stop request's graceful timeout in ms (`None`: the controllers'
/// default); zero forces the VM off at once.
fn stop_timeout_ms(timeout: Option<&prost_types::Duration>) -> Result<Option<u64>, ApiError> {
    let Some(d) = timeout else {
        return Ok(None);
    };
    let max = nephele_state::MAX_STOP_TIMEOUT_MS;
    let ms = u64::try_from(d.seconds)
        .ok()
        .zip(u64::try_from(d.nanos).ok())
        .and_then(|(s, n)| s.checked_mul(1000)?.checked_add(n / 1_000_000))
        .filter(|ms| *ms <= max)
        .ok_or_else(|| {
            ApiError::InvalidArgument(format!(
                "timeout must be 0 to {} s (0 forces the VM off at once)",
                max / 1000
            ))
        })?;
    Ok(Some(ms))
}

/// The parts of a create request every instance shares, checked.
fn create_spec(parent: &str, instance: Option<pb::Instance>) -> Result<InstanceSpec, ApiError> {
    names::parse(parent, names::PROJECT)?;
    let i = instance.ok_or_else(|| ApiError::InvalidArgument("instance is required".into()))?;
    if i.flavor.is_empty() || i.image.is_empty() {
        return Err(ApiError::InvalidArgument(
            "instance.flavor and instance.image are required (flavors/NAME, images/NAME)".into(),
        ));
    }
    names::parse(&i.flavor, names::FLAVOR)?;
    names::parse(&i.image, names::IMAGE)?;
    let group = (!i.server_group.is_empty()).then_some(i.server_group);
    if let Some(g) = &group {
        names::parse(g, names::SERVER_GROUP)?;
        if names::project_of(g) != Some(parent) {
            return Err(ApiError::InvalidArgument(format!(
                "server group {g} is not in {parent}"
            )));
        }
    }
    Ok(InstanceSpec {
        flavor: i.flavor,
        image: i.image,
        server_group: group,
        labels: i.labels.into_iter().collect(),
        ha: i.ha,
    })
}

impl<S: StateStore> Api<S> {
    /// Creates `ids` in `project` alike as ONE command (all or none), after
    /// the prechecks (skipped when `rid` was already answered, so a retry
    /// gets the first answer even if the quota is now used up).
    async fn create_instances(
        &self,
        call: super::Call<'_>,
        rpc: &str,
        parent: &str,
        ids: Vec<String>,
        instance: Option<pb::Instance>,
        rid: Option<String>,
    ) -> Result<Vec<ops_pb::Operation>, ApiError> {
        names::parse(parent, names::PROJECT)?;
        let caller = self
            .authorize(call, &format!("{INSTANCES}{rpc}"), Target::Project(parent))
            .await?;
        for id in &ids {
            names::validate_id(id)?;
        }
        let spec = create_spec(parent, instance)?;
        let count = u32::try_from(ids.len()).unwrap_or(u32::MAX);
        let (project, check, answered) = (parent.to_owned(), spec.clone(), rid.clone());
        let checked = self
            .read_try(move |s| {
                if answered.is_some_and(|r| s.requests.contains_key(&r)) {
                    return Ok(());
                }
                precheck_create(
                    s,
                    &project,
                    &check.flavor,
                    &check.image,
                    check.server_group.as_deref(),
                    count,
                )
            })
            .await;
        if let Err(e) = checked {
            if matches!(
                e,
                ApiError::QuotaExceeded { .. }
                    | ApiError::NoValidHost(_)
                    | ApiError::NotFound { .. }
                    | ApiError::FailedPrecondition(_)
            ) {
                // Into the audit trail, best effort: the caller gets the
                // refusal either way.
                let resource = match ids.as_slice() {
                    [one] => format!("{parent}/instances/{one}"),
                    _ => format!("{parent}/instances"),
                };
                let record = Command::RecordRefusal {
                    resource,
                    reason: e.to_string(),
                };
                if let Err(not) = self.propose_as(&caller, None, record).await {
                    tracing::debug!(error = %not, "refused create not recorded");
                }
            }
            return Err(e);
        }
        let mut instances = Vec::with_capacity(ids.len());
        for instance_id in ids {
            let salt = format!("create/{parent}/{instance_id}");
            instances.push(NewInstance {
                operation_id: derived_id("op", rid.as_deref(), &salt)?,
                instance_id,
            });
        }
        let command = if let [one] = instances.as_slice() {
            Command::CreateInstance {
                project: parent.to_owned(),
                instance_id: one.instance_id.clone(),
                spec,
                operation_id: one.operation_id.clone(),
            }
        } else {
            Command::CreateInstances {
                project: parent.to_owned(),
                spec,
                instances,
            }
        };
        match self.propose_as(&caller, rid, command).await? {
            Response::Instance {
                operation: Some(op),
                ..
            } => Ok(vec![convert::operation(&op)]),
            Response::Created(created) => Ok(created
                .iter()
                .map(|(_, op)| convert::operation(op))
                .collect()),
            other => Err(unexpected(other)),
        }
    }

    /// Authorizes an instance-scoped call; returns the caller.
    async fn instance_call<'a>(
        &self,
        call: impl Into<super::Call<'a>>,
        rpc: &str,
        name: &str,
    ) -> Result<Caller, ApiError> {
        names::parse(name, names::INSTANCE)?;
        self.authorize(call, rpc, project_target(name)).await
    }

    /// Starts `verb` on the instance `name` (to state `to`); a stop may
    /// carry its graceful timeout.
    async fn action(
        &self,
        actor: &Caller,
        name: String,
        (to, verb): (InstanceState, &str),
        stop_timeout_ms: Option<u64>,
        rid: Option<String>,
    ) -> Result<ops_pb::Operation, ApiError> {
        let operation_id = derived_id("op", rid.as_deref(), &format!("{verb}/{name}"))?;
        let command = Command::BeginInstanceAction {
            instance: name,
            state: to,
            verb: verb.to_owned(),
            operation_id,
            stop_timeout_ms,
        };
        operation_of(self.propose_as(actor, rid, command).await?)
    }
}

const INSTANCES: &str = "/nephele.compute.v1.Instances/";

#[tonic::async_trait]
impl<S: StateStore> Instances for Api<S> {
    async fn create_instance(
        &self,
        req: Request<pb::CreateInstanceRequest>,
    ) -> Result<Reply<ops_pb::Operation>, Status> {
        let peer = req.remote_addr();
        let (metadata, _, r) = req.into_parts();
        let call = super::Call {
            metadata: &metadata,
            peer,
        };
        let mut ops = self
            .create_instances(
                call,
                "CreateInstance",
                &r.parent,
                vec![r.instance_id],
                r.instance,
                request_id(&r.request_id),
            )
            .await?;
        let op = ops
            .pop()
            .ok_or_else(|| ApiError::Internal("a create answered no operation".into()))?;
        Ok(Reply::new(op))
    }

    async fn batch_create_instances(
        &self,
        req: Request<pb::BatchCreateInstancesRequest>,
    ) -> Result<Reply<pb::BatchCreateInstancesResponse>, Status> {
        let peer = req.remote_addr();
        let (metadata, _, r) = req.into_parts();
        let call = super::Call {
            metadata: &metadata,
            peer,
        };
        // Authorized before anything about the request is said.
        self.authorize(
            call,
            &format!("{INSTANCES}BatchCreateInstances"),
            Target::Project(&r.parent),
        )
        .await?;
        let max = u32::try_from(MAX_BATCH_CREATE).unwrap_or(u32::MAX);
        if r.count == 0 || r.count > max {
            return Err(ApiError::InvalidArgument(format!(
                "count must be 1 to {max}, not {}",
                r.count
            ))
            .into());
        }
        let ids = (1..=r.count)
            .map(|k| format!("{}-{k}", r.instance_id))
            .collect();
        let operations = self
            .create_instances(
                call,
                "BatchCreateInstances",
                &r.parent,
                ids,
                r.instance,
                request_id(&r.request_id),
            )
            .await?;
        Ok(Reply::new(pb::BatchCreateInstancesResponse { operations }))
    }

    async fn get_instance(
        &self,
        req: Request<pb::GetInstanceRequest>,
    ) -> Result<Reply<pb::Instance>, Status> {
        let name = req.get_ref().name.clone();
        self.instance_call(&req, &format!("{INSTANCES}GetInstance"), &name)
            .await?;
        let i = self
            .get_one(name, |s| &s.instances, convert::instance)
            .await?;
        Ok(Reply::new(i))
    }

    async fn list_instances(
        &self,
        req: Request<pb::ListInstancesRequest>,
    ) -> Result<Reply<pb::ListInstancesResponse>, Status> {
        let r = req.get_ref();
        let all = r.parent == "projects/-";
        if !all {
            names::parse(&r.parent, names::PROJECT).map_err(ApiError::from)?;
        }
        let target = if all {
            Target::Cluster
        } else {
            Target::Project(&r.parent)
        };
        self.authorize(&req, &format!("{INSTANCES}ListInstances"), target)
            .await?;
        let r = req.into_inner();
        let page = Page::parse(r.page_size, &r.page_token)?;
        let state = convert::instance_state_in(r.state)?;
        let prefix = if all {
            "projects/".to_owned()
        } else {
            format!("{}/instances/", r.parent)
        };
        let (node, labels) = (r.node, r.labels);
        let (instances, next_page_token) = self
            .read(move |s| {
                page.take(&s.instances, &prefix, |i| {
                    let keep = state.is_none_or(|st| i.state == st)
                        && (node.is_empty() || i.node.as_deref() == Some(node.as_str()))
                        && labels.iter().all(|(k, v)| i.labels.get(k) == Some(v));
                    keep.then(|| convert::instance(i))
                })
            })
            .await?;
        Ok(Reply::new(pb::ListInstancesResponse {
            instances,
            next_page_token,
        }))
    }

    async fn start_instance(
        &self,
        req: Request<pb::StartInstanceRequest>,
    ) -> Result<Reply<ops_pb::Operation>, Status> {
        let name = req.get_ref().name.clone();
        let actor = self
            .instance_call(&req, &format!("{INSTANCES}StartInstance"), &name)
            .await?;
        let rid = request_id(&req.get_ref().request_id);
        Ok(Reply::new(
            self.action(&actor, name, (InstanceState::Starting, "start"), None, rid)
                .await?,
        ))
    }

    async fn stop_instance(
        &self,
        req: Request<pb::StopInstanceRequest>,
    ) -> Result<Reply<ops_pb::Operation>, Status> {
        let name = req.get_ref().name.clone();
        let actor = self
            .instance_call(&req, &format!("{INSTANCES}StopInstance"), &name)
            .await?;
        let rid = request_id(&req.get_ref().request_id);
        let timeout = stop_timeout_ms(req.get_ref().timeout.as_ref())?;
        Ok(Reply::new(
            self.action(
                &actor,
                name,
                (InstanceState::Stopping, "stop"),
                timeout,
                rid,
            )
            .await?,
        ))
    }

    async fn reboot_instance(
        &self,
        req: Request<pb::RebootInstanceRequest>,
    ) -> Result<Reply<ops_pb::Operation>, Status> {
        let name = req.get_ref().name.clone();
        let actor = self
            .instance_call(&req, &format!("{INSTANCES}RebootInstance"), &name)
            .await?;
        let rid = request_id(&req.get_ref().request_id);
        Ok(Reply::new(
            self.action(&actor, name, (InstanceState::Starting, "reboot"), None, rid)
                .await?,
        ))
    }

    async fn resize_instance(
        &self,
        req: Request<pb::ResizeInstanceRequest>,
    ) -> Result<Reply<pb::Instance>, Status> {
        let name = req.get_ref().name.clone();
        let actor = self
            .instance_call(&req, &format!("{INSTANCES}ResizeInstance"), &name)
            .await?;
        let r = req.into_inner();
        let (instance, flavor) = (name.clone(), r.flavor.clone());
        let node_limit = self
            .read_try(move |s| resize_room(s, &instance, &flavor))
            .await?;
        let command = Command::ResizeInstance {
            instance: name,
            flavor: r.flavor,
            node_limit,
        };
        match self
            .propose_as(&actor, request_id(&r.request_id), command)
            .await?
        {
            Response::Instance { instance, .. } => Ok(Reply::new(convert::instance(&instance))),
            other => Err(unexpected(other).into()),
        }
    }

    async fn delete_instance(
        &self,
        req: Request<pb::DeleteInstanceRequest>,
    ) -> Result<Reply<ops_pb::Operation>, Status> {
        let name = req.get_ref().name.clone();
        let actor = self
            .instance_call(&req, &format!("{INSTANCES}DeleteInstance"), &name)
            .await?;
        let rid = request_id(&req.get_ref().request_id);
        let operation_id = derived_id("op", rid.as_deref(), &format!("delete/{name}"))?;
        let command = Command::DeleteInstance {
            instance: name,
            operation_id,
        };
        Ok(Reply::new(operation_of(
            self.propose_as(&actor, rid, command).await?,
        )?))
    }

    type ConsoleStream = console::ConsoleStream;

    async fn console(
        &self,
        req: Request<Streaming<pb::ConsoleRequest>>,
    ) -> Result<Reply<Self::ConsoleStream>, Status> {
        let peer = req.remote_addr();
        let (metadata, _, mut inbound) = req.into_parts();
        // Who calls, before anything about the instance is said.
        self.authenticate(&metadata).await?;
        let first = inbound.message().await?.ok_or_else(|| {
            ApiError::InvalidArgument("the first console message must name the instance".into())
        })?;
        let name = first.name.clone();
        let call = super::Call {
            metadata: &metadata,
            peer,
        };
        self.instance_call(call, &format!("{INSTANCES}Console"), &name)
            .await?;
        let target = {
            let name = name.clone();
            self.read_try(move |s| console::target(s, &name, true))
                .await?
        };
        let api = self.clone();
        let relocate: console::Relocate = std::sync::Arc::new(move |from: String| {
            let (api, name) = (api.clone(), name.clone());
            Box::pin(async move {
                api.read_try(move |s| console::target(s, &name, true))
                    .await
                    .ok()
                    .filter(|t| t.node != from)
            })
        });
        let tls = self.inner.tls.clone();
        Ok(Reply::new(
            console::relay(tls, target, first, inbound, relocate).await?,
        ))
    }

    async fn get_console_log(
        &self,
        req: Request<pb::GetConsoleLogRequest>,
    ) -> Result<Reply<pb::ConsoleLog>, Status> {
        let name = req.get_ref().name.clone();
        self.instance_call(&req, &format!("{INSTANCES}GetConsoleLog"), &name)
            .await?;
        let target = self
            .read_try(move |s| console::target(s, &name, false))
            .await?;
        let tls = self.inner.tls.as_ref();
        Ok(Reply::new(
            console::log(tls, target, req.into_inner()).await?,
        ))
    }
}

const FLAVORS: &str = "/nephele.compute.v1.Flavors/";

#[tonic::async_trait]
impl<S: StateStore> Flavors for Api<S> {
    async fn create_flavor(
        &self,
        req: Request<pb::CreateFlavorRequest>,
    ) -> Result<Reply<pb::Flavor>, Status> {
        let caller = self
            .authorize(&req, &format!("{FLAVORS}CreateFlavor"), Target::Cluster)
            .await?;
        let r = req.into_inner();
        let command = Command::CreateFlavor {
            flavor_id: r.flavor_id,
            resources: convert::resources_in(r.flavor.as_ref().and_then(|f| f.resources.as_ref())),
        };
        match self
            .propose_as(&caller, request_id(&r.request_id), command)
            .await?
        {
            Response::Flavor(f) => Ok(Reply::new(convert::flavor(&f))),
            other => Err(unexpected(other).into()),
        }
    }

    async fn get_flavor(
        &self,
        req: Request<pb::GetFlavorRequest>,
    ) -> Result<Reply<pb::Flavor>, Status> {
        self.authorize(&req, &format!("{FLAVORS}GetFlavor"), Target::Cluster)
            .await?;
        let name = req.into_inner().name;
        let f = self.get_one(name, |s| &s.flavors, convert::flavor).await?;
        Ok(Reply::new(f))
    }

    async fn list_flavors(
        &self,
        req: Request<pb::ListFlavorsRequest>,
    ) -> Result<Reply<pb::ListFlavorsResponse>, Status> {
        self.authorize(&req, &format!("{FLAVORS}ListFlavors"), Target::Cluster)
            .await?;
        let page = Page::parse(req.get_ref().page_size, &req.get_ref().page_token)?;
        let (flavors, next_page_token) = self
            .read(move |s| page.take(&s.flavors, "flavors/", |f| Some(convert::flavor(f))))
            .await?;
        Ok(Reply::new(pb::ListFlavorsResponse {
            flavors,
            next_page_token,
        }))
    }

    async fn delete_flavor(
        &self,
        req: Request<pb::DeleteFlavorRequest>,
    ) -> Result<Reply<pb::DeleteFlavorResponse>, Status> {
        let caller = self
            .authorize(&req, &format!("{FLAVORS}DeleteFlavor"), Target::Cluster)
            .await?;
        let flavor = req.into_inner().name;
        self.propose_as(&caller, None, Command::DeleteFlavor { flavor })
            .await?;
        Ok(Reply::new(pb::DeleteFlavorResponse {}))
    }
}

const IMAGES: &str = "/nephele.compute.v1.Images/";

#[tonic::async_trait]
impl<S: StateStore> Images for Api<S> {
    async fn create_image(
        &self,
        req: Request<pb::CreateImageRequest>,
    ) -> Result<Reply<pb::Image>, Status> {
        let caller = self
            .authorize(&req, &format!("{IMAGES}CreateImage"), Target::Cluster)
            .await?;
        let r = req.into_inner();
        let i = r.image.unwrap_or_default();
        check_image_format(&i.format)?;
        let command = Command::CreateImage {
            image_id: r.image_id,
            format: i.format,
            size_bytes: i.size_bytes,
            checksum: i.checksum,
            state: ImageState::Active,
        };
        match self
            .propose_as(&caller, request_id(&r.request_id), command)
            .await?
        {
            Response::Image(i) => Ok(Reply::new(convert::image(&i))),
            other => Err(unexpected(other).into()),
        }
    }

    async fn upload_image(
        &self,
        req: Request<Streaming<pb::UploadImageRequest>>,
    ) -> Result<Reply<pb::Image>, Status> {
        let caller = self
            .authorize(&req, &format!("{IMAGES}UploadImage"), Target::Cluster)
            .await?;
        let Some(content) = self.inner.images.clone() else {
            return Err(ApiError::FailedPrecondition(
                "this controller keeps no image content (it runs without a data directory); upload through another controller".into(),
            )
            .into());
        };
        let mut stream = req.into_inner();
        let first = crate::images::first_message(&mut stream).await?;
        let create = first.create.ok_or_else(|| {
            ApiError::InvalidArgument(
                "the first message of an upload names the image (`create`)".into(),
            )
        })?;
        let format = create.image.unwrap_or_default().format;
        check_image_format(&format)?;
        names::validate_id(&create.image_id).map_err(ApiError::from)?;
        nephele_proto::image::check_files(&format, &first.files)
            .map_err(ApiError::InvalidArgument)?;
        let name = format!("images/{}", create.image_id);
        let checksum = nephele_proto::image::manifest_checksum(&first.files);
        // A taken name is refused before a byte is stored, unless this is
        // the retry of an upload that went through (the same request id):
        // the proposal then answers as the first time.
        let exists = self
            .read({
                let name = name.clone();
                move |s| s.images.contains_key(&name)
            })
            .await?;
        if !exists {
            content
                .receive(
                    &create.image_id,
                    &checksum,
                    &first.files,
                    first.data,
                    &mut stream,
                )
                .await?;
        }
        let command = Command::CreateUploadedImage {
            image_id: create.image_id,
            format,
            checksum,
            files: convert::image_files(&first.files),
        };
        match self
            .propose_as(&caller, request_id(&create.request_id), command)
            .await?
        {
            Response::Image(i) => Ok(Reply::new(convert::image(&i))),
            other => Err(unexpected(other).into()),
        }
    }

    async fn get_image(
        &self,
        req: Request<pb::GetImageRequest>,
    ) -> Result<Reply<pb::Image>, Status> {
        self.authorize(&req, &format!("{IMAGES}GetImage"), Target::Cluster)
            .await?;
        let name = req.into_inner().name;
        let i = self.get_one(name, |s| &s.images, convert::image).await?;
        Ok(Reply::new(i))
    }

    async fn list_images(
        &self,
        req: Request<pb::ListImagesRequest>,
    ) -> Result<Reply<pb::ListImagesResponse>, Status> {
        self.authorize(&req, &format!("{IMAGES}ListImages"), Target::Cluster)
            .await?;
        let page = Page::parse(req.get_ref().page_size, &req.get_ref().page_token)?;
        let (images, next_page_token) = self
            .read(move |s| page.take(&s.images, "images/", |i| Some(convert::image(i))))
            .await?;
        Ok(Reply::new(pb::ListImagesResponse {
            images,
            next_page_token,
        }))
    }

    async fn delete_image(
        &self,
        req: Request<pb::DeleteImageRequest>,
    ) -> Result<Reply<pb::DeleteImageResponse>, Status> {
        let caller = self
            .authorize(&req, &format!("{IMAGES}DeleteImage"), Target::Cluster)
            .await?;
        let image = req.into_inner().name;
        self.propose_as(&caller, None, Command::DeleteImage { image })
            .await?;
        Ok(Reply::new(pb::DeleteImageResponse {}))
    }
}

const GROUPS: &str = "/nephele.compute.v1.ServerGroups/";

#[tonic::async_trait]
impl<S: StateStore> ServerGroups for Api<S> {
    async fn create_server_group(
        &self,
        req: Request<pb::CreateServerGroupRequest>,
    ) -> Result<Reply<pb::ServerGroup>, Status> {
        let parent = req.get_ref().parent.clone();
        names::parse(&parent, names::PROJECT).map_err(ApiError::from)?;
        let caller = self
            .authorize(
                &req,
                &format!("{GROUPS}CreateServerGroup"),
                Target::Project(&parent),
            )
            .await?;
        let r = req.into_inner();
        let g = r.server_group.unwrap_or_default();
        let policy = convert::policy_in(g.policy)?;
        let command = Command::CreateServerGroup {
            project: parent,
            group_id: r.server_group_id,
            policy,
            max_per_node: (g.max_per_node > 0).then_some(g.max_per_node),
        };
        match self
            .propose_as(&caller, request_id(&r.request_id), command)
            .await?
        {
            Response::ServerGroup(g) => Ok(Reply::new(convert::server_group(&g))),
            other => Err(unexpected(other).into()),
        }
    }

    async fn get_server_group(
        &self,
        req: Request<pb::GetServerGroupRequest>,
    ) -> Result<Reply<pb::ServerGroup>, Status> {
        let name = req.get_ref().name.clone();
        names::parse(&name, names::SERVER_GROUP).map_err(ApiError::from)?;
        self.authorize(
            &req,
            &format!("{GROUPS}GetServerGroup"),
            project_target(&name),
        )
        .await?;
        let g = self
            .get_one(name, |s| &s.server_groups, convert::server_group)
            .await?;
        Ok(Reply::new(g))
    }

    async fn list_server_groups(
        &self,
        req: Request<pb::ListServerGroupsRequest>,
    ) -> Result<Reply<pb::ListServerGroupsResponse>, Status> {
        let parent = req.get_ref().parent.clone();
        names::parse(&parent, names::PROJECT).map_err(ApiError::from)?;
        self.authorize(
            &req,
            &format!("{GROUPS}ListServerGroups"),
            Target::Project(&parent),
        )
        .await?;
        let page = Page::parse(req.get_ref().page_size, &req.get_ref().page_token)?;
        let prefix = format!("{parent}/serverGroups/");
        let (server_groups, next_page_token) = self
            .read(move |s| {
                page.take(&s.server_groups, &prefix, |g| {
                    Some(convert::server_group(g))
                })
            })
            .await?;
        Ok(Reply::new(pb::ListServerGroupsResponse {
            server_groups,
            next_page_token,
        }))
    }

    async fn delete_server_group(
        &self,
        req: Request<pb::DeleteServerGroupRequest>,
    ) -> Result<Reply<pb::DeleteServerGroupResponse>, Status> {
        let name = req.get_ref().name.clone();
        names::parse(&name, names::SERVER_GROUP).map_err(ApiError::from)?;
        let caller = self
            .authorize(
                &req,
                &format!("{GROUPS}DeleteServerGroup"),
                project_target(&name),
            )
            .await?;
        self.propose_as(&caller, None, Command::DeleteServerGroup { group: name })
            .await?;
        Ok(Reply::new(pb::DeleteServerGroupResponse {}))
    }
}
