//! Progress of one install, published on a `tokio::sync::watch` channel so that any number of
//! callers (the one that started the install and any that joined it) see the latest state
//! without queueing every update.

use serde::Serialize;

/// Where an install is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Checking what is already present and the free disk space.
    #[default]
    Preparing,
    /// Fetching files from the hub.
    Downloading,
    /// Staging, verifying the layout, syncing and renaming into place.
    Installing,
    /// Installed (or was already).
    Done,
    /// Stopped with an error (the handle's result says which); nothing was installed.
    Failed,
}

/// Bytes of one file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FileProgress {
    pub path: String,
    pub done_bytes: u64,
    pub total_bytes: u64,
}

/// The whole install: per file and overall.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Progress {
    pub phase: Phase,
    pub files: Vec<FileProgress>,
    pub done_bytes: u64,
    pub total_bytes: u64,
}

impl Progress {
    pub(crate) fn set_file(&mut self, index: usize, done: u64) {
        if let Some(f) = self.files.get_mut(index) {
            self.done_bytes = self.done_bytes - f.done_bytes + done;
            f.done_bytes = done;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overall_follows_files() {
        let mut p = Progress {
            files: vec![
                FileProgress { path: "a".into(), done_bytes: 0, total_bytes: 10 },
                FileProgress { path: "b".into(), done_bytes: 0, total_bytes: 5 },
            ],
            total_bytes: 15,
            ..Default::default()
        };
        p.set_file(0, 7);
        p.set_file(1, 5);
        assert_eq!(p.done_bytes, 12);
        // A restart from zero takes the overall count back too.
        p.set_file(0, 0);
        assert_eq!(p.done_bytes, 5);
        p.set_file(9, 1);
        assert_eq!(p.done_bytes, 5);
    }
}
