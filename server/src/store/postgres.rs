//! The PostgreSQL backend of the result store (`[store] backend = "postgres"`): the same
//! records as the SQLite one, in a database several gateway replicas can share, through
//! a connection pool (deadpool-postgres), with TLS by rustls when the URL asks for it.
//!
//! Versioned migrations run at start-up inside one transaction holding an advisory lock,
//! so replicas starting at once apply each exactly once. Every command row names the
//! replica that runs it (`owner`, `[store] replica_id`); at start-up a replica marks only
//! its own interrupted commands failed, never another live replica's.

use std::path::PathBuf;
use std::time::SystemTime;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use super::{
    COLUMNS, Columns, CommandRecord, GRANT_COLUMNS, ListQuery, RESTARTED_REASON, StoreError,
    files_to_json, grant_from, millis, record_from,
};
use crate::access::grant::Grant;
use crate::command::CommandId;

/// How to reach the database.
#[derive(Clone, PartialEq, Eq)]
pub struct PostgresSettings {
    /// A libpq connection string: `postgres://USER@HOST:PORT/DB?sslmode=require` or
    /// `host=... user=... dbname=...`; `sslmode=require` (or `verify-full`) turns TLS on.
    pub url: String,
    /// The password, read from `[store] password_file` (never written in the config).
    pub password: Option<String>,
    /// PEM of the CA that signs the server's certificate, besides the public roots.
    pub ca_cert: Option<PathBuf>,
    /// Connections the pool keeps at most.
    pub max_connections: usize,
    /// This replica's name in the rows it owns.
    pub replica_id: String,
}

impl std::fmt::Debug for PostgresSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresSettings")
            .field("url", &redacted_url(&self.url))
            .field("password", &self.password.as_ref().map(|_| "[redacted]"))
            .field("ca_cert", &self.ca_cert)
            .field("max_connections", &self.max_connections)
            .field("replica_id", &self.replica_id)
            .finish()
    }
}

/// The URL without a password it may carry (`user:password@` or a `password=` pair).
pub fn redacted_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme && url[scheme + 3..at].contains(':') => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{}{user}:[redacted]{}", &url[..scheme + 3], &url[at..])
        }
        // key=value form: a password= pair
        _ if url.contains("password=") => url
            .split_whitespace()
            .map(|pair| {
                if pair.starts_with("password=") {
                    "password=[redacted]"
                } else {
                    pair
                }
            })
            .collect::<Vec<_>>()
            .join(" "),
        _ => url.to_owned(),
    }
}

/// Schema versions, applied in order; `kinvoke_schema.version` counts them.
const MIGRATIONS: &[&str] = &["
CREATE TABLE commands (
    id                  TEXT PRIMARY KEY,
    cluster             TEXT NOT NULL,
    principal           TEXT NOT NULL,
    command             TEXT NOT NULL,
    files               TEXT NOT NULL,
    timeout_ms          BIGINT NOT NULL,
    state               TEXT NOT NULL,
    exit_code           INTEGER,
    started_at          BIGINT NOT NULL,
    finished_at         BIGINT,
    reason              TEXT NOT NULL,
    output              BYTEA NOT NULL,
    output_size         BIGINT NOT NULL,
    grant_id            TEXT,
    grant_justification TEXT,
    output_truncated    BOOLEAN NOT NULL DEFAULT FALSE,
    owner               TEXT NOT NULL
);
CREATE INDEX commands_by_start ON commands (started_at DESC, id DESC);
CREATE INDEX commands_by_finish ON commands (finished_at);
CREATE INDEX commands_by_owner ON commands (owner, state);
CREATE TABLE store_probe (id INTEGER PRIMARY KEY, at BIGINT NOT NULL);
CREATE TABLE grants (
    id            TEXT PRIMARY KEY,
    assignment    TEXT NOT NULL,
    cluster       TEXT NOT NULL,
    role          TEXT NOT NULL,
    principal     TEXT NOT NULL,
    justification TEXT NOT NULL,
    duration_ms   BIGINT NOT NULL,
    state         TEXT NOT NULL,
    requested_at  BIGINT NOT NULL,
    starts_at     BIGINT,
    expires_at    BIGINT,
    approved_by   TEXT,
    revoked_by    TEXT,
    approval_from TEXT
);
"];

/// Key of the advisory lock migrations run under ("kinvoke" in ASCII, as a number).
const MIGRATION_LOCK: i64 = 0x6b_69_6e_76_6f_6b_65;

/// The PostgreSQL store.
#[derive(Clone)]
pub(super) struct PgStore {
    pool: Pool,
    owner: String,
}

fn pool_err(err: impl std::fmt::Display) -> StoreError {
    StoreError::Unreachable(err.to_string())
}

impl PgStore {
    /// Connects, migrates, and marks this replica's interrupted commands failed.
    pub(super) async fn connect(settings: &PostgresSettings) -> Result<(Self, usize), StoreError> {
        let open = |message: String| StoreError::Open {
            path: PathBuf::from(redacted_url(&settings.url)),
            source: message.into(),
        };
        let mut config: tokio_postgres::Config = settings
            .url
            .parse()
            .map_err(|e: tokio_postgres::Error| open(format!("the URL does not parse: {e}")))?;
        if let Some(password) = &settings.password {
            config.password(password);
        }
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match config.get_ssl_mode() {
            tokio_postgres::config::SslMode::Disable => {
                Manager::from_config(config, tokio_postgres::NoTls, manager_config)
            }
            _ => {
                let tls = client_tls(settings.ca_cert.as_ref()).map_err(open)?;
                Manager::from_config(
                    config,
                    tokio_postgres_rustls::MakeRustlsConnect::new(tls),
                    manager_config,
                )
            }
        };
        let pool = Pool::builder(manager)
            .max_size(settings.max_connections)
            .build()
            .map_err(|e| open(e.to_string()))?;
        let store = Self {
            pool,
            owner: settings.replica_id.clone(),
        };
        store.migrate().await.map_err(|e| open(e.to_string()))?;
        let client = store.pool.get().await.map_err(|e| open(e.to_string()))?;
        let recovered = client
            .execute(
                "UPDATE commands SET state = 'Failed', reason = $1, finished_at = $2 \
                 WHERE state IN ('Running', 'Pending') AND owner = $3",
                &[&RESTARTED_REASON, &millis(SystemTime::now()), &store.owner],
            )
            .await
            .map_err(|e| open(e.to_string()))?;
        Ok((store, usize::try_from(recovered).unwrap_or(usize::MAX)))
    }

    /// Applies the migrations this database lacks, one replica at a time.
    async fn migrate(&self) -> Result<(), StoreError> {
        let mut client = self.pool.get().await.map_err(pool_err)?;
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS kinvoke_schema (version INTEGER NOT NULL)")
            .await?;
        let version: i32 = tx
            .query_one("SELECT COALESCE(MAX(version), 0) FROM kinvoke_schema", &[])
            .await?
            .get(0);
        let known = i32::try_from(MIGRATIONS.len()).unwrap_or(i32::MAX);
        if version > known {
            return Err(StoreError::Corrupt(format!(
                "the database is at schema version {version}, newer than this gateway's {known}; upgrade the gateway"
            )));
        }
        for (i, migration) in MIGRATIONS
            .iter()
            .enumerate()
            .skip(usize::try_from(version).unwrap_or(0))
        {
            tx.batch_execute(migration).await?;
            let done = i32::try_from(i + 1).unwrap_or(i32::MAX);
            tx.execute("INSERT INTO kinvoke_schema (version) VALUES ($1)", &[&done])
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(pool_err)
    }

    pub(super) async fn probe(&self) -> Result<(), StoreError> {
        self.client()
            .await?
            .execute(
                "INSERT INTO store_probe (id, at) VALUES (1, $1) \
                 ON CONFLICT (id) DO UPDATE SET at = EXCLUDED.at",
                &[&millis(SystemTime::now())],
            )
            .await?;
        Ok(())
    }

    pub(super) async fn put(&self, record: CommandRecord) -> Result<(), StoreError> {
        let files = files_to_json(&record.files);
        let timeout = i64::try_from(record.timeout.as_millis()).unwrap_or(i64::MAX);
        let size = i64::try_from(record.output_size).unwrap_or(i64::MAX);
        let grant_id = record.break_glass.as_ref().map(|g| g.id.clone());
        let grant_justification = record.break_glass.as_ref().map(|g| g.justification.clone());
        let params: [&(dyn ToSql + Sync); 17] = [
            &record.id.as_str(),
            &record.cluster,
            &record.principal,
            &record.command,
            &files,
            &timeout,
            &record.state.as_str(),
            &record.exit_code,
            &millis(record.started_at),
            &record.finished_at.map(millis),
            &record.reason,
            &record.output,
            &size,
            &grant_id,
            &grant_justification,
            &record.output_truncated,
            &self.owner,
        ];
        self.client()
            .await?
            .execute(
                "INSERT INTO commands
                 (id, cluster, principal, command, files, timeout_ms, state, exit_code,
                  started_at, finished_at, reason, output, output_size, grant_id,
                  grant_justification, output_truncated, owner)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)
                 ON CONFLICT (id) DO UPDATE SET
                  cluster = EXCLUDED.cluster, principal = EXCLUDED.principal,
                  command = EXCLUDED.command, files = EXCLUDED.files,
                  timeout_ms = EXCLUDED.timeout_ms, state = EXCLUDED.state,
                  exit_code = EXCLUDED.exit_code, started_at = EXCLUDED.started_at,
                  finished_at = EXCLUDED.finished_at, reason = EXCLUDED.reason,
                  output = EXCLUDED.output, output_size = EXCLUDED.output_size,
                  grant_id = EXCLUDED.grant_id,
                  grant_justification = EXCLUDED.grant_justification,
                  output_truncated = EXCLUDED.output_truncated",
                &params,
            )
            .await?;
        Ok(())
    }

    pub(super) async fn mark_running(&self, id: &CommandId) -> Result<(), StoreError> {
        self.client()
            .await?
            .execute(
                "UPDATE commands SET state = 'Running' WHERE id = $1 AND state = 'Pending'",
                &[&id.as_str()],
            )
            .await?;
        Ok(())
    }

    pub(super) async fn get(&self, id: &CommandId) -> Result<Option<CommandRecord>, StoreError> {
        let row = self
            .client()
            .await?
            .query_opt(
                &format!("SELECT {COLUMNS} FROM commands WHERE id = $1"),
                &[&id.as_str()],
            )
            .await?;
        row.as_ref().map(record_from).transpose()
    }

    pub(super) async fn list(&self, query: ListQuery) -> Result<Vec<CommandRecord>, StoreError> {
        if query.visible.is_empty() {
            return Ok(Vec::new());
        }
        let (after_ms, after_id) = query.after.unwrap_or((i64::MAX, String::new()));
        let limit = i64::try_from(query.limit).unwrap_or(i64::MAX);
        let mut owned: Vec<String> = Vec::new();
        let mut clauses = Vec::with_capacity(query.visible.len());
        // parameters $1..$3 are fixed; the visible clusters (and principals) follow
        for v in &query.visible {
            owned.push(v.cluster.clone());
            let c = owned.len() + 3;
            match &v.principal {
                None => clauses.push(format!("cluster = ${c}")),
                Some(p) => {
                    owned.push(p.clone());
                    clauses.push(format!("(cluster = ${c} AND principal = ${})", c + 1));
                }
            }
        }
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![&after_ms, &after_id, &limit];
        params.extend(owned.iter().map(|s| s as &(dyn ToSql + Sync)));
        let columns = COLUMNS.replace("output, ", "''::bytea AS output, ");
        let rows = self
            .client()
            .await?
            .query(
                &format!(
                    "SELECT {columns} FROM commands
                     WHERE ({})
                       AND (started_at < $1 OR (started_at = $1 AND ($2 = '' OR id < $2)))
                     ORDER BY started_at DESC, id DESC LIMIT $3",
                    clauses.join(" OR ")
                ),
                &params,
            )
            .await?;
        rows.iter().map(record_from).collect()
    }

    pub(super) async fn put_grant(&self, grant: Grant) -> Result<(), StoreError> {
        let duration = i64::try_from(grant.duration.as_millis()).unwrap_or(i64::MAX);
        let params: [&(dyn ToSql + Sync); 14] = [
            &grant.id,
            &grant.assignment,
            &grant.cluster,
            &grant.role,
            &grant.principal,
            &grant.justification,
            &duration,
            &grant.state.as_str(),
            &millis(grant.requested_at),
            &grant.starts_at.map(millis),
            &grant.expires_at.map(millis),
            &grant.approved_by,
            &grant.revoked_by,
            &grant.approval_from,
        ];
        self.client()
            .await?
            .execute(
                "INSERT INTO grants
                 (id, assignment, cluster, role, principal, justification, duration_ms, state,
                  requested_at, starts_at, expires_at, approved_by, revoked_by, approval_from)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
                 ON CONFLICT (id) DO UPDATE SET
                  assignment = EXCLUDED.assignment, cluster = EXCLUDED.cluster,
                  role = EXCLUDED.role, principal = EXCLUDED.principal,
                  justification = EXCLUDED.justification, duration_ms = EXCLUDED.duration_ms,
                  state = EXCLUDED.state, requested_at = EXCLUDED.requested_at,
                  starts_at = EXCLUDED.starts_at, expires_at = EXCLUDED.expires_at,
                  approved_by = EXCLUDED.approved_by, revoked_by = EXCLUDED.revoked_by,
                  approval_from = EXCLUDED.approval_from",
                &params,
            )
            .await?;
        Ok(())
    }

    pub(super) async fn grants(&self) -> Result<Vec<Grant>, StoreError> {
        let rows = self
            .client()
            .await?
            .query(
                &format!("SELECT {GRANT_COLUMNS} FROM grants ORDER BY requested_at DESC, id DESC"),
                &[],
            )
            .await?;
        rows.iter().map(grant_from).collect()
    }

    pub(super) async fn purge_expired(&self, cutoff: i64) -> Result<usize, StoreError> {
        let n = self
            .client()
            .await?
            .execute(
                "DELETE FROM commands WHERE state NOT IN ('Running', 'Pending') AND finished_at < $1",
                &[&cutoff],
            )
            .await?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }
}

impl Columns for Row {
    fn text(&self, i: usize) -> Result<String, StoreError> {
        Ok(self.try_get(i)?)
    }
    fn opt_text(&self, i: usize) -> Result<Option<String>, StoreError> {
        Ok(self.try_get(i)?)
    }
    fn int(&self, i: usize) -> Result<i64, StoreError> {
        Ok(self.try_get(i)?)
    }
    fn opt_int(&self, i: usize) -> Result<Option<i64>, StoreError> {
        Ok(self.try_get(i)?)
    }
    fn opt_i32(&self, i: usize) -> Result<Option<i32>, StoreError> {
        Ok(self.try_get(i)?)
    }
    fn bytes(&self, i: usize) -> Result<Vec<u8>, StoreError> {
        Ok(self.try_get(i)?)
    }
    fn boolean(&self, i: usize) -> Result<bool, StoreError> {
        Ok(self.try_get(i)?)
    }
}

/// rustls for the database: the public roots, plus `ca_cert` when given.
fn client_tls(ca_cert: Option<&PathBuf>) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_cert {
        use rustls_pki_types::pem::PemObject;
        let certs = rustls_pki_types::CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("store.ca_cert {}: {e}", path.display()))?;
        for cert in certs {
            let cert = cert.map_err(|e| format!("store.ca_cert {}: {e}", path.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("store.ca_cert {}: {e}", path.display()))?;
        }
    }
    Ok(
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_show_in_a_printed_url() {
        assert_eq!(
            redacted_url("postgres://kinvoke:s3cret@db:5432/k?sslmode=require"),
            "postgres://kinvoke:[redacted]@db:5432/k?sslmode=require"
        );
        assert_eq!(
            redacted_url("host=db user=kinvoke password=s3cret dbname=k"),
            "host=db user=kinvoke password=[redacted] dbname=k"
        );
        let plain = "postgres://kinvoke@db/k";
        assert_eq!(redacted_url(plain), plain);
    }
}
