//! A log-linear latency histogram in microseconds: exact below 64 µs, then
//! 64 buckets per power of two (under 1.6 % error), mergeable across tasks.

const SUB: u64 = 64;
const SUB_BITS: u32 = 6;

#[derive(Debug, Clone, Default)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
    max: u64,
    sum: u128,
}

fn index(v: u64) -> usize {
    if v < SUB {
        return v as usize;
    }
    let e = 63 - v.leading_zeros(); // >= SUB_BITS
    let sub = (v >> (e - SUB_BITS)) - SUB;
    (SUB + u64::from(e - SUB_BITS) * SUB + sub) as usize
}

/// Midpoint of a bucket.
fn value(idx: usize) -> u64 {
    let idx = idx as u64;
    if idx < SUB {
        return idx;
    }
    let e = (idx - SUB) / SUB + u64::from(SUB_BITS);
    let sub = (idx - SUB) % SUB;
    let width = 1u64 << (e - u64::from(SUB_BITS));
    ((SUB + sub) << (e - u64::from(SUB_BITS))) + width / 2
}

impl Histogram {
    pub fn record(&mut self, us: u64) {
        let i = index(us);
        if i >= self.counts.len() {
            self.counts.resize(i + 1, 0);
        }
        self.counts[i] += 1;
        self.total += 1;
        self.max = self.max.max(us);
        self.sum += u128::from(us);
    }

    pub fn merge(&mut self, other: &Histogram) {
        if other.counts.len() > self.counts.len() {
            self.counts.resize(other.counts.len(), 0);
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
        self.max = self.max.max(other.max);
        self.sum += other.sum;
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    pub fn max(&self) -> u64 {
        self.max
    }

    pub fn mean(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.sum as f64 / self.total as f64
        }
    }

    /// The value at quantile `q` (0..=1), in µs.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        if rank == self.total {
            return self.max;
        }
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return value(i).min(self.max);
            }
        }
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_within_two_percent() {
        let mut h = Histogram::default();
        for v in 1..=100_000u64 {
            h.record(v);
        }
        for (q, want) in [(0.5, 50_000.0), (0.9, 90_000.0), (0.99, 99_000.0)] {
            let got = h.quantile(q) as f64;
            assert!((got - want).abs() / want < 0.02, "q{q}: {got} vs {want}");
        }
        assert_eq!(h.max(), 100_000);
        assert_eq!(h.quantile(1.0), 100_000);
    }

    #[test]
    fn small_values_are_exact_and_merge_adds() {
        let mut a = Histogram::default();
        let mut b = Histogram::default();
        a.record(3);
        b.record(7);
        b.record(7);
        a.merge(&b);
        assert_eq!(a.count(), 3);
        assert_eq!(a.quantile(0.5), 7);
        assert_eq!(a.quantile(0.1), 3);
        for v in [0, 1, 63, 64, 65, 127, 128, 1000, 123_456_789] {
            let got = value(index(v));
            assert!(got.abs_diff(v) <= v / 60 + 1, "{v} -> {got}");
        }
    }
}
