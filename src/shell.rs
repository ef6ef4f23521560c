//! The one audited quoting function. Every string from a manifest that reaches a shell passes
//! through [`quote`]; nothing else builds shell text from user input.

/// Quotes `s` as one word for POSIX `sh`/`bash`: wrapped in single quotes, each embedded `'`
/// written as `'\''`. Inside single quotes the shell interprets nothing, so `$`, backticks,
/// `;`, newlines and globs stay literal. Strings of only safe characters are left bare so that
/// rendered commands stay readable.
pub fn quote(s: &str) -> String {
    let safe = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b));
    if safe {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for ch in s.chars() {
        if ch == '\'' {
            out.push_str("'\\''");
        } else {
            out.push(ch);
        }
    }
    out.push('\'');
    out
}

/// Quotes every word of an argv and joins them with spaces.
pub fn join<S: AsRef<str>>(argv: &[S]) -> String {
    argv.iter()
        .map(|a| quote(a.as_ref()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Whether `name` is a valid environment variable name.
pub fn is_env_name(name: &str) -> bool {
    let mut b = name.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_alphabetic() || c == b'_')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// Round-trips hostile strings through a real bash: each must arrive as exactly one argument,
    /// byte for byte, with nothing executed.
    #[test]
    fn hostile_strings_survive_bash_intact() {
        let marker = std::env::temp_dir().join(format!("sao-pwned-{}", std::process::id()));
        let m = marker.display().to_string();
        let hostile = [
            "plain".to_string(),
            String::new(),
            "a b".into(),
            "it's".into(),
            format!("$(touch {m})"),
            format!("`touch {m}`"),
            format!("; touch {m}"),
            format!("' ; touch {m}; '"),
            "\"double\" \\back\\slash".into(),
            "line1\nline2".into(),
            "*".into(),
            "${HOME}".into(),
            "-n".into(),
            "ünïcødé ✓".into(),
        ];
        for s in &hostile {
            let script = format!("printf '%s' {}", quote(s));
            let out = Command::new("bash")
                .arg("-c")
                .arg(&script)
                .output()
                .unwrap();
            assert!(out.status.success(), "{script}");
            assert_eq!(String::from_utf8(out.stdout).unwrap(), *s, "{script}");
        }
        let joined = join(&hostile);
        let out = Command::new("bash")
            .arg("-c")
            .arg(format!("for a in {joined}; do printf '<%s>' \"$a\"; done"))
            .output()
            .unwrap();
        let expected: String = hostile.iter().map(|s| format!("<{s}>")).collect();
        assert_eq!(String::from_utf8(out.stdout).unwrap(), expected);
        assert!(!marker.exists(), "a quoted string was executed");
    }

    #[test]
    fn env_names() {
        assert!(is_env_name("FOO_1"));
        assert!(is_env_name("_x"));
        assert!(!is_env_name("1X"));
        assert!(!is_env_name("A-B"));
        assert!(!is_env_name("A;rm"));
        assert!(!is_env_name(""));
    }
}
