//! One server pod's `/metrics`, parsed into the figures the operator
//! reads (pure).
//!
//! The exposition is the text format (Prometheus 0.0.4 or OpenMetrics):
//! `name{label="value",…} value [timestamp]` lines, `#` lines for help and
//! types. Series of one name with different labels are summed (a counter
//! split by reason counts every reason); the latency histogram keeps its
//! buckets.

/// What a pod reports.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Reading {
    /// `chorus_connections`.
    pub connections: f64,
    /// `chorus_rooms`.
    pub rooms: f64,
    /// `chorus_messages_delivered_total`.
    pub delivered_total: f64,
    /// `chorus_slow_consumers_dropped_total`.
    pub slow_consumers_total: f64,
    /// `chorus_broker_up` is 1: its canary comes back through the backplane.
    pub broker_up: bool,
    /// `chorus_redis_canary_rtt_seconds`, when a canary has come back (the
    /// in-memory broker has none).
    pub canary_rtt_seconds: Option<f64>,
    /// `chorus_delivery_latency_seconds_bucket`: `(le, cumulative count)`
    /// by `le`, `+Inf` last.
    pub latency_buckets: Vec<(f64, f64)>,
}

/// The text is not a Chorus server's metrics.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ParseError {
    #[error("line {line}: {why}")]
    Malformed { line: usize, why: &'static str },
    #[error("no {0} series: not a Chorus server")]
    Missing(&'static str),
}

/// One sample line: its name, its `le` label if any, its value.
fn sample(line: &str) -> Result<(&str, Option<&str>, f64), &'static str> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_ascii_whitespace())
        .ok_or("no value")?;
    let name = &line[..name_end];
    let mut rest = &line[name_end..];
    let mut le = None;
    if let Some(labels) = rest.strip_prefix('{') {
        // Label values are quoted and may hold `}`, `,` and escaped quotes.
        let mut in_quotes = false;
        let mut escaped = false;
        let mut close = None;
        for (i, c) in labels.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' if in_quotes => escaped = true,
                '"' => in_quotes = !in_quotes,
                '}' if !in_quotes => {
                    close = Some(i);
                    break;
                }
                _ => {}
            }
        }
        let close = close.ok_or("unclosed labels")?;
        le = labels[..close]
            .split(',')
            .filter_map(|pair| pair.trim().strip_prefix("le="))
            .map(|v| v.trim_matches('"'))
            .next();
        rest = &labels[close + 1..];
    }
    let value = rest.split_ascii_whitespace().next().ok_or("no value")?;
    let value = parse_number(value).ok_or("value is not a number")?;
    Ok((name, le, value))
}

fn parse_number(text: &str) -> Option<f64> {
    match text {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        _ => text.parse().ok(),
    }
}

/// Reads the figures out of a `/metrics` answer.
pub fn parse(text: &str) -> Result<Reading, ParseError> {
    let mut r = Reading::default();
    let mut seen_connections = false;
    let mut seen_broker = false;
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, le, value) =
            sample(line).map_err(|why| ParseError::Malformed { line: i + 1, why })?;
        match name {
            "chorus_connections" => {
                seen_connections = true;
                r.connections += value;
            }
            "chorus_rooms" => r.rooms += value,
            "chorus_messages_delivered_total" => r.delivered_total += value,
            "chorus_slow_consumers_dropped_total" => r.slow_consumers_total += value,
            "chorus_broker_up" => {
                seen_broker = true;
                r.broker_up = value >= 1.0;
            }
            "chorus_redis_canary_rtt_seconds" if value > 0.0 => {
                r.canary_rtt_seconds = Some(value);
            }
            "chorus_delivery_latency_seconds_bucket" => {
                let le = le.and_then(parse_number).ok_or(ParseError::Malformed {
                    line: i + 1,
                    why: "bucket without a numeric le",
                })?;
                match r.latency_buckets.iter_mut().find(|(b, _)| *b == le) {
                    Some((_, count)) => *count += value,
                    None => r.latency_buckets.push((le, value)),
                }
            }
            _ => {}
        }
    }
    if !seen_connections {
        return Err(ParseError::Missing("chorus_connections"));
    }
    if !seen_broker {
        return Err(ParseError::Missing("chorus_broker_up"));
    }
    r.latency_buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
# HELP chorus_connections Open WebSocket connections.
# TYPE chorus_connections gauge
chorus_connections 42
chorus_rooms 7
chorus_messages_delivered_total 1000
chorus_slow_consumers_dropped_total 2
chorus_delivery_latency_seconds_bucket{le=\"0.001\"} 90
chorus_delivery_latency_seconds_bucket{le=\"0.01\"} 99
chorus_delivery_latency_seconds_bucket{le=\"+Inf\"} 100
chorus_broker_up 1
chorus_redis_canary_rtt_seconds 0.0012
chorus_connections_refused_total{reason=\"limit\"} 3
# EOF
";

    #[test]
    fn reads_the_figures_of_a_server() {
        let r = parse(SAMPLE).expect("parses");
        assert_eq!(r.connections, 42.0);
        assert_eq!(r.rooms, 7.0);
        assert_eq!(r.delivered_total, 1000.0);
        assert_eq!(r.slow_consumers_total, 2.0);
        assert!(r.broker_up);
        assert_eq!(r.canary_rtt_seconds, Some(0.0012));
        assert_eq!(
            r.latency_buckets,
            vec![(0.001, 90.0), (0.01, 99.0), (f64::INFINITY, 100.0)]
        );
    }

    #[test]
    fn sums_series_split_by_label_and_keeps_buckets_by_le() {
        let text = "chorus_connections 1\nchorus_broker_up 0\n\
            chorus_slow_consumers_dropped_total{reason=\"queue\"} 2\n\
            chorus_slow_consumers_dropped_total{reason=\"timeout\"} 3\n\
            chorus_delivery_latency_seconds_bucket{kind=\"a,}\\\"b\",le=\"0.5\"} 4 1700000000\n\
            chorus_redis_canary_rtt_seconds 0.0\n";
        let r = parse(text).expect("parses");
        assert_eq!(r.slow_consumers_total, 5.0);
        assert_eq!(r.latency_buckets, vec![(0.5, 4.0)]);
        assert!(!r.broker_up);
        assert_eq!(
            r.canary_rtt_seconds, None,
            "0 means no canary came back yet"
        );
    }

    #[test]
    fn refuses_what_is_not_a_chorus_server() {
        assert_eq!(
            parse("<html>hello</html>\n"),
            Err(ParseError::Malformed {
                line: 1,
                why: "no value"
            })
        );
        assert_eq!(
            parse("up 1\n"),
            Err(ParseError::Missing("chorus_connections"))
        );
        assert_eq!(
            parse("chorus_connections{a=\"b\" 1\n"),
            Err(ParseError::Malformed {
                line: 1,
                why: "unclosed labels"
            })
        );
        assert_eq!(
            parse("chorus_connections lots\n"),
            Err(ParseError::Malformed {
                line: 1,
                why: "value is not a number"
            })
        );
    }
}
