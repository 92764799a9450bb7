//! The benchmark report: its numbers, the Markdown table people read and the JSON that tools read.
//!
//! Everything here is pure (no clock, no I/O except [`write`]), so the rendering and the
//! percentiles are unit-tested. Durations are kept in whole microseconds and sizes in bytes, in
//! the JSON too: integers survive any JSON reader exactly, and the table does the rounding.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;

const MIB: u64 = 1024 * 1024;

/// One run of `cargo xtask bench`.
#[derive(Debug, Serialize)]
pub struct Report {
    /// When the run finished, RFC 3339 UTC.
    pub date: String,
    pub machine: Machine,
    /// `--quick`: fewer Services and samples, for a check that the benchmark works.
    pub quick: bool,
    /// The targets, shown next to the figures, never asserted.
    pub targets: Targets,
    /// Scenarios S1 and S2 and the replicas' load times.
    pub data_plane: DataPlane,
    /// Scenario S3, one entry per Service count.
    pub control_plane: Vec<ControlPlane>,
}

#[derive(Debug, Serialize)]
pub struct Machine {
    /// CPUs this process may run on (what `nproc` prints).
    pub cpus: usize,
    pub cpu_model: String,
    /// `uname -r`.
    pub kernel: String,
}

#[derive(Debug, Serialize)]
pub struct Targets {
    /// The Service count the targets are stated at.
    pub services: u32,
    /// Programming that many Services × 10 endpoints from empty.
    pub program_us: u64,
    pub change_p99_us: u64,
    pub agent_rss_bytes: u64,
}

/// The targets: 10,000 Services × 10 endpoints programmed in < 2 s, endpoint changes
/// applied with p99 < 50 ms, the agent under 150 MiB.
pub const TARGETS: Targets = Targets {
    services: 10_000,
    program_us: 2_000_000,
    change_p99_us: 50_000,
    agent_rss_bytes: 150 * MIB,
};

/// Who translates a connection to the ClusterIP (or, for `Direct`, that nothing does).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// To a pod's own address: no Service, nothing loaded in the node.
    Direct,
    /// This project's agent.
    Proxy,
    /// The replica of kube-proxy's iptables mode (`proxy_testbed::baselines::iptables`).
    Iptables,
    /// The replica of kube-proxy's nftables mode (`proxy_testbed::baselines::nftables`).
    Nftables,
}

impl Mode {
    /// In the order they run and are shown; direct first, the others' ratios are to it.
    pub const ALL: [Mode; 4] = [Mode::Direct, Mode::Proxy, Mode::Iptables, Mode::Nftables];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct pod IP",
            Mode::Proxy => "this proxy (eBPF)",
            Mode::Iptables => "iptables replica",
            Mode::Nftables => "nftables replica",
        }
    }
}

/// Scenarios S1 and S2 and the replicas' load times (see the data_plane module).
#[derive(Debug, PartialEq, Serialize)]
pub struct DataPlane {
    /// How many times each mode was measured, interleaved (2: ABAB).
    pub rounds: usize,
    /// wrk's `-d` of each measured run.
    pub duration_s: u32,
    /// The kernel interface `iptables-restore` programs: `nf_tables` or `legacy`.
    pub iptables_backend: String,
    /// S1, one entry per Service count and mode.
    pub connections: Vec<ConnectionRate>,
    /// S2, one entry per mode.
    pub latency: Vec<EstablishedLatency>,
    /// One entry per S1 Service count.
    pub load: Vec<LoadTime>,
}

impl DataPlane {
    /// S1's heading, in the report and on its chart.
    pub const S1_TITLE: &str = "S1 new connections per second through a ClusterIP";

    /// S2's heading, in the report and on its chart.
    pub fn s2_title(&self) -> String {
        let services = self.latency.first().map_or(0, |row| row.services);
        format!(
            "S2 request latency on established connections, {} Services",
            thousands(services.into())
        )
    }

    /// The wrk command line of S1's measured runs (the data_plane module runs it).
    pub fn s1_command(&self) -> String {
        format!("wrk -t2 -c32 -d{}s -H 'Connection: close'", self.duration_s)
    }

    /// The wrk command line of S2's measured runs.
    pub fn s2_command(&self) -> String {
        format!("wrk -t1 -c4 -d{}s --latency", self.duration_s)
    }
}

/// One wrk run.
#[derive(Debug, PartialEq, Serialize)]
pub struct WrkRun {
    /// wrk's `Requests/sec`.
    pub requests_per_s: f64,
    /// Socket errors (connect, read, write, timeout) and non-2xx/3xx answers wrk counted.
    pub errors: u64,
    /// With `--latency`: wrk's 50 % and 99 % latencies.
    pub p50_ns: Option<u64>,
    pub p99_ns: Option<u64>,
}

/// S1 at one Service count in one mode: new connections (`Connection: close` requests) per second.
#[derive(Debug, PartialEq, Serialize)]
pub struct ConnectionRate {
    pub services: u32,
    pub mode: Mode,
    pub min_per_s: f64,
    pub median_per_s: f64,
    /// `median_per_s` over direct's at the same Service count.
    pub vs_direct: f64,
    /// In the order taken.
    pub runs: Vec<WrkRun>,
}

/// S2 in one mode: latency of requests on 4 kept-alive connections.
#[derive(Debug, PartialEq, Serialize)]
pub struct EstablishedLatency {
    pub services: u32,
    pub mode: Mode,
    /// The median over the runs of wrk's p50, and of its p99.
    pub p50_ns: u64,
    pub p99_ns: u64,
    /// Over direct's: above 1 is slower.
    pub p50_vs_direct: f64,
    pub p99_vs_direct: f64,
    pub runs: Vec<WrkRun>,
}

/// Loading N Services, once per S1 run of the mode, in the order taken.
#[derive(Debug, PartialEq, Serialize)]
pub struct LoadTime {
    pub services: u32,
    /// `iptables-restore` of the whole `nat` table.
    pub iptables_us: Vec<u64>,
    /// `nft -f` of the table `ip kube-proxy`.
    pub nftables_us: Vec<u64>,
    /// `elapsed_us` of the agent's first `synced` line.
    pub agent_sync_us: Vec<u64>,
}

/// The median of `values`: the middle one, or the mean of the two middle ones. NaN if empty.
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => sorted[n / 2],
        _ => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// `value / reference`, NaN (shown as `-`) when there is no reference to divide by.
pub fn ratio(value: f64, reference: f64) -> f64 {
    if reference > 0.0 {
        value / reference
    } else {
        f64::NAN
    }
}

/// Scenario S3 at one Service count.
#[derive(Debug, PartialEq, Serialize)]
pub struct ControlPlane {
    pub services: u32,
    pub endpoints_per_service: u32,
    /// `elapsed_us` of the agent's first `synced` line: planning and writing the maps from empty,
    /// as the agent measures it (listing and compiling come before; see the control_plane module).
    pub first_sync_us: u64,
    /// Map writes of that first sync.
    pub first_sync_writes: u64,
    /// From spawning the agent to the first connection to the measured ClusterIP that a pod
    /// answered: load, list, compile, sync, attach, as a user would see it.
    pub spawn_to_first_answer_us: u64,
    /// From just before an EndpointSlice change is stored in the API server to the first
    /// connection answered by the new pod.
    pub change_latency: Latency,
    /// `VmRSS` of the agent once everything is programmed.
    pub agent_rss_bytes: u64,
    /// `VmHWM`: the agent's peak resident size up to then (the initial list and sync).
    pub agent_peak_rss_bytes: u64,
    /// Sum of `memlock` over the agent's pinned maps.
    pub bpf_map_bytes: u64,
}

#[derive(Debug, PartialEq, Serialize)]
pub struct Latency {
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
    /// Every sample, in the order taken.
    pub samples_us: Vec<u64>,
}

impl Latency {
    /// # Panics
    ///
    /// If `samples_us` is empty: a scenario always takes at least one sample.
    pub fn from_samples(samples_us: Vec<u64>) -> Latency {
        let mut sorted = samples_us.clone();
        sorted.sort_unstable();
        Latency {
            p50_us: percentile(&sorted, 50),
            p99_us: percentile(&sorted, 99),
            max_us: percentile(&sorted, 100),
            samples_us,
        }
    }
}

/// The nearest-rank percentile of `sorted` (ascending): the smallest sample that at least
/// `percent` % of the samples are less than or equal to. Always a sample that was taken, never an
/// interpolation; with fewer than 100 samples, p99 is the maximum.
///
/// # Panics
///
/// If `sorted` is empty.
pub fn percentile(sorted: &[u64], percent: u32) -> u64 {
    assert!(!sorted.is_empty(), "percentile of no samples");
    let n = sorted.len();
    // ceil(percent / 100 * n), in integers so that p50 of 10 samples is exactly rank 5.
    let rank = (percent as usize * n).div_ceil(100).clamp(1, n);
    sorted[rank - 1]
}

/// The report as Markdown: a heading, the machine, the S3 table with the targets as its last row,
/// and what the columns mean.
pub fn markdown(report: &Report) -> String {
    let Machine {
        cpus,
        cpu_model,
        kernel,
    } = &report.machine;
    let mut out = String::new();
    let mode = if report.quick { ", --quick" } else { "" };
    // Writing to a String cannot fail.
    let _ = writeln!(out, "# cargo xtask bench{mode}\n");
    let _ = writeln!(
        out,
        "{} · {cpus} CPUs ({cpu_model}) · Linux {kernel}\n",
        report.date
    );
    data_plane_markdown(&mut out, &report.data_plane);
    let _ = writeln!(
        out,
        "\n## S3 control plane: N Services × 10 endpoints from a fake API server\n"
    );
    let _ = writeln!(
        out,
        "| Services | sync from empty (agent) | spawn → first answer | change p50 | change p99 | \
         change max | agent RSS | BPF maps |"
    );
    let _ = writeln!(out, "|---:|---:|---:|---:|---:|---:|---:|---:|");
    for row in &report.control_plane {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            thousands(row.services.into()),
            duration(row.first_sync_us),
            duration(row.spawn_to_first_answer_us),
            duration(row.change_latency.p50_us),
            duration(row.change_latency.p99_us),
            duration(row.change_latency.max_us),
            mib(row.agent_rss_bytes),
            mib(row.bpf_map_bytes),
        );
    }
    let t = &report.targets;
    let program = format!("< {}", duration(t.program_us));
    let _ = writeln!(
        out,
        "| target at {} | {program} | {program} | | < {} | | < {} | |",
        thousands(t.services.into()),
        duration(t.change_p99_us),
        mib(t.agent_rss_bytes),
    );
    let mut samples: Vec<String> = report
        .control_plane
        .iter()
        .map(|row| row.change_latency.samples_us.len().to_string())
        .collect();
    samples.dedup();
    let _ = write!(
        out,
        "\n- sync from empty: the agent's own `elapsed_us` for its first sync: planning and writing \
         the maps, not listing or compiling the objects.\n\
         - spawn → first answer: agent start to the first TCP connection to the last Service's \
         ClusterIP answered by a pod (load, list, compile, sync, attach).\n\
         - change: EndpointSlice stored in the API server → first connection answered by the new \
         pod; {} samples per row, nearest-rank percentiles (below 100 samples p99 is the max).\n\
         - BPF maps: `memlock` of the pinned maps; hash maps are preallocated, so this is their \
         capacity, not what the Services fill.\n\
         - The API server is in-process and local: a real one adds its own latency.\n",
        samples.join("/")
    );
    out
}

/// The S1, S2 and load-time tables and what they mean.
fn data_plane_markdown(out: &mut String, data: &DataPlane) {
    let runs = data.rounds;
    let _ = writeln!(
        out,
        "## {}\n\n`{}` from a pod on the node; {runs} run(s) per row, modes interleaved.\n",
        DataPlane::S1_TITLE,
        data.s1_command()
    );
    let _ = writeln!(
        out,
        "| Services | mode | min | median | vs direct | wrk errors |"
    );
    let _ = writeln!(out, "|---:|:---|---:|---:|---:|---:|");
    for row in &data.connections {
        let errors: u64 = row.runs.iter().map(|run| run.errors).sum();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {errors} |",
            thousands(row.services.into()),
            row.mode.name(),
            per_second(row.min_per_s),
            per_second(row.median_per_s),
            times(row.vs_direct),
        );
    }
    let _ = writeln!(
        out,
        "\n## {}\n\n`{}` (keep-alive); median over {runs} run(s) of wrk's percentiles.\n",
        data.s2_title(),
        data.s2_command()
    );
    let _ = writeln!(
        out,
        "| mode | p50 | p99 | p50 vs direct | p99 vs direct | requests/s |"
    );
    let _ = writeln!(out, "|:---|---:|---:|---:|---:|---:|");
    for row in &data.latency {
        let rates: Vec<f64> = row.runs.iter().map(|run| run.requests_per_s).collect();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} |",
            row.mode.name(),
            nanos(row.p50_ns),
            nanos(row.p99_ns),
            times(row.p50_vs_direct),
            times(row.p99_vs_direct),
            per_second(median(&rates)),
        );
    }
    let _ = writeln!(
        out,
        "\n## Loading N Services (median of {runs} load(s))\n\n\
         | Services | iptables-restore ({}) | nft -f | agent first sync |\n|---:|---:|---:|---:|",
        data.iptables_backend
    );
    let middle = |samples: &[u64]| {
        let samples: Vec<f64> = samples.iter().map(|&us| us as f64).collect();
        duration(median(&samples).round() as u64)
    };
    for row in &data.load {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} |",
            thousands(row.services.into()),
            middle(&row.iptables_us),
            middle(&row.nftables_us),
            middle(&row.agent_sync_us),
        );
    }
    let _ = write!(
        out,
        "\n- Every run has its own testbed (fresh node, empty conntrack, one translator). The N \
         Services are the measured one last and N - 1 fillers with 3 endpoints at addresses no \
         pod has; direct goes to one pod, the others to the Service's 3 pods.\n\
         - The replicas are kube-proxy's NAT rules only (no filter chains, NodePorts, \
         firewall): a real kube-proxy node's path is longer, not shorter (see \
         `proxy_testbed::baselines`). In iptables mode the measured Service is last in \
         `KUBE-SERVICES`: the worst case; kube-proxy's order is random.\n\
         - Loads: a full resync of the replica (`iptables-restore`, `nft -f` of the whole \
         table); for the agent its own `elapsed_us` of planning and writing the maps.\n"
    );
}

/// Writes `report.md` and `report.json` into `dir` (created if missing) and returns their paths.
pub fn write(report: &Report, dir: &Path) -> Result<(PathBuf, PathBuf)> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let md = dir.join("report.md");
    let json = dir.join("report.json");
    fs::write(&md, markdown(report)).with_context(|| format!("writing {}", md.display()))?;
    let mut text = serde_json::to_string_pretty(report)?;
    text.push('\n');
    fs::write(&json, text).with_context(|| format!("writing {}", json.display()))?;
    Ok((md, json))
}

/// `12.3 ms` below a second, `1.23 s` from there; three significant digits either way.
fn duration(us: u64) -> String {
    let ms = us as f64 / 1000.0;
    if ms >= 1000.0 {
        format!("{:.2} s", ms / 1000.0)
    } else if ms >= 100.0 {
        format!("{ms:.0} ms")
    } else if ms >= 10.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{ms:.2} ms")
    }
}

/// `12,345/s`.
fn per_second(rate: f64) -> String {
    format!("{}/s", thousands(rate.round() as u64))
}

/// `0.93×`, or `-` for a ratio that could not be taken.
pub(super) fn times(ratio: f64) -> String {
    if ratio.is_finite() {
        format!("{ratio:.2}×")
    } else {
        "-".to_owned()
    }
}

/// `87.5 µs` below a millisecond, [`duration`] from there.
pub(super) fn nanos(ns: u64) -> String {
    if ns < 1_000_000 {
        format!("{:.1} µs", ns as f64 / 1000.0)
    } else {
        duration(ns / 1000)
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / MIB as f64)
}

/// `10000` as `10,000`.
pub(super) fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank_samples() {
        let ten: Vec<u64> = (1..=10).collect();
        assert_eq!(percentile(&ten, 50), 5);
        assert_eq!(percentile(&ten, 99), 10);
        assert_eq!(percentile(&ten, 100), 10);
        assert_eq!(percentile(&ten, 0), 1);
        assert_eq!(percentile(&ten, 10), 1);
        assert_eq!(percentile(&ten, 11), 2);
        let thousand: Vec<u64> = (1..=1000).collect();
        assert_eq!(percentile(&thousand, 99), 990);
        assert_eq!(percentile(&[7], 50), 7);
    }

    #[test]
    fn latency_keeps_the_samples_in_the_order_taken() {
        let latency = Latency::from_samples(vec![30, 10, 20]);
        assert_eq!(
            latency,
            Latency {
                p50_us: 20,
                p99_us: 30,
                max_us: 30,
                samples_us: vec![30, 10, 20],
            }
        );
    }

    #[test]
    fn numbers_read_well() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(30_000), "30,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(duration(420), "0.42 ms");
        assert_eq!(duration(12_345), "12.3 ms");
        assert_eq!(duration(812_400), "812 ms");
        assert_eq!(duration(1_534_000), "1.53 s");
        assert_eq!(mib(150 * MIB), "150.0 MiB");
    }

    fn wrk(requests_per_s: f64, p50_ns: Option<u64>, p99_ns: Option<u64>) -> WrkRun {
        WrkRun {
            requests_per_s,
            errors: 0,
            p50_ns,
            p99_ns,
        }
    }

    fn data_plane() -> DataPlane {
        DataPlane {
            rounds: 2,
            duration_s: 5,
            iptables_backend: "nf_tables".into(),
            connections: vec![ConnectionRate {
                services: 1000,
                mode: Mode::Iptables,
                min_per_s: 9_000.4,
                median_per_s: 9_500.0,
                vs_direct: 0.8,
                runs: vec![wrk(10_000.0, None, None), wrk(9_000.4, None, None)],
            }],
            latency: vec![EstablishedLatency {
                services: 1000,
                mode: Mode::Proxy,
                p50_ns: 87_530,
                p99_ns: 1_250_000,
                p50_vs_direct: 1.1,
                p99_vs_direct: f64::NAN,
                runs: vec![wrk(40_000.0, Some(87_530), Some(1_250_000))],
            }],
            load: vec![LoadTime {
                services: 1000,
                iptables_us: vec![100_000, 200_000],
                nftables_us: vec![350_000],
                agent_sync_us: vec![12_000],
            }],
        }
    }

    #[test]
    fn medians_and_ratios() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0]), 2.5);
        assert!(median(&[]).is_nan());
        assert_eq!(ratio(1.0, 4.0), 0.25);
        assert!(ratio(1.0, 0.0).is_nan());
    }

    #[test]
    fn the_data_plane_tables_have_a_row_per_mode_and_count() {
        let mut table = String::new();
        data_plane_markdown(&mut table, &data_plane());
        assert!(table.contains("| 1,000 | iptables replica | 9,000/s | 9,500/s | 0.80× | 0 |\n"));
        assert!(
            table.contains("| this proxy (eBPF) | 87.5 µs | 1.25 ms | 1.10× | - | 40,000/s |\n")
        );
        assert!(table.contains("| 1,000 | 150 ms | 350 ms | 12.0 ms |\n"));
    }

    #[test]
    fn the_table_has_a_row_per_count_and_the_targets_last() {
        let report = Report {
            date: "2025-01-02T03:04:05Z".into(),
            machine: Machine {
                cpus: 2,
                cpu_model: "Test CPU".into(),
                kernel: "6.18.0".into(),
            },
            quick: false,
            targets: TARGETS,
            data_plane: data_plane(),
            control_plane: vec![ControlPlane {
                services: 10_000,
                endpoints_per_service: 10,
                first_sync_us: 412_000,
                first_sync_writes: 130_000,
                spawn_to_first_answer_us: 1_850_000,
                change_latency: Latency::from_samples(vec![9_000, 11_000, 60_000]),
                agent_rss_bytes: 80 * MIB,
                agent_peak_rss_bytes: 90 * MIB,
                bpf_map_bytes: 101 * MIB + MIB / 2,
            }],
        };
        let table = markdown(&report);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[0], "# cargo xtask bench");
        assert_eq!(
            lines[2],
            "2025-01-02T03:04:05Z · 2 CPUs (Test CPU) · Linux 6.18.0"
        );
        let header = lines
            .iter()
            .position(|line| line.starts_with("| Services | sync from empty"))
            .unwrap();
        assert_eq!(
            lines[header + 2],
            "| 10,000 | 412 ms | 1.85 s | 11.0 ms | 60.0 ms | 60.0 ms | 80.0 MiB | 101.5 MiB |"
        );
        assert_eq!(
            lines[header + 3],
            "| target at 10,000 | < 2.00 s | < 2.00 s | | < 50.0 ms | | < 150.0 MiB | |"
        );
        assert!(table.contains("3 samples per row"));
    }
}
