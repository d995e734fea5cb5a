//! Work that many requests hand to one task, which does what has arrived since its last batch
//! in one statement or one transaction (a group commit): under load, a commit and its round
//! trips are shared by every request of the batch instead of paid by each.

use std::future::Future;
use std::panic::AssertUnwindSafe;

use futures::FutureExt;
use tokio::sync::mpsc;

/// Starts the task on the current runtime and returns where to send it work. At most `queue`
/// items wait (a full queue makes senders wait, so memory stays bounded under any load), and
/// one call of `run` takes at most `batch`. The task ends once every sender is dropped and
/// the queue is done. A panic in `run` loses that batch only (its items are dropped, so
/// callers waiting on a reply inside them see it closed); the task goes on.
pub fn spawn<T, F, Fut>(
    what: &'static str,
    queue: usize,
    batch: usize,
    mut run: F,
) -> mpsc::Sender<T>
where
    T: Send + 'static,
    F: FnMut(Vec<T>) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let (tx, mut rx) = mpsc::channel(queue);
    tokio::spawn(async move {
        let mut items = Vec::with_capacity(batch);
        while rx.recv_many(&mut items, batch).await > 0 {
            let work = std::mem::replace(&mut items, Vec::with_capacity(batch));
            if AssertUnwindSafe(run(work)).catch_unwind().await.is_err() {
                tracing::error!(batcher = what, "A batch panicked; its items are dropped.");
            }
        }
    });
    tx
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tokio::sync::oneshot;

    use super::*;

    #[tokio::test]
    async fn items_sent_while_a_batch_runs_share_the_next_one_and_a_panic_loses_only_its_batch() {
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let seen = sizes.clone();
        let (gate_tx, gate_rx) = oneshot::channel::<()>();
        let mut gate = Some(gate_rx);
        let tx = spawn(
            "test",
            16,
            4,
            move |items: Vec<(u32, oneshot::Sender<u32>)>| {
                seen.lock().unwrap().push(items.len());
                let first = gate.take();
                async move {
                    if let Some(g) = first {
                        g.await.unwrap();
                    }
                    if items.iter().any(|(n, _)| *n == 99) {
                        panic!("a poisoned batch");
                    }
                    for (n, reply) in items {
                        reply.send(n * 2).unwrap();
                    }
                }
            },
        );
        // The queue (16) has room for every item here.
        let send = |n: u32| {
            let (reply, answer) = oneshot::channel();
            tx.try_send((n, reply)).unwrap();
            answer
        };
        // The first batch holds the task until the gate opens; six more wait meanwhile.
        let first = send(1);
        while sizes.lock().unwrap().is_empty() {
            tokio::task::yield_now().await;
        }
        let mut later = Vec::new();
        for n in 2..8 {
            later.push(send(n));
        }
        gate_tx.send(()).unwrap();
        assert_eq!(first.await.unwrap(), 2);
        for (n, answer) in (2..8).zip(later) {
            assert_eq!(answer.await.unwrap(), n * 2);
        }
        // Six waiting items, at most four a batch.
        assert_eq!(*sizes.lock().unwrap(), vec![1, 4, 2]);

        let poisoned = send(99);
        assert!(
            poisoned.await.is_err(),
            "the panicked batch's reply is closed"
        );
        assert_eq!(send(5).await.unwrap(), 10, "the task goes on");
    }
}
