//! Signed model versions (issue 14, item 3): integrity that does not rest on a
//! checksum stored next to the model by anyone who can write there.
//!
//! Each version's `metadata.json` (which records the model's SHA-256, so it
//! covers the model's bytes) is signed with ed25519 by the publishing side only:
//! the trainer when it publishes, the promoter when it migrates versions
//! published before signing existed. The signature lies beside the metadata in
//! `metadata.sig` (see [`VersionSignature`]) and is written *before* the metadata,
//! which stays the version's commit marker, so a committed version published by a
//! signing trainer is never seen unsigned. Inference holds only public keys, a
//! [`Keyring`] of trusted keys (several, so the signing key can be rotated), and
//! verifies before loading ([`crate::Store::load_verified_model_within`]).
//!
//! Keys are PKCS#8 PEM (`openssl genpkey -algorithm ed25519`), public keys SPKI
//! PEM (`openssl pkey -pubout`). A key is named by its id: the first 8 bytes of
//! the SHA-256 of its 32 raw public-key bytes, in hex.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signature, Signer, VerifyingKey};
use mnistflow_nats::ModelVersion;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A version's signature file, beside its metadata.
pub const SIGNATURE_FILE: &str = "metadata.sig";

/// The only algorithm written and accepted.
pub const ALGORITHM: &str = "ed25519";

/// Domain separation: a signature over a model version's metadata cannot be
/// replayed as a signature over anything else, nor moved to another version.
const CONTEXT: &[u8] = b"mnistflow model version metadata v1\n";

/// What went wrong with a key, a keyring or a signature.
#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    /// A key file cannot be read or written.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// A key file does not hold what it should.
    #[error("{what}: {message}")]
    BadKey { what: String, message: String },
    /// A keyring with no key would refuse every version.
    #[error("the keyring {0} holds no public key")]
    EmptyKeyring(String),
}

/// Why a version's signature does not vouch for it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("unsigned: no {SIGNATURE_FILE} (sign it with the publishing key, or let the promoter migrate it)")]
    Unsigned,
    #[error("{SIGNATURE_FILE} does not decode: {0}")]
    Malformed(String),
    #[error("signed with {0:?}, only {ALGORITHM} is accepted")]
    Algorithm(String),
    #[error("signed by key {key_id}, which is not in the trusted keyring ({trusted})")]
    UnknownKey { key_id: String, trusted: String },
    #[error("the signature by key {key_id} does not match the metadata: the version was changed after signing")]
    Mismatch { key_id: String },
}

/// The content of `metadata.sig`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionSignature {
    /// Always [`ALGORITHM`].
    pub algorithm: String,
    /// Which key signed (see the module's documentation).
    pub key_id: String,
    /// The 64-byte ed25519 signature, hex.
    pub signature: String,
}

impl VersionSignature {
    /// The bytes of `metadata.sig`.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec_pretty(self).unwrap_or_default();
        out.push(b'\n');
        out
    }

    /// Decodes `metadata.sig`.
    ///
    /// # Errors
    /// [`SignatureError::Malformed`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, SignatureError> {
        serde_json::from_slice(bytes).map_err(|e| SignatureError::Malformed(e.to_string()))
    }
}

/// What is signed: the context, the version's name, and the metadata's exact bytes.
fn message(version: &ModelVersion, metadata: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(CONTEXT.len() + version.as_str().len() + 1 + metadata.len());
    m.extend_from_slice(CONTEXT);
    m.extend_from_slice(version.as_str().as_bytes());
    m.push(b'\n');
    m.extend_from_slice(metadata);
    m
}

/// A public key's id (see the module's documentation).
pub fn key_id(key: &VerifyingKey) -> String {
    hex::encode(&Sha256::digest(key.as_bytes())[..8])
}

/// The private model-signing key (the trainer's and the promoter's only).
pub struct SigningKey {
    key: ed25519_dalek::SigningKey,
    id: String,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey").field("key_id", &self.id).finish_non_exhaustive()
    }
}

impl SigningKey {
    fn new(key: ed25519_dalek::SigningKey) -> Self {
        let id = key_id(&key.verifying_key());
        Self { key, id }
    }

    /// A fresh random key.
    pub fn generate() -> Self {
        let mut secret: [u8; 32] = rand::random();
        let key = ed25519_dalek::SigningKey::from_bytes(&secret);
        secret.fill(0);
        Self::new(key)
    }

    /// Decodes a PKCS#8 PEM private key.
    ///
    /// # Errors
    /// [`SigningError::BadKey`].
    pub fn from_pem(pem: &str, what: &str) -> Result<Self, SigningError> {
        ed25519_dalek::SigningKey::from_pkcs8_pem(pem.trim()).map(Self::new).map_err(|e| SigningError::BadKey {
            what: what.to_owned(),
            message: format!("not an ed25519 PKCS#8 PEM private key ({e})"),
        })
    }

    /// Reads a PKCS#8 PEM private key file.
    ///
    /// # Errors
    /// The file cannot be read or holds no such key.
    pub fn read(path: &Path) -> Result<Self, SigningError> {
        let text = std::fs::read_to_string(path).map_err(|source| SigningError::Io { path: path.into(), source })?;
        Self::from_pem(&text, &path.display().to_string())
    }

    /// The key at `path`, generated there first (mode 0600, with its public key
    /// beside it as `<path>.pub`) if there is none: the local run's key.
    /// Concurrent callers end up with the same key.
    ///
    /// # Errors
    /// The files cannot be written or read.
    pub fn read_or_generate(path: &Path) -> Result<Self, SigningError> {
        let io = |source| SigningError::Io { path: path.into(), source };
        if !path.exists() {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(io)?;
            }
            let key = Self::generate();
            let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let written = options.open(&tmp).and_then(|mut file| {
                file.write_all(key.to_pem().as_bytes())?;
                file.sync_all()
            });
            // A link, not a rename: it fails if another caller got there first.
            let linked = written.and_then(|()| std::fs::hard_link(&tmp, path));
            let _ = std::fs::remove_file(&tmp);
            match linked {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io(e)),
            }
        }
        let key = Self::read(path)?;
        let public = public_key_path(path);
        let pem = key.public_pem();
        if std::fs::read_to_string(&public).ok().as_deref() != Some(pem.as_str()) {
            std::fs::write(&public, pem).map_err(|source| SigningError::Io { path: public, source })?;
        }
        Ok(key)
    }

    /// The private key as PKCS#8 PEM.
    fn to_pem(&self) -> String {
        self.key.to_pkcs8_pem(LineEnding::LF).map(|pem| pem.to_string()).unwrap_or_default()
    }

    /// The public key as SPKI PEM (what goes into inference's keyring).
    pub fn public_pem(&self) -> String {
        self.key.verifying_key().to_public_key_pem(LineEnding::LF).unwrap_or_default()
    }

    /// The key's id.
    pub fn key_id(&self) -> &str {
        &self.id
    }

    /// Signs a version's metadata, given as the exact bytes stored.
    pub fn sign(&self, version: &ModelVersion, metadata: &[u8]) -> VersionSignature {
        VersionSignature {
            algorithm: ALGORITHM.to_owned(),
            key_id: self.id.clone(),
            signature: hex::encode(self.key.sign(&message(version, metadata)).to_bytes()),
        }
    }
}

/// Where [`SigningKey::read_or_generate`] puts the public key of `private`.
pub fn public_key_path(private: &Path) -> PathBuf {
    let mut name = private.as_os_str().to_owned();
    name.push(".pub");
    PathBuf::from(name)
}

/// The public keys inference trusts, by id.
#[derive(Debug, Clone, Default)]
pub struct Keyring {
    keys: BTreeMap<String, VerifyingKey>,
    source: String,
}

impl Keyring {
    /// Reads a keyring: a file of one or more SPKI PEM public keys, or a
    /// directory of such files (a mounted ConfigMap; hidden entries skipped).
    ///
    /// # Errors
    /// A file cannot be read, a PEM block is not an ed25519 public key, or no key
    /// is found at all.
    pub fn read(path: &Path) -> Result<Self, SigningError> {
        let io = |p: &Path| {
            let p = p.to_path_buf();
            move |source| SigningError::Io { path: p, source }
        };
        let mut files = Vec::new();
        if path.is_dir() {
            for entry in std::fs::read_dir(path).map_err(io(path))? {
                let entry = entry.map_err(io(path))?;
                let hidden = entry.file_name().to_string_lossy().starts_with('.');
                // A ConfigMap's files are links into a hidden directory: follow them.
                if !hidden && entry.path().is_file() {
                    files.push(entry.path());
                }
            }
            files.sort();
        } else {
            files.push(path.to_path_buf());
        }
        let mut ring = Self { keys: BTreeMap::new(), source: path.display().to_string() };
        for file in files {
            let text = std::fs::read_to_string(&file).map_err(io(&file))?;
            ring.add_pem(&text, &file.display().to_string())?;
        }
        if ring.keys.is_empty() {
            return Err(SigningError::EmptyKeyring(ring.source));
        }
        Ok(ring)
    }

    /// Adds every `PUBLIC KEY` PEM block of `text`.
    ///
    /// # Errors
    /// A block is not an ed25519 public key.
    pub fn add_pem(&mut self, text: &str, what: &str) -> Result<(), SigningError> {
        const BEGIN: &str = "-----BEGIN PUBLIC KEY-----";
        const END: &str = "-----END PUBLIC KEY-----";
        let mut rest = text;
        while let Some(start) = rest.find(BEGIN) {
            let Some(len) = rest[start..].find(END) else {
                return Err(SigningError::BadKey {
                    what: what.to_owned(),
                    message: "an unterminated PEM block".into(),
                });
            };
            let block = &rest[start..start + len + END.len()];
            let key = VerifyingKey::from_public_key_pem(block).map_err(|e| SigningError::BadKey {
                what: what.to_owned(),
                message: format!("not an ed25519 SPKI PEM public key ({e})"),
            })?;
            self.keys.insert(key_id(&key), key);
            rest = &rest[start + len + END.len()..];
        }
        Ok(())
    }

    /// Trusts `key`'s public half (tests; the local run reads files).
    pub fn trust(&mut self, key: &SigningKey) {
        let public = key.key.verifying_key();
        self.keys.insert(key_id(&public), public);
    }

    /// The ids of the trusted keys.
    pub fn key_ids(&self) -> Vec<&str> {
        self.keys.keys().map(String::as_str).collect()
    }

    /// Checks that `signature` (the bytes of `metadata.sig`, `None` when there is
    /// none) is a trusted key's signature over `metadata` of `version`; returns the
    /// key's id.
    ///
    /// # Errors
    /// Why the version is not vouched for.
    pub fn verify(
        &self,
        version: &ModelVersion,
        metadata: &[u8],
        signature: Option<&[u8]>,
    ) -> Result<String, SignatureError> {
        let signature = VersionSignature::from_bytes(signature.ok_or(SignatureError::Unsigned)?)?;
        if signature.algorithm != ALGORITHM {
            return Err(SignatureError::Algorithm(signature.algorithm));
        }
        let key = self.keys.get(&signature.key_id).ok_or_else(|| SignatureError::UnknownKey {
            key_id: signature.key_id.clone(),
            trusted: self.key_ids().join(", "),
        })?;
        let bytes: [u8; 64] = hex::decode(&signature.signature)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| SignatureError::Malformed("the signature is not 64 bytes of hex".into()))?;
        key.verify_strict(&message(version, metadata), &Signature::from_bytes(&bytes))
            .map_err(|_| SignatureError::Mismatch { key_id: signature.key_id.clone() })?;
        Ok(signature.key_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> ModelVersion {
        ModelVersion(s.into())
    }

    #[test]
    fn a_signature_verifies_only_for_its_bytes_its_version_and_a_trusted_key() {
        let key = SigningKey::generate();
        let mut ring = Keyring::default();
        ring.trust(&key);
        let sig = key.sign(&v("a"), b"{}").to_bytes();
        assert_eq!(ring.verify(&v("a"), b"{}", Some(&sig)).unwrap(), key.key_id());
        assert!(matches!(ring.verify(&v("a"), b"{ }", Some(&sig)), Err(SignatureError::Mismatch { .. })));
        assert!(matches!(ring.verify(&v("b"), b"{}", Some(&sig)), Err(SignatureError::Mismatch { .. })));
        assert_eq!(ring.verify(&v("a"), b"{}", None), Err(SignatureError::Unsigned));
        let other = SigningKey::generate().sign(&v("a"), b"{}").to_bytes();
        assert!(matches!(ring.verify(&v("a"), b"{}", Some(&other)), Err(SignatureError::UnknownKey { .. })));
        assert!(matches!(ring.verify(&v("a"), b"{}", Some(b"nope")), Err(SignatureError::Malformed(_))));
    }

    #[test]
    fn keys_round_trip_through_pem_files_and_a_keyring_directory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/model-signing.pem");
        let key = SigningKey::read_or_generate(&path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        let again = SigningKey::read_or_generate(&path).unwrap();
        assert_eq!(key.key_id(), again.key_id(), "generated once");
        let second = SigningKey::generate();
        std::fs::write(dir.path().join("keys/second.pub"), second.public_pem()).unwrap();
        std::fs::remove_file(&path).unwrap();
        let ring = Keyring::read(&dir.path().join("keys")).unwrap();
        let mut ids = vec![key.key_id(), second.key_id()];
        ids.sort_unstable();
        assert_eq!(ring.key_ids(), ids);
        assert!(matches!(Keyring::read(dir.path().join("empty").as_path()), Err(SigningError::Io { .. })));
        std::fs::write(dir.path().join("garbage.pem"), "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
            .unwrap();
        assert!(matches!(Keyring::read(&dir.path().join("garbage.pem")), Err(SigningError::BadKey { .. })));
        std::fs::write(dir.path().join("none.pem"), "nothing here").unwrap();
        assert!(matches!(Keyring::read(&dir.path().join("none.pem")), Err(SigningError::EmptyKeyring(_))));
    }
}
