//! The event envelope: CloudEvents 1.0 in structured JSON mode.
//!
//! ```json
//! {"specversion":"1.0","id":"8d1f…","source":"/hr/workday",
//!  "type":"io.provring.account.create","time":"2026-11-22T09:00:00Z",
//!  "datacontenttype":"application/json",
//!  "data":{"userName":"jdoe","name":{"givenName":"Jane","familyName":"Doe"}}}
//! ```
//!
//! An event's identity is (`source`, `id`): two deliveries with the same
//! identity are the same event. [`decode`] checks a delivery's body and
//! either returns the [`Event`] or an [`Invalid`] reason fit for the parking
//! queue's `x-provring-reason` header. Reasons never quote a password.

use serde::Deserialize;
use serde_json::value::RawValue;

/// The only CloudEvents version accepted.
pub const SPEC_VERSION: &str = "1.0";

/// The event types provring understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventType {
    AccountCreate,
    AccountUpdate,
    AccountEnable,
    AccountDisable,
    AccountDelete,
    PasswordChange,
}

impl EventType {
    pub const ALL: [EventType; 6] = [
        EventType::AccountCreate,
        EventType::AccountUpdate,
        EventType::AccountEnable,
        EventType::AccountDisable,
        EventType::AccountDelete,
        EventType::PasswordChange,
    ];

    /// The CloudEvents `type` string.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::AccountCreate => "io.provring.account.create",
            EventType::AccountUpdate => "io.provring.account.update",
            EventType::AccountEnable => "io.provring.account.enable",
            EventType::AccountDisable => "io.provring.account.disable",
            EventType::AccountDelete => "io.provring.account.delete",
            EventType::PasswordChange => "io.provring.password.change",
        }
    }

    pub fn parse(s: &str) -> Option<EventType> {
        EventType::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// The adaptor kind that accepts this type.
    pub fn adaptor_kind(self) -> AdaptorKind {
        match self {
            EventType::PasswordChange => AdaptorKind::Password,
            _ => AdaptorKind::Provisioning,
        }
    }
}

impl std::fmt::Display for EventType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Identity of an event: (`source`, `id`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    pub source: String,
    pub id: String,
}

impl Identity {
    /// Value of the `Idempotency-Key` header: `source|id`, with `%`, `|` and
    /// every byte outside visible ASCII percent-encoded so that the key is
    /// unambiguous and a valid header value.
    pub fn idempotency_key(&self) -> String {
        let mut out = String::with_capacity(self.source.len() + self.id.len() + 1);
        encode_key_part(&self.source, &mut out);
        out.push('|');
        encode_key_part(&self.id, &mut out);
        out
    }
}

fn encode_key_part(s: &str, out: &mut String) {
    for b in s.bytes() {
        if b.is_ascii_graphic() && b != b'%' && b != b'|' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}|{}", self.source, self.id)
    }
}

/// A decoded, valid event; `body` is the original JSON text.
#[derive(Debug, Clone)]
pub struct Event {
    pub identity: Identity,
    pub event_type: EventType,
    /// The account the event is about (`data.userName`): events with the
    /// same subject are delivered in arrival order.
    pub subject: String,
    pub body: String,
}

/// Why a body is not a valid event (the parking reason).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid(pub String);

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Deserialize)]
struct Envelope<'a> {
    specversion: Option<&'a str>,
    #[serde(borrow)]
    id: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    source: Option<std::borrow::Cow<'a, str>>,
    #[serde(rename = "type")]
    event_type: Option<&'a str>,
    time: Option<&'a str>,
    datacontenttype: Option<&'a str>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    /// Extension: the time after which the event is no longer wanted; the
    /// timeout checker parks it if it is still unfinished then.
    deadline: Option<&'a str>,
}

#[derive(Deserialize)]
struct AccountData<'a> {
    #[serde(rename = "userName", borrow)]
    user_name: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    password: Option<&'a RawValue>,
}

/// Longest `id` or `source` accepted (they become keys and header values).
pub const MAX_ID_LEN: usize = 1024;

/// The kind of events an adaptor accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AdaptorKind {
    /// Account create, update, enable, disable and delete.
    Provisioning,
    /// Password change.
    Password,
}

impl AdaptorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AdaptorKind::Provisioning => "provisioning",
            AdaptorKind::Password => "password",
        }
    }
}

/// `[limits]` of the configuration: what an event may be.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Largest message body accepted, in bytes; larger ones are parked.
    #[serde(default = "default_max_message_size")]
    pub max_message_size: usize,
    /// Deepest nesting of arrays and objects accepted in an event's
    /// `data`; deeper events are parked (a downstream parser may crash on
    /// them).
    #[serde(default = "default_max_depth")]
    pub max_depth: usize,
}

fn default_max_message_size() -> usize {
    1024 * 1024
}
fn default_max_depth() -> usize {
    64
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_size: default_max_message_size(),
            max_depth: default_max_depth(),
        }
    }
}

/// Decode and validate a delivery body for an adaptor of `kind` within
/// `limits` (size of the body, nesting depth of `data`).
pub fn decode(body: &[u8], kind: AdaptorKind, limits: &Limits) -> Result<Event, Invalid> {
    let max_size = limits.max_message_size;
    if body.len() > max_size {
        return Err(Invalid(format!(
            "body of {} bytes exceeds limits.max_message_size ({max_size} bytes)",
            body.len()
        )));
    }
    let text = std::str::from_utf8(body).map_err(|e| {
        Invalid(format!(
            "body is not UTF-8: invalid byte at offset {}",
            e.valid_up_to()
        ))
    })?;
    let env: Envelope<'_> = serde_json::from_str(text)
        .map_err(|e| Invalid(format!("body is not a JSON object: {e}")))?;
    match env.specversion {
        Some(SPEC_VERSION) => {}
        Some(other) => {
            return Err(Invalid(format!(
                "specversion {other:?} is not supported; expected \"1.0\""
            )));
        }
        None => return Err(Invalid("missing attribute \"specversion\"".into())),
    }
    let id = required_text(env.id, "id")?;
    let source = required_text(env.source, "source")?;
    let type_name = env
        .event_type
        .ok_or_else(|| Invalid("missing attribute \"type\"".into()))?;
    let event_type = EventType::parse(type_name).ok_or_else(|| {
        Invalid(format!(
            "unknown type {:?}; expected one of {}",
            truncate(type_name, 100),
            EventType::ALL.map(EventType::as_str).join(", ")
        ))
    })?;
    if event_type.adaptor_kind() != kind {
        return Err(Invalid(format!(
            "type {event_type} does not belong on a {kind:?} adaptor"
        )));
    }
    if let Some(time) = env.time
        && humantime::parse_rfc3339_weak(time).is_err()
    {
        return Err(Invalid(format!(
            "time {:?} is not an RFC 3339 timestamp",
            truncate(time, 64)
        )));
    }
    if let Some(deadline) = env.deadline
        && humantime::parse_rfc3339_weak(deadline).is_err()
    {
        return Err(Invalid(format!(
            "deadline {:?} is not an RFC 3339 timestamp",
            truncate(deadline, 64)
        )));
    }
    if let Some(ct) = env.datacontenttype
        && !ct.starts_with("application/json")
    {
        return Err(Invalid(format!(
            "datacontenttype {:?} is not application/json",
            truncate(ct, 64)
        )));
    }
    let data = env
        .data
        .ok_or_else(|| Invalid("missing attribute \"data\"".into()))?;
    if let Some(depth) = deeper_than(data.get(), limits.max_depth) {
        return Err(Invalid(format!(
            "data is nested more than {depth} levels deep (limits.max_depth = {})",
            limits.max_depth
        )));
    }
    let data: AccountData<'_> = serde_json::from_str(data.get())
        .map_err(|_| Invalid("data must be an object with a string \"userName\"".into()))?;
    let subject = match data.user_name {
        Some(u) if !u.trim().is_empty() => u.into_owned(),
        _ => {
            return Err(Invalid("data.userName is missing or empty".into()));
        }
    };
    if event_type == EventType::PasswordChange {
        let ok = data
            .password
            .and_then(|raw| serde_json::from_str::<String>(raw.get()).ok())
            .is_some_and(|p| !p.is_empty());
        if !ok {
            // Never quote the value: it may be a password.
            return Err(Invalid(
                "data.password is missing, empty or not a string".into(),
            ));
        }
    }
    Ok(Event {
        identity: Identity { source, id },
        event_type,
        subject,
        body: text.to_owned(),
    })
}

/// `Some(max)` if the JSON text `json` (already known to be valid) nests
/// arrays and objects deeper than `max`. One pass over the bytes, no
/// recursion, whatever the depth.
fn deeper_than(json: &str, max: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for b in json.bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return Some(max);
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    None
}

/// The event's `deadline` extension, ms since the Unix epoch, if it has a
/// valid one. Cheap for the usual event without one (no JSON parse).
pub fn deadline_ms(body: &str) -> Option<u64> {
    if !body.contains("\"deadline\"") {
        return None;
    }
    #[derive(Deserialize)]
    struct OnlyDeadline<'a> {
        #[serde(borrow)]
        deadline: Option<std::borrow::Cow<'a, str>>,
    }
    let d: OnlyDeadline<'_> = serde_json::from_str(body).ok()?;
    let t = humantime::parse_rfc3339_weak(d.deadline?.as_ref()).ok()?;
    t.duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_millis() as u64)
}

fn required_text(value: Option<std::borrow::Cow<'_, str>>, name: &str) -> Result<String, Invalid> {
    match value {
        None => Err(Invalid(format!("missing attribute {name:?}"))),
        Some(v) if v.is_empty() => Err(Invalid(format!("attribute {name:?} is empty"))),
        Some(v) if v.len() > MAX_ID_LEN => Err(Invalid(format!(
            "attribute {name:?} is {} bytes long; at most {MAX_ID_LEN}",
            v.len()
        ))),
        Some(v) => Ok(v.into_owned()),
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A valid synthetic event of `event_type` (for `provring publish --generate`
/// and benchmarks). `n` makes the id and user name unique within a run.
pub fn synthetic(event_type: EventType, run: &str, n: u64) -> String {
    let user = format!("user{n}");
    let data = match event_type {
        EventType::AccountCreate => serde_json::json!({
            "userName": user,
            "externalId": format!("E{n}"),
            "name": {"givenName": "Test", "familyName": format!("User {n}")},
            "emails": [{"value": format!("{user}@example.com"), "primary": true}],
            "active": true
        }),
        EventType::AccountUpdate => serde_json::json!({
            "userName": user,
            "displayName": format!("Test User {n}"),
            "title": "Engineer"
        }),
        EventType::PasswordChange => serde_json::json!({
            "userName": user,
            "password": format!("Synthetic-{run}-{n}!")
        }),
        _ => serde_json::json!({ "userName": user }),
    };
    serde_json::json!({
        "specversion": SPEC_VERSION,
        "id": format!("{run}-{n}"),
        "source": "/provring/generate",
        "type": event_type.as_str(),
        "time": humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
        "datacontenttype": "application/json",
        "data": data,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 1024 * 1024;

    fn limits() -> Limits {
        Limits {
            max_message_size: MAX,
            ..Limits::default()
        }
    }
    fn ok(body: &str) -> Event {
        decode(body.as_bytes(), AdaptorKind::Provisioning, &limits()).expect("valid")
    }
    fn bad(body: &[u8], kind: AdaptorKind) -> String {
        decode(body, kind, &limits()).expect_err("invalid").0
    }

    fn nested(levels: usize) -> String {
        format!(
            r#"{{"specversion":"1.0","id":"d","source":"/hr","type":"io.provring.account.create","data":{{"userName":"jdoe","x":{}1{}}}}}"#,
            "[".repeat(levels),
            "]".repeat(levels)
        )
    }

    #[test]
    fn deeply_nested_data_is_parked_with_a_reason() {
        // data itself is level 1; 63 more arrays reach the default 64.
        ok(&nested(63));
        let reason = bad(nested(64).as_bytes(), AdaptorKind::Provisioning);
        assert!(reason.contains("limits.max_depth = 64"), "{reason}");
        let reason = bad(nested(100_000).as_bytes(), AdaptorKind::Provisioning);
        assert!(reason.contains("nested"), "{reason}");
        // Brackets inside strings, escaped quotes included, do not count.
        ok(&format!(
            r#"{{"specversion":"1.0","id":"s","source":"/hr","type":"io.provring.account.create","data":{{"userName":"j\"{}"}}}}"#,
            "[".repeat(500)
        ));
    }

    #[test]
    fn decodes_a_valid_event() {
        let e = ok(
            r#"{"specversion":"1.0","id":"1","source":"/hr","type":"io.provring.account.create","data":{"userName":"jdoe"}}"#,
        );
        assert_eq!(e.identity.id, "1");
        assert_eq!(e.identity.source, "/hr");
        assert_eq!(e.event_type, EventType::AccountCreate);
    }

    #[test]
    fn synthetic_events_are_valid() {
        for t in EventType::ALL {
            let body = synthetic(t, "r", 7);
            decode(body.as_bytes(), t.adaptor_kind(), &limits()).expect("synthetic event is valid");
        }
    }

    #[test]
    fn reasons_name_the_problem() {
        let p = AdaptorKind::Provisioning;
        assert!(bad(b"{not json", p).starts_with("body is not a JSON object"));
        assert!(bad(b"\xff\xfe", p).starts_with("body is not UTF-8"));
        assert_eq!(
            bad(br#"{"specversion":"1.0","source":"s","type":"io.provring.account.create","data":{"userName":"u"}}"#, p),
            "missing attribute \"id\""
        );
        assert!(bad(br#"{"specversion":"1.0","id":"1","source":"s","type":"x.y","data":{"userName":"u"}}"#, p).starts_with("unknown type \"x.y\""));
        assert!(bad(br#"{"specversion":"1.0","id":"1","source":"s","type":"io.provring.password.change","data":{"userName":"u","password":"p"}}"#, p).contains("does not belong"));
        let big = vec![b' '; MAX + 1];
        assert!(bad(&big, p).contains("exceeds limits.max_message_size"));
    }

    #[test]
    fn the_deadline_extension_is_checked_and_read() {
        let p = AdaptorKind::Provisioning;
        let body = r#"{"specversion":"1.0","id":"1","source":"s","type":"io.provring.account.create","deadline":"2026-11-22T10:00:00Z","data":{"userName":"u"}}"#;
        assert_eq!(deadline_ms(&ok(body).body), Some(1_795_341_600_000));
        assert!(
            bad(
                br#"{"specversion":"1.0","id":"1","source":"s","type":"io.provring.account.create","deadline":"soon","data":{"userName":"u"}}"#,
                p
            )
            .starts_with("deadline \"soon\" is not an RFC 3339 timestamp")
        );
        assert_eq!(
            deadline_ms(&synthetic(EventType::AccountCreate, "r", 1)),
            None
        );
        // "deadline" inside data is not the extension.
        assert_eq!(
            deadline_ms(r#"{"data":{"note":"\"deadline\""},"deadline":null}"#),
            None
        );
    }

    #[test]
    fn password_reason_never_quotes_the_value() {
        let r = bad(
            br#"{"specversion":"1.0","id":"1","source":"s","type":"io.provring.password.change","data":{"userName":"u","password":12345}}"#,
            AdaptorKind::Password,
        );
        assert!(!r.contains("12345"));
    }

    #[test]
    fn idempotency_key_is_unambiguous() {
        let a = Identity {
            source: "a|b".into(),
            id: "c".into(),
        };
        let b = Identity {
            source: "a".into(),
            id: "b|c".into(),
        };
        assert_ne!(a.idempotency_key(), b.idempotency_key());
        assert_eq!(
            Identity {
                source: "/hr x".into(),
                id: "é".into()
            }
            .idempotency_key(),
            "/hr%20x|%C3%A9"
        );
    }
}
