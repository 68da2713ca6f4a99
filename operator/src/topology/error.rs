use super::model::NodeAddr;

/// Everything that can go wrong in this module.
///
/// Only [`TopologyError::InvalidConfig`] is returned by
/// [`reconcile_topology`](super::reconcile_topology): the other variants
/// describe one member and end up as text in the report (an unreachable pod
/// or a failed action), because one dead pod must not stop the rest.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("invalid topology config: {reason}")]
    InvalidConfig { reason: String },

    #[error("connect to {addr}: {source}")]
    Connect {
        addr: NodeAddr,
        #[source]
        source: redis::RedisError,
    },

    #[error("{addr}: {command} timed out after {timeout_ms} ms")]
    Timeout {
        addr: NodeAddr,
        command: &'static str,
        timeout_ms: u128,
    },

    #[error("{addr}: {command}: {source}")]
    Command {
        addr: NodeAddr,
        command: &'static str,
        #[source]
        source: redis::RedisError,
    },

    #[error("{addr}: unexpected reply to {command}: {detail}")]
    Reply {
        addr: NodeAddr,
        command: &'static str,
        detail: String,
    },
}

impl TopologyError {
    /// A short stable label (metrics, event reasons).
    pub fn label(&self) -> &'static str {
        match self {
            TopologyError::InvalidConfig { .. } => "invalid_config",
            TopologyError::Connect { .. } => "connect",
            TopologyError::Timeout { .. } => "timeout",
            TopologyError::Command { .. } => "command",
            TopologyError::Reply { .. } => "reply",
        }
    }
}
