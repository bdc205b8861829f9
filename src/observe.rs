//! [`Observe`]: a store wrapper that forwards everything, for code that times or counts calls.
//!
//! A wrapper written by hand must forward every optional method of [`Store`], and one that
//! forgets one compiles and silently loses interrupts, sizing or parallel statements.
//! `Observe` forwards them all and hands each call to an [`Observer`] before and after.

use std::time::{Duration, Instant};

use crate::{BatchResult, Capabilities, Interrupt, MetadataBatch, Store, StoreError, Written};

/// One store call as an [`Observer`] sees it after it returned.
#[derive(Debug)]
#[non_exhaustive]
pub struct StoreCall<'a> {
    /// The batches of the call: one for [`Store::batch_update`], more for
    /// [`Store::batch_update_many`].
    pub batches: &'a [MetadataBatch],
    /// One result per batch, in order (a store may answer fewer; the rest were not tried).
    pub results: &'a [BatchResult],
    /// How long the call took, by the system's monotonic clock.
    pub elapsed: Duration,
}

/// Watches the calls of an [`Observe`] store; a closure taking a [`StoreCall`] is one.
pub trait Observer: Send + 'static {
    /// Called just before each call with its batches. The default does nothing.
    fn before(&mut self, batches: &[MetadataBatch]) {
        let _ = batches;
    }

    /// Called just after each call returned.
    fn after(&mut self, call: &StoreCall<'_>);
}

impl<F: FnMut(&StoreCall<'_>) + Send + 'static> Observer for F {
    fn after(&mut self, call: &StoreCall<'_>) {
        self(call)
    }
}

/// A store that forwards every method of `S`, and shows each call to an [`Observer`].
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
/// use std::sync::Arc;
/// use metadata_batcher::{BatchResult, MemoryStore, Observe, Store, StoreCall};
///
/// let written = Arc::new(AtomicU64::new(0));
/// let count = written.clone();
/// let store = Observe::new(MemoryStore::new(), move |call: &StoreCall<'_>| {
///     for (batch, result) in call.batches.iter().zip(call.results) {
///         if let BatchResult::Written(_) = result {
///             count.fetch_add(batch.len() as u64, Relaxed);
///         }
///     }
/// });
/// // Hand `store` to `Batcher::builder`: interrupts, capabilities and parallel
/// // statements are the inner store's.
/// assert_eq!(store.capabilities(), MemoryStore::new().capabilities());
/// ```
#[derive(Debug)]
pub struct Observe<S, O> {
    inner: S,
    observer: O,
}

impl<S: Store, O: Observer> Observe<S, O> {
    /// Wraps `inner`, showing each call to `observer`.
    pub fn new(inner: S, observer: O) -> Self {
        Observe { inner, observer }
    }

    /// The wrapped store.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// The wrapped store, mutably.
    pub fn inner_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the store.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Store, O: Observer> Store for Observe<S, O> {
    fn batch_update(&mut self, batch: &MetadataBatch) -> Result<Written, StoreError> {
        let batches = std::slice::from_ref(batch);
        self.observer.before(batches);
        let start = Instant::now();
        let result = self.inner.batch_update(batch);
        // A clone per call, not per row: the observer sees the result the batcher gets.
        let results = [BatchResult::from(result.clone())];
        self.observer.after(&StoreCall {
            batches,
            results: &results,
            elapsed: start.elapsed(),
        });
        result
    }

    fn interrupt_handle(&mut self) -> Option<Interrupt> {
        self.inner.interrupt_handle()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    fn batch_update_many(&mut self, batches: &[MetadataBatch]) -> Vec<BatchResult> {
        self.observer.before(batches);
        let start = Instant::now();
        let results = self.inner.batch_update_many(batches);
        self.observer.after(&StoreCall {
            batches,
            results: &results,
            elapsed: start.elapsed(),
        });
        results
    }
}
