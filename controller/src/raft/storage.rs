//! Durable raft storage on [redb]: log entries, hard state, the latest
//! snapshot and the member's identity (cluster id, member id).
//!
//! Every write is one redb transaction committed with `Durability::Immediate`
//! (fsync) before raft is told the data is persisted. The whole log since the
//! last snapshot is also cached in memory, so the `raft::Storage` reads raft
//! does while stepping never touch the disk (and can never fail on I/O).
//!
//! Layout (tables):
//! - `entries`: `u64` index -> `eraftpb.Entry` (raft's protobuf encoding)
//! - `meta`: `"cluster_id"`, `"member_id"` (u64 little endian),
//!   `"hard_state"` (`eraftpb.HardState`), `"snapshot"` (`eraftpb.Snapshot`,
//!   metadata and data)
//!
//! At open redb verifies the checksum of every page (a crash mid-commit
//! leaves the previous commit, which redb recovers to: the member restarts
//! at its last durable entry; a page damaged later fails the open). Then
//! invariants checked at open (a violation refuses to start with
//! [`OpenStorageError::Corrupt`] rather than serving divergent state): the
//! entries are contiguous from `snapshot.index + 1`, each decodes and sits
//! under its own index, terms never decrease, the commit index lies within
//! `[snapshot.index, last_index]`, and the snapshot data decodes.

use std::path::{Path, PathBuf};

use protobuf::Message as _;
use raft::prelude::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError};
use redb::{Builder, Database, ReadableDatabase, TableDefinition};
use thiserror::Error;

const ENTRIES: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("entries");
const META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("meta");

/// File name of the database inside the data directory.
pub const DB_FILE: &str = "raft.redb";

/// redb's page cache: the log is also cached in memory, so reads are rare.
const CACHE_BYTES: usize = 32 << 20;

/// How far the commit index may run ahead of the stored one before a write
/// that changes nothing else stores it (see [`DiskStorage::persist`]).
pub const COMMIT_WRITE_STRIDE: u64 = 1024;

/// Why the storage could not be opened.
#[derive(Debug, Error)]
pub enum OpenStorageError {
    /// The data directory could not be created.
    #[error("cannot create data directory {path}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// redb refused the file (unreadable, corrupt header, locked by another
    /// process...).
    #[error("cannot open raft storage {path}")]
    Database {
        /// The database file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: Box<redb::Error>,
    },
    /// The file opened but its content breaks an invariant.
    #[error("raft storage {path} is corrupt: {detail}; refusing to start")]
    Corrupt {
        /// The database file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The data belongs to another cluster.
    #[error("raft storage {path} belongs to cluster {stored}, not {configured}")]
    WrongCluster {
        /// The database file.
        path: PathBuf,
        /// Cluster id on disk.
        stored: u64,
        /// Cluster id configured.
        configured: u64,
    },
    /// The data belongs to another member.
    #[error("raft storage {path} belongs to member {stored}, not {configured}")]
    WrongMember {
        /// The database file.
        path: PathBuf,
        /// Member id on disk.
        stored: u64,
        /// Member id configured.
        configured: u64,
    },
    /// `init` was asked for a directory that already holds a cluster.
    #[error(
        "raft storage {path} already holds cluster {cluster_id}; start without `init` to reuse it"
    )]
    AlreadyInitialized {
        /// The database file.
        path: PathBuf,
        /// The cluster it holds.
        cluster_id: u64,
    },
    /// No cluster id is stored and none was configured.
    #[error("raft storage {path} is empty and no cluster id was given")]
    NoClusterId {
        /// The database file.
        path: PathBuf,
    },
    /// The first write (identity or bootstrap snapshot) failed.
    #[error("cannot write the initial raft state")]
    Write(#[from] PersistError),
}

/// Why a write to the storage failed. The member must stop: raft cannot go
/// on after failing to persist what it was asked to.
#[derive(Debug, Error)]
#[error("cannot persist raft state (disk full or failing?)")]
pub struct PersistError(#[source] pub Box<redb::Error>);

fn persist_err(e: impl Into<redb::Error>) -> PersistError {
    PersistError(Box::new(e.into()))
}

/// Raft log, hard state and snapshot: on disk, with the log since the last
/// snapshot cached in memory.
pub struct DiskStorage {
    db: Database,
    path: PathBuf,
    cluster_id: u64,
    member_id: u64,
    hard_state: HardState,
    /// The hard state as last written to disk (its commit may lag).
    stored_hard_state: HardState,
    snapshot: Snapshot,
    /// `entries[i].index == snapshot.index + 1 + i`.
    entries: Vec<Entry>,
}

impl std::fmt::Debug for DiskStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskStorage")
            .field("path", &self.path)
            .field("cluster_id", &self.cluster_id)
            .field("member_id", &self.member_id)
            .field("snapshot_index", &self.snapshot_index())
            .field("last_index", &self.last())
            .finish()
    }
}

fn pb_bytes<M: protobuf::Message>(m: &M) -> Result<Vec<u8>, PersistError> {
    m.write_to_bytes()
        .map_err(|e| persist_err(redb::StorageError::Io(std::io::Error::other(e))))
}

fn u64_bytes(v: u64) -> [u8; 8] {
    v.to_le_bytes()
}

fn bytes_u64(b: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(b.try_into().ok()?))
}

impl DiskStorage {
    /// Opens (creating if needed) the storage in `dir` for member `member_id`.
    ///
    /// An empty directory takes `cluster_id` (required then) and is left
    /// uninitialized: the member waits to receive a snapshot from a leader
    /// after being added. A non-empty one must match both ids.
    pub fn open(
        dir: &Path,
        member_id: u64,
        cluster_id: Option<u64>,
    ) -> Result<DiskStorage, OpenStorageError> {
        std::fs::create_dir_all(dir).map_err(|source| OpenStorageError::CreateDir {
            path: dir.to_owned(),
            source,
        })?;
        let path = dir.join(DB_FILE);
        let db_err = |e: redb::Error| OpenStorageError::Database {
            path: path.clone(),
            source: Box::new(e),
        };
        // Every page's checksum is verified at open: a file damaged since
        // redb wrote it (a torn write, a bad disk, a stray tool) fails here
        // with a clear error rather than being trusted. The file stays
        // small (the log is compacted into snapshots), so this is cheap.
        let db = Builder::new()
            .set_check_integrity_on_open(true)
            .set_cache_size(CACHE_BYTES)
            .create(&path)
            .map_err(|e| db_err(e.into()))?;
        let corrupt = |detail: String| OpenStorageError::Corrupt {
            path: path.clone(),
            detail,
        };

        // Identity.
        let read = db.begin_read().map_err(|e| db_err(e.into()))?;
        let (stored_cluster, stored_member, hs_bytes, snap_bytes) = match read.open_table(META) {
            Ok(meta) => {
                let get = |k: &str| -> Result<Option<Vec<u8>>, OpenStorageError> {
                    Ok(meta
                        .get(k)
                        .map_err(|e| db_err(e.into()))?
                        .map(|v| v.value().to_vec()))
                };
                (
                    get("cluster_id")?,
                    get("member_id")?,
                    get("hard_state")?,
                    get("snapshot")?,
                )
            }
            Err(redb::TableError::TableDoesNotExist(_)) => (None, None, None, None),
            Err(e) => return Err(db_err(e.into())),
        };
        let stored_cluster = stored_cluster
            .map(|b| bytes_u64(&b).ok_or_else(|| corrupt("cluster id is not 8 bytes".into())))
            .transpose()?;
        let stored_member = stored_member
            .map(|b| bytes_u64(&b).ok_or_else(|| corrupt("member id is not 8 bytes".into())))
            .transpose()?;
        let cluster_id = match (stored_cluster, cluster_id) {
            (Some(s), Some(c)) if s != c => {
                return Err(OpenStorageError::WrongCluster {
                    path,
                    stored: s,
                    configured: c,
                });
            }
            (Some(s), _) => s,
            (None, Some(c)) => c,
            (None, None) => return Err(OpenStorageError::NoClusterId { path }),
        };
        if let Some(m) = stored_member
            && m != member_id
        {
            return Err(OpenStorageError::WrongMember {
                path,
                stored: m,
                configured: member_id,
            });
        }

        let hard_state = match hs_bytes {
            Some(b) => HardState::parse_from_bytes(&b)
                .map_err(|e| corrupt(format!("hard state does not decode: {e}")))?,
            None => HardState::default(),
        };
        let snapshot = match snap_bytes {
            Some(b) => Snapshot::parse_from_bytes(&b)
                .map_err(|e| corrupt(format!("snapshot does not decode: {e}")))?,
            None => Snapshot::default(),
        };
        let snap_index = snapshot.get_metadata().index;
        if snap_index > 0 {
            nephele_state::codec::decode_snapshot(snapshot.get_data())
                .map_err(|e| corrupt(format!("snapshot data does not decode: {e}")))?;
        }

        // The log.
        let mut entries = Vec::new();
        match read.open_table(ENTRIES) {
            Ok(table) => {
                let mut last_term = snapshot.get_metadata().term;
                let items = table.range(0..).map_err(|e| db_err(e.into()))?;
                for (expected, item) in (snap_index + 1..).zip(items) {
                    let (k, v) = item.map_err(|e| db_err(e.into()))?;
                    let index = k.value();
                    if index != expected {
                        return Err(corrupt(format!(
                            "log entry {index} found where {expected} was expected"
                        )));
                    }
                    let e = Entry::parse_from_bytes(v.value())
                        .map_err(|e| corrupt(format!("log entry {index} does not decode: {e}")))?;
                    if e.index != index {
                        return Err(corrupt(format!(
                            "log entry stored under {index} claims index {}",
                            e.index
                        )));
                    }
                    if e.term < last_term {
                        return Err(corrupt(format!(
                            "log entry {index} has term {} below the previous {last_term}",
                            e.term
                        )));
                    }
                    last_term = e.term;
                    entries.push(e);
                }
            }
            Err(redb::TableError::TableDoesNotExist(_)) => {}
            Err(e) => return Err(db_err(e.into())),
        }
        drop(read);
        let last = snap_index + entries.len() as u64;
        if hard_state.commit > last || hard_state.commit < snap_index {
            return Err(corrupt(format!(
                "commit index {} lies outside the stored log [{snap_index}, {last}]",
                hard_state.commit
            )));
        }

        let mut storage = DiskStorage {
            db,
            path,
            cluster_id,
            member_id,
            stored_hard_state: hard_state.clone(),
            hard_state,
            snapshot,
            entries,
        };
        if stored_cluster.is_none() || stored_member.is_none() {
            storage.write_identity()?;
        }
        Ok(storage)
    }

    fn write_identity(&mut self) -> Result<(), PersistError> {
        let txn = self.db.begin_write().map_err(persist_err)?;
        {
            let mut meta = txn.open_table(META).map_err(persist_err)?;
            meta.insert("cluster_id", u64_bytes(self.cluster_id).as_slice())
                .map_err(persist_err)?;
            meta.insert("member_id", u64_bytes(self.member_id).as_slice())
                .map_err(persist_err)?;
            // Make sure both tables exist for readers.
            txn.open_table(ENTRIES).map_err(persist_err)?;
        }
        txn.commit().map_err(persist_err)
    }

    /// Whether this storage holds a cluster (a snapshot or log).
    pub fn is_initialized(&self) -> bool {
        self.snapshot_index() > 0 || !self.entries.is_empty()
    }

    /// Writes the first snapshot of a brand-new cluster: index 1, term 1,
    /// `voters`, and `state` (already holding the controllers' addresses).
    pub fn bootstrap(&mut self, voters: Vec<u64>, state: &[u8]) -> Result<(), OpenStorageError> {
        if self.is_initialized() {
            return Err(OpenStorageError::AlreadyInitialized {
                path: self.path.clone(),
                cluster_id: self.cluster_id,
            });
        }
        let mut snap = Snapshot::default();
        let meta = snap.mut_metadata();
        meta.index = 1;
        meta.term = 1;
        meta.mut_conf_state().voters = voters;
        snap.data = state.to_vec().into();
        self.persist(Some(&snap), &[], None)?;
        Ok(())
    }

    /// The cluster this storage belongs to.
    pub fn cluster_id(&self) -> u64 {
        self.cluster_id
    }

    /// The latest snapshot (metadata and data).
    pub fn snapshot_ref(&self) -> &Snapshot {
        &self.snapshot
    }

    /// Index of the latest snapshot (0 if none).
    pub fn snapshot_index(&self) -> u64 {
        self.snapshot.get_metadata().index
    }

    fn first(&self) -> u64 {
        self.snapshot_index() + 1
    }

    fn last(&self) -> u64 {
        self.snapshot_index() + self.entries.len() as u64
    }

    /// Persists, in one durable transaction, a snapshot received from the
    /// leader (replacing the whole log), new log entries (replacing any
    /// conflicting tail) and the hard state. Only then updates the cache.
    ///
    /// A hard state that differs from the stored one only by a commit index
    /// less than [`COMMIT_WRITE_STRIDE`] ahead is kept in memory, not
    /// written: raft needs term and vote durable, while a lagging commit
    /// index is only relearned from the leader after a restart. This keeps
    /// the common write (new entries, commit moved) to one table.
    pub fn persist(
        &mut self,
        snapshot: Option<&Snapshot>,
        entries: &[Entry],
        hard_state: Option<&HardState>,
    ) -> Result<(), PersistError> {
        if snapshot.is_none() && entries.is_empty() && hard_state.is_none() {
            return Ok(());
        }
        let mut new_hs = hard_state
            .cloned()
            .unwrap_or_else(|| self.hard_state.clone());
        if let Some(s) = snapshot {
            let m = s.get_metadata();
            new_hs.commit = new_hs.commit.max(m.index);
            new_hs.term = new_hs.term.max(m.term);
        }
        let write_hs = snapshot.is_some()
            || new_hs.term != self.stored_hard_state.term
            || new_hs.vote != self.stored_hard_state.vote
            || new_hs.commit >= self.stored_hard_state.commit + COMMIT_WRITE_STRIDE
            || new_hs.commit < self.stored_hard_state.commit;
        if !write_hs && entries.is_empty() {
            self.hard_state = new_hs;
            return Ok(());
        }
        let txn = self.db.begin_write().map_err(persist_err)?;
        {
            let mut table = txn.open_table(ENTRIES).map_err(persist_err)?;
            let mut meta = txn.open_table(META).map_err(persist_err)?;
            if let Some(s) = snapshot {
                table.retain(|_, _| false).map_err(persist_err)?;
                let bytes = s
                    .write_to_bytes()
                    .map_err(|e| persist_err(redb::StorageError::Io(std::io::Error::other(e))))?;
                meta.insert("snapshot", bytes.as_slice())
                    .map_err(persist_err)?;
            }
            if let Some(first) = entries.first() {
                table
                    .retain_in(first.index.., |_, _| false)
                    .map_err(persist_err)?;
                for e in entries {
                    let bytes = e.write_to_bytes().map_err(|e| {
                        persist_err(redb::StorageError::Io(std::io::Error::other(e)))
                    })?;
                    table
                        .insert(e.index, bytes.as_slice())
                        .map_err(persist_err)?;
                }
            }
            if write_hs {
                let hs = new_hs
                    .write_to_bytes()
                    .map_err(|e| persist_err(redb::StorageError::Io(std::io::Error::other(e))))?;
                meta.insert("hard_state", hs.as_slice())
                    .map_err(persist_err)?;
            }
        }
        txn.commit().map_err(persist_err)?;
        if write_hs {
            self.stored_hard_state = new_hs.clone();
        }

        if let Some(s) = snapshot {
            self.snapshot = s.clone();
            self.entries.clear();
        }
        if let Some(first) = entries.first() {
            let keep = first.index.saturating_sub(self.first());
            let keep = usize::try_from(keep).unwrap_or(usize::MAX);
            self.entries.truncate(keep.min(self.entries.len()));
            self.entries.extend_from_slice(entries);
        }
        self.hard_state = new_hs;
        Ok(())
    }

    /// Notes a new commit index (persisted with the next write; raft
    /// recomputes commit after a restart anyway).
    pub fn set_commit(&mut self, commit: u64) {
        self.hard_state.commit = commit;
    }

    /// Replaces the log up to `index` (which must be applied) by a snapshot
    /// of the state machine at `index`.
    pub fn compact(
        &mut self,
        index: u64,
        conf_state: ConfState,
        data: Vec<u8>,
    ) -> Result<(), PersistError> {
        if index <= self.snapshot_index() || index > self.last() {
            return Ok(());
        }
        let term = self.entry_term(index).unwrap_or(0);
        let mut snap = Snapshot::default();
        let mut meta = SnapshotMetadata {
            index,
            term,
            ..Default::default()
        };
        meta.set_conf_state(conf_state);
        snap.set_metadata(meta);
        snap.data = data.into();
        let bytes = snap
            .write_to_bytes()
            .map_err(|e| persist_err(redb::StorageError::Io(std::io::Error::other(e))))?;
        // The snapshot covers applied, hence committed, entries: record the
        // commit index with it so the stored commit never lags the snapshot.
        let mut hs = self.hard_state.clone();
        hs.commit = hs.commit.max(index);
        let hs_bytes = pb_bytes(&hs)?;
        let txn = self.db.begin_write().map_err(persist_err)?;
        {
            let mut table = txn.open_table(ENTRIES).map_err(persist_err)?;
            let mut meta = txn.open_table(META).map_err(persist_err)?;
            meta.insert("snapshot", bytes.as_slice())
                .map_err(persist_err)?;
            meta.insert("hard_state", hs_bytes.as_slice())
                .map_err(persist_err)?;
            table
                .retain_in(..=index, |_, _| false)
                .map_err(persist_err)?;
        }
        txn.commit().map_err(persist_err)?;
        self.stored_hard_state = hs.clone();
        let drop_n = usize::try_from(index - self.snapshot_index()).unwrap_or(usize::MAX);
        self.entries.drain(..drop_n.min(self.entries.len()));
        self.snapshot = snap;
        self.hard_state = hs;
        Ok(())
    }

    fn entry_term(&self, index: u64) -> Option<u64> {
        if index == self.snapshot_index() {
            return Some(self.snapshot.get_metadata().term);
        }
        let off = usize::try_from(index.checked_sub(self.first())?).ok()?;
        self.entries.get(off).map(|e| e.term)
    }
}

impl raft::Storage for DiskStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(
            self.hard_state.clone(),
            self.snapshot.get_metadata().get_conf_state().clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last() + 1 || low > high {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let lo = usize::try_from(low - self.first()).unwrap_or(usize::MAX);
        let hi = usize::try_from(high - self.first()).unwrap_or(usize::MAX);
        let max = max_size.into().unwrap_or(u64::MAX);
        let mut out = Vec::with_capacity(hi - lo);
        let mut size = 0u64;
        for e in &self.entries[lo..hi] {
            size += u64::from(e.compute_size());
            if !out.is_empty() && size > max {
                break;
            }
            out.push(e.clone());
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx < self.snapshot_index() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        self.entry_term(idx)
            .ok_or(raft::Error::Store(StorageError::Unavailable))
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        if self.snapshot_index() == 0 || self.snapshot_index() < request_index {
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        Ok(self.snapshot.clone())
    }
}

#[cfg(test)]
mod tests {
    use raft::Storage as _;

    use super::*;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            data: vec![1, 2, 3].into(),
            ..Default::default()
        }
    }

    fn state_bytes() -> Vec<u8> {
        nephele_state::codec::encode_snapshot(&nephele_state::State::default())
    }

    #[test]
    fn survives_reopen_and_truncates_conflicts() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = DiskStorage::open(dir.path(), 1, Some(7)).unwrap();
            s.bootstrap(vec![1], &state_bytes()).unwrap();
            s.persist(None, &[entry(2, 1), entry(3, 1), entry(4, 1)], None)
                .unwrap();
            // A new leader overwrites the tail from index 3.
            s.persist(None, &[entry(3, 2)], None).unwrap();
            let hs = HardState {
                term: 2,
                commit: 3,
                ..Default::default()
            };
            s.persist(None, &[], Some(&hs)).unwrap();
            assert_eq!(s.last_index().unwrap(), 3);
        }
        let s = DiskStorage::open(dir.path(), 1, None).unwrap();
        assert_eq!(s.cluster_id(), 7);
        assert_eq!(s.first_index().unwrap(), 2);
        assert_eq!(s.last_index().unwrap(), 3);
        assert_eq!(s.term(3).unwrap(), 2);
        assert_eq!(s.term(1).unwrap(), 1);
        assert_eq!(s.initial_state().unwrap().hard_state.commit, 3);
        assert_eq!(
            s.initial_state().unwrap().conf_state.voters,
            vec![1],
            "conf state comes from the snapshot"
        );
        assert!(matches!(
            s.entries(1, 3, None, GetEntriesContext::empty(false)),
            Err(raft::Error::Store(StorageError::Compacted))
        ));
    }

    #[test]
    fn commit_only_changes_are_written_in_strides() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = DiskStorage::open(dir.path(), 1, Some(7)).unwrap();
            s.bootstrap(vec![1], &state_bytes()).unwrap();
            let hs = |term, vote, commit| HardState {
                term,
                vote,
                commit,
                ..Default::default()
            };
            s.persist(None, &[entry(2, 1), entry(3, 1)], Some(&hs(1, 1, 1)))
                .unwrap();
            // Only the commit index moves: kept in memory.
            s.persist(None, &[], Some(&hs(1, 1, 3))).unwrap();
            assert_eq!(s.initial_state().unwrap().hard_state.commit, 3);
        }
        let s = DiskStorage::open(dir.path(), 1, None).unwrap();
        assert_eq!(s.initial_state().unwrap().hard_state.commit, 1);
        drop(s);
        {
            let mut s = DiskStorage::open(dir.path(), 1, None).unwrap();
            // A new term and vote are always written, with the commit.
            let hs = HardState {
                term: 2,
                vote: 1,
                commit: 3,
                ..Default::default()
            };
            s.persist(None, &[], Some(&hs)).unwrap();
        }
        let s = DiskStorage::open(dir.path(), 1, None).unwrap();
        let hs = s.initial_state().unwrap().hard_state;
        assert_eq!((hs.term, hs.vote, hs.commit), (2, 1, 3));
    }

    #[test]
    fn compaction_keeps_the_tail() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = DiskStorage::open(dir.path(), 1, Some(7)).unwrap();
        s.bootstrap(vec![1], &state_bytes()).unwrap();
        let es: Vec<Entry> = (2..=10).map(|i| entry(i, 1)).collect();
        s.persist(None, &es, None).unwrap();
        s.compact(6, ConfState::default(), state_bytes()).unwrap();
        assert_eq!(s.first_index().unwrap(), 7);
        assert_eq!(s.snapshot(0, 2).unwrap().get_metadata().index, 6);
        drop(s);
        let s = DiskStorage::open(dir.path(), 1, None).unwrap();
        assert_eq!(s.first_index().unwrap(), 7);
        assert_eq!(s.last_index().unwrap(), 10);
        let got = s
            .entries(7, 11, None, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(got.len(), 4);
    }

    #[test]
    fn refuses_foreign_identity() {
        let dir = tempfile::tempdir().unwrap();
        DiskStorage::open(dir.path(), 1, Some(7)).unwrap();
        assert!(matches!(
            DiskStorage::open(dir.path(), 1, Some(8)),
            Err(OpenStorageError::WrongCluster { .. })
        ));
        assert!(matches!(
            DiskStorage::open(dir.path(), 2, Some(7)),
            Err(OpenStorageError::WrongMember { .. })
        ));
        let other = tempfile::tempdir().unwrap();
        assert!(matches!(
            DiskStorage::open(other.path(), 1, None),
            Err(OpenStorageError::NoClusterId { .. })
        ));
    }

    #[test]
    fn refuses_a_gap_in_the_log() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = DiskStorage::open(dir.path(), 1, Some(7)).unwrap();
            s.bootstrap(vec![1], &state_bytes()).unwrap();
            s.persist(None, &[entry(2, 1), entry(3, 1), entry(4, 1)], None)
                .unwrap();
            // Simulate a lost entry in the middle of the log.
            let txn = s.db.begin_write().unwrap();
            txn.open_table(ENTRIES).unwrap().remove(3).unwrap();
            txn.commit().unwrap();
        }
        let err = DiskStorage::open(dir.path(), 1, None).unwrap_err();
        assert!(matches!(err, OpenStorageError::Corrupt { .. }), "{err}");
        assert!(
            err.to_string().contains("log entry 4 found where 3"),
            "{err}"
        );
    }

    /// Damage anywhere in the file: the open refuses with an error or
    /// yields a log that passed every check, and never panics.
    #[test]
    fn damaged_pages_are_refused_or_recovered_never_trusted_blindly() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = DiskStorage::open(dir.path(), 1, Some(7)).unwrap();
            s.bootstrap(vec![1], &state_bytes()).unwrap();
            for i in 0..20u64 {
                let es: Vec<Entry> = (2 + i * 10..12 + i * 10).map(|i| entry(i, 1)).collect();
                s.persist(None, &es, None).unwrap();
            }
        }
        let good = std::fs::read(dir.path().join(DB_FILE)).unwrap();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let (mut refused, mut opened) = (0, 0);
        for trial in 0..40 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let mut bad = good.clone();
            let at = usize::try_from(seed % bad.len() as u64).unwrap();
            // Alternate between flipping a few bytes and zeroing a page.
            if trial % 2 == 0 {
                for (k, b) in bad.iter_mut().skip(at).take(4).enumerate() {
                    *b ^= 0x5a ^ u8::try_from(k).unwrap();
                }
            } else {
                let page = at / 4096 * 4096;
                let end = (page + 4096).min(bad.len());
                bad[page..end].fill(0);
            }
            let d = tempfile::tempdir().unwrap();
            std::fs::write(d.path().join(DB_FILE), &bad).unwrap();
            let path = d.path().to_owned();
            let res = std::panic::catch_unwind(move || {
                DiskStorage::open(&path, 1, None).map(|s| s.last_index().unwrap())
            });
            match res {
                Err(_) => panic!("trial {trial}: opening a damaged file panicked (byte {at})"),
                Ok(Err(_)) => refused += 1,
                Ok(Ok(last)) => {
                    // Damage in unused space: the log is whole.
                    assert_eq!(last, 201, "trial {trial}: a damaged log opened shortened");
                    opened += 1;
                }
            }
        }
        assert!(refused > 0, "no damage was detected ({opened} opened)");
    }

    #[test]
    fn refuses_a_damaged_file() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = DiskStorage::open(dir.path(), 1, Some(7)).unwrap();
            s.bootstrap(vec![1], &state_bytes()).unwrap();
            let es: Vec<Entry> = (2..=200).map(|i| entry(i, 1)).collect();
            s.persist(None, &es, None).unwrap();
        }
        let path = dir.path().join(DB_FILE);
        let len = std::fs::metadata(&path).unwrap().len();
        // Truncate the file, as a crash during a file-system level copy or a
        // full disk could: opening must fail with a clear error, never serve
        // a silently shortened log.
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len / 3).unwrap();
        drop(f);
        let err = DiskStorage::open(dir.path(), 1, None).unwrap_err();
        assert!(matches!(err, OpenStorageError::Database { .. }), "{err}");
        // Garbage instead of a database.
        std::fs::write(&path, vec![0xa5; 8192]).unwrap();
        let err = DiskStorage::open(dir.path(), 1, None).unwrap_err();
        assert!(matches!(err, OpenStorageError::Database { .. }), "{err}");
    }
}
