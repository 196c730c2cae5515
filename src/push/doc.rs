//! Reading configuration documents (YAML or JSON, as `serde_json::Value`) strictly: every
//! key is known, every error names its path in the document.
//!
//! Shared by the loaders of [`envoy`](super::envoy) and [`pixiu`](super::pixiu); what a
//! document means is theirs to say.

use envoy_types::pb::google::protobuf::{Duration as PbDuration, UInt32Value};
use serde_json::{Map, Value};

/// A file's content that is not a valid set of supported resources.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ParseError {
    /// Where in the document, e.g. `resources[0].virtual_hosts[1].routes`.
    pub path: String,
    /// What is wrong there.
    pub message: String,
}

/// A [`ParseError`] at `path` (the whole document when empty).
pub(crate) fn err(path: &str, message: impl std::fmt::Display) -> ParseError {
    ParseError {
        path: if path.is_empty() {
            "(document)".to_string()
        } else {
            path.to_string()
        },
        message: message.to_string(),
    }
}

/// An object being read, with its path for error messages. Unknown keys are refused when it
/// is made; each accessor reads one key, absent meaning the protobuf default.
pub(crate) struct Obj<'a> {
    /// The object itself.
    pub(crate) value: &'a Value,
    map: &'a Map<String, Value>,
    /// Its path in the document.
    pub(crate) path: String,
}

impl<'a> Obj<'a> {
    /// `value` as an object whose keys are all in `allowed` (an empty `allowed` accepts any
    /// key: the caller checks again with the real list).
    pub(crate) fn new(value: &'a Value, path: &str, allowed: &[&str]) -> Result<Self, ParseError> {
        let map = match value {
            Value::Object(map) => map,
            _ => return Err(err(path, "expected an object")),
        };
        if let Some(key) = map
            .keys()
            .find(|k| !allowed.is_empty() && !allowed.contains(&k.as_str()))
        {
            return Err(err(
                path,
                format!(
                    "unsupported field {key:?} (supported: {})",
                    allowed.join(", ")
                ),
            ));
        }
        Ok(Self {
            value,
            map,
            path: path.to_string(),
        })
    }

    pub(crate) fn sub(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    pub(crate) fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    pub(crate) fn expect_type(&self, type_url: &str) -> Result<(), ParseError> {
        match self.get("@type").and_then(Value::as_str) {
            Some(t) if t == type_url => Ok(()),
            Some(t) => Err(err(
                &self.path,
                format!("\"@type\" must be {type_url}, not {t}"),
            )),
            None => Err(err(&self.path, format!("missing \"@type\": {type_url}"))),
        }
    }

    pub(crate) fn obj(&self, key: &str, allowed: &[&str]) -> Result<Obj<'a>, ParseError> {
        self.opt_obj(key, allowed)?
            .ok_or_else(|| err(&self.sub(key), "missing"))
    }

    pub(crate) fn opt_obj(
        &self,
        key: &str,
        allowed: &[&str],
    ) -> Result<Option<Obj<'a>>, ParseError> {
        self.get(key)
            .map(|v| Obj::new(v, &self.sub(key), allowed))
            .transpose()
    }

    pub(crate) fn list(&self, key: &str) -> Result<Vec<&'a Value>, ParseError> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => Ok(items.iter().collect()),
            Some(_) => Err(err(&self.sub(key), "expected a list")),
        }
    }

    pub(crate) fn objs(&self, key: &str, allowed: &[&str]) -> Result<Vec<Obj<'a>>, ParseError> {
        self.list(key)?
            .into_iter()
            .enumerate()
            .map(|(i, v)| Obj::new(v, &format!("{}[{i}]", self.sub(key)), allowed))
            .collect()
    }

    pub(crate) fn string(&self, key: &str) -> Result<String, ParseError> {
        match self.get(key) {
            None => Ok(String::new()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(err(&self.sub(key), "expected a string")),
        }
    }

    pub(crate) fn strings(&self, key: &str) -> Result<Vec<String>, ParseError> {
        self.list(key)?
            .into_iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.clone()),
                _ => Err(err(&format!("{}[{i}]", self.sub(key)), "expected a string")),
            })
            .collect()
    }

    pub(crate) fn bool(&self, key: &str) -> Result<bool, ParseError> {
        match self.get(key) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(err(&self.sub(key), "expected true or false")),
        }
    }

    /// A `uint32`, given as a number or (protobuf JSON) a decimal string.
    pub(crate) fn u32(&self, key: &str) -> Result<u32, ParseError> {
        let bad = || err(&self.sub(key), "expected an integer from 0 to 4294967295");
        match self.get(key) {
            None => Ok(0),
            Some(Value::Number(n)) => n
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(bad),
            Some(Value::String(s)) => s.parse().map_err(|_| bad()),
            Some(_) => Err(bad()),
        }
    }

    pub(crate) fn uint32_value(&self, key: &str) -> Result<Option<UInt32Value>, ParseError> {
        self.get(key)
            .map(|_| self.u32(key).map(|value| UInt32Value { value }))
            .transpose()
    }

    /// An enum by its protobuf name (`ROUND_ROBIN`), or 0 when absent.
    pub(crate) fn enumeration<E: Into<i32>>(
        &self,
        key: &str,
        from_name: fn(&str) -> Option<E>,
    ) -> Result<i32, ParseError> {
        match self.get(key) {
            None => Ok(0),
            Some(Value::String(s)) => from_name(s)
                .map(Into::into)
                .ok_or_else(|| err(&self.sub(key), format!("unknown value {s:?}"))),
            Some(_) => Err(err(&self.sub(key), "expected an enum value name")),
        }
    }

    /// A duration in protobuf JSON form: decimal seconds with an `s` suffix (`"0.25s"`).
    pub(crate) fn duration(&self, key: &str) -> Result<Option<PbDuration>, ParseError> {
        let Some(value) = self.get(key) else {
            return Ok(None);
        };
        let bad = || err(&self.sub(key), "expected a duration like \"1.5s\"");
        let text = value.as_str().ok_or_else(bad)?;
        let digits = text.strip_suffix('s').ok_or_else(bad)?;
        let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
        if whole.is_empty()
            || !whole.bytes().all(|b| b.is_ascii_digit())
            || fraction.len() > 9
            || !fraction.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(bad());
        }
        let seconds: i64 = whole.parse().map_err(|_| bad())?;
        let nanos: i32 = if fraction.is_empty() {
            0
        } else {
            format!("{fraction:0<9}").parse().map_err(|_| bad())?
        };
        Ok(Some(PbDuration { seconds, nanos }))
    }
}
