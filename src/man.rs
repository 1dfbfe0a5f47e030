//! `btfs manpages DIR` and `btfs completions SHELL` (hidden commands):
//! btfs(1), mount.btfs(8) and the shell completions, generated from the clap
//! definitions and the mount options table, so that none of them can say
//! something `--help` does not. mount-helpers/install.sh runs both.
//!
//! clap_mangen's own page for a command lists its subcommands by name only
//! (as if each had a page of its own), so btfs(1) is assembled from its
//! sections plus a COMMANDS section with every command's usage and options;
//! mount.btfs(8) describes the shell helper that mount(8) runs, built from
//! `btfs mount`'s arguments and the helper's own flags.

use std::{fs, io::Write, path::Path};

use anyhow::{Context, Result};
use clap::{Arg, ArgAction, Command, CommandFactory};
use clap_complete::Shell;
use clap_mangen::{
    Man,
    roff::{Inline, Roff, bold, italic, roman},
};

use crate::{Cli, EXAMPLES, MOUNT_HELP};

/// The date written into the pages' title lines: none, so that the pages
/// are the same bytes for the same sources (reproducible packages).
const PAGE_DATE: &str = "";

/// Writes `DIR/btfs.1` and `DIR/mount.btfs.8`, creating DIR if needed.
pub(crate) fn write_pages(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (name, page) in [("btfs.1", btfs_page()?), ("mount.btfs.8", helper_page()?)] {
        let path = dir.join(name);
        fs::write(&path, page).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// Writes the completion script for `shell` to stdout.
pub(crate) fn write_completions(shell: Shell) -> Result<()> {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "btfs", &mut script);
    let mut out = std::io::stdout().lock();
    out.write_all(&script)
        .and_then(|()| out.flush())
        .context("writing the completion script")
}

fn title(man: Man, title: &str, section: &str) -> Man {
    man.title(title)
        .section(section)
        .date(PAGE_DATE)
        .source(format!("btfs {}", env!("CARGO_PKG_VERSION")))
        .manual("btfs manual")
}

/// btfs(1): every command with its usage and options, the mount options,
/// the examples.
fn btfs_page() -> Result<Vec<u8>> {
    let mut cmd = Cli::command();
    cmd.build();
    let man = title(Man::new(cmd.clone()), "BTFS", "1");
    let mut out = Vec::new();
    man.render_title(&mut out)?;
    plain_layout().to_writer(&mut out)?;
    man.render_name_section(&mut out)?;
    man.render_synopsis_section(&mut out)?;
    man.render_description_section(&mut out)?;
    man.render_options_section(&mut out)?;
    commands_section(&cmd).to_writer(&mut out)?;
    mount_options_section().to_writer(&mut out)?;
    text_section(
        "EXAMPLES",
        EXAMPLES.lines().skip_while(|l| l.ends_with(':')),
    )
    .to_writer(&mut out)?;
    see_also(&["mount.btfs(8)", "mount(8)", "fstab(5)", "umount(8)"]).to_writer(&mut out)?;
    man.render_version_section(&mut out)?;
    Ok(out)
}

/// mount.btfs(8): the helper mount(8) runs for `mount -t btfs` and fstab
/// lines of type btfs (mount-helpers/mount.btfs), which runs `btfs mount`.
fn helper_page() -> Result<Vec<u8>> {
    let mut cli = Cli::command();
    cli.build();
    let mount = cli
        .find_subcommand("mount")
        .context("btfs has no mount command to describe")?;
    let borrowed = |id: &str| {
        mount
            .get_arguments()
            .find(|a| a.get_id() == id)
            .cloned()
            .with_context(|| format!("btfs mount has no {id} argument"))
    };
    let options_help = borrowed("options")?
        .get_help()
        .map(ToString::to_string)
        .unwrap_or_default();
    let flag = |id: &'static str, short: char, help: &'static str| {
        Arg::new(id)
            .short(short)
            .action(ArgAction::SetTrue)
            .help(help)
    };
    let helper = Command::new("mount.btfs")
        .about("mount a btfs filesystem (the mount(8) helper)")
        .long_about(
            "mount(8) runs mount.btfs for `mount -t btfs NAME MOUNTPOINT -o OPTIONS` and for \
             fstab lines of type btfs. It runs `btfs mount NAME MOUNTPOINT -o OPTIONS`, which \
             checks the options, the key and the paths, starts the daemon and returns once \
             the mount is live (or fails with one line saying why, mounting nothing). \
             `umount MOUNTPOINT` stops the daemon.",
        )
        .disable_help_flag(true)
        .disable_version_flag(true)
        .arg(borrowed("name")?)
        .arg(borrowed("mountpoint")?)
        .arg(
            Arg::new("options")
                .short('o')
                .value_name("OPTIONS")
                .help(options_help),
        )
        .arg(flag(
            "fake",
            'f',
            "Fake: check the arguments, mount nothing (mount -f)",
        ))
        .arg(flag(
            "verbose",
            'v',
            "Print the btfs command it runs on stderr",
        ))
        .arg(flag(
            "sloppy",
            's',
            "Sloppy: accepted for mount(8), nothing to do",
        ))
        .arg(flag(
            "no-mtab",
            'n',
            "No mtab: accepted for mount(8), nothing to do",
        ));
    let man = title(Man::new(helper.clone()), "MOUNT.BTFS", "8");
    let mut out = Vec::new();
    man.render_title(&mut out)?;
    plain_layout().to_writer(&mut out)?;
    man.render_name_section(&mut out)?;
    let mut synopsis = Roff::new();
    synopsis
        .control("SH", ["SYNOPSIS"])
        .text(usage(&helper, "mount.btfs"));
    synopsis.to_writer(&mut out)?;
    man.render_description_section(&mut out)?;
    man.render_options_section(&mut out)?;
    mount_options_section().to_writer(&mut out)?;
    let examples = EXAMPLES
        .lines()
        .filter(|l| l.contains("mount -t") || l.contains("umount"))
        .chain(EXAMPLES.lines().skip_while(|l| !l.starts_with("fstab")));
    text_section("EXAMPLES", examples).to_writer(&mut out)?;
    see_also(&["btfs(1)", "mount(8)", "fstab(5)", "umount(8)"]).to_writer(&mut out)?;
    Ok(out)
}

/// A usage line, positionals first (as mount(8) passes them to a helper),
/// then the options.
fn usage(cmd: &Command, name: &str) -> Vec<Inline> {
    let mut line = vec![bold(name)];
    for arg in cmd.get_positionals().filter(|a| !a.is_hide_set()) {
        line.push(roman(" "));
        line.push(italic(value_name(arg)));
    }
    for arg in cmd
        .get_arguments()
        .filter(|a| !a.is_positional() && shown(a))
    {
        line.push(roman(" ["));
        line.extend(arg_header(arg));
        line.push(roman("]"));
    }
    line
}

/// Whether an argument belongs in a page: not hidden, and not `--help` or
/// `--version`, which every command has and the pages need not repeat.
fn shown(arg: &Arg) -> bool {
    !arg.is_hide_set()
        && !matches!(
            arg.get_action(),
            ArgAction::Help | ArgAction::HelpShort | ArgAction::HelpLong | ArgAction::Version
        )
}

fn value_name(arg: &Arg) -> String {
    arg.get_value_names()
        .and_then(|v| v.first())
        .map_or_else(|| arg.get_id().as_str().to_uppercase(), ToString::to_string)
}

/// `-o, --options OPTIONS` (or a positional's `NAME`).
fn arg_header(arg: &Arg) -> Vec<Inline> {
    if arg.is_positional() {
        return vec![italic(value_name(arg))];
    }
    let mut header = Vec::new();
    if let Some(short) = arg.get_short() {
        header.push(bold(format!("-{short}")));
    }
    if let Some(long) = arg.get_long() {
        if !header.is_empty() {
            header.push(roman(", "));
        }
        header.push(bold(format!("--{long}")));
    }
    if arg.get_action().takes_values() {
        header.push(roman(" "));
        header.push(italic(value_name(arg)));
    }
    header
}

/// COMMANDS: each visible command with its usage, description and
/// arguments, as `btfs CMD --help` shows them.
fn commands_section(cli: &Command) -> Roff {
    let mut roff = Roff::new();
    roff.control("SH", ["COMMANDS"]);
    for sub in cli.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("btfs {}", sub.get_name());
        roff.control("SS", [name.as_str()]);
        roff.text(usage(sub, &name));
        if let Some(about) = sub.get_long_about().or_else(|| sub.get_about()) {
            roff.control("PP", []);
            roff.text([roman(about.to_string())]);
        }
        for arg in sub.get_arguments().filter(|a| shown(a)) {
            roff.control("TP", []);
            roff.text(arg_header(arg));
            let mut help = arg
                .get_long_help()
                .or_else(|| arg.get_help())
                .map(ToString::to_string)
                .unwrap_or_default();
            let defaults: Vec<_> = arg
                .get_default_values()
                .iter()
                .map(|d| d.to_string_lossy())
                .collect();
            if !defaults.is_empty() && arg.get_action().takes_values() {
                help.push_str(&format!(" [default: {}]", defaults.join(", ")));
            }
            if let Some(env) = arg.get_env() {
                help.push_str(&format!(" [env: {}]", env.to_string_lossy()));
            }
            roff.text([roman(help)]);
        }
        if let Some(after) = sub.get_after_help().map(ToString::to_string)
            && after != MOUNT_HELP
        {
            verbatim(&mut roff, after.lines());
        }
        if sub.get_name() == "mount" {
            roff.control("PP", []);
            roff.text([
                roman("The options are listed under "),
                bold("MOUNT OPTIONS"),
                roman("."),
            ]);
        }
    }
    roff
}

/// MOUNT OPTIONS: the table of `btfs mount --help` (MOUNT_HELP), one
/// tagged paragraph per option so that it wraps at any width.
fn mount_options_section() -> Roff {
    let mut roff = Roff::new();
    roff.control("SH", ["MOUNT OPTIONS"]);
    for (term, text) in options_table(MOUNT_HELP) {
        if term.is_empty() {
            roff.control("PP", []);
            roff.text([roman(text)]);
            continue;
        }
        roff.control("TP", []);
        roff.text(option_term(&term));
        roff.text([roman(text)]);
    }
    roff
}

/// `key=FILE` as `key=` in bold and `FILE` in italics; anything else bold.
fn option_term(term: &str) -> Vec<Inline> {
    match term.split_once('=') {
        Some((key, value)) if !term.contains(' ') => {
            vec![bold(format!("{key}=")), italic(value)]
        }
        _ => vec![bold(term)],
    }
}

/// The options table as (term, description) pairs: an indented line is
/// `TERM  DESCRIPTION` (two or more spaces between), a more deeply indented
/// line without such a gap continues the description above, and an
/// unindented line is a paragraph of its own (term empty).
fn options_table(table: &str) -> Vec<(String, String)> {
    /// A line indented deeper than this continues the previous one.
    const CONTINUATION_INDENT: usize = 4;
    let mut rows: Vec<(String, String)> = Vec::new();
    for line in table.lines() {
        let text = line.trim_start();
        if text.is_empty() {
            continue;
        }
        let indent = line.len() - text.len();
        let split = text
            .find("  ")
            .map(|at| (text[..at].to_owned(), text[at..].trim().to_owned()));
        match (indent, split, rows.last_mut()) {
            (0, _, _) => rows.push((String::new(), text.trim_end_matches(':').to_owned() + ":")),
            (i, None, Some(last)) if i > CONTINUATION_INDENT && !last.0.is_empty() => {
                last.1.push(' ');
                last.1.push_str(text);
            }
            (_, Some((term, desc)), _) => rows.push((term, desc)),
            (_, None, _) => rows.push((text.to_owned(), String::new())),
        }
    }
    rows
}

/// Ragged right, no hyphenation: option names and paths stay whole, which
/// is what a reader searching the page for `members=` needs.
fn plain_layout() -> Roff {
    let mut roff = Roff::new();
    roff.control("ad", ["l"]).control("nh", []);
    roff
}

/// A section of lines kept as they are (commands, fstab lines).
fn text_section<'a>(name: &str, lines: impl Iterator<Item = &'a str>) -> Roff {
    let mut roff = Roff::new();
    roff.control("SH", [name]);
    verbatim(&mut roff, lines);
    roff
}

fn verbatim<'a>(roff: &mut Roff, lines: impl Iterator<Item = &'a str>) {
    roff.control("PP", []).control("nf", []);
    for line in lines {
        roff.text([roman(line.trim_start())]);
    }
    roff.control("fi", []);
}

fn see_also(pages: &[&str]) -> Roff {
    let mut roff = Roff::new();
    roff.control("SH", ["SEE ALSO"]);
    roff.text([roman(pages.join(", "))]);
    roff
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_options_table_parses_into_one_row_per_option() {
        let rows = options_table(MOUNT_HELP);
        assert_eq!(rows[0].0, "", "the heading is a paragraph");
        let members = rows.iter().find(|(t, _)| t == "members=FILE").unwrap();
        assert!(members.1.starts_with("admit only"), "{members:?}");
        assert!(rows.iter().any(|(t, _)| t.starts_with("ro, nosuid")));
        assert!(rows.iter().all(|(t, d)| !t.is_empty() || !d.is_empty()));
        let continued =
            options_table("Opts:\n  a=X  first\n                    second\n  b  third");
        assert_eq!(
            continued,
            [
                (String::new(), "Opts:".to_owned()),
                ("a=X".to_owned(), "first second".to_owned()),
                ("b".to_owned(), "third".to_owned()),
            ]
        );
    }
}
