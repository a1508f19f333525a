//! `edgeroute bus credentials`: a NATS identity for one node, discovery replica or policy
//! admin.
//!
//! Writes the user's NKey seed to `<out>/<name>.nk` (mode 0600, never overwritten: the `[bus]`
//! table's `nkey_seed_file`) and its `users` entry for `deploy/nats/nats-server.conf` to
//! `<out>/<name>.user.conf`, and prints that entry. Key generation and the permissions are
//! `edgeroute_bus::credentials`'s; this only reads arguments and writes files.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use edgeroute_bus::BusConfig;
use edgeroute_bus::credentials::{self, Role, UserKey};

#[derive(Subcommand, Debug)]
pub enum BusCommand {
    /// Generate a bus user for a node (publishes only its own subject and KV key), a
    /// discovery replica (reads the topology, publishes none of it), a policy admin, or a
    /// regional router replica (shares ejections and job wake-ups with the other replicas).
    Credentials(CredentialsArgs),
}

#[derive(Args, Debug)]
pub struct CredentialsArgs {
    /// The node id the user speaks for.
    #[arg(long, requires = "region", conflicts_with = "discovery")]
    node: Option<String>,
    /// The node's region (its subject is `<prefix>.<region>.<node>`).
    #[arg(long)]
    region: Option<String>,
    /// A discovery replica's name (a read-only user, which may also watch the routing policy
    /// and acknowledge it).
    #[arg(
        long,
        required_unless_present_any = ["node", "admin", "router"],
        conflicts_with_all = ["admin", "router"]
    )]
    discovery: Option<String>,
    /// A policy admin's name: may put the routing policy (`edgeroute policy push`) and read
    /// the replicas' acknowledgements; nothing of the topology.
    #[arg(long, conflicts_with_all = ["node", "router"])]
    admin: Option<String>,
    /// A regional router replica's name (its `[router] id`): may publish and subscribe on the
    /// replicas' ejection-sharing subject and the job wake-up subjects; nothing of the
    /// topology or the policy.
    #[arg(long, conflicts_with = "node")]
    router: Option<String>,
    /// Directory for `<name>.nk` (the seed) and `<name>.user.conf` (the server's entry).
    #[arg(long)]
    out: PathBuf,
    /// As the `[bus]` table's `subject_prefix`.
    #[arg(long, default_value = "edgeroute.topology")]
    subject_prefix: String,
    /// As the `[bus]` table's `bucket`.
    #[arg(long, default_value = "edgeroute_nodes")]
    bucket: String,
}

pub fn run(command: BusCommand) -> Result<()> {
    match command {
        BusCommand::Credentials(args) => {
            let written = credentials_files(&args)?;
            eprintln!(
                "edgeroute: seed written to {} (mode 0600): set [bus] nkey_seed_file to it; add \
                 the entry below to the users list of deploy/nats/users.conf and reload nats-server",
                written.seed_file.display()
            );
            print!("{}", written.block);
            Ok(())
        }
    }
}

/// What [`credentials_files`] wrote.
#[derive(Debug)]
pub struct Written {
    pub seed_file: PathBuf,
    pub block: String,
}

/// Generates the user `args` describe and writes its two files.
pub fn credentials_files(args: &CredentialsArgs) -> Result<Written> {
    let cfg = BusConfig {
        subject_prefix: args.subject_prefix.clone(),
        bucket: args.bucket.clone(),
        ..BusConfig::default()
    };
    cfg.validate()?;
    let (name, role, label) = match (&args.node, &args.region, &args.discovery) {
        (None, _, None) if args.router.is_some() => {
            let name = args.router.clone().unwrap_or_default();
            edgeroute_bus::wire::check_token("router name", &name)?;
            (name.clone(), Role::Router, format!("router replica {name}"))
        }
        (None, _, None) if args.admin.is_some() => {
            let name = args.admin.clone().unwrap_or_default();
            edgeroute_bus::wire::check_token("admin name", &name)?;
            (name.clone(), Role::Admin, format!("policy admin {name}"))
        }
        (Some(node), Some(region), None) => (
            node.clone(),
            Role::Node { node_id: node.clone(), region: region.clone() },
            format!("node {node} (region {region})"),
        ),
        (None, _, Some(name)) => {
            edgeroute_bus::wire::check_token("discovery name", name)?;
            (name.clone(), Role::Discovery, format!("discovery replica {name}"))
        }
        _ => anyhow::bail!(
            "give --node ID --region R, --discovery NAME, --admin NAME or --router NAME"
        ),
    };
    let perms = credentials::permissions(&cfg, &role)?;
    let key = UserKey::generate()?;
    let block = credentials::user_block(&label, &key.public_key, &perms);
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let seed_file = args.out.join(format!("{name}.nk"));
    write_new(&seed_file, key.seed().as_bytes(), 0o600)?;
    let conf = args.out.join(format!("{name}.user.conf"));
    std::fs::write(&conf, &block).with_context(|| format!("writing {}", conf.display()))?;
    Ok(Written { seed_file, block })
}

/// Creates `path` with `mode` (never replacing a file: an existing seed may be in use).
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options
        .open(path)
        .with_context(|| format!("creating {} (it must not exist yet)", path.display()))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("edgeroute-bus-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn args(out: &Path) -> CredentialsArgs {
        CredentialsArgs {
            node: Some("tor-1".into()),
            region: Some("ca_east".into()),
            discovery: None,
            admin: None,
            router: None,
            out: out.to_owned(),
            subject_prefix: "edgeroute.topology".into(),
            bucket: "edgeroute_nodes".into(),
        }
    }

    #[test]
    fn a_node_gets_a_private_seed_and_a_block_naming_only_its_subjects() {
        let out = scratch("node");
        let written = credentials_files(&args(&out)).unwrap();
        let seed = std::fs::read_to_string(&written.seed_file).unwrap();
        credentials::check_user_seed(&seed).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&written.seed_file).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(
            written.block.contains("\"edgeroute.topology.ca_east.tor-1\""),
            "{}",
            written.block
        );
        assert!(written.block.contains("\"$KV.edgeroute_nodes.tor-1\""));
        assert!(!written.block.contains(&seed));
        let conf = std::fs::read_to_string(out.join("tor-1.user.conf")).unwrap();
        assert_eq!(conf, written.block);
        // Never overwrites a seed.
        assert!(credentials_files(&args(&out)).is_err());
        std::fs::remove_dir_all(out).unwrap();
    }

    #[test]
    fn a_discovery_user_and_bad_names() {
        let out = scratch("disc");
        let disc = CredentialsArgs {
            node: None,
            region: None,
            discovery: Some("disc-1".into()),
            ..args(&out)
        };
        let written = credentials_files(&disc).unwrap();
        assert!(written.block.contains("\"edgeroute.topology.>\""));
        let bad = CredentialsArgs { node: Some("a.*".into()), ..args(&out) };
        assert!(credentials_files(&bad).is_err());
        let admin =
            CredentialsArgs { node: None, region: None, admin: Some("ops".into()), ..args(&out) };
        let written = credentials_files(&admin).unwrap();
        assert!(written.block.contains("\"$KV.edgeroute_policy.current\""), "{}", written.block);
        assert!(!written.block.contains("topology"), "{}", written.block);
        let router = CredentialsArgs {
            node: None,
            region: None,
            router: Some("router-tor".into()),
            ..args(&out)
        };
        let written = credentials_files(&router).unwrap();
        assert!(written.block.contains("\"edgeroute.router.ejections\""), "{}", written.block);
        assert!(!written.block.contains("topology"), "{}", written.block);
        assert!(out.join("router-tor.nk").exists());
        std::fs::remove_dir_all(out).unwrap();
    }
}
