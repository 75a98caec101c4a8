//! Sealing secrets at rest with the operator key: the CA's private key is
//! kept in the replicated state only in this sealed form.
//!
//! The operator key is 32 random bytes the operator keeps outside the
//! cluster, in a file of 64 hex digits (`neph-controller init` writes one;
//! every controller reads it at start). Sealing is AES-256-GCM from `ring`
//! with a random 96-bit nonce (few values are ever sealed under one key).
//!
//! ```text
//! sealed = "NEPHSEAL" | version (1 byte, 1) | key id (8 bytes) | nonce (12) | ciphertext | tag (16)
//! key id = first 8 bytes of SHA-256("nephele operator key id" | key)
//! ```
//!
//! The key id tells "this is not the key it was sealed with" apart from
//! "the sealed bytes were changed", so both get their own message; it
//! reveals nothing usable about the key. The caller's `context` (the
//! cluster id for the CA key) is authenticated as associated data, so a
//! sealed value cannot be moved to another cluster unnoticed.
//!
//! Not done: the key is not zeroed from memory on drop (that needs
//! `zeroize`; the process holding it holds the unsealed CA key anyway).

use std::fmt;
use std::path::Path;

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use thiserror::Error;

use crate::identity::hex;

/// Magic at the start of a sealed value.
pub const SEAL_MAGIC: &[u8; 8] = b"NEPHSEAL";
/// The sealed format's version.
pub const SEAL_VERSION: u8 = 1;
const KEY_ID_LEN: usize = 8;
const HEADER_LEN: usize = SEAL_MAGIC.len() + 1 + KEY_ID_LEN + NONCE_LEN;
const TAG_LEN: usize = 16;

/// The operator's key-encryption key.
#[derive(Clone, PartialEq, Eq)]
pub struct OperatorKey([u8; 32]);

impl fmt::Debug for OperatorKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OperatorKey(id {})", hex(&self.id()))
    }
}

/// Why an operator key could not be made, read or written.
#[derive(Debug, Error)]
pub enum OperatorKeyError {
    /// The OS random source failed.
    #[error("the system random source failed")]
    Random,
    /// The key file could not be read or written.
    #[error("cannot access the operator key file {path}")]
    Io {
        /// The file.
        path: String,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The key file does not hold 64 hex digits.
    #[error(
        "the operator key file {path} does not hold a key (64 hex digits on one line are expected)"
    )]
    Format {
        /// The file.
        path: String,
    },
}

impl OperatorKey {
    /// A new random key.
    pub fn generate() -> Result<Self, OperatorKeyError> {
        let mut k = [0u8; 32];
        SystemRandom::new()
            .fill(&mut k)
            .map_err(|_| OperatorKeyError::Random)?;
        Ok(OperatorKey(k))
    }

    /// A key from its 32 bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        OperatorKey(bytes)
    }

    /// Parses 64 hex digits (surrounding whitespace ignored).
    pub fn from_hex(text: &str) -> Option<Self> {
        let t = text.trim();
        if t.len() != 64 || !t.is_ascii() {
            return None;
        }
        let mut k = [0u8; 32];
        for (i, byte) in k.iter_mut().enumerate() {
            *byte = u8::from_str_radix(t.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(OperatorKey(k))
    }

    /// The key as 64 hex digits.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    /// Reads a key file.
    pub fn load(path: &Path) -> Result<Self, OperatorKeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| OperatorKeyError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_hex(&text).ok_or_else(|| OperatorKeyError::Format {
            path: path.display().to_string(),
        })
    }

    /// Writes a new key file, readable by its owner only; refuses to
    /// overwrite an existing one (that would lose the old key).
    pub fn save(&self, path: &Path) -> Result<(), OperatorKeyError> {
        crate::files::write_private(path, format!("{}\n", self.to_hex()).as_bytes(), false).map_err(
            |source| OperatorKeyError::Io {
                path: path.display().to_string(),
                source,
            },
        )
    }

    /// The key's public id (see the module doc).
    pub fn id(&self) -> [u8; KEY_ID_LEN] {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(b"nephele operator key id");
        ctx.update(&self.0);
        let d = ctx.finish();
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&d.as_ref()[..KEY_ID_LEN]);
        id
    }

    fn aead(&self) -> LessSafeKey {
        // 32 bytes is AES-256-GCM's key length, so this cannot fail.
        LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, &self.0).unwrap_or_else(|_| unreachable!("32-byte key")),
        )
    }
}

/// Why a value could not be sealed.
#[derive(Debug, Error)]
pub enum SealError {
    /// The OS random source failed.
    #[error("the system random source failed")]
    Random,
    /// The AEAD refused (the value is too large).
    #[error("the value is too large to seal")]
    TooLarge,
}

/// Why a sealed value could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum UnsealError {
    /// Not a sealed value at all.
    #[error("the data is not a sealed value (no NEPHSEAL header, or truncated)")]
    NotSealed,
    /// A format this build does not read.
    #[error("the sealed value has format version {0}; this build reads version 1")]
    Version(u8),
    /// Sealed with another operator key.
    #[error(
        "wrong operator key: the value was sealed with key id {sealed_with}, the given key has id {given}"
    )]
    WrongKey {
        /// Id of the key it was sealed with.
        sealed_with: String,
        /// Id of the key given.
        given: String,
    },
    /// Right key, but the bytes or the context were changed.
    #[error("the sealed value was altered or belongs to another context (authentication failed)")]
    Corrupted,
}

/// Seals `plaintext` under `key`, binding it to `context`.
pub fn seal(key: &OperatorKey, plaintext: &[u8], context: &[u8]) -> Result<Vec<u8>, SealError> {
    let mut nonce = [0u8; NONCE_LEN];
    SystemRandom::new()
        .fill(&mut nonce)
        .map_err(|_| SealError::Random)?;
    let mut out = Vec::with_capacity(HEADER_LEN + plaintext.len() + TAG_LEN);
    out.extend_from_slice(SEAL_MAGIC);
    out.push(SEAL_VERSION);
    out.extend_from_slice(&key.id());
    out.extend_from_slice(&nonce);
    let mut body = plaintext.to_vec();
    key.aead()
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(context),
            &mut body,
        )
        .map_err(|_| SealError::TooLarge)?;
    out.extend_from_slice(&body);
    Ok(out)
}

/// Opens a value [`seal`] made with the same key and context.
pub fn unseal(key: &OperatorKey, sealed: &[u8], context: &[u8]) -> Result<Vec<u8>, UnsealError> {
    if sealed.len() < HEADER_LEN + TAG_LEN || !sealed.starts_with(SEAL_MAGIC) {
        return Err(UnsealError::NotSealed);
    }
    let version = sealed[SEAL_MAGIC.len()];
    if version != SEAL_VERSION {
        return Err(UnsealError::Version(version));
    }
    let id_at = SEAL_MAGIC.len() + 1;
    let sealed_id = &sealed[id_at..id_at + KEY_ID_LEN];
    let given = key.id();
    if sealed_id != given {
        return Err(UnsealError::WrongKey {
            sealed_with: hex(sealed_id),
            given: hex(&given),
        });
    }
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&sealed[id_at + KEY_ID_LEN..HEADER_LEN]);
    let mut body = sealed[HEADER_LEN..].to_vec();
    let plain = key
        .aead()
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(context),
            &mut body,
        )
        .map_err(|_| UnsealError::Corrupted)?;
    Ok(plain.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_round_trips_and_detects_tampering() {
        let k = OperatorKey::generate().unwrap();
        let s = seal(&k, b"secret", b"cluster-a").unwrap();
        assert_eq!(unseal(&k, &s, b"cluster-a").unwrap(), b"secret");
        assert_eq!(unseal(&k, &s, b"cluster-b"), Err(UnsealError::Corrupted));
        let mut t = s.clone();
        let last = t.len() - 1;
        t[last] ^= 1;
        assert_eq!(unseal(&k, &t, b"cluster-a"), Err(UnsealError::Corrupted));
        let other = OperatorKey::generate().unwrap();
        let e = unseal(&other, &s, b"cluster-a").unwrap_err();
        assert!(matches!(e, UnsealError::WrongKey { .. }));
        assert!(e.to_string().starts_with("wrong operator key"), "{e}");
        assert_eq!(unseal(&k, b"NEPH", b""), Err(UnsealError::NotSealed));
        assert_eq!(unseal(&k, &s[..20], b""), Err(UnsealError::NotSealed));
        let mut v = s.clone();
        v[8] = 9;
        assert_eq!(unseal(&k, &v, b"cluster-a"), Err(UnsealError::Version(9)));
    }

    #[test]
    fn key_files_round_trip_and_are_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("operator.key");
        let k = OperatorKey::generate().unwrap();
        k.save(&p).unwrap();
        assert_eq!(OperatorKey::load(&p).unwrap(), k);
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(k.save(&p).is_err(), "never overwrites a key");
        std::fs::write(dir.path().join("bad"), "zz").unwrap();
        let e = OperatorKey::load(&dir.path().join("bad")).unwrap_err();
        assert!(matches!(e, OperatorKeyError::Format { .. }), "{e}");
        assert!(OperatorKey::from_hex(&"é".repeat(32)).is_none());
        assert!(
            !format!("{k:?}").contains(&k.to_hex()),
            "Debug hides the key"
        );
    }
}
