//! Command-line helpers shared by the `mapet` subcommands: `--flag value` parsing that refuses
//! unknown flags by name.

use std::collections::HashMap;

/// Splits `--flag value` pairs from positional arguments; refuses unknown flags. A repeated flag
/// keeps its last value in the map; `all` keeps every (flag, value) in order.
pub fn parse_flags(args: &[String], known: &[&str]) -> Result<(Vec<String>, HashMap<String, String>), String> {
    parse_flags_all(args, known).map(|(p, all)| (p, all.into_iter().collect()))
}

/// Positional arguments and every (flag, value) in order.
pub type Parsed = (Vec<String>, Vec<(String, String)>);

pub fn parse_flags_all(args: &[String], known: &[&str]) -> Result<Parsed, String> {
    let mut positional = Vec::new();
    let mut flags = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if let Some(name) = a.strip_prefix("--") {
            if !known.contains(&name) {
                return Err(format!(
                    "unknown flag `--{name}` (known: {})",
                    known.iter().map(|k| format!("--{k}")).collect::<Vec<_>>().join(", ")
                ));
            }
            let value = it.next().ok_or_else(|| format!("flag `--{name}` needs a value"))?;
            flags.push((name.to_string(), value.clone()));
        } else {
            positional.push(a.clone());
        }
    }
    Ok((positional, flags))
}
