//! The CLI's error type: any error, with a message that says what was being done.

use std::fmt;

/// An error with the context it happened in.
#[derive(Debug)]
pub struct CliError(pub String);

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CliError {}

/// The result of a CLI step.
pub type Result<T> = std::result::Result<T, CliError>;

/// Adds "while doing X" context to any displayable error.
pub trait Context<T> {
    /// Wraps the error as `"{what}: {error}"`.
    fn context(self, what: &str) -> Result<T>;
}

impl<T, E: fmt::Display> Context<T> for std::result::Result<T, E> {
    fn context(self, what: &str) -> Result<T> {
        self.map_err(|e| CliError(format!("{what}: {e}")))
    }
}

/// An error with just a message.
pub fn fail<T>(message: impl Into<String>) -> Result<T> {
    Err(CliError(message.into()))
}
