//! A running command's combined output: its head and its tail are kept for the result
//! (together at most `max` bytes, split as configured, so a long run keeps its final
//! error line as well as its start), every byte is counted, and live followers get
//! chunks through a bounded channel so a slow follower loses chunks (and is told how
//! many bytes) instead of growing memory.

use std::collections::VecDeque;
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
    /// The kept output that runs unbroken from the first byte: all of it while nothing
    /// was left out, else the head.
    pub retained: Vec<u8>,
    /// Bytes written so far, kept or not.
    pub total: u64,
    /// Later chunks; closed once the command ended.
    pub live: broadcast::Receiver<Chunk>,
}

/// Kept output and its final size, once the command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinalOutput {
    /// Kept output: all of it, or when it was longer than the limit its head, one
    /// marker line saying how many bytes were left out, and its tail.
    pub data: Vec<u8>,
    /// Bytes written in all.
    pub total: u64,
    /// True when bytes were left out.
    pub truncated: bool,
    /// SHA-256 (hex) of every byte written, once the output is closed.
    pub sha256: Option<String>,
}

/// The line that stands where output was left out (its own line: a newline first when
/// the head does not end with one).
pub fn omission_marker(head_ends_line: bool, left_out: u64) -> Vec<u8> {
    let start = if head_ends_line { "" } else { "\n" };
    format!(
        "{start}[kinvoke: {left_out} bytes of output left out here (limits.max_output_bytes)]\n"
    )
    .into_bytes()
}

/// Output of one command: capped head and tail plus a live feed.
#[derive(Debug)]
pub struct OutputLog {
    head_max: usize,
    tail_max: usize,
    inner: Mutex<Inner>,
}

struct Inner {
    head: Vec<u8>,
    /// The latest bytes after the head, at most `tail_max`.
    tail: VecDeque<u8>,
    /// Bytes between head and tail no longer kept.
    left_out: u64,
    total: u64,
    live: Option<broadcast::Sender<Chunk>>,
    // over all bytes, kept or not: the audit records it instead of the output
    digest: ring::digest::Context,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("head", &self.head.len())
            .field("tail", &self.tail.len())
            .field("left_out", &self.left_out)
            .field("total", &self.total)
            .finish_non_exhaustive()
    }
}

impl OutputLog {
    /// An empty log that keeps at most `max` bytes, all of them the head.
    pub fn new(max: usize) -> Self {
        Self::with_head(max, max)
    }

    /// An empty log that keeps at most `max` bytes: up to `head` of the first ones and
    /// the rest of the last ones (`head` is capped at `max`).
    pub fn with_head(max: usize, head: usize) -> Self {
        let (tx, _) = broadcast::channel(FOLLOW_BUFFER_CHUNKS);
        let head_max = head.min(max);
        Self {
            head_max,
            tail_max: max - head_max,
            inner: Mutex::new(Inner {
                head: Vec::new(),
                tail: VecDeque::new(),
                left_out: 0,
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
        let room = self.head_max.saturating_sub(inner.head.len());
        let (to_head, rest) = data.split_at(room.min(data.len()));
        inner.head.extend_from_slice(to_head);
        // only the last tail_max bytes of the rest can stay
        let skip = rest.len().saturating_sub(self.tail_max);
        inner.left_out += skip as u64;
        inner.tail.extend(&rest[skip..]);
        let over = inner.tail.len().saturating_sub(self.tail_max);
        if over > 0 {
            inner.tail.drain(..over);
            inner.left_out += over as u64;
        }
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
            retained: inner.prefix(),
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
            data: inner.kept(),
            total: inner.total,
            truncated: inner.left_out > 0,
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
            data: inner.kept(),
            total: inner.total,
            truncated: inner.left_out > 0,
            sha256: Some(crate::hex::encode(digest.finish().as_ref())),
        }
    }
}

impl Inner {
    /// The kept bytes that run unbroken from offset 0.
    fn prefix(&self) -> Vec<u8> {
        let mut out = self.head.clone();
        if self.left_out == 0 {
            out.extend(self.tail.iter());
        }
        out
    }

    /// Head, the marker when bytes were left out, and tail.
    fn kept(&self) -> Vec<u8> {
        if self.left_out == 0 {
            return self.prefix();
        }
        let mut out = self.head.clone();
        let ends_line = self.head.is_empty() || self.head.ends_with(b"\n");
        out.extend(omission_marker(ends_line, self.left_out));
        out.extend(self.tail.iter());
        out
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
        // with no tail, the marker ends the kept output
        assert_eq!(
            String::from_utf8(out.data).unwrap(),
            "abcde\n[kinvoke: 3 bytes of output left out here (limits.max_output_bytes)]\n"
        );
        assert_eq!(out.total, 8);
        assert!(out.truncated);
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

    #[test]
    fn head_and_tail_are_kept_with_a_marker_line_between_them() {
        let log = OutputLog::with_head(12, 6);
        log.append(b"line1\n");
        log.append(b"middle that is left out\n");
        log.append(b"ERROR\n");
        let out = log.close();
        assert!(out.truncated);
        assert_eq!(out.total, 36);
        assert_eq!(
            String::from_utf8(out.data).unwrap(),
            "line1\n[kinvoke: 24 bytes of output left out here (limits.max_output_bytes)]\nERROR\n"
        );
    }

    #[test]
    fn output_within_the_limit_is_kept_whole_and_unmarked() {
        let log = OutputLog::with_head(10, 5);
        log.append(b"abcdefg");
        log.append(b"hij");
        let out = log.close();
        assert!(!out.truncated);
        assert_eq!(out.data, b"abcdefghij");
        let sub = log.subscribe();
        assert_eq!(sub.retained, b"abcdefghij");
    }

    #[test]
    fn a_head_without_a_final_newline_gets_one_before_the_marker() {
        let log = OutputLog::with_head(4, 2);
        log.append(b"abcdefgh");
        let out = log.close();
        assert_eq!(
            String::from_utf8(out.data).unwrap(),
            "ab\n[kinvoke: 4 bytes of output left out here (limits.max_output_bytes)]\ngh"
        );
        // a late follower gets the unbroken head only; the rest comes as a gap
        assert_eq!(log.subscribe().retained, b"ab");
    }
}
