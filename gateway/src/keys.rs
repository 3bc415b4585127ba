//! API keys: the ones configured (`--api-key`, repeatable) and those of a key file
//! (`--api-key-file`, one per line, `#` comments), which is read again when it changes, so
//! keys are added and revoked without a restart. A request's `Authorization: Bearer` key is
//! compared with every key in constant time. Keys are never logged; a key file that cannot
//! be read keeps the keys last read from it (and says so, without them).

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use expertmesh_proto::secret;

/// How often the key file's modification time is looked at, at most.
const RECHECK_EVERY: Duration = Duration::from_secs(1);
/// A key file larger than this is refused (it is a list of keys, not a data file).
const KEY_FILE_MAX_BYTES: u64 = 1 << 20;

/// The keys of the API.
pub struct ApiKeys {
    fixed: Vec<String>,
    file: Option<PathBuf>,
    from_file: Mutex<FileKeys>,
}

#[derive(Default)]
struct FileKeys {
    keys: Vec<String>,
    modified: Option<SystemTime>,
    checked: Option<Instant>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKeys")
            .field("fixed", &self.fixed.len())
            .field("file", &self.file)
            .finish()
    }
}

/// The keys of a key file's text: one per line, blank lines and `#` comments skipped.
fn parse(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

impl ApiKeys {
    /// `fixed` keys and those of `file`; an error when the file cannot be read at start.
    pub fn new(fixed: Vec<String>, file: Option<PathBuf>) -> std::io::Result<Self> {
        let keys = Self {
            fixed: fixed.into_iter().filter(|k| !k.is_empty()).collect(),
            file,
            from_file: Mutex::new(FileKeys::default()),
        };
        if let Some(path) = &keys.file {
            let (text, modified) = read(path)?;
            let mut f = keys.from_file.lock().expect("keys lock");
            f.keys = parse(&text);
            f.modified = modified;
            f.checked = Some(Instant::now());
        }
        Ok(keys)
    }

    /// Whether any key is required.
    pub fn required(&self) -> bool {
        self.file.is_some() || !self.fixed.is_empty()
    }

    /// Whether `given` is one of the keys (the key file read again first if it changed).
    pub fn allows(&self, given: &str) -> bool {
        let mut f = self.from_file.lock().expect("keys lock");
        if let Some(path) = &self.file {
            if f.checked.is_none_or(|t| t.elapsed() >= RECHECK_EVERY) {
                f.checked = Some(Instant::now());
                let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
                if modified.is_none() || modified != f.modified {
                    match read(path) {
                        Ok((text, modified)) => {
                            f.keys = parse(&text);
                            f.modified = modified;
                            tracing::info!(path = %path.display(), keys = f.keys.len(), "API key file read");
                        }
                        Err(e) => tracing::warn!(
                            path = %path.display(),
                            "cannot read the API key file ({e}); keeping the keys read before"
                        ),
                    }
                }
            }
        }
        let keys = self.fixed.iter().chain(&f.keys).map(String::as_str);
        secret::matches_any(keys, given)
    }
}

/// A key file's text and modification time, refusing one too large to be a key list.
fn read(path: &std::path::Path) -> std::io::Result<(String, Option<SystemTime>)> {
    let meta = std::fs::metadata(path)?;
    if meta.len() > KEY_FILE_MAX_BYTES {
        return Err(std::io::Error::other(format!(
            "larger than {KEY_FILE_MAX_BYTES} bytes"
        )));
    }
    Ok((std::fs::read_to_string(path)?, meta.modified().ok()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_keys_and_a_key_file_that_changes() {
        let dir = std::env::temp_dir().join(format!("expertmesh-keys-{}", secret::random_token()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("keys");
        std::fs::write(&file, "# team a\nalpha\n\n  beta  \n").unwrap();
        let keys = ApiKeys::new(vec!["fixed".into(), String::new()], Some(file.clone())).unwrap();
        assert!(keys.required());
        for k in ["fixed", "alpha", "beta"] {
            assert!(keys.allows(k), "{k}");
        }
        for k in ["", "# team a", "gamma", "alph"] {
            assert!(!keys.allows(k), "{k}");
        }
        // beta revoked, gamma added: seen once the file's time changes and a second passed.
        std::fs::write(&file, "alpha\ngamma\n").unwrap();
        let later = SystemTime::now() + Duration::from_secs(5);
        std::fs::File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_modified(later)
            .unwrap();
        keys.from_file.lock().unwrap().checked = None;
        assert!(keys.allows("gamma") && !keys.allows("beta") && keys.allows("fixed"));
        // A file gone: the keys read before stay.
        std::fs::remove_file(&file).unwrap();
        keys.from_file.lock().unwrap().checked = None;
        assert!(keys.allows("gamma"));
        assert!(format!("{keys:?}").contains("fixed: 1") && !format!("{keys:?}").contains("alpha"));
        assert!(ApiKeys::new(Vec::new(), Some(dir.join("missing"))).is_err());
        assert!(!ApiKeys::new(Vec::new(), None).unwrap().required());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
