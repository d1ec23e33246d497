//! Binary encoding of a batch record (`B` value, backup copies, mirror
//! and handover frames all carry these bytes):
//!
//! ```text
//! version u8 = 2 | received_ms u64 | count u32 | count × (source, id, type, sealed)
//! sealed = crypto::KeyRing::seal(event_ad(Record, source, id, type), subject str | body bytes)
//! ```
//! Each string is a `u32` big-endian length and UTF-8 bytes; `sealed` is a
//! `u32` length and bytes. The account (`subject`) and the event JSON are
//! sealed with the cluster key, the event identity as associated data, so
//! that a record reveals no event data without the key and a sealed body
//! cannot be moved to another identity. Decoding checks every length, so a
//! damaged record is reported, never a panic.

use crate::crypto::{KeyRing, Sealed, event_ad};

const VERSION: u8 = 2;

pub struct Writer<'k> {
    buf: Vec<u8>,
    count: u32,
    keys: &'k KeyRing,
}

impl<'k> Writer<'k> {
    pub fn new(received_ms: u64, keys: &'k KeyRing) -> Writer<'k> {
        let mut buf = Vec::with_capacity(16 * 1024);
        buf.push(VERSION);
        buf.extend_from_slice(&received_ms.to_be_bytes());
        buf.extend_from_slice(&0u32.to_be_bytes());
        Writer {
            buf,
            count: 0,
            keys,
        }
    }

    pub fn push(
        &mut self,
        source: &str,
        id: &str,
        event_type: &str,
        subject: &str,
        body: &str,
    ) -> Result<(), crate::crypto::SealError> {
        let rollback = self.buf.len();
        for s in [source, id, event_type] {
            super::push_str(&mut self.buf, s);
        }
        // The sealed part's length is known only once it is written.
        let len_at = self.buf.len();
        self.buf.extend_from_slice(&[0; 4]);
        let subject_len = (subject.len() as u32).to_be_bytes();
        let sealed = self.keys.seal_into(
            &event_ad(Sealed::Record, source, id, event_type),
            &[&subject_len, subject.as_bytes(), body.as_bytes()],
            &mut self.buf,
        );
        if let Err(e) = sealed {
            self.buf.truncate(rollback);
            return Err(e);
        }
        let n = (self.buf.len() - len_at - 4) as u32;
        self.buf[len_at..len_at + 4].copy_from_slice(&n.to_be_bytes());
        self.count += 1;
        Ok(())
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether no item was pushed yet.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.buf[9..13].copy_from_slice(&self.count.to_be_bytes());
        self.buf
    }
}

/// Why a stored record (or its key) cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("unknown record version {0:?}")]
    Version(Option<u8>),
    #[error("record truncated at byte {at} (needs {len} more of {total})")]
    Truncated { at: usize, len: usize, total: usize },
    #[error("length overflow")]
    Overflow,
    #[error("invalid UTF-8 at byte {at}: {reason}")]
    Utf8 {
        at: usize,
        reason: std::str::Utf8Error,
    },
    /// An item whose sealed part does not open with the keys held.
    #[error("event {event}: {reason}")]
    Sealed { event: String, reason: String },
    #[error("event {event}: body is not UTF-8: {reason}")]
    Body {
        event: String,
        reason: std::string::FromUtf8Error,
    },
    #[error("{0} bytes after the last item")]
    Trailing(usize),
    /// A key that does not name a batch (or a copy) as this version writes
    /// them.
    #[error("malformed {0} key")]
    MalformedKey(&'static str),
}

pub struct Record {
    pub received_ms: u64,
    pub items: Vec<RecordItem>,
}

pub struct RecordItem {
    pub source: String,
    pub id: String,
    pub event_type: String,
    pub subject: String,
    pub body: String,
}

/// Decode a record and open every item's sealed part with `keys`.
pub fn read(v: &[u8], keys: &KeyRing) -> Result<Record, RecordError> {
    let (received_ms, count, mut pos) = header(v)?;
    let mut items = Vec::with_capacity(count.min(100_000) as usize);
    for _ in 0..count {
        let source = text(v, &mut pos)?;
        let id = text(v, &mut pos)?;
        let event_type = text(v, &mut pos)?;
        let sealed = bytes(v, &mut pos)?;
        let plain = keys
            .open(&event_ad(Sealed::Record, &source, &id, &event_type), sealed)
            .map_err(|e| RecordError::Sealed {
                event: format!("{source}|{id}"),
                reason: e.to_string(),
            })?;
        let mut at = 0;
        let subject = text(&plain, &mut at)?;
        let body = String::from_utf8(plain[at..].to_vec()).map_err(|reason| RecordError::Body {
            event: format!("{source}|{id}"),
            reason,
        })?;
        items.push(RecordItem {
            source,
            id,
            event_type,
            subject,
            body,
        });
    }
    if pos != v.len() {
        return Err(RecordError::Trailing(v.len() - pos));
    }
    Ok(Record { received_ms, items })
}

/// Receipt time and number of items, checking the record's structure but
/// opening nothing.
pub fn check(v: &[u8]) -> Result<(u64, usize), RecordError> {
    identities(v).map(|(ms, ids)| (ms, ids.len()))
}

/// Receipt time and the identities (`source`, `id`) of the items, without
/// opening their sealed parts.
pub fn identities(v: &[u8]) -> Result<(u64, Vec<(String, String)>), RecordError> {
    let (received_ms, count, mut pos) = header(v)?;
    let mut out = Vec::with_capacity(count.min(100_000) as usize);
    for _ in 0..count {
        let source = text(v, &mut pos)?;
        let id = text(v, &mut pos)?;
        text(v, &mut pos)?;
        bytes(v, &mut pos)?;
        out.push((source, id));
    }
    if pos != v.len() {
        return Err(RecordError::Trailing(v.len() - pos));
    }
    Ok((received_ms, out))
}

/// Whether every item of the record is sealed under the key `fingerprint`.
pub fn sealed_under(v: &[u8], fingerprint: &str) -> Result<bool, RecordError> {
    let (_, count, mut pos) = header(v)?;
    for _ in 0..count {
        for _ in 0..3 {
            text(v, &mut pos)?;
        }
        let sealed = bytes(v, &mut pos)?;
        if KeyRing::sealed_key_id(sealed).as_deref() != Some(fingerprint) {
            return Ok(false);
        }
    }
    Ok(true)
}

fn header(v: &[u8]) -> Result<(u64, u32, usize), RecordError> {
    if v.first() != Some(&VERSION) {
        return Err(RecordError::Version(v.first().copied()));
    }
    let received_ms = u64::from_be_bytes(array(v, 1)?);
    let count = u32::from_be_bytes(array(v, 9)?);
    Ok((received_ms, count, 13))
}

fn bytes<'a>(v: &'a [u8], pos: &mut usize) -> Result<&'a [u8], RecordError> {
    let len = u32::from_be_bytes(array(v, *pos)?) as usize;
    let s = take(v, *pos + 4, len)?;
    *pos += 4 + len;
    Ok(s)
}

fn text(v: &[u8], pos: &mut usize) -> Result<String, RecordError> {
    let at = *pos;
    std::str::from_utf8(bytes(v, pos)?)
        .map(str::to_owned)
        .map_err(|reason| RecordError::Utf8 { at, reason })
}

/// `N` bytes at `at`, as an array.
fn array<const N: usize>(v: &[u8], at: usize) -> Result<[u8; N], RecordError> {
    take(v, at, N)?
        .try_into()
        .map_err(|_| RecordError::Truncated {
            at,
            len: N,
            total: v.len(),
        })
}

fn take(v: &[u8], at: usize, len: usize) -> Result<&[u8], RecordError> {
    v.get(at..at.checked_add(len).ok_or(RecordError::Overflow)?)
        .ok_or(RecordError::Truncated {
            at,
            len,
            total: v.len(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> KeyRing {
        KeyRing::from_keys(&[7; 32], &[])
    }

    #[test]
    fn round_trip_and_damage() {
        let k = keys();
        let mut w = Writer::new(7, &k);
        w.push("/s", "1", "t", "jdoe", "{\"password\":\"hunter2\"}")
            .expect("push");
        w.push("/s", "2", "t", "u", "é").expect("push");
        let bytes = w.finish();
        assert!(!bytes.windows(7).any(|w| w == b"hunter2"));
        assert!(!bytes.windows(4).any(|w| w == b"jdoe"));
        let r = read(&bytes, &k).expect("read");
        assert_eq!(r.received_ms, 7);
        assert_eq!(r.items.len(), 2);
        assert_eq!(r.items[0].subject, "jdoe");
        assert_eq!(r.items[1].body, "é");
        assert_eq!(check(&bytes), Ok((7, 2)));
        assert!(read(&bytes[..bytes.len() - 1], &k).is_err());
        assert!(check(&bytes[..bytes.len() - 1]).is_err());
        assert!(read(&[9], &k).is_err());
        assert!(read(&[], &k).is_err());
        let other = KeyRing::from_keys(&[8; 32], &[]);
        let e = read(&bytes, &other).err().expect("wrong key");
        assert!(e.to_string().contains("/s|1"), "{e}");
    }
}
