//! Repository names, per the OCI distribution grammar:
//! `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(\/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`.

/// Checks a repository name against the OCI distribution grammar.
pub fn validate_repository_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty repository name".into());
    }
    for component in name.split('/') {
        if !valid_component(component) {
            return Err(format!(
                "invalid repository name {name:?}: component {component:?} must be lower-case \
                 letters and digits separated by '.', '_', '__' or dashes"
            ));
        }
    }
    Ok(())
}

fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    let (Some(&first), Some(&last)) = (b.first(), b.last()) else {
        return false;
    };
    if !alnum(first) || !alnum(last) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        if !(sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-')) {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grammar() {
        for ok in [
            "a",
            "library/alpine",
            "team/app/tools",
            "a.b",
            "a_b",
            "a__b",
            "a---b",
            "0x",
        ] {
            assert!(validate_repository_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "A", "a/", "/a", "a//b", "-a", "a-", "a..b", "a___b", "a._b", "a b", "ä",
        ] {
            assert!(validate_repository_name(bad).is_err(), "{bad:?}");
        }
    }
}
