//! Command-line types only (clap derive). Doc comments are the `--help` text.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "klab",
    version,
    about = "One command from a lab file to a Kubernetes lab on libvirt",
    long_about = "klab reads a declarative lab file (networks, nodes, Kubernetes settings), creates the \
networks and VMs on the hypervisor with static addresses on two NICs, pins every node's SSH host key, and \
removes exactly what it created with `klab down`."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Output format: human text or JSON for scripts.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
    /// More log output (-v info, -vv debug, -vvv trace). RUST_LOG overrides.
    #[arg(long, short = 'v', global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// libvirt connection URI [default: the lab's [host] uri, else qemu:///system].
    #[arg(long, short = 'c', global = true, env = "KLAB_CONNECT")]
    pub connect: Option<String>,
    /// Accelerator: auto (KVM where libvirt offers it), kvm, or qemu (TCG, works everywhere).
    #[arg(long, global = true, env = "KLAB_ACCEL", value_parser = ["auto", "kvm", "qemu"])]
    pub accel: Option<String>,
    /// Directory with template overrides (file names as in network-templates/ and cloud-init/).
    #[arg(long, global = true, env = "KLAB_TEMPLATES")]
    pub templates: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write a lab file from an embedded example (default: `local`, an offline two-node lab).
    Init {
        /// Where to write it.
        #[arg(default_value = "lab.toml")]
        file: PathBuf,
        /// Example to start from (see `klab init --list`).
        #[arg(long, short = 'e', default_value = "local")]
        example: String,
        /// List the embedded examples.
        #[arg(long)]
        list: bool,
        /// Overwrite an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Check a lab file and report every error with file:line:col and a hint.
    Validate {
        /// Lab file.
        #[arg(default_value = "lab.toml")]
        file: PathBuf,
    },
    /// Show what `klab up` would create: networks, volumes, domains, addresses, steps.
    Plan {
        /// Lab file.
        #[arg(default_value = "lab.toml")]
        file: PathBuf,
    },
    /// Write every rendered file (network/domain XML, cloud-init seeds) to a directory for inspection.
    Render {
        /// Lab file.
        #[arg(default_value = "lab.toml")]
        file: PathBuf,
        /// Output directory (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Render exactly what `klab up` would on this host: the lab's generated keys and locally
        /// built images (the output then depends on this machine; default: placeholders).
        #[arg(long)]
        from_state: bool,
    },
    /// Print the JSON Schema of the lab file (for editor validation).
    Schema,
    /// Create or reconcile the lab: networks, volumes, VMs; wait until every node is ready.
    Up(UpArgs),
    /// Remove everything the lab created, and nothing else. Safe to run twice.
    Down(DownArgs),
    /// Show the lab's nodes, their state and addresses.
    Status {
        /// Lab name [default: the lab in ./lab.toml, or the only lab on this host].
        name: Option<String>,
        /// Lab file to take the name from.
        #[arg(long, short = 'f')]
        file: Option<PathBuf>,
        /// A copy of the lab (`klab up --copy NAME`): the same as naming `LAB-NAME`.
        #[arg(long, value_name = "NAME")]
        copy: Option<String>,
    },
    /// List the labs klab knows on this host.
    List,
    /// Open a shell (or run a command) on a node with the lab's key and pinned host key.
    Ssh {
        /// Node name, or LAB/NODE.
        node: String,
        #[command(flatten)]
        lab: SshLab,
        /// Command to run instead of an interactive shell. As with `ssh`, the words are joined
        /// with spaces and run by the remote shell: `klab ssh cp1 -- 'echo $(hostname)'`.
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Print an OpenSSH config block for every node (with a pinned known_hosts file).
    SshConfig {
        /// Lab name [default: the lab in ./lab.toml, or the only lab on this host].
        name: Option<String>,
        /// A copy of the lab (`klab up --copy NAME`): the same as naming `LAB-NAME`.
        #[arg(long, value_name = "NAME")]
        copy: Option<String>,
    },
    /// Check the host: libvirt reachable, KVM usable, bridge/subnet clashes, permissions.
    Doctor {
        /// Also check this lab file's networks against the host.
        #[arg(long, short = 'f')]
        file: Option<PathBuf>,
    },
    /// Manage base images.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Save, list or delete snapshots of a running lab (every node's memory and disk).
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Put every node of the lab back to a snapshot in seconds (default: the one `up --snapshot` took).
    Reset {
        /// Lab name [default: the lab in ./lab.toml, or the only lab on this host].
        name: Option<String>,
        /// A copy of the lab (`klab up --copy NAME`).
        #[arg(long, value_name = "NAME")]
        copy: Option<String>,
        /// The snapshot to go back to.
        #[arg(long, value_name = "SNAPSHOT", default_value = "initial")]
        to: String,
    },
    /// Run the Kubernetes phases again on a lab that is up (what `klab up` does after the VMs).
    Provision(ProvisionArgs),
    /// Print the lab's admin kubeconfig, or merge it into your kubeconfig.
    Kubeconfig(KubeconfigArgs),
}

/// Which lab `klab ssh` reaches.
#[derive(Debug, Clone, Default, Args)]
pub struct SshLab {
    /// Lab name [default: the lab in ./lab.toml, or the only lab on this host].
    #[arg(long, short = 'l')]
    pub lab: Option<String>,
    /// A copy of the lab (`klab up --copy NAME`): the same as naming `LAB-NAME`.
    #[arg(long, value_name = "NAME")]
    pub copy: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Pause every node together, save each one's memory and disk, resume them.
    Save {
        /// Lab name [default: the lab in ./lab.toml, or the only lab on this host].
        name: Option<String>,
        /// Snapshot name.
        #[arg(default_value = "initial")]
        snapshot: String,
        /// A copy of the lab (`klab up --copy NAME`).
        #[arg(long, value_name = "NAME")]
        copy: Option<String>,
    },
    /// The lab's snapshots.
    List {
        /// Lab name [default: the lab in ./lab.toml, or the only lab on this host].
        name: Option<String>,
        /// A copy of the lab.
        #[arg(long, value_name = "NAME")]
        copy: Option<String>,
    },
    /// Delete a snapshot of the lab.
    Delete {
        /// Lab name.
        name: String,
        /// Snapshot name.
        snapshot: String,
        /// A copy of the lab.
        #[arg(long, value_name = "NAME")]
        copy: Option<String>,
    },
}

#[derive(Debug, Args)]
pub struct ProvisionArgs {
    /// Lab name [default: the lab in ./lab.toml, or the only lab on this host].
    pub name: Option<String>,
    /// Take the lab name from this file.
    #[arg(long, short = 'f')]
    pub file: Option<PathBuf>,
    /// A copy of the lab (`klab up --copy NAME`): the same as naming `LAB-NAME`.
    #[arg(long, value_name = "NAME")]
    pub copy: Option<String>,
    /// Run this phase and every later one again, even where the journal has them finished (each
    /// phase's probe still skips work that is in place). `klab plan` lists the phases.
    #[arg(long, value_name = "PHASE")]
    pub from: Option<String>,
    /// Only this node's part of the phases (repeatable); cluster-wide checks still run.
    #[arg(long, value_name = "NODE")]
    pub node: Vec<String>,
    /// Download a Calico release klab has no pinned sha256 for.
    #[arg(long)]
    pub allow_unpinned: bool,
    /// How many nodes work at once in a parallel phase.
    #[arg(long, short = 'j', default_value_t = 4)]
    pub jobs: usize,
}

#[derive(Debug, Args)]
pub struct KubeconfigArgs {
    /// Lab name [default: the lab in ./lab.toml, or the only lab on this host].
    pub name: Option<String>,
    /// Take the lab name from this file.
    #[arg(long, short = 'f')]
    pub file: Option<PathBuf>,
    /// A copy of the lab (`klab up --copy NAME`): the same as naming `LAB-NAME`.
    #[arg(long, value_name = "NAME")]
    pub copy: Option<String>,
    /// Merge into your kubeconfig ($KUBECONFIG's first file, else ~/.kube/config) with a context
    /// named after the lab, made the current context.
    #[arg(long)]
    pub merge: bool,
    /// Print the kubeconfig file's path instead of its content.
    #[arg(long, conflicts_with = "merge")]
    pub path: bool,
}

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Lab file.
    #[arg(default_value = "lab.toml")]
    pub file: PathBuf,
    /// Print the actions without doing them.
    #[arg(long)]
    pub dry_run: bool,
    /// Rebuild this node even though its definition changed (repeatable).
    #[arg(long, value_name = "NODE")]
    pub recreate: Vec<String>,
    /// How many nodes to create and boot at once.
    #[arg(long, short = 'j', default_value_t = 4)]
    pub jobs: usize,
    /// Stop after the VMs: do not build the Kubernetes cluster of a lab with [kubernetes].
    #[arg(long)]
    pub no_kubernetes: bool,
    /// Download a Calico release klab has no pinned sha256 for.
    #[arg(long)]
    pub allow_unpinned: bool,
    /// Bring up a copy of the lab named `<lab>-<NAME>`, with its own subnets from the host's pool,
    /// its own bridges, MACs, keys and cluster (repeatable).
    #[arg(long, value_name = "NAME")]
    pub copy: Vec<String>,
    /// Bring up N copies, named 1 … N (together).
    #[arg(long, value_name = "N", conflicts_with = "copy")]
    pub copies: Option<u16>,
    /// Pool copies take their subnets from [default: [host] subnet-pool, else 10.240.0.0/12].
    #[arg(long, env = "KLAB_SUBNET_POOL", value_name = "CIDR")]
    pub subnet_pool: Option<ipnetwork::Ipv4Network>,
    /// Once the lab is ready, take the snapshot `initial` that `klab reset` goes back to.
    #[arg(long)]
    pub snapshot: bool,
}

#[derive(Debug, Args)]
pub struct DownArgs {
    /// Lab name (works without the lab file).
    pub name: Option<String>,
    /// Take the lab name from this file.
    #[arg(long, short = 'f')]
    pub file: Option<PathBuf>,
    /// Keep the state directory (keys, plan) after removing the lab.
    #[arg(long)]
    pub keep_state: bool,
    /// Print what would be removed without removing it.
    #[arg(long)]
    pub dry_run: bool,
    /// Remove this copy of the lab (`klab up --copy NAME`).
    #[arg(long, value_name = "NAME")]
    pub copy: Option<String>,
    /// Remove every copy of the lab.
    #[arg(long, conflicts_with = "copy")]
    pub all_copies: bool,
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Build a cloud-init-ready image from distribution packages (offline-friendly).
    Build {
        /// Image to build (only `debian-12` for now).
        name: String,
        /// Rebuild even when a built image exists.
        #[arg(long)]
        force: bool,
        /// Add containerd, runc, curl, openssl and keepalived (for provisioner tests).
        #[arg(long)]
        with_containerd: bool,
        /// Debian mirror to bootstrap from.
        #[arg(long, env = "KLAB_DEBIAN_MIRROR")]
        mirror: Option<String>,
    },
    /// List cached images.
    List,
}
