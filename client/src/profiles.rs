//! The client config file: where it is by default and `kinvoke config`, which shows it
//! and adds, removes and switches profiles (as `kubectl config use-context` does). The
//! default file is `$XDG_CONFIG_HOME/kinvoke/config.toml` (`~/.config/kinvoke/config.toml`),
//! found through the `directories` crate; `--config`/`KINVOKE_CONFIG` name another.
//! Edits keep the file's comments and layout (`toml_edit`) and replace it atomically.

use std::path::{Path, PathBuf};

use toml_edit::{DocumentMut, Item, Table, value};

use crate::conn::LocalError;

/// The default client config file, when the platform has a config directory.
pub fn default_path() -> Option<PathBuf> {
    directories::BaseDirs::new().map(|dirs| dirs.config_dir().join("kinvoke").join("config.toml"))
}

/// The file `kinvoke` reads: the one named, else the default one if it exists.
pub fn path_to_read(named: Option<&Path>) -> Option<PathBuf> {
    match named {
        Some(path) => Some(path.to_owned()),
        None => default_path().filter(|p| p.exists()),
    }
}

/// The file `kinvoke config` edits: the one named, else the default one (created on
/// the first edit).
pub fn path_to_edit(named: Option<&Path>) -> Result<PathBuf, LocalError> {
    named
        .map(Path::to_owned)
        .or_else(default_path)
        .ok_or_else(|| {
            LocalError(
                "this system has no config directory (HOME is not set); name a file with --config"
                    .to_owned(),
            )
        })
}

/// The settings of one profile, as `kinvoke config set-profile` takes them.
#[derive(Debug, Default, Clone)]
pub struct ProfileSettings {
    /// `endpoint`.
    pub endpoint: Option<String>,
    /// `ca_cert`.
    pub ca_cert: Option<PathBuf>,
    /// `client_cert`.
    pub client_cert: Option<PathBuf>,
    /// `client_key`.
    pub client_key: Option<PathBuf>,
    /// `token_file`.
    pub token_file: Option<PathBuf>,
    /// `token_source`.
    pub token_source: Option<String>,
    /// `audience`.
    pub audience: Option<String>,
}

/// A config file being edited.
#[derive(Debug)]
pub struct ConfigFile {
    path: PathBuf,
    doc: DocumentMut,
}

impl ConfigFile {
    /// Reads the file (an empty document when it does not exist yet).
    pub fn open(path: &Path) -> Result<Self, LocalError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(err) => {
                return Err(LocalError(format!(
                    "cannot read client config {}: {err}",
                    path.display()
                )));
            }
        };
        let doc = text.parse::<DocumentMut>().map_err(|e| {
            LocalError(format!(
                "client config {}: {}",
                path.display(),
                e.to_string().trim_end()
            ))
        })?;
        Ok(Self {
            path: path.to_owned(),
            doc,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The profile names, in file order.
    pub fn profiles(&self) -> Vec<String> {
        self.doc
            .get("profiles")
            .and_then(Item::as_table_like)
            .map(|t| t.iter().map(|(k, _)| k.to_owned()).collect())
            .unwrap_or_default()
    }

    /// `default_profile`, if set.
    pub fn default_profile(&self) -> Option<String> {
        self.doc
            .get("default_profile")
            .and_then(Item::as_str)
            .map(str::to_owned)
    }

    fn profiles_table(&mut self) -> Result<&mut Table, LocalError> {
        let path = self.path.display().to_string();
        let item = self.doc.entry("profiles").or_insert_with(|| {
            let mut t = Table::new();
            t.set_implicit(true);
            Item::Table(t)
        });
        item.as_table_mut()
            .ok_or_else(|| LocalError(format!("client config {path}: `profiles` is not a table")))
    }

    /// Adds a profile or changes the settings given (others stay).
    pub fn set_profile(
        &mut self,
        name: &str,
        settings: &ProfileSettings,
    ) -> Result<(), LocalError> {
        check_name(name)?;
        let profiles = self.profiles_table()?;
        let profile = profiles
            .entry(name)
            .or_insert_with(|| Item::Table(Table::new()))
            .as_table_mut()
            .ok_or_else(|| LocalError(format!("profile \"{name}\" is not a table")))?;
        let path_value = |p: &PathBuf| p.display().to_string();
        let pairs = [
            ("endpoint", settings.endpoint.clone()),
            ("ca_cert", settings.ca_cert.as_ref().map(path_value)),
            ("client_cert", settings.client_cert.as_ref().map(path_value)),
            ("client_key", settings.client_key.as_ref().map(path_value)),
            ("token_file", settings.token_file.as_ref().map(path_value)),
            ("token_source", settings.token_source.clone()),
            ("audience", settings.audience.clone()),
        ];
        for (key, setting) in pairs {
            if let Some(setting) = setting {
                profile[key] = value(setting);
            }
        }
        if self.default_profile().is_none() {
            self.doc["default_profile"] = value(name);
        }
        Ok(())
    }

    /// Makes `name` the default profile.
    pub fn use_profile(&mut self, name: &str) -> Result<(), LocalError> {
        if !self.profiles().iter().any(|p| p == name) {
            return Err(self.unknown(name));
        }
        self.doc["default_profile"] = value(name);
        Ok(())
    }

    /// Removes a profile (and the default, if it was the default).
    pub fn delete_profile(&mut self, name: &str) -> Result<(), LocalError> {
        if !self.profiles().iter().any(|p| p == name) {
            return Err(self.unknown(name));
        }
        self.profiles_table()?.remove(name);
        if self.default_profile().as_deref() == Some(name) {
            self.doc.remove("default_profile");
        }
        Ok(())
    }

    fn unknown(&self, name: &str) -> LocalError {
        LocalError(format!(
            "profile \"{name}\" is not in {} (profiles: {})",
            self.path.display(),
            self.profiles().join(", ")
        ))
    }

    /// Writes the file: a new file next to it, then renamed over it, so a reader never
    /// sees half of one.
    pub fn save(&self) -> Result<(), LocalError> {
        let fail = |e: std::io::Error| {
            LocalError(format!(
                "cannot write client config {}: {e}",
                self.path.display()
            ))
        };
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(fail)?;
        let tmp = tempfile::NamedTempFile::new_in(dir).map_err(fail)?;
        std::fs::write(tmp.path(), self.doc.to_string()).map_err(fail)?;
        tmp.persist(&self.path).map_err(|e| fail(e.error))?;
        Ok(())
    }

    /// The file's text.
    pub fn text(&self) -> String {
        self.doc.to_string()
    }
}

fn check_name(name: &str) -> Result<(), LocalError> {
    let ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(LocalError(format!(
            "profile name {name:?}: use letters, digits, '-', '_' and '.'"
        )))
    }
}

/// An absolute form of a path given on the command line, so a profile works from any
/// directory.
pub fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_are_added_switched_and_removed_keeping_comments() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kinvoke").join("config.toml");
        let mut file = ConfigFile::open(&path).unwrap();
        file.set_profile(
            "prod",
            &ProfileSettings {
                endpoint: Some("https://kinvoke.example:8443".into()),
                ca_cert: Some("/etc/kinvoke/ca.crt".into()),
                ..Default::default()
            },
        )
        .unwrap();
        file.save().unwrap();
        // a person adds a comment; later edits keep it
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, format!("# my gateways\n{text}")).unwrap();

        let mut file = ConfigFile::open(&path).unwrap();
        assert_eq!(file.default_profile().as_deref(), Some("prod"));
        file.set_profile(
            "dev",
            &ProfileSettings {
                endpoint: Some("https://127.0.0.1:8443".into()),
                ..Default::default()
            },
        )
        .unwrap();
        file.use_profile("dev").unwrap();
        file.save().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("# my gateways\n"), "{text}");
        let parsed: toml::Value = toml::from_str(&text).unwrap();
        assert_eq!(parsed["default_profile"].as_str(), Some("dev"));
        assert_eq!(
            parsed["profiles"]["prod"]["ca_cert"].as_str(),
            Some("/etc/kinvoke/ca.crt")
        );

        let mut file = ConfigFile::open(&path).unwrap();
        file.delete_profile("dev").unwrap();
        assert_eq!(file.default_profile(), None);
        assert_eq!(file.profiles(), ["prod"]);
        let err = file.use_profile("staging").unwrap_err();
        assert!(err.0.contains("profiles: prod"), "{}", err.0);
        assert!(
            file.set_profile("a b", &ProfileSettings::default())
                .is_err()
        );
    }
}
