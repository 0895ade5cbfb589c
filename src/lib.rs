//! `pipe`: train GANs (DRAGAN and its relatives) as a streaming pipeline of typed stages,
//! wired by a RON file. See the README for the commands and `pipelines/` for examples.

pub mod bench;
pub mod compare;
pub mod describe;
pub mod eval;
pub mod export;
pub mod launch;
pub mod run;
pub mod sample;
pub mod spec;

/// `eprintln!` that never panics: a full or closed stderr (a log on a full disk) must not
/// abort a run, so write errors are ignored.
#[macro_export]
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($t)*);
    }};
}

/// `print!` to stdout that never panics (a closed pipe, `> /dev/full`).
#[macro_export]
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout(), $($t)*);
    }};
}
