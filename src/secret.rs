//! Files that hold secrets: the token, the Redis password, TLS keys, NATS credentials.

use std::path::Path;

use slog::{Logger, warn};

/// Reads the secret in `path` as text, less the line break that editors and `echo` leave at
/// its end, and warns as [`check_permissions`] does. `what` names the file in the warning.
pub fn read(path: &Path, what: &str, log: &Logger) -> std::io::Result<String> {
    check_permissions(path, what, log);
    let mut text = std::fs::read_to_string(path)?;
    text.truncate(text.trim_end_matches(['\r', '\n']).len());
    Ok(text)
}

/// Warns when the file at `path` can be read by users other than its owner and group.
pub fn check_permissions(path: &Path, what: &str, log: &Logger) {
    if readable_by_others(path) {
        warn!(log, "the {what} file is readable by other users"; "path" => %path.display());
    }
}

/// Files under `$CREDENTIALS_DIRECTORY` are exempt: systemd gives them to the service alone.
fn readable_by_others(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let in_credentials = std::env::var_os("CREDENTIALS_DIRECTORY")
        .is_some_and(|directory| path.starts_with(directory));
    !in_credentials
        && std::fs::metadata(path).is_ok_and(|metadata| metadata.permissions().mode() & 0o004 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn world_readable_secret_files_are_noticed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "t").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(readable_by_others(&path));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(!readable_by_others(&path));
    }

    #[test]
    fn only_the_final_line_break_is_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("password");
        let log = Logger::root(slog::Discard, slog::o!());
        for (written, read_back) in [
            ("secret\n", "secret"),
            ("secret\r\n", "secret"),
            (" secret with spaces \n", " secret with spaces "),
            ("secret", "secret"),
            ("", ""),
        ] {
            std::fs::write(&path, written).unwrap();
            assert_eq!(
                read(&path, "password", &log).unwrap(),
                read_back,
                "{written:?}"
            );
        }
    }
}
