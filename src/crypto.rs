//! The cluster key: sealing of event bodies and MACs on the ring's records.
//!
//! Every server of a cluster holds the same 256-bit key in a file
//! (`[security] key_file`, hex, mode 0600). From it, HKDF-SHA256 derives one
//! key per purpose, each under its own label:
//!
//! | label | use |
//! |---|---|
//! | `provring seal v1` | AES-256-GCM over event bodies ([`KeyRing::seal`]) |
//! | `provring sign v1` | HMAC-SHA256 over topology records and mirror/handover frames ([`KeyRing::sign`]) |
//! | `provring fingerprint v1` | the key's fingerprint: first 8 bytes of SHA-256 of this value |
//! | `provring peer v1` | the bearer token servers present to each other's admin API |
//!
//! The fingerprint is public (servers publish it in `Joined`) and doubles
//! as the *key id* written into every sealed body and MAC trailer, so that
//! rotation is a lookup: the newest key seals and signs, every configured
//! key (`previous_key_files`) opens and verifies.
//!
//! Byte formats:
//!
//! ```text
//! sealed body:  version u8 = 1 | key id [8] | nonce [12] | ciphertext + tag [16]
//! MAC trailer:  payload | key id [8] | HMAC-SHA256(context u8 | payload | key id) [32]
//! ```
//! Nonces are random (96 bits from aws-lc's DRBG). NIST SP 800-38D bounds
//! one key to 2^32 seals with random nonces: at a million events a day
//! (each sealed once, plus a re-seal per move or rekey) that is over ten
//! years; a fleet near that volume rotates its key sooner (`provring
//! rekey`). A decoder checks a trailer before it parses anything of the
//! payload.

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::{digest, hkdf, hmac};
use std::path::{Path, PathBuf};

/// Bytes of a cluster key.
pub const KEY_LEN: usize = 32;
/// Bytes of a key id (fingerprint).
pub const KEY_ID_LEN: usize = 8;
const TAG_LEN: usize = 16;
const MAC_LEN: usize = 32;
const SEALED_VERSION: u8 = 1;
/// Bytes a sealed body adds to its plaintext.
pub const SEAL_OVERHEAD: usize = 1 + KEY_ID_LEN + NONCE_LEN + TAG_LEN;
/// Bytes a MAC trailer adds to its payload.
pub const MAC_OVERHEAD: usize = KEY_ID_LEN + MAC_LEN;

/// What a MAC protects; part of the MAC input, so that a record of one kind
/// is never accepted as another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Context {
    Topology = 1,
    Mirror = 2,
    Handover = 3,
}

/// Why a key file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read key file {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error(
        "key file {path} is readable by group or others (mode {mode:04o}); \
         a cluster key must be private to its owner: run `chmod 600 {path}`"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error(
        "key file {path} does not hold a key: expected {hex} hexadecimal digits \
         (as `provring keygen` writes), found {found}"
    , hex = KEY_LEN * 2)]
    Format { path: PathBuf, found: String },
    #[error("cannot write key file {path}: {reason}")]
    Write { path: PathBuf, reason: String },
    #[error("the random number generator failed")]
    Random,
}

/// Why a sealed body cannot be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("sealed body is too short ({0} bytes)")]
    Short(usize),
    #[error("sealed body has unknown version {0}")]
    Version(u8),
    #[error(
        "sealed with key {0}, which is not among this server's keys (key_file, previous_key_files)"
    )]
    UnknownKey(String),
    #[error("the random number generator failed; nothing was sealed")]
    Random,
    #[error("a body of {0} bytes is too long to seal")]
    TooLong(usize),
    #[error("sealed body does not authenticate under key {0} (damaged, or not this event's)")]
    Damaged(String),
}

/// Why a MAC trailer is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MacError {
    #[error("record of {0} bytes is too short to carry a MAC")]
    Short(usize),
    #[error("signed with key {0}, which is not among this server's keys")]
    UnknownKey(String),
    #[error("MAC does not match under key {0} (forged or damaged)")]
    Mismatch(String),
}

impl MacError {
    /// The key id the record claims, if it names one.
    pub fn claimed_key(&self) -> Option<&str> {
        match self {
            MacError::Short(_) => None,
            MacError::UnknownKey(k) | MacError::Mismatch(k) => Some(k),
        }
    }
}

struct ClusterKey {
    id: [u8; KEY_ID_LEN],
    seal: LessSafeKey,
    sign: hmac::Key,
    /// The admin API's peer token (hex).
    peer: String,
}

/// The cluster key and the previous keys still accepted; cheap to share
/// behind an `Arc`. `Debug` shows fingerprints only.
pub struct KeyRing {
    /// Newest first: `keys[0]` seals and signs.
    keys: Vec<ClusterKey>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRing")
            .field("fingerprints", &self.fingerprints())
            .finish()
    }
}

struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

fn derive(key: &[u8; KEY_LEN], label: &str) -> [u8; KEY_LEN] {
    let mut out = [0u8; KEY_LEN];
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"provring cluster key").extract(key);
    let info = [label.as_bytes()];
    // Expanding 32 bytes from SHA-256 cannot fail (the limit is 255 × 32);
    // never go on with an all-zero key if it did.
    prk.expand(&info, Len(KEY_LEN))
        .and_then(|okm| okm.fill(&mut out))
        .expect("HKDF-SHA256 expands 32 bytes");
    out
}

impl ClusterKey {
    fn new(raw: &[u8; KEY_LEN]) -> ClusterKey {
        let mut seal = derive(raw, "provring seal v1");
        let mut sign = derive(raw, "provring sign v1");
        let fp = derive(raw, "provring fingerprint v1");
        let mut peer = derive(raw, "provring peer v1");
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&digest::digest(&digest::SHA256, &fp).as_ref()[..KEY_ID_LEN]);
        let key = ClusterKey {
            id,
            seal: LessSafeKey::new(
                UnboundKey::new(&AES_256_GCM, &seal).expect("AES-256-GCM takes a 32-byte key"),
            ),
            sign: hmac::Key::new(hmac::HMAC_SHA256, &sign),
            peer: hex(&peer),
        };
        peer.fill(0);
        seal.fill(0);
        sign.fill(0);
        key
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl KeyRing {
    /// A key ring from raw keys, newest first.
    pub fn from_keys(current: &[u8; KEY_LEN], previous: &[[u8; KEY_LEN]]) -> KeyRing {
        let mut keys = vec![ClusterKey::new(current)];
        for p in previous {
            let k = ClusterKey::new(p);
            if keys.iter().all(|have| have.id != k.id) {
                keys.push(k);
            }
        }
        KeyRing { keys }
    }

    /// Load `current` and `previous` key files, refusing any that group or
    /// others can read.
    pub fn load(current: &Path, previous: &[PathBuf]) -> Result<KeyRing, KeyError> {
        let mut first = read_key_file(current)?;
        let mut rest = Vec::new();
        for p in previous {
            rest.push(read_key_file(p)?);
        }
        let ring = KeyRing::from_keys(&first, &rest);
        first.fill(0);
        for r in &mut rest {
            r.fill(0);
        }
        Ok(ring)
    }

    /// A fresh random key ring (benchmarks, tests).
    pub fn random() -> Result<KeyRing, KeyError> {
        let mut raw = [0u8; KEY_LEN];
        aws_lc_rs::rand::fill(&mut raw).map_err(|_| KeyError::Random)?;
        let ring = KeyRing::from_keys(&raw, &[]);
        raw.fill(0);
        Ok(ring)
    }

    /// A fixed key ring for unit tests.
    #[doc(hidden)]
    pub fn test_ring() -> std::sync::Arc<KeyRing> {
        std::sync::Arc::new(KeyRing::from_keys(&[0x5a; KEY_LEN], &[]))
    }

    /// The fingerprint of the key that seals and signs (16 hex digits).
    pub fn fingerprint(&self) -> String {
        hex(&self.keys[0].id)
    }

    /// Fingerprints of every key, newest first.
    pub fn fingerprints(&self) -> Vec<String> {
        self.keys.iter().map(|k| hex(&k.id)).collect()
    }

    /// The admin API peer token of every key, newest first (the newest is
    /// the one to present).
    pub fn peer_tokens(&self) -> Vec<String> {
        self.keys.iter().map(|k| k.peer.clone()).collect()
    }

    /// Whether `fingerprint` names one of this ring's keys.
    pub fn knows(&self, fingerprint: &str) -> bool {
        self.keys.iter().any(|k| hex(&k.id) == fingerprint)
    }

    fn key(&self, id: &[u8]) -> Option<&ClusterKey> {
        self.keys.iter().find(|k| k.id == id)
    }

    /// Seal `plain` under the newest key; `ad` (the event identity) is
    /// authenticated but not stored.
    pub fn seal(&self, ad: &[u8], plain: &[u8]) -> Result<Vec<u8>, SealError> {
        let mut out = Vec::with_capacity(SEAL_OVERHEAD + plain.len());
        self.seal_into(ad, &[plain], &mut out)?;
        Ok(out)
    }

    /// Append the sealed concatenation of `parts` to `out`, sealing in
    /// place (no copy of the plaintext besides the one into `out`).
    pub fn seal_into(
        &self,
        ad: &[u8],
        parts: &[&[u8]],
        out: &mut Vec<u8>,
    ) -> Result<(), SealError> {
        let key = &self.keys[0];
        let mut nonce = [0u8; NONCE_LEN];
        // Never seal under a nonce that did not come from the generator.
        aws_lc_rs::rand::fill(&mut nonce).map_err(|_| SealError::Random)?;
        // Room for all of it first: a reallocation would leave a copy of
        // the plaintext in freed memory.
        out.reserve(SEAL_OVERHEAD + parts.iter().map(|p| p.len()).sum::<usize>());
        let start = out.len();
        out.push(SEALED_VERSION);
        out.extend_from_slice(&key.id);
        out.extend_from_slice(&nonce);
        let body = out.len();
        for p in parts {
            out.extend_from_slice(p);
        }
        let len = out.len() - body;
        match key.seal.seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(ad),
            &mut out[body..],
        ) {
            Ok(tag) => {
                out.extend_from_slice(tag.as_ref());
                Ok(())
            }
            Err(_) => {
                // Leave nothing of the plaintext behind.
                out[start..].fill(0);
                out.truncate(start);
                Err(SealError::TooLong(len))
            }
        }
    }

    /// Open a body sealed by [`seal`](Self::seal) with the same `ad`.
    pub fn open(&self, ad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        if sealed.len() < SEAL_OVERHEAD {
            return Err(SealError::Short(sealed.len()));
        }
        if sealed[0] != SEALED_VERSION {
            return Err(SealError::Version(sealed[0]));
        }
        let id = &sealed[1..1 + KEY_ID_LEN];
        let key = self.key(id).ok_or_else(|| SealError::UnknownKey(hex(id)))?;
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&sealed[1 + KEY_ID_LEN..1 + KEY_ID_LEN + NONCE_LEN]);
        let mut buf = sealed[1 + KEY_ID_LEN + NONCE_LEN..].to_vec();
        let n = key
            .seal
            .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(ad), &mut buf)
            .map_err(|_| SealError::Damaged(hex(id)))?
            .len();
        buf.truncate(n);
        Ok(buf)
    }

    /// The key id a sealed body names, if it is long enough to name one.
    pub fn sealed_key_id(sealed: &[u8]) -> Option<String> {
        sealed.get(1..1 + KEY_ID_LEN).map(hex)
    }

    /// Append a MAC trailer for `context` to `payload`.
    pub fn sign(&self, context: Context, mut payload: Vec<u8>) -> Vec<u8> {
        let key = &self.keys[0];
        payload.extend_from_slice(&key.id);
        let tag = mac(key, context, &payload);
        payload.extend_from_slice(tag.as_ref());
        payload
    }

    /// Check the MAC trailer of `bytes` for `context`; return the payload.
    pub fn verify<'a>(&self, context: Context, bytes: &'a [u8]) -> Result<&'a [u8], MacError> {
        if bytes.len() < MAC_OVERHEAD {
            return Err(MacError::Short(bytes.len()));
        }
        let (signed, tag) = bytes.split_at(bytes.len() - MAC_LEN);
        let id = &signed[signed.len() - KEY_ID_LEN..];
        let key = self.key(id).ok_or_else(|| MacError::UnknownKey(hex(id)))?;
        let mut input = Vec::with_capacity(signed.len() + 1);
        input.push(context as u8);
        input.extend_from_slice(signed);
        hmac::verify(&key.sign, &input, tag).map_err(|_| MacError::Mismatch(hex(id)))?;
        Ok(&signed[..signed.len() - KEY_ID_LEN])
    }
}

fn mac(key: &ClusterKey, context: Context, signed: &[u8]) -> hmac::Tag {
    let mut ctx = hmac::Context::with_key(&key.sign);
    ctx.update(&[context as u8]);
    ctx.update(signed);
    ctx.sign()
}

/// Where a sealed body lives; the first byte of its associated data, so
/// that a body sealed for one place is refused in another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Sealed {
    /// In a batch record (repository, copies, mirror, handover).
    Record = b'r',
    /// On the parking queue.
    Parked = b'p',
}

/// Associated data of an event's sealed body: where it lives, then its
/// identity and type, each length-prefixed so that no two events give
/// the same bytes. The type is authenticated too, so that a record edited
/// on disk cannot turn a create into a delete.
pub fn event_ad(place: Sealed, source: &str, id: &str, event_type: &str) -> Vec<u8> {
    let mut ad = Vec::with_capacity(13 + source.len() + id.len() + event_type.len());
    ad.push(place as u8);
    for s in [source, id, event_type] {
        ad.extend_from_slice(&(s.len() as u32).to_be_bytes());
        ad.extend_from_slice(s.as_bytes());
    }
    ad
}

fn read_key_file(path: &Path) -> Result<[u8; KEY_LEN], KeyError> {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    let read_err = |e: std::io::Error| KeyError::Read {
        path: path.to_owned(),
        reason: e.to_string(),
    };
    // One open, and the checks on what was opened (a symbolic link, as
    // secret mounts use, is followed; what it points to is checked).
    let file = std::fs::File::open(path).map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    if !meta.is_file() {
        return Err(KeyError::Read {
            path: path.to_owned(),
            reason: "not a regular file".into(),
        });
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Permissions {
            path: path.to_owned(),
            mode,
        });
    }
    let mut text = String::new();
    file.take(4096)
        .read_to_string(&mut text)
        .map_err(read_err)?;
    let parsed = parse_hex_key(text.trim());
    let found = describe_found(text.trim());
    // Leave no copy of the key in the freed buffer.
    let cap = text.capacity();
    text.clear();
    text.extend(std::iter::repeat_n('\0', cap));
    parsed.ok_or_else(|| KeyError::Format {
        path: path.to_owned(),
        found,
    })
}

/// What a malformed key file holds, described without quoting it.
fn describe_found(text: &str) -> String {
    let digits = text.chars().filter(char::is_ascii_hexdigit).count();
    format!(
        "{} characters, {digits} of them hexadecimal digits",
        text.chars().count()
    )
}

fn parse_hex_key(text: &str) -> Option<[u8; KEY_LEN]> {
    let bytes = text.as_bytes();
    if bytes.len() != KEY_LEN * 2 {
        return None;
    }
    let mut out = [0u8; KEY_LEN];
    for (i, pair) in bytes.chunks(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

/// Write a new random key to `path` (mode 0600; an existing file is never
/// overwritten). Returns its fingerprint.
pub fn keygen(path: &Path) -> Result<String, KeyError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut raw = [0u8; KEY_LEN];
    aws_lc_rs::rand::fill(&mut raw).map_err(|_| KeyError::Random)?;
    let write_err = |e: std::io::Error| KeyError::Write {
        path: path.to_owned(),
        reason: if e.kind() == std::io::ErrorKind::AlreadyExists {
            "the file exists; provring never overwrites a key (move it away first)".into()
        } else {
            e.to_string()
        },
    };
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).map_err(write_err)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(write_err)?;
    let mut text = hex(&raw);
    text.push('\n');
    let written = file
        .write_all(text.as_bytes())
        .and_then(|_| file.sync_all());
    let fingerprint = KeyRing::from_keys(&raw, &[]).fingerprint();
    raw.fill(0);
    text.clear();
    written.map_err(write_err)?;
    Ok(fingerprint)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(b: u8) -> KeyRing {
        KeyRing::from_keys(&[b; KEY_LEN], &[])
    }

    #[test]
    fn sealed_bodies_open_only_with_their_key_and_identity() {
        let k = ring(1);
        let ad = event_ad(Sealed::Record, "/hr", "1", "t");
        let sealed = k.seal(&ad, b"{\"password\":\"s3cret\"}").expect("seal");
        assert!(!sealed.windows(6).any(|w| w == b"s3cret"));
        assert_eq!(
            k.open(&ad, &sealed).expect("open"),
            b"{\"password\":\"s3cret\"}"
        );
        // Another identity, another key, a flipped bit: refused.
        assert!(matches!(
            k.open(&event_ad(Sealed::Record, "/hr", "2", "t"), &sealed),
            Err(SealError::Damaged(_))
        ));
        for other in [
            event_ad(Sealed::Parked, "/hr", "1", "t"),
            event_ad(Sealed::Record, "/hr", "1", "u"),
            event_ad(Sealed::Record, "/hr1", "", "t"),
        ] {
            assert!(k.open(&other, &sealed).is_err());
        }
        assert!(matches!(
            ring(2).open(&ad, &sealed),
            Err(SealError::UnknownKey(_))
        ));
        let mut bad = sealed.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(k.open(&ad, &bad).is_err());
        for n in 0..sealed.len() {
            assert!(k.open(&ad, &sealed[..n]).is_err());
        }
        // Two seals of the same body differ (fresh nonce).
        assert_ne!(k.seal(&ad, b"x").ok(), k.seal(&ad, b"x").ok());
    }

    #[test]
    fn previous_keys_open_and_verify_the_newest_seals_and_signs() {
        let old = ring(1);
        let both = KeyRing::from_keys(&[2; KEY_LEN], &[[1; KEY_LEN]]);
        let ad = event_ad(Sealed::Record, "/s", "i", "t");
        let sealed = old.seal(&ad, b"body").expect("seal");
        assert_eq!(both.open(&ad, &sealed).expect("old key opens"), b"body");
        let resealed = both.seal(&ad, b"body").expect("seal");
        assert_eq!(
            KeyRing::sealed_key_id(&resealed),
            Some(ring(2).fingerprint())
        );
        let signed = old.sign(Context::Mirror, b"frame".to_vec());
        assert_eq!(
            both.verify(Context::Mirror, &signed).expect("verifies"),
            b"frame"
        );
        assert_eq!(both.fingerprints().len(), 2);
        assert!(both.knows(&old.fingerprint()));
    }

    #[test]
    fn macs_bind_key_context_and_every_byte() {
        let k = ring(3);
        let signed = k.sign(Context::Topology, b"{\"change\":1}".to_vec());
        assert_eq!(
            k.verify(Context::Topology, &signed).expect("valid"),
            b"{\"change\":1}"
        );
        assert!(matches!(
            k.verify(Context::Mirror, &signed),
            Err(MacError::Mismatch(_))
        ));
        assert!(matches!(
            ring(4).verify(Context::Topology, &signed),
            Err(MacError::UnknownKey(_))
        ));
        for i in 0..signed.len() {
            let mut bad = signed.clone();
            bad[i] ^= 0x40;
            assert!(k.verify(Context::Topology, &bad).is_err(), "byte {i}");
        }
        for n in 0..signed.len() {
            assert!(k.verify(Context::Topology, &signed[..n]).is_err());
        }
    }

    #[test]
    fn fingerprints_are_stable_and_distinct() {
        assert_eq!(ring(1).fingerprint(), ring(1).fingerprint());
        assert_ne!(ring(1).fingerprint(), ring(2).fingerprint());
        assert_eq!(ring(1).fingerprint().len(), 16);
        assert!(format!("{:?}", ring(1)).contains(&ring(1).fingerprint()));
    }

    #[test]
    fn key_files_are_private_and_well_formed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keys/cluster.key");
        let fp = keygen(&path).expect("keygen");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(KeyRing::load(&path, &[]).expect("load").fingerprint(), fp);
        let again = keygen(&path).expect_err("never overwrites");
        assert!(again.to_string().contains("never overwrites"), "{again}");

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let e = KeyRing::load(&path, &[]).expect_err("readable by others");
        let text = e.to_string();
        assert!(
            text.contains("0644") && text.contains("chmod 600"),
            "{text}"
        );

        let bad = dir.path().join("bad.key");
        std::fs::write(&bad, "not a key").expect("write");
        std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let e = KeyRing::load(&bad, &[]).expect_err("malformed");
        assert!(e.to_string().contains("bad.key"), "{e}");
        assert!(
            !e.to_string().contains("not a key"),
            "never quotes the file: {e}"
        );
        let missing = KeyRing::load(&dir.path().join("none.key"), &[]).expect_err("missing");
        assert!(missing.to_string().contains("none.key"));
    }
}
