//! The connection autoscaler and the rebalance after a scale-out (pure).
//!
//! Scale-out is immediate: as soon as the pods hold more than
//! `connectionsPerPod` each (or deliver more than
//! `deliveriesPerSecondPerPod`), the fleet grows to what they need. Scale-in
//! waits until the need has stayed lower for [`SCALE_IN_AFTER`] and keeps
//! 10 % headroom, so a fleet at the boundary does not flap. A removed pod
//! drains (its clients get a paced `reconnect`); the operator marks the
//! least-loaded pods to go first.
//!
//! After a scale-out the old pods hold the connections and the new ones
//! none. Clients told to reconnect land on any pod (the Service picks), so
//! one round cannot even the fleet out: every [`REBALANCE_ROUND`] the pods
//! above the mean shed part of their excess, until the fleet is within
//! [`BALANCED`] of the mean or [`REBALANCE_FOR`] has passed.

use std::time::{Duration, Instant};

use chorus_crds::AutoscalingSpec;

/// The need must stay lower this long before the fleet shrinks.
pub const SCALE_IN_AFTER: Duration = Duration::from_secs(60);
/// Headroom kept when shrinking: the pods left run at most this share of
/// the target.
pub const SCALE_IN_HEADROOM: f64 = 0.9;
/// Time between two rebalance rounds (a round's `reconnect`s are spread
/// over [`SHED_SECONDS`]).
pub const REBALANCE_ROUND: Duration = Duration::from_secs(30);
/// Rounds stop this long after the scale-out.
pub const REBALANCE_FOR: Duration = Duration::from_secs(300);
/// Seconds over which one pod spreads the `reconnect`s of a round.
pub const SHED_SECONDS: u64 = 10;
/// A pod counts as balanced within this share above the mean.
pub const BALANCED: f64 = 0.2;
/// A pod sheds at most this share of its connections in one round.
pub const MAX_SHED_SHARE: f64 = 0.5;

/// What the autoscaler sees.
#[derive(Clone, Debug, PartialEq)]
pub struct Load {
    pub connections: i64,
    pub deliveries_per_second: i64,
    /// Every server pod answered: a scale-in needs the whole picture.
    pub complete: bool,
    /// `spec.replicas` now.
    pub replicas: i32,
}

/// The autoscaler's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// What the load needs (within min and max).
    pub desired: i32,
    /// Why, for `status.fleet.autoscaler` and the Event.
    pub reason: String,
    /// Set `spec.replicas` to this now.
    pub scale_to: Option<i32>,
}

/// What the autoscaler remembers between readings.
#[derive(Clone, Debug, Default)]
pub struct Memory {
    /// Since when the need has been below `spec.replicas`.
    pub lower_since: Option<Instant>,
    /// The rebalance under way after a scale-out.
    pub rebalance: Option<Rebalance>,
}

/// A rebalance after a scale-out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rebalance {
    /// Rounds stop after this.
    pub until: Instant,
    /// The next round is not before this.
    pub next_round: Instant,
    /// The pods the scale-out asked for: rounds wait until they all run.
    pub pods: i32,
}

impl Rebalance {
    /// A round may run now: its time has come, the fleet is at the size
    /// the scale-out asked for, and every pod of it is ready and answered
    /// (judging the balance before the new pods run would find the old
    /// ones balanced among themselves and stop at once).
    pub fn round_due(&self, now: Instant, replicas: i32, pods: &[(bool, bool)]) -> bool {
        now >= self.next_round
            && replicas == self.pods
            && usize::try_from(self.pods).is_ok_and(|n| n == pods.len())
            && pods.iter().all(|&(ready, answered)| ready && answered)
    }
}

fn pods_for(load: f64, per_pod: Option<i32>, share: f64) -> i64 {
    match per_pod {
        Some(per) if per > 0 => (load / (f64::from(per) * share)).ceil() as i64,
        _ => 0,
    }
}

/// Decides the replica count; `None` when the cluster does not scale on
/// connections.
pub fn decide(
    spec: &AutoscalingSpec,
    load: &Load,
    memory: &mut Memory,
    now: Instant,
) -> Option<Decision> {
    let per_pod = spec.connections_per_pod?;
    let (min, max) = (spec.min_replicas, spec.max_replicas.max(spec.min_replicas));
    let connections = load.connections as f64;
    let deliveries = load.deliveries_per_second as f64;
    let need = |share: f64| {
        let pods = pods_for(connections, Some(per_pod), share).max(pods_for(
            deliveries,
            spec.deliveries_per_second_per_pod,
            share,
        ));
        i32::try_from(pods).unwrap_or(i32::MAX).clamp(min, max)
    };
    let (out, inward) = (need(1.0), need(SCALE_IN_HEADROOM));
    let mut reason = format!("{} connections at {per_pod} per pod", load.connections);
    if let Some(d) = spec.deliveries_per_second_per_pod {
        reason.push_str(&format!(
            ", {} deliveries/s at {d} per pod",
            load.deliveries_per_second
        ));
    }
    let current = load.replicas;
    let decision = |desired: i32, scale: bool, why: String| Decision {
        desired,
        reason: why,
        scale_to: scale.then_some(desired),
    };
    if current < min || current > max {
        memory.lower_since = None;
        let to = current
            .clamp(min, max)
            .max(if current < min { out } else { min });
        return Some(decision(
            to,
            true,
            format!("{reason}; keeping within {min}..{max} pods"),
        ));
    }
    if out > current {
        memory.lower_since = None;
        return Some(decision(out, true, reason));
    }
    if inward < current && load.complete {
        let since = *memory.lower_since.get_or_insert(now);
        let waited = now.duration_since(since);
        if waited >= SCALE_IN_AFTER {
            memory.lower_since = None;
            return Some(decision(inward, true, reason));
        }
        return Some(decision(
            current,
            false,
            format!(
                "{reason}: {inward} pods would do; shrinking if that holds for {} s more",
                (SCALE_IN_AFTER - waited).as_secs()
            ),
        ));
    }
    memory.lower_since = None;
    Some(decision(current, false, reason))
}

/// One pod's share of a rebalance round: `(pod, connections to shed)`,
/// for the pods above the mean by more than [`BALANCED`] (and a few
/// connections), each at most [`MAX_SHED_SHARE`] of what it holds.
///
/// A shed client lands on any pod (the Service picks), so a share of what
/// a pod sheds comes back to the busy pods. A pod therefore sheds its own
/// excess plus its part of what the pods below the mean lack (the total
/// excess over the number of pods below the mean): expected, one round
/// brings every pod to about the mean, short of the cap.
pub fn shed_plan(pods: &[(String, i64)]) -> Vec<(String, i64)> {
    if pods.len() < 2 {
        return Vec::new();
    }
    let total: i64 = pods.iter().map(|(_, c)| *c).sum();
    let mean = total as f64 / pods.len() as f64;
    let excess: f64 = pods.iter().map(|(_, c)| (*c as f64 - mean).max(0.0)).sum();
    let below = pods.iter().filter(|(_, c)| (*c as f64) < mean).count();
    let refill = if below > 0 {
        excess / below as f64
    } else {
        0.0
    };
    pods.iter()
        .filter_map(|(name, c)| {
            let over = *c as f64 - mean;
            if over <= mean * BALANCED || over < 5.0 {
                return None;
            }
            let shed = (over + refill).min(*c as f64 * MAX_SHED_SHARE).floor() as i64;
            (shed > 0).then(|| (name.clone(), shed))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_rebalance_round_waits_for_the_pods_the_scale_out_asked_for() {
        let t0 = Instant::now();
        let plan = Rebalance {
            until: t0 + REBALANCE_FOR,
            next_round: t0,
            pods: 5,
        };
        let old_pods = [(true, true); 3];
        assert!(!plan.round_due(t0, 3, &old_pods), "before the patch lands");
        assert!(!plan.round_due(t0, 5, &old_pods), "new pods not listed yet");
        let mut starting = [(true, true); 5];
        starting[4] = (false, false);
        assert!(!plan.round_due(t0, 5, &starting), "a new pod not ready");
        let all = [(true, true); 5];
        assert!(plan.round_due(t0, 5, &all));
        let later = Rebalance {
            next_round: t0 + REBALANCE_ROUND,
            ..plan.clone()
        };
        assert!(!later.round_due(t0, 5, &all), "between rounds");
    }

    use super::*;

    fn spec(min: i32, max: i32, per_pod: i32) -> AutoscalingSpec {
        AutoscalingSpec {
            min_replicas: min,
            max_replicas: max,
            target_cpu_utilization_percentage: 70,
            connections_per_pod: Some(per_pod),
            deliveries_per_second_per_pod: None,
        }
    }

    fn load(connections: i64, replicas: i32) -> Load {
        Load {
            connections,
            deliveries_per_second: 0,
            complete: true,
            replicas,
        }
    }

    #[test]
    fn scales_out_at_once_to_what_the_connections_need() {
        let mut m = Memory::default();
        let d = decide(&spec(3, 10, 100), &load(450, 3), &mut m, Instant::now()).expect("on");
        assert_eq!((d.desired, d.scale_to), (5, Some(5)));
        assert_eq!(d.reason, "450 connections at 100 per pod");
        // Capped at max.
        let d = decide(&spec(3, 4, 100), &load(450, 3), &mut m, Instant::now()).expect("on");
        assert_eq!(d.scale_to, Some(4));
        // At the target: nothing to do.
        let d = decide(&spec(3, 10, 100), &load(300, 3), &mut m, Instant::now()).expect("on");
        assert_eq!(d.scale_to, None);
    }

    #[test]
    fn deliveries_can_ask_for_more_pods_than_connections() {
        let mut s = spec(2, 10, 1000);
        s.deliveries_per_second_per_pod = Some(5000);
        let mut l = load(100, 2);
        l.deliveries_per_second = 31_000;
        let d = decide(&s, &l, &mut Memory::default(), Instant::now()).expect("on");
        assert_eq!(d.scale_to, Some(7));
        assert!(
            d.reason.ends_with("31000 deliveries/s at 5000 per pod"),
            "{}",
            d.reason
        );
    }

    #[test]
    fn scales_in_only_after_the_need_stays_lower_with_headroom() {
        let s = spec(3, 10, 100);
        let mut m = Memory::default();
        let t0 = Instant::now();
        let d = decide(&s, &load(50, 5), &mut m, t0).expect("on");
        assert_eq!((d.desired, d.scale_to), (5, None));
        assert!(d.reason.contains("3 pods would do"), "{}", d.reason);
        // Not with part of the fleet unread.
        let mut partial = load(50, 5);
        partial.complete = false;
        let t1 = t0 + SCALE_IN_AFTER;
        assert_eq!(decide(&s, &partial, &mut m, t1).expect("on").scale_to, None);
        assert_eq!(m.lower_since, None, "the wait starts again");
        decide(&s, &load(50, 5), &mut m, t1).expect("on");
        let d = decide(&s, &load(50, 5), &mut m, t1 + SCALE_IN_AFTER).expect("on");
        assert_eq!(d.scale_to, Some(3));
        // 380 connections on 5 pods: 4 pods would run at 95 %, above the
        // 90 % headroom: stays at 5.
        let mut m = Memory::default();
        decide(&s, &load(380, 5), &mut m, t0).expect("on");
        let d = decide(&s, &load(380, 5), &mut m, t0 + SCALE_IN_AFTER).expect("on");
        assert_eq!(d.scale_to, None);
    }

    #[test]
    fn replicas_outside_min_and_max_are_brought_in_at_once() {
        let mut m = Memory::default();
        let d = decide(&spec(3, 10, 100), &load(0, 1), &mut m, Instant::now()).expect("on");
        assert_eq!(d.scale_to, Some(3));
        let d = decide(&spec(3, 10, 100), &load(2000, 12), &mut m, Instant::now()).expect("on");
        assert_eq!(d.scale_to, Some(10));
        let d = decide(&spec(3, 10, 100), &load(700, 1), &mut m, Instant::now()).expect("on");
        assert_eq!(d.scale_to, Some(7));
    }

    #[test]
    fn cpu_autoscaling_is_not_ours() {
        let mut s = spec(3, 10, 100);
        s.connections_per_pod = None;
        assert_eq!(
            decide(&s, &load(450, 3), &mut Memory::default(), Instant::now()),
            None
        );
    }

    fn pods(c: &[i64]) -> Vec<(String, i64)> {
        c.iter()
            .enumerate()
            .map(|(i, c)| (format!("p{i}"), *c))
            .collect()
    }

    #[test]
    fn shed_plan_moves_a_bounded_share() {
        // 450 on 3 of 5 pods: mean 90, excess 180 for 2 pods below: each
        // old pod would shed 60 + 90, capped at half of its 150.
        assert_eq!(
            shed_plan(&pods(&[150, 150, 150, 0, 0])),
            vec![
                ("p0".to_owned(), 75),
                ("p1".to_owned(), 75),
                ("p2".to_owned(), 75)
            ]
        );
        // One busy pod among many with room: its excess and the refill.
        assert_eq!(
            shed_plan(&pods(&[200, 90, 90, 90, 30])),
            vec![("p0".to_owned(), 100)]
        );
        // Half at most.
        assert_eq!(
            shed_plan(&pods(&[100, 0, 0, 0])),
            vec![("p0".to_owned(), 50)]
        );
        // Balanced enough, or too few to matter.
        assert!(shed_plan(&pods(&[100, 95, 90, 80])).is_empty());
        assert!(shed_plan(&pods(&[6, 0])).is_empty());
        assert!(shed_plan(&pods(&[500])).is_empty());
    }

    /// The counts expected after a round whose shed clients land evenly.
    fn after_round(counts: &[i64]) -> Vec<i64> {
        let plan = shed_plan(&pods(counts));
        let moved: i64 = plan.iter().map(|(_, n)| n).sum();
        let share = moved / counts.len() as i64;
        counts
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let shed = plan
                    .iter()
                    .find(|(p, _)| *p == format!("p{i}"))
                    .map_or(0, |(_, n)| *n);
                c - shed + share
            })
            .collect()
    }

    #[test]
    fn expected_rounds_balance_a_scale_out_within_three() {
        for start in [
            vec![150, 150, 150, 0, 0],
            vec![166, 150, 134, 0, 0],
            vec![300, 0],
            vec![100, 100, 100, 100, 0],
            vec![1000, 1000, 1000, 0, 0, 0],
        ] {
            let mut counts = start.clone();
            let mut rounds = 0;
            while !shed_plan(&pods(&counts)).is_empty() {
                counts = after_round(&counts);
                rounds += 1;
                assert!(rounds <= 3, "{start:?}: still {counts:?} after 3 rounds");
            }
        }
    }
}
