//! Leader election with a `coordination.k8s.io/v1` Lease, so that two
//! operator replicas can run and only one reconciles. kube 5 has no helper
//! for this; the protocol is client-go's: the holder renews `renewTime`
//! every [`LeaseConfig::renew_every`]; a lease not renewed for
//! `leaseDurationSeconds` may be taken over. Every write carries the
//! `resourceVersion` read just before, so two candidates cannot both win.
//!
//! [`decide`] is the pure part; [`Elector`] does the I/O.

use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::{SignedDuration, Timestamp},
};
use kube::{Api, Client, api::PostParams};
use tracing::{info, warn};

/// Leader election could not talk to the API server, or lost the lease.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("reading Lease {name}: {source}")]
    Read {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("writing Lease {name}: {source}")]
    Write {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("lost Lease {name} to {holder}")]
    Lost { name: String, holder: String },
}

/// Where the lease lives and who we are.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub name: String,
    pub namespace: String,
    /// This replica, usually the pod name.
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_every: Duration,
}

/// What a candidate should do with the lease as it stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// No lease yet: create it.
    Create,
    /// We hold it: renew.
    Renew,
    /// Free, released or expired: take it over.
    TakeOver,
    /// Someone else holds a live lease.
    Wait { holder: String },
}

/// The pure rule of the election.
pub fn decide(lease: Option<&Lease>, identity: &str, now: Timestamp) -> Decision {
    let Some(lease) = lease else {
        return Decision::Create;
    };
    let spec = lease.spec.clone().unwrap_or_default();
    match spec.holder_identity.as_deref() {
        None | Some("") => Decision::TakeOver,
        Some(holder) if holder == identity => Decision::Renew,
        Some(holder) => {
            let duration =
                SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(15)));
            let last = spec.renew_time.or(spec.acquire_time).map(|t| t.0);
            match last {
                Some(last) if last + duration > now => Decision::Wait {
                    holder: holder.to_owned(),
                },
                _ => Decision::TakeOver,
            }
        }
    }
}

/// The lease as we write it when creating, taking over or renewing.
fn claimed(existing: Option<Lease>, cfg: &LeaseConfig, now: Timestamp, take_over: bool) -> Lease {
    let mut lease = existing.unwrap_or_else(|| Lease {
        metadata: ObjectMeta {
            name: Some(cfg.name.clone()),
            namespace: Some(cfg.namespace.clone()),
            ..Default::default()
        },
        spec: None,
    });
    let mut spec = lease.spec.take().unwrap_or_default();
    if take_over || spec.acquire_time.is_none() {
        spec.acquire_time = Some(MicroTime(now));
        if spec.holder_identity.is_some() {
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
    }
    spec.holder_identity = Some(cfg.identity.clone());
    spec.lease_duration_seconds =
        Some(i32::try_from(cfg.lease_duration.as_secs()).unwrap_or(i32::MAX));
    spec.renew_time = Some(MicroTime(now));
    lease.spec = Some(LeaseSpec { ..spec });
    lease
}

/// Runs the election for one replica.
pub struct Elector {
    api: Api<Lease>,
    cfg: LeaseConfig,
}

impl Elector {
    pub fn new(client: Client, cfg: LeaseConfig) -> Self {
        Self {
            api: Api::namespaced(client, &cfg.namespace),
            cfg,
        }
    }

    /// One round: returns whether we hold the lease afterwards.
    async fn try_acquire_or_renew(&self) -> Result<bool, LeaderError> {
        let name = &self.cfg.name;
        let current = self
            .api
            .get_opt(name)
            .await
            .map_err(|source| LeaderError::Read {
                name: name.clone(),
                source,
            })?;
        let now = Timestamp::now();
        let result = match decide(current.as_ref(), &self.cfg.identity, now) {
            Decision::Wait { .. } => return Ok(false),
            Decision::Create => {
                self.api
                    .create(&PostParams::default(), &claimed(None, &self.cfg, now, true))
                    .await
            }
            // Renewing keeps our acquire time; taking over starts a new term.
            decision @ (Decision::Renew | Decision::TakeOver) => {
                let take_over = matches!(decision, Decision::TakeOver);
                self.api
                    .replace(
                        name,
                        &PostParams::default(),
                        &claimed(current, &self.cfg, now, take_over),
                    )
                    .await
            }
        };
        match result {
            Ok(_) => Ok(true),
            // Another candidate wrote first (create raced, or our
            // resourceVersion is stale): not ours this round.
            Err(kube::Error::Api(s)) if s.is_conflict() || s.is_already_exists() => Ok(false),
            Err(source) => Err(LeaderError::Write {
                name: name.clone(),
                source,
            }),
        }
    }

    /// Waits until this replica holds the lease.
    pub async fn acquire(&self) -> Result<(), LeaderError> {
        let mut announced = false;
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    info!(lease = %self.cfg.name, identity = %self.cfg.identity, "became leader");
                    return Ok(());
                }
                Ok(false) if !announced => {
                    info!(lease = %self.cfg.name, "another replica leads; standing by");
                    announced = true;
                }
                Ok(false) => {}
                Err(e) => warn!(error = %e, "leader election round failed; retrying"),
            }
            tokio::time::sleep(self.cfg.renew_every).await;
        }
    }

    /// Renews the lease until it cannot be renewed for a whole lease
    /// duration (or another replica took it); returns why.
    pub async fn hold(&self) -> LeaderError {
        let mut last_renewal = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.cfg.renew_every).await;
            match self.try_acquire_or_renew().await {
                Ok(true) => last_renewal = tokio::time::Instant::now(),
                Ok(false) => {
                    let holder = self
                        .api
                        .get_opt(&self.cfg.name)
                        .await
                        .ok()
                        .flatten()
                        .and_then(|l| l.spec)
                        .and_then(|s| s.holder_identity)
                        .unwrap_or_default();
                    if holder != self.cfg.identity {
                        return LeaderError::Lost {
                            name: self.cfg.name.clone(),
                            holder,
                        };
                    }
                }
                Err(e) => {
                    warn!(error = %e, "renewing the lease failed");
                    // Stop leading before another replica may take over.
                    if last_renewal.elapsed() + self.cfg.renew_every >= self.cfg.lease_duration {
                        return e;
                    }
                }
            }
        }
    }

    /// Gives the lease up at shutdown so another replica takes over at once.
    pub async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.cfg.name).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(self.cfg.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        if let Err(e) = self
            .api
            .replace(&self.cfg.name, &PostParams::default(), &lease)
            .await
        {
            warn!(error = %e, "could not release the lease");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::mock_api::{Reply, expect, pair, serve};
    use http::Method;
    use serde_json::json;

    const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/chorus/leases";
    const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/chorus/leases/chorus-operator";

    fn config(identity: &str) -> LeaseConfig {
        LeaseConfig {
            name: "chorus-operator".into(),
            namespace: "chorus".into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_every: Duration::from_millis(20),
        }
    }

    fn lease_json(holder: &str, renewed: Timestamp) -> serde_json::Value {
        json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "chorus-operator", "namespace": "chorus", "resourceVersion": "7"},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15,
                     "renewTime": serde_json::to_value(MicroTime(renewed)).unwrap()}
        })
    }

    #[tokio::test]
    async fn first_candidate_creates_the_lease() {
        let (client, mut handle) = pair();
        let elector = Elector::new(client, config("a"));
        let acquiring = tokio::spawn(async move { elector.acquire().await });
        let seen = serve(
            &mut handle,
            vec![
                expect(Method::GET, LEASE, Reply::NotFound),
                expect(Method::POST, LEASES, Reply::Created),
            ],
        )
        .await;
        acquiring.await.unwrap().unwrap();
        let spec = &seen[1].body["spec"];
        assert_eq!(spec["holderIdentity"], "a");
        assert_eq!(spec["leaseDurationSeconds"], 15);
    }

    #[tokio::test]
    async fn standby_waits_for_a_live_lease_then_takes_over_an_expired_one() {
        let (client, mut handle) = pair();
        let elector = Elector::new(client, config("a"));
        let acquiring = tokio::spawn(async move { elector.acquire().await });
        let live = lease_json("b", Timestamp::now());
        let expired = lease_json("b", Timestamp::now() - SignedDuration::from_secs(60));
        let conflict = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409});
        let seen = serve(
            &mut handle,
            vec![
                expect(Method::GET, LEASE, Reply::Json(200, live)),
                // Another standby wins the race for the expired lease...
                expect(Method::GET, LEASE, Reply::Json(200, expired.clone())),
                expect(Method::PUT, LEASE, Reply::Json(409, conflict)),
                // ...and does not renew it either, so we take it over.
                expect(Method::GET, LEASE, Reply::Json(200, expired)),
                expect(Method::PUT, LEASE, Reply::Echo),
            ],
        )
        .await;
        acquiring.await.unwrap().unwrap();
        let put = &seen[4].body;
        assert_eq!(
            put["metadata"]["resourceVersion"], "7",
            "optimistic concurrency"
        );
        assert_eq!(put["spec"]["holderIdentity"], "a");
        assert_eq!(put["spec"]["leaseTransitions"], 1);
    }

    #[tokio::test]
    async fn leader_notices_when_another_replica_took_the_lease() {
        let (client, mut handle) = pair();
        let elector = Elector::new(client, config("a"));
        let holding = tokio::spawn(async move { elector.hold().await });
        let theirs = lease_json("b", Timestamp::now());
        serve(
            &mut handle,
            vec![
                expect(
                    Method::GET,
                    LEASE,
                    Reply::Json(200, lease_json("a", Timestamp::now())),
                ),
                expect(Method::PUT, LEASE, Reply::Echo),
                expect(Method::GET, LEASE, Reply::Json(200, theirs.clone())),
                expect(Method::GET, LEASE, Reply::Json(200, theirs)),
            ],
        )
        .await;
        let lost = holding.await.unwrap();
        assert!(
            matches!(&lost, LeaderError::Lost { holder, .. } if holder == "b"),
            "{lost}"
        );
    }

    #[tokio::test]
    async fn release_clears_the_holder_so_a_standby_takes_over_at_once() {
        let (client, mut handle) = pair();
        let elector = Elector::new(client, config("a"));
        let releasing = tokio::spawn(async move { elector.release().await });
        let seen = serve(
            &mut handle,
            vec![
                expect(
                    Method::GET,
                    LEASE,
                    Reply::Json(200, lease_json("a", Timestamp::now())),
                ),
                expect(Method::PUT, LEASE, Reply::Echo),
            ],
        )
        .await;
        releasing.await.unwrap();
        assert_eq!(
            seen[1].body["spec"]["holderIdentity"],
            serde_json::Value::Null
        );
        assert_eq!(
            decide(
                Some(&serde_json::from_value(seen[1].body.clone()).unwrap()),
                "b",
                Timestamp::now()
            ),
            Decision::TakeOver
        );
    }

    fn lease(holder: Option<&str>, renewed: i64, duration: i32) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some("chorus-operator".into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: holder.map(Into::into),
                lease_duration_seconds: Some(duration),
                renew_time: Some(MicroTime(Timestamp::from_second(renewed).expect("ts"))),
                ..Default::default()
            }),
        }
    }

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(second).expect("ts")
    }

    #[test]
    fn missing_lease_is_created() {
        assert_eq!(decide(None, "a", at(0)), Decision::Create);
    }

    #[test]
    fn own_lease_is_renewed_and_a_live_foreign_one_waited_for() {
        let l = lease(Some("a"), 1000, 15);
        assert_eq!(decide(Some(&l), "a", at(1005)), Decision::Renew);
        assert_eq!(
            decide(Some(&l), "b", at(1014)),
            Decision::Wait { holder: "a".into() }
        );
    }

    #[test]
    fn expired_or_released_lease_is_taken_over() {
        assert_eq!(
            decide(Some(&lease(Some("a"), 1000, 15)), "b", at(1015)),
            Decision::TakeOver
        );
        assert_eq!(
            decide(Some(&lease(None, 1000, 15)), "b", at(1001)),
            Decision::TakeOver
        );
        assert_eq!(
            decide(Some(&lease(Some(""), 1000, 15)), "b", at(1001)),
            Decision::TakeOver
        );
    }

    #[test]
    fn take_over_counts_a_transition_and_renewal_does_not() {
        let cfg = LeaseConfig {
            name: "chorus-operator".into(),
            namespace: "chorus".into(),
            identity: "b".into(),
            lease_duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
        };
        let taken = claimed(Some(lease(Some("a"), 1000, 15)), &cfg, at(1020), true);
        let spec = taken.spec.clone().expect("spec");
        assert_eq!(spec.holder_identity.as_deref(), Some("b"));
        assert_eq!(spec.lease_transitions, Some(1));
        assert_eq!(spec.acquire_time, Some(MicroTime(at(1020))));
        let renewed = claimed(Some(taken), &cfg, at(1025), false)
            .spec
            .expect("spec");
        assert_eq!(renewed.lease_transitions, Some(1));
        assert_eq!(renewed.acquire_time, Some(MicroTime(at(1020))));
        assert_eq!(renewed.renew_time, Some(MicroTime(at(1025))));
        assert_eq!(renewed.lease_duration_seconds, Some(15));
    }
}
