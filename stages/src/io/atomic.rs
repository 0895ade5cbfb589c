//! Atomic file writes: readers see the old file or the whole new one, never a part.
//!
//! Every atomic write in pipe goes through here (checkpoints, grids, metrics.csv rewrites,
//! stats.json, pipeline.ron, the feature cache, the LeNet classifier): the new content goes
//! to a temporary file of a unique name in the target's folder (`.<name>.<random>.partial`,
//! made by `tempfile`, so two writers never share one), is flushed to disk, and is renamed
//! over the target; the folder is then synced so the rename is durable too. A temporary file
//! is removed on any error; a process killed mid-write leaves one behind, which
//! [`target_of_temp`] recognises for clean-up.
//!
//! (The video and GIF sinks stream into `<path>.partial` for the whole run instead, a name a
//! user can find; see `crate::kinds::frames`.)

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

/// A new temporary file beside `path`: `.<name>.<random>.partial` in the same folder (so the
/// final rename stays on one file system). Errors: the folder is missing or not writable.
fn temp_file(path: &Path) -> std::io::Result<tempfile::NamedTempFile> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let prefix = format!(".{name}.");
    let mut b = tempfile::Builder::new();
    b.prefix(&prefix).suffix(".partial");
    // `tempfile` makes files readable by their owner only; the outputs of a run are ordinary
    // files (a web server showing the grids may run as another user), so ask for what
    // `File::create` gives: 0o666 less the umask.
    #[cfg(unix)]
    b.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666));
    b.tempfile_in(dir)
}

/// The file name a temporary file of this module stands in for (`.step_10.png.x7Yq2a.partial`
/// → `step_10.png`); None for any other name.
pub fn target_of_temp(file_name: &str) -> Option<&str> {
    let inner = file_name.strip_prefix('.')?.strip_suffix(".partial")?;
    let (target, random) = inner.rsplit_once('.')?;
    (!target.is_empty() && !random.is_empty()).then_some(target)
}

/// Rename `tmp` over `path` and sync the folder.
fn persist(tmp: tempfile::NamedTempFile, path: &Path) -> std::io::Result<()> {
    tmp.persist(path).map_err(|e| e.error)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Test hook (the `fault-injection` feature only): with `PIPE_TEST_FULL_DISK=SUFFIX` in the
/// environment, the atomic write of a path ending with SUFFIX (`checkpoints/step_00000020.safetensors`)
/// writes to `/dev/full`, failing with ENOSPC as a full disk does.
#[cfg(feature = "fault-injection")]
fn writer_for(path: &Path, tmp: &tempfile::NamedTempFile) -> std::io::Result<File> {
    match std::env::var_os("PIPE_TEST_FULL_DISK") {
        Some(s) if path.ends_with(&s) => File::options().write(true).open("/dev/full"),
        _ => tmp.reopen(),
    }
}

#[cfg(not(feature = "fault-injection"))]
fn writer_for(_path: &Path, tmp: &tempfile::NamedTempFile) -> std::io::Result<File> {
    tmp.reopen()
}

/// Write `path` atomically: `write` fills a temporary file beside it, which is flushed to disk
/// (fsync) and renamed over `path`. On any error the temporary file is removed and `path` is
/// left as it was.
///
/// Errors: the I/O error of creating, writing, syncing or renaming (callers attach the path).
pub fn write_atomic(path: &Path, write: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>) -> std::io::Result<()> {
    let tmp = temp_file(path)?;
    let mut out = BufWriter::new(writer_for(path, &tmp)?);
    write(&mut out)?;
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    persist(tmp, path)
}

/// [`write_atomic`] of a byte string.
pub fn write_bytes_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomic(path, |w| w.write_all(bytes))
}

/// [`write_atomic`] for a writer that needs a path (libtorch's `write_npy`): `write` writes the
/// temporary file at the path it is given.
pub fn write_path_atomic(path: &Path, write: impl FnOnce(&Path) -> std::io::Result<()>) -> std::io::Result<()> {
    let tmp = temp_file(path)?;
    write(tmp.path())?;
    File::open(tmp.path())?.sync_all()?;
    persist(tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temps(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".partial"))
            .collect()
    }

    #[test]
    fn replaces_whole_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.txt");
        write_bytes_atomic(&p, b"one").unwrap();
        write_bytes_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        // A failing writer leaves the old file and no temporary file.
        let e = write_atomic(&p, |_| Err(std::io::Error::other("disk full"))).unwrap_err();
        assert_eq!(e.to_string(), "disk full");
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert!(temps(dir.path()).is_empty());
        write_path_atomic(&p, |t| std::fs::write(t, b"three")).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"three");
        assert!(temps(dir.path()).is_empty());
    }

    #[cfg(unix)]
    #[test]
    fn written_files_get_the_usual_permissions() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain");
        File::create(&plain).unwrap();
        let p = dir.path().join("atomic");
        write_bytes_atomic(&p, b"x").unwrap();
        let mode = |f: &Path| std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&p), mode(&plain), "as File::create makes them (0o666 less the umask)");
        assert_ne!(mode(&p) & 0o044, 0, "readable by others under the usual umask");
    }

    #[test]
    fn two_writers_of_one_file_never_share_a_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("same.bin");
        // Both temporary files exist at once: their names differ, and each write is whole.
        write_atomic(&p, |a| {
            a.write_all(&[1; 1000])?;
            write_bytes_atomic(&p, &[2; 10])?;
            let t = temps(dir.path());
            assert_eq!(t.len(), 1, "{t:?}");
            assert_eq!(target_of_temp(&t[0]), Some("same.bin"));
            Ok(())
        })
        .unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), vec![1; 1000]);
        assert_eq!(target_of_temp(".step_00000010.safetensors.Ab3dEf.partial"), Some("step_00000010.safetensors"));
        assert_eq!(target_of_temp("step_1.png"), None);
        assert_eq!(target_of_temp(".x.partial"), None);
    }
}
