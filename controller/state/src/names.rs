//! Resource names in the style of Google AIP-122: `collection/id` segments,
//! e.g. `projects/p1/instances/web-1`. Ids are lowercase DNS labels (AIP-122
//! recommends RFC 1123): 1 to 63 characters of `a-z`, `0-9` and `-`, starting
//! with a letter and not ending with `-`.

use thiserror::Error;

/// The longest id accepted in any name segment.
pub const MAX_ID_LEN: usize = 63;

/// Why a resource id or name was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NameError {
    /// The id is empty or longer than [`MAX_ID_LEN`].
    #[error("id {id:?} must be 1 to {MAX_ID_LEN} characters long")]
    Length {
        /// The refused id.
        id: String,
    },
    /// The id holds something other than lowercase letters, digits and `-`,
    /// does not start with a letter, or ends with `-`.
    #[error(
        "id {id:?} must start with a lowercase letter, hold only a-z, 0-9 and '-', and not end with '-'"
    )]
    Charset {
        /// The refused id.
        id: String,
    },
    /// A full name does not have the expected `collection/id` shape.
    #[error("name {name:?} is not of the form {pattern}")]
    Shape {
        /// The refused name.
        name: String,
        /// The expected pattern, e.g. `projects/{project}/instances/{instance}`.
        pattern: &'static str,
    },
}

/// Checks one resource id (a single name segment).
pub fn validate_id(id: &str) -> Result<(), NameError> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(NameError::Length { id: id.to_owned() });
    }
    let bytes = id.as_bytes();
    let ok_chars = bytes
        .iter()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-');
    if !ok_chars || !bytes[0].is_ascii_lowercase() || bytes[bytes.len() - 1] == b'-' {
        return Err(NameError::Charset { id: id.to_owned() });
    }
    Ok(())
}

/// Splits `name` along `pattern` (e.g. `projects/{}/instances/{}`), checking
/// the literal collection segments and every id; returns the ids in order.
pub fn parse<'a>(name: &'a str, pattern: &'static str) -> Result<Vec<&'a str>, NameError> {
    let shape = || NameError::Shape {
        name: name.to_owned(),
        pattern,
    };
    let got: Vec<&str> = name.split('/').collect();
    let want: Vec<&str> = pattern.split('/').collect();
    if got.len() != want.len() {
        return Err(shape());
    }
    let mut ids = Vec::new();
    for (g, w) in got.iter().zip(want.iter()) {
        if w.starts_with('{') {
            validate_id(g)?;
            ids.push(*g);
        } else if g != w {
            return Err(shape());
        }
    }
    Ok(ids)
}

/// `projects/{project}`.
pub const PROJECT: &str = "projects/{project}";
/// `projects/{project}/instances/{instance}`.
pub const INSTANCE: &str = "projects/{project}/instances/{instance}";
/// `projects/{project}/serverGroups/{group}`.
pub const SERVER_GROUP: &str = "projects/{project}/serverGroups/{group}";
/// `users/{user}`.
pub const USER: &str = "users/{user}";
/// `users/{user}/tokens/{token}`.
pub const TOKEN: &str = "users/{user}/tokens/{token}";
/// `flavors/{flavor}`.
pub const FLAVOR: &str = "flavors/{flavor}";
/// `images/{image}`.
pub const IMAGE: &str = "images/{image}";
/// `nodes/{node}`.
pub const NODE: &str = "nodes/{node}";
/// `migrations/{migration}`.
pub const MIGRATION: &str = "migrations/{migration}";
/// `operations/{operation}`.
pub const OPERATION: &str = "operations/{operation}";

/// The project part of a project-scoped name (`projects/p1/instances/x` ->
/// `projects/p1`), or `None` if the name is not project-scoped.
pub fn project_of(name: &str) -> Option<&str> {
    let rest = name.strip_prefix("projects/")?;
    let end = rest.find('/').map_or(name.len(), |i| "projects/".len() + i);
    Some(&name[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(validate_id("web-1").is_ok());
        assert!(validate_id("a").is_ok());
        assert!(validate_id(&"a".repeat(63)).is_ok());
        assert!(matches!(validate_id(""), Err(NameError::Length { .. })));
        assert!(matches!(
            validate_id(&"a".repeat(64)),
            Err(NameError::Length { .. })
        ));
        for bad in ["1abc", "Web", "web-", "-web", "we_b", "wé", "a/b", "a b"] {
            assert!(
                matches!(validate_id(bad), Err(NameError::Charset { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn names() {
        assert_eq!(
            parse("projects/p1/instances/web-1", INSTANCE).unwrap(),
            vec!["p1", "web-1"]
        );
        assert!(parse("projects/p1/instance/web-1", INSTANCE).is_err());
        assert!(parse("projects/p1/instances/web-1/x", INSTANCE).is_err());
        assert!(parse("projects/p1/instances/", INSTANCE).is_err());
        assert!(parse("projects//instances/a", INSTANCE).is_err());
        assert_eq!(project_of("projects/p1/instances/a"), Some("projects/p1"));
        assert_eq!(project_of("projects/p1"), Some("projects/p1"));
        assert_eq!(project_of("nodes/n1"), None);
    }
}
