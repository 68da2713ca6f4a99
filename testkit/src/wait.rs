//! Waiting for a condition: poll it until it holds or a deadline passes.
//! Nothing here sleeps a fixed time before looking.

use std::time::Duration;

use tokio::time::Instant;

use crate::{Error, Result};

/// Pause between two looks at a condition.
pub const POLL: Duration = Duration::from_millis(20);

/// Polls `check` every [`POLL`] until it returns `Some`, for at most `limit`.
pub async fn until<T>(
    what: &str,
    limit: Duration,
    check: impl AsyncFnMut() -> Option<T>,
) -> Result<T> {
    until_every(what, limit, POLL, check).await
}

/// [`until`] with another pause: checks that cost more (a reconcile pass
/// against a whole group) look less often.
pub async fn until_every<T>(
    what: &str,
    limit: Duration,
    every: Duration,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> Result<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: what.to_owned(),
                waited: limit,
                log: String::new(),
            });
        }
        tokio::time::sleep(every).await;
    }
}
