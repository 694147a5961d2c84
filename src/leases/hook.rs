//! The lease hook: a command run after each lease change is durable, with the change as its
//! first argument (`commit`, `renew`, `release`, `decline`, `expire`) and the lease as JSON on
//! stdin. Hooks run one at a time, in order, off the packet path: a slow hook delays other
//! hooks, never a reply.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::dhcp::engine::LeaseChange;

/// Changes waiting for the hook; past this, changes are dropped with a warning rather than
/// letting a stuck hook grow pxed's memory without bound.
const HOOK_QUEUE: usize = 4096;
/// How long one hook run may take before it is killed.
const HOOK_TIMEOUT: Duration = Duration::from_secs(10);

/// A running hook queue.
#[derive(Clone, Debug)]
pub struct LeaseHook {
    tx: mpsc::Sender<LeaseChange>,
}

impl LeaseHook {
    /// Start the task that runs `command` for each change. Needs a tokio runtime.
    pub fn start(command: PathBuf) -> LeaseHook {
        let (tx, mut rx) = mpsc::channel::<LeaseChange>(HOOK_QUEUE);
        tokio::spawn(async move {
            while let Some(change) = rx.recv().await {
                run(&command, &change).await;
            }
        });
        LeaseHook { tx }
    }

    /// Queue a change (after it is durable).
    pub fn notify(&self, change: &LeaseChange) {
        if self.tx.try_send(change.clone()).is_err() {
            tracing::warn!(
                event = change.kind(),
                mac = %change.lease().mac,
                "lease hook queue full; change not passed to the hook"
            );
        }
    }
}

async fn run(command: &PathBuf, change: &LeaseChange) {
    let json = match serde_json::to_vec(change.lease()) {
        Ok(j) => j,
        Err(err) => {
            tracing::warn!(%err, "cannot encode lease for the hook");
            return;
        }
    };
    let child = tokio::process::Command::new(command)
        .arg(change.kind())
        .env("PXED_LEASE_EVENT", change.kind())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(err) => {
            tracing::warn!(command = %command.display(), %err, "cannot run lease hook");
            return;
        }
    };
    if let Some(mut stdin) = child.stdin.take() {
        // A hook that does not read stdin is fine; ignore a broken pipe.
        let _ = stdin.write_all(&json).await;
        let _ = stdin.write_all(b"\n").await;
    }
    match tokio::time::timeout(HOOK_TIMEOUT, child.wait()).await {
        Ok(Ok(status)) if status.success() => {}
        Ok(Ok(status)) => {
            tracing::warn!(command = %command.display(), %status, event = change.kind(), "lease hook failed")
        }
        Ok(Err(err)) => tracing::warn!(command = %command.display(), %err, "lease hook"),
        Err(_) => {
            let _ = child.kill().await;
            tracing::warn!(command = %command.display(), "lease hook timed out; killed");
        }
    }
}
