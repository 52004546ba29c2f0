//! [`QemuNbd`]: a `qemu-nbd` serving a raw image on a private Unix socket, and
//! [`qemu_img_bench`]: `qemu-img bench` against an NBD export.

use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::client::{ConnectOptions, NbdClient, probe};
use crate::error::NbdError;

/// How much of a program's output an error message keeps: the last 16 KiB.
const OUTPUT_TAIL: usize = 16 * 1024;

/// How [`QemuNbd::start`] runs `qemu-nbd`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QemuNbdOptions {
    /// Export read-only (`--read-only`). Default `false`.
    pub read_only: bool,
    /// How many clients may be connected at once (`--shared=N`, at least 1). Default 1.
    pub shared: u32,
    /// `--cache=MODE` (`none`, `writeback`, ...), or `None` for qemu-nbd's default
    /// (`writeback`).
    pub cache: Option<String>,
    /// `--aio=MODE` (`threads`, `native`, `io_uring`), or `None` for qemu-nbd's default.
    pub aio: Option<String>,
    /// `--discard=MODE` (`ignore`, `unmap`), or `None` for qemu-nbd's default
    /// (`ignore`: trims succeed and change nothing).
    pub discard: Option<String>,
    /// More arguments, placed before the image's name.
    pub extra_args: Vec<OsString>,
    /// The program to run. Default `qemu-nbd`, looked up in `PATH`.
    pub program: PathBuf,
    /// How long to wait for the socket to serve. Default 10 s.
    pub start_timeout: Duration,
}

impl Default for QemuNbdOptions {
    fn default() -> Self {
        QemuNbdOptions {
            read_only: false,
            shared: 1,
            cache: None,
            aio: None,
            discard: None,
            extra_args: Vec::new(),
            program: PathBuf::from("qemu-nbd"),
            start_timeout: Duration::from_secs(10),
        }
    }
}

/// A running `qemu-nbd` serving one raw image file as one export on a Unix socket in a
/// private directory (mode 0700). Dropping it kills and reaps the process and removes
/// the directory.
///
/// The command is
/// `qemu-nbd -f raw -x EXPORT -k DIR/nbd.sock --persistent --shared=N [--read-only]
/// [--cache=..] [--aio=..] [--discard=..] [extra args] -- IMAGE`: `--persistent` so the
/// server outlives its clients (it lives as long as this value), `--shared` for clients
/// connected at once.
#[derive(Debug)]
pub struct QemuNbd {
    child: Child,
    program: PathBuf,
    dir: PathBuf,
    socket: PathBuf,
    stderr: PathBuf,
    export: String,
    command: String,
}

impl QemuNbd {
    /// Starts `qemu-nbd` serving `image` (a raw file) as `export`, and waits (up to
    /// [`QemuNbdOptions::start_timeout`]) until its socket answers an NBD handshake,
    /// which the runner ends with `NBD_OPT_ABORT`.
    ///
    /// [`NbdError::QemuNbdMissing`] if the program is not installed;
    /// [`NbdError::QemuNbdExited`], with its stderr, if it exits first;
    /// [`NbdError::QemuNbdStartTimeout`] if the socket does not serve in time (the process
    /// is then killed).
    pub fn start(
        image: &Path,
        export: &str,
        options: &QemuNbdOptions,
    ) -> Result<QemuNbd, NbdError> {
        if options.shared == 0 {
            return Err(NbdError::InvalidOption("shared must be at least 1"));
        }
        let dir = private_dir()?;
        let socket = dir.join("nbd.sock");
        let stderr_path = dir.join("qemu-nbd.log");
        let mut args: Vec<OsString> = vec![
            "-f".into(),
            "raw".into(),
            "-x".into(),
            export.into(),
            "-k".into(),
            socket.clone().into(),
            "--persistent".into(),
            format!("--shared={}", options.shared).into(),
        ];
        if options.read_only {
            args.push("--read-only".into());
        }
        for (flag, value) in [
            ("--cache", &options.cache),
            ("--aio", &options.aio),
            ("--discard", &options.discard),
        ] {
            if let Some(value) = value {
                args.push(format!("{flag}={value}").into());
            }
        }
        args.extend(options.extra_args.iter().cloned());
        args.push("--".into());
        args.push(image.into());
        let command = command_line(&options.program, &args);

        let spawned = File::create(&stderr_path)
            .and_then(|log| Ok((log.try_clone()?, log)))
            .map_err(|source| NbdError::Spawn {
                program: options.program.clone(),
                source,
            })
            .and_then(|(out, err)| {
                Command::new(&options.program)
                    .args(&args)
                    .stdin(Stdio::null())
                    .stdout(out)
                    .stderr(err)
                    .spawn()
                    .map_err(|source| spawn_error(&options.program, source, true))
            });
        let child = match spawned {
            Ok(child) => child,
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let mut server = QemuNbd {
            child,
            program: options.program.clone(),
            dir,
            socket,
            stderr: stderr_path,
            export: export.to_owned(),
            command,
        };
        server.wait_until_serving(options.start_timeout)?;
        Ok(server)
    }

    fn wait_until_serving(&mut self, limit: Duration) -> Result<(), NbdError> {
        let started = Instant::now();
        let mut last_error: String;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    return Err(NbdError::QemuNbdExited {
                        status,
                        command: self.command.clone(),
                        stderr: self.stderr(),
                    });
                }
                Ok(None) => {}
                Err(source) => {
                    return Err(NbdError::Spawn {
                        program: self.program.clone(),
                        source,
                    });
                }
            }
            match UnixStream::connect(&self.socket) {
                Ok(stream) => match probe(&stream, Duration::from_secs(2)) {
                    Ok(()) => return Ok(()),
                    Err(e) => last_error = e.to_string(),
                },
                Err(e) => last_error = format!("connect: {e}"),
            }
            let waited = started.elapsed();
            if waited >= limit {
                return Err(NbdError::QemuNbdStartTimeout {
                    waited,
                    last_error,
                    command: self.command.clone(),
                    stderr: self.stderr(),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The Unix socket it serves on.
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// The export's name.
    pub fn export(&self) -> &str {
        &self.export
    }

    /// Its process id (for its CPU time in `/proc/PID/stat`, for example).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The command line it was started with, for reports.
    pub fn command_line(&self) -> &str {
        &self.command
    }

    /// What it has written to stderr and stdout so far (the last 16 KiB).
    pub fn stderr(&self) -> String {
        read_tail(&self.stderr)
    }

    /// Connects a client to its export with the default [`ConnectOptions`].
    pub fn connect(&self) -> Result<NbdClient, NbdError> {
        NbdClient::connect_unix(&self.socket, &self.export)
    }

    /// Connects a client to its export.
    pub fn connect_with(&self, options: &ConnectOptions) -> Result<NbdClient, NbdError> {
        NbdClient::connect_unix_with(&self.socket, &self.export, options)
    }

    /// The first line of `qemu-nbd --version` (`"qemu-nbd 10.0.2 (Debian ...)"`).
    pub fn version() -> Result<String, NbdError> {
        QemuNbd::version_of(Path::new("qemu-nbd"))
    }

    /// The first line of `PROGRAM --version`, for a `qemu-nbd` not in `PATH`.
    pub fn version_of(program: &Path) -> Result<String, NbdError> {
        let output = Command::new(program)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .map_err(|source| spawn_error(program, source, true))?;
        let text = String::from_utf8_lossy(&output.stdout);
        match text.lines().next() {
            Some(line) if output.status.success() && !line.trim().is_empty() => {
                Ok(line.trim().to_owned())
            }
            _ => Err(NbdError::Spawn {
                program: program.to_owned(),
                source: io::Error::other(format!(
                    "--version failed ({}): {}{}",
                    output.status,
                    text,
                    String::from_utf8_lossy(&output.stderr)
                )),
            }),
        }
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn spawn_error(program: &Path, source: io::Error, nbd: bool) -> NbdError {
    match (source.kind(), nbd) {
        (io::ErrorKind::NotFound, true) => NbdError::QemuNbdMissing {
            program: program.to_owned(),
        },
        (io::ErrorKind::NotFound, false) => NbdError::QemuImgMissing {
            program: program.to_owned(),
        },
        _ => NbdError::Spawn {
            program: program.to_owned(),
            source,
        },
    }
}

/// A new directory of mode 0700 under the system's temporary directory.
fn private_dir() -> Result<PathBuf, NbdError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let parent = std::env::temp_dir();
    let mut last = None;
    for _ in 0..16 {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let name = format!(
            "vmlink-nbd-{}-{}-{nanos:08x}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let dir = parent.join(name);
        // Unix socket paths must fit sun_path (108 bytes with the NUL).
        if dir.join("nbd.sock").as_os_str().len() >= 108 {
            return Err(NbdError::TempDir {
                parent,
                source: io::Error::other("the socket's path would exceed 107 bytes"),
            });
        }
        match fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
            Err(source) => return Err(NbdError::TempDir { parent, source }),
        }
    }
    Err(NbdError::TempDir {
        parent,
        source: last.unwrap_or_else(|| io::ErrorKind::AlreadyExists.into()),
    })
}

/// The last [`OUTPUT_TAIL`] bytes of a file, as lossy UTF-8.
fn read_tail(path: &Path) -> String {
    let Ok(mut file) = File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(OUTPUT_TAIL as u64)));
    let mut bytes = Vec::new();
    let _ = file.take(OUTPUT_TAIL as u64).read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).trim_end().to_owned()
}

fn tail(bytes: &[u8]) -> String {
    let start = bytes.len().saturating_sub(OUTPUT_TAIL);
    String::from_utf8_lossy(&bytes[start..])
        .trim_end()
        .to_owned()
}

/// A command line for messages, each argument quoted if it needs to be.
fn command_line(program: &Path, args: &[OsString]) -> String {
    let quote = |s: &OsStr| {
        let s = s.to_string_lossy();
        if !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
        {
            s.into_owned()
        } else {
            format!("'{}'", s.replace('\'', r"'\''"))
        }
    };
    let mut line = quote(program.as_os_str());
    for arg in args {
        line.push(' ');
        line.push_str(&quote(arg));
    }
    line
}

/// One `qemu-img bench` run: what [`qemu_img_bench`] passes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImgBench {
    /// Requests to make (`-c`). Default 100,000.
    pub count: u64,
    /// Requests in flight (`-d`). Default 1.
    pub depth: u32,
    /// Bytes per request (`-s`). Default 4,096.
    pub size: u64,
    /// Write instead of read (`-w`). Default `false`.
    pub write: bool,
    /// The offset of the first request (`-o`), or `None` for 0.
    pub offset: Option<u64>,
    /// How far each request's offset is from the previous one (`-S`), or `None` for
    /// `size` (sequential). Offsets wrap at the end of the image.
    pub step: Option<u64>,
    /// Flush after this many requests (`--flush-interval`, writes only).
    pub flush_interval: Option<u64>,
    /// The byte to write (`--pattern`), or `None` for zeroes.
    pub pattern: Option<u8>,
    /// `-t CACHE` (the client side's cache mode), or `None` for qemu-img's default
    /// (`writeback`).
    pub cache: Option<String>,
    /// `-i AIO` (`threads`, `native`, `io_uring`), or `None` for the default.
    pub aio: Option<String>,
    /// The program to run. Default `qemu-img`, looked up in `PATH`.
    pub program: PathBuf,
    /// Kill the run after this long. Default 10 minutes.
    pub timeout: Option<Duration>,
}

impl Default for ImgBench {
    fn default() -> Self {
        ImgBench {
            count: 100_000,
            depth: 1,
            size: 4096,
            write: false,
            offset: None,
            step: None,
            flush_interval: None,
            pattern: None,
            cache: None,
            aio: None,
            program: PathBuf::from("qemu-img"),
            timeout: Some(Duration::from_secs(600)),
        }
    }
}

/// What a `qemu-img bench` run reported.
#[derive(Clone, Debug, PartialEq)]
pub struct ImgBenchResult {
    /// The run time qemu-img printed (`Run completed in X seconds.`, millisecond
    /// resolution).
    pub elapsed: Duration,
    /// Requests per second: `count / elapsed`.
    pub ops_per_sec: f64,
    /// Bytes per second: `count * size / elapsed`.
    pub bytes_per_sec: f64,
    /// The command line that ran, for reports.
    pub command: String,
    /// What qemu-img printed on stdout.
    pub output: String,
}

/// Runs `qemu-img bench` against export `export` of the NBD server on the Unix socket
/// `socket`, as `qemu-img bench -f raw -c COUNT -d DEPTH -s SIZE [-o ..] [-S ..] [-t ..]
/// [-i ..] [-w [--pattern ..] [--flush-interval ..]] nbd+unix:///EXPORT?socket=SOCKET`,
/// and parses its run time.
///
/// The server must have a free connection (`qemu-nbd --shared`). The export name and
/// socket path must be URI-safe (letters, digits, `-._~/`), which is checked: qemu-img
/// would otherwise read them differently.
pub fn qemu_img_bench(
    socket: &Path,
    export: &str,
    bench: &ImgBench,
) -> Result<ImgBenchResult, NbdError> {
    if bench.count == 0 || bench.depth == 0 || bench.size == 0 {
        return Err(NbdError::InvalidOption(
            "count, depth and size of a bench must not be zero",
        ));
    }
    let uri_safe = |s: &str| {
        s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._~/".contains(c))
    };
    let socket_str = socket.to_str().unwrap_or("\u{0}");
    if !uri_safe(export) || export.starts_with('/') || !uri_safe(socket_str) {
        return Err(NbdError::InvalidOption(
            "qemu_img_bench needs a socket path and export name of letters, digits and -._~/",
        ));
    }
    let target = format!("nbd+unix:///{export}?socket={socket_str}");
    let mut args: Vec<OsString> = vec!["bench".into(), "-f".into(), "raw".into()];
    let mut push = |flag: &str, value: String| {
        args.push(flag.into());
        args.push(value.into());
    };
    push("-c", bench.count.to_string());
    push("-d", bench.depth.to_string());
    push("-s", bench.size.to_string());
    if let Some(offset) = bench.offset {
        push("-o", offset.to_string());
    }
    if let Some(step) = bench.step {
        push("-S", step.to_string());
    }
    if let Some(cache) = &bench.cache {
        push("-t", cache.clone());
    }
    if let Some(aio) = &bench.aio {
        push("-i", aio.clone());
    }
    if bench.write {
        args.push("-w".into());
        if let Some(pattern) = bench.pattern {
            args.push("--pattern".into());
            args.push(pattern.to_string().into());
        }
        if let Some(interval) = bench.flush_interval {
            args.push("--flush-interval".into());
            args.push(interval.to_string().into());
        }
    }
    args.push(target.into());
    let command = command_line(&bench.program, &args);

    let mut child = Command::new(&bench.program)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| spawn_error(&bench.program, source, false))?;
    // The output is two lines, so the pipes cannot fill while the run is polled; readers
    // on threads make that hold even if qemu-img prints more.
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let out_thread = std::thread::spawn(move || read_all_of(stdout.as_mut()));
    let err_thread = std::thread::spawn(move || read_all_of(stderr.as_mut()));
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) => {}
            Err(e) => break Err(e.to_string()),
        }
        if bench.timeout.is_some_and(|t| started.elapsed() >= t) {
            let _ = child.kill();
            let _ = child.wait();
            break Err(format!("timed out after {:?}", started.elapsed()));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let stdout = out_thread.join().unwrap_or_default();
    let stderr = err_thread.join().unwrap_or_default();
    let output = format!(
        "{}{}{}",
        tail(&stdout),
        if stderr.is_empty() { "" } else { "\n" },
        tail(&stderr)
    );
    let fail = |reason: String| NbdError::Bench {
        reason,
        command: command.clone(),
        output: output.clone(),
    };
    let status = status.map_err(fail)?;
    if !status.success() {
        return Err(fail(format!("exited with {status}")));
    }
    let stdout = String::from_utf8_lossy(&stdout);
    let seconds = parse_run_time(&stdout)
        .ok_or_else(|| fail("no `Run completed in X seconds.` in its output".into()))?;
    if seconds <= 0.0 {
        return Err(fail(
            "the run took less than a millisecond, too short to measure: raise count".into(),
        ));
    }
    let elapsed = Duration::from_secs_f64(seconds);
    let ops_per_sec = bench.count as f64 / seconds;
    Ok(ImgBenchResult {
        elapsed,
        ops_per_sec,
        bytes_per_sec: ops_per_sec * bench.size as f64,
        command,
        output: tail(stdout.as_bytes()),
    })
}

fn read_all_of(pipe: Option<&mut impl Read>) -> Vec<u8> {
    let mut bytes = Vec::new();
    if let Some(pipe) = pipe {
        let _ = pipe.read_to_end(&mut bytes);
    }
    bytes
}

/// The seconds in qemu-img bench's `Run completed in 1.234 seconds.` line.
fn parse_run_time(output: &str) -> Option<f64> {
    output.lines().find_map(|line| {
        let rest = line.trim().strip_prefix("Run completed in ")?;
        let number = rest.strip_suffix(" seconds.")?;
        number
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|s| s.is_finite() && *s >= 0.0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_run_time() {
        let out = "Sending 1000 read requests, 4096 bytes each, 1 in parallel \
                   (starting at offset 0, step size 4096)\nRun completed in 0.052 seconds.\n";
        assert_eq!(parse_run_time(out), Some(0.052));
        assert_eq!(parse_run_time("Run completed in NaN seconds."), None);
        assert_eq!(parse_run_time("nothing"), None);
    }

    #[test]
    fn quotes_command_lines() {
        let line = command_line(
            Path::new("qemu-nbd"),
            &["-x".into(), "my export".into(), "it's".into()],
        );
        assert_eq!(line, r"qemu-nbd -x 'my export' 'it'\''s'");
    }
}
