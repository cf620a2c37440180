//! Parsing what the CLI prints: the result header, timestamps, command ids.

#[allow(unused_imports)]
use super::*;

// output parsing

/// The first line `kinvoke` prints for a command that ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// `YYYY-MM-DD HH:MM:SS+00:00`.
    pub started_at: String,
    /// `YYYY-MM-DD HH:MM:SS+00:00`.
    pub finished_at: String,
    /// The remote exit code.
    pub exit_code: i32,
}

/// Parses `command started at T1, finished at T2 with exitcode=N`; `None` if the line
/// has another shape or a time is not `YYYY-MM-DD HH:MM:SS+00:00`.
pub fn parse_header(line: &str) -> Option<Header> {
    let rest = line.strip_prefix("command started at ")?;
    let (started_at, rest) = rest.split_once(", finished at ")?;
    let (finished_at, code) = rest.split_once(" with exitcode=")?;
    if !is_utc_time(started_at) || !is_utc_time(finished_at) {
        return None;
    }
    Some(Header {
        started_at: started_at.to_owned(),
        finished_at: finished_at.to_owned(),
        exit_code: code.parse().ok()?,
    })
}

/// Whether `s` is `YYYY-MM-DD HH:MM:SS+00:00`.
pub fn is_utc_time(s: &str) -> bool {
    const SHAPE: &[u8] = b"dddd-dd-dd dd:dd:dd+00:00";
    s.len() == SHAPE.len()
        && s.bytes().zip(SHAPE).all(|(c, &want)| match want {
            b'd' => c.is_ascii_digit(),
            other => c == other,
        })
}

/// The command id: first field of the only non-empty line of `-o tsv` output.
pub fn command_id_from_tsv(stdout: &str) -> Option<String> {
    let mut lines = stdout.lines().filter(|l| !l.trim().is_empty());
    let line = lines.next()?;
    if lines.next().is_some() {
        return None;
    }
    let id = line.split('\t').next()?.trim();
    (!id.is_empty()).then(|| id.to_owned())
}
