//! The CA directory: the mesh CA's material on disk, and its rotation.
//!
//! ```text
//! <ca-dir>/trust-bundle.pem   the anchors every workload trusts (one, or two mid-rotation)
//! <ca-dir>/issuer.pem         the anchor that signs workload certificates now
//! <ca-dir>/issuer-key.pem     its key (0600)
//! <ca-dir>/next.pem, next-key.pem   a new anchor, trusted but not yet signing
//! <ca-dir>/token.key          the secret join tokens are signed with (0600)
//! ```
//!
//! Root rotation in three steps, each taking effect as proxies renew (at ~70 % of the
//! certificate lifetime), with no connection refused at any point:
//!
//! 1. `ca add-anchor`: create `next`, add it to the bundle. Proxies learn to trust it.
//! 2. `ca use-next`: `next` becomes the issuer. Proxies get certificates from it.
//! 3. `ca drop-old`: the bundle keeps only the issuer. The old anchor is no longer trusted.
//!
//! The control plane re-reads the directory when these files change ([`CaStore::current`]
//! compares modification times), so the steps need no restart.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use wary_certs::ca::{DEFAULT_ANCHOR_LIFETIME, MeshCa};
use wary_certs::credentials::TrustBundle;
use wary_certs::{TrustDomain, certificates_from_pem, certificates_to_pem};

/// The CA material in force. Its `Debug` never shows the keys.
pub struct CaMaterial {
    /// Signs workload certificates.
    pub issuer: MeshCa,
    /// The anchors workloads trust.
    pub bundle: TrustBundle,
    /// Signs join tokens.
    pub token_key: Vec<u8>,
}

impl std::fmt::Debug for CaMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaMaterial")
            .field("anchors", &self.bundle.anchors().len())
            .finish_non_exhaustive()
    }
}

/// Why the CA directory is unusable.
#[derive(Debug, thiserror::Error)]
pub enum CaStoreError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// A file's content is unusable.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, and what to do.
        reason: String,
    },
}

/// The CA directory, read on demand and cached until its files change.
#[derive(Debug)]
pub struct CaStore {
    dir: PathBuf,
    cached: Mutex<Option<(FileStamps, Arc<CaMaterial>)>>,
}

/// Modification time, size and inode of each CA file, to notice a change: mtimes alone
/// miss two writes within one kernel clock tick, and every write here is a rename to a
/// new inode.
type FileStamps = Vec<Option<(SystemTime, u64, u64)>>;

const FILES: [&str; 4] = ["trust-bundle.pem", "issuer.pem", "issuer-key.pem", "token.key"];

impl CaStore {
    /// Opens `dir`, creating a new trust anchor, issuer and token key there when it holds
    /// none yet (the first start of a mesh).
    ///
    /// # Errors
    /// [`CaStoreError`] when the directory cannot be created or its files are unusable.
    pub fn open_or_create(dir: &Path, trust_domain: &TrustDomain) -> Result<Self, CaStoreError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| CaStoreError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        if !dir.join("issuer.pem").exists() {
            let anchor = MeshCa::create_anchor(trust_domain, DEFAULT_ANCHOR_LIFETIME).map_err(|e| invalid(dir, e))?;
            write(&dir.join("issuer-key.pem"), &anchor.key, true)?;
            write(&dir.join("issuer.pem"), &anchor.cert, false)?;
            write(&dir.join("trust-bundle.pem"), &anchor.cert, false)?;
            tracing::info!(dir = %dir.display(), "created a new mesh trust anchor");
        }
        if !dir.join("token.key").exists() {
            let key: [u8; 32] = rand::random();
            write(&dir.join("token.key"), &hex::encode(key), true)?;
        }
        let store = Self {
            dir: dir.to_path_buf(),
            cached: Mutex::new(None),
        };
        store.current()?;
        Ok(store)
    }

    /// The material in force, re-read if any file changed since the last call.
    ///
    /// # Errors
    /// [`CaStoreError`] when a changed file is unusable; the caller keeps using what it
    /// had (the previous material is not dropped from the cache).
    pub fn current(&self) -> Result<Arc<CaMaterial>, CaStoreError> {
        let stamps: FileStamps = FILES
            .iter()
            .map(|f| {
                use std::os::unix::fs::MetadataExt;
                let m = std::fs::metadata(self.dir.join(f)).ok()?;
                Some((m.modified().ok()?, m.len(), m.ino()))
            })
            .collect();
        let mut cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((seen, material)) = cached.as_ref()
            && *seen == stamps
        {
            return Ok(material.clone());
        }
        let material = match load(&self.dir) {
            Ok(m) => Arc::new(m),
            // Mid-rotation (files renamed one by one) or a bad edit: keep signing with what
            // was in force, and try again on the next call.
            Err(e) => match cached.as_ref() {
                Some((_, previous)) => {
                    tracing::warn!("the CA directory is unusable right now ({e}); keeping the previous CA");
                    return Ok(previous.clone());
                }
                None => return Err(e),
            },
        };
        if cached.is_some() {
            tracing::info!(dir = %self.dir.display(), anchors = material.bundle.anchors().len(), "reloaded the CA directory");
        }
        *cached = Some((stamps, material.clone()));
        Ok(material)
    }

    /// Rotation step 1: creates a new anchor (`next.pem`) and adds it to the bundle.
    ///
    /// # Errors
    /// [`CaStoreError`] when a rotation is already under way or a file fails.
    pub fn add_anchor(dir: &Path, trust_domain: &TrustDomain) -> Result<(), CaStoreError> {
        if dir.join("next.pem").exists() {
            return Err(invalid(
                dir,
                "a rotation is under way (next.pem exists): run `ca use-next` then `ca drop-old`",
            ));
        }
        let anchor = MeshCa::create_anchor(trust_domain, DEFAULT_ANCHOR_LIFETIME).map_err(|e| invalid(dir, e))?;
        write(&dir.join("next-key.pem"), &anchor.key, true)?;
        write(&dir.join("next.pem"), &anchor.cert, false)?;
        let bundle = read(&dir.join("trust-bundle.pem"))?;
        write(
            &dir.join("trust-bundle.pem"),
            &format!("{bundle}{}", anchor.cert),
            false,
        )
    }

    /// Rotation step 2: the new anchor becomes the issuer.
    ///
    /// # Errors
    /// [`CaStoreError`] when there is no `next.pem` or a file fails.
    pub fn use_next(dir: &Path) -> Result<(), CaStoreError> {
        if !dir.join("next.pem").exists() {
            return Err(invalid(dir, "no next.pem: run `ca add-anchor` first"));
        }
        for (from, to) in [("issuer.pem", "old.pem"), ("issuer-key.pem", "old-key.pem")] {
            rename(&dir.join(from), &dir.join(to))?;
        }
        // Key first: a reader never sees the new certificate with the old key.
        rename(&dir.join("next-key.pem"), &dir.join("issuer-key.pem"))?;
        rename(&dir.join("next.pem"), &dir.join("issuer.pem"))
    }

    /// Rotation step 3: the bundle keeps only the issuer; the old anchor is removed.
    ///
    /// # Errors
    /// [`CaStoreError`] when a file fails.
    pub fn drop_old(dir: &Path) -> Result<(), CaStoreError> {
        let issuer = read(&dir.join("issuer.pem"))?;
        write(&dir.join("trust-bundle.pem"), &issuer, false)?;
        for f in ["old.pem", "old-key.pem"] {
            let _ = std::fs::remove_file(dir.join(f));
        }
        Ok(())
    }
}

fn load(dir: &Path) -> Result<CaMaterial, CaStoreError> {
    let cert = read(&dir.join("issuer.pem"))?;
    let key = read(&dir.join("issuer-key.pem"))?;
    let issuer = MeshCa::from_pem(&cert, &key).map_err(|e| invalid(&dir.join("issuer.pem"), e))?;
    let bundle_path = dir.join("trust-bundle.pem");
    let anchors = certificates_from_pem(&read(&bundle_path)?).map_err(|e| invalid(&bundle_path, e))?;
    if !anchors.iter().any(|a| a == issuer.certificate()) {
        return Err(invalid(
            &bundle_path,
            "does not contain the issuer (issuer.pem): workloads would not trust their own certificates",
        ));
    }
    let bundle = TrustBundle::new(anchors).map_err(|e| invalid(&bundle_path, e))?;
    let token_path = dir.join("token.key");
    let token_key = hex::decode(read(&token_path)?.trim()).map_err(|e| invalid(&token_path, e))?;
    if token_key.len() < 16 {
        return Err(invalid(
            &token_path,
            "shorter than 16 bytes: delete it and restart to create a new one",
        ));
    }
    Ok(CaMaterial {
        issuer,
        bundle,
        token_key,
    })
}

fn invalid(path: &Path, reason: impl std::fmt::Display) -> CaStoreError {
    CaStoreError::Invalid {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn read(path: &Path) -> Result<String, CaStoreError> {
    std::fs::read_to_string(path).map_err(|source| CaStoreError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn rename(from: &Path, to: &Path) -> Result<(), CaStoreError> {
    std::fs::rename(from, to).map_err(|source| CaStoreError::Io {
        path: from.to_path_buf(),
        source,
    })
}

/// Writes atomically (temporary file, then rename), secret files with mode 0600.
fn write(path: &Path, text: &str, secret: bool) -> Result<(), CaStoreError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| CaStoreError::Io {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("tmp");
    // A fresh file, never one left behind (whose mode or link target we did not choose).
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(&tmp)
        .map_err(io)?;
    f.write_all(text.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// The trust bundle as PEM, for `--trust-anchors` files.
pub fn bundle_pem(material: &CaMaterial) -> String {
    certificates_to_pem(material.bundle.anchors())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_steps_change_bundle_and_issuer() {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::default();
        let store = CaStore::open_or_create(dir.path(), &td).unwrap();
        let first = store.current().unwrap();
        assert_eq!(first.bundle.anchors().len(), 1);
        let old_issuer = first.issuer.certificate().clone();

        CaStore::add_anchor(dir.path(), &td).unwrap();
        let err = CaStore::add_anchor(dir.path(), &td).unwrap_err();
        assert!(err.to_string().contains("rotation is under way"), "{err}");
        let step1 = store.current().unwrap();
        assert_eq!(step1.bundle.anchors().len(), 2);
        assert_eq!(step1.issuer.certificate(), &old_issuer);

        CaStore::use_next(dir.path()).unwrap();
        let step2 = store.current().unwrap();
        assert_ne!(step2.issuer.certificate(), &old_issuer);
        assert_eq!(step2.bundle.anchors().len(), 2);

        CaStore::drop_old(dir.path()).unwrap();
        let step3 = store.current().unwrap();
        assert_eq!(step3.bundle.anchors(), [step3.issuer.certificate().clone()]);
    }
}
