//! Admission limits per principal, so one caller cannot take the gateway from the
//! others: a request rate (a token bucket per principal, GCRA from the `governor`
//! crate) checked after authentication on every RPC, and a number of commands running
//! at once per principal, checked when a command is admitted ([`KeyedSlots`], which
//! the relay and the listeners use for their own per-key caps too). A refusal carries how
//! long to wait, which the service puts in the status as a `google.rpc.RetryInfo`.

use std::collections::HashMap;
use std::hash::Hash;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

/// Known principals kept in the rate limiter before idle ones are forgotten.
const RATE_KEYS_BEFORE_PRUNE: usize = 10_000;

/// How long a caller refused for concurrency is told to wait: commands end at their
/// own pace, so this is a polite polling interval rather than a promise.
pub const CONCURRENCY_RETRY: Duration = Duration::from_secs(1);

/// A principal sent requests faster than `limits.requests_per_second_per_principal`
/// allows, after its `limits.request_burst_per_principal` was spent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "principal \"{principal}\" sends requests faster than this gateway allows \
     (limits.requests_per_second_per_principal = {per_second}, \
     limits.request_burst_per_principal = {burst}); retry in {}",
    humantime::format_duration(*.retry_after)
)]
pub struct RateLimited {
    /// Who.
    pub principal: String,
    /// The configured rate.
    pub per_second: u32,
    /// The configured burst.
    pub burst: u32,
    /// When a request would next be admitted.
    pub retry_after: Duration,
}

/// Requests per principal: a token bucket each, refilled at `per_second`, holding at
/// most `burst`.
pub struct RequestRate {
    limiter: DefaultKeyedRateLimiter<String>,
    clock: DefaultClock,
    per_second: u32,
    burst: u32,
}

impl std::fmt::Debug for RequestRate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestRate")
            .field("per_second", &self.per_second)
            .field("burst", &self.burst)
            .finish_non_exhaustive()
    }
}

impl RequestRate {
    /// A limiter admitting `per_second` requests a second per principal, `burst` at
    /// once. Zero values are raised to 1 (the config refuses them before this).
    pub fn new(per_second: u32, burst: u32) -> Self {
        let rate = NonZeroU32::new(per_second).unwrap_or(NonZeroU32::MIN);
        let size = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
        let clock = DefaultClock::default();
        Self {
            limiter: governor::RateLimiter::dashmap_with_clock(
                Quota::per_second(rate).allow_burst(size),
                clock.clone(),
            ),
            clock,
            per_second: rate.get(),
            burst: size.get(),
        }
    }

    /// Takes one request from `principal`'s bucket, or says when one would be admitted.
    pub fn check(&self, principal: &str) -> Result<(), RateLimited> {
        if self.limiter.len() > RATE_KEYS_BEFORE_PRUNE {
            // principals whose buckets are full again cost nothing to forget
            self.limiter.retain_recent();
        }
        self.limiter
            .check_key(&principal.to_owned())
            .map_err(|not_until| RateLimited {
                principal: principal.to_owned(),
                per_second: self.per_second,
                burst: self.burst,
                // whole milliseconds, rounded up: a readable hint that is never early
                retry_after: Duration::from_millis(
                    u64::try_from(
                        not_until
                            .wait_time_from(self.clock.now())
                            .as_micros()
                            .div_ceil(1000),
                    )
                    .unwrap_or(u64::MAX),
                ),
            })
    }
}

/// At most `limit` of something at once per key: commands per principal, relay requests
/// per command, connections per source address. A place is held by its
/// [`KeyedPermit`] and given back when that is dropped; keys with nothing held take no
/// memory.
#[derive(Debug)]
pub struct KeyedSlots<K: Hash + Eq + Clone> {
    limit: usize,
    held: Arc<Mutex<HashMap<K, usize>>>,
}

/// One place in a [`KeyedSlots`]; given back on drop.
#[derive(Debug)]
pub struct KeyedPermit<K: Hash + Eq + Clone> {
    key: K,
    held: Arc<Mutex<HashMap<K, usize>>>,
}

/// Commands running at once per principal.
pub type PrincipalSlots = KeyedSlots<String>;

/// One running command's place in its principal's count.
pub type PrincipalPermit = KeyedPermit<String>;

fn lock<K>(held: &Mutex<HashMap<K, usize>>) -> std::sync::MutexGuard<'_, HashMap<K, usize>> {
    held.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl<K: Hash + Eq + Clone> KeyedSlots<K> {
    /// At most `limit` places per key.
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            held: Arc::default(),
        }
    }

    /// The configured limit.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// A place for `key`, or `None` when it holds `limit` already.
    pub fn try_acquire(&self, key: &K) -> Option<KeyedPermit<K>> {
        let mut held = lock(&self.held);
        let count = held.entry(key.clone()).or_insert(0);
        if *count >= self.limit {
            return None;
        }
        *count += 1;
        Some(KeyedPermit {
            key: key.clone(),
            held: self.held.clone(),
        })
    }

    /// Places `key` holds now.
    pub fn held(&self, key: &K) -> usize {
        lock(&self.held).get(key).copied().unwrap_or(0)
    }

    /// Keys holding at least one place.
    pub fn keys(&self) -> usize {
        lock(&self.held).len()
    }
}

impl<K: Hash + Eq + Clone> Drop for KeyedPermit<K> {
    fn drop(&mut self) {
        let mut held = lock(&self.held);
        if let Some(count) = held.get_mut(&self.key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                held.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_principal_gets_its_burst_then_waits_while_others_are_not_affected() {
        let rate = RequestRate::new(1, 3);
        for _ in 0..3 {
            rate.check("alice").unwrap();
        }
        let refused = rate.check("alice").unwrap_err();
        assert!(
            refused.retry_after > Duration::ZERO && refused.retry_after <= Duration::from_secs(1),
            "{refused:?}"
        );
        assert!(refused.to_string().contains("retry in"), "{refused}");
        assert!(
            refused
                .to_string()
                .contains("limits.requests_per_second_per_principal = 1"),
            "{refused}"
        );
        rate.check("bob").unwrap();
    }

    #[test]
    fn a_principal_runs_at_most_its_limit_and_a_finished_command_frees_a_place() {
        let slots = PrincipalSlots::new(2);
        let alice = "alice".to_owned();
        let a = slots.try_acquire(&alice).unwrap();
        let _b = slots.try_acquire(&alice).unwrap();
        assert!(slots.try_acquire(&alice).is_none());
        let _other = slots.try_acquire(&"bob".to_owned()).unwrap();
        drop(a);
        assert_eq!(slots.held(&alice), 1);
        assert!(slots.try_acquire(&alice).is_some());
    }

    #[test]
    fn a_principal_with_nothing_running_leaves_no_entry() {
        let slots = PrincipalSlots::new(1);
        drop(slots.try_acquire(&"alice".to_owned()).unwrap());
        assert_eq!(slots.keys(), 0);
    }
}
