//! The on-disk spool of one sink: batches it could not deliver, replayed oldest first.
//!
//! Each batch is one file `<seq>-<events>.spool` in the sink's directory, written whole and
//! fsynced (file and directory) before it counts as spooled, and removed once delivered.
//! A file is the magic `GHSPOOL1` followed by records, each `u32` length and `u32` CRC32
//! (little-endian) of the payload, then the payload (one event's JSON). A record cut short
//! by a crash, or whose checksum does not match, ends the file: the intact records before it
//! are replayed, the rest is skipped. Past `max_bytes`, the oldest files are dropped.

use std::collections::VecDeque;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::PathBuf;

use bytes::Bytes;

const MAGIC: &[u8; 8] = b"GHSPOOL1";
const EXTENSION: &str = "spool";

/// One spooled batch on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    seq: u64,
    events: u64,
    bytes: u64,
}

pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    files: VecDeque<Entry>,
    bytes: u64,
}

/// The records of one spool file.
#[derive(Debug, PartialEq)]
pub struct Decoded {
    pub events: Vec<Bytes>,
    /// A record was cut short or corrupt: it and anything after it were skipped.
    pub torn: bool,
}

impl Spool {
    /// Opens (creating) the spool in `dir`, taking over the files a previous process left.
    pub fn open(dir: PathBuf, max_bytes: u64) -> io::Result<Spool> {
        fs::create_dir_all(&dir)?;
        let mut files = Vec::new();
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some((seq, events)) = name.to_str().and_then(parse_name) else {
                continue;
            };
            files.push(Entry {
                seq,
                events,
                bytes: entry.metadata()?.len(),
            });
        }
        files.sort_by_key(|e| e.seq);
        let bytes = files.iter().map(|e| e.bytes).sum();
        Ok(Spool {
            dir,
            max_bytes,
            files: files.into(),
            bytes,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Events waiting in the spool.
    pub fn events(&self) -> u64 {
        self.files.iter().map(|e| e.events).sum()
    }

    /// Writes `batch` as the newest file, durably. Returns how many old events were dropped
    /// to stay within the size bound.
    pub fn append(&mut self, batch: &[Bytes]) -> io::Result<u64> {
        let seq = self.files.back().map_or(0, |e| e.seq + 1);
        let data = encode(batch);
        let path = self.path(seq, batch.len() as u64);
        let mut file = File::create(&path)?;
        let written = file.write_all(&data).and_then(|()| file.sync_all());
        if let Err(e) = written {
            let _ = fs::remove_file(&path);
            return Err(e);
        }
        File::open(&self.dir)?.sync_all()?;
        self.files.push_back(Entry {
            seq,
            events: batch.len() as u64,
            bytes: data.len() as u64,
        });
        self.bytes += data.len() as u64;
        let mut dropped = 0;
        while self.bytes > self.max_bytes && self.files.len() > 1 {
            dropped += self.files.front().map_or(0, |e| e.events);
            self.remove_oldest()?;
        }
        Ok(dropped)
    }

    /// The oldest batch's records.
    pub fn oldest(&self) -> Option<io::Result<Decoded>> {
        let e = self.files.front()?;
        Some(fs::read(self.path(e.seq, e.events)).map(|data| decode(&data)))
    }

    /// Removes the oldest batch (delivered, or dropped).
    pub fn remove_oldest(&mut self) -> io::Result<()> {
        if let Some(e) = self.files.pop_front() {
            self.bytes -= e.bytes;
            match fs::remove_file(self.path(e.seq, e.events)) {
                Err(err) if err.kind() != io::ErrorKind::NotFound => return Err(err),
                _ => {}
            }
        }
        Ok(())
    }

    fn path(&self, seq: u64, events: u64) -> PathBuf {
        self.dir.join(format!("{seq:020}-{events}.{EXTENSION}"))
    }
}

fn parse_name(name: &str) -> Option<(u64, u64)> {
    let stem = name.strip_suffix(EXTENSION)?.strip_suffix('.')?;
    let (seq, events) = stem.split_once('-')?;
    Some((seq.parse().ok()?, events.parse().ok()?))
}

/// A spool file's bytes for `batch`.
pub fn encode(batch: &[Bytes]) -> Vec<u8> {
    let mut out =
        Vec::with_capacity(MAGIC.len() + batch.iter().map(|b| b.len() + 8).sum::<usize>());
    out.extend_from_slice(MAGIC);
    for event in batch {
        out.extend_from_slice(&(event.len() as u32).to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(event).to_le_bytes());
        out.extend_from_slice(event);
    }
    out
}

/// The intact records of a spool file, up to the first torn or corrupt one.
pub fn decode(data: &[u8]) -> Decoded {
    let Some(mut rest) = data.strip_prefix(MAGIC.as_slice()) else {
        return Decoded {
            events: Vec::new(),
            torn: !data.is_empty(),
        };
    };
    let mut events = Vec::new();
    while !rest.is_empty() {
        let record = (rest.len() >= 8)
            .then(|| {
                let len = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
                let crc = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes"));
                let payload = rest.get(8..8 + len)?;
                (crc32fast::hash(payload) == crc).then_some((payload, 8 + len))
            })
            .flatten();
        let Some((payload, used)) = record else {
            return Decoded { events, torn: true };
        };
        events.push(Bytes::copy_from_slice(payload));
        rest = &rest[used..];
    }
    Decoded {
        events,
        torn: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(ids: std::ops::Range<u32>) -> Vec<Bytes> {
        ids.map(|i| Bytes::from(format!("{{\"request_id\":\"r{i:03}\"}}")))
            .collect()
    }

    #[test]
    fn records_round_trip() {
        let b = batch(0..3);
        assert_eq!(
            decode(&encode(&b)),
            Decoded {
                events: b,
                torn: false
            }
        );
        assert_eq!(decode(&encode(&[])).events, Vec::<Bytes>::new());
    }

    #[test]
    fn a_torn_or_corrupt_last_record_is_skipped() {
        let b = batch(0..3);
        let data = encode(&b);
        for cut in [1, 5, 8, 12] {
            let d = decode(&data[..data.len() - cut]);
            assert_eq!(d.events, b[..2], "cut {cut}");
            assert!(d.torn);
        }
        let mut corrupt = data.clone();
        let last = corrupt.len() - 1;
        corrupt[last] ^= 0xff;
        assert_eq!(decode(&corrupt).events, b[..2]);
        // Only the magic and a record's start survived.
        assert_eq!(decode(&data[..10]).events, Vec::<Bytes>::new());
        assert!(decode(b"not a spool").torn);
    }

    #[test]
    fn batches_come_back_oldest_first_across_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path().join("sink"), 1 << 20).unwrap();
        assert!(s.is_empty());
        s.append(&batch(0..2)).unwrap();
        s.append(&batch(2..5)).unwrap();
        assert_eq!(s.events(), 5);
        let mut s = Spool::open(dir.path().join("sink"), 1 << 20).unwrap();
        assert_eq!(s.oldest().unwrap().unwrap().events, batch(0..2));
        s.remove_oldest().unwrap();
        s.append(&batch(5..6)).unwrap();
        assert_eq!(s.oldest().unwrap().unwrap().events, batch(2..5));
        s.remove_oldest().unwrap();
        assert_eq!(s.oldest().unwrap().unwrap().events, batch(5..6));
        s.remove_oldest().unwrap();
        assert!(s.is_empty() && s.oldest().is_none());
    }

    #[test]
    fn past_the_bound_the_oldest_batches_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let one = encode(&batch(0..4)).len() as u64;
        let mut s = Spool::open(dir.path().to_owned(), one * 2).unwrap();
        assert_eq!(s.append(&batch(0..4)).unwrap(), 0);
        assert_eq!(s.append(&batch(4..8)).unwrap(), 0);
        assert_eq!(s.append(&batch(8..12)).unwrap(), 4);
        assert_eq!(s.events(), 8);
        assert_eq!(s.oldest().unwrap().unwrap().events, batch(4..8));
    }
}
