//! `--set STAGE.FIELD=VALUE` and `--set FIELD=VALUE`: changing one setting of a parsed pipeline
//! from the command line, with the value parsed as RON against the setting's type.

use super::parse::ron_message;
use super::{ron_options, Pipeline, StageKind};

/// Why a `--set` override could not be applied; the message starts with `--set SPEC:`.
#[derive(Debug, thiserror::Error)]
pub enum OverrideError {
    /// Not `STAGE.FIELD=VALUE` or `FIELD=VALUE`.
    #[error("--set {spec}: expected STAGE.FIELD=VALUE")]
    Syntax { spec: String },
    /// The value of a top-level field does not parse (or is a nested path, or no field name).
    #[error("--set {spec}: {source}")]
    Value { spec: String, source: ValueError },
    /// `stages` given from the command line.
    #[error("--set {spec}: stages can't be set from the command line; edit the file")]
    Stages { spec: String },
    /// The pipeline with the new value is not a valid pipeline (or stage kind).
    #[error("--set {spec}: {source}")]
    Invalid { spec: String, source: serde_json::Error },
    /// The pipeline (or stage kind) cannot be taken apart as JSON (a bug).
    #[error("{0}")]
    Json(serde_json::Error),
    /// `checkpoint.FIELD=...`: the checkpoint is a top-level setting, set as a whole.
    #[error(
        "--set {spec}: `checkpoint` is a top-level setting: write it whole, e.g. --set 'checkpoint=(every: 500, keep: 3)' (or use --checkpoint-every N)"
    )]
    CheckpointField { spec: String },
    /// No stage of that name (`known`: the stages there are, comma-separated).
    #[error("--set {spec}: no stage named `{stage}` (stages: {known})")]
    NoStage { spec: String, stage: String, known: String },
    /// A stage's `kind`, `name`, `input` or `queue`.
    #[error("--set {spec}: a stage's `{field}` can't be set from the command line; edit the pipeline file")]
    Fixed { spec: String, field: String },
    /// The value of a stage setting does not parse.
    #[error("--set {spec}: stage `{stage}` ({kind}): {source}")]
    StageValue { spec: String, stage: String, kind: &'static str, source: ValueError },
}

/// Why the VALUE of a `--set` does not parse for its field (no `--set` prefix:
/// [`OverrideError`] adds it).
#[derive(Debug, thiserror::Error)]
pub enum ValueError {
    /// A dotted path into a nested setting (`optimizer.lr`), with an example of the whole value
    /// of the setting it is in (`optimizer`).
    #[error(
        "`{field}`: nested settings are set as a whole value, e.g. `{}={example}` (the fields you leave out take their defaults)",
        field.split_once('.').map_or(field.as_str(), |(head, _)| head)
    )]
    Nested { field: String, example: &'static str },
    /// The field is not a plain name.
    #[error("`{0}` is not a field name")]
    NotAField(String),
    /// NaN or an infinity, which the settings cannot hold.
    #[error("bad value `{0}`: numbers must be finite")]
    NonFinite(String),
    /// Not RON of the setting's type (`msg`: the parser's message, with a suggestion).
    #[error("bad value `{value}`: {msg}")]
    Bad { value: String, msg: String },
    /// The parsed value cannot be converted to JSON.
    #[error("{0}")]
    Json(#[from] serde_json::Error),
}

/// What a `--set` override sets: `(Some(stage), field)` for `STAGE.FIELD=VALUE`, `(None, field)`
/// for a top-level `FIELD=VALUE`; None without `=`.
pub fn override_target(spec: &str) -> Option<(Option<&str>, &str)> {
    let path = spec.split_once('=')?.0.trim();
    Some(match path.split_once('.') {
        Some((stage, field)) => (Some(stage), field),
        None => (None, path),
    })
}

/// Apply one `--set` override: `STAGE.FIELD=VALUE` for a stage setting or `FIELD=VALUE` for a
/// top-level one (`max_steps`, `seed`, ...). VALUE is RON (`64`, `1e-4`, `true`,
/// `WganGp(lambda: 10.0)`); a bare word for a text field needs no quotes (`loader.root=data/x`).
///
/// Errors: [`OverrideError`], naming the `--set`: bad syntax, an unknown stage, a setting that
/// can't be set from the command line, a value that does not parse or makes an invalid
/// pipeline.
pub fn apply_override(p: &mut Pipeline, spec: &str) -> Result<(), OverrideError> {
    let syntax = || OverrideError::Syntax { spec: spec.to_string() };
    let value = spec.split_once('=').ok_or_else(syntax)?.1.trim();
    let (stage, field) = override_target(spec).ok_or_else(syntax)?;
    let invalid = |source| OverrideError::Invalid { spec: spec.to_string(), source };
    match stage {
        None => {
            // Top level: parse `Pipeline(FIELD: VALUE)` and take the field.
            let parsed =
                parse_with_field("Pipeline", field, value, |t| ron_options().from_str::<Pipeline>(t).map(|p| serde_json::to_value(p)))
                    .map_err(|source| OverrideError::Value { spec: spec.to_string(), source })?;
            let mut whole = serde_json::to_value(&*p).map_err(OverrideError::Json)?;
            if field == "stages" {
                return Err(OverrideError::Stages { spec: spec.to_string() });
            }
            whole[field] = parsed[field].clone();
            *p = serde_json::from_value(whole).map_err(invalid)?;
            Ok(())
        }
        Some(stage) => {
            let known: Vec<&str> = p.stages.iter().map(|s| s.name.as_str()).collect();
            let known = known.join(", ");
            let st = p.stages.iter_mut().find(|s| s.name == stage).ok_or_else(|| {
                if stage == "checkpoint" {
                    OverrideError::CheckpointField { spec: spec.to_string() }
                } else {
                    OverrideError::NoStage { spec: spec.to_string(), stage: stage.to_string(), known }
                }
            })?;
            let kind = st.kind.name();
            if matches!(field, "kind" | "name" | "input" | "queue") {
                return Err(OverrideError::Fixed { spec: spec.to_string(), field: field.to_string() });
            }
            let parsed = parse_with_field(kind, field, value, |t| ron_options().from_str::<StageKind>(t).map(|k| serde_json::to_value(k)))
                .map_err(|source| OverrideError::StageValue { spec: spec.to_string(), stage: stage.to_string(), kind, source })?;
            let mut whole = serde_json::to_value(&st.kind).map_err(OverrideError::Json)?;
            whole[kind][field] = parsed[kind][field].clone();
            st.kind = serde_json::from_value(whole).map_err(invalid)?;
            Ok(())
        }
    }
}

/// Parse `Name(field: value)` (every other field taking its default) and return the whole
/// value as JSON. A bare word that isn't valid RON is retried as a quoted string; a value that
/// opens a quote is not (`"tb` is a string left open, not the text `"tb`).
fn parse_with_field(
    name: &str,
    field: &str,
    value: &str,
    parse: impl Fn(&str) -> Result<serde_json::Result<serde_json::Value>, ron::error::SpannedError>,
) -> Result<serde_json::Value, ValueError> {
    if field.contains('.') {
        let (head, _) = field.split_once('.').unwrap_or((field, ""));
        let example = match head {
            "optimizer" => "Adam(lr: 2e-4)",
            "penalty" => "Dragan(lambda: 5.0)",
            "model" => "Mlp(hidden: 256)",
            "perturb" => "Dragan(c: 0.3)",
            _ => "Variant(field: value)",
        };
        return Err(ValueError::Nested { field: field.to_string(), example });
    }
    if field.is_empty() || !field.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(ValueError::NotAField(field.to_string()));
    }
    // serde_json has no NaN or infinity, so catch them here with a clear message.
    let non_finite_token = |t: &str| matches!(t.to_ascii_lowercase().as_str(), "nan" | "inf" | "infinity");
    let structured = value.contains('(');
    if value.parse::<f64>().is_ok_and(|v| !v.is_finite())
        || (structured && value.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).any(non_finite_token))
    {
        return Err(ValueError::NonFinite(value.to_string()));
    }
    let first = parse(&format!("{name}({field}: {value})"));
    let result = match first {
        Ok(v) => v,
        Err(e) if value.trim_start().starts_with('"') => {
            let v = value.trim();
            let msg = if v.len() < 2 || !v.ends_with('"') {
                let text = v.trim_matches('"');
                format!("the quote is not closed: write \"{text}\" with both quotes, or {text} with none")
            } else {
                ron_message(&e.code)
            };
            return Err(ValueError::Bad { value: value.to_string(), msg });
        }
        Err(e) => {
            let quoted = format!("{name}({field}: {:?})", value);
            match parse(&quoted) {
                Ok(v) => v,
                Err(_) => return Err(ValueError::Bad { value: value.to_string(), msg: ron_message(&e.code) }),
            }
        }
    };
    Ok(result?)
}
