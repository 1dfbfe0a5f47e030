//! `btfs status --watch`: the status of one node, asked again every interval
//! until Ctrl-C.
//!
//! On a terminal the text of `btfs status` is redrawn in place and each fetch
//! in flight gets a live progress bar (with its rate and time left, which a
//! single snapshot cannot show). Without a terminal (a log, a pipe) each
//! interval prints a plain snapshot after a dated separator line, so the
//! output reads like a series of `btfs status` runs; with `--json`, one JSON
//! object per line. SIGINT and SIGTERM end the watch with status 0; a daemon
//! that stops answering ends it with an error, since what was shown is then
//! no longer true.

use std::{
    collections::HashMap,
    io::{IsTerminal, Write},
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result, bail};
use btfs_node::NodeStatus;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::signal::unix::{SignalKind, signal};

use crate::{control, status};

/// Time between two status requests unless `--interval` says otherwise:
/// often enough for a transfer's bar to move smoothly to the eye, rarely
/// enough that the daemon's control socket is hardly touched.
pub(crate) const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);

/// The shortest `--interval` accepted: a status walks the node's counters
/// and peer table, and a watch polling faster than a person can read would
/// mostly load the daemon it watches.
pub(crate) const MIN_INTERVAL: Duration = Duration::from_millis(100);

/// Width of a fetch's bar in cells (the same as `btfs status`'s text bars).
const BAR_WIDTH: usize = 24;

/// How one snapshot is shown.
enum View {
    /// A terminal: redrawn in place, fetches as live bars.
    Live(Box<Live>),
    /// Not a terminal: a dated snapshot after another.
    Plain,
    /// `--json`: one object per line.
    Json,
}

/// The terminal view: the status text as one multi-line "bar" and a real
/// progress bar per fetch, keyed by path, below it.
struct Live {
    multi: MultiProgress,
    header: ProgressBar,
    fetches: HashMap<String, ProgressBar>,
    fetch_style: ProgressStyle,
}

impl Live {
    fn new() -> Result<Self> {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stdout());
        let header = multi.add(ProgressBar::new(0).with_style(
            ProgressStyle::with_template("{msg}").context("the watch's header template")?,
        ));
        let fetch_style = ProgressStyle::with_template(&format!(
            "    [{{bar:{BAR_WIDTH}}}] {{percent:>3}}% {{msg}} {{binary_bytes}}/{{binary_total_bytes}} \
             {{binary_bytes_per_sec}}, {{eta}} left"
        ))
        .context("the watch's fetch template")?
        .progress_chars("#>.");
        Ok(Self {
            multi,
            header,
            fetches: HashMap::new(),
            fetch_style,
        })
    }

    fn show(&mut self, title: &str, v: &NodeStatus) {
        self.header.set_message(format!(
            "{title}\n{}",
            status::render_without_fetches(v).trim_end()
        ));
        let live: Vec<&str> = v
            .bittorrent
            .fetches
            .iter()
            .map(|f| f.path.as_str())
            .collect();
        self.fetches.retain(|path, bar| {
            let keep = live.contains(&path.as_str());
            if !keep {
                bar.finish_and_clear();
                self.multi.remove(bar);
            }
            keep
        });
        for f in &v.bittorrent.fetches {
            let bar = self.fetches.entry(f.path.clone()).or_insert_with(|| {
                let bar = self
                    .multi
                    .add(ProgressBar::new(f.size).with_style(self.fetch_style.clone()));
                bar.set_message(format!(
                    "{}{}",
                    f.path,
                    if f.full { " (whole file)" } else { "" }
                ));
                bar
            });
            bar.set_length(f.size);
            bar.set_position(f.have);
        }
    }

    /// Leaves the last frame on the screen, the cursor below it.
    fn finish(&mut self) {
        for bar in self.fetches.values() {
            bar.abandon();
        }
        self.header.abandon();
        // indicatif leaves the cursor at the end of the last line: the
        // shell's prompt goes below the frame, not into it.
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out).and_then(|()| out.flush());
    }
}

impl View {
    /// Shows one snapshot; `false` once stdout is gone (a closed pipe),
    /// which ends the watch as quietly as `btfs status | head` would.
    fn show(&mut self, title: &str, raw: &serde_json::Value) -> Result<bool> {
        let text = match self {
            View::Json => format!("{raw}\n"),
            View::Plain => format!("--- {title}\n{}", status::render(&parse(raw)?)),
            View::Live(live) => {
                live.show(title, &parse(raw)?);
                return Ok(true);
            }
        };
        let mut out = std::io::stdout().lock();
        match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
            Err(e) => Err(e).context("writing the watch to stdout"),
        }
    }

    fn finish(&mut self) {
        if let View::Live(live) = self {
            live.finish();
        }
    }
}

fn parse(raw: &serde_json::Value) -> Result<NodeStatus> {
    serde_json::from_value(raw.clone()).context("the daemon sent a status this btfs cannot read")
}

/// Watches the daemon serving `mountpoint` until SIGINT or SIGTERM (then
/// `Ok`), or until it stops answering (then an error saying so). A path no
/// daemon serves fails at once, before anything is drawn.
pub(crate) fn run(mountpoint: &Path, interval: Duration, json: bool) -> Result<()> {
    if interval < MIN_INTERVAL {
        bail!(
            "--interval {} is too short: the least is {}",
            humantime::format_duration(interval),
            humantime::format_duration(MIN_INTERVAL)
        );
    }
    let canonical: PathBuf = std::fs::canonicalize(mountpoint)
        .with_context(|| format!("{} is not accessible", mountpoint.display()))?;
    let first = control::query_status(&canonical)
        .with_context(|| format!("cannot watch {}", mountpoint.display()))?;
    let mut view = if json {
        View::Json
    } else if std::io::stdout().is_terminal() {
        View::Live(Box::new(Live::new()?))
    } else {
        View::Plain
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the watch's runtime")?;
    let outcome = runtime.block_on(watch(&canonical, interval, first, &mut view));
    view.finish();
    outcome
}

async fn watch(
    mountpoint: &Path,
    interval: Duration,
    first: serde_json::Value,
    view: &mut View,
) -> Result<()> {
    let mut interrupt = signal(SignalKind::interrupt()).context("catching SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("catching SIGTERM")?;
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate: it shows the status already asked for.
    ticks.tick().await;
    let title = |at: SystemTime| {
        format!(
            "btfs status {} at {} (every {}; Ctrl-C ends)",
            mountpoint.display(),
            humantime::format_rfc3339_seconds(at),
            humantime::format_duration(interval)
        )
    };
    let mut snapshot = first;
    loop {
        if !view.show(&title(SystemTime::now()), &snapshot)? {
            return Ok(());
        }
        tokio::select! {
            _ = interrupt.recv() => return Ok(()),
            _ = terminate.recv() => return Ok(()),
            _ = ticks.tick() => {}
        }
        // A blocking request (at most the control socket's timeout): a
        // signal meanwhile is kept by tokio and ends the next wait.
        snapshot = control::query_status(mountpoint).with_context(|| {
            format!(
                "watch ended: the daemon serving {} stopped answering",
                mountpoint.display()
            )
        })?;
    }
}
