//! Durable raft storage: a segmented, checksummed log, a snapshot file and a two-slot meta
//! record, under one directory.
//!
//! - `log-<segment>`: raft entries, one record each: `[len u32][crc32 u32][eraftpb.Entry]`.
//!   An entry overwrites any entry at or after its index (raft's conflict rule), so a segment
//!   is replayed in order.
//! - `snapshot`: `[magic][len u64][crc32 u32][eraftpb.Snapshot]`, written beside and renamed
//!   into place.
//! - `meta-0`, `meta-1`: hard state, conf state, the current segment, the snapshot's index and
//!   checksum, and `log_bytes`: how many bytes of the segment are durable. Written
//!   alternately after the log is fsync'd, so one torn meta write leaves the other slot.
//!
//! The rule at start-up: every byte up to `log_bytes` was acknowledged to the leader, so any
//! bad or missing byte there is an error that stops the coordinator (never a silent loss of
//! committed entries). Bytes past `log_bytes` were never acknowledged (a write torn by a
//! crash): they are cut off and reported.
//!
//! Compaction: the state machine's image at the applied index becomes the snapshot, the
//! entries after it are copied into a new segment, meta switches to both, and the old
//! segment is deleted.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::storage::MemStorage;
use raft::{GetEntriesContext, RaftState, Storage};
use serde::{Deserialize, Serialize};

const META_MAGIC: &[u8; 8] = b"EMMETA01";
const SNAP_MAGIC: &[u8; 8] = b"EMSNAP01";
/// Largest log record accepted: a corrupt length must not become a huge allocation.
const RECORD_MAX: usize = 64 << 20;
/// Largest snapshot or meta file accepted.
const FILE_MAX: u64 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is corrupt at byte {offset}: {reason}; refusing to start")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error(
        "{path} is truncated: {actual} bytes, but {expected} were acknowledged as durable; \
         committed entries would be lost, refusing to start"
    )]
    Truncated {
        path: PathBuf,
        actual: u64,
        expected: u64,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LogError + '_ {
    move |source| LogError::Io {
        path: path.to_owned(),
        source,
    }
}

fn corrupt(path: &Path, offset: u64, reason: impl Into<String>) -> LogError {
    LogError::Corrupt {
        path: path.to_owned(),
        offset,
        reason: reason.into(),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SnapshotRef {
    index: u64,
    term: u64,
    bytes: u64,
    crc: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Meta {
    seq: u64,
    segment: u64,
    log_bytes: u64,
    term: u64,
    vote: u64,
    commit: u64,
    voters: Vec<u64>,
    learners: Vec<u64>,
    snapshot: Option<SnapshotRef>,
}

/// Raft storage on disk, with the whole log also kept in memory (coordinator logs are small
/// and compacted).
pub struct DiskStorage {
    dir: PathBuf,
    mem: MemStorage,
    log: File,
    meta: Meta,
    /// The latest snapshot, with the state machine's image in its data.
    snapshot: Snapshot,
    /// What start-up repaired (a torn tail), for the caller to report.
    pub notes: Vec<String>,
}

impl std::fmt::Debug for DiskStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskStorage")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// Appends the records of `bytes` (the acknowledged prefix of log segment `path`) to `mem`,
/// checking each record's length, checksum and index; entries before the snapshot are
/// skipped.
fn replay(path: &Path, bytes: &[u8], mem: &MemStorage) -> Result<(), LogError> {
    let mut at = 0usize;
    let end = bytes.len();
    while at < end {
        let offset = at as u64;
        if end - at < 8 {
            return Err(corrupt(path, offset, "record header cut short"));
        }
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().expect("4 bytes"));
        if len > RECORD_MAX || end - at - 8 < len {
            return Err(corrupt(path, offset, format!("record length {len}")));
        }
        let payload = &bytes[at + 8..at + 8 + len];
        if crc32fast::hash(payload) != crc {
            return Err(corrupt(path, offset, "checksum mismatch"));
        }
        let entry = Entry::parse_from_bytes(payload)
            .map_err(|e| corrupt(path, offset, format!("undecodable entry: {e}")))?;
        let first = mem.first_index().expect("memory storage");
        let last = mem.last_index().expect("memory storage");
        if entry.index > last + 1 {
            return Err(corrupt(
                path,
                offset,
                format!("entry {} after last index {last}", entry.index),
            ));
        }
        if entry.index >= first {
            mem.wl()
                .append(&[entry])
                .map_err(|e| corrupt(path, offset, e.to_string()))?;
        }
        at += 8 + len;
    }
    Ok(())
}

fn segment_path(dir: &Path, segment: u64) -> PathBuf {
    dir.join(format!("log-{segment:020}"))
}

fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

fn record(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 8);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Writes `bytes` to `path` through a temporary file, fsync and rename.
fn write_atomic(dir: &Path, path: &Path, bytes: &[u8]) -> Result<(), LogError> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))?;
    sync_dir(dir)
}

fn read_limited(path: &Path) -> Result<Vec<u8>, LogError> {
    let f = File::open(path).map_err(io(path))?;
    let len = f.metadata().map_err(io(path))?.len();
    if len > FILE_MAX {
        return Err(corrupt(path, 0, format!("{len} bytes is too large")));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    f.take(FILE_MAX).read_to_end(&mut bytes).map_err(io(path))?;
    Ok(bytes)
}

/// A meta slot's record, or `None` when its header or checksum fails (a torn write).
fn read_meta(path: &Path) -> Result<Option<Meta>, LogError> {
    if !path.exists() {
        return Ok(None);
    }
    let bytes = read_limited(path)?;
    if bytes.len() < 16 || &bytes[..8] != META_MAGIC {
        return Ok(None);
    }
    let len = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes"));
    let body = &bytes[16..];
    if body.len() != len || crc32fast::hash(body) != crc {
        return Ok(None);
    }
    Ok(serde_json::from_slice(body).ok())
}

impl DiskStorage {
    /// Opens the storage in `dir`, creating it when empty; a new store starts with
    /// `initial_voters` as its configuration (empty for a coordinator that joins later).
    pub fn open(dir: &Path, initial_voters: &[u64]) -> Result<Self, LogError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let slots = [dir.join("meta-0"), dir.join("meta-1")];
        let metas = [read_meta(&slots[0])?, read_meta(&slots[1])?];
        let meta = match metas {
            [None, None] if slots.iter().any(|p| p.exists()) => {
                return Err(corrupt(
                    &slots[0],
                    0,
                    "both meta slots (meta-0, meta-1) fail their checksum",
                ))
            }
            [None, None] => return Self::create(dir, initial_voters),
            [Some(a), None] | [None, Some(a)] => a,
            [Some(a), Some(b)] => {
                if a.seq > b.seq {
                    a
                } else {
                    b
                }
            }
        };
        let mem = MemStorage::new();
        let mut snapshot = Snapshot::default();
        if let Some(r) = &meta.snapshot {
            snapshot = Self::read_snapshot(dir, r)?;
            mem.wl()
                .apply_snapshot(snapshot.clone())
                .map_err(|e| corrupt(&dir.join("snapshot"), 0, e.to_string()))?;
        }
        let path = segment_path(dir, meta.segment);
        let mut notes = Vec::new();
        let bytes = std::fs::read(&path).map_err(io(&path))?;
        let actual = bytes.len() as u64;
        if actual < meta.log_bytes {
            return Err(LogError::Truncated {
                path,
                actual,
                expected: meta.log_bytes,
            });
        }
        replay(&path, &bytes[..meta.log_bytes as usize], &mem)?;
        if actual > meta.log_bytes {
            let f = OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(io(&path))?;
            f.set_len(meta.log_bytes).map_err(io(&path))?;
            f.sync_all().map_err(io(&path))?;
            notes.push(format!(
                "{}: cut {} unacknowledged bytes after byte {} (a write torn by a crash)",
                path.display(),
                actual - meta.log_bytes,
                meta.log_bytes
            ));
        }
        let last = mem.last_index().expect("memory storage");
        if meta.commit > last {
            return Err(corrupt(
                &path,
                meta.log_bytes,
                format!(
                    "commit index {} is beyond the log's last entry {last}",
                    meta.commit
                ),
            ));
        }
        {
            let mut core = mem.wl();
            core.set_hardstate(HardState {
                term: meta.term,
                vote: meta.vote,
                commit: meta.commit,
                ..Default::default()
            });
            core.set_conf_state(ConfState {
                voters: meta.voters.clone(),
                learners: meta.learners.clone(),
                ..Default::default()
            });
        }
        let mut log = OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(io(&path))?;
        log.seek(SeekFrom::Start(meta.log_bytes))
            .map_err(io(&path))?;
        Ok(Self {
            dir: dir.to_owned(),
            mem,
            log,
            meta,
            snapshot,
            notes,
        })
    }

    fn create(dir: &Path, initial_voters: &[u64]) -> Result<Self, LogError> {
        let path = segment_path(dir, 1);
        let log = File::create(&path).map_err(io(&path))?;
        let mem = MemStorage::new();
        mem.wl().set_conf_state(ConfState {
            voters: initial_voters.to_vec(),
            ..Default::default()
        });
        let mut s = Self {
            dir: dir.to_owned(),
            mem,
            log,
            meta: Meta {
                seq: 0,
                segment: 1,
                log_bytes: 0,
                term: 0,
                vote: 0,
                commit: 0,
                voters: initial_voters.to_vec(),
                learners: Vec::new(),
                snapshot: None,
            },
            snapshot: Snapshot::default(),
            notes: Vec::new(),
        };
        s.write_meta()?;
        sync_dir(dir)?;
        Ok(s)
    }

    fn read_snapshot(dir: &Path, r: &SnapshotRef) -> Result<Snapshot, LogError> {
        let path = dir.join("snapshot");
        let bytes = read_limited(&path)?;
        if bytes.len() < 20 || &bytes[..8] != SNAP_MAGIC {
            return Err(corrupt(&path, 0, "no snapshot header"));
        }
        let len = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
        let crc = u32::from_le_bytes(bytes[16..20].try_into().expect("4 bytes"));
        let body = &bytes[20..];
        if body.len() as u64 != len || len != r.bytes {
            return Err(LogError::Truncated {
                path,
                actual: body.len() as u64,
                expected: r.bytes,
            });
        }
        if crc32fast::hash(body) != crc || crc != r.crc {
            return Err(corrupt(&path, 20, "snapshot checksum mismatch"));
        }
        let snap = Snapshot::parse_from_bytes(body)
            .map_err(|e| corrupt(&path, 20, format!("undecodable snapshot: {e}")))?;
        let m = snap.get_metadata();
        if m.index != r.index || m.term != r.term {
            return Err(corrupt(
                &path,
                20,
                format!(
                    "snapshot is at {}/{}, meta expects {}/{}",
                    m.index, m.term, r.index, r.term
                ),
            ));
        }
        Ok(snap)
    }

    fn write_snapshot(&mut self, snap: &Snapshot) -> Result<(), LogError> {
        let body = snap.write_to_bytes().expect("snapshots encode");
        let crc = crc32fast::hash(&body);
        let mut bytes = Vec::with_capacity(body.len() + 20);
        bytes.extend_from_slice(SNAP_MAGIC);
        bytes.extend_from_slice(&(body.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&crc.to_le_bytes());
        bytes.extend_from_slice(&body);
        write_atomic(&self.dir, &self.dir.join("snapshot"), &bytes)?;
        let m = snap.get_metadata();
        self.meta.snapshot = Some(SnapshotRef {
            index: m.index,
            term: m.term,
            bytes: body.len() as u64,
            crc,
        });
        self.snapshot = snap.clone();
        Ok(())
    }

    fn write_meta(&mut self) -> Result<(), LogError> {
        let core = self.mem.rl();
        let hs = core.hard_state();
        self.meta.term = hs.term;
        self.meta.vote = hs.vote;
        self.meta.commit = hs.commit;
        drop(core);
        let cs = self.mem.initial_state().expect("memory storage").conf_state;
        self.meta.voters = cs.voters;
        self.meta.learners = cs.learners;
        self.meta.seq += 1;
        let body = serde_json::to_vec(&self.meta).expect("meta serializes");
        let mut bytes = Vec::with_capacity(body.len() + 16);
        bytes.extend_from_slice(META_MAGIC);
        bytes.extend_from_slice(&(body.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        bytes.extend_from_slice(&body);
        let path = self.dir.join(format!("meta-{}", self.meta.seq % 2));
        let mut f = File::create(&path).map_err(io(&path))?;
        f.write_all(&bytes).map_err(io(&path))?;
        f.sync_all().map_err(io(&path))
    }

    /// Appends entries (not yet durable: call [`DiskStorage::sync`]).
    pub fn append(&mut self, entries: &[Entry]) -> Result<(), LogError> {
        if entries.is_empty() {
            return Ok(());
        }
        let path = segment_path(&self.dir, self.meta.segment);
        let mut bytes = Vec::new();
        for e in entries {
            bytes.extend(record(&e.write_to_bytes().expect("entries encode")));
        }
        self.log.write_all(&bytes).map_err(io(&path))?;
        self.meta.log_bytes += bytes.len() as u64;
        self.mem
            .wl()
            .append(entries)
            .map_err(|e| corrupt(&path, self.meta.log_bytes, e.to_string()))
    }

    pub fn set_hard_state(&mut self, hs: HardState) {
        self.mem.wl().set_hardstate(hs);
    }

    pub fn set_commit(&mut self, commit: u64) {
        self.mem.wl().mut_hard_state().commit = commit;
    }

    pub fn set_conf_state(&mut self, cs: ConfState) {
        self.mem.wl().set_conf_state(cs);
    }

    /// Makes everything so far durable: fsyncs the log, then writes meta.
    pub fn sync(&mut self) -> Result<(), LogError> {
        let path = segment_path(&self.dir, self.meta.segment);
        self.log.sync_data().map_err(io(&path))?;
        self.write_meta()
    }

    /// Installs a snapshot received from the leader (durably).
    pub fn install_snapshot(&mut self, snap: Snapshot) -> Result<(), LogError> {
        self.write_snapshot(&snap)?;
        self.mem
            .wl()
            .apply_snapshot(snap)
            .map_err(|e| corrupt(&self.dir.join("snapshot"), 0, e.to_string()))?;
        self.start_segment(&[])
    }

    /// Takes a snapshot at `applied` holding `data` (the state machine's image there) and
    /// drops the log before it.
    pub fn compact(&mut self, applied: u64, data: Vec<u8>) -> Result<(), LogError> {
        let first = self.mem.first_index().expect("memory storage");
        if applied < first {
            return Ok(());
        }
        let mut snap = Snapshot {
            data: data.into(),
            ..Default::default()
        };
        let m = snap.mut_metadata();
        m.index = applied;
        m.term = self.mem.term(applied).map_err(|e| {
            corrupt(
                &self.dir,
                0,
                format!("no term for applied index {applied}: {e}"),
            )
        })?;
        m.set_conf_state(self.mem.initial_state().expect("memory storage").conf_state);
        self.write_snapshot(&snap)?;
        let last = self.mem.last_index().expect("memory storage");
        let kept = if last > applied {
            self.mem
                .entries(applied + 1, last + 1, None, GetEntriesContext::empty(false))
                .map_err(|e| corrupt(&self.dir, 0, e.to_string()))?
        } else {
            Vec::new()
        };
        self.mem
            .wl()
            .compact(applied)
            .map_err(|e| corrupt(&self.dir, 0, e.to_string()))?;
        self.start_segment(&kept)
    }

    /// Starts a new segment holding `entries`, switches meta to it, deletes the old one.
    fn start_segment(&mut self, entries: &[Entry]) -> Result<(), LogError> {
        let old = segment_path(&self.dir, self.meta.segment);
        let segment = self.meta.segment + 1;
        let path = segment_path(&self.dir, segment);
        let mut bytes = Vec::new();
        for e in entries {
            bytes.extend(record(&e.write_to_bytes().expect("entries encode")));
        }
        write_atomic(&self.dir, &path, &bytes)?;
        self.log = OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(io(&path))?;
        self.log.seek(SeekFrom::End(0)).map_err(io(&path))?;
        self.meta.segment = segment;
        self.meta.log_bytes = bytes.len() as u64;
        self.write_meta()?;
        std::fs::remove_file(&old).map_err(io(&old))?;
        sync_dir(&self.dir)
    }

    /// The latest snapshot's index (0 when none was taken).
    pub fn snapshot_index(&self) -> u64 {
        self.snapshot.get_metadata().index
    }

    /// The latest snapshot's state machine image, if one was taken or received.
    pub fn snapshot_data(&self) -> Option<&[u8]> {
        self.meta.snapshot.as_ref().map(|_| &self.snapshot.data[..])
    }
}

impl Storage for DiskStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        self.mem.initial_state()
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        self.mem.entries(low, high, max_size, context)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        self.mem.term(idx)
    }

    fn first_index(&self) -> raft::Result<u64> {
        self.mem.first_index()
    }

    fn last_index(&self) -> raft::Result<u64> {
        self.mem.last_index()
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        if self.meta.snapshot.is_none() || self.snapshot.get_metadata().index < request_index {
            return Err(raft::Error::Store(
                raft::StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        Ok(self.snapshot.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64, data: &[u8]) -> Entry {
        Entry {
            index,
            term,
            data: data.to_vec().into(),
            ..Default::default()
        }
    }

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("expertmesh-storage-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn filled(dir: &Path) -> DiskStorage {
        let mut s = DiskStorage::open(dir, &[1, 2, 3]).unwrap();
        s.append(&(1..=10).map(|i| entry(i, 1, b"x")).collect::<Vec<_>>())
            .unwrap();
        s.set_hard_state(HardState {
            term: 1,
            vote: 2,
            commit: 8,
            ..Default::default()
        });
        s.sync().unwrap();
        s
    }

    fn current_segment(dir: &Path) -> PathBuf {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.file_name().unwrap().to_str().unwrap().starts_with("log-"))
            .unwrap()
    }

    #[test]
    fn reopens_what_was_synced() {
        let dir = scratch("reopen");
        drop(filled(&dir));
        let s = DiskStorage::open(&dir, &[]).unwrap();
        let state = s.initial_state().unwrap();
        assert_eq!(state.hard_state.commit, 8);
        assert_eq!(state.hard_state.vote, 2);
        assert_eq!(state.conf_state.voters, vec![1, 2, 3]);
        assert_eq!(s.last_index().unwrap(), 10);
        assert!(s.notes.is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn conflicting_entries_overwrite_on_replay() {
        let dir = scratch("conflict");
        let mut s = filled(&dir);
        s.append(&[entry(9, 2, b"y")]).unwrap();
        s.sync().unwrap();
        drop(s);
        let s = DiskStorage::open(&dir, &[]).unwrap();
        assert_eq!(s.last_index().unwrap(), 9);
        assert_eq!(s.term(9).unwrap(), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn compaction_survives_restart() {
        let dir = scratch("compact");
        let mut s = filled(&dir);
        s.compact(8, b"image".to_vec()).unwrap();
        s.append(&[entry(11, 1, b"z")]).unwrap();
        s.sync().unwrap();
        drop(s);
        let s = DiskStorage::open(&dir, &[]).unwrap();
        assert_eq!(s.first_index().unwrap(), 9);
        assert_eq!(s.last_index().unwrap(), 11);
        assert_eq!(s.term(8).unwrap(), 1);
        assert_eq!(s.snapshot_data(), Some(&b"image"[..]));
        assert_eq!(s.snapshot(0, 2).unwrap().get_metadata().index, 8);
        let logs = std::fs::read_dir(&dir)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_str()
                    .unwrap()
                    .starts_with("log-")
            })
            .count();
        assert_eq!(logs, 1, "the old segment is deleted");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn torn_tail_is_cut_and_reported() {
        let dir = scratch("torn");
        let mut s = filled(&dir);
        // Written but never synced: no meta covers it.
        s.append(&[entry(11, 1, b"unacked")]).unwrap();
        s.log.sync_data().unwrap();
        drop(s);
        let path = current_segment(&dir);
        let len = std::fs::metadata(&path).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 3)
            .unwrap();
        let s = DiskStorage::open(&dir, &[]).unwrap();
        assert_eq!(s.last_index().unwrap(), 10);
        assert_eq!(s.notes.len(), 1, "{:?}", s.notes);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn damage_to_acknowledged_bytes_is_refused() {
        enum Damage {
            Truncate(u64),
            Flip(u64),
            Delete(&'static str),
            FlipSnapshot,
            BothMetas,
        }
        let cases = [
            Damage::Truncate(40),
            Damage::Flip(3),
            Damage::Flip(60),
            Damage::Delete("snapshot"),
            Damage::FlipSnapshot,
            Damage::BothMetas,
        ];
        for (i, damage) in cases.into_iter().enumerate() {
            let dir = scratch(&format!("damage{i}"));
            let mut s = filled(&dir);
            s.compact(4, b"image".to_vec()).unwrap();
            drop(s);
            let log = current_segment(&dir);
            let flip = |path: &Path, at: u64| {
                let mut bytes = std::fs::read(path).unwrap();
                let at = at as usize % bytes.len();
                bytes[at] ^= 0x40;
                std::fs::write(path, bytes).unwrap();
            };
            match damage {
                Damage::Truncate(n) => {
                    let len = std::fs::metadata(&log).unwrap().len();
                    OpenOptions::new()
                        .write(true)
                        .open(&log)
                        .unwrap()
                        .set_len(len - n)
                        .unwrap();
                }
                Damage::Flip(at) => flip(&log, at),
                Damage::Delete(name) => std::fs::remove_file(dir.join(name)).unwrap(),
                Damage::FlipSnapshot => flip(&dir.join("snapshot"), 30),
                Damage::BothMetas => {
                    flip(&dir.join("meta-0"), 20);
                    flip(&dir.join("meta-1"), 20);
                }
            }
            let err = DiskStorage::open(&dir, &[]).expect_err(&format!("case {i}"));
            let text = err.to_string();
            assert!(
                text.contains("refusing to start") || text.contains("No such file"),
                "case {i}: {text}"
            );
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}
