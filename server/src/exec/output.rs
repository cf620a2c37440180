//! A running command's combined output: the first `max` bytes are kept for the result,
//! every byte is counted, and live followers get chunks through a bounded channel so a
//! slow follower loses chunks (and is told how many bytes) instead of growing memory.

use std::sync::Mutex;

use bytes::Bytes;
use tokio::sync::broadcast;

/// Chunks buffered per command for live followers before the slowest one lags.
const FOLLOW_BUFFER_CHUNKS: usize = 64;

/// A piece of output at a known position.
#[derive(Debug, Clone)]
pub struct Chunk {
    /// Position of the first byte in the output stream.
    pub offset: u64,
    /// The bytes.
    pub data: Bytes,
}

/// What a follower starts from: the retained prefix, the count so far, and the live feed.
pub struct Subscription {
    /// Kept output so far (at most the limit).
    pub retained: Vec<u8>,
    /// Bytes written so far, kept or not.
    pub total: u64,
    /// Later chunks; closed once the command ended.
    pub live: broadcast::Receiver<Chunk>,
}

/// Kept output and its final size, once the command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinalOutput {
    /// Kept output, at most the limit.
    pub data: Vec<u8>,
    /// Bytes written in all.
    pub total: u64,
    /// SHA-256 (hex) of every byte written, once the output is closed.
    pub sha256: Option<String>,
}

impl FinalOutput {
    /// True when output was cut at the limit.
    pub fn truncated(&self) -> bool {
        self.total > self.data.len() as u64
    }
}

/// Output of one command: capped retained buffer plus a live feed.
#[derive(Debug)]
pub struct OutputLog {
    max: usize,
    inner: Mutex<Inner>,
}

struct Inner {
    retained: Vec<u8>,
    total: u64,
    live: Option<broadcast::Sender<Chunk>>,
    // over all bytes, kept or not: the audit records it instead of the output
    digest: ring::digest::Context,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("retained", &self.retained.len())
            .field("total", &self.total)
            .finish_non_exhaustive()
    }
}

impl OutputLog {
    /// An empty log that keeps at most `max` bytes.
    pub fn new(max: usize) -> Self {
        let (tx, _) = broadcast::channel(FOLLOW_BUFFER_CHUNKS);
        Self {
            max,
            inner: Mutex::new(Inner {
                retained: Vec::new(),
                total: 0,
                live: Some(tx),
                digest: ring::digest::Context::new(&ring::digest::SHA256),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // a panic while holding this lock leaves consistent data (appends are atomic
        // under it), so a poisoned lock is safe to keep using
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds bytes the command wrote.
    pub fn append(&self, data: &[u8]) {
        let mut inner = self.lock();
        let offset = inner.total;
        inner.total += data.len() as u64;
        inner.digest.update(data);
        let room = self.max.saturating_sub(inner.retained.len());
        let keep = room.min(data.len());
        inner.retained.extend_from_slice(&data[..keep]);
        if let Some(tx) = &inner.live {
            // copy only when someone follows; with no receiver, send would just fail
            if tx.receiver_count() > 0 {
                let _ = tx.send(Chunk {
                    offset,
                    data: Bytes::copy_from_slice(data),
                });
            }
        }
    }

    /// How many followers receive the live feed now.
    pub fn followers(&self) -> usize {
        self.lock()
            .live
            .as_ref()
            .map_or(0, broadcast::Sender::receiver_count)
    }

    /// Starts following: the kept prefix and count, and the live feed from here on.
    pub fn subscribe(&self) -> Subscription {
        let inner = self.lock();
        let live = match &inner.live {
            Some(tx) => tx.subscribe(),
            None => {
                // already closed: a receiver that reports Closed at once
                let (tx, rx) = broadcast::channel(1);
                drop(tx);
                rx
            }
        };
        Subscription {
            retained: inner.retained.clone(),
            total: inner.total,
            live,
        }
    }

    /// Bytes written so far.
    pub fn total(&self) -> u64 {
        self.lock().total
    }

    /// A copy of what is kept so far.
    pub fn snapshot(&self) -> FinalOutput {
        let inner = self.lock();
        FinalOutput {
            data: inner.retained.clone(),
            total: inner.total,
            sha256: None,
        }
    }

    /// Ends the live feed (followers drain and then see Closed) and returns the output.
    pub fn close(&self) -> FinalOutput {
        let mut inner = self.lock();
        inner.live = None;
        let digest = std::mem::replace(
            &mut inner.digest,
            ring::digest::Context::new(&ring::digest::SHA256),
        );
        FinalOutput {
            // kept (not taken): a follower that subscribes after close still gets it
            data: inner.retained.clone(),
            total: inner.total,
            sha256: Some(crate::hex::encode(digest.finish().as_ref())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_up_to_the_limit_and_counts_the_rest() {
        let log = OutputLog::new(5);
        log.append(b"abc");
        log.append(b"defgh");
        let out = log.close();
        assert_eq!(out.data, b"abcde");
        assert_eq!(out.total, 8);
        assert!(out.truncated());
        // the digest covers every byte, not just the kept ones
        assert_eq!(
            out.sha256.as_deref(),
            Some(
                crate::hex::encode(
                    ring::digest::digest(&ring::digest::SHA256, b"abcdefgh").as_ref()
                )
                .as_str()
            )
        );
    }

    #[tokio::test]
    async fn followers_see_every_chunk_in_order_then_closed() {
        let log = OutputLog::new(4);
        log.append(b"ab");
        let mut sub = log.subscribe();
        assert_eq!(sub.retained, b"ab");
        assert_eq!(sub.total, 2);
        log.append(b"cdef");
        log.close();
        let chunk = sub.live.recv().await.unwrap();
        assert_eq!((chunk.offset, &chunk.data[..]), (2, &b"cdef"[..]));
        assert!(matches!(
            sub.live.recv().await,
            Err(broadcast::error::RecvError::Closed)
        ));
    }

    #[tokio::test]
    async fn a_slow_follower_lags_instead_of_growing_memory() {
        let log = OutputLog::new(0);
        let mut sub = log.subscribe();
        for _ in 0..FOLLOW_BUFFER_CHUNKS + 10 {
            log.append(b"x");
        }
        assert!(matches!(
            sub.live.recv().await,
            Err(broadcast::error::RecvError::Lagged(10))
        ));
    }

    #[test]
    fn subscribing_after_close_reports_closed() {
        let log = OutputLog::new(4);
        log.append(b"hi");
        log.close();
        let mut sub = log.subscribe();
        assert!(matches!(
            sub.live.try_recv(),
            Err(broadcast::error::TryRecvError::Closed)
        ));
    }
}
