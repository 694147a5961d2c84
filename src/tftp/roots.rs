//! Per-profile TFTP roots: a profile may name its own `tftp_root`; its clients are served from
//! there instead of `[server] root`.
//!
//! The choice is the boot policy's: [`crate::policy::plan`] (a pure function) puts the
//! profile's root into the [`BootPlan`]; this module only asks for the requesting client's plan
//! by its address ([`PlanLookup`]) and opens the file in that plan's root. Every root is a
//! [`RootSource`], so a path resolves inside it with the same confinement as the main root
//! (`..`, symlinks leaving the root and NUL tricks never escape, absolute paths are mapped into
//! the root). A client whose plan names no root, or whose plan cannot be found (no MAC for its
//! address), is served from the main root.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::TftpConfig;
use super::fs::{FileSource, RootSource, TftpFile, TftpFileError};
use crate::policy::{BootPlan, Policy};

/// The boot plan of the client at an address, if the server can name the client (its MAC,
/// from the lease or the ARP table).
pub type PlanLookup = Arc<dyn Fn(IpAddr) -> Option<BootPlan> + Send + Sync>;

/// A [`FileSource`] that serves each client from its profile's root.
pub struct ProfileRoots {
    main: Arc<dyn FileSource>,
    /// One source per distinct configured root, opened once at start.
    roots: HashMap<PathBuf, Arc<dyn FileSource>>,
    plan_of: PlanLookup,
}

/// A profile's `tftp_root` that cannot be served.
#[derive(Debug, thiserror::Error)]
#[error("profile `{profile}`: tftp_root {}: {source}", root.display())]
pub struct ProfileRootError {
    /// The profile naming it.
    pub profile: String,
    /// The configured path.
    pub root: PathBuf,
    /// Why it cannot be opened.
    pub source: io::Error,
}

impl ProfileRoots {
    /// Serve from `main` unless the client's plan names a root; open every profile root of
    /// `policy` now (with `config`'s case and fallback options), so a missing directory is a
    /// start-up error naming the profile rather than a "file not found" at boot time.
    pub fn new(
        main: Arc<dyn FileSource>,
        policy: &Policy,
        config: &TftpConfig,
        plan_of: PlanLookup,
    ) -> Result<Self, ProfileRootError> {
        let mut roots: HashMap<PathBuf, Arc<dyn FileSource>> = HashMap::new();
        for (profile, root) in policy.tftp_roots() {
            if roots.contains_key(root) {
                continue;
            }
            let source = RootSource::new(root, config.case_insensitive, &config.fallback_dirs)
                .map_err(|source| ProfileRootError {
                    profile: profile.to_string(),
                    root: root.to_path_buf(),
                    source,
                })?;
            roots.insert(root.to_path_buf(), Arc::new(source));
        }
        Ok(ProfileRoots {
            main,
            roots,
            plan_of,
        })
    }

    /// The configured root the client at `ip` is served from; `None`: the main root.
    pub fn root_for(&self, ip: IpAddr) -> Option<PathBuf> {
        (self.plan_of)(ip).and_then(|plan| plan.tftp_root)
    }

    fn source_for(&self, ip: IpAddr) -> &Arc<dyn FileSource> {
        self.root_for(ip)
            .as_deref()
            .and_then(|root: &Path| self.roots.get(root))
            .unwrap_or(&self.main)
    }
}

impl FileSource for ProfileRoots {
    fn open(&self, peer: SocketAddr, path: &str) -> Result<TftpFile, TftpFileError> {
        self.source_for(peer.ip()).open(peer, path)
    }
}

#[cfg(test)]
mod tests;
