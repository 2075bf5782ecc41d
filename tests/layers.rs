//! The crate's imports run one way, from `lib.rs` down (src/lib.rs, "Layout"): a module
//! names only modules of lower layers, so there is no import cycle and nothing reaches back
//! up. Test modules (`#[cfg(test)] mod tests`) may use anything.

use std::collections::BTreeSet;
use std::path::Path;

/// Each layer may import only from the layers after it. `fuzzing.rs` comes first: its entry
/// points reach into any module, the crate root's service among them. Then the crate root
/// (`lib.rs`, `error.rs`).
const LAYERS: &[&[&str]] = &[
    &["fuzzing"],
    &["lib"],
    &["http"],
    &["auth", "backend", "tls"],
    &["hub", "secret", "logging"],
    &["domain", "config", "metrics", "shutdown", "systemd"],
];

fn layer(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

/// The top-level module a source file belongs to.
fn module_of(relative: &Path) -> String {
    let first = relative.components().next().expect("a path in src");
    let name = first.as_os_str().to_string_lossy();
    match name.trim_end_matches(".rs") {
        "error" => "lib".to_owned(),
        module => module.to_owned(),
    }
}

/// The top-level modules `source` names through `crate::`, outside its test module.
fn imports(source: &str) -> BTreeSet<String> {
    let source = source
        .split("#[cfg(test)]\nmod tests")
        .next()
        .unwrap_or_default();
    let mut found = BTreeSet::new();
    for (at, _) in source.match_indices("crate::") {
        let rest = &source[at + "crate::".len()..];
        let names = match rest.strip_prefix('{') {
            // `use crate::{a::B, c};`: the first segment of each item.
            Some(group) => group[..group.find('}').unwrap_or(group.len())]
                .split(',')
                .filter_map(|item| item.trim().split("::").next())
                .map(str::to_owned)
                .collect(),
            None => vec![
                rest.chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect::<String>(),
            ],
        };
        for name in names {
            // `crate::Result`, `crate::Error`, `crate::error` and `crate::run` are the root's.
            let module = if name.starts_with(|c: char| c.is_ascii_uppercase())
                || ["error", "run"].contains(&name.as_str())
            {
                "lib".to_owned()
            } else {
                name
            };
            if !module.is_empty() {
                found.insert(module);
            }
        }
    }
    found
}

fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|extension| extension == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn imports_run_from_the_root_down() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    files.sort();
    let mut wrong = Vec::new();
    let mut checked = 0;
    for file in &files {
        let relative = file.strip_prefix(&src).unwrap();
        // main.rs is the binary's crate, not the library's.
        if relative == Path::new("main.rs") {
            continue;
        }
        let module = module_of(relative);
        let Some(own) = layer(&module) else {
            wrong.push(format!(
                "{}: module `{module}` is in no layer",
                relative.display()
            ));
            continue;
        };
        let source = std::fs::read_to_string(file).unwrap();
        for import in imports(&source) {
            checked += 1;
            match layer(&import) {
                _ if import == module => {}
                Some(theirs) if theirs > own => {}
                Some(_) => wrong.push(format!(
                    "{}: `{module}` imports `{import}`, which is not in a lower layer",
                    relative.display()
                )),
                None => wrong.push(format!(
                    "{}: imports `{import}`, which is in no layer",
                    relative.display()
                )),
            }
        }
    }
    assert!(
        checked > 30,
        "only {checked} imports found: is the scan broken?"
    );
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn an_import_back_up_is_found() {
    let source = "use crate::{config::Config, http::Endpoints};\nfn f() -> crate::Result<()> { crate::hub::Hub::new() }\n#[cfg(test)]\nmod tests {\n    use crate::tls;\n}\n";
    assert_eq!(
        imports(source),
        ["config", "http", "hub", "lib"]
            .map(str::to_owned)
            .into_iter()
            .collect()
    );
    assert!(layer("http") < layer("backend"));
}
