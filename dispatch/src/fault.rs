//! `FaultyDispatch`: a test double of the seam that wraps any other `Dispatch` and, for each
//! batch, either passes it through or injects the next scripted [`Fault`]: the batch is
//! lost on the way, answered late, never answered (the sender's deadline turns that into
//! `DeadlineExceeded`, as the real transports do), or answered with `WrongEpoch` or
//! `Unavailable`. It runs the conformance suite unscripted and drives the routing tests.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::{Dispatch, DispatchBatch, DispatchError, DispatchFuture};

/// What happens to one batch.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Passed through untouched.
    None,
    /// Lost in transit: the sender learns at once that the worker is unreachable (what a
    /// broken stream looks like).
    Drop,
    /// Passed through and answered after this long (a deadline shorter than that expires).
    Delay(Duration),
    /// Never answered; the batch's own timeout ends the wait with `DeadlineExceeded`.
    Hang,
    /// Answered `WrongEpoch { current }` without reaching the worker.
    WrongEpoch(u64),
    /// Answered `Unavailable` (a worker shutting down).
    Unavailable,
}

/// Injects scripted faults in front of `inner`.
pub struct FaultyDispatch {
    inner: Arc<dyn Dispatch>,
    script: Mutex<VecDeque<Fault>>,
    /// Faults used once the script runs out.
    otherwise: Mutex<Fault>,
    calls: AtomicU64,
}

impl FaultyDispatch {
    pub fn new(inner: Arc<dyn Dispatch>) -> Self {
        Self {
            inner,
            script: Mutex::new(VecDeque::new()),
            otherwise: Mutex::new(Fault::None),
            calls: AtomicU64::new(0),
        }
    }

    /// The next batches meet these faults, in order.
    pub fn script(&self, faults: impl IntoIterator<Item = Fault>) {
        self.script.lock().expect("script lock").extend(faults);
    }

    /// Every batch after the script meets `fault` (a dead worker: `Fault::Drop`).
    pub fn always(&self, fault: Fault) {
        *self.otherwise.lock().expect("fault lock") = fault;
    }

    /// Batches seen so far.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    fn next_fault(&self) -> Fault {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let scripted = self.script.lock().expect("script lock").pop_front();
        scripted.unwrap_or_else(|| self.otherwise.lock().expect("fault lock").clone())
    }
}

impl Dispatch for FaultyDispatch {
    fn dispatch(&self, batch: DispatchBatch) -> DispatchFuture {
        let timeout = batch.timeout;
        let within = move |f: DispatchFuture| -> DispatchFuture {
            Box::pin(async move {
                tokio::time::timeout(timeout, f)
                    .await
                    .unwrap_or(Err(DispatchError::DeadlineExceeded))
            })
        };
        match self.next_fault() {
            Fault::None => self.inner.dispatch(batch),
            Fault::Drop => Box::pin(async {
                Err(DispatchError::Unavailable(
                    "injected: the batch was lost".into(),
                ))
            }),
            Fault::Delay(d) => {
                let sent = self.inner.dispatch(batch);
                within(Box::pin(async move {
                    tokio::time::sleep(d).await;
                    sent.await
                }))
            }
            Fault::Hang => within(Box::pin(std::future::pending())),
            Fault::WrongEpoch(current) => {
                Box::pin(async move { Err(DispatchError::WrongEpoch { current }) })
            }
            Fault::Unavailable => Box::pin(async {
                Err(DispatchError::Unavailable(
                    "injected: the expert worker is shutting down".into(),
                ))
            }),
        }
    }
}
