//! `extraSbatchArgs`, resolved the way sbatch itself reads them. sbatch parses its command
//! line with `getopt_long`, which accepts any unambiguous prefix of a long option (`--outp=`
//! is `--output=`) and takes the *next* argument as the value of an option that requires one
//! and was given without `=`. So each user argument is resolved against sbatch's own option
//! table before it is checked: unknown, ambiguous, reserved, or malformed options are refused.
//! The operator's own options also come after the user's on the command line, so that even an
//! option missing from this table could not override them (sbatch keeps the last value).

/// Whether an option takes a value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Arg {
    None,
    Required,
    Optional,
}

/// sbatch's long options (Slurm 22.05 – 24.x), with their argument kind.
const OPTIONS: &[(&str, Arg)] = &[
    ("account", Arg::Required),
    ("acctg-freq", Arg::Required),
    ("array", Arg::Required),
    ("batch", Arg::Required),
    ("bb", Arg::Required),
    ("bbf", Arg::Required),
    ("begin", Arg::Required),
    ("chdir", Arg::Required),
    ("cluster-constraint", Arg::Required),
    ("clusters", Arg::Required),
    ("comment", Arg::Required),
    ("constraint", Arg::Required),
    ("container", Arg::Required),
    ("container-id", Arg::Required),
    ("contiguous", Arg::None),
    ("core-spec", Arg::Required),
    ("cores-per-socket", Arg::Required),
    ("cpu-freq", Arg::Required),
    ("cpus-per-gpu", Arg::Required),
    ("cpus-per-task", Arg::Required),
    ("deadline", Arg::Required),
    ("delay-boot", Arg::Required),
    ("dependency", Arg::Required),
    ("distribution", Arg::Required),
    ("error", Arg::Required),
    ("exclude", Arg::Required),
    ("exclusive", Arg::Optional),
    ("export", Arg::Optional),
    ("export-file", Arg::Required),
    ("extra", Arg::Required),
    ("extra-node-info", Arg::Required),
    ("get-user-env", Arg::Optional),
    ("gid", Arg::Required),
    ("gpu-bind", Arg::Required),
    ("gpu-freq", Arg::Required),
    ("gpus", Arg::Required),
    ("gpus-per-node", Arg::Required),
    ("gpus-per-socket", Arg::Required),
    ("gpus-per-task", Arg::Required),
    ("gres", Arg::Required),
    ("gres-flags", Arg::Required),
    ("help", Arg::None),
    ("hint", Arg::Required),
    ("hold", Arg::None),
    ("ignore-pbs", Arg::None),
    ("input", Arg::Required),
    ("job-name", Arg::Required),
    ("kill-on-invalid-dep", Arg::Required),
    ("licenses", Arg::Required),
    ("mail-type", Arg::Required),
    ("mail-user", Arg::Required),
    ("mcs-label", Arg::Required),
    ("mem", Arg::Required),
    ("mem-bind", Arg::Required),
    ("mem-per-cpu", Arg::Required),
    ("mem-per-gpu", Arg::Required),
    ("mincpus", Arg::Required),
    ("network", Arg::Required),
    ("nice", Arg::Optional),
    ("no-kill", Arg::Optional),
    ("no-requeue", Arg::None),
    ("nodefile", Arg::Required),
    ("nodelist", Arg::Required),
    ("nodes", Arg::Required),
    ("ntasks", Arg::Required),
    ("ntasks-per-core", Arg::Required),
    ("ntasks-per-gpu", Arg::Required),
    ("ntasks-per-node", Arg::Required),
    ("ntasks-per-socket", Arg::Required),
    ("open-mode", Arg::Required),
    ("output", Arg::Required),
    ("overcommit", Arg::None),
    ("oversubscribe", Arg::None),
    ("parsable", Arg::None),
    ("partition", Arg::Required),
    ("power", Arg::Required),
    ("prefer", Arg::Required),
    ("priority", Arg::Required),
    ("profile", Arg::Required),
    ("propagate", Arg::Optional),
    ("qos", Arg::Required),
    ("quiet", Arg::None),
    ("reboot", Arg::None),
    ("requeue", Arg::None),
    ("reservation", Arg::Required),
    ("resv-ports", Arg::Optional),
    ("signal", Arg::Required),
    ("sockets-per-node", Arg::Required),
    ("spread-job", Arg::None),
    ("switches", Arg::Required),
    ("test-only", Arg::None),
    ("thread-spec", Arg::Required),
    ("threads-per-core", Arg::Required),
    ("time", Arg::Required),
    ("time-min", Arg::Required),
    ("tmp", Arg::Required),
    ("tres-bind", Arg::Required),
    ("tres-per-task", Arg::Required),
    ("uid", Arg::Required),
    ("usage", Arg::None),
    ("use-min-nodes", Arg::None),
    ("verbose", Arg::None),
    ("version", Arg::None),
    ("wait", Arg::None),
    ("wait-all-nodes", Arg::Required),
    ("wckey", Arg::Required),
    ("wrap", Arg::Required),
];

/// Options the operator sets itself, or that would let a manifest read files on the login
/// node, run as someone else, change what sbatch prints, or detach the job from its tag.
const RESERVED: &[&str] = &[
    "array",
    "batch",
    "bbf",
    "chdir",
    "clusters",
    "comment",
    "dependency",
    "error",
    "export",
    "export-file",
    "get-user-env",
    "gid",
    "help",
    "hold",
    "input",
    "job-name",
    "nodefile",
    "open-mode",
    "output",
    "parsable",
    "test-only",
    "uid",
    "usage",
    "verbose",
    "version",
    "wait",
    "wrap",
];

/// The option sbatch will take for `name` (exact, or the one option it abbreviates).
fn resolve(name: &str) -> Result<(&'static str, Arg), String> {
    if let Some(&(full, arg)) = OPTIONS.iter().find(|(o, _)| *o == name) {
        return Ok((full, arg));
    }
    let matches: Vec<&(&str, Arg)> = OPTIONS
        .iter()
        .filter(|(o, _)| o.starts_with(name))
        .collect();
    match matches.as_slice() {
        [(full, arg)] => Ok((full, *arg)),
        [] => Err(format!("--{name} is not an sbatch option")),
        many => Err(format!(
            "--{name} is ambiguous (sbatch could read it as {})",
            many.iter()
                .map(|(o, _)| format!("--{o}"))
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// Checks one `extraSbatchArgs` entry: a single long option, `--name=value` when it takes a
/// value, resolving to an option the operator does not own. `None`: acceptable.
pub fn problem(arg: &str) -> Option<String> {
    let shown = crate::limits::truncate(arg, 80);
    let Some(body) = arg.strip_prefix("--") else {
        return Some(format!(
            "{shown:?} must be a long option like --name=value (short options are not accepted)"
        ));
    };
    if arg.contains(['\n', '\r', '\0']) {
        return Some(format!("{shown:?}: must be on one line"));
    }
    let (name, value) = match body.split_once('=') {
        Some((n, v)) => (n, Some(v)),
        None => (body, None),
    };
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Some(format!(
            "{shown:?}: option name must be lowercase letters, digits and '-'"
        ));
    }
    let (full, kind) = match resolve(name) {
        Ok(r) => r,
        Err(e) => return Some(format!("{shown:?}: {e}")),
    };
    let what = if full == name {
        format!("--{full}")
    } else {
        format!("--{name} abbreviates --{full}, which")
    };
    if RESERVED.contains(&full) {
        return Some(format!(
            "{shown:?}: {what} is set by the operator or not allowed, and cannot be given"
        ));
    }
    match (kind, value) {
        (Arg::Required, None) => Some(format!(
            "{shown:?}: --{full} takes a value: write --{full}=VALUE as one argument"
        )),
        (Arg::None, Some(_)) => Some(format!("{shown:?}: --{full} takes no value")),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abbreviations_of_reserved_options_are_refused() {
        for arg in [
            "--outp=/tmp/x",
            "--job-n=other",
            "--arr=1-3",
            "--comm=forged",
            "--chd=/",
            "--hol",
            "--test-o",
            "--output=/tmp/x",
            "--wr=id",
            "--uid=0",
        ] {
            let p = problem(arg).unwrap_or_else(|| panic!("{arg} accepted"));
            assert!(p.contains("cannot be given"), "{arg}: {p}");
        }
        assert!(
            problem("--outp=/tmp/x")
                .unwrap()
                .contains("abbreviates --output")
        );
    }

    #[test]
    fn values_and_forms() {
        assert_eq!(problem("--exclusive"), None);
        assert_eq!(problem("--begin=now+1hour"), None);
        assert_eq!(problem("--no-requeue"), None);
        assert_eq!(
            problem("--no-req"),
            None,
            "a unique prefix of a harmless option"
        );
        assert!(problem("--excl").unwrap().contains("ambiguous"));
        // Without '=', sbatch would swallow the operator's next argument as the value.
        assert!(problem("--partition").unwrap().contains("takes a value"));
        assert!(problem("--requeue=yes").unwrap().contains("takes no value"));
        assert!(problem("--o=x").unwrap().contains("ambiguous"));
        assert!(
            problem("--frobnicate=1")
                .unwrap()
                .contains("not an sbatch option")
        );
        assert!(problem("-J x").unwrap().contains("long option"));
        assert!(
            problem("--mem=1G\n--output=x")
                .unwrap()
                .contains("one line")
        );
    }
}
