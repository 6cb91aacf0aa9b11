//! A daemon's optional TOML settings file (`--config FILE`, or the
//! daemon's environment variable for it).
//!
//! Keys are the long flag names (`load-timeout-s` or `load_timeout_s`); a
//! flag that may repeat takes an array of strings.
//! Precedence: a flag on the command line, then its environment variable,
//! then the file, then the default. The file's values are turned into
//! arguments for the flags not already given, so clap validates them like
//! any other; an unknown key, a value of the wrong kind or an unreadable
//! file ends the process with status 2 and every problem listed.

use std::ffi::OsString;
use std::path::Path;

use clap::{CommandFactory, FromArgMatches};

/// Parse `args` (program name first) into `C`, merging the settings file if
/// one is named by `--config` or `env_var`; exits like clap on errors.
pub fn parse_with_file<C: CommandFactory + FromArgMatches>(
    name: &str,
    env_var: &str,
    args: Vec<OsString>,
) -> C {
    let command = C::command();
    let merged = match merged_args(&command, env_var, args) {
        Ok(merged) => merged,
        Err((path, problems)) => {
            eprintln!("{name}: error: {}: {}", path.display(), problems.join("; "));
            std::process::exit(2);
        }
    };
    let matches = command.get_matches_from(merged);
    C::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

/// [`parse_with_file`] for a running daemon (a reload): every problem is
/// returned instead of ending the process.
pub fn try_parse_with_file<C: CommandFactory + FromArgMatches>(
    env_var: &str,
    args: Vec<OsString>,
) -> Result<C, Vec<String>> {
    let command = C::command();
    let merged = merged_args(&command, env_var, args).map_err(|(path, problems)| {
        problems
            .into_iter()
            .map(|p| format!("{}: {p}", path.display()))
            .collect::<Vec<_>>()
    })?;
    let matches = command
        .try_get_matches_from(merged)
        .map_err(|e| vec![clap_message(&e)])?;
    C::from_arg_matches(&matches).map_err(|e| vec![clap_message(&e)])
}

/// clap's message without its usage lines and help hint.
pub(crate) fn clap_message(e: &clap::Error) -> String {
    let text = e.render().to_string();
    text.lines()
        .next()
        .unwrap_or_default()
        .trim_start_matches("error: ")
        .to_owned()
}

/// The arguments with the settings file's merged in.
fn merged_args(
    command: &clap::Command,
    env_var: &str,
    args: Vec<OsString>,
) -> Result<Vec<OsString>, (std::path::PathBuf, Vec<String>)> {
    let file = config_path(&args, env_var);
    let mut merged = args;
    if let Some(path) = file {
        match file_args(command, &path, &merged) {
            Ok(extra) => merged.extend(extra),
            Err(problems) => return Err((path, problems)),
        }
    }
    Ok(merged)
}

fn config_path(args: &[OsString], env_var: &str) -> Option<std::path::PathBuf> {
    let mut iter = args.iter().skip(1);
    while let Some(arg) = iter.next() {
        let text = arg.to_string_lossy();
        if text == "--config" {
            return iter.next().map(Into::into);
        }
        if let Some(value) = text.strip_prefix("--config=") {
            return Some(value.into());
        }
    }
    std::env::var_os(env_var).map(Into::into)
}

/// Arguments for the file's settings that neither a flag nor an
/// environment variable already sets.
fn file_args(
    command: &clap::Command,
    path: &Path,
    given: &[OsString],
) -> Result<Vec<OsString>, Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| vec![e.to_string()])?;
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| vec![e.to_string()])?;
    let mut out = Vec::new();
    let mut problems = Vec::new();
    for (key, value) in &table {
        let long = key.replace('_', "-");
        let Some(arg) = command
            .get_arguments()
            .find(|a| a.get_long() == Some(long.as_str()))
        else {
            problems.push(format!("unknown setting {key:?}"));
            continue;
        };
        if long == "config" {
            problems.push("a settings file cannot name another".to_owned());
            continue;
        }
        let flag = format!("--{long}");
        let on_command_line = given.iter().any(|a| {
            let a = a.to_string_lossy();
            a == flag || a.starts_with(&format!("{flag}="))
        });
        let in_env = arg.get_env().is_some_and(|e| std::env::var_os(e).is_some());
        if on_command_line || in_env {
            continue;
        }
        match value {
            toml::Value::Boolean(true) => out.push(flag.into()),
            toml::Value::Boolean(false) => {}
            toml::Value::String(s) => out.push(format!("{flag}={s}").into()),
            toml::Value::Integer(i) => out.push(format!("{flag}={i}").into()),
            toml::Value::Float(f) => out.push(format!("{flag}={f}").into()),
            toml::Value::Array(items)
                if arg.get_action().takes_values()
                    && matches!(arg.get_action(), clap::ArgAction::Append)
                    && items.iter().all(toml::Value::is_str) =>
            {
                out.extend(
                    items
                        .iter()
                        .filter_map(toml::Value::as_str)
                        .map(|s| format!("{flag}={s}").into()),
                );
            }
            _ => problems.push(format!(
                "setting {key:?} must be a string, number or boolean (an array of strings for a repeatable flag)"
            )),
        }
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Flags shaped like a daemon's, for the parser.
    #[derive(Debug, clap::Parser)]
    struct Config {
        #[arg(long)]
        load_timeout_s: Option<u64>,
        #[arg(long)]
        health_failures: Option<u32>,
        #[arg(long)]
        ready_requires_worker: bool,
        #[arg(long)]
        models_dir: Option<String>,
        #[arg(long)]
        restart: Option<String>,
        #[arg(long = "hive")]
        hives: Vec<String>,
        #[arg(long)]
        config: Option<String>,
    }

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    #[test]
    fn file_settings_fill_in_flags_not_given_and_unknown_keys_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hive.toml");
        std::fs::write(
            &path,
            "load_timeout_s = 7\nhealth-failures = 5\nready_requires_worker = true\nmodels_dir = \"/m\"\n",
        )
        .unwrap();
        let given = args(&["rbee-hive", "--health-failures", "2"]);
        let mut extra = file_args(&Config::command(), &path, &given).unwrap();
        extra.sort();
        assert_eq!(
            extra,
            args(&[
                "--load-timeout-s=7",
                "--models-dir=/m",
                "--ready-requires-worker"
            ])
        );

        std::fs::write(&path, "load_timeout_s = 7\nbogus = 1\nrestart = [1]\n").unwrap();
        let problems = file_args(&Config::command(), &path, &given).unwrap_err();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems.iter().any(|p| p.contains("bogus")));
        assert!(problems.iter().any(|p| p.contains("restart")));
    }

    #[test]
    fn a_repeatable_flag_takes_an_array_of_strings() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queen.toml");
        std::fs::write(&path, "hive = [\"http://a:9200\", \"http://b:9200\"]\n").unwrap();
        let extra = file_args(&Config::command(), &path, &args(&["queen"])).unwrap();
        assert_eq!(
            extra,
            args(&["--hive=http://a:9200", "--hive=http://b:9200"])
        );
        let merged: Config = parse_with_file("queen", "RBEE_TEST_UNSET_CONFIG", {
            let mut a = args(&["queen", "--config"]);
            a.push(path.clone().into());
            a
        });
        assert_eq!(merged.hives, ["http://a:9200", "http://b:9200"]);

        std::fs::write(&path, "hive = [1]\nmodels_dir = [\"/m\"]\n").unwrap();
        let problems = file_args(&Config::command(), &path, &args(&["queen"])).unwrap_err();
        assert_eq!(problems.len(), 2, "{problems:?}");
    }

    #[test]
    fn a_reload_reports_every_problem_instead_of_exiting() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hive.toml");
        std::fs::write(&path, "load_timeout_s = 9\n").unwrap();
        let argv = || {
            let mut a = args(&["hive", "--config"]);
            a.push(path.clone().into());
            a
        };
        let ok: Config = try_parse_with_file("RBEE_TEST_UNSET_CONFIG", argv()).unwrap();
        assert_eq!(ok.load_timeout_s, Some(9));

        std::fs::write(&path, "load_timeout_s = \"soon\"\n").unwrap();
        let bad = try_parse_with_file::<Config>("RBEE_TEST_UNSET_CONFIG", argv()).unwrap_err();
        assert_eq!(bad.len(), 1, "{bad:?}");
        assert!(bad[0].contains("soon"), "{bad:?}");

        std::fs::write(&path, "bogus = 1\nrestart = [1]\n").unwrap();
        let bad = try_parse_with_file::<Config>("RBEE_TEST_UNSET_CONFIG", argv()).unwrap_err();
        assert_eq!(bad.len(), 2, "{bad:?}");
        assert!(bad.iter().all(|p| p.contains("hive.toml")), "{bad:?}");

        std::fs::write(&path, "load_timeout_s = [").unwrap();
        assert!(try_parse_with_file::<Config>("RBEE_TEST_UNSET_CONFIG", argv()).is_err());
    }

    #[test]
    fn the_config_path_comes_from_the_flag_in_either_form() {
        assert_eq!(
            config_path(&args(&["hive", "--config", "/a.toml"]), "RBEE_TEST_UNSET"),
            Some("/a.toml".into())
        );
        assert_eq!(
            config_path(&args(&["hive", "--config=/b.toml"]), "RBEE_TEST_UNSET"),
            Some("/b.toml".into())
        );
    }
}
