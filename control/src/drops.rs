//! `vxnat drops`: the declared list of drop reasons, as text or JSON.

use dataplane::pipeline::DropReason;
use std::io::Write;

/// Renders the reasons (all, or the one named) as aligned text or a JSON array.
pub fn render(json: bool, name: Option<&str>) -> Result<String, String> {
    let reasons: Vec<DropReason> =
        match name {
            Some(n) => vec![DropReason::from_name(n)
                .ok_or_else(|| format!("no drop reason named {n:?}; `vxnat drops` lists them"))?],
            None => DropReason::ALL.to_vec(),
        };
    let mut out = String::new();
    if json {
        out.push('[');
        for (i, r) in reasons.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str("{\"name\":");
            crate::json::push_str(&mut out, r.name());
            out.push_str(",\"help\":");
            crate::json::push_str(&mut out, r.help());
            out.push('}');
        }
        out.push_str("]\n");
    } else {
        let width = reasons.iter().map(|r| r.name().len()).max().unwrap_or(0);
        for r in reasons {
            out.push_str(&format!("{:width$}  {}\n", r.name(), r.help()));
        }
    }
    Ok(out)
}

/// Prints to `w`; returns the process exit code.
pub fn print(w: &mut impl Write, json: bool, name: Option<&str>) -> i32 {
    match render(json, name) {
        Ok(s) => match w.write_all(s.as_bytes()) {
            Ok(()) => 0,
            Err(_) => 1,
        },
        Err(e) => {
            eprintln!("vxnat drops: {e}");
            2
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_lists_every_reason_once() {
        let s = render(false, None).expect("renders");
        assert_eq!(s.lines().count(), DropReason::COUNT);
        // Names padded to the longest one, then the help line.
        let line = s.lines().find(|l| l.starts_with("vxlan_bad_outer_checksum ")).expect("listed");
        assert!(line
            .split_once(' ')
            .is_some_and(|(_, help)| help.trim_start().starts_with("non-zero outer UDP checksum")));
    }

    #[test]
    fn json_is_an_array_with_every_reason() {
        let s = render(true, None).expect("renders");
        assert!(s.starts_with("[{\"name\":\"eth_truncated\""));
        assert_eq!(s.matches("\"name\":").count(), DropReason::COUNT);
    }

    #[test]
    fn one_reason_by_name_and_unknown_names_are_errors() {
        assert_eq!(render(false, Some("no_such_pod")).expect("known").lines().count(), 1);
        let e = render(false, Some("nope")).expect_err("unknown");
        assert!(e.contains("\"nope\""));
    }
}
