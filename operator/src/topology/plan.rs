//! The decision: observed state → master + actions. Pure, no I/O.
//!
//! Rules, in order:
//! 1. Never fight Sentinel. If a sentinel reports `failover_in_progress`, or
//!    a sentinel that disagrees with the majority has a *newer* config epoch
//!    (a failover result still spreading), change nothing.
//! 2. A master reported by a majority of *all configured* sentinels is the
//!    master, provided it is a member, answers and says it is a master;
//!    otherwise wait for Sentinel's own failover.
//! 3. Without a majority:
//!    - first start (no reachable sentinel knows a master, no reachable pod
//!      is a replica): pod 0;
//!    - else the reachable master with the highest replication offset
//!      (lowest pod index on a tie);
//!    - else, only if every sentinel answers and none knows a master, promote
//!      the replica with the highest offset;
//!    - else wait.
//! 4. With a master chosen: every other reachable pod that is not a replica
//!    of it becomes one (demoting a second master, re-pointing replicas of
//!    someone else); a replica of it with its link down is left to sync.
//!    Every reachable sentinel that monitors nothing gets `MONITOR`, one that
//!    monitors another address is re-pointed (`REMOVE` + `MONITOR`), one
//!    whose quorum or timings drifted gets `SET`. A sentinel that remembers
//!    non-member peers or replicas is `RESET`, but only one per pass, not in
//!    a pass that re-points a sentinel, and only while every reachable
//!    sentinel knows all reachable member sentinels and all attached
//!    replicas: a reset sentinel forgets its peers until their next hello
//!    (~2 s) and its replicas until the master's next INFO (~10 s), and
//!    resetting the next one before that could leave too few sentinels
//!    able to authorise a failover or pick a replica. The wait paces resets
//!    whatever the controller's requeue interval is.

use std::cmp::Reverse;
use std::collections::BTreeMap;

use super::model::{
    Action, MasterBasis, NodeAddr, Observed, Plan, RedisRole, SentinelView, TopologyConfig, Waiting,
};

/// Decides the master and the actions that bring the group to it.
pub fn plan(observed: &Observed, config: &TopologyConfig) -> Plan {
    let views: Vec<(&NodeAddr, &SentinelView)> = observed
        .sentinels
        .iter()
        .filter_map(|s| match &s.view {
            Ok(Some(view)) => Some((&s.addr, view)),
            _ => None,
        })
        .collect();
    let agreed = majority(&views, observed.sentinels.len());

    let wait = |master: Option<&NodeAddr>, waiting: Waiting| Plan {
        master: master.cloned(),
        basis: master.map(|_| MasterBasis::SentinelMajority),
        waiting: Some(waiting),
        actions: Vec::new(),
    };

    // Rule 1.
    if views.iter().any(|(_, v)| v.failover_in_progress) {
        return wait(agreed, Waiting::FailoverInProgress);
    }

    // Rules 2 and 3: who is (or becomes) master.
    let mut actions = Vec::new();
    let (master, basis) = if let Some(agreed) = agreed {
        let agreed_epoch = views
            .iter()
            .filter(|(_, v)| &v.master == agreed)
            .map(|(_, v)| v.config_epoch)
            .max()
            .unwrap_or(0);
        if views
            .iter()
            .any(|(_, v)| &v.master != agreed && v.config_epoch > agreed_epoch)
        {
            return wait(Some(agreed), Waiting::FailoverInProgress);
        }
        match observed.redis.iter().find(|n| &n.addr == agreed) {
            None => return wait(Some(agreed), Waiting::MasterNotAMember),
            Some(node) => match &node.role {
                Err(_) => return wait(Some(agreed), Waiting::MasterUnreachable),
                Ok(RedisRole::Replica { .. }) => {
                    return wait(Some(agreed), Waiting::MasterIsReplica);
                }
                // Restarted and deciding its role: it serves again, or the
                // sentinels fail over, within seconds.
                Ok(RedisRole::Waiting { .. }) => {
                    return wait(Some(agreed), Waiting::MasterUnreachable);
                }
                Ok(RedisRole::Master { .. }) => (agreed.clone(), MasterBasis::SentinelMajority),
            },
        }
    } else {
        let any_replica = observed
            .redis
            .iter()
            .any(|n| matches!(n.role, Ok(RedisRole::Replica { .. })));
        let any_data = observed
            .redis
            .iter()
            .any(|n| n.role.as_ref().is_ok_and(|r| r.data() != (0, 0)));
        let best_master = observed
            .redis
            .iter()
            .enumerate()
            .filter_map(|(i, n)| match n.role {
                Ok(RedisRole::Master { offset }) => Some((offset, Reverse(i), &n.addr)),
                _ => None,
            })
            .max();
        if views.is_empty() && !any_replica && !any_data {
            match observed.redis.first() {
                Some(pod0) if pod0.role.is_ok() => (pod0.addr.clone(), MasterBasis::FirstStart),
                _ => return wait(None, Waiting::FirstMasterUnreachable),
            }
        } else if let Some((_, _, addr)) = best_master {
            (addr.clone(), MasterBasis::HighestOffset)
        } else {
            let all_sentinels_empty = observed
                .sentinels
                .iter()
                .all(|s| matches!(s.view, Ok(None)));
            // The member holding the most data, serving as a replica or
            // waiting to learn its role (lowest pod index on a tie).
            let best = observed
                .redis
                .iter()
                .enumerate()
                .filter_map(|(i, n)| match &n.role {
                    Ok(r @ (RedisRole::Replica { .. } | RedisRole::Waiting { .. })) => {
                        Some((r.data(), Reverse(i), n))
                    }
                    _ => None,
                })
                .max_by_key(|(data, i, _)| (*data, *i));
            let all_answer = observed.redis.iter().all(|n| n.role.is_ok());
            match best {
                // A member that does not answer may hold more than an empty
                // best candidate: never choose an empty pod over it.
                Some((data, _, _)) if all_sentinels_empty && data == (0, 0) && !all_answer => {
                    return wait(None, Waiting::MembersUnreachable);
                }
                Some((_, _, node)) if all_sentinels_empty => match node.role {
                    Ok(RedisRole::Waiting { .. }) => (node.addr.clone(), MasterBasis::ChoseWaiting),
                    _ => {
                        actions.push(Action::Promote {
                            node: node.addr.clone(),
                        });
                        (node.addr.clone(), MasterBasis::PromotedReplica)
                    }
                },
                _ => return wait(None, Waiting::NoMaster),
            }
        }
    };

    // Rule 4, Redis side.
    for node in &observed.redis {
        if node.addr == master {
            continue;
        }
        let attached = match &node.role {
            // A waiting member takes its role from the sentinels itself.
            Err(_) | Ok(RedisRole::Waiting { .. }) => continue,
            Ok(RedisRole::Replica { master: m, .. }) => m == &master,
            Ok(RedisRole::Master { .. }) => false,
        };
        if !attached {
            actions.push(Action::ReplicaOf {
                node: node.addr.clone(),
                master: master.clone(),
            });
        }
    }

    // Rule 4, Sentinel side.
    let mut repointed = false;
    let mut reset: Option<&NodeAddr> = None;
    for sentinel in &observed.sentinels {
        let view = match &sentinel.view {
            Err(_) => continue,
            Ok(None) => {
                repointed = true;
                actions.push(Action::Monitor {
                    sentinel: sentinel.addr.clone(),
                    master: master.clone(),
                });
                continue;
            }
            Ok(Some(view)) => view,
        };
        if view.master != master {
            repointed = true;
            actions.push(Action::Remonitor {
                sentinel: sentinel.addr.clone(),
                stale: view.master.clone(),
                master: master.clone(),
            });
            continue;
        }
        if options_drifted(view, config) {
            actions.push(Action::Configure {
                sentinel: sentinel.addr.clone(),
            });
        }
        if reset.is_none() && knows_strangers(view, observed) {
            reset = Some(&sentinel.addr);
        }
    }
    if let (Some(sentinel), false, true) = (reset, repointed, mesh_complete(observed, &master)) {
        actions.push(Action::Reset {
            sentinel: sentinel.clone(),
        });
    }

    Plan {
        master: Some(master),
        basis: Some(basis),
        waiting: None,
        actions,
    }
}

/// The master reported by more than half of all configured sentinels.
fn majority<'a>(
    views: &[(&NodeAddr, &'a SentinelView)],
    configured: usize,
) -> Option<&'a NodeAddr> {
    let mut votes: BTreeMap<&NodeAddr, usize> = BTreeMap::new();
    for (_, view) in views {
        *votes.entry(&view.master).or_default() += 1;
    }
    votes
        .into_iter()
        .find(|(_, count)| count * 2 > configured)
        .map(|(addr, _)| addr)
}

fn options_drifted(view: &SentinelView, config: &TopologyConfig) -> bool {
    let millis = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    view.quorum != config.quorum
        || config
            .down_after
            .is_some_and(|d| millis(d) != view.down_after_ms)
        || config
            .failover_timeout
            .is_some_and(|d| millis(d) != view.failover_timeout_ms)
}

/// Every reachable sentinel knows every other reachable sentinel and every
/// replica whose link to `master` is up.
fn mesh_complete(observed: &Observed, master: &NodeAddr) -> bool {
    let attached: Vec<&NodeAddr> = observed
        .redis
        .iter()
        .filter(|n| {
            matches!(&n.role, Ok(RedisRole::Replica { master: m, link_up: true, .. }) if m == master)
        })
        .map(|n| &n.addr)
        .collect();
    let reachable: Vec<&NodeAddr> = observed
        .sentinels
        .iter()
        .filter(|s| s.view.is_ok())
        .map(|s| &s.addr)
        .collect();
    observed.sentinels.iter().all(|s| match &s.view {
        Err(_) => true,
        Ok(None) => false,
        Ok(Some(view)) => {
            reachable
                .iter()
                .all(|peer| *peer == &s.addr || view.known_sentinels.contains(peer))
                && attached.iter().all(|r| view.known_replicas.contains(r))
        }
    })
}

/// Remembers a sentinel or replica address that is not a member any more.
fn knows_strangers(view: &SentinelView, observed: &Observed) -> bool {
    let stale_sentinel = view
        .known_sentinels
        .iter()
        .any(|a| !observed.sentinels.iter().any(|s| &s.addr == a));
    let stale_replica = view
        .known_replicas
        .iter()
        .any(|a| !observed.redis.iter().any(|r| &r.addr == a));
    stale_sentinel || stale_replica
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::model::{RedisNode, SentinelNode};
    use std::time::Duration;

    fn redis(i: u16) -> NodeAddr {
        NodeAddr::new("10.0.0.1", 6379 + i)
    }
    fn sentinel(i: u16) -> NodeAddr {
        NodeAddr::new("10.0.1.1", 26379 + i)
    }

    fn config() -> TopologyConfig {
        let mut c = TopologyConfig::new(
            (0..3).map(redis).collect(),
            (0..3).map(sentinel).collect(),
            2,
        );
        c.down_after = Some(Duration::from_millis(5000));
        c.failover_timeout = Some(Duration::from_millis(60000));
        c
    }

    fn master(offset: u64) -> Result<RedisRole, String> {
        Ok(RedisRole::Master { offset })
    }
    fn replica_of(i: u16, offset: u64) -> Result<RedisRole, String> {
        Ok(RedisRole::Replica {
            master: redis(i),
            link_up: true,
            offset,
        })
    }
    fn down() -> Result<RedisRole, String> {
        Err("connection refused".to_owned())
    }

    /// A sentinel that monitors `master` with the config's options and
    /// knows exactly the members.
    fn view(master: NodeAddr, epoch: u64) -> SentinelView {
        SentinelView {
            master,
            config_epoch: epoch,
            failover_in_progress: false,
            quorum: 2,
            down_after_ms: 5000,
            failover_timeout_ms: 60000,
            // Test views know every member (their own address included,
            // which a real sentinel does not list; it does not matter here).
            known_sentinels: (0..3).map(sentinel).collect(),
            known_replicas: (0..3).map(redis).collect(),
        }
    }

    fn observed(
        roles: Vec<Result<RedisRole, String>>,
        views: Vec<Result<Option<SentinelView>, String>>,
    ) -> Observed {
        Observed {
            redis: (0u16..)
                .zip(roles)
                .map(|(i, role)| RedisNode {
                    addr: redis(i),
                    role,
                })
                .collect(),
            sentinels: (0u16..)
                .zip(views)
                .map(|(i, view)| SentinelNode {
                    addr: sentinel(i),
                    view,
                })
                .collect(),
        }
    }

    fn replica_of_action(node: u16, of: u16) -> Action {
        Action::ReplicaOf {
            node: redis(node),
            master: redis(of),
        }
    }

    #[test]
    fn first_start_makes_pod0_master_and_sentinels_monitor_it() {
        let obs = observed(
            vec![master(0), master(0), master(0)],
            vec![Ok(None), Ok(None), Ok(None)],
        );
        let plan = plan(&obs, &config());
        assert_eq!(plan.master, Some(redis(0)));
        assert_eq!(plan.basis, Some(MasterBasis::FirstStart));
        assert_eq!(plan.waiting, None);
        let mut expected = vec![replica_of_action(1, 0), replica_of_action(2, 0)];
        expected.extend((0..3).map(|i| Action::Monitor {
            sentinel: sentinel(i),
            master: redis(0),
        }));
        assert_eq!(plan.actions, expected);
    }

    #[test]
    fn first_start_waits_for_pod0() {
        let obs = observed(
            vec![down(), master(0), master(0)],
            vec![Ok(None), Ok(None), Ok(None)],
        );
        let plan = plan(&obs, &config());
        assert_eq!(plan.waiting, Some(Waiting::FirstMasterUnreachable));
        assert_eq!(plan.master, None);
        assert!(plan.actions.is_empty());
    }

    #[test]
    fn first_start_with_unreachable_members_acts_on_the_rest() {
        let obs = observed(
            vec![master(0), down(), master(0)],
            vec![Ok(None), Err("timeout".to_owned()), Ok(None)],
        );
        let plan = plan(&obs, &config());
        assert_eq!(plan.master, Some(redis(0)));
        assert_eq!(
            plan.actions,
            vec![
                replica_of_action(2, 0),
                Action::Monitor {
                    sentinel: sentinel(0),
                    master: redis(0)
                },
                Action::Monitor {
                    sentinel: sentinel(2),
                    master: redis(0)
                },
            ]
        );
    }

    #[test]
    fn converged_group_needs_nothing() {
        let obs = observed(
            vec![master(100), replica_of(0, 100), replica_of(0, 100)],
            vec![
                Ok(Some(view(redis(0), 0))),
                Ok(Some(view(redis(0), 0))),
                Ok(Some(view(redis(0), 0))),
            ],
        );
        let plan = plan(&obs, &config());
        assert_eq!(plan.master, Some(redis(0)));
        assert_eq!(plan.basis, Some(MasterBasis::SentinelMajority));
        assert_eq!(plan.actions, vec![]);
    }

    #[test]
    fn restarted_old_master_rejoins_as_replica_of_the_sentinels_master() {
        // Sentinels failed over to pod 1; pod 0 came back empty, as a master.
        let obs = observed(
            vec![master(0), master(5000), replica_of(1, 5000)],
            vec![
                Ok(Some(view(redis(1), 1))),
                Ok(Some(view(redis(1), 1))),
                Ok(Some(view(redis(1), 1))),
            ],
        );
        let plan = plan(&obs, &config());
        assert_eq!(plan.master, Some(redis(1)));
        assert_eq!(plan.basis, Some(MasterBasis::SentinelMajority));
        assert_eq!(plan.actions, vec![replica_of_action(0, 1)]);
    }

    #[test]
    fn split_brain_keeps_the_sentinels_master_even_with_a_lower_offset() {
        // Pod 1 got promoted on its own side of a split and took writes;
        // the sentinel majority still follows pod 0.
        let obs = observed(
            vec![master(500), master(900), replica_of(1, 900)],
            vec![
                Ok(Some(view(redis(0), 3))),
                Ok(Some(view(redis(0), 3))),
                Ok(Some(view(redis(1), 3))),
            ],
        );
        let plan = plan(&obs, &config());
        assert_eq!(plan.master, Some(redis(0)));
        assert_eq!(plan.basis, Some(MasterBasis::SentinelMajority));
        assert_eq!(
            plan.actions,
            vec![
                replica_of_action(1, 0),
                replica_of_action(2, 0),
                Action::Remonitor {
                    sentinel: sentinel(2),
                    stale: redis(1),
                    master: redis(0)
                },
            ]
        );
    }

    #[test]
    fn split_brain_without_agreement_keeps_the_highest_offset() {
        // One sentinel each way, the third unreachable: no majority.
        let obs = observed(
            vec![master(500), master(900), replica_of(0, 500)],
            vec![
                Ok(Some(view(redis(0), 2))),
                Ok(Some(view(redis(1), 2))),
                Err("timeout".to_owned()),
            ],
        );
        let plan = plan(&obs, &config());
        assert_eq!(plan.master, Some(redis(1)));
        assert_eq!(plan.basis, Some(MasterBasis::HighestOffset));
        assert_eq!(
            plan.actions,
            vec![
                replica_of_action(0, 1),
                replica_of_action(2, 1),
                Action::Remonitor {
                    sentinel: sentinel(0),
                    stale: redis(0),
                    master: redis(1)
                },
            ]
        );
    }

    #[test]
    fn equal_offsets_without_agreement_keep_the_lowest_pod() {
        let obs = observed(
            vec![replica_of(2, 7), master(7), master(7)],
            vec![Ok(None), Ok(None), Ok(None)],
        );
        let plan = plan(&obs, &config());
        assert_eq!(plan.master, Some(redis(1)));
        assert_eq!(plan.basis, Some(MasterBasis::HighestOffset));
        assert_eq!(
            &plan.actions[..2],
            &[replica_of_action(0, 1), replica_of_action(2, 1)]
        );
    }

    #[test]
    fn sentinel_following_a_stale_master_is_repointed() {
        // Sentinel 2 was restarted with an old config naming a dead pod IP.
        let gone = NodeAddr::new("10.0.0.99", 6379);
        let obs = observed(
            vec![master(100), replica_of(0, 100), replica_of(0, 100)],
            vec![
                Ok(Some(view(redis(0), 4))),
                Ok(Some(view(redis(0), 4))),
                Ok(Some(view(gone.clone(), 1))),
            ],
        );
        let plan = plan(&obs, &config());
        assert_eq!(plan.master, Some(redis(0)));
        assert_eq!(
            plan.actions,
            vec![Action::Remonitor {
                sentinel: sentinel(2),
                stale: gone,
                master: redis(0)
            }]
        );
    }

    #[test]
    fn sentinels_knowing_stale_peers_are_reset_one_per_pass() {
        let mut stale = view(redis(0), 0);
        stale
            .known_sentinels
            .push(NodeAddr::new("10.0.1.99", 26379));
        let mut stale_replica = view(redis(0), 0);
        stale_replica
            .known_replicas
            .push(NodeAddr::new("10.0.0.98", 6379));
        let obs = observed(
            vec![master(100), replica_of(0, 100), replica_of(0, 100)],
            vec![
                Ok(Some(view(redis(0), 0))),
                Ok(Some(stale)),
                Ok(Some(stale_replica)),
            ],
        );
        let plan = plan(&obs, &config());
        assert_eq!(
            plan.actions,
            vec![Action::Reset {
                sentinel: sentinel(1)
            }]
        );
    }

    #[test]
    fn no_reset_until_the_last_reset_sentinel_has_found_its_peers_again() {
        let mut stale = view(redis(0), 0);
        stale
            .known_sentinels
            .push(NodeAddr::new("10.0.1.99", 26379));
        // Sentinel 0 was reset in the previous pass: it has re-learned its
        // peers from their hellos but not yet the replicas.
        let mut just_reset = view(redis(0), 0);
        just_reset.known_replicas.clear();
        let obs = observed(
            vec![master(100), replica_of(0, 100), replica_of(0, 100)],
            vec![
                Ok(Some(just_reset)),
                Ok(Some(stale.clone())),
                Ok(Some(stale.clone())),
            ],
        );
        assert_eq!(plan(&obs, &config()).actions, vec![]);

        let mut no_peers = view(redis(0), 0);
        no_peers.known_sentinels.clear();
        let obs = observed(
            vec![master(100), replica_of(0, 100), replica_of(0, 100)],
            vec![Ok(Some(no_peers)), Ok(Some(stale.clone())), Ok(Some(stale))],
        );
        assert_eq!(plan(&obs, &config()).actions, vec![]);
    }

    #[test]
    fn no_reset_in_a_pass_that_repoints_a_sentinel() {
        let mut stale = view(redis(0), 0);
        stale
            .known_sentinels
            .push(NodeAddr::new("10.0.1.99", 26379));
        let obs = observed(
            vec![master(100), replica_of(0, 100), replica_of(0, 100)],
            vec![Ok(Some(view(redis(0), 0))), Ok(Some(stale)), Ok(None)],
        );
        let plan = plan(&obs, &config());
        assert_eq!(
            plan.actions,
            vec![Action::Monitor {
                sentinel: sentinel(2),
                master: redis(0)
            }]
        );
    }

    #[test]
    fn drifted_options_are_set_again() {
        let mut drifted = view(redis(0), 0);
        drifted.down_after_ms = 30000;
        let mut wrong_quorum = view(redis(0), 0);
        wrong_quorum.quorum = 1;
        let obs = observed(
            vec![master(100), replica_of(0, 100), replica_of(0, 100)],
            vec![
                Ok(Some(drifted)),
                Ok(Some(wrong_quorum)),
                Ok(Some(view(redis(0), 0))),
            ],
        );
        let plan = plan(&obs, &config());
        assert_eq!(
            plan.actions,
            vec![
                Action::Configure {
                    sentinel: sentinel(0)
                },
                Action::Configure {
                    sentinel: sentinel(1)
                }
            ]
        );
    }

    #[test]
    fn replica_of_a_replica_is_repointed() {
        let obs = observed(
            vec![master(100), replica_of(0, 100), replica_of(1, 100)],
            vec![
                Ok(Some(view(redis(0), 0))),
                Ok(Some(view(redis(0), 0))),
                Ok(Some(view(redis(0), 0))),
            ],
        );
        assert_eq!(plan(&obs, &config()).actions, vec![replica_of_action(2, 0)]);
    }

    #[test]
    fn replica_still_syncing_is_left_alone() {
        let syncing = Ok(RedisRole::Replica {
            master: redis(0),
            link_up: false,
            offset: 0,
        });
        let obs = observed(
            vec![master(100), syncing, replica_of(0, 100)],
            vec![
                Ok(Some(view(redis(0), 0))),
                Ok(Some(view(redis(0), 0))),
                Ok(Some(view(redis(0), 0))),
            ],
        );
        assert_eq!(plan(&obs, &config()).actions, vec![]);
    }

    #[test]
    fn failover_in_progress_changes_nothing() {
        let mut leader = view(redis(1), 2);
        leader.failover_in_progress = true;
        let obs = observed(
            vec![down(), master(100), replica_of(0, 100)],
            vec![
                Ok(Some(leader)),
                Ok(Some(view(redis(0), 1))),
                Ok(Some(view(redis(0), 1))),
            ],
        );
        let plan = plan(&obs, &config());
        assert_eq!(plan.waiting, Some(Waiting::FailoverInProgress));
        assert_eq!(plan.actions, vec![]);
    }

    #[test]
    fn newer_epoch_in_the_minority_means_a_failover_is_spreading() {
        // The leader finished (epoch 2, pod 1); the others still say pod 0,
        // which is back and reachable. Demoting pod 1 would undo the failover.
        let obs = observed(
            vec![master(0), master(100), replica_of(0, 100)],
            vec![
                Ok(Some(view(redis(1), 2))),
                Ok(Some(view(redis(0), 1))),
                Ok(Some(view(redis(0), 1))),
            ],
        );
        let plan = plan(&obs, &config());
        assert_eq!(plan.waiting, Some(Waiting::FailoverInProgress));
        assert_eq!(plan.actions, vec![]);
    }

    #[test]
    fn unreachable_agreed_master_is_left_to_sentinel() {
        let obs = observed(
            vec![down(), master(0), replica_of(0, 100)],
            vec![
                Ok(Some(view(redis(0), 1))),
                Ok(Some(view(redis(0), 1))),
                Ok(None),
            ],
        );
        let plan = plan(&obs, &config());
        assert_eq!(plan.master, Some(redis(0)));
        assert_eq!(plan.waiting, Some(Waiting::MasterUnreachable));
        assert_eq!(plan.actions, vec![]);
    }

    #[test]
    fn agreed_master_that_is_not_a_member_is_left_to_sentinel() {
        let gone = NodeAddr::new("10.0.0.99", 6379);
        let obs = observed(
            vec![master(0), replica_of(9, 100), master(0)],
            vec![
                Ok(Some(view(gone.clone(), 1))),
                Ok(Some(view(gone.clone(), 1))),
                Ok(Some(view(gone.clone(), 1))),
            ],
        );
        let plan = plan(&obs, &config());
        assert_eq!(plan.master, Some(gone));
        assert_eq!(plan.waiting, Some(Waiting::MasterNotAMember));
        assert_eq!(plan.actions, vec![]);
    }

    #[test]
    fn majority_counts_all_configured_sentinels() {
        // One reachable sentinel is not a majority of three: fall back to
        // the highest offset, which is the same pod here.
        let obs = observed(
            vec![master(100), replica_of(0, 100), master(0)],
            vec![
                Ok(Some(view(redis(0), 1))),
                Err("x".into()),
                Err("y".into()),
            ],
        );
        let plan = plan(&obs, &config());
        assert_eq!(plan.master, Some(redis(0)));
        assert_eq!(plan.basis, Some(MasterBasis::HighestOffset));
        assert_eq!(plan.actions, vec![replica_of_action(2, 0)]);
    }

    #[test]
    fn orphaned_replicas_promote_the_most_advanced_when_sentinels_know_nothing() {
        let obs = observed(
            vec![down(), replica_of(0, 90), replica_of(0, 120)],
            vec![Ok(None), Ok(None), Ok(None)],
        );
        let plan = plan(&obs, &config());
        assert_eq!(plan.master, Some(redis(2)));
        assert_eq!(plan.basis, Some(MasterBasis::PromotedReplica));
        assert_eq!(
            &plan.actions[..2],
            &[Action::Promote { node: redis(2) }, replica_of_action(1, 2)]
        );
    }

    #[test]
    fn orphaned_replicas_wait_when_a_sentinel_cannot_be_asked() {
        let obs = observed(
            vec![down(), replica_of(0, 90), replica_of(0, 120)],
            vec![Ok(None), Err("timeout".into()), Ok(None)],
        );
        let plan = plan(&obs, &config());
        assert_eq!(plan.waiting, Some(Waiting::NoMaster));
        assert_eq!(plan.actions, vec![]);
    }
}
