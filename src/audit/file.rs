//! The `file` sink: JSON lines appended to a file, one write per batch. The file is
//! reopened at the first write after a SIGHUP, so logrotate can move it away.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

pub struct FileWriter {
    path: Arc<PathBuf>,
    file: Option<File>,
    /// Bumped on SIGHUP.
    reopen: Arc<AtomicU64>,
    /// The reopen generation the open file belongs to.
    generation: u64,
}

impl FileWriter {
    pub fn new(path: PathBuf, reopen: &Arc<AtomicU64>) -> FileWriter {
        FileWriter {
            path: Arc::new(path),
            file: None,
            reopen: reopen.clone(),
            generation: 0,
        }
    }

    /// Appends one batch (already JSON lines). After a failure the file is reopened next time.
    pub async fn write(&mut self, lines: Vec<u8>) -> std::io::Result<()> {
        let generation = self.reopen.load(Relaxed);
        let file = self.file.take().filter(|_| generation == self.generation);
        self.generation = generation;
        let path = self.path.clone();
        let file = super::sink::blocking(move || {
            let mut file = match file {
                Some(file) => file,
                None => OpenOptions::new().create(true).append(true).open(&*path)?,
            };
            file.write_all(&lines)?;
            Ok(file)
        })
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", self.path.display())))?;
        self.file = Some(file);
        Ok(())
    }
}
