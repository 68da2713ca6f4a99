//! Roll step (needs a client): replaces Redis pods that run an outdated
//! template, safely. The StatefulSet's update strategy is `OnDelete`, so
//! nothing changes until this step deletes a pod, and it deletes one at a
//! time, only while the group is healthy (one reachable master, every
//! replica linked, the sentinels agreeing): replicas first, the master last.
//! The master's `preStop` hands over to a replica before it stops, so the
//! group is never without a master for longer than a failover.
//!
//! [`next`] is the pure decision.

use k8s_openapi::api::core::v1::Pod;
use kube::{Api, Client, api::DeleteParams};

use super::members::Members;
use crate::topology::TopologyReport;

/// Deleting a pod failed.
#[derive(Debug, thiserror::Error)]
#[error("deleting Redis pod {name} to roll it: {source}")]
pub struct RollError {
    pub name: String,
    #[source]
    pub source: kube::Error,
}

/// Which pod to replace now, if any: an outdated replica, else the outdated
/// master, and only while every member runs the group settled and no pod
/// is starting or stopping.
pub fn next(
    members: &Members,
    update_revision: Option<&str>,
    topology: Option<&TopologyReport>,
) -> Option<String> {
    let update_revision = update_revision?;
    let report = topology?;
    if !report.converged() || !members.redis.iter().all(|p| p.running && p.ready) {
        return None;
    }
    let master_pod = report
        .master
        .as_ref()
        .and_then(|m| m.host.split('.').next().map(str::to_owned));
    let outdated: Vec<&str> = members
        .redis
        .iter()
        .filter(|p| p.revision.as_deref() != Some(update_revision))
        .map(|p| p.name.as_str())
        .collect();
    outdated
        .iter()
        .find(|name| Some(**name) != master_pod.as_deref())
        .or_else(|| outdated.first())
        .map(|name| (*name).to_owned())
}

/// Deletes pod `name`; the StatefulSet recreates it from the new template
/// (a pod already gone or recreated meanwhile is fine: the next pass sees
/// its revision).
pub async fn replace(client: &Client, namespace: &str, name: &str) -> Result<(), RollError> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    match pods.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.is_not_found() => Ok(()),
        Err(source) => Err(RollError {
            name: name.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::members::MemberPod;
    use crate::topology::{NodeAddr, Observed, TopologyReport};

    fn pod(name: &str, revision: &str, ready: bool) -> MemberPod {
        MemberPod {
            name: name.to_owned(),
            revision: Some(revision.to_owned()),
            running: true,
            ready,
        }
    }

    fn members(revisions: [&str; 3]) -> Members {
        Members {
            redis: (0..3)
                .map(|i| pod(&format!("chat-redis-{i}"), revisions[i], true))
                .collect(),
            sentinels: vec![pod("chat-sentinel-0", "s", true)],
        }
    }

    fn healthy(master: usize) -> TopologyReport {
        TopologyReport {
            master: Some(NodeAddr::new(
                format!("chat-redis-{master}.chat-redis.default.svc"),
                6379,
            )),
            basis: None,
            master_reachable: true,
            replicas: Vec::new(),
            sentinels_agreeing: 3,
            unreachable: Vec::new(),
            waiting: None,
            actions: Vec::new(),
            observed: Observed::default(),
        }
    }

    #[test]
    fn replicas_roll_before_the_master_one_at_a_time() {
        let report = healthy(1);
        let all_old = members(["old", "old", "old"]);
        assert_eq!(
            next(&all_old, Some("new"), Some(&report)).as_deref(),
            Some("chat-redis-0")
        );
        let master_left = members(["new", "old", "new"]);
        assert_eq!(
            next(&master_left, Some("new"), Some(&report)).as_deref(),
            Some("chat-redis-1"),
            "the master goes last (its preStop hands over)"
        );
        assert_eq!(next(&members(["new"; 3]), Some("new"), Some(&report)), None);
    }

    #[test]
    fn nothing_rolls_while_the_group_is_unsettled() {
        let mut starting = members(["old", "new", "old"]);
        starting.redis[1].ready = false;
        assert_eq!(next(&starting, Some("new"), Some(&healthy(0))), None);
        let mut failing_over = healthy(0);
        failing_over.master_reachable = false;
        assert_eq!(
            next(&members(["old"; 3]), Some("new"), Some(&failing_over)),
            None
        );
        assert_eq!(next(&members(["old"; 3]), Some("new"), None), None);
        assert_eq!(next(&members(["old"; 3]), None, Some(&healthy(0))), None);
    }
}
