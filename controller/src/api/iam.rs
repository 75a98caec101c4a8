//! `nephele.iam.v1.Iam`: projects, users, roles and tokens.

use nephele_proto::iam::v1 as pb;
use nephele_proto::iam::v1::iam_server::Iam;
use nephele_state::model::Role as StateRole;
use nephele_state::names;
use nephele_state::{Command, Response};
use tonic::{Request, Response as Reply, Status};

use super::authz::Target;
use super::errors::ApiError;
use super::{Api, Page, auth, convert, request_id};
use crate::store::StateStore;

const SVC: &str = "/nephele.iam.v1.Iam/";

fn unexpected(r: Response) -> ApiError {
    ApiError::Internal(format!("unexpected answer from the state machine: {r:?}"))
}

/// The user a token name belongs to (`users/u/tokens/t` -> `users/u`).
fn user_of_token(token: &str) -> Result<String, ApiError> {
    let ids = names::parse(token, names::TOKEN)?;
    Ok(format!("users/{}", ids[0]))
}

/// The quota limits an UpdateProject mask names (AIP-134): `quota` is
/// every limit, `quota.instances`, `quota.vcpus`, `quota.memory_mib` and
/// `quota.disk_gib` one each; the others stay as they are.
fn quota_update(paths: &[String], q: &pb::Quota) -> Result<nephele_state::QuotaUpdate, ApiError> {
    if paths.is_empty() {
        return Err(ApiError::InvalidArgument(
            "update_mask must name the fields to change: quota, or some of quota.instances, quota.vcpus, quota.memory_mib, quota.disk_gib".into(),
        ));
    }
    let mut u = nephele_state::QuotaUpdate::default();
    for path in paths {
        match path.as_str() {
            "quota" => u = convert::quota_in(q).into(),
            "quota.instances" => u.instances = Some(q.instances),
            "quota.vcpus" => u.vcpus = Some(q.vcpus),
            "quota.memory_mib" => u.memory_mib = Some(q.memory_mib),
            "quota.disk_gib" => u.disk_gib = Some(q.disk_gib),
            bad => {
                return Err(ApiError::InvalidArgument(format!(
                    "field {bad:?} cannot be changed; only quota and its limits (quota.instances, quota.vcpus, quota.memory_mib, quota.disk_gib) can"
                )));
            }
        }
    }
    Ok(u)
}

#[tonic::async_trait]
impl<S: StateStore> Iam for Api<S> {
    async fn get_caller(
        &self,
        req: Request<pb::GetCallerRequest>,
    ) -> Result<Reply<pb::User>, Status> {
        let caller = self
            .authorize(&req, &format!("{SVC}GetCaller"), Target::Cluster)
            .await?;
        let name = caller.user.clone();
        let user = self.get_one(name, |s| &s.users, convert::user).await?;
        Ok(Reply::new(user))
    }

    async fn create_project(
        &self,
        req: Request<pb::CreateProjectRequest>,
    ) -> Result<Reply<pb::Project>, Status> {
        let caller = self
            .authorize(&req, &format!("{SVC}CreateProject"), Target::Cluster)
            .await?;
        let r = req.into_inner();
        let p = r.project.unwrap_or_default();
        let command = Command::CreateProject {
            project_id: r.project_id,
            display_name: p.display_name,
            quota: p.quota.as_ref().map(convert::quota_in),
        };
        match self
            .propose_as(&caller, request_id(&r.request_id), command)
            .await?
        {
            Response::Project(p) => Ok(Reply::new(convert::project(&p))),
            other => Err(unexpected(other).into()),
        }
    }

    async fn get_project(
        &self,
        req: Request<pb::GetProjectRequest>,
    ) -> Result<Reply<pb::Project>, Status> {
        let name = req.get_ref().name.clone();
        names::parse(&name, names::PROJECT).map_err(ApiError::from)?;
        self.authorize(&req, &format!("{SVC}GetProject"), Target::Project(&name))
            .await?;
        let p = self
            .get_one(name, |s| &s.projects, convert::project)
            .await?;
        Ok(Reply::new(p))
    }

    async fn list_projects(
        &self,
        req: Request<pb::ListProjectsRequest>,
    ) -> Result<Reply<pb::ListProjectsResponse>, Status> {
        let caller = self
            .authorize(&req, &format!("{SVC}ListProjects"), Target::Cluster)
            .await?;
        let page = Page::parse(req.get_ref().page_size, &req.get_ref().page_token)?;
        let (projects, next_page_token) = self
            .read(move |s| {
                page.take(&s.projects, "projects/", |p| {
                    caller.can_read(&p.name).then(|| convert::project(p))
                })
            })
            .await?;
        Ok(Reply::new(pb::ListProjectsResponse {
            projects,
            next_page_token,
        }))
    }

    async fn update_project(
        &self,
        req: Request<pb::UpdateProjectRequest>,
    ) -> Result<Reply<pb::Project>, Status> {
        let caller = self
            .authorize(&req, &format!("{SVC}UpdateProject"), Target::Cluster)
            .await?;
        let r = req.into_inner();
        let project = r
            .project
            .ok_or_else(|| ApiError::InvalidArgument("project is required".into()))?;
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let quota = project
            .quota
            .as_ref()
            .ok_or_else(|| ApiError::InvalidArgument("project.quota is required".into()))?;
        let command = Command::SetProjectQuota {
            project: project.name,
            quota: quota_update(&paths, quota)?,
        };
        match self.propose_as(&caller, None, command).await? {
            Response::Project(p) => Ok(Reply::new(convert::project(&p))),
            other => Err(unexpected(other).into()),
        }
    }

    async fn delete_project(
        &self,
        req: Request<pb::DeleteProjectRequest>,
    ) -> Result<Reply<pb::DeleteProjectResponse>, Status> {
        let caller = self
            .authorize(&req, &format!("{SVC}DeleteProject"), Target::Cluster)
            .await?;
        let project = req.into_inner().name;
        self.propose_as(&caller, None, Command::DeleteProject { project })
            .await?;
        Ok(Reply::new(pb::DeleteProjectResponse {}))
    }

    async fn create_user(
        &self,
        req: Request<pb::CreateUserRequest>,
    ) -> Result<Reply<pb::User>, Status> {
        let caller = self
            .authorize(&req, &format!("{SVC}CreateUser"), Target::Cluster)
            .await?;
        let r = req.into_inner();
        let u = r.user.unwrap_or_default();
        let command = Command::CreateUser {
            user_id: r.user_id,
            display_name: u.display_name,
            operator: u.admin,
        };
        match self
            .propose_as(&caller, request_id(&r.request_id), command)
            .await?
        {
            Response::User(u) => Ok(Reply::new(convert::user(&u))),
            other => Err(unexpected(other).into()),
        }
    }

    async fn get_user(&self, req: Request<pb::GetUserRequest>) -> Result<Reply<pb::User>, Status> {
        let name = req.get_ref().name.clone();
        names::parse(&name, names::USER).map_err(ApiError::from)?;
        self.authorize(&req, &format!("{SVC}GetUser"), Target::User(&name))
            .await?;
        let u = self.get_one(name, |s| &s.users, convert::user).await?;
        Ok(Reply::new(u))
    }

    async fn list_users(
        &self,
        req: Request<pb::ListUsersRequest>,
    ) -> Result<Reply<pb::ListUsersResponse>, Status> {
        self.authorize(&req, &format!("{SVC}ListUsers"), Target::Cluster)
            .await?;
        let page = Page::parse(req.get_ref().page_size, &req.get_ref().page_token)?;
        let (users, next_page_token) = self
            .read(move |s| page.take(&s.users, "users/", |u| Some(convert::user(u))))
            .await?;
        Ok(Reply::new(pb::ListUsersResponse {
            users,
            next_page_token,
        }))
    }

    async fn delete_user(
        &self,
        req: Request<pb::DeleteUserRequest>,
    ) -> Result<Reply<pb::DeleteUserResponse>, Status> {
        let caller = self
            .authorize(&req, &format!("{SVC}DeleteUser"), Target::Cluster)
            .await?;
        let user = req.into_inner().name;
        self.propose_as(&caller, None, Command::DeleteUser { user })
            .await?;
        Ok(Reply::new(pb::DeleteUserResponse {}))
    }

    async fn set_role(&self, req: Request<pb::SetRoleRequest>) -> Result<Reply<pb::User>, Status> {
        let caller = self
            .authorize(&req, &format!("{SVC}SetRole"), Target::Cluster)
            .await?;
        let r = req.into_inner();
        let role = match pb::Role::try_from(r.role) {
            Ok(pb::Role::Unspecified) => None,
            Ok(pb::Role::Reader) => Some(StateRole::Viewer),
            Ok(pb::Role::Member) => Some(StateRole::Editor),
            Err(_) => {
                return Err(ApiError::InvalidArgument(format!("unknown role {}", r.role)).into());
            }
        };
        let command = Command::SetRole {
            user: r.user,
            project: r.project,
            role,
        };
        match self.propose_as(&caller, None, command).await? {
            Response::User(u) => Ok(Reply::new(convert::user(&u))),
            other => Err(unexpected(other).into()),
        }
    }

    async fn create_token(
        &self,
        req: Request<pb::CreateTokenRequest>,
    ) -> Result<Reply<pb::CreateTokenResponse>, Status> {
        let parent = req.get_ref().parent.clone();
        let ids = names::parse(&parent, names::USER).map_err(ApiError::from)?;
        let user_id = ids[0].to_owned();
        let caller = self
            .authorize(&req, &format!("{SVC}CreateToken"), Target::User(&parent))
            .await?;
        let r = req.into_inner();
        let secret = auth::new_secret().map_err(|e| ApiError::Internal(e.to_string()))?;
        let expire_time = r.token.and_then(|t| t.expire_time).map(|t| convert::ms(&t));
        let command = Command::CreateToken {
            user: parent,
            token_id: r.token_id.clone(),
            secret_hash: auth::hash_secret(&secret)
                .map_err(|e| ApiError::Internal(e.to_string()))?,
            expire_time,
        };
        match self.propose_as(&caller, None, command).await? {
            Response::Token(t) => Ok(Reply::new(pb::CreateTokenResponse {
                token: Some(convert::token(&t)),
                secret: auth::format_token(&user_id, &r.token_id, &secret),
            })),
            other => Err(unexpected(other).into()),
        }
    }

    async fn list_tokens(
        &self,
        req: Request<pb::ListTokensRequest>,
    ) -> Result<Reply<pb::ListTokensResponse>, Status> {
        let parent = req.get_ref().parent.clone();
        names::parse(&parent, names::USER).map_err(ApiError::from)?;
        self.authorize(&req, &format!("{SVC}ListTokens"), Target::User(&parent))
            .await?;
        let page = Page::parse(req.get_ref().page_size, &req.get_ref().page_token)?;
        let prefix = format!("{parent}/tokens/");
        let (tokens, next_page_token) = self
            .read(move |s| page.take(&s.tokens, &prefix, |t| Some(convert::token(t))))
            .await?;
        Ok(Reply::new(pb::ListTokensResponse {
            tokens,
            next_page_token,
        }))
    }

    async fn delete_token(
        &self,
        req: Request<pb::DeleteTokenRequest>,
    ) -> Result<Reply<pb::DeleteTokenResponse>, Status> {
        let token = req.get_ref().name.clone();
        let user = user_of_token(&token)?;
        let caller = self
            .authorize(&req, &format!("{SVC}DeleteToken"), Target::User(&user))
            .await?;
        self.propose_as(&caller, None, Command::DeleteToken { token })
            .await?;
        Ok(Reply::new(pb::DeleteTokenResponse {}))
    }
}
