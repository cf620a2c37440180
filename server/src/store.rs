//! Command records and their output, kept in SQLite (bundled) in the state directory.
//! Records survive restarts; a record a previous process left `Running` is marked
//! `Failed` when the store opens. SQLite calls are blocking, so they run on the blocking
//! pool behind one connection.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, params};

use crate::access::authz::GrantUse;
use crate::access::grant::{Grant, GrantState};
use crate::command::{CommandId, CommandState, FileInfo};

mod postgres;

use postgres::PgStore;
pub use postgres::{PostgresSettings, redacted_url};

/// Reason given to records that were running when the gateway stopped abruptly.
pub const RESTARTED_REASON: &str = "gateway restarted before the command finished";

/// A store operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened or created.
    #[error("cannot open result store {path}: {source}")]
    Open {
        /// Database file.
        path: PathBuf,
        /// What SQLite or the OS said.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A query failed.
    #[error("result store query failed: {0}")]
    Query(#[from] rusqlite::Error),
    /// The blocking task running the query died.
    #[error("result store task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// A stored row holds a value this version cannot read.
    #[error("result store holds an unreadable record: {0}")]
    Corrupt(String),
    /// A PostgreSQL query failed.
    #[error("result store query failed: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// No connection to the PostgreSQL server could be had.
    #[error("result store unreachable: {0}")]
    Unreachable(String),
}

impl StoreError {
    /// True when the database cannot be used at all, for a reason outside the query: the
    /// disk is full, the file is read-only or gone, an I/O error. Such a store refuses
    /// new commands until a write succeeds again.
    pub fn is_unavailable(&self) -> bool {
        use rusqlite::ErrorCode::{
            CannotOpen, DatabaseCorrupt, DiskFull, NotADatabase, PermissionDenied, ReadOnly,
            SystemIoFailure,
        };
        match self {
            Self::Query(rusqlite::Error::SqliteFailure(err, _)) => matches!(
                err.code,
                DiskFull
                    | SystemIoFailure
                    | ReadOnly
                    | CannotOpen
                    | PermissionDenied
                    | DatabaseCorrupt
                    | NotADatabase
            ),
            Self::Open { .. } | Self::Unreachable(_) => true,
            // no answer from the server (a dropped connection), or one saying it cannot
            // take writes: connection exceptions (08), insufficient resources (53, a full
            // disk), operator intervention (57, a shutdown), read-only transactions
            Self::Postgres(err) => err.as_db_error().is_none_or(|db| {
                let code = db.code().code();
                code.starts_with("08")
                    || code.starts_with("53")
                    || code.starts_with("57")
                    || code == "25006"
            }),
            _ => false,
        }
    }
}

/// One command's record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandRecord {
    /// Id.
    pub id: CommandId,
    /// Cluster name.
    pub cluster: String,
    /// Who ran it.
    pub principal: String,
    /// The command line.
    pub command: String,
    /// Attached files (names, sizes, digests).
    pub files: Vec<FileInfo>,
    /// Timeout it ran with.
    pub timeout: Duration,
    /// State.
    pub state: CommandState,
    /// Exit code once ended.
    pub exit_code: Option<i32>,
    /// Start time.
    pub started_at: SystemTime,
    /// End time.
    pub finished_at: Option<SystemTime>,
    /// Why it failed, was canceled or timed out.
    pub reason: String,
    /// Kept output.
    pub output: Vec<u8>,
    /// Total output size.
    pub output_size: u64,
    /// True when bytes of the output were left out (`output` then marks where).
    pub output_truncated: bool,
    /// The break-glass grant it ran under.
    pub break_glass: Option<GrantUse>,
}

/// Records of one cluster a caller may see: everyone's, or one principal's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Visibility {
    /// The cluster.
    pub cluster: String,
    /// Only this principal's records; `None` = all.
    pub principal: Option<String>,
}

/// Which records to list.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    /// What may be listed; empty lists nothing.
    pub visible: Vec<Visibility>,
    /// At most this many.
    pub limit: usize,
    /// Continue after this (started_at millis, id) cursor.
    pub after: Option<(i64, String)>,
}

/// The result store: SQLite in the state directory (the embedded default), or
/// PostgreSQL shared by several replicas.
#[derive(Clone)]
pub struct Store {
    db: Db,
    /// False from a query that failed for the disk or the file (full, read-only, I/O
    /// error) until one succeeds again.
    health: Arc<tokio::sync::watch::Sender<bool>>,
}

/// Where records are kept.
#[derive(Clone)]
enum Db {
    Sqlite(Arc<Mutex<Connection>>),
    Postgres(PgStore),
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS commands (
    id          TEXT PRIMARY KEY,
    cluster     TEXT NOT NULL,
    principal   TEXT NOT NULL,
    command     TEXT NOT NULL,
    files       TEXT NOT NULL,
    timeout_ms  INTEGER NOT NULL,
    state       TEXT NOT NULL,
    exit_code   INTEGER,
    started_at  INTEGER NOT NULL,
    finished_at INTEGER,
    reason      TEXT NOT NULL,
    output      BLOB NOT NULL,
    output_size INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS commands_by_start ON commands (started_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS commands_by_finish ON commands (finished_at);
CREATE TABLE IF NOT EXISTS store_probe (
    id INTEGER PRIMARY KEY,
    at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS grants (
    id            TEXT PRIMARY KEY,
    assignment    TEXT NOT NULL,
    cluster       TEXT NOT NULL,
    role          TEXT NOT NULL,
    principal     TEXT NOT NULL,
    justification TEXT NOT NULL,
    duration_ms   INTEGER NOT NULL,
    state         TEXT NOT NULL,
    requested_at  INTEGER NOT NULL,
    starts_at     INTEGER,
    expires_at    INTEGER,
    approved_by   TEXT,
    revoked_by    TEXT,
    approval_from TEXT
);
";

/// Schema changes after the first release, applied in order; `user_version` counts them.
const MIGRATIONS: &[&str] = &[
    "ALTER TABLE commands ADD COLUMN grant_id TEXT; ALTER TABLE commands ADD COLUMN grant_justification TEXT;",
    // before this column, output was cut only at its end: shorter kept than written
    "ALTER TABLE commands ADD COLUMN output_truncated INTEGER NOT NULL DEFAULT 0; \
     UPDATE commands SET output_truncated = (output_size > length(output));",
];

impl Store {
    /// Opens (creating if needed) the store and marks records left running as failed.
    /// Returns the store and how many records were marked.
    pub fn open(path: &Path) -> Result<(Self, usize), StoreError> {
        let open_err = |source: Box<dyn std::error::Error + Send + Sync>| StoreError::Open {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| open_err(Box::new(e)))?;
        }
        let conn = Connection::open(path).map_err(|e| open_err(Box::new(e)))?;
        // WAL + NORMAL: a commit is durable against a process crash at once, and against
        // power loss at the next checkpoint, without an fsync per command
        conn.pragma_update(None, "journal_mode", "WAL")
            .and_then(|()| conn.pragma_update(None, "synchronous", "NORMAL"))
            .and_then(|()| conn.busy_timeout(Duration::from_secs(5)))
            .and_then(|()| conn.execute_batch(SCHEMA))
            .and_then(|()| migrate(&conn))
            .map_err(|e| open_err(Box::new(e)))?;
        let recovered = conn
            .execute(
                "UPDATE commands SET state = 'Failed', reason = ?1, finished_at = ?2 WHERE state IN ('Running', 'Pending')",
                params![RESTARTED_REASON, millis(SystemTime::now())],
            )
            .map_err(|e| open_err(Box::new(e)))?;
        Ok((
            Self {
                db: Db::Sqlite(Arc::new(Mutex::new(conn))),
                health: Arc::new(tokio::sync::watch::channel(true).0),
            },
            recovered,
        ))
    }

    /// True unless the last query failed for the disk or the file.
    pub fn is_healthy(&self) -> bool {
        *self.health.borrow()
    }

    /// Follows [`Store::is_healthy`] (for the gRPC health service).
    pub fn health(&self) -> tokio::sync::watch::Receiver<bool> {
        self.health.subscribe()
    }

    /// Writes to the database (one row of its own) to find out whether it can be
    /// written again; the outcome sets [`Store::is_healthy`].
    async fn sqlite_probe(&self) -> Result<(), StoreError> {
        self.with_conn("probe", |conn| {
            conn.execute(
                "INSERT OR REPLACE INTO store_probe (id, at) VALUES (1, ?1)",
                params![millis(SystemTime::now())],
            )?;
            Ok(())
        })
        .await
    }

    /// Connects to PostgreSQL, applies the migrations it lacks, and marks this replica's
    /// commands left running as failed. Returns the store and how many were marked.
    pub async fn connect_postgres(
        settings: &PostgresSettings,
    ) -> Result<(Self, usize), StoreError> {
        let (pg, recovered) = PgStore::connect(settings).await?;
        Ok((
            Self {
                db: Db::Postgres(pg),
                health: Arc::new(tokio::sync::watch::channel(true).0),
            },
            recovered,
        ))
    }

    /// A PostgreSQL operation, timed and noted like a SQLite one.
    async fn on_postgres<T>(
        &self,
        op: &'static str,
        call: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let started = std::time::Instant::now();
        let result = call.await;
        crate::metrics::metrics().store_op(op, started.elapsed());
        self.note(&result.as_ref().map(|_| ()));
        result
    }

    /// Writes to the database (one row of its own) to find out whether it can be
    /// written again; the outcome sets [`Store::is_healthy`].
    pub async fn probe(&self) -> Result<(), StoreError> {
        match &self.db {
            Db::Sqlite(_) => self.sqlite_probe().await,
            Db::Postgres(pg) => self.on_postgres("probe", pg.probe()).await,
        }
    }

    /// Saves a new or updated record.
    pub async fn put(&self, record: CommandRecord) -> Result<(), StoreError> {
        match &self.db {
            Db::Sqlite(_) => self.sqlite_put(record).await,
            Db::Postgres(pg) => self.on_postgres("put", pg.put(record)).await,
        }
    }

    /// Records that a `Pending` command has started running (its Pod runs); a record
    /// that already ended is left as it is.
    pub async fn mark_running(&self, id: &CommandId) -> Result<(), StoreError> {
        match &self.db {
            Db::Sqlite(_) => self.sqlite_mark_running(id).await,
            Db::Postgres(pg) => self.on_postgres("mark_running", pg.mark_running(id)).await,
        }
    }

    /// The record with this id.
    pub async fn get(&self, id: &CommandId) -> Result<Option<CommandRecord>, StoreError> {
        match &self.db {
            Db::Sqlite(_) => self.sqlite_get(id).await,
            Db::Postgres(pg) => self.on_postgres("get", pg.get(id)).await,
        }
    }

    /// Records newest first, with their output left empty.
    pub async fn list(&self, query: ListQuery) -> Result<Vec<CommandRecord>, StoreError> {
        match &self.db {
            Db::Sqlite(_) => self.sqlite_list(query).await,
            Db::Postgres(pg) => self.on_postgres("list", pg.list(query)).await,
        }
    }

    /// Saves a new or updated grant.
    pub async fn put_grant(&self, grant: Grant) -> Result<(), StoreError> {
        match &self.db {
            Db::Sqlite(_) => self.sqlite_put_grant(grant).await,
            Db::Postgres(pg) => self.on_postgres("put_grant", pg.put_grant(grant)).await,
        }
    }

    /// Every stored grant, newest first.
    pub async fn grants(&self) -> Result<Vec<Grant>, StoreError> {
        match &self.db {
            Db::Sqlite(_) => self.sqlite_grants().await,
            Db::Postgres(pg) => self.on_postgres("grants", pg.grants()).await,
        }
    }

    /// Deletes finished records older than `retention`; returns how many.
    pub async fn purge_expired(&self, retention: Duration) -> Result<usize, StoreError> {
        match &self.db {
            Db::Sqlite(_) => self.sqlite_purge_expired(retention).await,
            Db::Postgres(pg) => {
                let cutoff = millis(
                    SystemTime::now()
                        .checked_sub(retention)
                        .unwrap_or(UNIX_EPOCH),
                );
                self.on_postgres("purge", pg.purge_expired(cutoff)).await
            }
        }
    }

    fn note(&self, result: &Result<(), &StoreError>) {
        let healthy = match result {
            Ok(()) => true,
            Err(err) if err.is_unavailable() => false,
            Err(_) => return,
        };
        self.health.send_if_modified(|was| {
            if *was == healthy {
                return false;
            }
            match result {
                Err(err) => tracing::error!(%err, "result store cannot be written; refusing new commands until it can"),
                Ok(()) => tracing::info!("result store writable again"),
            }
            *was = healthy;
            true
        });
    }

    async fn with_conn<T, F>(&self, op: &'static str, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let started = std::time::Instant::now();
        let Db::Sqlite(conn) = &self.db else {
            return Err(StoreError::Corrupt(
                "a SQLite query was sent to the PostgreSQL store".to_owned(),
            ));
        };
        let conn = conn.clone();
        let result = tokio::task::spawn_blocking(move || {
            // a panic inside a query cannot leave SQLite half-written (it rolls back), so
            // a poisoned lock is safe to keep using
            let conn = conn
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            f(&conn)
        })
        .await?;
        crate::metrics::metrics().store_op(op, started.elapsed());
        self.note(&result.as_ref().map(|_| ()));
        result
    }

    /// Saves a new or updated record.
    async fn sqlite_put(&self, record: CommandRecord) -> Result<(), StoreError> {
        self.with_conn("put", move |conn| {
            let files = files_to_json(&record.files);
            conn.execute(
                "INSERT OR REPLACE INTO commands
                 (id, cluster, principal, command, files, timeout_ms, state, exit_code,
                  started_at, finished_at, reason, output, output_size, grant_id, grant_justification,
                  output_truncated)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
                params![
                    record.id.as_str(),
                    record.cluster,
                    record.principal,
                    record.command,
                    files,
                    i64::try_from(record.timeout.as_millis()).unwrap_or(i64::MAX),
                    record.state.as_str(),
                    record.exit_code,
                    millis(record.started_at),
                    record.finished_at.map(millis),
                    record.reason,
                    record.output,
                    i64::try_from(record.output_size).unwrap_or(i64::MAX),
                    record.break_glass.as_ref().map(|g| g.id.clone()),
                    record.break_glass.as_ref().map(|g| g.justification.clone()),
                    record.output_truncated,
                ],
            )?;
            Ok(())
        })
        .await
    }

    /// Records that a `Pending` command has started running (its Pod runs); a record
    /// that already ended is left as it is.
    async fn sqlite_mark_running(&self, id: &CommandId) -> Result<(), StoreError> {
        let id = id.as_str().to_owned();
        self.with_conn("mark_running", move |conn| {
            conn.execute(
                "UPDATE commands SET state = 'Running' WHERE id = ?1 AND state = 'Pending'",
                params![id],
            )?;
            Ok(())
        })
        .await
    }

    /// The record with this id.
    async fn sqlite_get(&self, id: &CommandId) -> Result<Option<CommandRecord>, StoreError> {
        let id = id.as_str().to_owned();
        self.with_conn("get", move |conn| {
            conn.query_row(
                &format!("SELECT {COLUMNS} FROM commands WHERE id = ?1"),
                [id],
                |row| Ok(record_from(row)),
            )
            .optional()?
            .transpose()
        })
        .await
    }

    /// Records newest first, with their output left empty.
    async fn sqlite_list(&self, query: ListQuery) -> Result<Vec<CommandRecord>, StoreError> {
        if query.visible.is_empty() {
            return Ok(Vec::new());
        }
        self.with_conn("list", move |conn| {
            let (after_ms, after_id) = query.after.unwrap_or((i64::MAX, String::new()));
            // one (cluster, principal?) clause per visible cluster, all bound as parameters
            let mut args: Vec<rusqlite::types::Value> = vec![
                after_ms.into(),
                after_id.into(),
                i64::try_from(query.limit).unwrap_or(i64::MAX).into(),
            ];
            let mut clauses = Vec::with_capacity(query.visible.len());
            for v in query.visible {
                args.push(v.cluster.into());
                let c = args.len();
                match v.principal {
                    None => clauses.push(format!("cluster = ?{c}")),
                    Some(p) => {
                        args.push(p.into());
                        clauses.push(format!("(cluster = ?{c} AND principal = ?{})", c + 1));
                    }
                }
            }
            let mut stmt = conn.prepare(&format!(
                "SELECT {COLUMNS_NO_OUTPUT} FROM commands
                 WHERE ({})
                   AND (started_at < ?1 OR (started_at = ?1 AND (?2 = '' OR id < ?2)))
                 ORDER BY started_at DESC, id DESC LIMIT ?3",
                clauses.join(" OR ")
            ))?;
            let rows =
                stmt.query_map(rusqlite::params_from_iter(args), |row| Ok(record_from(row)))?;
            let mut out = Vec::new();
            for row in rows {
                out.push(row??);
            }
            Ok(out)
        })
        .await
    }

    /// Saves a new or updated grant.
    async fn sqlite_put_grant(&self, grant: Grant) -> Result<(), StoreError> {
        self.with_conn("put_grant", move |conn| {
            conn.execute(
                "INSERT OR REPLACE INTO grants
                 (id, assignment, cluster, role, principal, justification, duration_ms, state,
                  requested_at, starts_at, expires_at, approved_by, revoked_by, approval_from)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
                params![
                    grant.id,
                    grant.assignment,
                    grant.cluster,
                    grant.role,
                    grant.principal,
                    grant.justification,
                    i64::try_from(grant.duration.as_millis()).unwrap_or(i64::MAX),
                    grant.state.as_str(),
                    millis(grant.requested_at),
                    grant.starts_at.map(millis),
                    grant.expires_at.map(millis),
                    grant.approved_by,
                    grant.revoked_by,
                    grant.approval_from,
                ],
            )?;
            Ok(())
        })
        .await
    }

    /// Every stored grant, newest first.
    async fn sqlite_grants(&self) -> Result<Vec<Grant>, StoreError> {
        self.with_conn("grants", |conn| {
            let mut stmt = conn.prepare(&format!(
                "SELECT {GRANT_COLUMNS} FROM grants ORDER BY requested_at DESC, id DESC"
            ))?;
            let rows = stmt.query_map([], |row| Ok(grant_from(row)))?;
            let mut out = Vec::new();
            for row in rows {
                out.push(row??);
            }
            Ok(out)
        })
        .await
    }

    /// Deletes finished records older than `retention`; returns how many.
    async fn sqlite_purge_expired(&self, retention: Duration) -> Result<usize, StoreError> {
        let cutoff = millis(
            SystemTime::now()
                .checked_sub(retention)
                .unwrap_or(UNIX_EPOCH),
        );
        self.with_conn("purge", move |conn| {
            Ok(conn.execute(
                "DELETE FROM commands WHERE state NOT IN ('Running', 'Pending') AND finished_at < ?1",
                [cutoff],
            )?)
        })
        .await
    }
}

const COLUMNS: &str = "id, cluster, principal, command, files, timeout_ms, state, exit_code, started_at, finished_at, reason, output, output_size, grant_id, grant_justification, output_truncated";
const COLUMNS_NO_OUTPUT: &str = "id, cluster, principal, command, files, timeout_ms, state, exit_code, started_at, finished_at, reason, x'' AS output, output_size, grant_id, grant_justification, output_truncated";

fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    for (i, sql) in MIGRATIONS
        .iter()
        .enumerate()
        .skip(usize::try_from(version).unwrap_or(0))
    {
        conn.execute_batch(&format!(
            "BEGIN; {sql} PRAGMA user_version = {}; COMMIT;",
            i + 1
        ))?;
    }
    Ok(())
}

/// The columns of `grants` every query reads, in the order [`grant_from`] expects.
const GRANT_COLUMNS: &str = "id, assignment, cluster, role, principal, justification, \
     duration_ms, state, requested_at, starts_at, expires_at, approved_by, revoked_by, approval_from";

/// A result row of either backend, read by column index; one reader of records and
/// grants serves both.
trait Columns {
    fn text(&self, i: usize) -> Result<String, StoreError>;
    fn opt_text(&self, i: usize) -> Result<Option<String>, StoreError>;
    fn int(&self, i: usize) -> Result<i64, StoreError>;
    fn opt_int(&self, i: usize) -> Result<Option<i64>, StoreError>;
    fn opt_i32(&self, i: usize) -> Result<Option<i32>, StoreError>;
    fn bytes(&self, i: usize) -> Result<Vec<u8>, StoreError>;
    fn boolean(&self, i: usize) -> Result<bool, StoreError>;
}

impl Columns for rusqlite::Row<'_> {
    fn text(&self, i: usize) -> Result<String, StoreError> {
        Ok(self.get(i)?)
    }
    fn opt_text(&self, i: usize) -> Result<Option<String>, StoreError> {
        Ok(self.get(i)?)
    }
    fn int(&self, i: usize) -> Result<i64, StoreError> {
        Ok(self.get(i)?)
    }
    fn opt_int(&self, i: usize) -> Result<Option<i64>, StoreError> {
        Ok(self.get(i)?)
    }
    fn opt_i32(&self, i: usize) -> Result<Option<i32>, StoreError> {
        Ok(self.get(i)?)
    }
    fn bytes(&self, i: usize) -> Result<Vec<u8>, StoreError> {
        Ok(self.get(i)?)
    }
    fn boolean(&self, i: usize) -> Result<bool, StoreError> {
        Ok(self.get(i)?)
    }
}

/// A row of `SELECT {COLUMNS}` as a record.
fn record_from(row: &impl Columns) -> Result<CommandRecord, StoreError> {
    let id = row.text(0)?;
    let state = row.text(6)?;
    Ok(CommandRecord {
        id: CommandId::parse(&id).ok_or_else(|| StoreError::Corrupt(format!("bad id {id:?}")))?,
        cluster: row.text(1)?,
        principal: row.text(2)?,
        command: row.text(3)?,
        files: files_from_json(&row.text(4)?)?,
        timeout: Duration::from_millis(u64::try_from(row.int(5)?).unwrap_or(0)),
        state: CommandState::from_name(&state)
            .ok_or_else(|| StoreError::Corrupt(format!("bad state {state:?}")))?,
        exit_code: row.opt_i32(7)?,
        started_at: from_millis(row.int(8)?),
        finished_at: row.opt_int(9)?.map(from_millis),
        reason: row.text(10)?,
        output: row.bytes(11)?,
        output_size: u64::try_from(row.int(12)?).unwrap_or(0),
        output_truncated: row.boolean(15)?,
        break_glass: row
            .opt_text(13)?
            .map(|id| -> Result<GrantUse, StoreError> {
                Ok(GrantUse {
                    id,
                    justification: row.opt_text(14)?.unwrap_or_default(),
                })
            })
            .transpose()?,
    })
}

/// A row of `SELECT {GRANT_COLUMNS}` as a grant.
fn grant_from(row: &impl Columns) -> Result<Grant, StoreError> {
    let state = row.text(7)?;
    Ok(Grant {
        id: row.text(0)?,
        assignment: row.text(1)?,
        cluster: row.text(2)?,
        role: row.text(3)?,
        principal: row.text(4)?,
        justification: row.text(5)?,
        duration: Duration::from_millis(u64::try_from(row.int(6)?).unwrap_or(0)),
        state: GrantState::from_name(&state)
            .ok_or_else(|| StoreError::Corrupt(format!("bad grant state {state:?}")))?,
        requested_at: from_millis(row.int(8)?),
        starts_at: row.opt_int(9)?.map(from_millis),
        expires_at: row.opt_int(10)?.map(from_millis),
        approved_by: row.opt_text(11)?,
        revoked_by: row.opt_text(12)?,
        approval_from: row.opt_text(13)?,
    })
}

/// Milliseconds since the Unix epoch.
pub fn millis(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn from_millis(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

// files are stored as a small JSON array of [path, size, sha256]
fn files_to_json(files: &[FileInfo]) -> String {
    let rows: Vec<(&str, u64, &str)> = files
        .iter()
        .map(|f| (f.path.as_str(), f.size, f.sha256.as_str()))
        .collect();
    serde_json::to_string(&rows).unwrap_or_else(|_| "[]".to_owned())
}

fn files_from_json(text: &str) -> Result<Vec<FileInfo>, StoreError> {
    let rows: Vec<(String, u64, String)> =
        serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("files: {e}")))?;
    Ok(rows
        .into_iter()
        .map(|(path, size, sha256)| FileInfo { path, size, sha256 })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A throwaway PostgreSQL server (Debian's `postgresql` binaries) on a Unix socket in
    /// a temporary directory, stopped and removed on drop. As root it runs as `nobody`
    /// (PostgreSQL refuses root).
    pub(crate) struct TestPostgres {
        dir: tempfile::TempDir,
        bin: PathBuf,
    }

    impl TestPostgres {
        /// Starts one, or `None` (after a SKIPPED line) when the binaries are missing and
        /// may be; under `CI=true` or `KINVOKE_REQUIRE_KUBE_TOOLS=1` they may not.
        pub(crate) fn start() -> Option<Self> {
            let bin = std::fs::read_dir("/usr/lib/postgresql")
                .ok()
                .into_iter()
                .flatten()
                .filter_map(Result::ok)
                .map(|e| e.path().join("bin"))
                .filter(|b| b.join("initdb").is_file())
                .max();
            let Some(bin) = bin else {
                let set = |n: &str| std::env::var(n).is_ok_and(|v| v == "true" || v == "1");
                assert!(
                    !(set("CI") || set("KINVOKE_REQUIRE_KUBE_TOOLS")),
                    "PostgreSQL server binaries are missing: apt-get install postgresql"
                );
                println!(
                    "SKIPPED: no /usr/lib/postgresql/*/bin/initdb (apt-get install postgresql)"
                );
                return None;
            };
            let dir = tempfile::tempdir().unwrap();
            let pg = Self { dir, bin };
            if nix::unistd::geteuid().is_root() {
                std::os::unix::fs::chown(pg.dir.path(), Some(65_534), Some(65_534)).unwrap();
            }
            pg.run(
                "initdb",
                &[
                    "-D",
                    &pg.data(),
                    "-U",
                    "kinvoke",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--no-instructions",
                ],
            );
            let options = format!(
                "-k {} -c listen_addresses= -p 5432",
                pg.dir.path().display()
            );
            let log = pg.dir.path().join("log").display().to_string();
            pg.run(
                "pg_ctl",
                &["-D", &pg.data(), "-o", &options, "-l", &log, "-w", "start"],
            );
            Some(pg)
        }

        fn data(&self) -> String {
            self.dir.path().join("data").display().to_string()
        }

        fn run(&self, program: &str, args: &[&str]) {
            let path = self.bin.join(program);
            let out = if nix::unistd::geteuid().is_root() {
                std::process::Command::new("setpriv")
                    .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                    .arg(&path)
                    .args(args)
                    .output()
            } else {
                std::process::Command::new(&path).args(args).output()
            }
            .unwrap();
            assert!(
                out.status.success(),
                "{program} {args:?}: {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }

        /// Settings for replica `replica`.
        pub(crate) fn settings(&self, replica: &str) -> PostgresSettings {
            PostgresSettings {
                url: format!(
                    "host={} port=5432 user=kinvoke dbname=postgres",
                    self.dir.path().display()
                ),
                password: None,
                ca_cert: None,
                max_connections: 4,
                replica_id: replica.to_owned(),
            }
        }
    }

    impl Drop for TestPostgres {
        fn drop(&mut self) {
            let data = self.data();
            self.run("pg_ctl", &["-D", &data, "-m", "immediate", "stop"]);
        }
    }

    /// One backend a store test runs against.
    enum Backend {
        Sqlite(tempfile::TempDir),
        Postgres(TestPostgres),
    }

    impl Backend {
        /// SQLite always; PostgreSQL when its binaries are here.
        fn all() -> Vec<Self> {
            let mut out = vec![Self::Sqlite(tempfile::tempdir().unwrap())];
            out.extend(TestPostgres::start().map(Self::Postgres));
            out
        }

        /// Opens (again) the same store, as replica `a`.
        async fn open(&self) -> (Store, usize) {
            match self {
                Self::Sqlite(dir) => Store::open(&dir.path().join("db/kinvoke.db")).unwrap(),
                Self::Postgres(pg) => Store::connect_postgres(&pg.settings("a")).await.unwrap(),
            }
        }

        fn name(&self) -> &'static str {
            match self {
                Self::Sqlite(_) => "sqlite",
                Self::Postgres(_) => "postgres",
            }
        }
    }

    fn record(state: CommandState, started_ms: i64) -> CommandRecord {
        CommandRecord {
            id: CommandId::random().unwrap(),
            cluster: "c".into(),
            principal: "alice".into(),
            command: "kubectl version".into(),
            files: vec![FileInfo {
                path: "a.yaml".into(),
                size: 3,
                sha256: "ab".into(),
            }],
            timeout: Duration::from_secs(600),
            state,
            exit_code: (state != CommandState::Running).then_some(0),
            started_at: from_millis(started_ms),
            finished_at: (state != CommandState::Running).then(|| from_millis(started_ms + 5)),
            reason: String::new(),
            output: b"out".to_vec(),
            output_size: 3,
            output_truncated: false,
            break_glass: None,
        }
    }

    #[tokio::test]
    async fn records_round_trip_and_survive_reopen() {
        for backend in Backend::all() {
            records_round_trip_and_survive_reopen_on(&backend).await;
        }
    }

    async fn records_round_trip_and_survive_reopen_on(backend: &Backend) {
        let (store, recovered) = backend.open().await;
        assert_eq!(recovered, 0, "{}", backend.name());
        let done = record(CommandState::Succeeded, 1_000);
        let running = record(CommandState::Running, 2_000);
        store.put(done.clone()).await.unwrap();
        store.put(running.clone()).await.unwrap();
        assert_eq!(store.get(&done.id).await.unwrap(), Some(done.clone()));
        drop(store);

        let (store, recovered) = backend.open().await;
        assert_eq!(recovered, 1, "{}", backend.name());
        let after = store.get(&running.id).await.unwrap().unwrap();
        assert_eq!(after.state, CommandState::Failed);
        assert_eq!(after.reason, RESTARTED_REASON);
        assert!(after.finished_at.is_some());
        assert_eq!(store.get(&done.id).await.unwrap(), Some(done));
    }

    fn all(cluster: &str) -> Vec<Visibility> {
        vec![Visibility {
            cluster: cluster.into(),
            principal: None,
        }]
    }

    #[tokio::test]
    async fn list_shows_only_what_is_visible() {
        for backend in Backend::all() {
            let (store, _) = backend.open().await;
            list_shows_only_what_is_visible_on(&store).await;
        }
    }

    async fn list_shows_only_what_is_visible_on(store: &Store) {
        let mut mine = record(CommandState::Succeeded, 1_000);
        mine.principal = "alice".into();
        let mut theirs = record(CommandState::Succeeded, 1_001);
        theirs.principal = "bob".into();
        let mut elsewhere = record(CommandState::Succeeded, 1_002);
        elsewhere.cluster = "d".into();
        for r in [&mine, &theirs, &elsewhere] {
            store.put(r.clone()).await.unwrap();
        }
        let ids = |visible: Vec<Visibility>| {
            let store = store.clone();
            async move {
                store
                    .list(ListQuery {
                        visible,
                        limit: 10,
                        after: None,
                    })
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|r| r.id)
                    .collect::<Vec<_>>()
            }
        };
        let own_c = Visibility {
            cluster: "c".into(),
            principal: Some("alice".into()),
        };
        assert_eq!(ids(vec![own_c.clone()]).await, vec![mine.id.clone()]);
        assert_eq!(
            ids(vec![own_c, all("d").remove(0)]).await,
            vec![elsewhere.id.clone(), mine.id.clone()]
        );
        assert_eq!(
            ids(all("c")).await,
            vec![theirs.id.clone(), mine.id.clone()]
        );
        assert!(ids(vec![]).await.is_empty());
    }

    #[tokio::test]
    async fn list_pages_newest_first() {
        for backend in Backend::all() {
            let (store, _) = backend.open().await;
            list_pages_newest_first_on(&store).await;
        }
    }

    async fn list_pages_newest_first_on(store: &Store) {
        let mut ids = Vec::new();
        for i in 0..5 {
            let r = record(CommandState::Succeeded, 1_000 + i);
            ids.push(r.id.clone());
            store.put(r).await.unwrap();
        }
        let page1 = store
            .list(ListQuery {
                visible: all("c"),
                limit: 3,
                after: None,
            })
            .await
            .unwrap();
        assert_eq!(page1.len(), 3);
        assert_eq!(page1[0].id, ids[4]);
        assert!(page1[0].output.is_empty());
        let last = page1.last().unwrap();
        let page2 = store
            .list(ListQuery {
                visible: all("c"),
                limit: 3,
                after: Some((millis(last.started_at), last.id.as_str().to_owned())),
            })
            .await
            .unwrap();
        assert_eq!(
            page2.iter().map(|r| r.id.clone()).collect::<Vec<_>>(),
            vec![ids[1].clone(), ids[0].clone()]
        );
        let other = store
            .list(ListQuery {
                visible: all("other"),
                limit: 3,
                after: None,
            })
            .await
            .unwrap();
        assert!(other.is_empty());
    }

    #[tokio::test]
    async fn expired_records_are_purged_but_running_ones_kept() {
        for backend in Backend::all() {
            let (store, _) = backend.open().await;
            expired_records_are_purged_but_running_ones_kept_on(&store).await;
        }
    }

    async fn expired_records_are_purged_but_running_ones_kept_on(store: &Store) {
        let old = record(CommandState::Succeeded, 1_000);
        let now_ms = millis(SystemTime::now());
        let fresh = record(CommandState::Failed, now_ms);
        let running = record(CommandState::Running, 1_000);
        for r in [&old, &fresh, &running] {
            store.put(r.clone()).await.unwrap();
        }
        assert_eq!(
            store
                .purge_expired(Duration::from_secs(3600))
                .await
                .unwrap(),
            1
        );
        assert!(store.get(&old.id).await.unwrap().is_none());
        assert!(store.get(&fresh.id).await.unwrap().is_some());
        assert!(store.get(&running.id).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn grants_and_break_glass_marks_survive_reopen() {
        for backend in Backend::all() {
            grants_and_break_glass_marks_survive_reopen_on(&backend).await;
        }
    }

    async fn grants_and_break_glass_marks_survive_reopen_on(backend: &Backend) {
        let (store, _) = backend.open().await;
        let mut grant = Grant {
            id: "g1".into(),
            assignment: "oncall".into(),
            cluster: "c".into(),
            role: "Cluster Admin".into(),
            principal: "olga".into(),
            justification: "INC-1".into(),
            duration: Duration::from_secs(1800),
            state: GrantState::Pending,
            requested_at: from_millis(5_000),
            starts_at: None,
            expires_at: None,
            approved_by: None,
            revoked_by: None,
            approval_from: Some("group leads".into()),
        };
        store.put_grant(grant.clone()).await.unwrap();
        grant.activate(from_millis(6_000));
        grant.approved_by = Some("lee".into());
        store.put_grant(grant.clone()).await.unwrap();
        let mut used = record(CommandState::Succeeded, 7_000);
        used.break_glass = Some(GrantUse {
            id: "g1".into(),
            justification: "INC-1".into(),
        });
        store.put(used.clone()).await.unwrap();
        drop(store);
        let (store, _) = backend.open().await;
        assert_eq!(store.grants().await.unwrap(), vec![grant]);
        assert_eq!(
            store.get(&used.id).await.unwrap().unwrap().break_glass,
            used.break_glass
        );
    }

    #[tokio::test]
    async fn an_old_database_gains_the_new_columns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        {
            let conn = Connection::open(&path).unwrap();
            // the first release's schema, before any migration, with a record whose
            // output was cut at its end as that release did
            conn.execute_batch(SCHEMA).unwrap();
            conn.execute(
                "INSERT INTO commands VALUES ('0123456789abcdef0123456789abcdef', 'c', 'p', 'x', '[]', 1000, 'Succeeded', 0, 1, 2, '', x'6162', 5)",
                [],
            )
            .unwrap();
        }
        let (store, _) = Store::open(&path).unwrap();
        let old = store
            .get(&CommandId::parse("0123456789abcdef0123456789abcdef").unwrap())
            .await
            .unwrap()
            .unwrap();
        assert!(old.output_truncated, "5 bytes written, 2 kept");
        let conn = Connection::open(&path).unwrap();
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
        conn.prepare("SELECT grant_id, grant_justification FROM commands")
            .unwrap();
    }

    #[tokio::test]
    async fn replicas_starting_at_once_migrate_once_and_recover_only_their_own_commands() {
        let Some(pg) = TestPostgres::start() else {
            return;
        };
        // two replicas migrate the empty database at the same moment
        let (settings_a, settings_b) = (pg.settings("a"), pg.settings("b"));
        let (a, b) = tokio::join!(
            Store::connect_postgres(&settings_a),
            Store::connect_postgres(&settings_b),
        );
        let ((a, _), (b, _)) = (a.unwrap(), b.unwrap());
        let on_a = record(CommandState::Running, 1_000);
        let on_b = record(CommandState::Pending, 2_000);
        a.put(on_a.clone()).await.unwrap();
        b.put(on_b.clone()).await.unwrap();
        // each sees the other's records
        assert_eq!(b.get(&on_a.id).await.unwrap(), Some(on_a.clone()));
        b.mark_running(&on_b.id).await.unwrap();
        assert_eq!(
            a.get(&on_b.id).await.unwrap().unwrap().state,
            CommandState::Running
        );
        // replica a restarts: its command is marked failed, b's live one is not touched
        drop(a);
        let (a, recovered) = Store::connect_postgres(&pg.settings("a")).await.unwrap();
        assert_eq!(recovered, 1);
        assert_eq!(
            a.get(&on_a.id).await.unwrap().unwrap().state,
            CommandState::Failed
        );
        assert_eq!(
            a.get(&on_b.id).await.unwrap().unwrap().state,
            CommandState::Running
        );
        // an unreachable server makes the store unhealthy, as a full disk does
        drop(pg);
        let err = a
            .put(record(CommandState::Running, 3_000))
            .await
            .unwrap_err();
        assert!(err.is_unavailable(), "{err}");
        assert!(!a.is_healthy());
    }
}
