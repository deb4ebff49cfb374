//! The `key = value` config file: read safely, then parsed line by line.

use std::io::Read;
use std::path::Path;

use crate::config::settings::{Draft, Spec, spec_by_key};
use crate::config::units::Quoted;
use crate::config::{ConfigError, scratch_draft};
use crate::sys;

/// Largest config file read: a real one is a few hundred bytes, and a bound
/// keeps a file swapped for something huge from eating memory.
pub const MAX_FILE_SIZE: u64 = 1024 * 1024;

/// Reads the file named by `-c`. Only a regular file is read, opened without
/// blocking (a FIFO or a device must never stall start-up or the loop on a
/// reload) and at most [`MAX_FILE_SIZE`] bytes of it.
pub fn read_config_file(path: &Path) -> Result<String, ConfigError> {
    let io_error = |error| ConfigError::Io {
        path: path.to_owned(),
        error,
    };
    let refused = |message: &str| ConfigError::Refused {
        path: path.to_owned(),
        message: message.to_string(),
    };
    let file = sys::open_nonblocking(path).map_err(io_error)?;
    let metadata = file.metadata().map_err(io_error)?;
    if !metadata.is_file() {
        return Err(refused("not a regular file"));
    }
    if metadata.len() > MAX_FILE_SIZE {
        return Err(refused("larger than 1 MiB"));
    }
    // The file may grow between the check and the read: read one byte past
    // the cap to notice.
    let mut bytes = Vec::with_capacity(usize::try_from(metadata.len()).unwrap_or(0));
    file.take(MAX_FILE_SIZE + 1)
        .read_to_end(&mut bytes)
        .map_err(io_error)?;
    if bytes.len() as u64 > MAX_FILE_SIZE {
        return Err(refused("larger than 1 MiB"));
    }
    String::from_utf8(bytes).map_err(|_| refused("not valid UTF-8 text"))
}

/// The settings a config file holds, each value checked on its own, in file
/// order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileArgs {
    pub(crate) entries: Vec<FileEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FileEntry {
    pub(crate) spec: &'static Spec,
    pub(crate) value: String,
    pub(crate) line: usize,
}

impl FileArgs {
    /// The value the file gives `key`, if any.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entry(key).map(|entry| entry.value.as_str())
    }

    pub(crate) fn entry(&self, key: &str) -> Option<&FileEntry> {
        self.entries.iter().find(|entry| entry.spec.key == key)
    }
}

/// Parses the text of a config file. Pure, so it can be fuzzed; `path` only
/// names the file in errors.
///
/// Blank lines and lines starting with `#` are skipped; every other line is
/// `key = value`, split at the first `=`, with the long flag names (except
/// `config`) as keys. The first unknown or repeated key, bad value, or
/// `upstream` next to `proxy-host`/`proxy-port` is a [`ConfigError::File`]
/// naming its line.
pub fn parse_file(text: &str, path: &Path) -> Result<FileArgs, ConfigError> {
    let mut file = FileArgs::default();
    for (index, line) in text.lines().enumerate() {
        let line_no = index + 1;
        let fail = |message: String| ConfigError::File {
            path: path.to_owned(),
            line: line_no,
            message,
        };
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        // Split at the first `=` only: a hook command may hold more of them.
        let Some((key, value)) = trimmed.split_once('=') else {
            return Err(fail(format!(
                "expected 'key = value', got {}",
                Quoted(trimmed)
            )));
        };
        let (key, value) = (key.trim(), value.trim());
        let spec = match spec_by_key(key) {
            Some(spec) => spec,
            None if key == "config" => {
                return Err(fail("'config' cannot be set inside a config file".into()));
            }
            None => return Err(fail(format!("unknown key {}", Quoted(key)))),
        };
        if let Some(first) = file.entry(key) {
            return Err(fail(format!(
                "duplicate key '{key}' (first set at line {})",
                first.line
            )));
        }
        let rival = match key {
            "upstream" => file
                .entry("proxy-host")
                .or_else(|| file.entry("proxy-port")),
            "proxy-host" | "proxy-port" => file.entry("upstream"),
            _ => None,
        };
        if let Some(other) = rival {
            return Err(fail(format!(
                "'{key}' cannot be combined with '{}' (line {})",
                other.spec.key, other.line
            )));
        }
        check_value(&mut scratch_draft(), spec, value)
            .map_err(|reason| fail(format!("{key}: {reason}")))?;
        file.entries.push(FileEntry {
            spec,
            value: value.to_owned(),
            line: line_no,
        });
    }
    Ok(file)
}

/// Reads `value` into `draft` and checks its range: a value is judged where it
/// is written, so its error can name its flag or line.
pub(crate) fn check_value(draft: &mut Draft, spec: &Spec, value: &str) -> Result<(), String> {
    (spec.set)(draft, value)?;
    (spec.check)(&draft.config)
}
