//! Every internal link of the documentation resolves: in README.md, CHANGELOG.md and
//! docs/*.md, a link to a path of the repository names a file or directory that exists, and a
//! link to `#fragment` (in the same file or in another Markdown file) names a heading there,
//! slugged as GitHub slugs it. Links inside fenced code blocks and code spans are text, not
//! links; links to other sites (`http:`, `https:`, `mailto:`) are not checked.
//!
//! The checker is small and hand-written (no Markdown crate): it knows inline links
//! `[text](target)`, images, reference definitions `[label]: target`, fenced code blocks,
//! code spans (also across lines of one paragraph), backslash escapes and ATX headings (`#`).
//! A checker that finds nothing would pass anything, so it is also run on a document with
//! known broken links, and the README must yield a fair number of links.

use std::collections::{HashMap, HashSet};
use std::path::{Component, Path, PathBuf};

/// The Markdown files whose links are checked, relative to the repository.
fn documents() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![PathBuf::from("README.md"), PathBuf::from("CHANGELOG.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .expect("read docs/")
        .map(|entry| entry.expect("read docs/").path())
        .filter(|path| path.extension().is_some_and(|extension| extension == "md"))
        .map(|path| Path::new("docs").join(path.file_name().expect("a file name")))
        .collect();
    docs.sort();
    files.extend(docs);
    files
}

/// What a link's path names.
enum Target {
    Missing,
    /// A Markdown file, with its text: its headings are the anchors a fragment may name.
    Markdown(String),
    /// A directory or a file of another kind: a fragment on it is not checked.
    Other,
}

/// Looks `path` (relative to the repository, already normalised) up in the working tree.
fn on_disk(path: &Path) -> Target {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    if full.is_file() && full.extension().is_some_and(|extension| extension == "md") {
        Target::Markdown(std::fs::read_to_string(&full).expect("read a Markdown file"))
    } else if full.exists() {
        Target::Other
    } else {
        Target::Missing
    }
}

/// A link destination and the line (1-based) it is on.
#[derive(Debug, PartialEq)]
struct Link {
    line: usize,
    destination: String,
}

/// The result of checking one document.
#[derive(Debug, Default)]
struct Report {
    /// Links checked: every link but those to other sites.
    checked: usize,
    /// One line per broken link: `file:line: (target): what is wrong`.
    broken: Vec<String>,
}

/// Checks every link of `text`, the Markdown file `file` (relative to the repository),
/// looking the paths it names up with `lookup`.
fn check(file: &Path, text: &str, lookup: &dyn Fn(&Path) -> Target) -> Report {
    let mut report = Report::default();
    let directory = file.parent().unwrap_or(Path::new(""));
    for Link { line, destination } in links(text) {
        if ["http://", "https://", "mailto:"]
            .iter()
            .any(|scheme| destination.starts_with(scheme))
        {
            continue;
        }
        report.checked += 1;
        let (path, fragment) = match destination.split_once('#') {
            Some((path, fragment)) => (path, Some(fragment)),
            None => (destination.as_str(), None),
        };
        let mut broken = |what: String| {
            report.broken.push(format!(
                "{}:{line}: ({destination}): {what}",
                file.display()
            ))
        };
        let (shown, target) = if path.is_empty() {
            (file.to_path_buf(), Target::Markdown(text.to_string()))
        } else {
            match normalise(&directory.join(path)) {
                Some(resolved) => {
                    let target = lookup(&resolved);
                    (resolved, target)
                }
                None => {
                    broken("points outside the repository".to_string());
                    continue;
                }
            }
        };
        match (target, fragment) {
            (Target::Missing, _) => broken(format!("{} does not exist", shown.display())),
            (Target::Markdown(target), Some(fragment)) if !anchors(&target).contains(fragment) => {
                broken(format!(
                    "{} has no heading with the anchor #{fragment}",
                    shown.display()
                ))
            }
            _ => {}
        }
    }
    report
}

/// `path` with `.` and `..` resolved lexically; `None` if it climbs above the repository.
fn normalise(path: &Path) -> Option<PathBuf> {
    let mut parts: Vec<&std::ffi::OsStr> = Vec::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => parts.push(part),
            Component::CurDir => {}
            Component::ParentDir => {
                parts.pop()?;
            }
            // An absolute path is not a link into the repository.
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(parts.iter().collect())
}

/// A fenced code block's opening line: its fence character and length.
fn fence(line: &str) -> Option<(char, usize)> {
    let trimmed = line.trim_start();
    let character = trimmed.chars().next()?;
    if character != '`' && character != '~' {
        return None;
    }
    let length = trimmed.chars().take_while(|&c| c == character).count();
    (length >= 3).then_some((character, length))
}

/// Whether `line` closes a block opened with `opening`: the same character, at least as many,
/// and nothing after them.
fn closes(line: &str, (character, length): (char, usize)) -> bool {
    let trimmed = line.trim();
    trimmed.chars().all(|c| c == character) && trimmed.chars().count() >= length
}

/// A block of text outside fenced code: a paragraph (consecutive non-blank lines) or a
/// heading, with the number of its first line.
struct Block {
    first_line: usize,
    text: String,
    heading: bool,
}

/// The blocks of `markdown` outside fenced code blocks, in order.
fn blocks(markdown: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut paragraph: Option<Block> = None;
    let mut open_fence: Option<(char, usize)> = None;
    for (index, line) in markdown.lines().enumerate() {
        let number = index + 1;
        if let Some(opening) = open_fence {
            if closes(line, opening) {
                open_fence = None;
            }
            continue;
        }
        if let Some(opening) = fence(line) {
            blocks.extend(paragraph.take());
            open_fence = Some(opening);
        } else if line.trim().is_empty() {
            blocks.extend(paragraph.take());
        } else if heading_text(line).is_some() {
            blocks.extend(paragraph.take());
            blocks.push(Block {
                first_line: number,
                text: line.to_string(),
                heading: true,
            });
        } else {
            let block = paragraph.get_or_insert_with(|| Block {
                first_line: number,
                text: String::new(),
                heading: false,
            });
            block.text.push_str(line);
            block.text.push('\n');
        }
    }
    blocks.extend(paragraph);
    blocks
}

/// The text of an ATX heading (`## Text ##`), if `line` is one.
fn heading_text(line: &str) -> Option<&str> {
    let trimmed = line.trim_start();
    let level = trimmed.chars().take_while(|&c| c == '#').count();
    if !(1..=6).contains(&level) || line.len() - trimmed.len() > 3 {
        return None;
    }
    let rest = &trimmed[level..];
    if !(rest.is_empty() || rest.starts_with([' ', '\t'])) {
        return None;
    }
    let rest = rest.trim();
    // An optional closing sequence of #s, set off by a space.
    let without_closing = rest.trim_end_matches('#');
    if without_closing.is_empty() {
        return Some("");
    }
    if without_closing.ends_with([' ', '\t']) {
        Some(without_closing.trim_end())
    } else {
        Some(rest)
    }
}

/// Every link of `markdown` outside fenced code blocks and code spans.
fn links(markdown: &str) -> Vec<Link> {
    let mut found = Vec::new();
    for block in blocks(markdown) {
        scan(&block.text, block.first_line, &mut found);
        if !block.heading {
            definitions(&block.text, block.first_line, &mut found);
        }
    }
    found.sort_by_key(|link| link.line);
    found
}

/// The destinations of reference definitions (`[label]: target`) in a paragraph.
fn definitions(text: &str, first_line: usize, found: &mut Vec<Link>) {
    for (offset, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        if line.len() - trimmed.len() > 3 || !trimmed.starts_with('[') {
            continue;
        }
        if let Some((_, rest)) = trimmed.split_once("]:")
            && let Some(destination) = rest.split_whitespace().next()
        {
            found.push(Link {
                line: first_line + offset,
                destination: destination.trim_matches(['<', '>']).to_string(),
            });
        }
    }
}

/// The destinations of inline links and images (`[text](target "title")`) in a block, skipping
/// code spans and escaped characters.
fn scan(text: &str, first_line: usize, found: &mut Vec<Link>) {
    let chars: Vec<char> = text.chars().collect();
    let mut line = first_line;
    let mut open_brackets = 0usize;
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '\n' => {
                line += 1;
                i += 1;
            }
            '\\' => {
                if chars.get(i + 1) == Some(&'\n') {
                    line += 1;
                }
                i += 2;
            }
            '`' => {
                let run = backtick_run(&chars, i);
                match closing_backticks(&chars, i + run, run) {
                    Some(end) => {
                        line += chars[i..end].iter().filter(|&&c| c == '\n').count();
                        i = end;
                    }
                    // No closing run of the same length: the backticks are literal.
                    None => i += run,
                }
            }
            '[' => {
                open_brackets += 1;
                i += 1;
            }
            ']' if open_brackets > 0 => {
                open_brackets -= 1;
                i += 1;
                if chars.get(i) == Some(&'(')
                    && let Some((destination, end)) = destination(&chars, i + 1)
                {
                    if !destination.is_empty() {
                        found.push(Link { line, destination });
                    }
                    line += chars[i..end].iter().filter(|&&c| c == '\n').count();
                    i = end;
                }
            }
            _ => i += 1,
        }
    }
}

/// The length of the run of backticks starting at `start`.
fn backtick_run(chars: &[char], start: usize) -> usize {
    chars[start..].iter().take_while(|&&c| c == '`').count()
}

/// The index just past the first run of exactly `length` backticks at or after `from`.
fn closing_backticks(chars: &[char], from: usize, length: usize) -> Option<usize> {
    let mut i = from;
    while i < chars.len() {
        if chars[i] == '`' {
            let run = backtick_run(chars, i);
            if run == length {
                return Some(i + run);
            }
            i += run;
        } else {
            i += 1;
        }
    }
    None
}

/// A link destination starting at `start` (just after the `(`): the destination without its
/// title, and the index just past the closing `)`.
fn destination(chars: &[char], start: usize) -> Option<(String, usize)> {
    let mut depth = 0usize;
    let mut i = start;
    while i < chars.len() {
        match chars[i] {
            '\\' => i += 1,
            '(' => depth += 1,
            ')' if depth == 0 => {
                let inside: String = chars[start..i].iter().collect();
                let inside = inside.trim();
                let destination = match inside.strip_prefix('<') {
                    Some(rest) => rest.split('>').next().unwrap_or_default(),
                    None => inside.split_whitespace().next().unwrap_or_default(),
                };
                return Some((destination.to_string(), i + 1));
            }
            ')' => depth -= 1,
            _ => {}
        }
        i += 1;
    }
    None
}

/// The anchors GitHub gives the headings of `markdown` (outside fenced code blocks).
fn anchors(markdown: &str) -> HashSet<String> {
    // github-slugger: a repeated slug gets `-1`, `-2`, ..., skipping any already taken.
    let mut occurrences: HashMap<String, usize> = HashMap::new();
    let mut anchors = HashSet::new();
    for block in blocks(markdown).into_iter().filter(|block| block.heading) {
        let base = slug(heading_text(&block.text).unwrap_or_default());
        let mut anchor = base.clone();
        while occurrences.contains_key(&anchor) {
            let count = occurrences.get_mut(&base).expect("the base slug was seen");
            *count += 1;
            anchor = format!("{base}-{count}");
        }
        occurrences.insert(anchor.clone(), 0);
        anchors.insert(anchor);
    }
    anchors
}

/// GitHub's slug of a heading: the rendered text (a link's text, not its target) in lowercase,
/// without everything but letters, digits, spaces, hyphens and underscores, spaces made hyphens.
fn slug(heading: &str) -> String {
    let mut rendered = Vec::new();
    scan_text(heading, &mut rendered);
    rendered
        .iter()
        .collect::<String>()
        .to_lowercase()
        .chars()
        .filter(|&c| c.is_alphanumeric() || c == ' ' || c == '-' || c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The characters of a heading as rendered: inline links replaced by their text.
fn scan_text(heading: &str, rendered: &mut Vec<char>) {
    let chars: Vec<char> = heading.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        if chars[i] == ']'
            && chars.get(i + 1) == Some(&'(')
            && let Some((_, end)) = destination(&chars, i + 2)
        {
            i = end;
            continue;
        }
        rendered.push(chars[i]);
        i += 1;
    }
}

#[test]
fn every_internal_link_of_the_documentation_resolves() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut broken = Vec::new();
    let mut checked = HashMap::new();
    for file in documents() {
        let text = std::fs::read_to_string(root.join(&file))
            .unwrap_or_else(|error| panic!("read {}: {error}", file.display()));
        let report = check(&file, &text, &on_disk);
        println!("{}: {} internal links", file.display(), report.checked);
        checked.insert(file, report.checked);
        broken.extend(report.broken);
    }
    assert!(
        broken.is_empty(),
        "{} broken link(s) in the documentation:\n{}",
        broken.len(),
        broken.join("\n")
    );
    let readme = checked[Path::new("README.md")];
    assert!(
        readme > 10,
        "only {readme} internal links found in README.md: the checker finds too few"
    );
}

#[test]
fn the_checker_reports_exactly_the_broken_links() {
    let document = "\
# Guide

See [the heading](#migrating-from-xy-3x-and-40), [the second one](#details-1), [`etc/x.toml`](../etc/x.toml),
[a directory](../etc/), [another file's heading](other.md#größe), ![an image](../etc/x.toml)
and [a site](https://example.com/#nothing), [mail](mailto:someone@example.com).

## Migrating from `x/y` 3.x and 4.0

## Details

## Details

```sh
# comment
[not a link](missing-in-fence.md)
```

Not links: `[in code](missing-in-span.md)`, ``a `[nested](missing-nested.md)` span``, a code
span `across [two](missing-across.md)
lines`, and \\[escaped](missing-escaped.md).

Broken: [fenced heading](#comment), [no such file](missing.md),
[no such heading](other.md#nope), [a fragment too](missing.md#x), [above the root](../../x).

[reference]: other.md#gone
";
    let lookup = |path: &Path| match path.to_str() {
        Some("docs/other.md") => Target::Markdown("## Größe\n".to_string()),
        Some("etc/x.toml") | Some("etc") => Target::Other,
        _ => Target::Missing,
    };
    let report = check(Path::new("docs/guide.md"), document, &lookup);
    assert_eq!(
        report.broken,
        [
            "docs/guide.md:22: (#comment): docs/guide.md has no heading with the anchor #comment",
            "docs/guide.md:22: (missing.md): docs/missing.md does not exist",
            "docs/guide.md:23: (other.md#nope): docs/other.md has no heading with the anchor #nope",
            "docs/guide.md:23: (missing.md#x): docs/missing.md does not exist",
            "docs/guide.md:23: (../../x): points outside the repository",
            "docs/guide.md:25: (other.md#gone): docs/other.md has no heading with the anchor #gone",
        ],
        "{report:#?}"
    );
    // Six good links on lines 3 and 4, six broken ones; the two to other sites are skipped.
    assert_eq!(report.checked, 12, "{report:#?}");
}

#[test]
fn headings_are_slugged_as_github_slugs_them() {
    let anchors = anchors(
        "# flagsmith-sse\n\
         ## Migrating from the Redis-based `flagsmith/sse` 3.x and 4.0\n\
         ## TLS, HTTP/2 and the publish listener\n\
         ### What bounds the missed targets, and the one at its limit\n\
         ## Größe & Maß_2\n\
         ## See [the guide](https://example.com) ##\n\
         ## Notes\n## Notes\n## Notes-1\n## Notes\n",
    );
    let mut anchors: Vec<&str> = anchors.iter().map(String::as_str).collect();
    anchors.sort();
    assert_eq!(
        anchors,
        [
            "flagsmith-sse",
            "größe--maß_2",
            "migrating-from-the-redis-based-flagsmithsse-3x-and-40",
            "notes",
            "notes-1",
            "notes-1-1",
            "notes-2",
            "see-the-guide",
            "tls-http2-and-the-publish-listener",
            "what-bounds-the-missed-targets-and-the-one-at-its-limit",
        ]
    );
}
