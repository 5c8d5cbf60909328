//! Admission control: a global in-flight limit with a bounded wait queue (full
//! queue or queue timeout → 429 with `Retry-After`), per-backend limits waited on
//! through the same queue, and a retry budget.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use super::ApiError;

/// Global admission.
#[derive(Debug)]
pub struct Limiter {
    sem: Arc<Semaphore>,
    waiting: AtomicUsize,
    max_queue: usize,
    /// Signalled whenever a request finishes (a backend slot may be free).
    pub released: Notify,
}

impl Limiter {
    /// `max_concurrent` in flight, `max_queue` waiting.
    pub fn new(max_concurrent: usize, max_queue: usize) -> Self {
        Self {
            sem: Arc::new(Semaphore::new(max_concurrent)),
            waiting: AtomicUsize::new(0),
            max_queue,
            released: Notify::new(),
        }
    }

    /// Requests waiting now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// A global slot, waiting at most `timeout` in the bounded queue.
    pub async fn acquire(&self, timeout: Duration) -> Result<OwnedSemaphorePermit, ApiError> {
        if let Ok(p) = self.sem.clone().try_acquire_owned() {
            return Ok(p);
        }
        let _w = self.enter_queue()?;
        match tokio::time::timeout(timeout, self.sem.clone().acquire_owned()).await {
            Ok(Ok(p)) => Ok(p),
            _ => Err(ApiError::overloaded(format!(
                "agentlb is at its concurrency limit; waited {} ms",
                timeout.as_millis()
            ))),
        }
    }

    /// Takes a queue place (released on drop) or fails with 429 when full.
    pub fn enter_queue(&self) -> Result<QueuePlace<'_>, ApiError> {
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.max_queue {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(ApiError::overloaded(format!(
                "agentlb's queue is full ({} waiting)",
                self.max_queue
            )));
        }
        Ok(QueuePlace(self))
    }
}

/// A place in the wait queue.
#[derive(Debug)]
pub struct QueuePlace<'a>(&'a Limiter);

impl Drop for QueuePlace<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Retries allowed per 10 s window: `min + ratio × requests`.
///
/// Lock-free: the window is the number of whole windows since `base`; the
/// first caller in a new window resets the counts.
#[derive(Debug)]
pub struct RetryBudget {
    base: Instant,
    window: AtomicU64,
    requests: AtomicU64,
    retries: AtomicU64,
}

const WINDOW: Duration = Duration::from_secs(10);

impl Default for RetryBudget {
    fn default() -> Self {
        Self {
            base: Instant::now(),
            window: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            retries: AtomicU64::new(0),
        }
    }
}

impl RetryBudget {
    fn roll(&self, now: Instant) {
        let w = now.saturating_duration_since(self.base).as_secs() / WINDOW.as_secs();
        let cur = self.window.load(Ordering::Relaxed);
        if w > cur
            && self
                .window
                .compare_exchange(cur, w, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            self.requests.store(0, Ordering::Relaxed);
            self.retries.store(0, Ordering::Relaxed);
        }
    }

    /// Counts a request that arrived at `now`.
    pub fn request(&self, now: Instant) {
        self.roll(now);
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes a retry token if the budget allows.
    pub fn try_retry(&self, ratio: f64, min: u32) -> bool {
        self.roll(Instant::now());
        let allowed =
            u64::from(min) + (ratio * self.requests.load(Ordering::Relaxed) as f64) as u64;
        let used = self.retries.fetch_add(1, Ordering::Relaxed);
        if used >= allowed {
            self.retries.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn queue_bounds_and_timeouts_give_429() {
        let l = Limiter::new(1, 1);
        let p = l.acquire(Duration::from_millis(10)).await.expect("first");
        let e = l
            .acquire(Duration::from_millis(20))
            .await
            .expect_err("times out");
        assert_eq!(e.status, http::StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(e.retry_after, Some(1));
        let _q = l.enter_queue().expect("one place");
        let e = l.enter_queue().expect_err("queue full");
        assert!(e.message.contains("queue is full"));
        drop(p);
    }

    #[test]
    fn retry_budget() {
        let b = RetryBudget::default();
        for _ in 0..10 {
            b.request(Instant::now());
        }
        assert!(b.try_retry(0.2, 1));
        assert!(b.try_retry(0.2, 1));
        assert!(b.try_retry(0.2, 1));
        assert!(!b.try_retry(0.2, 1), "1 + 0.2*10 = 3 retries");
    }
}
