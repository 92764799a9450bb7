//! Running external commands, with errors that say which command failed and why.
//!
//! Every workflow shells out (rustup, cargo, dpkg-query, apt-get); a bare "exit status: 1" would
//! leave the user guessing which of them broke, so each error names the full command line and keeps
//! the end of its stderr, where cargo and apt put the actual error.

use std::ffi::OsStr;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

/// How many trailing stderr lines an error keeps: enough for the real error, without the pages of
/// compile progress that `cargo install` prints before it.
const STDERR_TAIL_LINES: usize = 25;

/// A command that could not start or exited unsuccessfully.
#[derive(Debug)]
pub struct CommandError {
    command: String,
    failure: Failure,
}

#[derive(Debug)]
enum Failure {
    Spawn(io::Error),
    Exit { status: ExitStatus, stderr: String },
}

impl CommandError {
    /// The program is not installed (or not on PATH), as opposed to present but failing.
    pub fn is_not_found(&self) -> bool {
        matches!(&self.failure, Failure::Spawn(err) if err.kind() == io::ErrorKind::NotFound)
    }

    /// What the command wrote to stderr; empty if it never started.
    pub fn stderr(&self) -> &str {
        match &self.failure {
            Failure::Spawn(_) => "",
            Failure::Exit { stderr, .. } => stderr,
        }
    }
}

impl fmt::Display for CommandError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let command = &self.command;
        match &self.failure {
            Failure::Spawn(err) if err.kind() == io::ErrorKind::NotFound => {
                write!(f, "`{command}`: program not found on PATH")
            }
            Failure::Spawn(err) => write!(f, "`{command}` could not start: {err}"),
            Failure::Exit { status, stderr } => {
                write!(f, "`{command}` failed ({status})")?;
                let lines: Vec<&str> = stderr.trim_end().lines().collect();
                if !lines.is_empty() {
                    let tail = &lines[lines.len().saturating_sub(STDERR_TAIL_LINES)..];
                    write!(f, ", stderr:\n{}", tail.join("\n"))?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for CommandError {}

/// Runs `cmd` to completion with its output captured, for steps whose output only matters when
/// they fail.
pub fn run(cmd: &mut Command) -> Result<(), CommandError> {
    output(cmd).map(drop)
}

/// Runs `cmd` to completion and returns its stdout. Stdin is closed so that nothing can stop to
/// ask a question nobody will see.
pub fn output(cmd: &mut Command) -> Result<String, CommandError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|err| error(cmd, Failure::Spawn(err)))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        Err(error(
            cmd,
            Failure::Exit {
                status: out.status,
                stderr,
            },
        ))
    }
}

/// Runs `cmd` on the caller's terminal (for cargo test and clippy, whose output is the point) and
/// returns its exit status: only failing to start is an error.
pub fn status(cmd: &mut Command) -> Result<ExitStatus, CommandError> {
    cmd.status().map_err(|err| error(cmd, Failure::Spawn(err)))
}

/// The cargo that runs xtask (`$CARGO`), so nested builds use the same toolchain, started at the
/// workspace root so that `--workspace` means this workspace wherever the user stands.
pub fn cargo() -> Command {
    let mut cargo = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cargo.current_dir(workspace_root());
    cargo
}

/// The workspace root: xtask's own manifest directory is one level below it.
pub fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}

fn error(cmd: &Command, failure: Failure) -> CommandError {
    CommandError {
        command: display(cmd),
        failure,
    }
}

/// The command as a shell line, with the environment it sets (`LLVM_PREFIX=… cargo install …`),
/// so that the user can rerun it by hand.
fn display(cmd: &Command) -> String {
    let env = cmd.get_envs().filter_map(|(key, value)| {
        value.map(|value| format!("{}={}", key.display(), value.display()))
    });
    let words = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(OsStr::display)
        .map(|word| word.to_string());
    env.chain(words).collect::<Vec<_>>().join(" ")
}
