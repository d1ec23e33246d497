//! Property tests on stable Rust: random and mutated bytes into every
//! decoder that reads what a producer, the broker or the disk hands over.
//! None may panic; each must answer with a value or a clean error.
//!
//! Cases per property: `PROVRING_FUZZ_CASES` (default 2000), e.g.
//! `PROVRING_FUZZ_CASES=200000 cargo test --release --test fuzz`.

use proptest::prelude::*;
use provring::config::{AdaptorKind, LimitsConfig};
use provring::crypto::{Context, KeyRing};
use provring::mirror::wire::{self, Body};
use provring::repository::record;
use provring::topology::{Change, Record};

fn cases() -> u32 {
    std::env::var("PROVRING_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

fn keys() -> KeyRing {
    KeyRing::from_keys(&[0x33; 32], &[])
}

/// One edit: flip bits of a byte, cut the input, insert a byte, or
/// overwrite four bytes with a length-like value.
#[derive(Debug, Clone)]
enum Edit {
    Flip(usize, u8),
    Cut(usize),
    Insert(usize, u8),
    Length(usize, u32),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), 1..=255u8).prop_map(|(p, m)| Edit::Flip(p, m)),
        any::<usize>().prop_map(Edit::Cut),
        (any::<usize>(), any::<u8>()).prop_map(|(p, b)| Edit::Insert(p, b)),
        (
            any::<usize>(),
            prop_oneof![Just(0u32), Just(u32::MAX), Just(1 << 31), any::<u32>()]
        )
            .prop_map(|(p, n)| Edit::Length(p, n)),
    ]
}

fn mutate(base: &[u8], edits: &[Edit]) -> Vec<u8> {
    let mut v = base.to_vec();
    for e in edits {
        let at = |p: usize, len: usize| if len == 0 { 0 } else { p % len };
        match *e {
            Edit::Flip(p, m) if !v.is_empty() => {
                let i = at(p, v.len());
                v[i] ^= m;
            }
            Edit::Flip(..) => {}
            Edit::Cut(p) => v.truncate(at(p, v.len() + 1)),
            Edit::Insert(p, b) => {
                let i = at(p, v.len() + 1);
                v.insert(i, b);
            }
            Edit::Length(p, n) if v.len() >= 4 => {
                let i = at(p, v.len() - 3);
                v[i..i + 4].copy_from_slice(&n.to_be_bytes());
            }
            Edit::Length(..) => {}
        }
    }
    v
}

fn valid_events() -> Vec<Vec<u8>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/events");
    let mut out: Vec<Vec<u8>> = std::fs::read_dir(dir)
        .expect("config/events")
        .flatten()
        .map(|e| std::fs::read(e.path()).expect("example event"))
        .collect();
    out.sort();
    out
}

fn limits() -> LimitsConfig {
    LimitsConfig::default()
}

fn decode_event(bytes: &[u8]) {
    for kind in [AdaptorKind::Provisioning, AdaptorKind::Password] {
        let _ = provring::event::decode(bytes, kind, &limits());
    }
}

fn sample_record(k: &KeyRing) -> Vec<u8> {
    let mut w = record::Writer::new(1_764_000_000_000, k);
    w.push(
        "/hr",
        "e-1",
        "io.provring.account.create",
        "jdoe",
        "{\"data\":{\"userName\":\"jdoe\"}}",
    )
    .expect("seal");
    w.push(
        "/directory",
        "e-2",
        "io.provring.password.change",
        "jane",
        "{\"data\":{\"password\":\"x\"}}",
    )
    .expect("seal");
    w.finish()
}

fn sample_frames(k: &KeyRing) -> Vec<Vec<u8>> {
    [
        Body::Begin,
        Body::Copy {
            adaptor: "hr".into(),
            seq: 7,
            done: vec![1],
            record: sample_record(k),
        },
        Body::Remove {
            finished: vec![("hr".into(), 7, 0), ("pw".into(), 9, 3)],
        },
        Body::End { batches: 4 },
    ]
    .iter()
    .map(|b| wire::encode("a", 42, b))
    .collect()
}

fn sample_topology(k: &KeyRing) -> Vec<u8> {
    let record = Record {
        id: "a-0001".into(),
        proposer: "a".into(),
        expected_epoch: 3,
        at_ms: None,
        change: Change::Takeover {
            failed: "b".into(),
            by: "a".into(),
        },
    };
    k.sign(
        Context::Topology,
        serde_json::to_vec(&record).expect("json"),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn envelope_decoder_takes_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        decode_event(&bytes);
    }

    #[test]
    fn envelope_decoder_takes_mutated_events(
        which in any::<prop::sample::Index>(),
        edits in prop::collection::vec(edit(), 1..6),
    ) {
        let events = valid_events();
        let base = which.get(&events);
        decode_event(&mutate(base, &edits));
    }

    #[test]
    fn envelope_decoder_takes_any_nesting(depth in 0usize..3000, open in prop::sample::select(vec![b'[', b'{'])) {
        let mut data = String::from("{\"userName\":\"jdoe\",\"x\":");
        for _ in 0..depth {
            data.push(open as char);
            if open == b'{' {
                data.push_str("\"k\":");
            }
        }
        data.push('1');
        for _ in 0..depth {
            data.push(if open == b'[' { ']' } else { '}' });
        }
        data.push('}');
        let body = format!(
            r#"{{"specversion":"1.0","id":"n","source":"/hr","type":"io.provring.account.create","data":{data}}}"#
        );
        let decoded = provring::event::decode(body.as_bytes(), AdaptorKind::Provisioning, &limits());
        // `data` is level 1, the object under "x" adds `depth` more.
        prop_assert_eq!(decoded.is_ok(), depth < limits().max_depth);
    }

    #[test]
    fn mirror_frame_decoder_takes_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = wire::decode(&bytes);
        let _ = keys().verify(Context::Mirror, &bytes);
    }

    #[test]
    fn mirror_frame_decoder_takes_mutated_frames(
        which in any::<prop::sample::Index>(),
        edits in prop::collection::vec(edit(), 1..6),
    ) {
        let k = keys();
        let frames = sample_frames(&k);
        let base = which.get(&frames);
        let _ = wire::decode(&mutate(base, &edits));
        // Signed: a changed frame never verifies.
        let signed = k.sign(Context::Mirror, base.clone());
        let changed = mutate(&signed, &edits);
        if changed != signed {
            prop_assert!(k.verify(Context::Mirror, &changed).is_err());
        }
    }

    #[test]
    fn record_decoder_takes_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let k = keys();
        let _ = record::read(&bytes, &k);
        let _ = record::check(&bytes);
        let _ = record::identities(&bytes);
    }

    #[test]
    fn record_decoder_takes_mutated_records(edits in prop::collection::vec(edit(), 1..6)) {
        let k = keys();
        let base = sample_record(&k);
        let changed = mutate(&base, &edits);
        let read = record::read(&changed, &k);
        let _ = record::check(&changed);
        // Sealed parts authenticate: a record that still reads has the
        // original bodies.
        if let Ok(r) = read {
            for item in &r.items {
                prop_assert!(item.body.starts_with("{\"data\""), "a damaged body was opened");
            }
        }
    }

    #[test]
    fn topology_decoder_takes_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = provring::topology::log::decode(&keys(), &bytes);
    }

    #[test]
    fn topology_decoder_takes_mutated_records(edits in prop::collection::vec(edit(), 1..6)) {
        let k = keys();
        let base = sample_topology(&k);
        let changed = mutate(&base, &edits);
        let decoded = provring::topology::log::decode(&k, &changed);
        if changed != base {
            prop_assert!(decoded.is_err(), "a changed record was accepted");
        }
    }
}
