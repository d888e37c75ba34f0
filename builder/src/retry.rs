//! Retry policy for infrastructure faults.

use std::future::Future;
use std::time::Duration;

use crate::error::BuildError;
use crate::log::LogSink;

/// Exponential backoff for retryable ([`BuildError::is_retryable`]) failures.
/// User faults are returned at once.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Total attempts, including the first one (at least 1).
    pub max_attempts: u32,
    /// Delay before the second attempt.
    pub initial_backoff: Duration,
    /// Upper bound of a delay.
    pub max_backoff: Duration,
    /// Growth factor of the delay per attempt.
    pub multiplier: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            multiplier: 2.0,
        }
    }
}

impl RetryPolicy {
    /// No retries at all.
    pub fn none() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// The delay after failed attempt number `attempt` (1-based).
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .multiplier
            .max(1.0)
            .powi(attempt.saturating_sub(1).min(64) as i32);
        let secs = self.initial_backoff.as_secs_f64() * exp;
        Duration::from_secs_f64(secs.min(self.max_backoff.as_secs_f64()))
    }

    /// Run `op` until it succeeds, fails with a non-retryable error, or the
    /// attempts are used up. `op` gets the 1-based attempt number. Each retry
    /// is reported to `log`.
    pub async fn run<T, F, Fut>(
        &self,
        what: &str,
        log: &dyn LogSink,
        mut op: F,
    ) -> Result<T, BuildError>
    where
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<T, BuildError>>,
    {
        let attempts = self.max_attempts.max(1);
        let mut attempt = 1;
        loop {
            match op(attempt).await {
                Ok(v) => return Ok(v),
                Err(e) if e.is_retryable() && attempt < attempts => {
                    let delay = self.backoff(attempt);
                    log.builder(format!(
                        "retrying {what} (attempt {}/{attempts}) in {} ms after infrastructure fault: {e}",
                        attempt + 1,
                        delay.as_millis()
                    ));
                    tracing::warn!(what, attempt, error = %e, "retrying after infrastructure fault");
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{InputError, Stage};
    use crate::log::MemoryLog;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn fast() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 4,
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(4),
            multiplier: 2.0,
        }
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(350),
            multiplier: 2.0,
        };
        assert_eq!(p.backoff(1), Duration::from_millis(100));
        assert_eq!(p.backoff(2), Duration::from_millis(200));
        assert_eq!(p.backoff(3), Duration::from_millis(350));
        assert_eq!(p.backoff(60), Duration::from_millis(350));
    }

    #[tokio::test]
    async fn infrastructure_faults_are_retried_until_success() {
        let calls = AtomicU32::new(0);
        let log = MemoryLog::new();
        let out = fast()
            .run("op", &log, |attempt| {
                calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    if attempt < 3 {
                        Err(BuildError::infra(
                            Stage::Upload,
                            "store down",
                            std::io::Error::other("refused"),
                        ))
                    } else {
                        Ok(attempt)
                    }
                }
            })
            .await
            .expect("third attempt succeeds");
        assert_eq!(out, 3);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(
            log.lines()
                .iter()
                .filter(|l| l.text.starts_with("retrying op"))
                .count(),
            2
        );
    }

    #[tokio::test]
    async fn attempts_are_bounded() {
        let calls = AtomicU32::new(0);
        let err = fast()
            .run("op", &crate::log::NullLog, |_| {
                calls.fetch_add(1, Ordering::SeqCst);
                async {
                    Err::<(), _>(BuildError::infra(
                        Stage::Build,
                        "crash",
                        std::io::Error::other("x"),
                    ))
                }
            })
            .await
            .unwrap_err();
        assert!(err.is_retryable());
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn user_faults_fail_at_once() {
        let calls = AtomicU32::new(0);
        let err = fast()
            .run("op", &crate::log::NullLog, |_| {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Err::<(), _>(BuildError::Input(InputError::InvalidBuildArg("x".into()))) }
            })
            .await
            .unwrap_err();
        assert_eq!(err.fault(), crate::error::FaultKind::User);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
