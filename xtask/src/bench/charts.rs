//! The benchmark's charts: `s1-connections.png` and `s2-latency.png`, written next to the report
//! for readers who compare the modes at a glance rather than row by row.
//!
//! - S1: new connections per second against the number of Services (log scale), one line per
//!   mode, so how each translator's cost grows with N is the line's slope.
//! - S2: p50 and p99 per mode at S2's single Service count, as bars in two panels: p99 is often
//!   ten times p50, and one shared axis would flatten the p50 bars.
//!
//! Text is drawn with plotters' `ab_glyph` feature, which needs a font file handed to it (its
//! `ttf` feature would find system fonts through fontconfig and freetype, C libraries the machine
//! would need too): DejaVu Sans from Debian's `fonts-dejavu-core`, which setup installs.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use anyhow::{Context, Result, anyhow};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::register_font;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::report::{DataPlane, EstablishedLatency, Mode, Report, nanos, thousands, times};

pub const S1_FILE: &str = "s1-connections.png";
pub const S2_FILE: &str = "s2-latency.png";
/// Width × height in pixels.
pub const S1_SIZE: (u32, u32) = (1300, 620);
pub const S2_SIZE: (u32, u32) = (1300, 620);

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
const FONT_PACKAGE: &str = "fonts-dejavu-core";
/// The family every text style below names; [`register`] maps it to [`FONT`].
const FAMILY: &str = "sans-serif";
/// The strip under the plot that says how the figures were taken.
const FOOTER_HEIGHT: u32 = 34;
const FOOTNOTE_GREY: RGBColor = RGBColor(90, 90, 90);
// Font sizes in pixels, all even: plotters 0.3.7's ab_glyph backend places each glyph at half the
// size plus its top and truncates, so at odd sizes small glyphs (`.`, `,`) sit a pixel too high.
const TITLE_PX: u32 = 24;
const PANEL_TITLE_PX: u32 = 20;
const AXIS_NAME_PX: u32 = 18;
const TEXT_PX: u32 = 16;
const TICK_PX: u32 = 14;

/// Draws both charts into `dir` (which [`super::report::write`] has created) and returns their
/// paths, S1's first.
pub fn write(report: &Report, dir: &Path) -> Result<(PathBuf, PathBuf)> {
    register()?;
    let s1 = dir.join(S1_FILE);
    let s2 = dir.join(S2_FILE);
    connections(report, &s1).with_context(|| format!("drawing {}", s1.display()))?;
    latency(report, &s2).with_context(|| format!("drawing {}", s2.display()))?;
    Ok((s1, s2))
}

/// Registers [`FONT`] as [`FAMILY`], once per process. plotters keeps a font's bytes for as long
/// as the process runs (`&'static`), so they are leaked on purpose, and only once.
fn register() -> Result<()> {
    static REGISTERED: Mutex<bool> = Mutex::new(false);
    let mut registered = REGISTERED.lock().unwrap_or_else(PoisonError::into_inner);
    if *registered {
        return Ok(());
    }
    let bytes = read_font(Path::new(FONT))?;
    register_font(FAMILY, FontStyle::Normal, bytes.leak())
        .map_err(|_| anyhow!("{FONT} is not a font plotters can read"))?;
    *registered = true;
    Ok(())
}

fn read_font(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).with_context(|| {
        format!(
            "reading the charts' font {} (Debian package {FONT_PACKAGE}; `cargo xtask setup` \
             installs it)",
            path.display()
        )
    })
}

/// S1: the median of each mode's runs at each Service count.
fn connections(report: &Report, path: &Path) -> Result<()> {
    let data = &report.data_plane;
    let root = BitMapBackend::new(path, S1_SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let (plot, footer) = root.split_vertically(S1_SIZE.1 - FOOTER_HEIGHT);
    let max_services = data.connections.iter().map(|row| row.services).max();
    let max_rate = data
        .connections
        .iter()
        .map(|row| row.median_per_s)
        .fold(0.0, f64::max);
    // Some room either side of the outermost counts, so their points are not cut by the axes.
    let x_range = (0.7..f64::from(max_services.unwrap_or(1)) * 1.4).log_scale();
    let mut chart = ChartBuilder::on(&plot)
        .caption(caption(DataPlane::S1_TITLE, report), (FAMILY, TITLE_PX))
        .margin(16)
        .x_label_area_size(56)
        .y_label_area_size(90)
        .build_cartesian_2d(x_range, 0.0..max_rate.max(1.0) * 1.12)?;
    chart
        .configure_mesh()
        .x_desc("Services loaded (log scale)")
        .y_desc("new connections per second (median)")
        .x_label_formatter(&|n| thousands(n.round() as u64))
        .y_label_formatter(&|rate| thousands(rate.round() as u64))
        .label_style((FAMILY, TEXT_PX))
        .axis_desc_style((FAMILY, AXIS_NAME_PX))
        .draw()?;
    for mode in Mode::ALL {
        let points = data
            .connections
            .iter()
            .filter(|row| row.mode == mode)
            .map(|row| (f64::from(row.services), row.median_per_s));
        let style = color(mode).filled().stroke_width(3);
        chart
            .draw_series(LineSeries::new(points, style).point_size(5))?
            .label(mode.name())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 24, y)], style));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerLeft)
        .margin(12)
        .label_font((FAMILY, TEXT_PX))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .draw()?;
    footnote(
        &footer,
        &format!(
            "{} from a pod on the node; {} run(s) per point, modes interleaved · {}",
            data.s1_command(),
            data.rounds,
            machine(report)
        ),
    )?;
    root.present()?;
    Ok(())
}

/// S2: a panel of bars for p50 and one for p99, each on its own axis.
fn latency(report: &Report, path: &Path) -> Result<()> {
    let data = &report.data_plane;
    let root = BitMapBackend::new(path, S2_SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let (plot, footer) = root.split_vertically(S2_SIZE.1 - FOOTER_HEIGHT);
    let plot = plot.titled(&caption(&data.s2_title(), report), (FAMILY, TITLE_PX))?;
    let panels = plot.split_evenly((1, 2));
    let percentiles: [(&str, Percentile); 2] = [
        ("p50 (median)", |row| (row.p50_ns, row.p50_vs_direct)),
        ("p99", |row| (row.p99_ns, row.p99_vs_direct)),
    ];
    for (panel, (name, pick)) in panels.iter().zip(percentiles) {
        latency_panel(panel, name, &data.latency, pick)?;
    }
    footnote(
        &footer,
        &format!(
            "{} (keep-alive) from a pod on the node; median over {} run(s) of wrk's \
             percentiles; × is the ratio to direct · {}",
            data.s2_command(),
            data.rounds,
            machine(report)
        ),
    )?;
    root.present()?;
    Ok(())
}

/// One percentile of an S2 row: nanoseconds, and the ratio to direct's.
type Percentile = fn(&EstablishedLatency) -> (u64, f64);

/// One bar per mode of the percentile `pick` chooses, labelled with its value and ratio.
fn latency_panel(
    area: &DrawingArea<BitMapBackend, Shift>,
    name: &str,
    rows: &[EstablishedLatency],
    pick: Percentile,
) -> Result<()> {
    let micros = |row: &EstablishedLatency| pick(row).0 as f64 / 1000.0;
    let max_us = rows.iter().map(micros).fold(0.0, f64::max);
    // plotters counts an integer range's end in (`0..3` is four segments).
    let last = u32::try_from(rows.len().saturating_sub(1)).context("too many S2 rows")?;
    let mut chart = ChartBuilder::on(area)
        .caption(name, (FAMILY, PANEL_TITLE_PX))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(80)
        // Headroom for the labels above the bars.
        .build_cartesian_2d((0..last).into_segmented(), 0.0..max_us.max(1.0) * 1.15)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(rows.len())
        .x_label_formatter(&|segment| match segment {
            SegmentValue::CenterOf(index) => rows
                .get(*index as usize)
                .map_or_else(String::new, |row| row.mode.name().to_owned()),
            _ => String::new(),
        })
        .y_desc("latency (µs)")
        .y_label_formatter(&|us| thousands(us.round() as u64))
        .label_style((FAMILY, TICK_PX))
        .axis_desc_style((FAMILY, AXIS_NAME_PX))
        .draw()?;
    chart.draw_series(rows.iter().zip(0..).map(|(row, index)| {
        let mut bar = Rectangle::new(
            [
                (SegmentValue::Exact(index), 0.0),
                (SegmentValue::Exact(index + 1), micros(row)),
            ],
            color(row.mode).filled(),
        );
        bar.set_margin(0, 0, 14, 14);
        bar
    }))?;
    let above =
        TextStyle::from((FAMILY, TEXT_PX).into_font()).pos(Pos::new(HPos::Center, VPos::Bottom));
    chart.draw_series(rows.iter().zip(0..).map(|(row, index)| {
        let (ns, vs_direct) = pick(row);
        Text::new(
            format!("{} · {}", nanos(ns), times(vs_direct)),
            (SegmentValue::CenterOf(index), micros(row)),
            above.clone(),
        )
    }))?;
    Ok(())
}

/// `title`, marked when the figures come from `--quick`, which compares nothing.
fn caption(title: &str, report: &Report) -> String {
    if report.quick {
        format!("{title} (--quick: compares nothing)")
    } else {
        title.to_owned()
    }
}

/// The machine and the date, so that a chart shown alone still says where it was measured.
fn machine(report: &Report) -> String {
    let machine = &report.machine;
    format!(
        "{} CPUs ({}), Linux {} · {}",
        machine.cpus, machine.cpu_model, machine.kernel, report.date
    )
}

fn footnote(area: &DrawingArea<BitMapBackend, Shift>, text: &str) -> Result<()> {
    let style = TextStyle::from((FAMILY, TICK_PX).into_font())
        .color(&FOOTNOTE_GREY)
        .pos(Pos::new(HPos::Left, VPos::Center));
    area.draw(&Text::new(
        text.to_owned(),
        (16, FOOTER_HEIGHT as i32 / 2),
        style,
    ))?;
    Ok(())
}

/// One colour per mode, the same in both charts (Okabe and Ito's palette, which readers with
/// colour-blindness tell apart too); direct, the reference, in grey.
fn color(mode: Mode) -> RGBColor {
    match mode {
        Mode::Direct => RGBColor(110, 110, 110),
        Mode::Proxy => RGBColor(0, 114, 178),
        Mode::Iptables => RGBColor(230, 159, 0),
        Mode::Nftables => RGBColor(0, 158, 115),
    }
}

#[cfg(test)]
mod tests {
    use super::super::report::{ConnectionRate, Machine, TARGETS, WrkRun};
    use super::*;

    fn report() -> Report {
        let rate = |mode, services, per_s: f64| ConnectionRate {
            services,
            mode,
            min_per_s: per_s * 0.95,
            median_per_s: per_s,
            vs_direct: 1.0,
            runs: Vec::new(),
        };
        let latency = |mode, p50_ns, p99_ns| EstablishedLatency {
            services: 1000,
            mode,
            p50_ns,
            p99_ns,
            p50_vs_direct: 1.0,
            p99_vs_direct: 1.0,
            runs: vec![WrkRun {
                requests_per_s: 40_000.0,
                errors: 0,
                p50_ns: Some(p50_ns),
                p99_ns: Some(p99_ns),
            }],
        };
        Report {
            date: "2025-01-02T03:04:05Z".into(),
            machine: Machine {
                cpus: 2,
                cpu_model: "Test CPU".into(),
                kernel: "6.18.0".into(),
            },
            quick: false,
            targets: TARGETS,
            data_plane: DataPlane {
                rounds: 2,
                duration_s: 5,
                iptables_backend: "nf_tables".into(),
                connections: [1, 1000, 10_000, 30_000]
                    .into_iter()
                    .flat_map(|n| {
                        let slowdown = f64::from(n) / 30_000.0;
                        [
                            rate(Mode::Direct, n, 21_000.0),
                            rate(Mode::Proxy, n, 19_500.0),
                            rate(Mode::Iptables, n, 17_000.0 * (1.0 - 0.8 * slowdown)),
                            rate(Mode::Nftables, n, 17_500.0),
                        ]
                    })
                    .collect(),
                latency: vec![
                    latency(Mode::Direct, 80_000, 900_000),
                    latency(Mode::Proxy, 87_530, 1_250_000),
                    latency(Mode::Iptables, 84_000, 1_000_000),
                    latency(Mode::Nftables, 85_000, 1_100_000),
                ],
                load: Vec::new(),
            },
            control_plane: Vec::new(),
        }
    }

    /// Width and height from a PNG's signature and IHDR chunk, the first one.
    fn png_size(bytes: &[u8]) -> Option<(u32, u32)> {
        let signature = b"\x89PNG\r\n\x1a\n";
        let ihdr = bytes.strip_prefix(signature)?.get(4..16)?;
        let (name, size) = ihdr.split_at(4);
        let word = |at: usize| u32::from_be_bytes(size[at..at + 4].try_into().unwrap());
        (name == b"IHDR").then(|| (word(0), word(4)))
    }

    #[test]
    fn both_charts_are_pngs_of_their_size() {
        let dir = std::env::temp_dir().join(format!("xtask-charts-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let (s1, s2) = write(&report(), &dir).unwrap();
        assert_eq!(
            (s1.file_name().unwrap(), s2.file_name().unwrap()),
            (S1_FILE.as_ref(), S2_FILE.as_ref())
        );
        assert_eq!(png_size(&fs::read(&s1).unwrap()), Some(S1_SIZE));
        assert_eq!(png_size(&fs::read(&s2).unwrap()), Some(S2_SIZE));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_font_names_its_package() {
        let err = read_font(Path::new("/nonexistent/DejaVuSans.ttf")).unwrap_err();
        assert!(format!("{err:#}").contains(FONT_PACKAGE), "{err:#}");
    }
}
