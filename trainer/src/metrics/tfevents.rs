//! TensorBoard event files: TFRecord framing around hand-encoded `tensorflow.Event` protobufs.
//!
//! Only the fields TensorBoard needs for scalars are written:
//! `Event { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5;
//! SessionLog session_log = 7; }`, `Summary { repeated Value value = 1; }`,
//! `Value { string tag = 1; float simple_value = 2; }`, `SessionLog { SessionStatus status = 1; }`.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use super::crc::masked_crc32c;
use super::MetricsError;

/// `SessionLog.SessionStatus.START`: TensorBoard drops every event at or after this event's step
/// that it read before it (how a resumed run hides the steps the crashed run logged past its
/// checkpoint).
const SESSION_START: u64 = 1;

/// Distinguishes event files opened by one process in the same second.
static FILE_COUNTER: AtomicU64 = AtomicU64::new(0);

fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

/// Field key: `field_number << 3 | wire_type`.
fn put_key(buf: &mut Vec<u8>, field: u32, wire_type: u8) {
    put_varint(buf, (u64::from(field) << 3) | u64::from(wire_type));
}

/// A length-delimited field (string, bytes or embedded message).
fn put_bytes(buf: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_key(buf, field, 2);
    put_varint(buf, bytes.len() as u64);
    buf.extend_from_slice(bytes);
}

/// The body of an event: which one of `Event`'s `what` fields it carries.
pub enum EventBody<'a> {
    FileVersion(&'a str),
    Scalars(&'a [(String, f32)]),
    SessionStart,
}

/// Encodes one `tensorflow.Event`.
pub fn encode_event(wall_time: f64, step: i64, body: &EventBody<'_>) -> Vec<u8> {
    let mut buf = Vec::with_capacity(64);
    put_key(&mut buf, 1, 1);
    buf.extend_from_slice(&wall_time.to_le_bytes());
    put_key(&mut buf, 2, 0);
    put_varint(&mut buf, step as u64); // int64: negative values are 10-byte two's complement
    match body {
        EventBody::FileVersion(v) => put_bytes(&mut buf, 3, v.as_bytes()),
        EventBody::Scalars(values) => {
            let mut summary = Vec::with_capacity(values.len() * 32);
            for (tag, value) in values.iter() {
                let mut v = Vec::with_capacity(tag.len() + 8);
                put_bytes(&mut v, 1, tag.as_bytes());
                put_key(&mut v, 2, 5);
                v.extend_from_slice(&value.to_le_bytes());
                put_bytes(&mut summary, 1, &v);
            }
            put_bytes(&mut buf, 5, &summary);
        }
        EventBody::SessionStart => {
            let mut log = Vec::with_capacity(2);
            put_key(&mut log, 1, 0);
            put_varint(&mut log, SESSION_START);
            put_bytes(&mut buf, 7, &log);
        }
    }
    buf
}

/// Frames `data` as one TFRecord: `u64 len LE, u32 masked_crc(len), data, u32 masked_crc(data)`.
pub fn frame_record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    out
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn hostname() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .unwrap_or_default();
    let name: String = raw
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .collect();
    if name.is_empty() {
        "localhost".to_string()
    } else {
        name
    }
}

/// Writes one `events.out.tfevents.*` file.
pub struct EventWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl EventWriter {
    /// Creates `events.out.tfevents.<unix-secs>.<hostname>.<pid>.<counter>` in `dir` and writes
    /// the `brain.Event:2` header; when `resume_step > 0` also a `SessionLog START` at
    /// `resume_step + 1`, so TensorBoard discards older files' events past `resume_step`.
    pub fn create(dir: &Path, resume_step: u64) -> Result<Self, MetricsError> {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let name = format!(
            "events.out.tfevents.{secs}.{}.{}.{}",
            hostname(),
            std::process::id(),
            FILE_COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let path = dir.join(name);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| MetricsError::io("create", &path, e))?;
        let mut writer = EventWriter {
            path,
            out: BufWriter::new(file),
        };
        let wall = now_secs();
        writer.write_event(&encode_event(
            wall,
            0,
            &EventBody::FileVersion("brain.Event:2"),
        ))?;
        if resume_step > 0 {
            let step = i64::try_from(resume_step + 1).unwrap_or(i64::MAX);
            writer.write_event(&encode_event(wall, step, &EventBody::SessionStart))?;
        }
        writer.flush()?;
        Ok(writer)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write_event(&mut self, event: &[u8]) -> Result<(), MetricsError> {
        self.out
            .write_all(&frame_record(event))
            .map_err(|e| MetricsError::io("write", &self.path, e))
    }

    /// Appends one event holding `scalars` (tag, value) at `step`.
    pub fn write_scalars(
        &mut self,
        step: u64,
        scalars: &[(String, f32)],
    ) -> Result<(), MetricsError> {
        let step = i64::try_from(step).unwrap_or(i64::MAX);
        self.write_event(&encode_event(
            now_secs(),
            step,
            &EventBody::Scalars(scalars),
        ))
    }

    pub fn flush(&mut self) -> Result<(), MetricsError> {
        self.out
            .flush()
            .map_err(|e| MetricsError::io("write", &self.path, e))
    }

    /// Flushes buffered events and file data to disk.
    pub fn sync(&mut self) -> Result<(), MetricsError> {
        self.flush()?;
        self.out
            .get_ref()
            .sync_data()
            .map_err(|e| MetricsError::io("sync", &self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_scalar_event_by_hand() {
        let values = [("a/b".to_string(), 1.5f32)];
        let got = encode_event(2.0, 300, &EventBody::Scalars(&values));
        #[rustfmt::skip]
        let expected: Vec<u8> = vec![
            0x09, 0, 0, 0, 0, 0, 0, 0, 0x40,      // wall_time = 2.0 (double, field 1)
            0x10, 0xAC, 0x02,                     // step = 300 (varint, field 2)
            0x2A, 12,                             // summary (field 5), 12 bytes
            0x0A, 10,                             //   value (field 1), 10 bytes
            0x0A, 3, b'a', b'/', b'b',            //     tag = "a/b"
            0x15, 0x00, 0x00, 0xC0, 0x3F,         //     simple_value = 1.5f32
        ];
        assert_eq!(got, expected);
    }

    #[test]
    fn encodes_file_version_and_session_start() {
        let got = encode_event(0.0, 0, &EventBody::FileVersion("brain.Event:2"));
        let mut expected = vec![0x09, 0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0x1A, 13];
        expected.extend_from_slice(b"brain.Event:2");
        assert_eq!(got, expected);

        let got = encode_event(0.0, 4, &EventBody::SessionStart);
        let expected = vec![0x09, 0, 0, 0, 0, 0, 0, 0, 0, 0x10, 4, 0x3A, 2, 0x08, 1];
        assert_eq!(got, expected);
    }

    #[test]
    fn frames_record_with_masked_crcs() {
        let framed = frame_record(b"123456789");
        assert_eq!(&framed[..8], &9u64.to_le_bytes());
        assert_eq!(
            &framed[8..12],
            &masked_crc32c(&9u64.to_le_bytes()).to_le_bytes()
        );
        assert_eq!(&framed[12..21], b"123456789");
        assert_eq!(&framed[21..], &0xC78A_B0E5u32.to_le_bytes());
    }
}
