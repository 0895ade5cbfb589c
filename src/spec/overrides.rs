//! `--set STAGE.FIELD=VALUE` and `--set FIELD=VALUE`: changing one setting of a parsed pipeline
//! from the command line, with the value parsed as RON against the setting's type.

use super::parse::ron_message;
use super::{ron_options, Pipeline, StageKind};

/// Apply one `--set` override: `STAGE.FIELD=VALUE` for a stage setting or `FIELD=VALUE` for a
/// top-level one (`max_steps`, `seed`, ...). VALUE is RON (`64`, `1e-4`, `true`,
/// `WganGp(lambda: 10.0)`); a bare word for a text field needs no quotes (`loader.root=data/x`).
/// What a `--set` override sets: `(Some(stage), field)` for `STAGE.FIELD=VALUE`, `(None, field)`
/// for a top-level `FIELD=VALUE`; None without `=`.
pub fn override_target(spec: &str) -> Option<(Option<&str>, &str)> {
    let path = spec.split_once('=')?.0.trim();
    Some(match path.split_once('.') {
        Some((stage, field)) => (Some(stage), field),
        None => (None, path),
    })
}

pub fn apply_override(p: &mut Pipeline, spec: &str) -> Result<(), String> {
    let value = spec.split_once('=').ok_or_else(|| format!("--set {spec}: expected STAGE.FIELD=VALUE"))?.1.trim();
    let (stage, field) = override_target(spec).ok_or_else(|| format!("--set {spec}: expected STAGE.FIELD=VALUE"))?;
    match stage {
        None => {
            // Top level: parse `Pipeline(FIELD: VALUE)` and take the field.
            let parsed =
                parse_with_field("Pipeline", field, value, |t| ron_options().from_str::<Pipeline>(t).map(|p| serde_json::to_value(p)))
                    .map_err(|e| format!("--set {spec}: {e}"))?;
            let mut whole = serde_json::to_value(&*p).map_err(|e| e.to_string())?;
            if field == "stages" {
                return Err(format!("--set {spec}: stages can't be set from the command line; edit the file"));
            }
            whole[field] = parsed[field].clone();
            *p = serde_json::from_value(whole).map_err(|e| format!("--set {spec}: {e}"))?;
            Ok(())
        }
        Some(stage) => {
            let known: Vec<&str> = p.stages.iter().map(|s| s.name.as_str()).collect();
            let known = known.join(", ");
            let st = p
                .stages
                .iter_mut()
                .find(|s| s.name == stage)
                .ok_or_else(|| {
                    if stage == "checkpoint" {
                        format!("--set {spec}: `checkpoint` is a top-level setting: write it whole, e.g. --set 'checkpoint=(every: 500, keep: 3)' (or use --checkpoint-every N)")
                    } else {
                        format!("--set {spec}: no stage named `{stage}` (stages: {known})")
                    }
                })?;
            let kind = st.kind.name();
            if matches!(field, "kind" | "name" | "input" | "queue") {
                return Err(format!("--set {spec}: a stage's `{field}` can't be set from the command line; edit the pipeline file"));
            }
            let parsed = parse_with_field(kind, field, value, |t| ron_options().from_str::<StageKind>(t).map(|k| serde_json::to_value(k)))
                .map_err(|e| format!("--set {spec}: stage `{stage}` ({kind}): {e}"))?;
            let mut whole = serde_json::to_value(&st.kind).map_err(|e| e.to_string())?;
            whole[kind][field] = parsed[kind][field].clone();
            st.kind = serde_json::from_value(whole).map_err(|e| format!("--set {spec}: {e}"))?;
            Ok(())
        }
    }
}

/// Parse `Name(field: value)` (every other field taking its default) and return the whole
/// value as JSON. A bare word that isn't valid RON is retried as a quoted string.
fn parse_with_field(
    name: &str,
    field: &str,
    value: &str,
    parse: impl Fn(&str) -> Result<serde_json::Result<serde_json::Value>, ron::error::SpannedError>,
) -> Result<serde_json::Value, String> {
    if field.contains('.') {
        let (head, _) = field.split_once('.').unwrap_or((field, ""));
        let example = match head {
            "optimizer" => "Adam(lr: 2e-4)",
            "penalty" => "Dragan(lambda: 5.0)",
            "model" => "Mlp(hidden: 256)",
            "perturb" => "Dragan(c: 0.3)",
            _ => "Variant(field: value)",
        };
        return Err(format!(
            "`{field}`: nested settings are set as a whole value, e.g. `{head}={example}` (the fields you leave out take their defaults)"
        ));
    }
    if field.is_empty() || !field.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(format!("`{field}` is not a field name"));
    }
    // serde_json has no NaN or infinity, so catch them here with a clear message.
    let non_finite_token = |t: &str| matches!(t.to_ascii_lowercase().as_str(), "nan" | "inf" | "infinity");
    let structured = value.contains('(');
    if value.parse::<f64>().is_ok_and(|v| !v.is_finite())
        || (structured && value.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).any(non_finite_token))
    {
        return Err(format!("bad value `{value}`: numbers must be finite"));
    }
    let first = parse(&format!("{name}({field}: {value})"));
    let result = match first {
        Ok(v) => v,
        Err(e) => {
            let quoted = format!("{name}({field}: {:?})", value);
            match parse(&quoted) {
                Ok(v) => v,
                Err(_) => return Err(format!("bad value `{value}`: {}", ron_message(&e.code))),
            }
        }
    };
    result.map_err(|e| e.to_string())
}
