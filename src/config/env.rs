//! `${VAR}` / `${VAR:-default}` interpolation, so secrets come from the environment
//! (Kubernetes Secrets) instead of the file. Applied to every string value, never to keys.

use super::error::KeyPath;

/// Replaces every `${VAR}` and `${VAR:-default}` in the string values of `value`, in place.
/// `$${` stands for a literal `${`. A string that cannot be expanded is left as it is and
/// where and why added to `problems`.
pub fn interpolate(
    value: &mut toml::Value,
    path: &mut KeyPath,
    lookup: &dyn Fn(&str) -> Option<String>,
    problems: &mut Vec<(KeyPath, String)>,
) {
    match value {
        toml::Value::String(s) if s.contains('$') => match expand(s, lookup) {
            Ok(expanded) => *s = expanded,
            Err(msg) => problems.push((path.clone(), msg)),
        },
        toml::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                path.push_index(i);
                interpolate(item, path, lookup, problems);
                path.pop();
            }
        }
        toml::Value::Table(table) => {
            for (key, item) in table.iter_mut() {
                path.push_key(key);
                interpolate(item, path, lookup, problems);
                path.pop();
            }
        }
        _ => {}
    }
}

fn expand(s: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    substitute(s, |name, default| match (lookup(name), default) {
        (Some(v), _) => Ok(v),
        (None, Some(d)) => Ok(d.to_owned()),
        (None, None) => Err(format!(
            "environment variable {name} is not set (use ${{{name}:-default}} to give a default)"
        )),
    })
}

/// The variables `value`'s strings read as `${VAR}` without a default, in order, each once:
/// what a process loading it must have in its environment (`gatehouse inject` names them).
/// A string whose `${` is malformed is skipped: loading it reports that.
pub fn required(value: &toml::Value) -> Vec<String> {
    fn walk(value: &toml::Value, out: &mut Vec<String>) {
        match value {
            toml::Value::String(s) => {
                let _ = substitute(s, |name, default| {
                    if default.is_none() && !out.iter().any(|n| n == name) {
                        out.push(name.to_owned());
                    }
                    Ok(String::new())
                });
            }
            toml::Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            toml::Value::Table(table) => table.values().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(value, &mut out);
    out
}

/// The `${VAR}` / `${VAR:-default}` / `$${` grammar, written once: `s` with each variable
/// replaced by what `resolve(name, default)` gives.
fn substitute(
    s: &str,
    mut resolve: impl FnMut(&str, Option<&str>) -> Result<String, String>,
) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        if let Some(after) = tail.strip_prefix("$${") {
            out.push_str("${");
            rest = after;
        } else if let Some(after) = tail.strip_prefix("${") {
            let end = after.find('}').ok_or_else(|| {
                format!("unterminated \"${{\" in {s:?}: expected ${{VAR}} or ${{VAR:-default}}")
            })?;
            let inner = &after[..end];
            let (name, default) = match inner.split_once(":-") {
                Some((name, default)) => (name, Some(default)),
                None => (inner, None),
            };
            if !is_var_name(name) {
                return Err(format!(
                    "invalid variable name {name:?} in {s:?}: expected letters, digits and '_', not starting with a digit"
                ));
            }
            out.push_str(&resolve(name, default)?);
            rest = &after[end + 1..];
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

fn is_var_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "KEY" => Some("s3cret".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn expands() {
        assert_eq!(expand("a ${KEY} b", &env).unwrap(), "a s3cret b");
        assert_eq!(expand("${NOPE:-fallback}", &env).unwrap(), "fallback");
        assert_eq!(expand("${KEY:-fallback}", &env).unwrap(), "s3cret");
        assert_eq!(expand("${EMPTY:-x}", &env).unwrap(), "");
        assert_eq!(expand("cost $5 $${KEY}", &env).unwrap(), "cost $5 ${KEY}");
        assert_eq!(expand("${NOPE:-}", &env).unwrap(), "");
    }

    #[test]
    fn refuses() {
        assert!(expand("${NOPE}", &env)
            .unwrap_err()
            .contains("NOPE is not set"));
        assert!(expand("${KEY", &env).unwrap_err().contains("unterminated"));
        assert!(expand("${1X}", &env)
            .unwrap_err()
            .contains("invalid variable name"));
    }

    #[test]
    fn walks_nested_values_and_reports_every_path() {
        let mut v: toml::Value =
            toml::from_str("a = [{ b = \"${NOPE}\" }]\nc = \"${KEY}\"\nd = \"${GONE}\"").unwrap();
        let mut problems = Vec::new();
        interpolate(&mut v, &mut KeyPath::default(), &env, &mut problems);
        let [(first, msg), (second, _)] = &problems[..] else {
            panic!("two problems: {problems:?}")
        };
        assert_eq!(first.to_string(), "a[1].b");
        assert!(msg.contains("NOPE"));
        assert_eq!(second.to_string(), "d");
        assert_eq!(v["c"].as_str(), Some("s3cret"));
    }
}
