//! Reconciliation of one MessagingCluster, as a named pipeline of typed
//! stages:
//!
//! 1. **validate** (pure): [`crate::cluster::validate`] turns the object
//!    into a [`ValidCluster`]; an invalid spec sets `Degraded`, publishes a
//!    Warning event, touches nothing else and ends as
//!    [`Error::InvalidSpec`].
//! 2. **dereference** (client, reads only): [`dereference::dereference`],
//!    the Redis password and the group's pods.
//! 3. **build** (pure): [`crate::build::build`], the desired objects.
//! 4. **apply** (client): [`apply::apply_all`], server-side apply with
//!    field manager `chorus-operator`, deletion of what is no longer asked
//!    for, one-time creation of the generated password Secret.
//! 5. **topology** (Redis, not Kubernetes): [`redis_group::step`], one
//!    master with every sentinel monitoring it; in `redis.mode: cluster`,
//!    [`redis_cluster::step`] creates the Redis Cluster, adds shards and
//!    moves slots to them (a bounded number per reconcile).
//! 5. **fleet** (client, pods' HTTP): [`crate::fleet::step`] reads every
//!    server pod's `/metrics` and acts on them: restarts a pod whose
//!    backplane stays down, autoscales on connections, rebalances.
//! 6. **status** (pure, then client): [`status::compute`] (with
//!    `delivery: kafka`, [`status::compute_kafka`]) from what apply
//!    got back and topology and the fleet observed, [`status::patch`], and Events for the
//!    transitions.
//!
//! The status is written even when a step fails: `Degraded` names the
//! step ([`status::FailedStep`]) and the error, and what was observed
//! stays. An object the API server refuses, or a Redis group the topology
//! step cannot reach, does not stop the later steps; a failure before
//! apply (or of apply itself) keeps the previous observations.
//!
//! [`error_policy`] tells a user's mistake (an invalid spec: wait for a
//! change; an object the API server refused: look again at the resync
//! interval, so the Redis group keeps being healed) from a transient
//! failure (requeue with exponential backoff).

pub mod apply;
pub mod dereference;
pub mod members;
pub mod redis_cluster;
pub mod redis_group;
pub mod roll;
pub mod status;

#[cfg(test)]
mod tests;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use chorus_crds::MessagingCluster;
use k8s_openapi::jiff::Timestamp;
use kube::{
    Client, Resource, ResourceExt,
    runtime::{
        controller::Action,
        events::{Event, EventType, Recorder, Reporter},
    },
};
use tracing::{info, instrument, warn};

use crate::build;
use crate::cluster::{self, InvalidSpec, ValidCluster};
use crate::metrics::Metrics;

/// Requeue interval of a healthy cluster: picks up drift, and re-runs the
/// Redis topology step so a failover shows in the status and a restarted
/// Redis pod is re-attached as a replica within a minute.
pub const RESYNC: Duration = Duration::from_secs(60);
/// Requeue interval of a healthy cluster with server pods: their figures
/// in `status.fleet`, the connection autoscaler and the repair of a pod
/// whose backplane stays down follow within this.
pub const FLEET_RESYNC: Duration = Duration::from_secs(15);
/// Requeue interval while pods are still coming up.
pub const PROGRESS_RESYNC: Duration = Duration::from_secs(15);
/// Requeue interval while the Redis group is not settled (a failover in
/// progress, a member unreachable, an action just applied): the status
/// follows Sentinel within seconds instead of at the next resync.
pub const TOPOLOGY_RESYNC: Duration = Duration::from_secs(2);
/// First retry after a transient failure; doubles up to [`MAX_BACKOFF`].
pub const MIN_BACKOFF: Duration = Duration::from_secs(2);
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// A reconciliation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid spec: {0}")]
    InvalidSpec(#[from] InvalidSpec),
    #[error("dereference: {0}")]
    Dereference(#[from] dereference::DereferenceError),
    #[error("apply: {0}")]
    Apply(#[from] apply::ApplyError),
    #[error("redis group: {0}")]
    RedisGroup(#[from] crate::topology::TopologyError),
    #[error("roll: {0}")]
    Roll(#[from] roll::RollError),
    #[error("status: {0}")]
    Status(#[from] status::StatusError),
}

impl Error {
    /// Label of the `reconcile_errors` metric ([`crate::metrics::ERROR_STEPS`]).
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::InvalidSpec(_) => "invalid_spec",
            Error::Dereference(_) => "dereference",
            Error::Apply(_) => "apply",
            Error::RedisGroup(_) => "redis_group",
            Error::Roll(_) => "roll",
            Error::Status(_) => "status",
        }
    }

    /// The user must change the spec: it is invalid, or the API server
    /// refused an object built from it as invalid (e.g. a change to an
    /// immutable field). Retrying the same spec cannot help.
    pub fn is_user_error(&self) -> bool {
        match self {
            Error::InvalidSpec(_) => true,
            Error::Apply(e) => e.is_refusal(),
            Error::Status(status::StatusError::Patch { source, .. }) => {
                matches!(source, kube::Error::Api(s) if s.is_invalid() || s.code == 400)
            }
            Error::Dereference(_) | Error::RedisGroup(_) | Error::Roll(_) => false,
        }
    }

    /// The step `Degraded` names as its reason.
    pub fn failed_step(&self) -> status::FailedStep {
        use status::FailedStep;
        match self {
            Error::InvalidSpec(_) => FailedStep::InvalidSpec,
            Error::Dereference(_) => FailedStep::Dereference,
            Error::Apply(e) if e.is_refusal() => FailedStep::ApplyRefused,
            Error::Apply(_) => FailedStep::Apply,
            Error::RedisGroup(_) => FailedStep::RedisGroup,
            Error::Roll(_) => FailedStep::Roll,
            Error::Status(_) => FailedStep::Status,
        }
    }

    /// `Degraded`'s message: the error without the step (the reason names it).
    pub fn detail(&self) -> String {
        match self {
            Error::InvalidSpec(e) => e.to_string(),
            Error::Dereference(e) => e.to_string(),
            Error::Apply(e) => e.to_string(),
            Error::RedisGroup(e) => e.to_string(),
            Error::Roll(e) => e.to_string(),
            Error::Status(e) => e.to_string(),
        }
    }
}

/// Shared by every reconciliation.
pub struct Context {
    pub client: Client,
    /// The one event recorder of the process.
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// Namespace of the operator's own pods (see [`ValidCluster::operator_namespace`]).
    pub operator_namespace: String,
    /// Consecutive failures per `namespace/name`, for backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// Reads the server pods' metrics, asks them to shed connections.
    pub http: reqwest::Client,
    /// What the fleet step remembers per cluster.
    pub fleet: crate::fleet::Memories,
}

impl Context {
    /// The operator namespace defaults to the client's (in a pod: the
    /// ServiceAccount's namespace).
    pub fn new(client: Client, reporter: Reporter, metrics: Arc<Metrics>) -> Self {
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            operator_namespace: client.default_namespace().to_owned(),
            client,
            metrics,
            failures: Mutex::default(),
            http: reqwest::Client::new(),
            fleet: Mutex::default(),
        }
    }

    /// Where the operator's own pods run (`--operator-namespace`).
    pub fn with_operator_namespace(mut self, namespace: String) -> Self {
        self.operator_namespace = namespace;
        self
    }

    fn key(mc: &MessagingCluster) -> String {
        format!("{}/{}", mc.namespace().unwrap_or_default(), mc.name_any())
    }

    /// Records a failure and returns how long to wait before the next try.
    fn next_backoff(&self, mc: &MessagingCluster) -> Duration {
        // A poisoned lock only means another reconcile panicked mid-update
        // of a counter; the map is still usable.
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let n = failures.entry(Self::key(mc)).or_insert(0);
        *n = n.saturating_add(1);
        backoff(*n)
    }

    fn reset_backoff(&self, mc: &MessagingCluster) {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        failures.remove(&Self::key(mc));
    }

    pub async fn publish(
        &self,
        mc: &MessagingCluster,
        type_: EventType,
        reason: &str,
        note: String,
    ) {
        let event = Event {
            type_,
            reason: reason.to_owned(),
            note: Some(note),
            action: "Reconcile".to_owned(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &mc.object_ref(&())).await {
            warn!(error = %e, reason, "could not publish event");
        }
    }
}

/// Delay after the `n`th consecutive failure (n ≥ 1).
pub fn backoff(n: u32) -> Duration {
    let factor = 2u32.saturating_pow(n.saturating_sub(1).min(16));
    MIN_BACKOFF.saturating_mul(factor).min(MAX_BACKOFF)
}

/// Brings the cluster's objects and status in line with its spec.
#[instrument(skip_all, fields(cluster = %mc.name_any(), namespace = mc.namespace().unwrap_or_default()))]
pub async fn reconcile(mc: Arc<MessagingCluster>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = run_pipeline(&mc, &ctx).await;
    let label = match &result {
        Ok(_) => "ok",
        Err(Error::InvalidSpec(_)) => "invalid_spec",
        Err(_) => "error",
    };
    ctx.metrics.reconciled(label, started.elapsed());
    if result.is_ok() {
        ctx.reset_backoff(&mc);
    }
    result
}

async fn run_pipeline(mc: &MessagingCluster, ctx: &Context) -> Result<Action, Error> {
    // 1. validate
    let c = match cluster::validate(mc, &ctx.operator_namespace) {
        Ok(c) => c,
        Err(invalid) => {
            warn!(message = %invalid.message, "invalid spec; nothing applied");
            let error = Error::from(invalid);
            // The reconcile then waits for a change: `Degraded` must be
            // written first, or retried.
            write_failure(mc, ctx, &error).await?;
            return Err(error);
        }
    };
    match converge(mc, ctx, &c).await {
        Ok(action) => Ok(action),
        Err(Failed { error, reported }) => {
            if !reported && let Err(e) = write_failure(mc, ctx, &error).await {
                warn!(error = %e, "could not write the Degraded status either");
            }
            Err(error)
        }
    }
}

/// A step after validation failed.
struct Failed {
    error: Error,
    /// The status written at the end of the pipeline already names it.
    reported: bool,
}

impl Failed {
    fn unreported(error: impl Into<Error>) -> Self {
        Self {
            error: error.into(),
            reported: false,
        }
    }
}

/// Steps 2 to 6 for a valid cluster. A refused object or an unreachable
/// Redis group does not stop the later steps: the status is computed from
/// what they observed, with `Degraded` naming the failure, and then the
/// reconcile fails with it.
async fn converge(
    mc: &MessagingCluster,
    ctx: &Context,
    c: &ValidCluster,
) -> Result<Action, Failed> {
    // 2. dereference
    let refs = dereference::dereference(&ctx.client, c)
        .await
        .map_err(Failed::unreported)?;
    // 3. build
    let resources = build::build(c);
    let new_secret = build::new_secret(c, refs.new_password.as_deref());
    // 4. apply
    let (applied, skipped) = apply::apply_all(&ctx.client, c, &resources, new_secret.as_ref())
        .await
        .map_err(Failed::unreported)?;
    if !skipped.not_owned.is_empty() {
        // One Event: the recorder folds Events of one reason into a series.
        let note = format!(
            "left {} alone: the spec no longer asks for objects of these names, but this MessagingCluster does not own them",
            skipped.not_owned.join(", ")
        );
        ctx.publish(mc, EventType::Warning, "NotOwned", note).await;
    }
    // 5. topology of a managed Redis group
    let (topology, topology_error) = match redis_group::step(c, &refs).await {
        Ok(topology) => (topology, None),
        Err(e) => (None, Some(Error::from(e))),
    };
    ctx.metrics.redis_group(c, topology.as_ref());
    if let Some(report) = &topology {
        let repaired: Vec<String> = report
            .actions
            .iter()
            .filter(|a| a.result.is_ok())
            .map(|a| a.action.to_string())
            .collect();
        if !repaired.is_empty() {
            let note = format!("Redis group repaired: {}", repaired.join("; "));
            ctx.publish(mc, EventType::Normal, "RedisRepaired", note)
                .await;
        }
    }
    // 5a. a managed Redis Cluster: create, grow, move slots, repair
    let cluster = redis_cluster::step(c, &refs).await;
    for (type_, reason, note) in cluster.iter().flat_map(redis_cluster::notices) {
        ctx.publish(mc, type_, reason, note).await;
    }
    // 5b. replace one outdated Redis pod, if the group is healthy
    let update_revision = applied
        .redis
        .as_ref()
        .and_then(|r| r.statefulset.status.as_ref())
        .and_then(|s| s.update_revision.clone());
    let rolled = match &refs.members {
        Some(members) => roll::next(members, update_revision.as_deref(), topology.as_ref()),
        None => None,
    };
    let mut roll_error = None;
    if let Some(pod) = &rolled {
        match roll::replace(&ctx.client, &c.names.namespace, pod).await {
            Ok(()) => {
                let note = format!("replaced Redis pod {pod} to run the current template");
                info!(%note, "redis group: roll");
                ctx.publish(mc, EventType::Normal, "RedisPodRolled", note)
                    .await;
            }
            Err(e) => roll_error = Some(Error::from(e)),
        }
    }
    let group_settled = topology_error.is_none()
        && rolled.is_none()
        && topology.as_ref().is_none_or(|r| r.converged())
        && cluster.as_ref().is_none_or(|r| r.converged());
    let seen = topology.as_ref().map(status::GroupSeen::from_report);
    // 5c. the fleet: read the server pods; restart one whose backplane
    // stays down, autoscale on connections, rebalance after a scale-out
    let master_seen = seen.as_ref().is_some_and(|g| g.master.is_some())
        || cluster.as_ref().is_some_and(|r| r.whole());
    let fleet = crate::fleet::step(ctx, mc, c, refs.api_key.as_deref(), master_seen).await;
    // 6. status, from what apply, topology and the fleet observed
    let now = Timestamp::now();
    let mut new_status = match c.kafka() {
        Some(_) => {
            let pods = fleet.as_ref().map(|f| &f.status);
            status::compute_kafka(mc, c, &applied, pods, now)
        }
        None => {
            let redis_seen = if c.managed_cluster() {
                status::RedisSeen::Cluster(cluster.as_ref())
            } else {
                status::RedisSeen::Group(seen.as_ref())
            };
            status::compute_with(mc, c, &applied, redis_seen, now)
        }
    };
    status::with_fleet(&mut new_status, mc, fleet, c.generation, now);
    // Refusals first: only the user can clear them; the rest is transient.
    let mut failures: Vec<Error> = skipped.refused.into_iter().map(Error::from).collect();
    failures.extend(topology_error);
    failures.extend(roll_error);
    if let Some(first) = failures.first() {
        let detail = failures
            .iter()
            .map(Error::detail)
            .collect::<Vec<_>>()
            .join("; ");
        let old = mc.status.as_ref();
        let step = first.failed_step();
        status::degrade(&mut new_status, old, step, detail, c.generation, now);
    }
    status::patch(
        &ctx.client,
        &c.names.namespace,
        &c.names.instance,
        &new_status,
    )
    .await
    .map_err(Failed::unreported)?;
    publish_transitions(mc, ctx, &new_status, applied.generated_secret).await;
    if let Some(error) = failures.into_iter().next() {
        return Err(Failed {
            error,
            reported: true,
        });
    }
    let settled = new_status
        .conditions
        .iter()
        .any(|c| c.type_ == chorus_crds::condition::READY && c.status == "True");
    let watching = new_status
        .fleet
        .as_ref()
        .is_some_and(|f| !f.pods.is_empty());
    Ok(Action::requeue(requeue_after(
        settled,
        group_settled,
        watching,
    )))
}

/// The status of a reconcile that failed before it observed anything new:
/// everything observed before stays, `Degraded` names the failed step.
async fn write_failure(mc: &MessagingCluster, ctx: &Context, error: &Error) -> Result<(), Error> {
    let new_status = status::failed(mc, error.failed_step(), error.detail(), Timestamp::now());
    let namespace = mc.namespace().unwrap_or_default();
    status::patch(&ctx.client, &namespace, &mc.name_any(), &new_status).await?;
    publish_transitions(mc, ctx, &new_status, false).await;
    Ok(())
}

async fn publish_transitions(
    mc: &MessagingCluster,
    ctx: &Context,
    new_status: &chorus_crds::MessagingClusterStatus,
    generated_secret: bool,
) {
    for n in status::transitions(mc, new_status, generated_secret) {
        info!(reason = n.reason, note = %n.note, "event");
        ctx.publish(mc, n.type_, n.reason, n.note).await;
    }
}

/// When to look again: soon while the Redis group is moving, later while
/// pods come up, rarely once everything is Ready.
pub fn requeue_after(ready: bool, group_settled: bool, fleet_running: bool) -> Duration {
    match (ready, group_settled) {
        (_, false) => TOPOLOGY_RESYNC,
        (true, true) if fleet_running => FLEET_RESYNC,
        (true, true) => RESYNC,
        (false, true) => PROGRESS_RESYNC,
    }
}

/// What to do after a failed reconciliation. The reconcile already wrote
/// `Degraded` and its Event; this only decides when to look again.
pub fn error_policy(mc: Arc<MessagingCluster>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.failed(error.metric_label());
    if let Error::InvalidSpec(_) = error {
        // Nothing was applied; only a new spec can change that.
        return Action::await_change();
    }
    if error.is_user_error() {
        // The refused object waits for a change of the spec, but everything
        // else was applied: the Redis group is looked at as often as a
        // healthy cluster's, so it keeps being healed.
        warn!(cluster = %mc.name_any(), %error, "the API server refused part of the spec; the rest is applied");
        Action::requeue(RESYNC)
    } else {
        let delay = ctx.next_backoff(&mc);
        warn!(cluster = %mc.name_any(), %error, retry_in = ?delay, "reconcile failed; will retry");
        Action::requeue(delay)
    }
}
