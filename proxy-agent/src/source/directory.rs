//! A manifest directory as a live source: notices when its files change and reloads them whole.
//! Parsing is [`super::manifests`]'s job.
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use super::manifests::{self, LoadError};
use crate::model::Store;

/// How often the directory is checked for changes.
const POLL: Duration = Duration::from_millis(500);

type Fingerprint = Vec<(PathBuf, u64, Option<SystemTime>)>;

pub struct ManifestDir {
    dir: PathBuf,
    fingerprint: Option<Fingerprint>,
    store: Store,
    errors: Vec<LoadError>,
    /// Reloaded since [`ManifestDir::take_reloaded`].
    reloaded: bool,
}

impl ManifestDir {
    /// Reads the directory once; a directory that cannot be listed is an error.
    pub fn open(dir: PathBuf) -> anyhow::Result<ManifestDir> {
        let mut source = ManifestDir {
            dir,
            fingerprint: None,
            store: Store::default(),
            errors: Vec::new(),
            reloaded: false,
        };
        source.reload()?;
        Ok(source)
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn reloaded(&self) -> bool {
        self.reloaded
    }

    pub fn take_reloaded(&mut self) -> bool {
        std::mem::take(&mut self.reloaded)
    }

    /// Documents and files that could not be read, from the last reload.
    pub fn errors(&self) -> &[LoadError] {
        &self.errors
    }

    /// Waits until a file changed, then reloads the directory.
    pub async fn next_change(&mut self) -> anyhow::Result<()> {
        let mut poll = tokio::time::interval(POLL);
        loop {
            poll.tick().await;
            if self.read_fingerprint() != self.fingerprint {
                return self.reload();
            }
        }
    }

    fn reload(&mut self) -> anyhow::Result<()> {
        self.fingerprint = self.read_fingerprint();
        let loaded = manifests::load_dir(&self.dir)?;
        self.store = loaded.store;
        self.errors = loaded.errors;
        self.reloaded = true;
        Ok(())
    }

    /// Name, size and modification time of every file: a cheap test that catches every edit
    /// (also the write-to-temp-then-rename that editors and `kubectl`-style tools do).
    fn read_fingerprint(&self) -> Option<Fingerprint> {
        let mut files: Vec<_> = std::fs::read_dir(&self.dir)
            .ok()?
            .filter_map(Result::ok)
            .filter_map(|entry| {
                let metadata = entry.metadata().ok()?;
                Some((entry.path(), metadata.len(), metadata.modified().ok()))
            })
            .collect();
        files.sort();
        Some(files)
    }
}
