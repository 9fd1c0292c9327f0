//! jq programs: compiled with jaq (a Rust implementation of jq) into a filter the worker
//! runs on every record. Validation compiles too, so a program that does not compile is
//! refused where the configuration is checked (by the worker at start-up, by the operator
//! as an `InvalidSpec` condition) with jq's message and the line and column.

use jaq_core::load::{Arena, File, Loader};
use jaq_core::{data, Compiler};
use jaq_json::Val;

/// A compiled jq program.
pub type Filter = jaq_core::compile::Filter<jaq_core::Native<data::JustLut<Val>>>;

/// The variables every program may use, in the order the worker passes their values.
pub const VARS: [&str; 6] = [
    "$key",
    "$topic",
    "$partition",
    "$offset",
    "$timestamp",
    "$headers",
];

/// Why a jq program did not compile: each message names the position (a byte offset and
/// the line and column) in the program.
#[derive(Debug, thiserror::Error)]
#[error("the jq program does not compile: {}", .0.join("; "))]
pub struct CompileError(pub Vec<String>);

fn position(code: &str, at: &str) -> String {
    // `at` is a slice of `code` (or an empty slice at its end).
    let off = (at.as_ptr() as usize)
        .saturating_sub(code.as_ptr() as usize)
        .min(code.len());
    let before = &code[..off];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    let near: String = code[off..].chars().take(12).collect();
    if near.is_empty() {
        format!("at line {line}, column {col} (end of program)")
    } else {
        format!("at line {line}, column {col} (near `{near}`)")
    }
}

/// Compile `program`.
pub fn compile(program: &str) -> Result<Filter, CompileError> {
    let defs = jaq_core::defs()
        .chain(jaq_std::defs())
        .chain(jaq_json::defs());
    let funs = jaq_core::funs()
        .chain(jaq_std::funs())
        .chain(jaq_json::funs());
    let loader = Loader::new(defs);
    let arena = Arena::default();
    let file = File {
        code: program,
        path: (),
    };
    let modules = loader.load(&arena, file).map_err(|errs| {
        let mut out = Vec::new();
        for (file, e) in errs {
            match e {
                jaq_core::load::Error::Lex(v) => {
                    for (expect, at) in v {
                        out.push(format!(
                            "expected {} {}",
                            expect.as_str(),
                            position(file.code, at)
                        ));
                    }
                }
                jaq_core::load::Error::Parse(v) => {
                    for (expect, at) in v {
                        out.push(format!(
                            "expected {} {}",
                            expect.as_str(),
                            position(file.code, at)
                        ));
                    }
                }
                jaq_core::load::Error::Io(v) => {
                    for (path, msg) in v {
                        out.push(format!("cannot load module {path}: {msg}"));
                    }
                }
            }
        }
        CompileError(out)
    })?;
    let filter = Compiler::default()
        .with_funs(funs)
        .with_global_vars(VARS)
        .compile(modules)
        .map_err(|errs| {
            CompileError(
                errs.into_iter()
                    .flat_map(|(file, es)| {
                        es.into_iter().map(move |(name, undefined)| {
                            format!(
                                "undefined {} `{name}` {}",
                                undefined.as_str(),
                                position(file.code, name)
                            )
                        })
                    })
                    .collect(),
            )
        })?;
    Ok(filter)
}
