use std::fmt;
use std::path::{Path, PathBuf};

/// How a command takes one secret: a flag (`--token`), a file flag
/// (`--token-file`) and an environment variable (`ZW_TOKEN`).
#[derive(Debug, Clone, Copy)]
pub struct SecretFlags {
    /// What it is, for messages: `API token`.
    pub what: &'static str,
    pub flag: &'static str,
    pub file_flag: &'static str,
    pub env: &'static str,
}

/// Where a secret was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretOrigin {
    /// On the command line: readable by every user of the host in
    /// `/proc/<pid>/cmdline` (see [`SecretFlags::command_line_warning`]).
    CommandLine(&'static str),
    File(PathBuf),
    Env(&'static str),
}

impl fmt::Display for SecretOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretOrigin::CommandLine(flag) => write!(f, "the command line ({flag})"),
            SecretOrigin::File(p) => write!(f, "{}", p.display()),
            SecretOrigin::Env(v) => write!(f, "${v}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("reading the {what} from {}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} holds no {what} (the file is empty)", path.display())]
    Empty { what: &'static str, path: PathBuf },
}

impl SecretFlags {
    /// The secret from the flag's value, else the file, else the
    /// environment; surrounding whitespace (a file's newline) is dropped,
    /// and an empty flag or variable counts as not given.
    pub fn resolve(
        &self,
        flag: Option<&str>,
        file: Option<&Path>,
    ) -> Result<Option<(String, SecretOrigin)>, SecretError> {
        if let Some(v) = flag.map(str::trim).filter(|v| !v.is_empty()) {
            return Ok(Some((v.to_string(), SecretOrigin::CommandLine(self.flag))));
        }
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| SecretError::Read {
                what: self.what,
                path: path.to_path_buf(),
                source,
            })?;
            let v = text.trim();
            if v.is_empty() {
                return Err(SecretError::Empty {
                    what: self.what,
                    path: path.to_path_buf(),
                });
            }
            return Ok(Some((
                v.to_string(),
                SecretOrigin::File(path.to_path_buf()),
            )));
        }
        Ok(std::env::var(self.env)
            .ok()
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .map(|v| (v, SecretOrigin::Env(self.env))))
    }

    /// [`SecretFlags::resolve`] for a program that needs only the secret:
    /// one given on the command line is warned about on stderr.
    pub fn resolve_warned(
        &self,
        flag: Option<&str>,
        file: Option<&Path>,
    ) -> Result<Option<String>, SecretError> {
        let found = self.resolve(flag, file)?;
        if let Some((_, SecretOrigin::CommandLine(_))) = &found {
            eprintln!("{}", self.command_line_warning());
        }
        Ok(found.map(|(secret, _)| secret))
    }

    /// What to print (on stderr) when the secret came on the command line.
    pub fn command_line_warning(&self) -> String {
        format!(
            "warning: {flag} on the command line is readable by every user of this host \
             (/proc/<pid>/cmdline, ps); give the {what} with {file} PATH or ${env} instead",
            flag = self.flag,
            what = self.what,
            file = self.file_flag,
            env = self.env,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const F: SecretFlags = SecretFlags {
        what: "test token",
        flag: "--token",
        file_flag: "--token-file",
        env: "ZW_UTIL_SECRET_TEST_TOKEN",
    };

    #[test]
    fn flag_then_file_then_environment() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("t");
        std::fs::write(&file, "from-file\n").unwrap();
        // SAFETY: this test is the only user of this variable.
        unsafe { std::env::set_var(F.env, " from-env ") };
        assert_eq!(
            F.resolve(Some("from-flag"), Some(&file)).unwrap(),
            Some((
                "from-flag".to_string(),
                SecretOrigin::CommandLine("--token")
            ))
        );
        assert_eq!(
            F.resolve(None, Some(&file)).unwrap(),
            Some(("from-file".to_string(), SecretOrigin::File(file.clone())))
        );
        assert_eq!(
            F.resolve(Some(""), None).unwrap(),
            Some(("from-env".to_string(), SecretOrigin::Env(F.env)))
        );
        // SAFETY: as above.
        unsafe { std::env::remove_var(F.env) };
        assert_eq!(F.resolve(None, None).unwrap(), None);

        std::fs::write(&file, " \n").unwrap();
        let e = F.resolve(None, Some(&file)).unwrap_err();
        assert!(e.to_string().contains("holds no test token"), "{e}");
        let e = F.resolve(None, Some(&d.path().join("nope"))).unwrap_err();
        assert!(
            e.to_string().starts_with("reading the test token from"),
            "{e}"
        );
        assert!(
            F.command_line_warning()
                .contains("--token-file PATH or $ZW_UTIL_SECRET_TEST_TOKEN")
        );
    }
}
