//! TensorBoard event files, so `tensorboard --logdir runs` shows every run: scalars as
//! protobuf `Event`s in TFRecord framing (length, masked CRC-32C of the length, data, masked
//! CRC-32C of the data). The format is four small messages, so they are encoded here rather
//! than through a protobuf code generator; `crc32c` computes the checksums.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// An event file being appended to.
pub struct EventWriter {
    path: PathBuf,
    file: std::fs::File,
}

fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn length_delimited(field: u8, bytes: &[u8], out: &mut Vec<u8>) {
    out.push((field << 3) | 2);
    varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

/// `Event { wall_time, step, (file_version | summary) }`.
fn event(step: u64, body: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let wall_time = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let mut out = vec![(1 << 3) | 1];
    out.extend_from_slice(&wall_time.to_le_bytes());
    out.push(2 << 3);
    varint(step, &mut out);
    body(&mut out);
    out
}

impl EventWriter {
    /// A new event file in `dir` (TensorBoard reads every `*tfevents*` file of a directory,
    /// so a resumed run adds one).
    pub fn create(dir: &Path) -> Result<Self> {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let path = dir.join(format!(
            "events.out.tfevents.{stamp}.la-train.{}",
            std::process::id()
        ));
        let fail = |source| Error::File {
            path: path.clone(),
            what: "cannot write the TensorBoard events",
            source,
        };
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(fail)?;
        let mut writer = Self { path, file };
        writer.record(&event(0, |out| length_delimited(3, b"brain.Event:2", out)))?;
        Ok(writer)
    }

    /// [`EventWriter::create`] when `on`.
    pub fn create_if(on: bool, dir: &Path) -> Result<Option<Self>> {
        on.then(|| Self::create(dir)).transpose()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `tag = value` at `step`.
    pub fn scalar(&mut self, tag: &str, value: f64, step: u64) -> Result<()> {
        let mut value_msg = Vec::new();
        length_delimited(1, tag.as_bytes(), &mut value_msg);
        value_msg.push((2 << 3) | 5);
        value_msg.extend_from_slice(&(value as f32).to_le_bytes());
        let mut summary = Vec::new();
        length_delimited(1, &value_msg, &mut summary);
        self.record(&event(step, |out| length_delimited(5, &summary, out)))
    }

    fn record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut framed = Vec::with_capacity(data.len() + 16);
        framed.extend_from_slice(&len);
        framed.extend_from_slice(&masked_crc(&len).to_le_bytes());
        framed.extend_from_slice(data);
        framed.extend_from_slice(&masked_crc(data).to_le_bytes());
        // One write per record and a flush, so a killed run leaves whole records.
        self.file
            .write_all(&framed)
            .and_then(|()| self.file.flush())
            .map_err(|source| Error::File {
                path: self.path.clone(),
                what: "cannot write the TensorBoard events",
                source,
            })
    }
}

/// The scalars of an event file as (tag, step, value), checking every checksum: for tests
/// and for `scripts/check-tensorboard.py`'s counterpart in Rust.
pub fn read_scalars(path: &Path) -> Result<Vec<(String, u64, f32)>> {
    let bytes = std::fs::read(path).map_err(|source| Error::File {
        path: path.to_path_buf(),
        what: "cannot read",
        source,
    })?;
    let bad = |why: &str| Error::Data(format!("{}: {why}", path.display()));
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let header = bytes
            .get(at..at + 12)
            .ok_or_else(|| bad("a truncated record"))?;
        let len = u64::from_le_bytes(header[..8].try_into().expect("8 bytes")) as usize;
        if masked_crc(&header[..8]).to_le_bytes() != header[8..12] {
            return Err(bad("a record length with a wrong checksum"));
        }
        let data = bytes
            .get(at + 12..at + 12 + len)
            .ok_or_else(|| bad("a truncated record"))?;
        let crc = bytes
            .get(at + 12 + len..at + 16 + len)
            .ok_or_else(|| bad("a truncated record"))?;
        if masked_crc(data).to_le_bytes() != crc {
            return Err(bad("a record with a wrong checksum"));
        }
        at += 16 + len;
        out.extend(decode_event(data).ok_or_else(|| bad("a malformed event"))?);
    }
    Ok(out)
}

fn read_varint(b: &[u8], at: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*at)?;
        *at += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            return Some(v);
        }
    }
    None
}

/// (field, wire type, payload range or value) of each field of a message.
fn fields(b: &[u8]) -> Option<Vec<(u64, u64, std::ops::Range<usize>)>> {
    let mut at = 0;
    let mut out = Vec::new();
    while at < b.len() {
        let key = read_varint(b, &mut at)?;
        let (field, wire) = (key >> 3, key & 7);
        let start = at;
        let end = match wire {
            0 => {
                read_varint(b, &mut at)?;
                at
            }
            1 => at + 8,
            2 => {
                let len = read_varint(b, &mut at)? as usize;
                at + len
            }
            5 => at + 4,
            _ => return None,
        };
        let range = if wire == 2 { at..end } else { start..end };
        at = end;
        if at > b.len() {
            return None;
        }
        out.push((field, wire, range));
    }
    Some(out)
}

fn decode_event(b: &[u8]) -> Option<Vec<(String, u64, f32)>> {
    let mut step = 0;
    let mut values = Vec::new();
    for (field, _, r) in fields(b)? {
        match field {
            2 => step = read_varint(&b[r], &mut 0)?,
            5 => {
                for (f, _, v) in fields(&b[r.clone()])? {
                    if f != 1 {
                        continue;
                    }
                    let value = &b[r.start + v.start..r.start + v.end];
                    let (mut tag, mut simple) = (None, None);
                    for (vf, _, vr) in fields(value)? {
                        match vf {
                            1 => tag = Some(String::from_utf8(value[vr].to_vec()).ok()?),
                            2 => simple = Some(f32::from_le_bytes(value[vr].try_into().ok()?)),
                            _ => {}
                        }
                    }
                    values.push((tag?, simple?));
                }
            }
            _ => {}
        }
    }
    Some(values.into_iter().map(|(t, v)| (t, step, v)).collect())
}
