//! Python virtualenvs under `target/` for the steps that run Python (the llama.cpp peer of
//! `cargo xtask bench`, the openai client test): made once, and installed into again only when
//! what they should hold changes, which a stamp file inside the virtualenv records.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::run_step;

/// A virtualenv and what it should hold.
pub struct Venv<'a> {
    /// Its directory (under `target/`).
    pub dir: PathBuf,
    /// The module `python -c "import MODULE"` must find once it is installed.
    pub module: &'a str,
    /// Names what is installed (a pinned requirement, build flags...): a virtualenv whose stamp
    /// says otherwise is installed into again.
    pub stamp: &'a str,
    /// The stamp file's name inside `dir`.
    pub stamp_file: &'a str,
}

impl Venv<'_> {
    /// The virtualenv's Python, ready: the virtualenv is created if missing, and `install`
    /// (given that Python) runs when the module is missing or the stamp differs. The stamp is
    /// written only after an install whose module imports.
    pub fn python(&self, install: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
        let python = self.dir.join("bin/python");
        let stamp_path = self.dir.join(self.stamp_file);
        let installed = std::fs::read_to_string(&stamp_path).unwrap_or_default();
        if installed == self.stamp && self.imports(&python) {
            return Ok(python);
        }
        if !python.exists() {
            self.create()?;
        }
        // A failed install must not leave the old stamp vouching for what is there now.
        let _ = std::fs::remove_file(&stamp_path);
        install(&python)?;
        if !self.imports(&python) {
            bail!(
                "the install into {} finished but `import {}` fails there; delete that directory \
                 and try again",
                self.dir.display(),
                self.module
            );
        }
        std::fs::write(&stamp_path, self.stamp)
            .with_context(|| format!("writing {}", stamp_path.display()))?;
        Ok(python)
    }

    fn imports(&self, python: &Path) -> bool {
        Command::new(python)
            .args(["-c", &format!("import {}", self.module)])
            .output()
            .is_ok_and(|o| o.status.success())
    }

    fn create(&self) -> Result<()> {
        let created = run_step(
            &format!("create the virtualenv {}", self.dir.display()),
            Command::new("python3").args(["-m", "venv"]).arg(&self.dir),
        );
        if created.is_err() {
            // A half-made virtualenv (Debian's python3 without venv leaves one with no pip)
            // would be taken for a usable one next time.
            let _ = std::fs::remove_dir_all(&self.dir);
        }
        created.with_context(|| {
            format!(
                "creating {}: install Python 3 with its venv module and pip (Debian/Ubuntu: \
                 apt-get install python3 python3-venv python3-pip)",
                self.dir.display()
            )
        })
    }
}

/// `python -m pip install --quiet --disable-pip-version-check`, for the packages to be added.
pub fn pip_install(python: &Path) -> Command {
    let mut cmd = Command::new(python);
    cmd.args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
    ]);
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs python3 with venv, like the steps that use this module.
    #[test]
    fn installs_once_and_again_when_the_stamp_changes() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut venv = Venv {
            dir: dir.path().join("venv"),
            module: "agentkv_stamp_probe",
            stamp: "v1",
            stamp_file: "agentkv-stamp",
        };
        // "Installs" a one-line module into the virtualenv's site-packages.
        let installs = std::cell::Cell::new(0);
        let install = |python: &Path| -> Result<()> {
            installs.set(installs.get() + 1);
            let out = Command::new(python)
                .args([
                    "-c",
                    "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                ])
                .output()?;
            let site = String::from_utf8(out.stdout)?;
            std::fs::write(
                Path::new(site.trim()).join("agentkv_stamp_probe.py"),
                format!("STAMP = {:?}\n", installs.get()),
            )?;
            Ok(())
        };
        let python = venv.python(install).expect("made and installed");
        assert!(python.exists());
        assert_eq!(installs.get(), 1);
        venv.python(install).expect("already there");
        assert_eq!(
            installs.get(),
            1,
            "an up-to-date virtualenv is not installed into again"
        );
        venv.stamp = "v2";
        venv.python(install).expect("installed again");
        assert_eq!(installs.get(), 2, "a changed stamp installs again");

        let failing = |_: &Path| -> Result<()> { bail!("pip failed") };
        venv.stamp = "v3";
        assert!(venv.python(failing).is_err());
        venv.stamp = "v2";
        venv.python(install).expect("installed again");
        assert_eq!(
            installs.get(),
            3,
            "a failed install removes the stamp, so the old one does not vouch for it"
        );
    }
}
