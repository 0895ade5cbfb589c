//! Where each setting sits in a pipeline file: the line and column of every key, found by
//! scanning the RON text token by token. Comments (`//`, nested `/* */`), strings (plain and
//! raw) and characters are skipped as wholes, so a comment or a string that mentions a setting
//! never stands in for the setting itself.
//!
//! Keys are recorded by their path: top-level keys as `max_steps`, `checkpoint.every`; a stage's
//! keys per stage (in file order, each with the stage's `name` when it is a string) as `name`,
//! `input`, `kind`, `kind.optimizer`, `kind.optimizer.lr`. An enum variant's name (`DStep`,
//! `Adam`) is not part of a path: `kind: DStep(n_critic: 5)` gives `kind.n_critic`.

/// A 1-based line and column (the column counted in characters).
pub type Pos = (usize, usize);

/// Positions of the keys of a pipeline file (see the module docs).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SourceMap {
    /// Top-level keys (inside `Pipeline(...)`, outside `stages`), by path.
    top: Vec<(String, Pos)>,
    /// The stages, in file order.
    stages: Vec<StageSpan>,
}

/// One stage's entry in the `stages` list.
#[derive(Debug, Clone, PartialEq)]
struct StageSpan {
    /// The value of its `name` key when that is a string.
    name: Option<String>,
    /// Its opening parenthesis.
    open: Pos,
    /// Its keys, by path (`name`, `kind.optimizer.lr`).
    keys: Vec<(String, Pos)>,
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Open(char),
    Close,
    Colon,
    Comma,
    Other,
}

/// Split `text` into tokens with their positions; comments and blanks are dropped.
fn tokens(text: &str) -> Vec<(Tok, Pos)> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = vec![];
    let (mut i, mut line, mut col) = (0usize, 1usize, 1usize);
    // Advance over `n` characters, keeping line and column.
    let step = |i: &mut usize, line: &mut usize, col: &mut usize, n: usize| {
        for _ in 0..n {
            if *i >= chars.len() {
                return;
            }
            if chars[*i] == '\n' {
                *line += 1;
                *col = 1;
            } else {
                *col += 1;
            }
            *i += 1;
        }
    };
    let ident_char = |c: char| c.is_alphanumeric() || c == '_';
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        let pos = (line, col);
        if c.is_whitespace() {
            step(&mut i, &mut line, &mut col, 1);
        } else if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                step(&mut i, &mut line, &mut col, 1);
            }
        } else if c == '/' && next == Some('*') {
            // RON's block comments nest.
            let mut depth = 0usize;
            loop {
                if i >= chars.len() {
                    break;
                }
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    step(&mut i, &mut line, &mut col, 2);
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    step(&mut i, &mut line, &mut col, 2);
                    if depth == 0 {
                        break;
                    }
                } else {
                    step(&mut i, &mut line, &mut col, 1);
                }
            }
        } else if c == '"' {
            let mut s = String::new();
            step(&mut i, &mut line, &mut col, 1);
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' && i + 1 < chars.len() {
                    s.push(chars[i + 1]);
                    step(&mut i, &mut line, &mut col, 2);
                } else {
                    s.push(chars[i]);
                    step(&mut i, &mut line, &mut col, 1);
                }
            }
            step(&mut i, &mut line, &mut col, 1);
            out.push((Tok::Str(s), pos));
        } else if c == 'r' && matches!(next, Some('"') | Some('#')) && raw_string_hashes(&chars[i + 1..]).is_some() {
            // A raw string: r"..." or r#"..."# (any number of #).
            let hashes = raw_string_hashes(&chars[i + 1..]).unwrap_or(0);
            step(&mut i, &mut line, &mut col, 2 + hashes);
            let mut s = String::new();
            while i < chars.len() {
                if chars[i] == '"' && chars[i + 1..].iter().take(hashes).filter(|h| **h == '#').count() == hashes {
                    step(&mut i, &mut line, &mut col, 1 + hashes);
                    break;
                }
                s.push(chars[i]);
                step(&mut i, &mut line, &mut col, 1);
            }
            out.push((Tok::Str(s), pos));
        } else if c == '\'' {
            // A character: 'x' or '\n'.
            let len = if next == Some('\\') { 4 } else { 3 };
            step(&mut i, &mut line, &mut col, len);
            out.push((Tok::Other, pos));
        } else if c.is_alphabetic() || c == '_' {
            // An identifier; `r#name` is a raw identifier.
            if c == 'r' && next == Some('#') && chars.get(i + 2).is_some_and(|c| c.is_alphabetic() || *c == '_') {
                step(&mut i, &mut line, &mut col, 2);
            }
            let start = i;
            while i < chars.len() && ident_char(chars[i]) {
                step(&mut i, &mut line, &mut col, 1);
            }
            out.push((Tok::Ident(chars[start..i].iter().collect()), pos));
        } else if c.is_ascii_digit() || matches!(c, '-' | '+' | '.') {
            // A number (1e-4, -3, 0x1f, .5): its letters are not identifiers.
            step(&mut i, &mut line, &mut col, 1);
            while i < chars.len()
                && (ident_char(chars[i]) || chars[i] == '.' || (matches!(chars[i], '-' | '+') && matches!(chars[i - 1], 'e' | 'E')))
            {
                step(&mut i, &mut line, &mut col, 1);
            }
            out.push((Tok::Other, pos));
        } else {
            step(&mut i, &mut line, &mut col, 1);
            out.push((
                match c {
                    '(' | '[' | '{' => Tok::Open(c),
                    ')' | ']' | '}' => Tok::Close,
                    ':' => Tok::Colon,
                    ',' => Tok::Comma,
                    _ => Tok::Other,
                },
                pos,
            ));
        }
    }
    out
}

/// For the text after an `r`: the number of `#` before a `"` when it opens a raw string.
fn raw_string_hashes(after_r: &[char]) -> Option<usize> {
    let hashes = after_r.iter().take_while(|c| **c == '#').count();
    (after_r.get(hashes) == Some(&'"')).then_some(hashes)
}

/// An open bracket while scanning: the key path its keys extend, and where it sits.
struct Frame {
    prefix: String,
    /// The stage (index into `stages`) this bracket is in, if any.
    stage: Option<usize>,
    /// This is the `stages: [...]` list itself.
    stages_list: bool,
}

impl SourceMap {
    /// Scan pipeline text. Never fails: text that is not valid RON gives a partial map (the
    /// parser reports the syntax error itself).
    pub fn scan(text: &str) -> SourceMap {
        let toks = tokens(text);
        let mut map = SourceMap::default();
        let mut stack: Vec<Frame> = vec![];
        // The path of the key whose value comes next (set by `key:`, used by the next bracket).
        let mut pending: Option<String> = None;
        let mut k = 0;
        while k < toks.len() {
            let (tok, pos) = &toks[k];
            match tok {
                Tok::Ident(word) if matches!(toks.get(k + 1), Some((Tok::Colon, _))) && !stack.is_empty() => {
                    let frame = stack.last().expect("not empty");
                    let path = if frame.prefix.is_empty() { word.clone() } else { format!("{}.{word}", frame.prefix) };
                    match frame.stage {
                        Some(s) => {
                            if path == "name" {
                                if let Some((Tok::Str(v), _)) = toks.get(k + 2) {
                                    map.stages[s].name = Some(v.clone());
                                }
                            }
                            map.stages[s].keys.push((path.clone(), *pos));
                        }
                        None if !frame.stages_list => map.top.push((path.clone(), *pos)),
                        None => {}
                    }
                    pending = Some(path);
                    k += 2;
                    continue;
                }
                Tok::Open(c) => {
                    let frame = match stack.last() {
                        None => Frame { prefix: String::new(), stage: None, stages_list: false },
                        Some(parent) if parent.stages_list && *c == '(' => {
                            map.stages.push(StageSpan { name: None, open: *pos, keys: vec![] });
                            Frame { prefix: String::new(), stage: Some(map.stages.len() - 1), stages_list: false }
                        }
                        Some(parent) => {
                            let top_level = stack.len() == 1;
                            let prefix = pending.clone().unwrap_or_else(|| parent.prefix.clone());
                            let stages_list = top_level && *c == '[' && pending.as_deref() == Some("stages");
                            Frame { prefix, stage: parent.stage, stages_list }
                        }
                    };
                    stack.push(frame);
                    pending = None;
                }
                Tok::Close => {
                    stack.pop();
                    pending = None;
                }
                Tok::Comma => pending = None,
                _ => {}
            }
            k += 1;
        }
        map
    }

    /// Position of a top-level key (`max_steps`, `checkpoint.every`), or of the nearest key on
    /// its path that is written (`checkpoint` for `checkpoint.keep` when the file leaves `keep`
    /// out).
    pub fn top(&self, field: &str) -> Option<Pos> {
        prefixes(field).find_map(|f| self.top.iter().find(|(k, _)| k == f).map(|(_, p)| *p))
    }

    /// Position of `field` of the stage named `stage` (the first stage of that name): a stage's
    /// own keys are `name`, `input`, `queue` and `kind`; any other path is a field of its kind
    /// (`optimizer.lr`). When the field is not written (it takes its default), the nearest key
    /// on its path that is (`optimizer`, then `kind`); `""` or nothing found: the stage's
    /// `name` key, else its opening parenthesis.
    pub fn stage(&self, stage: &str, field: &str) -> Option<Pos> {
        let s = self.stages.iter().find(|s| s.name.as_deref() == Some(stage))?;
        Self::field_in(s, field)
    }

    /// [`SourceMap::stage`] for the stage at position `index` of the `stages` list (what tells
    /// two stages of one name apart).
    pub fn stage_at(&self, index: usize, field: &str) -> Option<Pos> {
        Self::field_in(self.stages.get(index)?, field)
    }

    fn field_in(s: &StageSpan, field: &str) -> Option<Pos> {
        let path = match field {
            "" => String::new(),
            "name" | "input" | "queue" | "kind" => field.to_string(),
            f => format!("kind.{f}"),
        };
        let key = |f: &str| s.keys.iter().find(|(k, _)| k == f).map(|(_, p)| *p);
        let found = prefixes(&path).find_map(key).or_else(|| key("name")).or(Some(s.open));
        found
    }
}

/// `a.b.c`, `a.b`, `a`: a dotted path and its ancestors, longest first (nothing for `""`).
fn prefixes(path: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(path).filter(|p| !p.is_empty());
    std::iter::from_fn(move || {
        let cur = rest?;
        rest = cur.rfind('.').map(|i| &cur[..i]);
        Some(cur)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r##"// name: "comment", max_steps: 1
Pipeline(
    name: "p", /* n_critic: 9 /* nested: 1 */ still: "comment" */
    max_steps: 10,
    checkpoint: (every: 5),
    stages: [
        (name: "loader", kind: IdxLoader(root: "n_critic: 5, a string", batch: 64)),
        // note: n_critic: 5 is the paper's
        (name: "d_step", input: ["loader"], kind: DStep(
            n_critic: 0,
            optimizer: Adam(lr: 1e-4, beta1: 0.5),
            penalty: Dragan(lambda: 10.0),
            note: r#"lr: 3 "quoted" "#,
            c: 'x',
        )),
    ],
)
"##;

    #[test]
    fn keys_are_found_where_they_are_written_not_in_comments_or_strings() {
        let m = SourceMap::scan(TEXT);
        assert_eq!(m.top("name"), Some((3, 5)));
        assert_eq!(m.top("max_steps"), Some((4, 5)));
        assert_eq!(m.top("checkpoint.every"), Some((5, 18)));
        assert_eq!(m.top("checkpoint.keep"), Some((5, 5)), "not written: the nearest written key");
        assert_eq!(m.top("seed"), None);
        assert_eq!(m.stage("d_step", "n_critic"), Some((10, 13)));
        assert_eq!(m.stage("d_step", "optimizer.lr"), Some((11, 29)));
        assert_eq!(m.stage("d_step", "optimizer.beta2"), Some((11, 13)));
        assert_eq!(m.stage("d_step", "penalty.lambda"), Some((12, 29)));
        assert_eq!(m.stage("d_step", "input"), Some((9, 26)));
        assert_eq!(m.stage("d_step", "model"), Some((9, 45)), "a default: the stage's kind");
        assert_eq!(m.stage("d_step", ""), Some((9, 10)));
        assert_eq!(m.stage("loader", "batch"), Some((7, 73)));
        assert_eq!(m.stage("nope", "batch"), None);
        assert_eq!(m.stage_at(1, "n_critic"), Some((10, 13)));
        assert_eq!(m.stage_at(0, "batch"), Some((7, 73)));
        assert_eq!(m.stage_at(2, "batch"), None);
        // Nothing inside the raw string or the character became a key.
        assert!(m.stages[1].keys.iter().all(|(k, _)| k != "kind.lr"));
        assert_eq!(m.stage("d_step", "c"), Some((14, 13)));
    }

    #[test]
    fn broken_text_gives_a_partial_map() {
        let m = SourceMap::scan("Pipeline(\n  name: \"x\",\n  stages: [ (name: \"a\", kind: X(b: \"unterminated");
        assert_eq!(m.top("name"), Some((2, 3)));
        assert_eq!(m.stage("a", "b"), Some((3, 33)));
        assert_eq!(SourceMap::scan(""), SourceMap::default());
    }

    #[test]
    fn prefixes_go_from_longest_to_shortest() {
        assert_eq!(prefixes("a.b.c").collect::<Vec<_>>(), ["a.b.c", "a.b", "a"]);
        assert_eq!(prefixes("").count(), 0);
    }
}
