//! `serve --config FILE`: a TOML file of defaults for `serve`'s flags, and
//! `serve --print-config`: the effective values and where each came from.
//!
//! The file's keys are the flags' long names (`grpc-addr = "0.0.0.0:15010"`), so there is one
//! list of options to learn. Precedence, lowest first: built-in default < file < environment
//! (`PIXIU_METADATA_*`) < flag. Implemented on clap's own parse: a key of the file is added
//! to the command line only when clap took that flag's value from its default.

use std::{ffi::OsString, path::Path};

use anyhow::{Context, bail};
use clap::{ArgAction, ArgMatches, CommandFactory, FromArgMatches, parser::ValueSource};

use super::{Cli, Command};

/// Flags of `serve` that are not configuration: they never come from the file.
const NOT_CONFIG: [&str; 4] = ["help", "version", "config", "print-config"];

/// Parses `args` (the program name first), taking defaults of `serve` flags from its
/// `--config` file. Errors of the command line itself are `clap::Error`s (print them with
/// `exit()`).
pub fn parse_from(args: impl IntoIterator<Item = impl Into<OsString>>) -> anyhow::Result<Cli> {
    let mut argv: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let command = Cli::command();
    let mut matches = command.clone().try_get_matches_from(&argv)?;
    let mut from_file = None;
    if let Some(("serve", serve)) = matches.subcommand()
        && let Some(path) = serve.get_one::<std::path::PathBuf>("config")
    {
        let path = path.clone();
        let (extra, keys) = file_args(&command, serve, &path)?;
        if !extra.is_empty() {
            argv.extend(extra);
            matches = command
                .clone()
                .try_get_matches_from(&argv)
                .map_err(|e| in_file(&e, &path, &keys))?;
        }
        from_file = Some((path, keys));
    }
    let mut cli = Cli::from_arg_matches(&matches)?;
    if let (Command::Serve(args), Some(("serve", serve))) = (&mut cli.command, matches.subcommand())
    {
        args.effective_config = render(&command, serve, from_file.as_ref());
    }
    Ok(cli)
}

/// A value of the file that `serve`'s flags refuse, as an error naming the file and the key
/// (clap's own would name only the flag, as if it had been typed).
fn in_file(error: &clap::Error, path: &Path, keys: &[String]) -> anyhow::Error {
    let rendered = error.render().to_string();
    let reason = rendered
        .lines()
        .next()
        .unwrap_or_default()
        .trim_start_matches("error: ");
    let key = match error.get(clap::error::ContextKind::InvalidArg) {
        Some(clap::error::ContextValue::String(arg)) => keys
            .iter()
            .find(|k| arg.strip_prefix("--").and_then(|a| a.split(' ').next()) == Some(k.as_str())),
        _ => None,
    };
    match key {
        Some(key) => anyhow::anyhow!("{}: key {key}: {reason}", path.display()),
        None => anyhow::anyhow!("{}: {reason}", path.display()),
    }
}

/// The command-line arguments the file adds, and the keys they come from: its keys whose
/// flags took their default.
fn file_args(
    command: &clap::Command,
    serve: &ArgMatches,
    path: &Path,
) -> anyhow::Result<(Vec<OsString>, Vec<String>)> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the config file {}", path.display()))?;
    let table: toml::Table =
        toml::from_str(&text).with_context(|| format!("{} is not valid TOML", path.display()))?;
    let serve_command = command
        .find_subcommand("serve")
        .expect("the CLI has a serve command");
    let mut out = Vec::new();
    let mut keys = Vec::new();
    for (key, value) in &table {
        let Some(arg) = serve_command
            .get_arguments()
            .find(|a| a.get_long() == Some(key.as_str()) && !NOT_CONFIG.contains(&key.as_str()))
        else {
            bail!(
                "{}: unknown key {key:?}; keys are the long names of `serve` flags, e.g. \
                 grpc-addr (see `pixiu-metadata serve --help`)",
                path.display()
            );
        };
        if matches!(
            serve.value_source(arg.get_id().as_str()),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        ) {
            continue;
        }
        let values = match value {
            toml::Value::Array(items) => items.iter().map(scalar).collect::<Option<Vec<_>>>(),
            other => scalar(other).map(|v| vec![v]),
        }
        .with_context(|| {
            format!(
                "{}: {key} must be a string, number, boolean or array of them",
                path.display()
            )
        })?;
        keys.push(key.clone());
        if matches!(arg.get_action(), ArgAction::SetTrue) {
            if values == ["true"] {
                out.push(format!("--{key}").into());
            }
            continue;
        }
        for v in values {
            out.push(format!("--{key}={v}").into());
        }
    }
    Ok((out, keys))
}

fn scalar(value: &toml::Value) -> Option<String> {
    match value {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

/// The effective `serve` options as a config file, each with where its value came from
/// (`from_file`: the config file and the keys taken from it).
fn render(
    command: &clap::Command,
    serve: &ArgMatches,
    from_file: Option<&(std::path::PathBuf, Vec<String>)>,
) -> String {
    let serve_command = command
        .find_subcommand("serve")
        .expect("the CLI has a serve command");
    let mut out = String::from(
        "# Effective configuration of `pixiu-metadata serve`; usable as --config FILE.\n",
    );
    for arg in serve_command.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if NOT_CONFIG.contains(&long) {
            continue;
        }
        let id = arg.get_id().as_str();
        let source = match serve.value_source(id) {
            Some(ValueSource::DefaultValue) => "default".to_string(),
            Some(ValueSource::EnvVariable) => format!(
                "environment {}",
                arg.get_env().map_or("", |e| e.to_str().unwrap_or(""))
            ),
            Some(ValueSource::CommandLine) => match from_file {
                Some((path, keys)) if keys.iter().any(|k| k == long) => {
                    format!("config file {}", path.display())
                }
                _ => "flag".to_string(),
            },
            _ => "unset".to_string(),
        };
        let values: Vec<String> = serve
            .get_raw(id)
            .map(|raw| raw.map(|v| v.to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        let value = if matches!(arg.get_action(), ArgAction::SetTrue) {
            (values.first().map(String::as_str) == Some("true")).to_string()
        } else if values.is_empty() {
            out.push_str(&format!("# {long} =  # {source}\n"));
            continue;
        } else if arg.get_num_args().is_some_and(|n| n.max_values() > 1)
            || matches!(arg.get_action(), ArgAction::Append)
            || values.len() > 1
        {
            toml::Value::Array(values.into_iter().map(toml::Value::String).collect()).to_string()
        } else {
            toml::Value::String(values.into_iter().next().unwrap_or_default()).to_string()
        };
        out.push_str(&format!("{long} = {value}  # {source}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn serve_args(cli: Cli) -> super::super::ServeArgs {
        match cli.command {
            Command::Serve(args) => *args,
            other => panic!("not serve: {other:?}"),
        }
    }

    #[test]
    fn file_fills_defaults_and_flags_win() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        writeln!(
            file,
            "grpc-addr = \"127.0.0.1:16010\"\nadmin-addr = \"127.0.0.1:16014\"\nmax-streams = 7\nstore = \"memory\""
        )
        .unwrap();
        let path = file.path().to_str().unwrap();
        let args = serve_args(
            parse_from([
                "pixiu-metadata",
                "serve",
                "--config",
                path,
                "--admin-addr",
                "127.0.0.1:17014",
            ])
            .unwrap(),
        );
        let config = args.config().unwrap();
        assert_eq!(config.grpc.addr.port(), 16010, "from the file");
        assert_eq!(config.admin.addr.port(), 17014, "the flag beats the file");
        assert_eq!(config.xds.max_streams, 7);
        assert!(
            args.effective_config
                .contains("admin-addr = \"127.0.0.1:17014\"  # flag\n"),
            "{}",
            args.effective_config
        );
        assert!(
            args.effective_config
                .contains(&format!("max-streams = \"7\"  # config file {path}\n")),
            "{}",
            args.effective_config
        );
        assert!(
            args.effective_config
                .contains("metadata-ttl = \"24h\"  # default")
        );
    }

    #[test]
    fn a_refused_value_names_the_file_and_the_key() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        writeln!(file, "max-streams = 7\nmax-value-bytes = 0").unwrap();
        let path = file.path().to_str().unwrap();
        let error = parse_from(["pixiu-metadata", "serve", "--config", path]).unwrap_err();
        assert!(
            error.downcast_ref::<clap::Error>().is_none(),
            "not clap's, which would name only the flag"
        );
        let message = format!("{error:#}");
        assert!(
            message.starts_with(&format!("{path}: key max-value-bytes: invalid value '0'")),
            "{message}"
        );
        assert!(!message.contains('\n'), "{message}");
    }

    #[test]
    fn unknown_keys_are_refused_with_what_to_do() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        writeln!(file, "grpc_addr = \"127.0.0.1:1\"").unwrap();
        let error = parse_from([
            "pixiu-metadata",
            "serve",
            "--config",
            file.path().to_str().unwrap(),
        ])
        .unwrap_err();
        assert!(
            format!("{error:#}").contains("keys are the long names of `serve` flags"),
            "{error:#}"
        );
    }
}
