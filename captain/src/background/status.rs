//! What each background task did last: kept by the driver, served by
//! `GET /v1/admin/tasks`.

use std::collections::BTreeMap;
use std::sync::Mutex;

pub use api_types::tasks::{Activation, TaskStatus};

/// Every task's status, by name.
#[derive(Default)]
pub struct Registry(Mutex<BTreeMap<String, TaskStatus>>);

impl Registry {
    fn with(&self, name: &str, f: impl FnOnce(&mut TaskStatus)) {
        if let Some(t) = self.0.lock().expect("task registry").get_mut(name) {
            f(t);
        }
    }

    pub fn register(&self, name: &str, description: &str, period_ms: u64) {
        self.0.lock().expect("task registry").insert(
            name.to_string(),
            TaskStatus {
                name: name.to_string(),
                description: description.to_string(),
                period_ms,
                activations: 0,
                running: false,
                last_activation: None,
                last_started_at: None,
                last_finished_at: None,
                last_duration_ms: None,
                last_result: serde_json::Value::Null,
                last_error: None,
                next_activation_at: None,
            },
        );
    }

    pub fn started(&self, name: &str, why: Activation, now: i64) {
        self.with(name, |t| {
            t.activations += 1;
            t.running = true;
            t.last_activation = Some(why);
            t.last_started_at = Some(now);
        });
    }

    pub fn finished(
        &self,
        name: &str,
        outcome: Result<serde_json::Value, String>,
        now: i64,
        next_at: i64,
    ) {
        self.with(name, |t| {
            t.running = false;
            t.last_finished_at = Some(now);
            t.last_duration_ms = t
                .last_started_at
                .map(|s| u64::try_from(now - s).unwrap_or(0));
            match outcome {
                Ok(v) => {
                    t.last_result = v;
                    t.last_error = None;
                }
                Err(e) => t.last_error = Some(e),
            }
            t.next_activation_at = Some(next_at);
        });
    }

    pub fn list(&self) -> Vec<TaskStatus> {
        self.0
            .lock()
            .expect("task registry")
            .values()
            .cloned()
            .collect()
    }

    pub fn get(&self, name: &str) -> Option<TaskStatus> {
        self.0.lock().expect("task registry").get(name).cloned()
    }
}
