//! Environment overrides of the worker's file: `SLUICE__SOURCE__BOOTSTRAP_SERVERS=host:9092`
//! sets `source.bootstrapServers`, `SLUICE__SINKS__0__KAFKA__TOPIC=out` sets
//! `sinks[0].kafka.topic`. Applied to the parsed document before it is typed and validated,
//! so an override is checked like the file.

use super::ConfigError;

/// Environment variables with this prefix override fields of the file:
/// `SLUICE__SOURCE__BOOTSTRAP_SERVERS=host:9092` sets `source.bootstrapServers`,
/// `SLUICE__SINKS__0__KAFKA__TOPIC=out` sets `sinks[0].kafka.topic`.
pub const ENV_OVERRIDE_PREFIX: &str = "SLUICE__";

/// `SCREAMING_SNAKE` segment to the camelCase key used in the document.
fn camel(segment: &str) -> String {
    let mut out = String::new();
    for (i, part) in segment.split('_').filter(|p| !p.is_empty()).enumerate() {
        let lower = part.to_ascii_lowercase();
        if i == 0 {
            out.push_str(&lower);
        } else {
            let mut c = lower.chars();
            if let Some(f) = c.next() {
                out.push(f.to_ascii_uppercase());
                out.extend(c);
            }
        }
    }
    out
}

pub(super) fn apply_override(
    root: &mut serde_json::Value,
    var: &str,
    raw: &str,
) -> Result<(), ConfigError> {
    use serde_json::Value;
    let err = |message: String| ConfigError::Override {
        var: var.to_string(),
        message,
    };
    let path: Vec<&str> = var[ENV_OVERRIDE_PREFIX.len()..].split("__").collect();
    if path.iter().any(|s| s.is_empty()) {
        return Err(err(
            "empty path segment; separate fields with a double underscore".into(),
        ));
    }
    let new: Value =
        serde_yaml::from_str(raw).map_err(|e| err(format!("value is not YAML: {e}")))?;
    let mut cur = root;
    for (i, seg) in path.iter().enumerate() {
        let last = i + 1 == path.len();
        if let Ok(idx) = seg.parse::<usize>() {
            let seq = cur
                .as_array_mut()
                .ok_or_else(|| err(format!("`{seg}` indexes a field that is not a list")))?;
            let len = seq.len();
            let slot = seq
                .get_mut(idx)
                .ok_or_else(|| err(format!("index {idx} is out of range (the list has {len})")))?;
            if last {
                *slot = new;
                return Ok(());
            }
            cur = slot;
        } else {
            if cur.is_null() {
                *cur = Value::Object(Default::default());
            }
            let map = cur
                .as_object_mut()
                .ok_or_else(|| err(format!("`{seg}` is inside a field that is not a map")))?;
            let key = camel(seg);
            if last {
                map.insert(key, new);
                return Ok(());
            }
            cur = map.entry(key).or_insert(Value::Null);
        }
    }
    Ok(())
}
