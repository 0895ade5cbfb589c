//! Problems with a configuration, each naming the field at fault.
//!
//! Every stage config's `problems()` returns a list of [`Problem`]s instead of text, so that
//! `pipe check` places each one at its field in the pipeline file (from the parser's positions,
//! never from the message's words) and can tell a value given by `--set` from one in the file.

/// One problem with a setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Path of the field at fault inside the config, dot-separated (`"optimizer.lr"`,
    /// `"n_critic"`); empty when the problem is with the config as a whole.
    pub field: String,
    /// What is wrong and what was expected, in words (no position, no stage name).
    pub msg: String,
}

impl Problem {
    /// A problem with `field` (a dot-separated path; `""` for the whole config).
    pub fn new(field: impl Into<String>, msg: impl Into<String>) -> Self {
        Problem { field: field.into(), msg: msg.into() }
    }

    /// The same problem seen from the config that holds this one in its field `outer`: the
    /// path becomes `outer.field` (or `outer` for a whole-config problem).
    pub fn under(mut self, outer: &str) -> Self {
        self.field = if self.field.is_empty() { outer.to_string() } else { format!("{outer}.{}", self.field) };
        self
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.msg)
    }
}

/// The problems of the config held in field `outer`, with their paths made relative to the
/// holder (see [`Problem::under`]).
pub fn under(outer: &str, problems: Vec<Problem>) -> impl Iterator<Item = Problem> + '_ {
    problems.into_iter().map(move |p| p.under(outer))
}

/// Every problem of a configuration, as one error: what a stage's `build` reports (a run never
/// starts with a problem `pipe check` would have found, so this is a last guard). Displayed as
/// the messages, one per line; the problems themselves (with their fields) stay available.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.iter().map(|p| p.msg.as_str()).collect::<Vec<_>>().join("\n"))]
pub struct Problems(pub Vec<Problem>);

/// `Ok` when `problems` is empty, else [`Problems`].
pub fn to_result(problems: Vec<Problem>) -> Result<(), Problems> {
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Problems(problems))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_nest_and_results_join() {
        let p = Problem::new("lr", "lr must be > 0").under("optimizer");
        assert_eq!(p.field, "optimizer.lr");
        assert_eq!(Problem::new("", "bad").under("model").field, "model");
        assert_eq!(to_result(vec![]), Ok(()));
        let e = to_result(vec![p.clone(), Problem::new("x", "two")]).unwrap_err();
        assert_eq!(e.to_string(), "lr must be > 0\ntwo");
        assert_eq!(e.0[1].field, "x");
        assert_eq!(p.to_string(), "lr must be > 0");
    }
}
