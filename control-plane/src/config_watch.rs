//! Keeps the served snapshot in step with the configuration directory.
//!
//! ```text
//! inotify events ─▶ Notify ─▶ quiet for `debounce` (at most MAX_DEBOUNCE) ─▶ read
//!     every RESYNC as well, in case a watch was lost        (blocking pool)
//!                                       ─▶ resources::compute ─▶ watch::Sender<Snapshot>
//! ```
//!
//! A read with problems logs each one as `file:line: reason`; documents that are still
//! good are served, and a file with problems keeps its last good version in force.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use serde::Serialize;
use tokio::sync::{Notify, watch};

use crate::metrics as m;
use crate::resources;
use crate::snapshot::Snapshot;
use crate::source::ConfigDir;

/// The longest a burst of changes can hold a re-read back: 1 s.
pub const MAX_DEBOUNCE: Duration = Duration::from_secs(1);

/// A full re-read happens at least this often even without events, so a lost watch
/// (the directory deleted and recreated, inotify overflow) heals itself: 30 s.
pub const RESYNC: Duration = Duration::from_secs(30);

/// Said of an object a conflict left out (`policy_status` reads it as `Conflicted`).
pub const LEFT_OUT: &str = "(left out; the rest is served)";

/// The state of the configuration, served as JSON on the admin `/config` page.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ConfigStatus {
    /// The directory read.
    pub dir: String,
    /// Type-level versions in force: `service=… endpoints=… inbound_policy=…`.
    pub versions: String,
    /// Resources served per type.
    pub counts: String,
    /// Problems found by the latest read, each `file:line: reason`. Empty when clean.
    pub errors: Vec<String>,
    /// Things that are valid but probably not meant, e.g. a policy whose target does
    /// not exist.
    pub warnings: Vec<String>,
    /// Reads so far.
    pub reloads: u64,
}

/// A watched configuration directory.
pub struct ConfigWatch {
    source: ConfigDir,
    changed: Arc<Notify>,
    // Dropping the watcher stops the events.
    _watcher: notify::RecommendedWatcher,
}

impl ConfigWatch {
    /// Starts watching `dir` (recursively). Nothing is read until [`ConfigWatch::reload`];
    /// the watch starts first so that no change made in between is missed.
    ///
    /// # Errors
    /// When the directory cannot be watched (it does not exist, or inotify watches are
    /// exhausted: raise `fs.inotify.max_user_watches`).
    pub fn start(dir: PathBuf) -> anyhow::Result<Self> {
        let changed = Arc::new(Notify::new());
        let notify = changed.clone();
        let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
            Ok(e) if e.kind.is_access() => {}
            Ok(_) => notify.notify_one(),
            Err(e) => {
                tracing::warn!(error = %e, "file watch error; re-reading the directory");
                notify.notify_one();
            }
        })
        .map_err(|e| anyhow::anyhow!("cannot watch {}: {e}", dir.display()))?;
        watcher
            .watch(&dir, RecursiveMode::Recursive)
            .map_err(|e| anyhow::anyhow!("cannot watch {}: {e}", dir.display()))?;
        Ok(Self {
            source: ConfigDir::new(dir),
            changed,
            _watcher: watcher,
        })
    }

    /// Reads the directory now (on the blocking pool) and publishes what changed.
    pub async fn reload(&mut self, snapshots: &watch::Sender<Arc<Snapshot>>, status: &watch::Sender<ConfigStatus>) {
        let mut source = std::mem::take(&mut self.source);
        let snapshots_tx = snapshots.clone();
        let status_tx = status.clone();
        let source = tokio::task::spawn_blocking(move || {
            reload(&mut source, &snapshots_tx, &status_tx);
            source
        })
        .await;
        match source {
            Ok(source) => self.source = source,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }

    /// Re-reads the directory `debounce` after the last change seen (but at most
    /// [`MAX_DEBOUNCE`] after the first), and every [`RESYNC`]. Runs until the process
    /// ends.
    pub async fn run(
        mut self,
        snapshots: watch::Sender<Arc<Snapshot>>,
        status: watch::Sender<ConfigStatus>,
        debounce: Duration,
    ) {
        loop {
            let _ = tokio::time::timeout(RESYNC, self.changed.notified()).await;
            // Debounce: editors and `cp -r` produce bursts of events; read once it is
            // quiet, but never let a steady stream of events hold the read back forever.
            let started = tokio::time::Instant::now();
            while started.elapsed() < MAX_DEBOUNCE
                && tokio::time::timeout(debounce, self.changed.notified()).await.is_ok()
            {}
            self.reload(&snapshots, &status).await;
        }
    }
}

/// Reads the directory once and publishes the snapshot if it changed. Blocking.
pub fn reload(source: &mut ConfigDir, snapshots: &watch::Sender<Arc<Snapshot>>, status: &watch::Sender<ConfigStatus>) {
    let dir = source.root().display().to_string();
    let started = std::time::Instant::now();
    let loaded = match source.load() {
        Ok(l) => l,
        Err(e) => {
            let error = format!("{dir}: cannot read the configuration directory: {e}");
            tracing::error!("{error}; the last good configuration stays in force");
            record(status, &dir, vec![error], Vec::new(), snapshots);
            return;
        }
    };
    let errors: Vec<String> = loaded.errors.iter().map(ToString::to_string).collect();
    tracing::debug!(
        documents = loaded.documents.len(),
        read_ms = started.elapsed().as_millis(),
        "configuration read"
    );
    publish(
        &loaded.documents,
        errors,
        OnConflict::KeepLastGood,
        &dir,
        snapshots,
        status,
    );
}

/// What a cross-document conflict (the same object twice, two TrafficPolicies for one
/// Service, two workloads on one address) does to the published state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnConflict {
    /// Keep the last good snapshot (a directory: the person editing it is told, and
    /// nothing half-edited goes out).
    KeepLastGood,
    /// Leave out each conflicting object (the one reported, which came second) and
    /// serve the rest (a cluster: one team's object must not freeze every other
    /// team's mesh).
    LeaveOut,
}

/// Computes the resources of `documents` and publishes them if they changed; the
/// source's own `errors` (documents it could not read) are reported with any
/// cross-document problem, handled as `on_conflict` says. The file and Kubernetes
/// sources both end here.
pub fn publish(
    documents: &[crate::source::Document],
    mut errors: Vec<String>,
    on_conflict: OnConflict,
    source: &str,
    snapshots: &watch::Sender<Arc<Snapshot>>,
    status: &watch::Sender<ConfigStatus>,
) {
    let mut warnings = Vec::new();
    let started = std::time::Instant::now();
    let mut computed = resources::compute(documents);
    if let (Err(conflicts), OnConflict::LeaveOut) = (&computed, on_conflict) {
        let out: std::collections::HashSet<&std::path::Path> = conflicts.iter().map(|e| e.file.as_path()).collect();
        errors.extend(conflicts.iter().map(|e| format!("{e} {LEFT_OUT}")));
        let kept: Vec<crate::source::Document> = documents
            .iter()
            .filter(|d| !out.contains(d.origin.file.as_path()))
            .cloned()
            .collect();
        computed = resources::compute(&kept);
    }
    tracing::debug!(compute_ms = started.elapsed().as_millis(), "resources computed");
    match computed {
        Ok((snapshot, warns)) => {
            warnings = warns.iter().map(ToString::to_string).collect();
            let changed = snapshots.send_if_modified(|current| {
                if **current == snapshot {
                    false
                } else {
                    *current = Arc::new(snapshot);
                    true
                }
            });
            if changed {
                let s = snapshots.borrow();
                tracing::info!(versions = %s.versions(), resources = %s.counts(), "configuration published");
            }
        }
        Err(errs) => {
            errors.extend(
                errs.iter()
                    .map(|e| format!("{e} (the last good configuration stays in force)")),
            );
        }
    }
    for e in &errors {
        tracing::error!("{e}");
    }
    for w in &warnings {
        tracing::warn!("{w}");
    }
    record(status, source, errors, warnings, snapshots);
}

fn record(
    status: &watch::Sender<ConfigStatus>,
    dir: &str,
    errors: Vec<String>,
    warnings: Vec<String>,
    snapshots: &watch::Sender<Arc<Snapshot>>,
) {
    let result = if errors.is_empty() { "ok" } else { "error" };
    metrics::counter!(m::CONFIG_RELOADS, "result" => result).increment(1);
    metrics::gauge!(m::CONFIG_ERRORS).set(errors.len() as f64);
    let snap = snapshots.borrow();
    for t in crate::snapshot::TYPE_URLS {
        let n = snap.get(t).map_or(0, |s| s.resources.len());
        metrics::gauge!(m::RESOURCES, "type" => wary_proto::kind_of(t)).set(n as f64);
    }
    status.send_modify(|s| {
        if !s.errors.is_empty() && errors.is_empty() {
            tracing::info!(dir, "the configuration reads clean again: every file is in force");
        }
        s.dir = dir.to_string();
        s.versions = snap.versions();
        s.counts = snap.counts();
        s.errors = errors;
        s.warnings = warnings;
        s.reloads += 1;
    });
}
