//! `proxy-agent`: run the node agent, inspect or remove its datapath.
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use proxy_agent::dataplane::maps::Maps;
use proxy_agent::list;
use proxy_agent::loader::{self, MapSizes};
use proxy_agent::run::{self, RunConfig, SourceConfig};
use proxy_agent::source::kube::WatchSettings;
use proxy_common::map_sizes;

#[derive(Parser)]
#[command(
    version,
    about = "eBPF service proxy for Kubernetes nodes (a kube-proxy replacement)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct PinDir {
    /// Where the maps and links are pinned (on bpffs).
    #[arg(long, default_value = "/sys/fs/bpf/proxy-agent")]
    bpf_dir: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Load the datapath (or adopt the running one) and keep its maps in sync with the Services.
    Run(RunArgs),
    /// Print what the pinned maps hold: each frontend with its backends, the conntrack
    /// entries, or the session-affinity entries.
    List(ListArgs),
    /// Detach the datapath from every device and remove its pins (drops connection state).
    Uninstall(PinDir),
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum View {
    Services,
    Conntrack,
    Affinity,
}

#[derive(Args)]
struct ListArgs {
    #[arg(value_enum, default_value = "services")]
    view: View,
    /// One JSON document instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    pins: PinDir,
}

#[derive(Args)]
struct RunArgs {
    /// Read Services and EndpointSlices from this directory of YAML manifests (re-read when a
    /// file changes) instead of the Kubernetes API.
    #[arg(long, conflicts_with = "kubeconfig")]
    manifests: Option<PathBuf>,
    /// Kubeconfig for the Kubernetes API (default: $KUBECONFIG, ~/.kube/config, or the
    /// in-cluster service account).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Seconds after which the API server ends each watch; a watch silent for this plus 5 s is
    /// taken for dead and replaced.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u32).range(1..))]
    watch_timeout_seconds: u32,
    /// Uplink devices, comma-separated (default: the device of the default route). Every veth
    /// is served as well.
    #[arg(long, value_delimiter = ',')]
    devices: Option<Vec<String>>,
    /// This node's name, as EndpointSlices' `nodeName` says it (default: the host name).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    #[command(flatten)]
    pins: PinDir,
    /// Where Prometheus metrics are served (GET /metrics).
    #[arg(long, default_value = "127.0.0.1:10249")]
    metrics_address: std::net::SocketAddr,
    /// Source address of hairpin flows (a pod reaching itself through its Service).
    #[arg(long, default_value = "169.254.42.1")]
    hairpin_address: Ipv4Addr,
    /// Capacity of the frontend map.
    #[arg(long, default_value_t = map_sizes::SERVICES, value_parser = clap::value_parser!(u32).range(1..))]
    map_size_services: u32,
    /// Capacity of the backend map (the slot map gets twice as many entries).
    #[arg(long, default_value_t = map_sizes::BACKENDS, value_parser = clap::value_parser!(u32).range(1..))]
    map_size_backends: u32,
    /// Capacity of the connection-tracking map (LRU: the oldest flows make room).
    #[arg(long, default_value_t = map_sizes::CONNTRACK, value_parser = clap::value_parser!(u32).range(1..))]
    map_size_conntrack: u32,
    /// Capacity of the session-affinity map (LRU).
    #[arg(long, default_value_t = map_sizes::AFFINITY, value_parser = clap::value_parser!(u32).range(1..))]
    map_size_affinity: u32,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match execute(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}

fn execute(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run(args) => {
            let node_name = match args.node_name {
                Some(name) => name,
                None => nix::unistd::gethostname()?.to_string_lossy().into_owned(),
            };
            // One thread is plenty: the work is a sync now and then, and map writes are syscalls.
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let source = match args.manifests {
                Some(dir) if !dir.is_dir() => {
                    anyhow::bail!("--manifests: {} is not a directory", dir.display())
                }
                Some(dir) => SourceConfig::Manifests(dir),
                None => SourceConfig::Kube {
                    client: runtime.block_on(kube_client(
                        args.kubeconfig.as_deref(),
                        args.watch_timeout_seconds,
                    ))?,
                    watch: WatchSettings {
                        timeout_s: args.watch_timeout_seconds,
                    },
                },
            };
            let config = RunConfig {
                source,
                uplinks: args.devices,
                node_name,
                bpf_dir: args.pins.bpf_dir,
                hairpin_address: args.hairpin_address,
                metrics_address: args.metrics_address,
                map_sizes: MapSizes {
                    services: args.map_size_services,
                    backends: args.map_size_backends,
                    conntrack: args.map_size_conntrack,
                    affinity: args.map_size_affinity,
                },
            };
            runtime.block_on(run::run(config))
        }
        Command::List(args) => {
            let dir = &args.pins.bpf_dir;
            let out = match args.view {
                View::Services => {
                    let rows = list::frontends(&Maps::open_pinned(dir)?.read()?);
                    if args.json {
                        serde_json::to_string_pretty(&rows)?
                    } else {
                        list::render(&rows)
                    }
                }
                View::Conntrack => {
                    let rows = list::flows(dir)?;
                    if args.json {
                        serde_json::to_string_pretty(&rows)?
                    } else {
                        list::render_flows(&rows)
                    }
                }
                View::Affinity => {
                    let rows = list::affinities(dir)?;
                    if args.json {
                        serde_json::to_string_pretty(&rows)?
                    } else {
                        list::render_affinities(&rows)
                    }
                }
            };
            println!("{}", out.trim_end());
            Ok(())
        }
        Command::Uninstall(pins) => {
            let removed = loader::uninstall(&pins.bpf_dir)?;
            println!(
                "removed {} pins under {}",
                removed.len(),
                pins.bpf_dir.display()
            );
            Ok(())
        }
    }
}

/// A client for the API named by `--kubeconfig`, or found the usual way. Failing to find one is
/// an error that says how to give one; whether the API answers is checked when the watch starts.
///
/// Reads time out after the watch timeout plus 5 s, the same bound kube-runtime puts on a silent
/// watch stream: it also catches a watch request whose answer never starts, which the watcher's
/// own idle timer does not see.
async fn kube_client(
    kubeconfig: Option<&std::path::Path>,
    watch_timeout_s: u32,
) -> anyhow::Result<kube::Client> {
    const HOW: &str = "give --kubeconfig FILE (or set KUBECONFIG), run in a pod with a service \
                       account, or read manifests with --manifests DIR";
    let config = match kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .map_err(|error| anyhow::anyhow!("--kubeconfig {}: {error}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .map_err(|error| anyhow::anyhow!("--kubeconfig {}: {error}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|error| anyhow::anyhow!("no Kubernetes API configured ({error}): {HOW}"))?,
    };
    let mut config = config;
    config.read_timeout = Some(std::time::Duration::from_secs(
        u64::from(watch_timeout_s) + 5,
    ));
    // Count from each request, not from when a pooled connection went idle.
    config.reset_reader_on_write = true;
    let url = config.cluster_url.clone();
    kube::Client::try_from(config)
        .map_err(|error| anyhow::anyhow!("a client for {url}: {error}: {HOW}"))
}
