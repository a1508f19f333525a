//! Downloads models from a Hugging Face hub and installs them into the node's model
//! repository, treating the hub, its CDNs and the operator's input as hostile.
//!
//! - [`ModelRef`] parses what an operator names: a hub id (`org/name`) with a revision, or a
//!   local path under an allowed root.
//! - [`HubClient`] speaks the hub's HTTP protocol (hyper + rustls): it resolves a revision to a
//!   [`Manifest`] whose every server-supplied value is validated, and downloads files with
//!   resume, size enforcement and SHA-256 verification, following redirects only to allowed
//!   hosts.
//! - [`Installer`] checks free disk space, downloads into a hidden partial area, stages,
//!   fsyncs and renames into place, so a model is either fully installed or absent; concurrent
//!   loads of one model and commit share one download. With a [`seal::SealSigner`], every
//!   install is sealed (a signed list of its files and their SHA-256) before it is renamed
//!   into place, so the sidecar that copies models to the backend (`edgeroute watch`) can
//!   install only what this installer wrote.
//!
//! This crate does not serve HTTP, keep model state (loaded, serving), or read the
//! environment: the node does. It never loads pickle-based formats.

mod client;
mod config;
mod error;
mod filter;
mod install;
mod manifest;
mod model_ref;
mod progress;
pub mod seal;

pub use client::HubClient;
pub use config::{DEFAULT_ENDPOINT, HubConfig};
pub use error::HubError;
pub use filter::{DEFAULT_PATTERNS, FileFilter, is_pickle, layout_problem};
pub use install::{
    DiskProbe, InstallHandle, Installed, InstalledModel, Installer, InstallerConfig, StatvfsProbe,
    check_local,
};
pub use manifest::{FileEntry, Manifest, RepoPath};
pub use model_ref::{Commit, DEFAULT_REVISION, HubId, HubModel, LocalModel, ModelRef, Revision};
pub use progress::{FileProgress, Phase, Progress};
pub use seal::{Seal, SealError, SealSigner, SealVerifier, SealedFile, seal_dir, verify_dir};
