//! Starting a [`Batcher`]: its channels and its threads, each named after the instance.
//!
//! | thread            | runs                                   | started            |
//! |-------------------|----------------------------------------|--------------------|
//! | `{name}-worker`   | the select loop ([`crate::worker`])    | here               |
//! | `{name}-flush`    | the flusher, when pipelined            | here               |
//! | `{name}-notify`   | the publisher, when pipelined          | here               |
//! | `{name}-gauges`   | the health gauges ([`crate::gauges`])  | here               |
//! | `{name}-cancel`   | the store's interrupt                  | by a `close` that gives up |
//! | `{name}-close`    | the close a dropped handle started     | by `Drop`          |
//!
//! `{name}` is [`Builder::name`](crate::Builder::name), `mdbatch` by default.

use std::thread;

use parking_lot::Mutex;

use crate::announcer::Announcer;
use crate::batcher::Inner;
use crate::builder::Builder;
use crate::flusher::Flusher;
use crate::shared::Shared;
use crate::worker::{Flushing, Worker, WorkerConfig};
use crate::{Batcher, BuildError, CloseReport, FlushMode};

/// The name of one of an instance's threads: the instance name, then its role.
///
/// Linux keeps the first 15 bytes of a thread's name (what `top -H`, `ps -L`, `/proc` and
/// debuggers show; panics and `std::thread::current().name()` keep it whole). The roles
/// take at most 6 bytes and the dash one, so a name of up to 8 bytes survives whole,
/// role and all: `mdbatch-worker`, `replica2-notify`. A longer name keeps its first bytes
/// and cuts the role instead, so put what tells instances apart first.
pub(crate) fn thread_name(name: &str, role: &str) -> String {
    format!("{name}-{role}")
}

impl Batcher {
    pub(crate) fn start(builder: Builder) -> Result<Batcher, BuildError> {
        let channel_capacity = builder.effective_channel_capacity();
        let name = builder.name.clone();
        let config = WorkerConfig {
            batch_size: builder.batch_size,
            channel_capacity,
            interval: builder.interval,
            max_pending: builder.max_pending.unwrap_or(usize::MAX),
            max_pending_bytes: builder.max_pending_bytes,
            retry_backoff_initial: builder.retry_backoff_initial,
            retry_backoff_max: builder.retry_backoff_max,
        };
        let shared = Shared::new(builder.clock, &builder.metric_labels, builder.interval);
        crate::shared::spawn_gauges(&shared, thread_name(&name, "gauges"))
            .map_err(BuildError::Spawn)?;
        // Every message carries at least one key, so a channel of `channel_capacity`
        // messages never refuses a send that the key budget admitted.
        let (updates, updates_rx) = crossbeam_channel::bounded(channel_capacity);
        let (control, control_rx) = crossbeam_channel::unbounded();
        let (doorbell, doorbell_rx) = crossbeam_channel::bounded(1);
        // Armed here, not on the worker thread, so a test's first `advance` cannot race it.
        let timer = shared.clock.after(config.interval);

        let flushing = match builder.flush_mode {
            FlushMode::Inline => Flushing::Inline(Flusher::new(
                builder.store,
                Announcer::inline(builder.publisher),
                shared.clone(),
                builder.batch_size,
            )),
            FlushMode::Pipelined => {
                let announcer = Announcer::spawn(
                    builder.publisher,
                    shared.clone(),
                    thread_name(&name, "notify"),
                )
                .map_err(BuildError::Spawn)?;
                let flusher =
                    Flusher::new(builder.store, announcer, shared.clone(), builder.batch_size);
                let (jobs, jobs_rx) = crossbeam_channel::bounded(1);
                let (completed_tx, completed) = crossbeam_channel::bounded(1);
                let thread = thread::Builder::new()
                    .name(thread_name(&name, "flush"))
                    .spawn(move || flusher.run(jobs_rx, completed_tx))
                    .map_err(BuildError::Spawn)?;
                Flushing::Thread {
                    jobs: Some(jobs),
                    completed,
                    thread: Some(thread),
                }
            }
        };
        let worker = Worker::new(
            config,
            shared.clone(),
            updates_rx,
            doorbell_rx,
            control_rx,
            timer,
            flushing,
        );
        let (worker_alive, worker_ended) = crossbeam_channel::bounded::<()>(0);
        let worker = thread::Builder::new()
            .name(thread_name(&name, "worker"))
            .spawn(move || {
                let _alive = worker_alive;
                worker.run()
            })
            .map_err(BuildError::Spawn)?;
        let (close_signal, closed) = crossbeam_channel::bounded(0);
        let inner = Inner {
            updates,
            doorbell,
            control,
            worker_ended,
            closed,
            close_signal: Mutex::new(Some(close_signal)),
            final_flush_timeout: builder.final_flush_timeout,
            name,
            shared,
            worker: Mutex::new(Some(worker)),
            close_report: Mutex::new(CloseReport::default()),
        };
        Ok(Batcher::over(inner, channel_capacity))
    }
}
