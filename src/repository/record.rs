//! Binary encoding of a batch record (`B` value):
//!
//! ```text
//! version u8 = 1 | received_ms u64 | count u32 | count × (source, id, type, subject, body)
//! ```
//! Each string is a `u32` big-endian length and UTF-8 bytes. Decoding
//! checks every length, so a damaged record is reported, never a panic.

const VERSION: u8 = 1;

pub struct Writer {
    buf: Vec<u8>,
    count: u32,
}

impl Writer {
    pub fn new(received_ms: u64) -> Writer {
        let mut buf = Vec::with_capacity(16 * 1024);
        buf.push(VERSION);
        buf.extend_from_slice(&received_ms.to_be_bytes());
        buf.extend_from_slice(&0u32.to_be_bytes());
        Writer { buf, count: 0 }
    }

    pub fn push(&mut self, source: &str, id: &str, event_type: &str, subject: &str, body: &str) {
        for s in [source, id, event_type, subject, body] {
            super::push_str(&mut self.buf, s);
        }
        self.count += 1;
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.buf[9..13].copy_from_slice(&self.count.to_be_bytes());
        self.buf
    }
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

pub fn read(v: &[u8]) -> Result<Record, String> {
    if v.first() != Some(&VERSION) {
        return Err(format!("unknown record version {:?}", v.first()));
    }
    let received_ms = u64::from_be_bytes(take(v, 1, 8)?.try_into().map_err(|_| "short record")?);
    let count = u32::from_be_bytes(take(v, 9, 4)?.try_into().map_err(|_| "short record")?);
    let mut pos = 13;
    let mut items = Vec::with_capacity(count.min(100_000) as usize);
    for _ in 0..count {
        let mut next = || -> Result<String, String> {
            let len = u32::from_be_bytes(take(v, pos, 4)?.try_into().map_err(|_| "short record")?)
                as usize;
            let s = std::str::from_utf8(take(v, pos + 4, len)?)
                .map_err(|e| format!("invalid UTF-8 at byte {pos}: {e}"))?
                .to_owned();
            pos += 4 + len;
            Ok(s)
        };
        items.push(RecordItem {
            source: next()?,
            id: next()?,
            event_type: next()?,
            subject: next()?,
            body: next()?,
        });
    }
    Ok(Record { received_ms, items })
}

fn take(v: &[u8], at: usize, len: usize) -> Result<&[u8], String> {
    v.get(at..at.checked_add(len).ok_or("length overflow")?)
        .ok_or_else(|| {
            format!(
                "record truncated at byte {at} (needs {len} more of {})",
                v.len()
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let mut w = Writer::new(7);
        w.push("/s", "1", "t", "u", "{}");
        w.push("/s", "2", "t", "u", "é");
        let bytes = w.finish();
        let r = read(&bytes).expect("read");
        assert_eq!(r.received_ms, 7);
        assert_eq!(r.items.len(), 2);
        assert_eq!(r.items[1].body, "é");
        assert!(read(&bytes[..bytes.len() - 1]).is_err());
        assert!(read(&[9]).is_err());
        assert!(read(&[]).is_err());
    }
}
