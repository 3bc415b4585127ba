//! What the socket transports share: one long-lived connection per expert worker, opened on
//! the first dispatch and again after it breaks, with the batches in flight multiplexed by
//! batch id. A reader task hands each reply to its waiter ([`Waiters`]); when the
//! connection breaks every waiter gets `Unavailable` at once (no hang) and the next dispatch
//! reconnects. The deadline covers connecting, sending and the answer.
//!
//! [`Connect`] is the one thing a transport supplies: how to open the connection (and start
//! its reader) and how to encode a batch into the message its sender takes.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use expertmesh_proto::v1 as pb;
use tokio::sync::{mpsc, oneshot};

use crate::wire::decode_reply;
use crate::{DispatchBatch, DispatchError};

type Outcome = Result<Vec<f32>, DispatchError>;

/// Batches sent on one connection and not answered yet: batch id → (rows, hidden, waiter).
/// `None` once the connection is gone, so a batch sent after that fails at once instead of
/// waiting for a reply that cannot come.
pub(crate) struct Waiters(Mutex<Option<HashMap<u64, Waiter>>>);

type Waiter = (usize, usize, oneshot::Sender<Outcome>);

impl Default for Waiters {
    fn default() -> Self {
        Self(Mutex::new(Some(HashMap::new())))
    }
}

impl Waiters {
    /// Registers batch `id`; `None` when the connection is already gone.
    fn insert(&self, id: u64, rows: usize, hidden: usize) -> Option<oneshot::Receiver<Outcome>> {
        let (tx, rx) = oneshot::channel();
        let mut waiters = self.0.lock().expect("waiters lock");
        waiters.as_mut()?.insert(id, (rows, hidden, tx));
        Some(rx)
    }

    fn is_closed(&self) -> bool {
        self.0.lock().expect("waiters lock").is_none()
    }

    fn forget(&self, id: u64) {
        if let Some(w) = self.0.lock().expect("waiters lock").as_mut() {
            w.remove(&id);
        }
    }

    /// Hands a reply to the batch it answers (a reply nobody waits for is dropped: its
    /// sender gave up at its deadline).
    pub(crate) fn answer(&self, reply: pb::DispatchReply) {
        let waiter = self
            .0
            .lock()
            .expect("waiters lock")
            .as_mut()
            .and_then(|w| w.remove(&reply.batch_id));
        if let Some((rows, hidden, w)) = waiter {
            let _ = w.send(decode_reply(reply, rows, hidden));
        }
    }

    /// The connection is gone: every batch on it fails as `Unavailable`, and so does every
    /// batch sent on it later.
    pub(crate) fn fail_all(&self, why: &str) {
        let drained = self.0.lock().expect("waiters lock").take();
        for (_, (_, _, w)) in drained.into_iter().flatten() {
            let _ = w.send(Err(DispatchError::Unavailable(why.to_string())));
        }
    }
}

pub(crate) type Opening<M> =
    Pin<Box<dyn Future<Output = Result<mpsc::Sender<M>, DispatchError>> + Send>>;

/// What a socket transport supplies to a [`Link`].
pub(crate) trait Connect: Send + Sync + 'static {
    /// What the connection's sender takes.
    type Message: Send + 'static;
    /// Opens a connection to `address` whose reader hands replies to `waiters` (and fails
    /// them all when it ends); returns the sending side, which is closed once the
    /// connection is.
    fn open(&self, address: String, waiters: Arc<Waiters>) -> Opening<Self::Message>;
    /// The message that carries `batch` (taken by value: owned f32 rows need no copy).
    fn encode(&self, batch: DispatchBatch) -> Result<Self::Message, DispatchError>;
}

struct Connection<M> {
    tx: mpsc::Sender<M>,
    waiters: Arc<Waiters>,
}

/// The connection to one worker, shared by the dispatches in flight.
pub(crate) struct Link<C: Connect> {
    address: String,
    connect: C,
    connection: tokio::sync::Mutex<Option<Arc<Connection<C::Message>>>>,
    next_id: AtomicU64,
}

impl<C: Connect> Link<C> {
    pub(crate) fn new(address: String, connect: C) -> Self {
        Self {
            address,
            connect,
            connection: tokio::sync::Mutex::new(None),
            next_id: AtomicU64::new(1),
        }
    }

    async fn open(&self) -> Result<Arc<Connection<C::Message>>, DispatchError> {
        let mut guard = self.connection.lock().await;
        if let Some(c) = guard.as_ref() {
            if !c.tx.is_closed() && !c.waiters.is_closed() {
                return Ok(c.clone());
            }
        }
        let waiters = Arc::new(Waiters::default());
        let tx = self
            .connect
            .open(self.address.clone(), waiters.clone())
            .await?;
        let c = Arc::new(Connection { tx, waiters });
        *guard = Some(c.clone());
        Ok(c)
    }

    /// Forgets `connection` (the next dispatch opens a new one), unless another dispatch
    /// already replaced it.
    async fn drop_connection(&self, connection: &Arc<Connection<C::Message>>) {
        let mut guard = self.connection.lock().await;
        if guard.as_ref().is_some_and(|c| Arc::ptr_eq(c, connection)) {
            *guard = None;
        }
    }

    fn closed(&self, why: &str) -> DispatchError {
        DispatchError::Unavailable(format!("{}: {why}", self.address))
    }

    /// Sends `batch` and waits for its answer, within the batch's own timeout.
    pub(crate) async fn send(self: Arc<Self>, mut batch: DispatchBatch) -> Outcome {
        let deadline = tokio::time::Instant::now() + batch.timeout;
        let attempt = async {
            let connection = self.open().await?;
            batch.batch_id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let id = batch.batch_id;
            let (rows, hidden) = (batch.rows(), batch.hidden);
            let message = self.connect.encode(batch)?;
            let Some(rx) = connection.waiters.insert(id, rows, hidden) else {
                self.drop_connection(&connection).await;
                return Err(self.closed("connection closed"));
            };
            if connection.tx.send(message).await.is_err() {
                connection.waiters.forget(id);
                self.drop_connection(&connection).await;
                return Err(self.closed("connection closed"));
            }
            let result = rx
                .await
                .unwrap_or_else(|_| Err(self.closed("connection closed")));
            if matches!(result, Err(DispatchError::Unavailable(_))) {
                self.drop_connection(&connection).await;
            }
            result
        };
        match tokio::time::timeout_at(deadline, attempt).await {
            Ok(r) => r,
            Err(_) => Err(DispatchError::DeadlineExceeded),
        }
    }
}
