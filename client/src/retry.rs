//! Read-only calls refused for load are tried again. The gateway answers a caller over
//! its request rate, or a gateway over its in-flight cap, `RESOURCE_EXHAUSTED` with a
//! `google.rpc.RetryInfo` detail saying how long to wait; for calls that change nothing
//! (whoami, list, result, logs) the CLI waits that long and asks again, like client-go
//! does for a `Retry-After`. Commands are never re-sent: a second invoke would be a
//! second command.

use std::future::Future;
use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::StatusExt;

/// Most attempts of one call, the first included.
const MAX_ATTEMPTS: u32 = 5;

/// Longest single wait the CLI accepts from a hint; a longer one is reported instead.
const MAX_WAIT: Duration = Duration::from_secs(10);

/// How long the gateway asks the caller to wait before trying `status`'s call again,
/// when it says so.
pub fn retry_after(status: &Status) -> Option<Duration> {
    if status.code() != Code::ResourceExhausted {
        return None;
    }
    status.get_details_retry_info()?.retry_delay
}

/// Runs `call` on a clone of `client` with a clone of `request`, and again after each
/// hinted wait while the gateway refuses it for load.
pub async fn read<C, R, T, F, Fut>(client: &C, request: &R, mut call: F) -> Result<T, Status>
where
    C: Clone,
    R: Clone,
    F: FnMut(C, R) -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    let mut attempt = 1;
    loop {
        match call(client.clone(), request.clone()).await {
            Err(status) if attempt < MAX_ATTEMPTS => match retry_after(&status) {
                Some(wait) if wait <= MAX_WAIT => {
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                _ => return Err(status),
            },
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_types::ErrorDetails;

    fn exhausted(after: Duration) -> Status {
        Status::with_error_details(
            Code::ResourceExhausted,
            "slow down",
            ErrorDetails::with_retry_info(Some(after)),
        )
    }

    #[tokio::test]
    async fn a_hinted_refusal_is_tried_again_and_others_are_not() {
        let mut calls = 0;
        let got = read(&(), &(), |(), ()| {
            calls += 1;
            let n = calls;
            async move {
                if n < 3 {
                    Err(exhausted(Duration::from_millis(1)))
                } else {
                    Ok(n)
                }
            }
        })
        .await;
        assert_eq!(got.unwrap(), 3);

        let mut calls = 0;
        let refused: Result<(), Status> = read(&(), &(), |(), ()| {
            calls += 1;
            async { Err(Status::resource_exhausted("no hint")) }
        })
        .await;
        assert_eq!(refused.unwrap_err().message(), "no hint");
        assert_eq!(calls, 1);
    }

    #[tokio::test]
    async fn attempts_and_waits_are_bounded() {
        let mut calls = 0;
        let refused: Result<(), Status> = read(&(), &(), |(), ()| {
            calls += 1;
            async { Err(exhausted(Duration::from_millis(1))) }
        })
        .await;
        assert!(refused.is_err());
        assert_eq!(calls, MAX_ATTEMPTS);

        let mut calls = 0;
        let _ = read(&(), &(), |(), ()| {
            calls += 1;
            async { Err::<(), _>(exhausted(Duration::from_secs(60))) }
        })
        .await;
        assert_eq!(calls, 1, "a wait over MAX_WAIT is reported, not slept");
    }
}
