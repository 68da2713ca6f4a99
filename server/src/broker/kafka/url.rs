//! `--broker kafka://host:port[,host:port…]/<topic>`.

/// Where the Kafka cluster is and which topic carries the rooms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaUrl {
    /// `host:port` of some of the cluster's brokers.
    pub servers: Vec<String>,
    pub topic: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("a Kafka URL is kafka://host:port[,host:port…]/<topic>, not `{0}`")]
    Shape(String),
    #[error("`{0}` is not host:port")]
    Server(String),
    #[error("`{0}` is not a Kafka topic name (1 to 249 of [A-Za-z0-9._-])")]
    Topic(String),
}

impl KafkaUrl {
    pub fn parse(url: &str) -> Result<Self, UrlError> {
        let shape = || UrlError::Shape(url.to_owned());
        let rest = url.strip_prefix("kafka://").ok_or_else(shape)?;
        let (servers, topic) = rest.split_once('/').ok_or_else(shape)?;
        let servers = servers
            .split(',')
            .map(|s| {
                let (host, port) = s.rsplit_once(':').ok_or(UrlError::Server(s.to_owned()))?;
                if host.is_empty() || port.parse::<u16>().is_err() {
                    return Err(UrlError::Server(s.to_owned()));
                }
                Ok(s.to_owned())
            })
            .collect::<Result<Vec<_>, _>>()?;
        let valid = (1..=249).contains(&topic.len())
            && topic
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            && topic != "."
            && topic != "..";
        if !valid {
            return Err(UrlError::Topic(topic.to_owned()));
        }
        Ok(Self {
            servers,
            topic: topic.to_owned(),
        })
    }

    /// `bootstrap.servers`.
    pub fn bootstrap(&self) -> String {
        self.servers.join(",")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_servers_and_topic() {
        let url = KafkaUrl::parse("kafka://k1:9092,k2:9092/chorus.rooms").unwrap();
        assert_eq!(url.bootstrap(), "k1:9092,k2:9092");
        assert_eq!(url.topic, "chorus.rooms");
        for bad in [
            "kafka://k1:9092",
            "kafka://k1/rooms",
            "kafka://:9092/rooms",
            "kafka://k1:9092/",
            "kafka://k1:9092/a/b",
            "redis://k1:9092/rooms",
        ] {
            assert!(KafkaUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
