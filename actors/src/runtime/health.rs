//! What `/readyz` reports of the pipeline: conditions that make the process not ready, each
//! named. An escalation (a child past its restart intensity) is one of them and is final: the
//! process drains and exits non-zero so that its orchestrator replaces it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// Shared by the pipeline (which reports) and the HTTP endpoints (which read).
#[derive(Debug)]
pub struct Health {
    problems: Mutex<BTreeMap<&'static str, String>>,
    escalated: watch::Sender<Option<String>>,
}

/// The condition name of an escalation.
pub const ESCALATED: &str = "supervisor";

impl Health {
    pub fn new() -> Arc<Self> {
        Arc::new(Health {
            problems: Mutex::default(),
            escalated: watch::channel(None).0,
        })
    }

    /// Marks `condition` as failing (with why) or, with `None`, as fine again.
    pub fn set(&self, condition: &'static str, problem: Option<String>) {
        let mut p = self.problems.lock().unwrap_or_else(|e| e.into_inner());
        match problem {
            Some(why) => p.insert(condition, why),
            None => p.remove(condition),
        };
    }

    /// Gives up: the process is not ready for good and should drain and exit. The first
    /// reason is kept.
    pub fn escalate(&self, reason: String) {
        if self.escalated.borrow().is_some() {
            return;
        }
        tracing::error!(reason = %reason, "Restart intensity exceeded; draining and exiting.");
        self.set(ESCALATED, Some(reason.clone()));
        self.escalated.send_replace(Some(reason));
    }

    /// Why the process is not ready; empty when it is.
    pub fn problems(&self) -> Vec<String> {
        let p = self.problems.lock().unwrap_or_else(|e| e.into_inner());
        p.iter().map(|(k, v)| format!("{k}: {v}")).collect()
    }

    /// The escalation, once there is one.
    pub fn escalation(&self) -> Option<String> {
        self.escalated.borrow().clone()
    }

    /// Resolves when the pipeline escalates, with the reason.
    pub async fn escalated(&self) -> String {
        let mut rx = self.escalated.subscribe();
        loop {
            if let Some(r) = rx.borrow_and_update().clone() {
                return r;
            }
            if rx.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }
}
