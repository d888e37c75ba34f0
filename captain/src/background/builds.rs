//! `build-worker-N`: claim due builds and run them (the queue itself is
//! [`crate::app::builds`]). A stop cancels a running build: it is queued
//! again when a captain starts next.

use std::sync::Arc;

use builder::Builder;
use futures::future::BoxFuture;
use serde_json::json;

use crate::state::AppState;

pub struct BuildWorker {
    pub builder: Arc<Builder>,
}

impl super::Task for BuildWorker {
    fn activate<'a>(
        &'a mut self,
        st: &'a AppState,
    ) -> BoxFuture<'a, Result<serde_json::Value, String>> {
        Box::pin(async move {
            let ran = crate::app::builds::run_due(st, &self.builder)
                .await
                .map_err(|e| zw_util::error_chain(&e))?;
            Ok(json!({ "builds": ran }))
        })
    }
}
