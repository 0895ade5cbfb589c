//! Self-description: `pipe stages`, `pipe stages KIND` and `pipe graph FILE`.
//!
//! The field lists are generated from the JSON schema of the same config types the stages
//! deserialize (doc comments, types and defaults come from the code), so they can't drift.

use crate::spec::{Pipeline, StageKind};
use serde_json::Value;

/// The schema of [`StageKind`] as JSON.
fn kinds_schema() -> Value {
    schemars::schema_for!(StageKind).as_value().clone()
}

/// (kind name, one-line description, config schema) for every stage kind, in declaration order.
fn kinds() -> Vec<(String, String, Value, Value)> {
    let root = kinds_schema();
    let defs = root.get("$defs").cloned().unwrap_or(Value::Null);
    root["oneOf"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| {
            let (name, sub) = v["properties"].as_object()?.iter().next()?;
            let doc = v["description"].as_str().unwrap_or("").to_string();
            Some((name.clone(), doc, resolve(sub, &defs).clone(), defs.clone()))
        })
        .collect()
}

fn resolve<'a>(v: &'a Value, defs: &'a Value) -> &'a Value {
    match v.get("$ref").and_then(|r| r.as_str()).and_then(|r| r.strip_prefix("#/$defs/")) {
        Some(name) => &defs[name],
        None => v,
    }
}

/// A readable type for a field schema: `integer`, `text`, `Penalty: None | Dragan(..) | ...`.
fn type_of(v: &Value, defs: &Value) -> String {
    if let Some(r) = v.get("$ref").and_then(|r| r.as_str()).and_then(|r| r.strip_prefix("#/$defs/")) {
        let d = &defs[r];
        let variants = variants(d);
        return if variants.is_empty() { r.to_string() } else { format!("{r}: {}", variants.join(" | ")) };
    }
    if let Some(any) = v.get("anyOf").and_then(|a| a.as_array()) {
        let parts: Vec<String> = any.iter().filter(|x| x.get("type") != Some(&Value::from("null"))).map(|x| type_of(x, defs)).collect();
        return format!("{} or None", parts.join(" | "));
    }
    match &v["type"] {
        Value::String(t) if t == "string" => "text".into(),
        // A fixed-size array ([u8; 3]) is a tuple in RON: (a, b, c).
        Value::String(t) if t == "array" && v.get("minItems").is_some() && v.get("minItems") == v.get("maxItems") => {
            let n = v["minItems"].as_u64().unwrap_or(0);
            let item = v.get("items").map(|i| type_of(i, defs)).unwrap_or_else(|| "value".into());
            format!("tuple of {n} {item}s, written ({})", vec!["…"; n as usize].join(", "))
        }
        Value::String(t) if t == "array" => {
            let item =
                v.get("items").or_else(|| v.get("prefixItems")).map(|i| if i.is_array() { type_of(&i[0], defs) } else { type_of(i, defs) });
            format!("list of {}", item.unwrap_or_else(|| "values".into()))
        }
        Value::String(t) => t.clone(),
        Value::Array(ts) => ts.iter().filter_map(|t| t.as_str()).filter(|t| *t != "null").collect::<Vec<_>>().join("|") + " or None",
        _ => "value".into(),
    }
}

/// Variant names of an enum schema (`Batch`, `Dragan(..)`).
fn variants(d: &Value) -> Vec<String> {
    let mut out = vec![];
    for alt in d.get("oneOf").or_else(|| d.get("anyOf")).and_then(|a| a.as_array()).into_iter().flatten() {
        if let Some(e) = alt.get("enum").and_then(|e| e.as_array()) {
            out.extend(e.iter().filter_map(|x| x.as_str()).map(str::to_string));
        } else if let Some(c) = alt.get("const").and_then(|c| c.as_str()) {
            out.push(c.to_string());
        } else if let Some(p) = alt.get("properties").and_then(|p| p.as_object()) {
            out.extend(p.keys().map(|k| format!("{k}(..)")));
        }
    }
    if let Some(e) = d.get("enum").and_then(|e| e.as_array()) {
        out.extend(e.iter().filter_map(|x| x.as_str()).map(str::to_string));
    }
    out
}

/// Names of all stage kinds.
pub fn kind_names() -> Vec<String> {
    kinds().into_iter().map(|k| k.0).collect()
}

/// `pipe stages`: one line per stage kind.
pub fn list() -> String {
    kinds().iter().map(|(n, d, _, _)| format!("{n:<14} {}\n", d.lines().next().unwrap_or(""))).collect()
}

/// Input and output caps of a kind, in words, from its declared ports.
fn ports(kind: &str) -> (String, String) {
    let p = StageKind::ports_of(kind);
    let show = |port: Option<pipe_stages::core::ports::Port>, none: &str| port.map_or(none.to_string(), |p| p.caps.to_string());
    (show(p.and_then(|p| p.input), "none (a source)"), show(p.and_then(|p| p.output), "none (a sink)"))
}

/// A stage kind [`describe`] does not know, with the kinds there are (`known`,
/// comma-separated) and a suggestion when one is close (`; did you mean ...?`, or empty).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown stage kind `{kind}`; known kinds: {known}{suggestion}")]
pub struct UnknownKind {
    pub kind: String,
    pub known: String,
    pub suggestion: String,
}

/// `pipe stages KIND`: ports with caps, and every field with type, default and doc.
///
/// Errors: [`UnknownKind`].
pub fn describe(kind: &str) -> Result<String, UnknownKind> {
    let all = kinds();
    let names: Vec<&str> = all.iter().map(|k| k.0.as_str()).collect();
    let Some((name, doc, schema, defs)) = all.iter().find(|k| k.0.eq_ignore_ascii_case(kind)) else {
        return Err(UnknownKind { kind: kind.to_string(), known: names.join(", "), suggestion: crate::spec::suggest(kind, &names) });
    };
    let (inp, out) = ports(name);
    let mut s = format!("{name}\n  {}\n\nports:\n  input:  {inp}\n  output: {out}\n\nfields:\n", doc.replace('\n', "\n  "));
    if let Some(props) = schema.get("properties").and_then(|p| p.as_object()) {
        for (field, v) in props {
            let ty = type_of(v, defs);
            let default = v.get("default").map(|d| ron_like(d)).unwrap_or_else(|| "required".into());
            let fdoc = v.get("description").and_then(|d| d.as_str()).unwrap_or("");
            s += &format!("  {field}: {ty}\n      default: {default}\n      {}\n", fdoc.replace('\n', "\n      "));
        }
    }
    Ok(s)
}

/// A JSON default value written the way RON spells it.
fn ron_like(v: &Value) -> String {
    match v {
        Value::Null => "None".into(),
        // Unit enum variants (`Batch`, `Skip`) are bare words in RON; text is quoted.
        Value::String(s) if s.chars().next().is_some_and(|c| c.is_ascii_uppercase()) && s.chars().all(|c| c.is_ascii_alphanumeric()) => {
            s.clone()
        }
        Value::String(s) => format!("{s:?}"),
        Value::Array(a) => format!("({})", a.iter().map(ron_like).collect::<Vec<_>>().join(", ")),
        Value::Object(o) if o.len() == 1 => {
            let (k, inner) = o.iter().next().expect("one entry");
            match inner {
                Value::Object(f) => {
                    format!("{k}({})", f.iter().map(|(n, x)| format!("{n}: {}", ron_like(x))).collect::<Vec<_>>().join(", "))
                }
                other => format!("{k}({})", ron_like(other)),
            }
        }
        Value::Object(o) => format!("({})", o.iter().map(|(n, x)| format!("{n}: {}", ron_like(x))).collect::<Vec<_>>().join(", ")),
        other => other.to_string(),
    }
}

/// `pipe graph FILE`: the pipeline as a Graphviz DOT digraph; edges are labelled with the item
/// kind they carry.
pub fn dot(p: &Pipeline) -> String {
    let mut s = format!("digraph {:?} {{\n  rankdir=LR;\n  node [shape=box, fontname=\"sans-serif\"];\n", p.name);
    for st in &p.stages {
        s += &format!("  {:?} [label=\"{}\\n{}\"];\n", st.name, st.name, st.kind.name());
    }
    for st in &p.stages {
        for up in &st.input {
            let item = p.stages.iter().find(|o| &o.name == up).and_then(|o| o.kind.ports().produces()).map_or("?", |k| k.name());
            s += &format!("  {up:?} -> {:?} [label=\"{item}\"];\n", st.name);
        }
    }
    s + "}\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_is_listed_with_a_line() {
        let l = list();
        for k in ["IdxLoader", "FolderLoader", "Augment", "DStep", "GStep", "Sampler", "Video", "Gif"] {
            let line = l.lines().find(|x| x.starts_with(k)).unwrap_or_else(|| panic!("{k} missing in\n{l}"));
            assert!(line.len() > k.len() + 10, "{line}");
        }
    }

    #[test]
    fn a_kind_shows_its_ports_fields_types_defaults_and_docs() {
        let d = describe("DStep").unwrap();
        assert!(d.contains("input:  batch[B,C,H,W] f32 in [-1, 1] on cpu, copied to the training device"), "{d}");
        assert!(d.contains("n_critic: integer"), "{d}");
        assert!(d.contains("default: 1"), "{d}");
        assert!(d.contains("penalty: Penalty: None | Dragan(..) | WganGp(..)"), "{d}");
        assert!(d.contains("default: Dragan(lambda: 10.0, k: 1.0)"), "{d}");
        let a = describe("augment").unwrap();
        assert!(a.contains("flip: boolean") && a.contains("default: false"), "{a}");
        assert!(a.contains("default: Dragan(c: 0.5, sigma: Batch, noise: Uniform, interpolate: true)"), "{a}");
        let f = describe("FolderLoader").unwrap();
        assert!(f.contains("background:") && f.contains("default: (255, 255, 255)"), "{f}");
        assert!(f.contains("on_bad_file: OnBadFile: Skip | Fail"), "{f}");
        let e = describe("DStp").unwrap_err().to_string();
        assert!(e.contains("did you mean `DStep`?"), "{e}");
    }

    #[test]
    fn graph_is_dot_with_labelled_edges() {
        let (p, _) = crate::spec::load(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/mnist_mlp.ron")).unwrap();
        let g = dot(&p);
        assert!(g.starts_with("digraph \"mnist_mlp\" {"), "{g}");
        assert!(g.contains("\"loader\" -> \"augment\" [label=\"batch\"];"), "{g}");
        assert!(g.contains("\"d_step\" -> \"g_step\" [label=\"d_done\"];"), "{g}");
        assert!(g.contains("\"sampler\" -> \"video\" [label=\"frame\"];"), "{g}");
        assert!(g.contains("\"g_step\" -> \"eval\" [label=\"images\"];"), "{g}");
        assert!(g.contains("\"sampler\" -> \"tensorboard\" [label=\"frame\"];"), "{g}");
        assert_eq!(g.matches("->").count(), 7);
    }
}
