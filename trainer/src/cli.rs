//! Command-line helpers shared by the `mapet` subcommands: `--flag value` parsing that refuses
//! unknown flags by name.

use std::collections::HashMap;

/// Splits `--flag value` pairs from positional arguments; refuses unknown flags, a flag given
/// twice (but for [`REPEATABLE`] ones) and a flag whose value would be another known flag
/// (`--out --overwrite`: the folder was forgotten).
pub fn parse_flags(args: &[String], known: &[&str]) -> Result<(Vec<String>, HashMap<String, String>), String> {
    parse_flags_all(args, known).map(|(p, all)| (p, all.into_iter().collect()))
}

/// Flags that may be given more than once, each adding to the others (`--set key=value`).
pub const REPEATABLE: [&str; 1] = ["set"];

/// Positional arguments and every (flag, value) in order.
pub type Parsed = (Vec<String>, Vec<(String, String)>);

/// [`parse_flags`], keeping every (flag, value) in order.
pub fn parse_flags_all(args: &[String], known: &[&str]) -> Result<Parsed, String> {
    let mut positional = Vec::new();
    let mut flags: Vec<(String, String)> = Vec::new();
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
            if value.strip_prefix("--").is_some_and(|v| known.contains(&v)) {
                return Err(format!("flag `--{name}` needs a value, but the flag `{value}` follows it"));
            }
            if !REPEATABLE.contains(&name) {
                if let Some((_, first)) = flags.iter().find(|(f, _)| f == name) {
                    return Err(format!("flag `--{name}` is given twice (`{first}`, then `{value}`): give it once"));
                }
            }
            flags.push((name.to_string(), value.clone()));
        } else {
            positional.push(a.clone());
        }
    }
    Ok((positional, flags))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn flags_parse_and_mistakes_are_named() {
        let known = ["out", "epochs", "set", "overwrite"];
        let (pos, flags) =
            parse_flags_all(&args(&["case", "--out", "x", "--set", "a=1", "--set", "b=2", "--epochs", "-1"]), &known)
                .unwrap();
        assert_eq!(pos, ["case"]);
        let want = [("out", "x"), ("set", "a=1"), ("set", "b=2"), ("epochs", "-1")];
        assert_eq!(flags, want.map(|(f, v)| (f.to_string(), v.to_string())));
        let err = |a: &[&str]| parse_flags_all(&args(a), &known).unwrap_err();
        assert_eq!(err(&["--out", "--overwrite"]), "flag `--out` needs a value, but the flag `--overwrite` follows it");
        assert_eq!(
            err(&["--epochs", "1", "--epochs", "2"]),
            "flag `--epochs` is given twice (`1`, then `2`): give it once"
        );
        assert_eq!(err(&["--out"]), "flag `--out` needs a value");
        assert!(err(&["--bogus", "1"]).starts_with("unknown flag `--bogus` (known: --out, --epochs"));
        // A value that only looks like a flag is a value.
        assert_eq!(parse_flags(&args(&["--out", "--x"]), &known).unwrap().1["out"], "--x");
    }
}
