//! "Did you mean": the known name closest to a misspelt one, when one is close enough.

/// The candidate nearest `name` by Damerau-Levenshtein distance (case ignored), if within
/// a third of its length (at least one edit): `heder` finds `header`, `teleport` finds
/// nothing.
fn nearest<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let name = name.to_ascii_lowercase();
    let most = (name.chars().count() / 3).max(1);
    candidates
        .into_iter()
        .map(|c| {
            (
                strsim::damerau_levenshtein(&name, &c.to_ascii_lowercase()),
                c,
            )
        })
        .filter(|&(d, _)| d <= most)
        .min_by_key(|&(d, _)| d)
        .map(|(_, c)| c)
}

/// serde's "unknown field `x`, expected one of `a`, `b`" (or "unknown variant ...") with
/// "did you mean `a`?" added, looking among the names it lists and `also`; `None` when
/// `message` is not such a message, already suggests, or nothing is close.
pub fn unknown_key(message: &str, also: &[&str]) -> Option<String> {
    if !(message.starts_with("unknown field `") || message.starts_with("unknown variant `"))
        || message.contains("did you mean")
    {
        return None;
    }
    // The quoted names: the unknown one, then the expected ones.
    let mut quoted = message.split('`').skip(1).step_by(2);
    let unknown = quoted.next()?;
    let best = nearest(unknown, quoted.chain(also.iter().copied()))?;
    Some(format!("{message}; did you mean `{best}`?"))
}

/// "unknown `what` "x": expected one of a, b", with "did you mean "a"?" when one is close.
pub fn unknown_name(what: &str, name: &str, known: &[&str]) -> String {
    let mut message = format!(
        "unknown {what} {name:?}: expected one of {}",
        known.join(", ")
    );
    if let Some(best) = nearest(name, known.iter().copied()) {
        message.push_str(&format!("; did you mean {best:?}?"));
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_close_names_only() {
        assert_eq!(
            unknown_key("unknown field `heder`, expected `header` or `format`", &[]).as_deref(),
            Some("unknown field `heder`, expected `header` or `format`; did you mean `header`?")
        );
        assert_eq!(
            unknown_key("unknown field `path`, expected `max`", &["paths", "name"]).as_deref(),
            Some("unknown field `path`, expected `max`; did you mean `paths`?")
        );
        assert_eq!(
            unknown_key("unknown variant `jsn`, expected `json` or `text`", &[]).as_deref(),
            Some("unknown variant `jsn`, expected `json` or `text`; did you mean `json`?")
        );
        assert_eq!(
            unknown_key("unknown field `zzzzzz`, expected `max`", &[]),
            None
        );
        assert_eq!(unknown_key("invalid type: integer", &["max"]), None);
        assert_eq!(
            unknown_name("middleware type", "rate_limt", &["timing", "rate_limit"]),
            "unknown middleware type \"rate_limt\": expected one of timing, rate_limit; did you mean \"rate_limit\"?"
        );
        assert_eq!(
            unknown_name("middleware type", "teleport", &["timing", "rate_limit"]),
            "unknown middleware type \"teleport\": expected one of timing, rate_limit"
        );
        // Transposed letters are one edit.
        assert_eq!(nearest("timnig", ["timing"]), Some("timing"));
    }
}
