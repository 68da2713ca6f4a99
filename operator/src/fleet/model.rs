//! From the pods' readings to `status.fleet`, the `FleetHealthy`
//! condition and the pods to restart (pure).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chorus_crds::{FleetPodStatus, FleetStatus};

use super::reading::Reading;
use crate::reconcile::status::Verdict;

/// At most this many pods are listed in `status.fleet.pods`.
pub const MAX_LISTED_PODS: usize = 100;
/// A pod nears its connection limit at this share of it.
pub const NEAR_LIMIT: f64 = 0.9;
/// A pod whose backplane stays down this long while it works for the
/// others is restarted (it re-subscribes by itself first, within its
/// canary timeout).
pub const RESTART_AFTER: Duration = Duration::from_secs(60);
/// At most one such restart per cluster in this time.
pub const RESTART_SPACING: Duration = Duration::from_secs(60);

/// One server pod as listed, with what its `/metrics` said.
#[derive(Clone, Debug, PartialEq)]
pub struct PodSample {
    pub name: String,
    /// Its `Ready` condition is true.
    pub ready: bool,
    /// The reading, or why there is none.
    pub reading: Result<Reading, String>,
    /// Why its backplane is down (its `/readyz`), read only when its
    /// reading says so.
    pub broker_down: Option<String>,
}

/// The previous readings, for rates.
#[derive(Clone, Debug, Default)]
pub struct Previous {
    pub at: Option<Instant>,
    pub readings: HashMap<String, Reading>,
}

/// `delta / seconds`, 0 for a counter that went back (a restarted pod).
fn rate(now: f64, before: Option<f64>, seconds: f64) -> f64 {
    match before {
        Some(b) if now >= b && seconds > 0.0 => (now - b) / seconds,
        _ => 0.0,
    }
}

/// The latency under which `q` of the observations fell, interpolated
/// linearly inside the bucket it lands in (as PromQL's
/// `histogram_quantile`); `None` without observations.
pub fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                // Above the last finite bound: that bound is all we know.
                return Some(lower.0);
            }
            let share = if count > lower.1 {
                (rank - lower.1) / (count - lower.1)
            } else {
                1.0
            };
            return Some(lower.0 + (le - lower.0) * share);
        }
        lower = (le, count);
    }
    None
}

/// `"850µs"`, `"2.5ms"`, `"1.20s"`.
pub fn human_seconds(s: f64) -> String {
    if s < 0.001 {
        format!("{:.0}µs", s * 1e6)
    } else if s < 1.0 {
        format!("{:.1}ms", s * 1e3)
    } else {
        format!("{s:.2}s")
    }
}

/// Bucket counts since `before` (the whole histogram when the pod is new
/// or restarted).
fn bucket_delta(now: &[(f64, f64)], before: Option<&[(f64, f64)]>) -> Vec<(f64, f64)> {
    let Some(before) = before.filter(|b| b.len() == now.len()) else {
        return now.to_vec();
    };
    let went_back = now.iter().zip(before).any(|(n, b)| n.1 < b.1);
    if went_back {
        return now.to_vec();
    }
    now.iter()
        .zip(before)
        .map(|(n, b)| (n.0, n.1 - b.1))
        .collect()
}

fn whole(x: f64) -> i64 {
    // Counts and rates are far below i64::MAX; NaN becomes 0.
    x.round() as i64
}

/// `status.fleet` from the samples, with rates over the time since
/// `previous`.
pub fn summarize(previous: &Previous, now: Instant, samples: &[PodSample]) -> FleetStatus {
    let seconds = previous
        .at
        .map(|at| now.duration_since(at).as_secs_f64())
        .unwrap_or(0.0);
    let mut fleet = FleetStatus::default();
    let mut latency: Vec<(f64, f64)> = Vec::new();
    let mut pods = Vec::new();
    for s in samples {
        let mut pod = FleetPodStatus {
            name: s.name.clone(),
            ..FleetPodStatus::default()
        };
        match &s.reading {
            Ok(r) => {
                let before = previous.readings.get(&s.name);
                let per_second = rate(
                    r.delivered_total,
                    before.map(|b| b.delivered_total),
                    seconds,
                );
                pod.connections = whole(r.connections);
                pod.rooms = whole(r.rooms);
                pod.deliveries_per_second = whole(per_second);
                pod.canary_rtt = r.canary_rtt_seconds.map(human_seconds);
                pod.broker_up = r.broker_up;
                pod.broker_down = s.broker_down.clone().filter(|_| !r.broker_up);
                fleet.connections += pod.connections;
                fleet.rooms += pod.rooms;
                fleet.deliveries_per_second += pod.deliveries_per_second;
                fleet.slow_consumers_dropped += whole(r.slow_consumers_total);
                fleet.pods_reporting += 1;
                if previous.at.is_some() {
                    let delta = bucket_delta(
                        &r.latency_buckets,
                        before.map(|b| b.latency_buckets.as_slice()),
                    );
                    if latency.is_empty() {
                        latency = delta;
                    } else if latency.len() == delta.len() {
                        for (sum, d) in latency.iter_mut().zip(delta) {
                            sum.1 += d.1;
                        }
                    }
                }
            }
            Err(e) => pod.error = Some(e.clone()),
        }
        pods.push(pod);
    }
    pods.sort_by(|a, b| a.name.cmp(&b.name));
    pods.truncate(MAX_LISTED_PODS);
    fleet.pods = pods;
    fleet.delivery_p99 = quantile(0.99, &latency).map(human_seconds);
    fleet
}

/// `FleetHealthy`: every ready pod answers, delivers through the backplane
/// and stays below 90 % of `max_connections`.
pub fn health(samples: &[PodSample], max_connections: i32) -> Verdict {
    let list = |names: Vec<&str>| names.join(", ");
    let unreadable: Vec<&str> = samples
        .iter()
        .filter(|s| s.ready && s.reading.is_err())
        .map(|s| s.name.as_str())
        .collect();
    if !unreadable.is_empty() {
        let why = samples
            .iter()
            .find_map(|s| s.reading.as_ref().err())
            .cloned()
            .unwrap_or_default();
        return Verdict::new(
            false,
            "MetricsUnreachable",
            format!(
                "ready pods whose /metrics do not answer: {} ({why})",
                list(unreadable)
            ),
        );
    }
    let readings = || {
        samples
            .iter()
            .filter_map(|s| Some((s, s.reading.as_ref().ok()?)))
    };
    let down: Vec<&str> = readings()
        .filter(|(_, r)| !r.broker_up)
        .map(|(s, _)| s.name.as_str())
        .collect();
    if !down.is_empty() {
        return Verdict::new(
            false,
            "CanaryFailing",
            format!(
                "pods whose canary does not come back through the backplane (they re-subscribe, and are restarted after {} s): {}",
                RESTART_AFTER.as_secs(),
                list(down)
            ),
        );
    }
    let limit = f64::from(max_connections);
    let near: Vec<String> = readings()
        .filter(|(_, r)| r.connections >= NEAR_LIMIT * limit)
        .map(|(s, r)| format!("{} ({}/{max_connections})", s.name, whole(r.connections)))
        .collect();
    if !near.is_empty() {
        return Verdict::new(
            false,
            "ConnectionLimitNear",
            format!(
                "pods at {:.0} % or more of their connection limit (limits.maxConnectionsPerPod, or derived from the memory limit): {}",
                NEAR_LIMIT * 100.0,
                near.join(", ")
            ),
        );
    }
    let n = readings().count();
    Verdict::new(
        true,
        "AllPodsDelivering",
        format!("{n} server pods answer and deliver through the backplane"),
    )
}

/// Since when each pod's backplane has been down, and the last restart.
#[derive(Clone, Debug, Default)]
pub struct Repairs {
    pub down_since: HashMap<String, Instant>,
    pub last_restart: Option<Instant>,
}

impl Repairs {
    /// Follows the pods and names the one to restart, if any: down for
    /// [`RESTART_AFTER`] while the backplane works elsewhere
    /// (`backplane_works`: another pod delivers, or the operator reaches
    /// the master), and no restart within [`RESTART_SPACING`].
    pub fn next(
        &mut self,
        now: Instant,
        samples: &[PodSample],
        backplane_works: bool,
    ) -> Option<String> {
        let down: Vec<&str> = samples
            .iter()
            .filter(|s| s.reading.as_ref().is_ok_and(|r| !r.broker_up))
            .map(|s| s.name.as_str())
            .collect();
        self.down_since
            .retain(|name, _| down.contains(&name.as_str()));
        for name in &down {
            self.down_since.entry((*name).to_owned()).or_insert(now);
        }
        let another_delivers = samples
            .iter()
            .any(|s| s.reading.as_ref().is_ok_and(|r| r.broker_up));
        if !(another_delivers || backplane_works) {
            return None;
        }
        if self
            .last_restart
            .is_some_and(|at| now.duration_since(at) < RESTART_SPACING)
        {
            return None;
        }
        let (name, _) = self
            .down_since
            .iter()
            .filter(|(_, since)| now.duration_since(**since) >= RESTART_AFTER)
            .min_by_key(|(name, since)| (**since, (*name).clone()))?;
        let name = name.clone();
        self.down_since.remove(&name);
        self.last_restart = Some(now);
        Some(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(connections: f64, delivered: f64, up: bool) -> Reading {
        Reading {
            connections,
            rooms: 2.0,
            delivered_total: delivered,
            slow_consumers_total: 1.0,
            broker_up: up,
            canary_rtt_seconds: Some(0.0015),
            latency_buckets: vec![
                (0.001, delivered * 0.5),
                (0.01, delivered),
                (f64::INFINITY, delivered),
            ],
        }
    }

    fn sample(name: &str, r: Result<Reading, String>) -> PodSample {
        PodSample {
            name: name.to_owned(),
            ready: true,
            reading: r,
            broker_down: None,
        }
    }

    #[test]
    fn quantile_interpolates_inside_the_bucket_like_promql() {
        let buckets = [(0.001, 50.0), (0.01, 100.0), (f64::INFINITY, 100.0)];
        // Rank 99 of 100: 49/50 of the way through the 1–10 ms bucket.
        let q = quantile(0.99, &buckets).expect("observations");
        assert!((q - (0.001 + 0.009 * 49.0 / 50.0)).abs() < 1e-12, "{q}");
        assert_eq!(quantile(0.5, &buckets), Some(0.001));
        assert_eq!(quantile(0.99, &[(0.001, 0.0), (f64::INFINITY, 0.0)]), None);
        // Beyond the last finite bound: that bound.
        assert_eq!(
            quantile(0.99, &[(0.001, 1.0), (f64::INFINITY, 10.0)]),
            Some(0.001)
        );
    }

    #[test]
    fn human_durations() {
        assert_eq!(human_seconds(0.000_85), "850µs");
        assert_eq!(human_seconds(0.0025), "2.5ms");
        assert_eq!(human_seconds(1.2), "1.20s");
    }

    #[test]
    fn summary_adds_pods_and_takes_rates_over_the_interval() {
        let t0 = Instant::now();
        let first = [
            sample("chat-b", Ok(reading(10.0, 100.0, true))),
            sample("chat-a", Ok(reading(5.0, 50.0, true))),
        ];
        let s0 = summarize(&Previous::default(), t0, &first);
        assert_eq!((s0.connections, s0.rooms, s0.pods_reporting), (15, 4, 2));
        assert_eq!(s0.deliveries_per_second, 0, "no rate from one reading");
        assert_eq!(s0.delivery_p99, None);
        assert_eq!(s0.pods[0].name, "chat-a", "sorted by name");
        let previous = Previous {
            at: Some(t0),
            readings: first
                .iter()
                .map(|s| (s.name.clone(), s.reading.clone().expect("reading")))
                .collect(),
        };
        let t1 = t0 + Duration::from_secs(10);
        let second = [
            sample("chat-a", Ok(reading(5.0, 150.0, true))),
            // Restarted: its counter went back; no negative rate.
            sample("chat-b", Ok(reading(1.0, 20.0, true))),
            sample("chat-c", Err("connection refused".to_owned())),
        ];
        let s1 = summarize(&previous, t1, &second);
        assert_eq!(s1.pods[0].deliveries_per_second, 10);
        assert_eq!(s1.pods[1].deliveries_per_second, 0);
        assert_eq!(s1.deliveries_per_second, 10);
        assert_eq!(s1.pods_reporting, 2);
        assert_eq!(s1.pods[2].error.as_deref(), Some("connection refused"));
        assert_eq!(s1.pods[0].canary_rtt.as_deref(), Some("1.5ms"));
        assert_eq!(s1.slow_consumers_dropped, 2);
        // chat-a: 100 new, half ≤ 1 ms; chat-b restarted: its 20, half ≤ 1 ms.
        assert!(
            s1.delivery_p99
                .as_deref()
                .is_some_and(|p| p.ends_with("ms")),
            "{s1:?}"
        );
    }

    #[test]
    fn a_pod_whose_backplane_is_down_says_why_in_the_summary() {
        let why = Some("broker kafka unavailable: metadata: timed out".to_owned());
        let down = PodSample {
            broker_down: why.clone(),
            ..sample("chat-a", Ok(reading(1.0, 1.0, false)))
        };
        // A reason read while it was down, from a pod up again: dropped.
        let up = PodSample {
            broker_down: why.clone(),
            ..sample("chat-b", Ok(reading(1.0, 1.0, true)))
        };
        let s = summarize(&Previous::default(), Instant::now(), &[down, up]);
        assert_eq!(
            (s.pods[0].broker_up, s.pods[0].broker_down.clone()),
            (false, why)
        );
        assert_eq!(
            (s.pods[1].broker_up, s.pods[1].broker_down.as_deref()),
            (true, None)
        );
    }

    #[test]
    fn health_names_the_first_problem_found() {
        let ok = [sample("a", Ok(reading(10.0, 0.0, true)))];
        assert_eq!(health(&ok, 100).reason, "AllPodsDelivering");
        let near = [sample("a", Ok(reading(95.0, 0.0, true)))];
        let v = health(&near, 100);
        assert_eq!((v.ok, v.reason), (false, "ConnectionLimitNear"));
        assert!(v.message.contains("a (95/100)"), "{}", v.message);
        let down = [
            sample("a", Ok(reading(10.0, 0.0, true))),
            sample("b", Ok(reading(10.0, 0.0, false))),
        ];
        let v = health(&down, 100);
        assert_eq!((v.ok, v.reason), (false, "CanaryFailing"));
        assert!(v.message.ends_with(": b"), "{}", v.message);
        let mut unreadable = sample("c", Err("timed out".to_owned()));
        let v = health(std::slice::from_ref(&unreadable), 100);
        assert_eq!((v.ok, v.reason), (false, "MetricsUnreachable"));
        // A pod not ready yet may not answer.
        unreadable.ready = false;
        assert!(health(&[unreadable], 100).ok);
    }

    #[test]
    fn a_pod_is_restarted_only_after_a_minute_down_while_others_deliver() {
        let t0 = Instant::now();
        let mut repairs = Repairs::default();
        let fleet = |b_up: bool, a_up: bool| {
            vec![
                sample("a", Ok(reading(1.0, 0.0, a_up))),
                sample("b", Ok(reading(1.0, 0.0, b_up))),
            ]
        };
        assert_eq!(repairs.next(t0, &fleet(false, true), false), None);
        // Back up in between: the clock starts again.
        let t1 = t0 + Duration::from_secs(30);
        assert_eq!(repairs.next(t1, &fleet(true, true), false), None);
        let t2 = t1 + Duration::from_secs(15);
        assert_eq!(repairs.next(t2, &fleet(false, true), false), None);
        let t3 = t2 + RESTART_AFTER;
        // Every pod down: the backplane, not the pod (unless the operator
        // reaches the master itself).
        assert_eq!(repairs.next(t3, &fleet(false, false), false), None);
        assert_eq!(
            repairs.next(t3, &fleet(false, true), false),
            Some("b".to_owned())
        );
        // Spaced: a second pod down as long waits.
        let t4 = t3 + Duration::from_secs(1);
        assert_eq!(repairs.next(t4, &fleet(true, false), true), None);
        let t5 = t3 + RESTART_SPACING + RESTART_AFTER;
        assert_eq!(
            repairs.next(t5, &fleet(true, false), true),
            Some("a".to_owned())
        );
    }
}
