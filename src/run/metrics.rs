//! metrics.csv: one row per logged step, eval scores filled in later.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Header of metrics.csv. `fid`, `kid` (mean over the subsets) and `is` (IS-style score, mean
/// over the splits) are filled at the steps an eval stage scored, empty elsewhere.
pub const METRICS_HEADER: &str = "step,elapsed_s,d_loss,g_loss,penalty,grad_norm,img_per_s,fid,kid,is";

/// The header of runs written before the eval columns (their rows get three empty cells).
pub(super) const METRICS_HEADER_V0: &str = "step,elapsed_s,d_loss,g_loss,penalty,grad_norm,img_per_s";

/// metrics.csv as it is written: a row per logged step, at once (so a killed run loses no
/// row a checkpoint covers), with its `fid,kid,is` cells empty; an eval stage's scores, which
/// come a moment later, are then filled into their step's row by rewriting the file
/// atomically (it is small: a row per logged step).
pub struct MetricsWriter {
    path: PathBuf,
    w: std::io::BufWriter<std::fs::File>,
}

impl MetricsWriter {
    /// Open `<run_dir>/metrics.csv`: a new file with the header, or (`resumed`, with rows kept
    /// up to the checkpoint) the old one to append to. Errors: the file cannot be made.
    pub fn open(run_dir: &Path, resumed: bool) -> std::io::Result<Self> {
        let path = run_dir.join("metrics.csv");
        let append = resumed && std::fs::metadata(&path).is_ok_and(|m| m.len() > 0);
        let f = if append { std::fs::OpenOptions::new().append(true).open(&path)? } else { std::fs::File::create(&path)? };
        let mut w = MetricsWriter { path, w: std::io::BufWriter::new(f) };
        if !append {
            writeln!(w.w, "{METRICS_HEADER}")?;
        }
        Ok(w)
    }
    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// Flush what is buffered.
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.w.flush()
    }
    /// A logged step's row (the first seven cells).
    pub fn row(&mut self, cells: String) -> std::io::Result<()> {
        writeln!(self.w, "{cells},,,")?;
        self.w.flush()
    }
    /// Fill the eval cells of `step`'s row (no change if there is no such row).
    pub fn scores(&mut self, step: u64, s: &pipe_stages::core::item::Scores) -> std::io::Result<()> {
        self.w.flush()?;
        let text = std::fs::read_to_string(&self.path)?;
        let is = s.is_fake.map(|(m, _)| format!("{m:.4}")).unwrap_or_default();
        let prefix = format!("{step},");
        let mut out = String::with_capacity(text.len() + 64);
        let mut found = false;
        for line in text.lines() {
            if !found && line.starts_with(&prefix) {
                found = true;
                let cells: Vec<&str> = line.split(',').collect();
                out += &format!("{},{:.4},{:.6},{is}\n", cells[..7.min(cells.len())].join(","), s.fid, s.kid_mean);
            } else {
                out += line;
                out.push('\n');
            }
        }
        if !found {
            return Ok(());
        }
        pipe_stages::io::atomic::write_bytes_atomic(&self.path, out.as_bytes())?;
        // The old file was replaced: append to the new one from now on.
        self.w = std::io::BufWriter::new(std::fs::OpenOptions::new().append(true).open(&self.path)?);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_rows_are_written_at_once_and_scores_filled_in_later() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.csv");
        std::fs::write(&path, format!("{METRICS_HEADER}\n")).unwrap();
        let mut m =
            MetricsWriter { path: path.clone(), w: std::io::BufWriter::new(std::fs::OpenOptions::new().append(true).open(&path).unwrap()) };
        m.row("10,1.0,1,2,3,4,5".into()).unwrap();
        m.row("20,2.0,1,2,3,4,5".into()).unwrap();
        // Both rows are on disk before any score (a killed run keeps them).
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 3);
        let s = pipe_stages::core::item::Scores {
            fid: 12.5,
            kid_mean: 0.25,
            kid_std: 0.01,
            is_fake: Some((7.0, 0.1)),
            is_real: None,
            kid_size: 10,
            kid_subsets: 3,
        };
        m.scores(10, &s).unwrap();
        m.row("30,3.0,1,2,3,4,5".into()).unwrap();
        m.scores(99, &s).unwrap(); // no such row: nothing changes
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines, [METRICS_HEADER, "10,1.0,1,2,3,4,5,12.5000,0.250000,7.0000", "20,2.0,1,2,3,4,5,,,", "30,3.0,1,2,3,4,5,,,"]);
        // No temporary file left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
