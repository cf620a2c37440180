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
}

/// Checks a chain from `start` (genesis, or the previous rotated file's head); returns
/// the number of lines and the head.
pub fn verify(path: &Path, start: Option<&Head>) -> Result<(usize, Head), ChainBreak> {
    let io_err = |e: io::Error| ChainBreak::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    let file = File::open(path).map_err(io_err)?;
    let mut reader = BufReader::new(file);
    let mut head = start.cloned();
    let mut count = 0usize;
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
        head = Some(Head {
            seq,
            hash: line_hash(&buf),
        });
    }
    Ok((count, head.unwrap_or_else(Head::genesis)))
}

/// An open audit file being appended to.
pub struct ChainFile {
    path: PathBuf,
    file: File,
    size: u64,
    head: Head,
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
        let head = if std::fs::metadata(path).is_ok_and(|m| m.is_file()) {
            match verify(path, None) {
                Ok((_, head)) => head,
                Err(err) => {
                    let good = last_good_head(path)?;
                    let aside = path.with_extension(format!("broken-{}", good.seq));
                    std::fs::rename(path, &aside)?;
                    note = Some(format!(
                        "{} did not verify ({err}); moved to {} and continuing after seq {}",
                        path.display(),
                        aside.display(),
                        good.seq
                    ));
                    good
                }
            }
        } else {
            Head::genesis()
        };
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        Ok((
            Self {
                path: path.to_owned(),
                file,
                size,
                head,
            },
            note,
        ))
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
        self.file.write_all(bytes)?;
        self.size += bytes.len() as u64;
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
        let rotated = self.path.with_extension(format!("{}.jsonl", self.head.seq));
        std::fs::rename(&self.path, &rotated)?;
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.size = 0;
        Ok(rotated)
    }
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
}
