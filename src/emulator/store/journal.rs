//! All-or-none requests: a journal of what one request changes, so that the store can undo
//! it when a later part of the request fails, as Salesforce rolls back a transaction.
//!
//! While [`Org::atomically`] runs a request, every record the request creates or changes
//! leaves its prior state in the request's journal (the first time it is touched), and the
//! change events it would publish are held there instead of going on the bus. When the
//! request succeeds the events are published, in order; when it fails the records are put
//! back and the events dropped, so subscribers never see a change that was rolled back.
//!
//! The journal belongs to the request's task (a task-local), so writes of other requests in
//! the meantime are neither held nor undone. Like a row lock it is not: a record another
//! request changed in the meantime is put back to its state before this request.

use super::{Data, Org, Record};
use std::future::Future;
use std::sync::{Arc, Mutex};

tokio::task_local! {
    static JOURNAL: Arc<Mutex<Journal>>;
}

/// One change event held until the request commits.
struct Held {
    channels: Vec<String>,
    schema_id: String,
    payload: Vec<u8>,
    now: i64,
}

#[derive(Default)]
struct Journal {
    /// Records touched, with their state before the request (`None`: created by it).
    undo: Vec<(String, String, Option<Arc<Record>>)>,
    held: Vec<Held>,
    commit_number: Option<i64>,
}

fn with_journal(f: impl FnOnce(&mut Journal)) -> bool {
    JOURNAL
        .try_with(|j| {
            let mut j = j.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut j);
        })
        .is_ok()
}

/// Whether the current request runs as a transaction.
pub(super) fn active() -> bool {
    JOURNAL.try_with(|_| ()).is_ok()
}

/// Notes that `object`/`id` is about to change (or be created, `prior` `None`) in the
/// current request's transaction, if it has one.
pub(super) fn touch(data: &Data, object: &str, id: &str, prior: Option<Arc<Record>>) {
    with_journal(|j| {
        if j.commit_number.is_none() {
            j.commit_number = Some(data.commit_number);
        }
        if !j.undo.iter().any(|(o, i, _)| o == object && i == id) {
            j.undo.push((object.to_string(), id.to_string(), prior));
        }
    });
}

/// Holds an event in the current request's transaction; false when there is none (the
/// caller publishes it at once).
pub(super) fn hold(channels: &[String], schema_id: &str, payload: &[u8], now: i64) -> bool {
    let mut payload = Some(payload);
    with_journal(|j| {
        if let Some(p) = payload.take() {
            j.held.push(Held {
                channels: channels.to_vec(),
                schema_id: schema_id.to_string(),
                payload: p.to_vec(),
                now,
            });
        }
    })
}

impl Org {
    /// Runs `work` (one request) as a transaction: when it reports failure (`false`), every
    /// record it created or changed is put back and its change events are dropped; otherwise
    /// its events are published in order.
    pub async fn atomically<T>(&self, work: impl Future<Output = (T, bool)>) -> T {
        let journal = Arc::new(Mutex::new(Journal::default()));
        let (out, commit) = JOURNAL.scope(journal.clone(), work).await;
        let j = std::mem::take(&mut *journal.lock().unwrap_or_else(|p| p.into_inner()));
        let mut data = self.data();
        if commit {
            for e in j.held {
                self.bus
                    .publish(&e.channels, &e.schema_id, e.payload, e.now);
            }
            return out;
        }
        for (object, id, prior) in j.undo.into_iter().rev() {
            let records = data.records.entry(object).or_default();
            match prior {
                Some(r) => {
                    records.insert(id, r);
                }
                None => {
                    records.remove(&id);
                }
            }
        }
        if let Some(n) = j.commit_number {
            data.commit_number = n;
        }
        out
    }
}
