//! Reading a pipeline file: RON text → [`Pipeline`], each stage parsed on its own so that one
//! stage's mistake does not hide another's, with every error placed at its line and column.

use super::{line_col, ron_options, source, suggest, Pipeline, PipelineOf, Source, SpecError, StageKind, StageSpecOf};
use serde::Deserialize;
use std::path::Path;

/// A RON error as a message, with a suggestion for a misspelt name.
pub(crate) fn ron_message(e: &ron::Error) -> String {
    match e {
        ron::Error::NoSuchEnumVariant { expected, found, .. } | ron::Error::NoSuchStructField { expected, found, .. } => {
            format!("{e}{}", suggest(found, expected))
        }
        _ => {
            let m = e.to_string();
            if m.contains("Expected opening `(`") {
                format!("{m}: a setting with fields is written with parentheses, even to take all its defaults, e.g. `RmsProp()`, `LossSensitive()`, `Clip(c: 0.01)`")
            } else if m.contains("raw identifier") {
                format!("{m}: fields are written with their names, e.g. `Clip(c: 0.01)`, `Adam(lr: 1e-4)`")
            } else {
                m
            }
        }
    }
}

/// Parse pipeline text. `file` names it in errors. Syntax errors stop at the first; errors in
/// the settings of the stages are all reported, each with its line and column.
pub fn parse(text: &str, file: &str) -> Result<Pipeline, Vec<SpecError>> {
    parse_with_source(text, file).map(|(p, _)| p)
}

/// [`parse`], also returning the [`Source`] for locating later problems.
pub fn parse_with_source(text: &str, file: &str) -> Result<(Pipeline, Source), Vec<SpecError>> {
    // ron points just after a `:`; move past blanks to the value itself.
    let skip_blanks = |line: usize, col: usize| {
        let l = text.lines().nth(line.saturating_sub(1)).unwrap_or("");
        col + l.chars().skip(col.saturating_sub(1)).take_while(|c| *c == ' ' || *c == '\t').count()
    };
    let err = |line: usize, col: usize, e: &ron::Error| SpecError {
        file: file.into(),
        pos: Some((line, skip_blanks(line, col))),
        msg: ron_message(e),
    };
    let mut errs = vec![];
    let raw: PipelineOf<&ron::value::RawValue> = match ron_options().from_str(text) {
        Ok(raw) => raw,
        Err(e) => {
            // A mistake in the top-level fields (not a syntax error): report it, and still
            // check the stages, read with the other top-level fields ignored.
            errs.push(err(e.span.start.line, e.span.start.col, &e.code));
            #[derive(Deserialize)]
            #[serde(rename = "Pipeline")]
            struct StagesOnly<'a> {
                #[serde(borrow, default)]
                stages: Vec<&'a ron::value::RawValue>,
            }
            match ron_options().from_str::<StagesOnly>(text) {
                Ok(only) => PipelineOf { stages: only.stages, ..Default::default() },
                Err(_) => return Err(errs),
            }
        }
    };
    let offset = |snippet: &str| (snippet.as_ptr() as usize).saturating_sub(text.as_ptr() as usize).min(text.len());
    // A position inside a snippet of the text, shifted to the file's line and column.
    let shifted = |start: usize, e: &ron::error::SpannedError| {
        let (l0, c0) = line_col(text, start);
        let (l, c) = (e.span.start.line, e.span.start.col);
        if l <= 1 {
            (l0, c0 + c.saturating_sub(1))
        } else {
            (l0 + l - 1, c)
        }
    };
    let mut stages = vec![];
    let src = Source { file: file.into(), text: text.into(), map: source::SourceMap::scan(text) };
    // Each stage is parsed on its own, so that a mistake in one doesn't hide the others.
    for (i, stage_raw) in raw.stages.iter().enumerate() {
        let stage_text = stage_raw.get_ron();
        let stage_start = offset(stage_text);
        let st: StageSpecOf<&ron::value::RawValue> = match ron_options().from_str(stage_text) {
            Ok(st) => st,
            Err(e) => {
                let (line, col) = shifted(stage_start, &e);
                let mut se = err(line, col, &e.code);
                se.msg = format!("stage {} of {}: {}", i + 1, raw.stages.len(), se.msg);
                errs.push(se);
                continue;
            }
        };
        let ron = st.kind.get_ron();
        let start = offset(ron);
        match ron_options().from_str::<StageKind>(ron) {
            Ok(kind) => stages.push(StageSpecOf { name: st.name.clone(), input: st.input.clone(), queue: st.queue, kind }),
            Err(e) => {
                let (line, col) = shifted(start, &e);
                let mut se = err(line, col, &e.code);
                se.msg = format!("stage `{}`: {}", st.name, se.msg);
                errs.push(se);
            }
        }
    }
    if !errs.is_empty() {
        return Err(errs);
    }
    let p = PipelineOf {
        name: raw.name,
        seed: raw.seed,
        max_steps: raw.max_steps,
        log_every: raw.log_every,
        device: raw.device,
        queue_depth: raw.queue_depth,
        checkpoint: raw.checkpoint,
        on_nonfinite: raw.on_nonfinite,
        execution: raw.execution,
        precision: raw.precision,
        memory_format: raw.memory_format,
        stages,
    };
    Ok((p, src))
}

/// Largest pipeline file [`load`] reads, in bytes.
pub const MAX_PIPELINE_BYTES: u64 = 1_000_000;

/// Read and parse a pipeline file. Errors: unreadable, larger than [`MAX_PIPELINE_BYTES`], not
/// UTF-8, empty, or any parse error.
pub fn load(path: &Path) -> Result<(Pipeline, Source), Vec<SpecError>> {
    let file = path.display().to_string();
    let one = |msg: String| vec![SpecError { file: file.clone(), pos: None, msg }];
    // A pipeline is a few kilobytes; refuse to parse something far bigger (a data file given
    // by mistake) rather than spend time and memory on it.
    match std::fs::metadata(path) {
        Ok(m) if !m.is_file() => {
            return Err(one(if m.is_dir() {
                "a folder, not a pipeline file".into()
            } else {
                "not a regular file (a device or a pipe?)".into()
            }))
        }
        Ok(m) if m.len() > MAX_PIPELINE_BYTES => {
            return Err(one(format!(
                "the file is {:.1} MB; a pipeline file is a few KB (at most {} MB): is this the right file?",
                m.len() as f64 / 1e6,
                MAX_PIPELINE_BYTES / 1_000_000
            )))
        }
        _ => {}
    }
    let mut bytes = vec![];
    {
        use std::io::Read;
        let f = std::fs::File::open(path).map_err(|e| one(format!("cannot read: {e}")))?;
        f.take(MAX_PIPELINE_BYTES + 1).read_to_end(&mut bytes).map_err(|e| one(format!("cannot read: {e}")))?;
    }
    if bytes.len() as u64 > MAX_PIPELINE_BYTES {
        return Err(one(format!(
            "longer than {} MB; a pipeline file is a few KB: is this the right file?",
            MAX_PIPELINE_BYTES / 1_000_000
        )));
    }
    let text = String::from_utf8(bytes).map_err(|e| one(format!("not UTF-8 text: {e}")))?;
    let text = text.strip_prefix('\u{feff}').map(str::to_string).unwrap_or(text); // a UTF-8 BOM
    if text.trim().is_empty() {
        return Err(one("empty file: expected `Pipeline(name: ..., stages: [...])`".into()));
    }
    parse_with_source(&text, &file)
}
