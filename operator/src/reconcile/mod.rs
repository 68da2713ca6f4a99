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
//!    master with every sentinel monitoring it.
//! 6. **status** (pure, then client): [`status::compute`] from what apply
//!    got back and topology observed, [`status::patch`], and Events for the
//!    transitions.
//!
//! [`error_policy`] tells a user's mistake (an invalid spec, or the API
//! server refused what the spec asked for: wait for a change) from a
//! transient failure (requeue with exponential backoff).

pub mod apply;
pub mod dereference;
pub mod members;
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
    /// immutable field such as the Redis storage size). Retrying the same
    /// spec cannot help.
    pub fn is_user_error(&self) -> bool {
        let kube_error = match self {
            Error::InvalidSpec(_) => return true,
            Error::Apply(e) => e.kube_error(),
            Error::Status(status::StatusError::Patch { source, .. }) => source,
            Error::Dereference(_) | Error::RedisGroup(_) | Error::Roll(_) => return false,
        };
        matches!(kube_error, kube::Error::Api(s) if s.is_invalid() || s.code == 400)
    }
}

/// Shared by every reconciliation.
pub struct Context {
    pub client: Client,
    /// The one event recorder of the process.
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// Consecutive failures per `namespace/name`, for backoff.
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    pub fn new(client: Client, reporter: Reporter, metrics: Arc<Metrics>) -> Self {
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            failures: Mutex::default(),
        }
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

    async fn publish(&self, mc: &MessagingCluster, type_: EventType, reason: &str, note: String) {
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
    let c = match cluster::validate(mc) {
        Ok(c) => c,
        Err(invalid) => {
            refuse(mc, ctx, &invalid).await?;
            return Err(invalid.into());
        }
    };
    // 2. dereference
    let refs = dereference::dereference(&ctx.client, &c).await?;
    // 3. build
    let resources = build::build(&c);
    let new_secret = build::new_secret(&c, refs.new_password.as_deref());
    // 4. apply
    let applied = apply::apply_all(&ctx.client, &c, &resources, new_secret.as_ref()).await?;
    // 5. topology of a managed Redis group
    let topology = redis_group::step(&c, &refs).await?;
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
    if let Some(pod) = &rolled {
        roll::replace(&ctx.client, &c.names.namespace, pod).await?;
        let note = format!("replaced Redis pod {pod} to run the current template");
        info!(%note, "redis group: roll");
        ctx.publish(mc, EventType::Normal, "RedisPodRolled", note)
            .await;
    }
    let group_settled = rolled.is_none() && topology.as_ref().is_none_or(|r| r.converged());
    let observed_master = topology.and_then(|report| report.master.map(|m| m.to_string()));
    // 6. status
    let new_status = status::compute(mc, &c, &applied, observed_master, Timestamp::now());
    status::patch(
        &ctx.client,
        &c.names.namespace,
        &c.names.instance,
        &new_status,
    )
    .await?;
    publish_transitions(mc, ctx, &c, &new_status, applied.generated_secret).await;
    let settled = new_status
        .conditions
        .iter()
        .any(|c| c.type_ == chorus_crds::condition::READY && c.status == "True");
    Ok(Action::requeue(requeue_after(settled, group_settled)))
}

/// An invalid spec: `Degraded` says why, everything observed before stays,
/// nothing is applied.
async fn refuse(mc: &MessagingCluster, ctx: &Context, invalid: &InvalidSpec) -> Result<(), Error> {
    let message = &invalid.message;
    warn!(%message, "invalid spec; nothing applied");
    let new_status = status::invalid(mc, message.clone(), Timestamp::now());
    let namespace = mc.namespace().unwrap_or_default();
    status::patch(&ctx.client, &namespace, &mc.name_any(), &new_status).await?;
    for n in status::transitions(mc, &new_status, false) {
        ctx.publish(mc, n.type_, n.reason, n.note).await;
    }
    Ok(())
}

async fn publish_transitions(
    mc: &MessagingCluster,
    ctx: &Context,
    c: &ValidCluster,
    new_status: &chorus_crds::MessagingClusterStatus,
    generated_secret: bool,
) {
    for n in status::transitions(mc, new_status, generated_secret) {
        info!(cluster = %c.names.instance, reason = n.reason, note = %n.note, "event");
        ctx.publish(mc, n.type_, n.reason, n.note).await;
    }
}

/// When to look again: soon while the Redis group is moving, later while
/// pods come up, rarely once everything is Ready.
pub fn requeue_after(ready: bool, group_settled: bool) -> Duration {
    match (ready, group_settled) {
        (_, false) => TOPOLOGY_RESYNC,
        (true, true) => RESYNC,
        (false, true) => PROGRESS_RESYNC,
    }
}

/// What to do after a failed reconciliation.
pub fn error_policy(mc: Arc<MessagingCluster>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.failed(error.metric_label());
    if let Error::InvalidSpec(_) = error {
        // `Degraded` and an `InvalidSpec` Event already say why.
        return Action::await_change();
    }
    if error.is_user_error() {
        warn!(cluster = %mc.name_any(), %error, "the API server refused the spec; waiting for a change");
        let note = format!("{error}; change the MessagingCluster to fix it");
        tokio::spawn(async move {
            ctx.publish(&mc, EventType::Warning, "ApplyRefused", note)
                .await
        });
        Action::await_change()
    } else {
        let delay = ctx.next_backoff(&mc);
        warn!(cluster = %mc.name_any(), %error, retry_in = ?delay, "reconcile failed; will retry");
        Action::requeue(delay)
    }
}
