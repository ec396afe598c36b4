//! The spool of one sink: a journal on disk that every event is appended to before delivery
//! is attempted, read back in order by the sink's worker, which moves a cursor forward only
//! once the sink has taken a batch. A process killed at any point loses none of what was
//! appended (the page cache holds it) and resumes from the cursor; `sync` (every
//! `fsync_interval`) extends that to a machine crash.
//!
//! `spool_dir/<sink>/` holds segments: `<seq>.spool` while this process appends to it,
//! `<seq>-<events>.spool` once sealed (complete; the name counts its records, the layout the
//! spool files of earlier versions already had), and `cursor`: the position (segment and
//! byte offset) of the first record not yet delivered. A segment is the magic `GHSPOOL1`
//! followed by records, each a `u32` length and a `u32` CRC32 (little-endian) of the
//! payload, then the payload (one event's JSON). A record cut short by a crash, or whose
//! checksum does not match, ends its segment: the intact records before it are delivered,
//! the rest is skipped. Segments before the cursor are removed; nothing is appended to a
//! segment of an earlier process. Past `max_bytes`, the oldest segments not yet started
//! are dropped and counted.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::Notify;

const MAGIC: &[u8; 8] = b"GHSPOOL1";
const HEADER: u64 = MAGIC.len() as u64;
const EXTENSION: &str = "spool";
const CURSOR: &str = "cursor";
const CURSOR_MAGIC: &[u8; 8] = b"GHCURSR1";
/// The largest record read back: a garbage length after a crash must not allocate gigabytes.
const MAX_RECORD: usize = 64 << 20;
/// Segments are sealed past an eighth of `max_bytes`, at most this: the bound drops whole
/// segments, and a restart scans at most one unsealed segment per earlier process.
const MAX_SEGMENT: u64 = 16 << 20;
/// How much of a segment one read asks for.
const READ_CHUNK: usize = 256 << 10;

/// A place in the journal: a segment and a byte offset in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    seq: u64,
    offset: u64,
}

#[derive(Debug)]
struct Segment {
    seq: u64,
    path: PathBuf,
    /// What can be read: the file may hold a torn record past it.
    bytes: u64,
    events: u64,
    /// This process still appends to it (only ever the newest).
    open: bool,
}

/// One sink's journal, shared by the dispatcher (appends), the sink's worker (reads and
/// acknowledgements) and the fsync task. Every method that touches the disk blocks: call it
/// on the blocking pool.
pub struct Journal {
    state: Mutex<State>,
    /// Events appended and not yet taken by the reader; read by the worker without the lock.
    unread: AtomicU64,
    /// No more appends: set when the dispatcher stops.
    closed: AtomicBool,
    /// Appended to, or closed: wakes the sink's worker.
    grew: Notify,
}

struct State {
    sink: String,
    dir: PathBuf,
    max_bytes: u64,
    segment_bytes: u64,
    segments: VecDeque<Segment>,
    /// The readable bytes of all segments.
    bytes: u64,
    next_seq: u64,
    /// The newest segment's file while this process appends to it.
    active: Option<File>,
    /// Where the next read starts, and how many records of that segment were read before it.
    read: Position,
    read_events: u64,
    reading: Option<(u64, File)>,
    cursor: Option<File>,
    /// Written since the last sync: sealed segments, the active one, the cursor, the directory.
    unsynced: Vec<File>,
    active_dirty: bool,
    cursor_dirty: bool,
    dir_dirty: bool,
}

/// What the reader took: events in journal order and the position after them.
pub struct Taken {
    pub events: Vec<Bytes>,
    pub end: Position,
}

/// What a sink's directory holds, for a sink no longer configured.
#[derive(Debug, PartialEq, Eq)]
pub struct Backlog {
    pub events: u64,
    pub bytes: u64,
}

impl Journal {
    /// Opens (creating) the journal in `dir`, taking over what a previous process left:
    /// removes the segments it delivered, cuts a torn tail off the segment it was appending
    /// to and seals that one.
    pub fn open(dir: PathBuf, max_bytes: u64, sink: &str) -> io::Result<Journal> {
        fs::create_dir_all(&dir)?;
        let found = Found::load(&dir, sink)?;
        // Above every file there, even one left aside: a new segment never meets an old one.
        let next_seq = found
            .segments
            .iter()
            .map(|s| s.seq)
            .chain(found.cursor.map(|c| c.seq))
            .max()
            .map_or(0, |s| s + 1);
        let mut segments = VecDeque::with_capacity(found.segments.len());
        let mut dir_dirty = false;
        for mut seg in found.segments {
            let delivered = found.cursor.is_some_and(|c| seg.seq < c.seq);
            if seg.open && !delivered {
                if let Err(e) = seal_recovered(&mut seg, sink) {
                    tracing::error!(sink, path = %seg.path.display(), error = %e, "unreadable audit spool segment of an earlier run: left as it is, not delivered");
                    continue;
                }
                dir_dirty = true;
            }
            if delivered || seg.events == 0 {
                // Kept out of the journal either way: a file that cannot be removed is
                // tried again at the next start.
                if let Err(e) = remove(&seg.path) {
                    tracing::warn!(sink, path = %seg.path.display(), error = %e, "cannot remove a delivered audit spool segment");
                }
                dir_dirty = true;
                continue;
            }
            segments.push_back(seg);
        }
        let (read, read_events) = start_position(found.cursor, &segments, sink);
        let total: u64 = segments.iter().map(|s| s.events).sum();
        Ok(Journal {
            unread: AtomicU64::new(total.saturating_sub(read_events)),
            closed: AtomicBool::new(false),
            grew: Notify::new(),
            state: Mutex::new(State {
                sink: sink.to_owned(),
                dir,
                max_bytes,
                segment_bytes: (max_bytes / 8).clamp(1, MAX_SEGMENT),
                bytes: segments.iter().map(|s| s.bytes).sum(),
                segments,
                next_seq,
                active: None,
                read,
                read_events,
                reading: None,
                cursor: None,
                unsynced: Vec::new(),
                active_dirty: false,
                cursor_dirty: false,
                dir_dirty,
            }),
        })
    }

    /// Events appended (by this process or an earlier one) and not yet taken by the reader.
    pub fn unread(&self) -> u64 {
        self.unread.load(Relaxed)
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Relaxed)
    }

    /// Resolves once something was appended, or the journal closed, since the last wake.
    pub async fn grew(&self) {
        self.grew.notified().await;
    }

    /// No more appends: the worker delivers what is left and stops.
    pub fn close(&self) {
        self.closed.store(true, Relaxed);
        self.grew.notify_one();
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("not poisoned")
    }

    /// Appends `records` (from [`records`]: `events` of them) in one write, to the page
    /// cache only. Returns how many unread events were dropped to stay within `max_bytes`.
    /// A failed write leaves the journal as it was (the segment is sealed before it).
    pub fn append(&self, records: &[u8], events: u64) -> io::Result<u64> {
        let mut s = self.lock();
        let full = s.segments.back().is_none_or(|g| g.bytes >= s.segment_bytes);
        if s.active.is_none() || full {
            s.roll()?;
        }
        let state = &mut *s;
        let file = state.active.as_mut().expect("rolled");
        if let Err(e) = file.write_all(records) {
            let committed = state.segments.back().expect("the active segment").bytes;
            let _ = file.set_len(committed);
            s.seal_active();
            return Err(e);
        }
        let seg = s.segments.back_mut().expect("the active segment");
        seg.bytes += records.len() as u64;
        seg.events += events;
        s.bytes += records.len() as u64;
        s.active_dirty = true;
        self.unread.fetch_add(events, Relaxed);
        let dropped = s.enforce_bound();
        self.unread.fetch_sub(dropped, Relaxed);
        drop(s);
        self.grew.notify_one();
        Ok(dropped)
    }

    /// Reads up to `max` events from where the last take ended, across segments. Unreadable
    /// segments and torn records are logged and skipped. Nothing is acknowledged.
    pub fn take(&self, max: usize) -> Taken {
        let mut s = self.lock();
        let mut events = Vec::new();
        let mut skipped = 0;
        while events.len() < max {
            let read = s.read;
            let Some(seg) = s.segments.iter().find(|g| g.seq >= read.seq) else {
                break;
            };
            let (seq, bytes, total, open) = (seg.seq, seg.bytes, seg.events, seg.open);
            let path = seg.path.clone();
            if seq != read.seq {
                s.read = Position {
                    seq,
                    offset: HEADER,
                };
                s.read_events = 0;
            }
            if s.read.offset >= bytes {
                if open {
                    break;
                }
                s.read = Position {
                    seq: seq + 1,
                    offset: HEADER,
                };
                s.read_events = 0;
                continue;
            }
            let file = match s.reading.take() {
                Some((q, file)) if q == seq => Ok(file),
                _ => File::open(&path),
            };
            let records = file.and_then(|file| {
                let r = read_records(&file, s.read.offset, bytes, max - events.len());
                s.reading = Some((seq, file));
                r
            });
            match records {
                Ok(r) => {
                    s.read.offset = r.end;
                    s.read_events += r.events.len() as u64;
                    events.extend(r.events);
                    if !r.torn {
                        continue;
                    }
                    tracing::warn!(sink = %s.sink, path = %path.display(), intact = s.read_events, "audit spool segment ends in a torn record (a crash while writing): its intact records are delivered, the rest skipped");
                }
                Err(e) => {
                    tracing::error!(sink = %s.sink, path = %path.display(), error = %e, "unreadable audit spool segment: skipped");
                }
            }
            skipped += total.saturating_sub(s.read_events);
            s.read.offset = bytes;
        }
        let caught_up = s.segments.back().is_none_or(|g| {
            g.seq < s.read.seq || (g.seq == s.read.seq && s.read.offset >= g.bytes)
        });
        if caught_up {
            // Exact again, whatever an earlier version's file name claimed.
            self.unread.store(0, Relaxed);
        } else {
            let taken = events.len() as u64 + skipped;
            let _ = self
                .unread
                .fetch_update(Relaxed, Relaxed, |u| Some(u.saturating_sub(taken)));
        }
        Taken {
            events,
            end: s.read,
        }
    }

    /// The sink has taken everything before `end`: moves the cursor there (a write to the
    /// page cache) and removes the segments wholly before it.
    pub fn ack(&self, end: Position) -> io::Result<()> {
        let mut s = self.lock();
        let state = &mut *s;
        let cursor = match &mut state.cursor {
            Some(file) => file,
            None => {
                let file = OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(state.dir.join(CURSOR))?;
                state.dir_dirty = true;
                state.cursor.insert(file)
            }
        };
        cursor.write_all_at(&encode_cursor(end), 0)?;
        state.cursor_dirty = true;
        while let Some(front) = state.segments.front() {
            let done = front.seq < end.seq
                || (front.seq == end.seq && !front.open && end.offset >= front.bytes);
            if !done {
                break;
            }
            let seg = state.segments.pop_front().expect("a front");
            state.bytes -= seg.bytes;
            if state.reading.as_ref().is_some_and(|(q, _)| *q == seg.seq) {
                state.reading = None;
            }
            state.dir_dirty = true;
            remove(&seg.path)?;
        }
        Ok(())
    }

    /// Makes what was written so far survive a machine crash. The lock is not held while
    /// the disk works: appends go on meanwhile.
    pub fn sync(&self) -> io::Result<()> {
        let (files, dir) = {
            let mut s = self.lock();
            let mut files = std::mem::take(&mut s.unsynced);
            if std::mem::take(&mut s.active_dirty) {
                files.extend(s.active.as_ref().map(File::try_clone).transpose()?);
            }
            if std::mem::take(&mut s.cursor_dirty) {
                files.extend(s.cursor.as_ref().map(File::try_clone).transpose()?);
            }
            let dir = std::mem::take(&mut s.dir_dirty).then(|| s.dir.clone());
            (files, dir)
        };
        for file in files {
            file.sync_data()?;
        }
        match dir {
            Some(dir) => File::open(dir)?.sync_all(),
            None => Ok(()),
        }
    }

    /// Everything was delivered and nothing more comes: removes the segments, then the
    /// cursor, leaving the directory empty.
    pub fn finish(&self) -> io::Result<()> {
        let mut s = self.lock();
        s.active = None;
        s.reading = None;
        s.cursor = None;
        s.unsynced.clear();
        while let Some(seg) = s.segments.pop_front() {
            s.bytes -= seg.bytes;
            remove(&seg.path)?;
        }
        remove(&s.dir.join(CURSOR))
    }
}

impl State {
    /// Seals the active segment and starts a new one.
    fn roll(&mut self) -> io::Result<()> {
        self.seal_active();
        let seq = self.next_seq;
        let path = self.dir.join(format!("{seq:020}.{EXTENSION}"));
        let mut file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)?;
        self.dir_dirty = true;
        if let Err(e) = file.write_all(MAGIC) {
            let _ = fs::remove_file(&path);
            return Err(e);
        }
        self.next_seq += 1;
        self.segments.push_back(Segment {
            seq,
            path,
            bytes: HEADER,
            events: 0,
            open: true,
        });
        self.bytes += HEADER;
        self.active = Some(file);
        self.active_dirty = true;
        Ok(())
    }

    /// No more appends to the newest segment; its name gets its record count, so a restart
    /// need not scan it.
    fn seal_active(&mut self) {
        let Some(file) = self.active.take() else {
            return;
        };
        if std::mem::take(&mut self.active_dirty) {
            self.unsynced.push(file);
        }
        let seg = self.segments.back_mut().expect("the active segment");
        seg.open = false;
        let sealed = sealed_path(&self.dir, seg.seq, seg.events);
        if fs::rename(&seg.path, &sealed).is_ok() {
            seg.path = sealed;
            self.dir_dirty = true;
        }
    }

    /// Drops whole segments, oldest first, until the journal fits `max_bytes`; never the
    /// one being read (its batch may be in flight) nor the newest. Returns the events dropped.
    fn enforce_bound(&mut self) -> u64 {
        let mut dropped = 0;
        while self.bytes > self.max_bytes {
            let Some(i) = self.segments.iter().position(|g| g.seq > self.read.seq) else {
                break;
            };
            if i + 1 == self.segments.len() {
                break;
            }
            let seg = self.segments.remove(i).expect("found");
            self.bytes -= seg.bytes;
            dropped += seg.events;
            self.dir_dirty = true;
            if let Err(e) = remove(&seg.path) {
                tracing::error!(sink = %self.sink, path = %seg.path.display(), error = %e, "cannot remove a dropped audit spool segment");
            }
        }
        dropped
    }
}

/// A segment left open by an earlier process: counts its records, cuts a torn tail off and
/// renames it sealed. Only reading it must succeed: what is read is all that is delivered.
fn seal_recovered(seg: &mut Segment, sink: &str) -> io::Result<()> {
    let scan = walk(&fs::read(&seg.path)?);
    seg.bytes = scan.bytes;
    seg.events = scan.events;
    seg.open = false;
    if scan.torn {
        tracing::warn!(sink, path = %seg.path.display(), intact = scan.events, "audit spool segment ends in a torn record (a crash while writing): its intact records are delivered, the rest skipped");
    }
    let sealed = sealed_path(
        seg.path.parent().expect("in a directory"),
        seg.seq,
        seg.events,
    );
    let cut = || {
        OpenOptions::new()
            .write(true)
            .open(&seg.path)?
            .set_len(scan.bytes)
    };
    match (if scan.torn { cut() } else { Ok(()) }).and_then(|()| fs::rename(&seg.path, &sealed)) {
        Ok(()) => seg.path = sealed,
        Err(e) => {
            tracing::warn!(sink, path = %seg.path.display(), error = %e, "cannot seal an audit spool segment of an earlier run; it is delivered as it is")
        }
    }
    Ok(())
}

/// Where reading resumes: at the cursor when its segment is still there, else at the start
/// of the oldest segment; and how many records of that segment lie before it.
fn start_position(
    cursor: Option<Position>,
    segments: &VecDeque<Segment>,
    sink: &str,
) -> (Position, u64) {
    let first = segments.front().map(|g| Position {
        seq: g.seq,
        offset: HEADER,
    });
    let at_start = first.or(cursor).unwrap_or(Position {
        seq: 0,
        offset: HEADER,
    });
    let Some((cursor, seg)) =
        cursor.and_then(|c| Some((c, segments.iter().find(|g| g.seq == c.seq)?)))
    else {
        return (at_start, 0);
    };
    let offset = cursor.offset.clamp(HEADER, seg.bytes);
    let mut head = vec![0; offset as usize];
    match File::open(&seg.path).and_then(|mut f| f.read_exact(&mut head)) {
        Ok(()) => (
            Position {
                seq: seg.seq,
                offset,
            },
            walk(&head).events,
        ),
        Err(e) => {
            tracing::warn!(sink, path = %seg.path.display(), error = %e, "cannot read the audit spool segment at the cursor: delivering from the oldest segment (some events may arrive twice)");
            (at_start, 0)
        }
    }
}

/// The segments and cursor found in a sink's directory, read-only.
struct Found {
    segments: Vec<Segment>,
    cursor: Option<Position>,
}

impl Found {
    fn load(dir: &Path, sink: &str) -> io::Result<Found> {
        let mut segments = Vec::new();
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some((seq, events)) = name.to_str().and_then(parse_name) else {
                continue;
            };
            if !entry.file_type()?.is_file() {
                tracing::warn!(sink, path = %entry.path().display(), "not a regular file: ignored in the audit spool");
                continue;
            }
            segments.push(Segment {
                seq,
                path: entry.path(),
                bytes: entry.metadata()?.len(),
                events: events.unwrap_or(0),
                open: events.is_none(),
            });
        }
        segments.sort_by_key(|g| g.seq);
        let cursor = match fs::read(dir.join(CURSOR)) {
            Ok(data) => {
                let cursor = decode_cursor(&data);
                if cursor.is_none() {
                    tracing::warn!(sink, "audit spool cursor unreadable: delivering from the oldest segment (some events may arrive twice)");
                }
                cursor
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        Ok(Found { segments, cursor })
    }
}

/// What the spool directory of a sink no longer configured holds (nothing is changed): a
/// sealed segment's name counts its records, the others are read.
pub fn backlog(dir: &Path) -> io::Result<Backlog> {
    let found = Found::load(dir, &dir.display().to_string())?;
    let mut backlog = Backlog {
        events: 0,
        bytes: 0,
    };
    for seg in &found.segments {
        let skip = match found.cursor {
            Some(c) if seg.seq < c.seq => continue,
            Some(c) if seg.seq == c.seq => c.offset,
            _ => HEADER,
        };
        backlog.bytes += seg.bytes;
        if !seg.open && skip == HEADER {
            backlog.events += seg.events;
            continue;
        }
        let data = fs::read(&seg.path)?;
        let skip = (skip as usize).clamp(MAGIC.len(), data.len());
        backlog.events += walk(&data).events - walk(&data[..skip]).events;
    }
    Ok(backlog)
}

fn sealed_path(dir: &Path, seq: u64, events: u64) -> PathBuf {
    dir.join(format!("{seq:020}-{events}.{EXTENSION}"))
}

/// `<seq>.spool` (open) or `<seq>-<events>.spool` (sealed).
fn parse_name(name: &str) -> Option<(u64, Option<u64>)> {
    let stem = name.strip_suffix(EXTENSION)?.strip_suffix('.')?;
    Some(match stem.split_once('-') {
        Some((seq, events)) => (seq.parse().ok()?, Some(events.parse().ok()?)),
        None => (stem.parse().ok()?, None),
    })
}

fn remove(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn encode_cursor(p: Position) -> [u8; 28] {
    let mut out = [0; 28];
    out[..8].copy_from_slice(CURSOR_MAGIC);
    out[8..16].copy_from_slice(&p.seq.to_le_bytes());
    out[16..24].copy_from_slice(&p.offset.to_le_bytes());
    let crc = crc32fast::hash(&out[8..24]);
    out[24..].copy_from_slice(&crc.to_le_bytes());
    out
}

fn decode_cursor(data: &[u8]) -> Option<Position> {
    let data: &[u8; 28] = data.get(..28)?.try_into().ok()?;
    let crc = u32::from_le_bytes(data[24..].try_into().expect("4 bytes"));
    (data[..8] == *CURSOR_MAGIC && crc32fast::hash(&data[8..24]) == crc).then(|| Position {
        seq: u64::from_le_bytes(data[8..16].try_into().expect("8 bytes")),
        offset: u64::from_le_bytes(data[16..24].try_into().expect("8 bytes")),
    })
}

/// The records for `batch`, to append to a segment.
pub fn records(batch: &[Bytes]) -> Vec<u8> {
    let mut out = Vec::with_capacity(batch.iter().map(|b| b.len() + 8).sum::<usize>());
    for event in batch {
        out.extend_from_slice(&(event.len() as u32).to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(event).to_le_bytes());
        out.extend_from_slice(event);
    }
    out
}

/// A whole segment's bytes for `batch`.
pub fn encode(batch: &[Bytes]) -> Vec<u8> {
    [MAGIC.as_slice(), &records(batch)].concat()
}

/// The records of a segment file.
#[derive(Debug, PartialEq)]
pub struct Decoded {
    pub events: Vec<Bytes>,
    /// A record was cut short or corrupt: it and anything after it were skipped.
    pub torn: bool,
}

/// The intact records of a segment file, up to the first torn or corrupt one.
pub fn decode(data: &[u8]) -> Decoded {
    let Some(rest) = data.strip_prefix(MAGIC.as_slice()) else {
        return Decoded {
            events: Vec::new(),
            torn: !data.is_empty(),
        };
    };
    let data = Bytes::copy_from_slice(rest);
    let mut events = Vec::new();
    let mut at = 0;
    loop {
        match parse_record(&data[at..]) {
            Record::Intact(len) => {
                events.push(data.slice(at + 8..at + 8 + len));
                at += 8 + len;
            }
            Record::Short if at == data.len() => {
                return Decoded {
                    events,
                    torn: false,
                }
            }
            Record::Short | Record::Corrupt => return Decoded { events, torn: true },
        }
    }
}

/// The start of `rest`, read as a record.
enum Record {
    /// A record with a payload this long.
    Intact(usize),
    /// Not all of the record is there.
    Short,
    /// A checksum mismatch, or a length no event has: garbage.
    Corrupt,
}

fn parse_record(rest: &[u8]) -> Record {
    let Some(head) = rest.get(..8) else {
        return Record::Short;
    };
    let len = u32::from_le_bytes(head[..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(head[4..].try_into().expect("4 bytes"));
    if len == 0 || len > MAX_RECORD {
        // An empty payload is no event: zeros left by a machine crash read as one.
        return Record::Corrupt;
    }
    match rest.get(8..8 + len) {
        None => Record::Short,
        Some(payload) if crc32fast::hash(payload) == crc => Record::Intact(len),
        Some(_) => Record::Corrupt,
    }
}

/// A segment's bytes as far as they hold intact records.
struct Walk {
    events: u64,
    /// The length of the intact part, magic included.
    bytes: u64,
    torn: bool,
}

fn walk(data: &[u8]) -> Walk {
    let Some(rest) = data.strip_prefix(MAGIC.as_slice()) else {
        return Walk {
            events: 0,
            bytes: 0,
            torn: !data.is_empty(),
        };
    };
    let (mut events, mut at) = (0, 0);
    while let Record::Intact(len) = parse_record(&rest[at..]) {
        events += 1;
        at += 8 + len;
    }
    Walk {
        events,
        bytes: HEADER + at as u64,
        torn: at < rest.len(),
    }
}

/// Records read from a segment.
struct Records {
    events: Vec<Bytes>,
    /// The offset after the last record read.
    end: u64,
    torn: bool,
}

/// Reads up to `max` records from `file` between offsets `at` and `end`. The events of one
/// read share its buffer.
fn read_records(file: &File, mut at: u64, end: u64, max: usize) -> io::Result<Records> {
    let mut events = Vec::new();
    let mut chunk = READ_CHUNK;
    while events.len() < max && at < end {
        let want = (end - at).min(chunk as u64) as usize;
        let mut buf = vec![0; want];
        file.read_exact_at(&mut buf, at)?;
        let buf = Bytes::from(buf);
        let mut used = 0;
        let mut torn = false;
        while events.len() < max {
            match parse_record(&buf[used..]) {
                Record::Intact(len) => {
                    events.push(buf.slice(used + 8..used + 8 + len));
                    used += 8 + len;
                }
                Record::Short => {
                    // Past the readable end, a record cut short is a torn one.
                    torn = used < want && want as u64 == end - at;
                    break;
                }
                Record::Corrupt => {
                    torn = true;
                    break;
                }
            }
        }
        at += used as u64;
        if torn {
            return Ok(Records {
                events,
                end: at,
                torn,
            });
        }
        if used == 0 && events.len() < max {
            // One record larger than the chunk.
            chunk = chunk.saturating_mul(2);
        }
    }
    Ok(Records {
        events,
        end: at,
        torn: false,
    })
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
        // Zeros (a machine crash before the data reached the disk) are no records.
        let mut zeros = encode(&b[..1]);
        zeros.extend_from_slice(&[0; 64]);
        assert_eq!(decode(&zeros).events, b[..1]);
        assert!(decode(&zeros).torn);
    }

    fn open(dir: &Path, max_bytes: u64) -> Journal {
        Journal::open(dir.to_owned(), max_bytes, "test").unwrap()
    }

    fn append(j: &Journal, b: &[Bytes]) -> u64 {
        j.append(&records(b), b.len() as u64).unwrap()
    }

    /// Takes and acknowledges up to `max` events.
    fn deliver(j: &Journal, max: usize) -> Vec<Bytes> {
        let t = j.take(max);
        j.ack(t.end).unwrap();
        t.events
    }

    fn files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn the_reader_resumes_at_the_cursor_after_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let j = open(dir.path(), 1 << 20);
        append(&j, &batch(0..3));
        append(&j, &batch(3..5));
        assert_eq!(j.unread(), 5);
        assert_eq!(deliver(&j, 2), batch(0..2));
        assert_eq!(j.unread(), 3);
        // Taken but not acknowledged: comes again after the crash.
        assert_eq!(j.take(2).events, batch(2..4));
        drop(j);

        let j = open(dir.path(), 1 << 20);
        assert_eq!(j.unread(), 3);
        append(&j, &batch(5..6));
        assert_eq!(deliver(&j, 10), batch(2..6));
        assert_eq!(j.unread(), 0);
        assert!(j.take(10).events.is_empty());
        // The earlier process's segment, delivered, is gone; the cursor and the open one stay.
        assert_eq!(
            files(dir.path()),
            ["00000000000000000001.spool", "cursor"].map(String::from)
        );
        j.finish().unwrap();
        assert!(files(dir.path()).is_empty());
    }

    #[test]
    fn a_torn_tail_is_cut_at_recovery_and_appends_go_to_a_new_segment() {
        let dir = tempfile::tempdir().unwrap();
        let j = open(dir.path(), 1 << 20);
        append(&j, &batch(0..3));
        drop(j);
        // A crash in the middle of the next append.
        let path = dir.path().join("00000000000000000000.spool");
        let torn = records(&batch(3..4));
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(&torn[..torn.len() - 3]).unwrap();

        let j = open(dir.path(), 1 << 20);
        assert_eq!(j.unread(), 3);
        assert_eq!(
            files(dir.path()),
            ["00000000000000000000-3.spool"].map(String::from)
        );
        append(&j, &batch(4..5));
        assert_eq!(deliver(&j, 10), [batch(0..3), batch(4..5)].concat());
        // A sealed segment of an earlier version, torn: read up to the tear.
        drop(j);
        let data = encode(&batch(5..8));
        fs::write(
            dir.path().join("00000000000000000009-3.spool"),
            &data[..data.len() - 2],
        )
        .unwrap();
        let j = open(dir.path(), 1 << 20);
        assert_eq!(deliver(&j, 10), batch(5..7));
        assert_eq!(j.unread(), 0);
        append(&j, &batch(8..9));
        assert_eq!(deliver(&j, 10), batch(8..9));
    }

    #[test]
    fn past_the_bound_whole_unread_segments_are_dropped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let one = records(&batch(0..4)).len() as u64;
        // Segments seal past an eighth of the bound: one append each.
        let j = open(dir.path(), (one + HEADER) * 3);
        assert_eq!(append(&j, &batch(0..4)), 0);
        // The reader is in the first segment: it is kept, whatever its age.
        assert_eq!(j.take(1).events, batch(0..1));
        assert_eq!(append(&j, &batch(4..8)), 0);
        assert_eq!(append(&j, &batch(8..12)), 0);
        assert_eq!(append(&j, &batch(12..16)), 4);
        assert_eq!(append(&j, &batch(16..20)), 4);
        assert_eq!(j.unread(), 3 + 8);
        let t = j.take(100);
        assert_eq!(t.events, [batch(1..4), batch(12..20)].concat());
        j.ack(t.end).unwrap();
        assert_eq!(j.unread(), 0);
        assert_eq!(
            files(dir.path()),
            ["00000000000000000004.spool", "cursor"].map(String::from)
        );
    }

    #[test]
    fn a_corrupt_cursor_means_delivering_from_the_oldest_segment() {
        let dir = tempfile::tempdir().unwrap();
        let j = open(dir.path(), 1 << 20);
        append(&j, &batch(0..3));
        deliver(&j, 2);
        drop(j);
        let cursor = dir.path().join(CURSOR);
        let mut data = fs::read(&cursor).unwrap();
        data[10] ^= 1;
        fs::write(&cursor, data).unwrap();
        let j = open(dir.path(), 1 << 20);
        assert_eq!(deliver(&j, 10), batch(0..3));
    }

    #[test]
    fn a_cursor_past_every_segment_resumes_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let j = open(dir.path(), 1 << 20);
        append(&j, &batch(0..2));
        assert_eq!(deliver(&j, 10), batch(0..2));
        drop(j);
        // A crash after the segments were removed, before the cursor was.
        fs::remove_file(dir.path().join("00000000000000000000.spool")).unwrap();
        let j = open(dir.path(), 1 << 20);
        assert_eq!(j.unread(), 0);
        append(&j, &batch(2..3));
        drop(j);
        let j = open(dir.path(), 1 << 20);
        assert_eq!(deliver(&j, 10), batch(2..3));
    }

    #[test]
    fn the_backlog_of_a_directory_counts_past_the_cursor() {
        let dir = tempfile::tempdir().unwrap();
        let j = open(dir.path(), 1 << 20);
        append(&j, &batch(0..5));
        deliver(&j, 2);
        drop(j);
        let b = backlog(dir.path()).unwrap();
        assert_eq!(b.events, 3);
        assert!(b.bytes > 0);
    }

    #[test]
    fn a_failed_append_changes_nothing_and_the_next_one_starts_a_segment() {
        let dir = tempfile::tempdir().unwrap();
        let j = open(dir.path(), 1 << 20);
        append(&j, &batch(0..2));
        // The disk fills up under the open segment.
        j.lock().active = Some(OpenOptions::new().write(true).open("/dev/full").unwrap());
        let err = j.append(&records(&batch(2..3)), 1).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::StorageFull, "{err}");
        assert_eq!(j.unread(), 2);
        append(&j, &batch(3..4));
        assert_eq!(
            files(dir.path()),
            ["00000000000000000000-2.spool", "00000000000000000001.spool"].map(String::from)
        );
        assert_eq!(deliver(&j, 10), [batch(0..2), batch(3..4)].concat());
    }
}
