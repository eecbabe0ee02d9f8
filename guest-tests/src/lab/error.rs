//! Errors of the lab fixture. Every guest-related error carries the tail of that guest's
//! console, because under TCG "it timed out" is useless without knowing what the guest did.

use std::path::PathBuf;
use std::time::Duration;

pub type Result<T> = std::result::Result<T, LabError>;

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error(
        "the guest lab is not built ({path} is missing): run scripts/lab first, or the whole suite with scripts/test",
        path = .0.display()
    )]
    NotBuilt(PathBuf),

    #[error("{0}")]
    Setup(String),

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    #[error("guest {guest} did not boot: {reason}\n--- console tail ---\n{console}")]
    Boot {
        guest: String,
        reason: String,
        console: String,
    },

    #[error(
        "guest {guest}: `{command}` did not finish within {timeout:?}\n--- console tail ---\n{console}"
    )]
    Timeout {
        guest: String,
        command: String,
        timeout: Duration,
        console: String,
    },

    #[error(
        "guest {guest}: `{command}` exited with {status}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
    )]
    CommandFailed {
        guest: String,
        command: String,
        status: i32,
        stdout: String,
        stderr: String,
    },

    #[error("guest {guest}: {message}\n--- console tail ---\n{console}")]
    Agent {
        guest: String,
        message: String,
        console: String,
    },
}

impl LabError {
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> LabError {
        let context = context.into();
        move |source| LabError::Io { context, source }
    }
}
