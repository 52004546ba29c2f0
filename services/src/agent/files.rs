//! The agent's side of file copy: files the host sends land in one configured directory
//! tree and nowhere else.
//!
//! The host names a directory with a full guest path (`path_name`) and a file name. The
//! path is accepted only if it is absolute, has no `.` or `..` component, and resolves
//! (symbolic links followed) inside the agent's root; the file name must be one plain
//! component. A copy is written to a temporary file beside its destination and renamed
//! into place when the host completes it, and only if every announced byte arrived; a
//! cancel, a failure or a dropped session removes it. An existing file is replaced only
//! when the host's flags say so.
//!
//! Refusals carry the status Linux's file-copy daemon would send: `HV_ERROR_ALREADY_EXISTS`
//! for an existing file without the overwrite flag, `HV_ERROR_DISK_FULL` when the disk is
//! full, `HV_E_FAIL` for everything else (a path outside the root, a write past the
//! announced size, a write with no copy started).

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::status::{HV_E_FAIL, HV_ERROR_ALREADY_EXISTS, HV_ERROR_DISK_FULL};

pub use crate::fcopy::{CREATE_PATH, OVER_WRITE};

/// A refused file-copy step: the status to answer with, and why (for the log).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{why} (status {status:#010x})")]
pub struct Refused {
    /// The status for the host (`icmsg_hdr.status`).
    pub status: u32,
    /// What went wrong.
    pub why: String,
}

fn refuse(status: u32, why: impl Into<String>) -> Refused {
    Refused {
        status,
        why: why.into(),
    }
}

fn io_refusal(what: &str, path: &Path, e: &io::Error) -> Refused {
    let status = if e.raw_os_error() == Some(nix::libc::ENOSPC) {
        HV_ERROR_DISK_FULL
    } else {
        HV_E_FAIL
    };
    refuse(status, format!("{what} {}: {e}", path.display()))
}

/// A copy in progress.
#[derive(Debug)]
struct Transfer {
    file: File,
    temp: PathBuf,
    dest: PathBuf,
    size: u64,
    /// The end of the furthest write so far.
    end: u64,
    /// Bytes written, overlaps counted once at most per byte of `size` (see `write`).
    written: u64,
    overwrite: bool,
}

/// Receives the host's file copies into a root directory, one at a time.
#[derive(Debug)]
pub struct FileReceiver {
    root: PathBuf,
    current: Option<Transfer>,
}

/// Distinguishes the temporary files of copies made by one process.
static NEXT_TEMP: AtomicU64 = AtomicU64::new(0);

impl FileReceiver {
    /// Copies land under `root`, which must exist.
    pub fn new(root: impl AsRef<Path>) -> io::Result<Self> {
        Ok(Self {
            root: fs::canonicalize(root)?,
            current: None,
        })
    }

    /// The root, resolved.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// True while a copy is in progress.
    pub fn busy(&self) -> bool {
        self.current.is_some()
    }

    /// Starts copying `file_name` into the directory `path_name` (a full guest path), of
    /// `size` bytes. A copy still in progress is cancelled first.
    pub fn start(
        &mut self,
        file_name: &str,
        path_name: &str,
        flags: u32,
        size: u64,
    ) -> Result<(), Refused> {
        self.cancel();
        let dir = self.directory(path_name, flags & CREATE_PATH != 0)?;
        check_file_name(file_name)?;
        let dest = dir.join(file_name);
        let overwrite = flags & OVER_WRITE != 0;
        match fs::symlink_metadata(&dest) {
            Ok(meta) if meta.is_dir() => {
                return Err(refuse(
                    HV_E_FAIL,
                    format!("{} is a directory", dest.display()),
                ));
            }
            Ok(_) if !overwrite => {
                return Err(refuse(
                    HV_ERROR_ALREADY_EXISTS,
                    format!(
                        "{} exists and the host did not ask to overwrite",
                        dest.display()
                    ),
                ));
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_refusal("cannot look at", &dest, &e)),
        }
        let n = NEXT_TEMP.fetch_add(1, Ordering::Relaxed);
        let temp = dir.join(format!(
            ".{file_name}.vmlink-partial-{}-{n}",
            std::process::id()
        ));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&temp)
            .map_err(|e| io_refusal("cannot create", &temp, &e))?;
        self.current = Some(Transfer {
            file,
            temp,
            dest,
            size,
            end: 0,
            written: 0,
            overwrite,
        });
        Ok(())
    }

    /// Writes `data` at `offset` of the copy in progress. A write past the announced size,
    /// or with no copy started, is refused; a failed write cancels the copy.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), Refused> {
        let Some(t) = &mut self.current else {
            return Err(refuse(HV_E_FAIL, "a write with no copy started"));
        };
        let len = data.len() as u64;
        let Some(end) = offset.checked_add(len).filter(|end| *end <= t.size) else {
            let why = format!(
                "a write of {len} bytes at {offset} past the announced {} bytes",
                t.size
            );
            self.cancel();
            return Err(refuse(HV_E_FAIL, why));
        };
        if let Err(e) = t.file.write_all_at(data, offset) {
            let refused = io_refusal("cannot write", &t.temp, &e);
            self.cancel();
            return Err(refused);
        }
        // Writes come in order from Hyper-V; `written` counts what extends the file, so a
        // rewrite of earlier bytes cannot make a short file look complete.
        if end > t.end {
            t.written += end - t.end.max(offset);
            t.end = end;
        }
        Ok(())
    }

    /// Completes the copy in progress: renames it into place if every announced byte was
    /// written. Returns the destination.
    pub fn complete(&mut self) -> Result<PathBuf, Refused> {
        let Some(t) = self.current.take() else {
            return Err(refuse(HV_E_FAIL, "a completion with no copy started"));
        };
        if t.written != t.size {
            let why = format!(
                "{}: {} of {} announced bytes arrived",
                t.dest.display(),
                t.written,
                t.size
            );
            let _ = fs::remove_file(&t.temp);
            return Err(refuse(HV_E_FAIL, why));
        }
        let placed = if t.overwrite {
            fs::rename(&t.temp, &t.dest)
        } else {
            // No replace: a hard link fails if the destination appeared meanwhile.
            fs::hard_link(&t.temp, &t.dest).and_then(|()| fs::remove_file(&t.temp))
        };
        if let Err(e) = placed {
            let _ = fs::remove_file(&t.temp);
            if e.kind() == io::ErrorKind::AlreadyExists {
                return Err(refuse(
                    HV_ERROR_ALREADY_EXISTS,
                    format!("{} appeared during the copy", t.dest.display()),
                ));
            }
            return Err(io_refusal("cannot move the copy to", &t.dest, &e));
        }
        Ok(t.dest)
    }

    /// Cancels the copy in progress, removing what was written. Nothing when idle.
    pub fn cancel(&mut self) {
        if let Some(t) = self.current.take() {
            drop(t.file);
            let _ = fs::remove_file(&t.temp);
        }
    }

    /// Resolves `path_name` inside the root, creating missing directories when asked.
    fn directory(&self, path_name: &str, create: bool) -> Result<PathBuf, Refused> {
        let outside = || {
            refuse(
                HV_E_FAIL,
                format!(
                    "{path_name:?} is not a directory inside {}",
                    self.root.display()
                ),
            )
        };
        // Segments are checked as written: `Path::components` would drop a `.`.
        if !path_name.starts_with('/')
            || path_name.contains('\0')
            || path_name.split('/').any(|s| s == "." || s == "..")
        {
            return Err(outside());
        }
        let parts: Vec<&str> = path_name.split('/').filter(|s| !s.is_empty()).collect();
        // Walk from `/`, resolving each existing prefix (links followed) and creating
        // what is missing only once the walk is inside the root.
        let mut at = PathBuf::from("/");
        for (i, part) in parts.iter().enumerate() {
            let next = at.join(part);
            match fs::canonicalize(&next) {
                Ok(real) => at = real,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if !create || !at.starts_with(&self.root) {
                        return Err(refuse(
                            HV_E_FAIL,
                            format!("{} does not exist", next.display()),
                        ));
                    }
                    for missing in &parts[i..] {
                        at.push(missing);
                        fs::create_dir(&at).map_err(|e| io_refusal("cannot create", &at, &e))?;
                    }
                    break;
                }
                Err(e) => return Err(io_refusal("cannot resolve", &next, &e)),
            }
        }
        if !at.starts_with(&self.root) || !at.is_dir() {
            return Err(outside());
        }
        Ok(at)
    }
}

impl Drop for FileReceiver {
    fn drop(&mut self) {
        self.cancel();
    }
}

/// A file name is one plain component.
fn check_file_name(name: &str) -> Result<(), Refused> {
    if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\\', '\0']) {
        return Err(refuse(
            HV_E_FAIL,
            format!("{name:?} is not a plain file name"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dirs {
        top: PathBuf,
        root: PathBuf,
    }

    impl Dirs {
        fn new(name: &str) -> Self {
            let top =
                std::env::temp_dir().join(format!("vmlink-fcopy-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&top);
            let root = top.join("root");
            fs::create_dir_all(&root).expect("root");
            Self {
                top: fs::canonicalize(&top).expect("canonical"),
                root: fs::canonicalize(&root).expect("canonical"),
            }
        }

        fn root_str(&self) -> &str {
            self.root.to_str().expect("utf-8 temp dir")
        }

        /// Everything under the root, names only, sorted (temporary files show).
        fn listing(&self) -> Vec<String> {
            let mut out = Vec::new();
            let mut stack = vec![self.root.clone()];
            while let Some(d) = stack.pop() {
                for e in fs::read_dir(&d).expect("read dir") {
                    let e = e.expect("entry");
                    let p = e.path();
                    out.push(
                        p.strip_prefix(&self.root)
                            .expect("inside")
                            .display()
                            .to_string(),
                    );
                    if p.is_dir() {
                        stack.push(p);
                    }
                }
            }
            out.sort();
            out
        }
    }

    impl Drop for Dirs {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.top);
        }
    }

    #[test]
    fn a_copy_lands_whole_and_only_on_complete() {
        let d = Dirs::new("whole");
        let mut r = FileReceiver::new(&d.root).expect("receiver");
        r.start("a.bin", d.root_str(), 0, 10).expect("start");
        r.write(0, b"hello").expect("write");
        assert_eq!(d.listing().len(), 1, "only the temporary file");
        assert!(!d.root.join("a.bin").exists());
        r.write(5, b"world").expect("write");
        let dest = r.complete().expect("complete");
        assert_eq!(dest, d.root.join("a.bin"));
        assert_eq!(fs::read(&dest).expect("read"), b"helloworld");
        assert_eq!(d.listing(), ["a.bin"]);
    }

    #[test]
    fn cancel_and_drop_leave_nothing_behind() {
        let d = Dirs::new("cancel");
        let mut r = FileReceiver::new(&d.root).expect("receiver");
        r.start("a", d.root_str(), 0, 4).expect("start");
        r.write(0, b"ab").expect("write");
        r.cancel();
        assert!(d.listing().is_empty());
        r.start("b", d.root_str(), 0, 4).expect("start");
        r.write(0, b"ab").expect("write");
        drop(r);
        assert!(d.listing().is_empty());
    }

    #[test]
    fn a_short_copy_is_refused_at_complete_and_removed() {
        let d = Dirs::new("short");
        let mut r = FileReceiver::new(&d.root).expect("receiver");
        r.start("a", d.root_str(), 0, 8).expect("start");
        r.write(0, b"abcd").expect("write");
        // Rewriting the same bytes does not make it longer.
        r.write(0, b"abcd").expect("rewrite");
        let e = r.complete().expect_err("short");
        assert_eq!(e.status, HV_E_FAIL);
        assert!(d.listing().is_empty());
    }

    #[test]
    fn writes_past_the_size_or_without_start_are_refused() {
        let d = Dirs::new("past");
        let mut r = FileReceiver::new(&d.root).expect("receiver");
        assert_eq!(r.write(0, b"x").expect_err("no start").status, HV_E_FAIL);
        assert_eq!(r.complete().expect_err("no start").status, HV_E_FAIL);
        r.start("a", d.root_str(), 0, 4).expect("start");
        assert_eq!(r.write(2, b"xyz").expect_err("past").status, HV_E_FAIL);
        assert!(!r.busy(), "a bad write cancels the copy");
        r.start("a", d.root_str(), 0, 4).expect("start");
        assert_eq!(
            r.write(u64::MAX, b"x").expect_err("overflow").status,
            HV_E_FAIL
        );
        assert!(d.listing().is_empty());
    }

    #[test]
    fn an_existing_file_needs_the_overwrite_flag() {
        let d = Dirs::new("exists");
        fs::write(d.root.join("a"), b"old").expect("old file");
        let mut r = FileReceiver::new(&d.root).expect("receiver");
        let e = r.start("a", d.root_str(), 0, 3).expect_err("exists");
        assert_eq!(e.status, HV_ERROR_ALREADY_EXISTS);
        r.start("a", d.root_str(), OVER_WRITE, 3)
            .expect("overwrite");
        r.write(0, b"new").expect("write");
        r.complete().expect("complete");
        assert_eq!(fs::read(d.root.join("a")).expect("read"), b"new");
    }

    #[test]
    fn paths_outside_the_root_are_refused() {
        let d = Dirs::new("outside");
        fs::create_dir(d.top.join("elsewhere")).expect("dir");
        std::os::unix::fs::symlink(d.top.join("elsewhere"), d.root.join("link")).expect("link");
        let mut r = FileReceiver::new(&d.root).expect("receiver");
        let root = d.root_str();
        for path in [
            "relative/path".to_owned(),
            d.top.to_str().expect("utf-8").to_owned(),
            format!("{root}/../root"),
            format!("{root}/./x"),
            format!("{root}/link"),
            format!("{root}/link/deeper"),
            "/".to_owned(),
        ] {
            let e = r.start("f", &path, CREATE_PATH, 1).expect_err(&path);
            assert_eq!(e.status, HV_E_FAIL, "{path}");
        }
        for name in ["", ".", "..", "a/b", "a\\b", "a\0b"] {
            let e = r.start(name, root, 0, 1).expect_err(name);
            assert_eq!(e.status, HV_E_FAIL, "{name:?}");
        }
        assert_eq!(d.listing(), ["link"]);
        assert_eq!(
            fs::read_dir(d.top.join("elsewhere")).expect("dir").count(),
            0
        );
    }

    #[test]
    fn missing_directories_are_created_only_when_asked() {
        let d = Dirs::new("create");
        let mut r = FileReceiver::new(&d.root).expect("receiver");
        let path = format!("{}/x/y", d.root_str());
        assert_eq!(
            r.start("f", &path, 0, 1).expect_err("missing").status,
            HV_E_FAIL
        );
        r.start("f", &path, CREATE_PATH, 1).expect("created");
        r.write(0, b"1").expect("write");
        r.complete().expect("complete");
        assert_eq!(fs::read(d.root.join("x/y/f")).expect("read"), b"1");
    }
}
