//! The audit file format: JSON Lines where each line carries `seq`, `time` and `prev`,
//! the SHA-256 of the previous line's bytes. Editing, deleting or reordering a line
//! breaks the chain at that point; a rotated file starts from the previous file's head.
//! This module writes lines and verifies files; it knows nothing of what events mean.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use ring::digest::{SHA256, digest};
use serde_json::{Map, Value};

use crate::hex::encode as hex;

/// `prev` of the very first line of a chain.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Where a chain stands: the last line's sequence number and hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// Sequence number of the last line (0 when empty).
    pub seq: u64,
    /// SHA-256 (hex) of the last line, or [`GENESIS`].
    pub hash: String,
}

impl Head {
    /// The head of an empty chain.
    pub fn genesis() -> Self {
        Self {
            seq: 0,
            hash: GENESIS.to_owned(),
        }
    }
}

/// SHA-256 (hex) of a line's bytes, without its newline.
pub fn line_hash(line: &[u8]) -> String {
    hex(digest(&SHA256, line).as_ref())
}

/// Builds the next line: `seq`, `time` and `prev` first, then the event's fields.
pub fn next_line(head: &Head, time: &str, event: &Map<String, Value>) -> (Vec<u8>, Head) {
    let mut obj = Map::with_capacity(event.len() + 3);
    let seq = head.seq + 1;
    obj.insert("seq".to_owned(), Value::from(seq));
    obj.insert("time".to_owned(), Value::from(time));
    obj.insert("prev".to_owned(), Value::from(head.hash.clone()));
    for (k, v) in event {
        if !matches!(k.as_str(), "seq" | "time" | "prev") {
            obj.insert(k.clone(), v.clone());
        }
    }
    let line = serde_json::to_vec(&Value::Object(obj)).unwrap_or_default();
    let hash = line_hash(&line);
    (line, Head { seq, hash })
}

/// Why a file's chain does not hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainBreak {
    /// The file could not be read.
    #[error("cannot read {path}: {message}")]
    Io {
        /// File.
        path: String,
        /// OS error.
        message: String,
    },
    /// A line is not a JSON object with `seq` and `prev`.
    #[error("line {line}: not an audit event ({message})")]
    Malformed {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// `prev` does not match the previous line: edited, deleted or reordered.
    #[error(
        "line {line}: prev hash does not match the line before it (seq {seq}): an event before it was edited, deleted or reordered"
    )]
    HashMismatch {
        /// 1-based line number.
        line: usize,
        /// Its sequence number.
        seq: u64,
    },
    /// `seq` skips or goes back: a line is missing or out of order.
    #[error(
        "line {line}: sequence number {found} where {expected} was expected: a line is missing or out of order"
    )]
    SequenceGap {
        /// 1-based line number.
        line: usize,
        /// Expected seq.
        expected: u64,
        /// Found seq.
        found: u64,
    },
    /// The file ends inside a line: truncated.
    #[error("line {line}: the file ends inside this line (truncated tail)")]
    Truncated {
        /// 1-based line number.
        line: usize,
    },
    /// The line with the anchor's sequence number does not hash to the anchor: the
    /// chain was rewritten from that line or before.
    #[error(
        "line {line}: seq {seq} does not hash to the recorded head: the chain was rewritten at or before this line"
    )]
    AnchorMismatch {
        /// 1-based line number.
        line: usize,
        /// The anchor's sequence number.
        seq: u64,
    },
    /// The chain ends before the anchor: lines recorded as written are gone.
    #[error(
        "the chain ends at seq {last}, before the recorded head seq {seq}: lines were removed from its end or the file was replaced"
    )]
    AnchorAfter {
        /// The anchor's sequence number.
        seq: u64,
        /// The last sequence number in the files.
        last: u64,
    },
    /// The first file does not start the chain: older events are missing.
    #[error(
        "the chain starts at seq {first}, not 1: its oldest events are missing; give the older rotated files too, oldest first (or --partial if they were deleted on purpose)"
    )]
    StartsLate {
        /// The first sequence number found.
        first: u64,
    },
    /// The files start after the anchor: the rotated file holding it was not given.
    #[error(
        "the recorded head seq {seq} is before these files, which start at seq {first}: give the older rotated files too, oldest first"
    )]
    AnchorBefore {
        /// The anchor's sequence number.
        seq: u64,
        /// The first sequence number in the files.
        first: u64,
    },
}

impl std::str::FromStr for Head {
    type Err = String;

    /// Parses `SEQ:SHA256`, e.g. `42:9f86d0…` (64 hex digits), as `audit verify --head`
    /// takes it.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (seq, hash) = text
            .split_once(':')
            .ok_or_else(|| format!("head {text:?} is not SEQ:SHA256"))?;
        let seq = seq
            .parse()
            .map_err(|_| format!("head {text:?}: {seq:?} is not a sequence number"))?;
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("head {text:?}: the hash is not 64 hex digits"));
        }
        Ok(Self {
            seq,
            hash: hash.to_ascii_lowercase(),
        })
    }
}

/// Checks a chain from `start` (genesis, or the previous rotated file's head); returns
/// the number of lines and the head.
pub fn verify(path: &Path, start: Option<&Head>) -> Result<(usize, Head), ChainBreak> {
    scan(path, start, |_, _, _| Ok(())).map(|(count, head, _)| (count, head))
}

/// Checks audit files given oldest first (each continuing the one before) and, when
/// `anchor` is given, that the chain passes through it: a head recorded elsewhere (the
/// `kinvoke::audit::head` log lines, or the head logged at a clean stop). Without an
/// anchor a chain cannot show that its last lines were removed or that the whole file
/// was replaced by another well-formed chain; with one it can, up to the anchor.
/// Returns the number of lines and the last head.
pub fn verify_files(files: &[PathBuf], anchor: Option<&Head>) -> Result<(usize, Head), FilesBreak> {
    verify_files_from(files, anchor, false)
}

/// [`verify_files`]; unless `partial`, the first file must start the chain (seq 1), so
/// removed oldest events are found too. `partial` accepts files whose older
/// predecessors were deliberately deleted (their first line then anchors the chain).
pub fn verify_files_from(
    files: &[PathBuf],
    anchor: Option<&Head>,
    partial: bool,
) -> Result<(usize, Head), FilesBreak> {
    let mut head: Option<Head> = None;
    let mut first_seq: Option<u64> = None;
    let mut anchor_seen = false;
    let mut total = 0usize;
    for file in files {
        let (count, h, _) = scan(file, head.as_ref(), |line, seq, hash| {
            first_seq.get_or_insert(seq);
            if let Some(anchor) = anchor
                && seq == anchor.seq
            {
                anchor_seen = hash == anchor.hash;
                if !anchor_seen {
                    return Err(ChainBreak::AnchorMismatch { line, seq });
                }
            }
            Ok(())
        })
        .map_err(|cause| FilesBreak {
            file: Some(file.display().to_string()),
            cause,
        })?;
        total += count;
        head = Some(h);
    }
    let head = head.unwrap_or_else(Head::genesis);
    if !partial
        && let Some(first) = first_seq
        && first != 1
    {
        return Err(FilesBreak {
            file: files.first().map(|f| f.display().to_string()),
            cause: ChainBreak::StartsLate { first },
        });
    }
    if let Some(anchor) = anchor
        && !anchor_seen
    {
        let cause = match first_seq {
            Some(first) if anchor.seq < first => ChainBreak::AnchorBefore {
                seq: anchor.seq,
                first,
            },
            _ => ChainBreak::AnchorAfter {
                seq: anchor.seq,
                last: head.seq,
            },
        };
        return Err(FilesBreak { file: None, cause });
    }
    Ok((total, head))
}

/// Why a set of audit files does not verify, with the file where it was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilesBreak {
    /// The file, when the break is in one (not for an anchor past the last file).
    pub file: Option<String>,
    /// What is wrong.
    pub cause: ChainBreak,
}

impl std::fmt::Display for FilesBreak {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.file {
            Some(file) => write!(f, "{file}: {}", self.cause),
            None => self.cause.fmt(f),
        }
    }
}

impl std::error::Error for FilesBreak {}

/// Walks a file's chain, calling `on_line(line, seq, hash)` for every line that chains;
/// returns the number of lines, the head and the length of the last line in bytes
/// (without its newline).
fn scan(
    path: &Path,
    start: Option<&Head>,
    mut on_line: impl FnMut(usize, u64, &str) -> Result<(), ChainBreak>,
) -> Result<(usize, Head, u64), ChainBreak> {
    let io_err = |e: io::Error| ChainBreak::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    let file = File::open(path).map_err(io_err)?;
    let mut reader = BufReader::new(file);
    let mut head = start.cloned();
    let mut count = 0usize;
    let mut last_line = 0u64;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = reader.read_until(b'\n', &mut buf).map_err(io_err)?;
        if n == 0 {
            break;
        }
        count += 1;
        if buf.last() != Some(&b'\n') {
            return Err(ChainBreak::Truncated { line: count });
        }
        buf.pop();
        let malformed = |message: &str| ChainBreak::Malformed {
            line: count,
            message: message.to_owned(),
        };
        let value: Value = serde_json::from_slice(&buf).map_err(|e| malformed(&e.to_string()))?;
        let seq = value
            .get("seq")
            .and_then(Value::as_u64)
            .ok_or_else(|| malformed("no numeric seq"))?;
        let prev = value
            .get("prev")
            .and_then(Value::as_str)
            .ok_or_else(|| malformed("no prev hash"))?;
        match &head {
            // the first line of a file whose predecessor is unknown anchors the chain
            None => {}
            Some(h) => {
                if seq != h.seq + 1 {
                    return Err(ChainBreak::SequenceGap {
                        line: count,
                        expected: h.seq + 1,
                        found: seq,
                    });
                }
                if prev != h.hash {
                    return Err(ChainBreak::HashMismatch { line: count, seq });
                }
            }
        }
        if head.is_none() && seq == 1 && prev != GENESIS {
            return Err(ChainBreak::HashMismatch { line: count, seq });
        }
        let hash = line_hash(&buf);
        on_line(count, seq, &hash)?;
        last_line = buf.len() as u64;
        head = Some(Head { seq, hash });
    }
    Ok((count, head.unwrap_or_else(Head::genesis), last_line))
}

/// An open audit file being appended to.
pub struct ChainFile {
    path: PathBuf,
    file: File,
    size: u64,
    head: Head,
    /// Device and inode of the open file, when it is a regular file.
    identity: Option<(u64, u64)>,
    /// Bytes of the last line, without its newline (0 when the file is empty).
    last_line: u64,
}

/// The audit file on disk is no longer the one this gateway has been writing: another
/// process deleted, replaced, truncated, extended or edited it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path} {what} (this gateway's last line there was seq {seq}, sha256 {hash})")]
pub struct FileChanged {
    /// The audit file.
    pub path: String,
    /// What happened to it.
    pub what: String,
    /// The head this gateway had written.
    pub seq: u64,
    /// Its hash.
    pub hash: String,
}

impl std::fmt::Debug for ChainFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChainFile")
            .field("path", &self.path)
            .field("size", &self.size)
            .field("head", &self.head)
            .finish()
    }
}

impl ChainFile {
    /// Opens (creating) the file and finds the head to continue from. A file whose last
    /// line is incomplete (a crash mid-write) or does not chain is moved aside as
    /// `NAME.broken-<seq>` and a new file continues from the last good line, so the
    /// evidence is kept and the new chain still links to it.
    pub fn open(path: &Path) -> io::Result<(Self, Option<String>)> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut note = None;
        // only a regular file has a chain to continue; a device (e.g. /dev/full in tests
        // of a full disk) is written to as it is
        let (head, last_line) = if std::fs::metadata(path).is_ok_and(|m| m.is_file()) {
            match scan(path, None, |_, _, _| Ok(())) {
                Ok((_, head, last_line)) => (head, last_line),
                Err(err) => {
                    let good = last_good_head(path)?;
                    // never over the evidence of an earlier crash
                    let mut aside = path.with_extension(format!("broken-{}", good.seq));
                    let mut n = 1;
                    while aside.exists() {
                        aside = path.with_extension(format!("broken-{}-{n}", good.seq));
                        n += 1;
                    }
                    std::fs::rename(path, &aside)?;
                    note = Some(format!(
                        "{} did not verify ({err}); moved to {} and continuing after seq {}",
                        path.display(),
                        aside.display(),
                        good.seq
                    ));
                    (good, 0)
                }
            }
        } else {
            (Head::genesis(), 0)
        };
        // an empty file after a rotation (a crash right after it), or one with nothing
        // whole in it: the chain goes on from the newest rotated or set-aside file,
        // never from genesis again
        let head = if head.seq == 0 {
            match newest_rotated(path)? {
                Some(rotated) => last_good_head(&rotated)?,
                None => head,
            }
        } else {
            head
        };
        let file = open_append(path)?;
        let meta = file.metadata()?;
        Ok((
            Self {
                path: path.to_owned(),
                identity: identity(&meta),
                size: meta.len(),
                file,
                head,
                last_line,
            },
            note,
        ))
    }

    /// Checks that the file at the path is still the one being written, as this writer
    /// left it: the same inode, the same size, and a last line that still hashes to the
    /// head. Run before each batch, so a file deleted, replaced, truncated, appended to
    /// or whose last line was edited by another process is found before anything more
    /// is written to it. A file that is not a regular file (a device) is not checked.
    pub fn check_unchanged(&self) -> Result<(), FileChanged> {
        let Some((dev, ino)) = self.identity else {
            return Ok(());
        };
        let changed = |what: String| FileChanged {
            path: self.path.display().to_string(),
            what,
            seq: self.head.seq,
            hash: self.head.hash.clone(),
        };
        let on_disk = match std::fs::symlink_metadata(&self.path) {
            Ok(meta) => meta,
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                return Err(changed("was deleted".to_owned()));
            }
            Err(err) => return Err(changed(format!("cannot be inspected: {err}"))),
        };
        if identity(&on_disk) != Some((dev, ino)) {
            return Err(changed("was replaced by another file".to_owned()));
        }
        let size = on_disk.len();
        if size < self.size {
            return Err(changed(format!(
                "was truncated from {} to {size} bytes",
                self.size
            )));
        }
        if size > self.size {
            return Err(changed(format!(
                "grew from {} to {size} bytes written by another process",
                self.size
            )));
        }
        if self.last_line > 0 {
            let mut line = vec![0u8; usize::try_from(self.last_line).unwrap_or(0)];
            let at = self.size.saturating_sub(self.last_line + 1);
            use std::os::unix::fs::FileExt;
            if let Err(err) = self.file.read_exact_at(&mut line, at) {
                return Err(changed(format!("cannot be read back: {err}")));
            }
            if line_hash(&line) != self.head.hash {
                return Err(changed("had its last line edited".to_owned()));
            }
        }
        Ok(())
    }

    /// The current head.
    pub fn head(&self) -> &Head {
        &self.head
    }

    /// Bytes in the current file.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Appends lines (each already chained on the current head) and advances the head.
    pub fn append(&mut self, bytes: &[u8], new_head: Head) -> io::Result<()> {
        if let Err(err) = self.file.write_all(bytes) {
            // a full disk can take part of a batch: cut it off again, so the file ends
            // at this writer's last whole line and a later batch, once there is room,
            // continues the chain instead of finding a file it did not write
            if self.identity.is_some() {
                let _ = self.file.set_len(self.size);
            }
            return Err(err);
        }
        self.size += bytes.len() as u64;
        let body = bytes.strip_suffix(b"\n").unwrap_or(bytes);
        if !body.is_empty() {
            let start = body.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
            self.last_line = (body.len() - start) as u64;
        }
        self.head = new_head;
        Ok(())
    }

    /// Makes everything appended so far durable.
    pub fn sync(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Moves the current file to `NAME.<first-seq-of-next>` and starts an empty one; the
    /// chain (seq and prev) simply continues into it.
    pub fn rotate(&mut self) -> io::Result<PathBuf> {
        self.file.sync_data()?;
        let mut rotated = self.path.with_extension(format!("{}.jsonl", self.head.seq));
        // never over an older file: a name already taken gets a suffix
        let mut n = 1;
        while rotated.exists() {
            rotated = self
                .path
                .with_extension(format!("{}-{n}.jsonl", self.head.seq));
            n += 1;
        }
        std::fs::rename(&self.path, &rotated)?;
        self.file = open_append(&self.path)?;
        self.identity = identity(&self.file.metadata()?);
        self.size = 0;
        self.last_line = 0;
        Ok(rotated)
    }
}

/// Opens (creating) a file to append to and read back from.
fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .open(path)
}

/// Device and inode of a regular file.
fn identity(meta: &std::fs::Metadata) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    meta.is_file().then(|| (meta.dev(), meta.ino()))
}

/// The rotated (`STEM.<last seq>.jsonl`) or set-aside (`STEM.broken-<last good seq>`)
/// file next to `path` with the highest sequence number, if any.
fn newest_rotated(path: &Path) -> io::Result<Option<PathBuf>> {
    let (Some(dir), Some(stem)) = (path.parent(), path.file_stem().and_then(|s| s.to_str())) else {
        return Ok(None);
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let prefix = format!("{stem}.");
    let mut newest: Option<(u64, PathBuf)> = None;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(seq) = name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .and_then(|n| {
                n.strip_suffix(".jsonl")
                    .or_else(|| n.strip_prefix("broken-"))
            })
            .and_then(|n| n.split('-').next())
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        if newest.as_ref().is_none_or(|(s, _)| seq > *s) {
            newest = Some((seq, entry.path()));
        }
    }
    Ok(newest.map(|(_, p)| p))
}

/// The head after the last complete, parseable line of a damaged file.
fn last_good_head(path: &Path) -> io::Result<Head> {
    let mut file = File::open(path)?;
    file.seek(SeekFrom::Start(0))?;
    let mut text = Vec::new();
    file.read_to_end(&mut text)?;
    let mut head = Head::genesis();
    for line in text.split_inclusive(|b| *b == b'\n') {
        let Some(line) = line.strip_suffix(b"\n") else {
            break;
        };
        let Some(seq) = serde_json::from_slice::<Value>(line)
            .ok()
            .and_then(|v| v.get("seq").and_then(Value::as_u64))
        else {
            break;
        };
        head = Head {
            seq,
            hash: line_hash(line),
        };
    }
    Ok(head)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(n: u64) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("event".into(), Value::from("test"));
        m.insert("n".into(), Value::from(n));
        m
    }

    fn write_chain(path: &Path, n: u64) -> Head {
        let (mut f, _) = ChainFile::open(path).unwrap();
        for i in 0..n {
            let (mut line, head) = next_line(f.head(), "2026-01-01T00:00:00Z", &event(i));
            line.push(b'\n');
            f.append(&line, head).unwrap();
        }
        f.sync().unwrap();
        f.head().clone()
    }

    fn lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn rewrite(path: &Path, lines: &[String]) {
        std::fs::write(path, lines.join("\n") + "\n").unwrap();
    }

    #[test]
    fn an_intact_chain_verifies_with_its_count_and_head() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let head = write_chain(&path, 5);
        assert_eq!(verify(&path, None).unwrap(), (5, head));
    }

    #[test]
    fn tampering_is_found_at_the_first_broken_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        write_chain(&path, 6);
        let original = lines(&path);

        let mut edited = original.clone();
        edited[2] = edited[2].replace("\"n\":2", "\"n\":9");
        rewrite(&path, &edited);
        assert!(matches!(
            verify(&path, None),
            Err(ChainBreak::HashMismatch { line: 4, .. })
        ));

        let mut deleted = original.clone();
        deleted.remove(3);
        rewrite(&path, &deleted);
        assert!(matches!(
            verify(&path, None),
            Err(ChainBreak::SequenceGap {
                line: 4,
                expected: 4,
                found: 5
            })
        ));

        let mut swapped = original.clone();
        swapped.swap(1, 2);
        rewrite(&path, &swapped);
        assert!(matches!(
            verify(&path, None),
            Err(ChainBreak::SequenceGap { line: 2, .. })
        ));

        let mut text = original.join("\n") + "\n";
        text.truncate(text.len() - 10);
        std::fs::write(&path, text).unwrap();
        assert!(matches!(
            verify(&path, None),
            Err(ChainBreak::Truncated { line: 6 })
        ));

        // editing the first line's prev is caught too
        let mut first = original.clone();
        first[0] = first[0].replace(GENESIS, &"1".repeat(64));
        rewrite(&path, &first);
        assert!(matches!(
            verify(&path, None),
            Err(ChainBreak::HashMismatch { line: 1, .. })
        ));
    }

    #[test]
    fn reopening_continues_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        write_chain(&path, 3);
        let head = write_chain(&path, 2);
        assert_eq!(head.seq, 5);
        assert_eq!(verify(&path, None).unwrap(), (5, head));
    }

    #[test]
    fn a_torn_tail_is_moved_aside_and_the_chain_continues_after_the_last_good_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        write_chain(&path, 3);
        let mut text = std::fs::read(&path).unwrap();
        text.extend_from_slice(b"{\"seq\":4,\"ti");
        std::fs::write(&path, text).unwrap();
        let (f, note) = ChainFile::open(&path).unwrap();
        assert!(note.unwrap().contains("truncated"));
        assert_eq!(f.head().seq, 3);
        assert!(dir.path().join("audit.broken-3").exists());
    }

    #[test]
    fn rotation_starts_a_file_that_chains_to_the_previous_head() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let (mut f, _) = ChainFile::open(&path).unwrap();
        for i in 0..3 {
            let (mut line, head) = next_line(f.head(), "t", &event(i));
            line.push(b'\n');
            f.append(&line, head).unwrap();
        }
        let head_before = f.head().clone();
        let rotated = f.rotate().unwrap();
        let (mut line, head) = next_line(f.head(), "t", &event(9));
        line.push(b'\n');
        f.append(&line, head.clone()).unwrap();
        f.sync().unwrap();
        assert_eq!(verify(&rotated, None).unwrap(), (3, head_before.clone()));
        assert_eq!(verify(&path, Some(&head_before)).unwrap(), (1, head));
        // without the previous head the new file still verifies internally
        assert!(verify(&path, None).is_ok());
        // but not against a wrong predecessor
        assert!(
            verify(
                &path,
                Some(&Head {
                    seq: 3,
                    hash: "ab".repeat(32)
                })
            )
            .is_err()
        );
    }

    fn appended(f: &mut ChainFile, n: u64) {
        for i in 0..n {
            let (mut line, head) = next_line(f.head(), "t", &event(i));
            line.push(b'\n');
            f.append(&line, head).unwrap();
        }
        f.sync().unwrap();
    }

    #[test]
    fn a_file_changed_under_the_writer_is_found_before_the_next_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let other = dir.path().join("other.jsonl");
        type Change = fn(&Path, &Path);
        let changes: [(&str, Change, &str); 6] = [
            (
                "deleted",
                |p, _| std::fs::remove_file(p).unwrap(),
                "was deleted",
            ),
            (
                "replaced",
                |p, o| {
                    std::fs::copy(p, o).unwrap();
                    std::fs::rename(o, p).unwrap();
                },
                "was replaced by another file",
            ),
            (
                "truncated",
                |p, _| {
                    let f = OpenOptions::new().write(true).open(p).unwrap();
                    f.set_len(f.metadata().unwrap().len() / 2).unwrap();
                },
                "was truncated from",
            ),
            (
                "emptied",
                |p, _| {
                    OpenOptions::new()
                        .write(true)
                        .open(p)
                        .unwrap()
                        .set_len(0)
                        .unwrap();
                },
                "was truncated from",
            ),
            (
                "appended to",
                |p, _| {
                    let mut f = OpenOptions::new().append(true).open(p).unwrap();
                    f.write_all(b"{}\n").unwrap();
                },
                "grew from",
            ),
            (
                "last line edited in place, same size",
                |p, _| {
                    let mut text = std::fs::read(p).unwrap();
                    let at = text.len() - 3;
                    text[at] = if text[at] == b'1' { b'2' } else { b'1' };
                    std::fs::write(p, text).unwrap();
                },
                "had its last line edited",
            ),
        ];
        for (name, change, message) in changes {
            let _ = std::fs::remove_file(&path);
            let (mut f, _) = ChainFile::open(&path).unwrap();
            appended(&mut f, 3);
            f.check_unchanged().unwrap();
            change(&path, &other);
            let err = f.check_unchanged().expect_err(name);
            assert!(err.what.starts_with(message), "{name}: {err}");
            assert_eq!(err.seq, 3, "{name}");
            assert_eq!(&err.hash, &f.head().hash, "{name}");
        }
    }

    #[test]
    fn the_writers_own_appends_reopening_and_rotation_leave_the_file_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let (mut f, _) = ChainFile::open(&path).unwrap();
        f.check_unchanged().unwrap();
        appended(&mut f, 2);
        f.check_unchanged().unwrap();
        drop(f);
        let (mut f, _) = ChainFile::open(&path).unwrap();
        f.check_unchanged().unwrap();
        appended(&mut f, 1);
        f.check_unchanged().unwrap();
        f.rotate().unwrap();
        f.check_unchanged().unwrap();
        appended(&mut f, 1);
        f.check_unchanged().unwrap();
    }

    #[test]
    fn an_anchor_recorded_elsewhere_finds_removed_last_lines_and_replaced_chains() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let (mut f, _) = ChainFile::open(&path).unwrap();
        appended(&mut f, 3);
        let anchor = f.head().clone();
        let rotated = f.rotate().unwrap();
        appended(&mut f, 2);
        let files = vec![rotated.clone(), path.clone()];
        assert_eq!(verify_files(&files, Some(&anchor)).unwrap().0, 5);
        let last = f.head().clone();
        assert_eq!(verify_files(&files, Some(&last)).unwrap().1, last);

        // the current file alone does not start the chain; accepted as partial, it
        // still starts after the anchor
        let alone = std::slice::from_ref(&path);
        let err = verify_files(alone, None).unwrap_err();
        assert!(
            matches!(err.cause, ChainBreak::StartsLate { first: 4 }),
            "{err}"
        );
        assert!(verify_files_from(alone, None, true).is_ok());
        let err = verify_files_from(alone, Some(&anchor), true).unwrap_err();
        assert!(
            matches!(err.cause, ChainBreak::AnchorBefore { seq: 3, first: 4 }),
            "{err}"
        );

        // the last line removed: the chain still verifies alone, not against the anchor
        let mut lines = lines(&path);
        lines.pop();
        rewrite(&path, &lines);
        assert!(verify_files(&files, None).is_ok());
        let err = verify_files(&files, Some(&last)).unwrap_err();
        assert!(
            matches!(err.cause, ChainBreak::AnchorAfter { seq: 5, last: 4 }),
            "{err}"
        );

        // the whole history replaced by another well-formed chain of the same length
        let forged = dir.path().join("forged.jsonl");
        write_chain(&forged, 3);
        let err = verify_files(std::slice::from_ref(&forged), Some(&anchor)).unwrap_err();
        assert!(
            matches!(err.cause, ChainBreak::AnchorMismatch { line: 3, seq: 3 }),
            "{err}"
        );
        assert!(
            err.to_string()
                .starts_with(&format!("{}: line 3: ", forged.display()))
        );
    }

    #[test]
    fn a_head_is_given_as_seq_colon_sha256() {
        let hash = "AB".repeat(32);
        let head: Head = format!("7:{hash}").parse().unwrap();
        assert_eq!(
            head,
            Head {
                seq: 7,
                hash: hash.to_ascii_lowercase()
            }
        );
        for bad in ["7", "x:ab", "7:abc", &format!("7:{}", "zz".repeat(32))] {
            assert!(bad.parse::<Head>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_restart_right_after_a_rotation_continues_the_chain_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let (mut f, _) = ChainFile::open(&path).unwrap();
        appended(&mut f, 3);
        let before = f.head().clone();
        let rotated = f.rotate().unwrap();
        drop(f);
        // the crash: the new file is empty; the next process must go on from seq 3
        let (mut f, _) = ChainFile::open(&path).unwrap();
        assert_eq!(f.head(), &before);
        appended(&mut f, 2);
        let files = vec![rotated.clone(), path.clone()];
        assert_eq!(verify_files(&files, None).unwrap().0, 5);
        // a rotation whose name is taken keeps the older file
        let kept = std::fs::read(&rotated).unwrap();
        std::fs::write(dir.path().join("audit.5.jsonl"), b"older\n").unwrap();
        let second = f.rotate().unwrap();
        assert_ne!(second, dir.path().join("audit.5.jsonl"));
        assert_eq!(
            std::fs::read(dir.path().join("audit.5.jsonl")).unwrap(),
            b"older\n"
        );
        assert_eq!(std::fs::read(&rotated).unwrap(), kept);
    }

    /// Run in a child process of the test binary (below): with a file size limit, a
    /// write past it is cut short (EFBIG) as on a full disk.
    #[test]
    #[ignore = "run by a_write_cut_short_by_a_full_disk_leaves_no_torn_line, in a child"]
    fn partial_write_child() {
        let Some(dir) = std::env::var_os("KINVOKE_PARTIAL_WRITE_DIR") else {
            return;
        };
        let path = Path::new(&dir).join("audit.jsonl");
        let (mut f, _) = ChainFile::open(&path).unwrap();
        appended(&mut f, 2);
        let size = f.size();
        // SIGXFSZ would end the process instead of failing the write
        unsafe_free_ignore_sigxfsz();
        nix::sys::resource::setrlimit(
            nix::sys::resource::Resource::RLIMIT_FSIZE,
            size + 10,
            size + 10,
        )
        .unwrap();
        let (mut line, head) = next_line(f.head(), "t", &event(7));
        line.push(b'\n');
        assert!(
            f.append(&line, head).is_err(),
            "the write past the limit fails"
        );
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            size,
            "the torn bytes are cut"
        );
        f.check_unchanged().unwrap();
        println!("PARTIAL-WRITE-CHILD-OK");
    }

    fn unsafe_free_ignore_sigxfsz() {
        use nix::sys::signal::{SigHandler, Signal};
        // SigIgn installs no handler code, so nothing runs in signal context
        let ignore = nix::sys::signal::SigAction::new(
            SigHandler::SigIgn,
            nix::sys::signal::SaFlags::empty(),
            nix::sys::signal::SigSet::empty(),
        );
        #[allow(unsafe_code, reason = "SIG_IGN for SIGXFSZ: no handler runs")]
        // SAFETY: SIG_IGN installs no handler function
        let _ = unsafe { nix::sys::signal::sigaction(Signal::SIGXFSZ, &ignore) };
    }

    #[test]
    fn a_write_cut_short_by_a_full_disk_leaves_no_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "audit::chain::tests::partial_write_child",
                "--ignored",
                "--nocapture",
            ])
            .env("KINVOKE_PARTIAL_WRITE_DIR", dir.path())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("PARTIAL-WRITE-CHILD-OK"),
            "{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn two_torn_writes_in_a_row_neither_fork_the_chain_nor_overwrite_evidence() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let tear = |path: &Path| {
            let mut text = std::fs::read(path).unwrap();
            text.extend_from_slice(b"{\"seq\":99,\"ti");
            std::fs::write(path, text).unwrap();
        };
        let (mut f, _) = ChainFile::open(&path).unwrap();
        appended(&mut f, 3);
        drop(f);
        tear(&path);
        // first crash: set aside as audit.broken-3, a new file continues at 4
        let (f, _) = ChainFile::open(&path).unwrap();
        assert_eq!(f.head().seq, 3);
        drop(f);
        // second crash before anything whole was written: nothing good in the file
        tear(&path);
        let (mut f, _) = ChainFile::open(&path).unwrap();
        assert_eq!(f.head().seq, 3, "the chain goes on from the set-aside file");
        appended(&mut f, 1);
        assert_eq!(f.head().seq, 4);
        drop(f);
        // a third crash with the same last good seq keeps the earlier evidence
        tear(&path);
        let first = std::fs::read(dir.path().join("audit.broken-3")).unwrap();
        let (f, _) = ChainFile::open(&path).unwrap();
        assert_eq!(f.head().seq, 4);
        assert_eq!(
            std::fs::read(dir.path().join("audit.broken-3")).unwrap(),
            first
        );
        let set_aside = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with("audit.broken-")
            })
            .count();
        assert_eq!(set_aside, 3);
    }
}
