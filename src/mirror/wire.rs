//! Mirror records on the broker (queue `ns.backup.<origin>`).
//!
//! ```text
//! "PRM1" | kind u8 | generation u64 | origin str | payload
//! kind 1 begin:  (nothing)               a new generation; replaces what was held
//! kind 2 copy:   adaptor str | seq u64 | done bitmap (u32 length + bytes) | batch record (rest)
//! kind 3 remove: count u32 | count × (adaptor str | seq u64 | idx u32)
//! kind 4 end:    batches u32             the resync of this generation is complete
//! ```
//! Strings are a `u32` big-endian length and UTF-8 bytes. Decoding checks
//! every length: a damaged record is an error, never a panic.
//!
//! On the broker every record carries a MAC trailer under the cluster key
//! ([`crate::crypto::KeyRing::sign`], context `Mirror`); the backup adaptor
//! verifies it before it decodes anything, so a record that a broker user
//! without the key published is ignored, never stored. The batch records
//! inside `copy` hold sealed event bodies (see the repository's record
//! format).

const MAGIC: &[u8; 4] = b"PRM1";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub origin: String,
    pub generation: u64,
    pub body: Body,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    Begin,
    Copy {
        adaptor: String,
        seq: u64,
        done: Vec<u8>,
        record: Vec<u8>,
    },
    Remove {
        finished: Vec<(String, u64, u32)>,
    },
    End {
        batches: u32,
    },
}

fn push_str(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u32).to_be_bytes());
    buf.extend_from_slice(s.as_bytes());
}

/// Encode a frame; `record` is borrowed so that copies are not cloned.
pub fn encode(origin: &str, generation: u64, body: &Body) -> Vec<u8> {
    let mut buf = Vec::with_capacity(
        64 + if let Body::Copy { record, .. } = body {
            record.len()
        } else {
            0
        },
    );
    buf.extend_from_slice(MAGIC);
    buf.push(match body {
        Body::Begin => 1,
        Body::Copy { .. } => 2,
        Body::Remove { .. } => 3,
        Body::End { .. } => 4,
    });
    buf.extend_from_slice(&generation.to_be_bytes());
    push_str(&mut buf, origin);
    match body {
        Body::Begin => {}
        Body::Copy {
            adaptor,
            seq,
            done,
            record,
        } => {
            push_str(&mut buf, adaptor);
            buf.extend_from_slice(&seq.to_be_bytes());
            buf.extend_from_slice(&(done.len() as u32).to_be_bytes());
            buf.extend_from_slice(done);
            buf.extend_from_slice(record);
        }
        Body::Remove { finished } => {
            buf.extend_from_slice(&(finished.len() as u32).to_be_bytes());
            for (adaptor, seq, idx) in finished {
                push_str(&mut buf, adaptor);
                buf.extend_from_slice(&seq.to_be_bytes());
                buf.extend_from_slice(&idx.to_be_bytes());
            }
        }
        Body::End { batches } => buf.extend_from_slice(&batches.to_be_bytes()),
    }
    buf
}

/// Why a mirror record cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("not a provring mirror record (bad magic)")]
    Magic,
    #[error("length overflow")]
    Overflow,
    #[error("record ends at byte {len} of {expected} expected")]
    Short { len: usize, expected: usize },
    #[error("invalid UTF-8 in a name: {0}")]
    Utf8(std::str::Utf8Error),
    #[error("unknown mirror record kind {0}")]
    Kind(u8),
    #[error("{0} bytes after the end of the record")]
    Trailing(usize),
}

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let end = self.at.checked_add(n).ok_or(WireError::Overflow)?;
        let s = self.buf.get(self.at..end).ok_or(WireError::Short {
            len: self.buf.len(),
            expected: end,
        })?;
        self.at = end;
        Ok(s)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let len = self.buf.len();
        self.take(N)?.try_into().map_err(|_| WireError::Short {
            len,
            expected: self.at,
        })
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(self.array()?))
    }
    fn str(&mut self) -> Result<String, WireError> {
        let n = self.u32()? as usize;
        std::str::from_utf8(self.take(n)?)
            .map(str::to_owned)
            .map_err(WireError::Utf8)
    }
    fn rest(&mut self) -> &'a [u8] {
        let s = self.buf.get(self.at..).unwrap_or_default();
        self.at = self.buf.len();
        s
    }
}

pub fn decode(buf: &[u8]) -> Result<Frame, WireError> {
    let mut r = Reader { buf, at: 0 };
    if r.take(4).ok() != Some(MAGIC.as_slice()) {
        return Err(WireError::Magic);
    }
    let kind = r.take(1)?[0];
    let generation = r.u64()?;
    let origin = r.str()?;
    let body = match kind {
        1 => Body::Begin,
        2 => {
            let adaptor = r.str()?;
            let seq = r.u64()?;
            let n = r.u32()? as usize;
            let done = r.take(n)?.to_vec();
            let record = r.rest().to_vec();
            Body::Copy {
                adaptor,
                seq,
                done,
                record,
            }
        }
        3 => {
            let n = r.u32()? as usize;
            let mut finished = Vec::with_capacity(n.min(1 << 16));
            for _ in 0..n {
                finished.push((r.str()?, r.u64()?, r.u32()?));
            }
            Body::Remove { finished }
        }
        4 => Body::End { batches: r.u32()? },
        other => return Err(WireError::Kind(other)),
    };
    if r.at != buf.len() {
        return Err(WireError::Trailing(buf.len() - r.at));
    }
    Ok(Frame {
        origin,
        generation,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        for body in [
            Body::Begin,
            Body::Copy {
                adaptor: "hr".into(),
                seq: 7,
                done: vec![1],
                record: vec![1, 2, 3],
            },
            Body::Remove {
                finished: vec![("hr".into(), 7, 0), ("pw".into(), 9, 3)],
            },
            Body::End { batches: 4 },
        ] {
            let bytes = encode("a", 42, &body);
            let frame = decode(&bytes).expect("decode");
            assert_eq!(frame.origin, "a");
            assert_eq!(frame.generation, 42);
            assert_eq!(frame.body, body);
        }
    }

    #[test]
    fn damaged_frames_are_errors() {
        let bytes = encode(
            "a",
            1,
            &Body::Remove {
                finished: vec![("hr".into(), 7, 0)],
            },
        );
        for n in 0..bytes.len() {
            assert!(decode(&bytes[..n]).is_err(), "prefix of {n} bytes");
        }
        assert!(decode(b"{\"json\":true}").is_err());
        let mut huge = encode("a", 1, &Body::Remove { finished: vec![] });
        let len = huge.len();
        huge[len - 4..].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(decode(&huge).is_err());
    }
}
