//! Output formats: `table` (comfy-table), `json` (serde_json) and `yaml`
//! (serde_norway). Every command prints [`Record`]s through [`Printer`].

use std::io::Write as _;

use comfy_table::Table;
use serde_json::{Map, Value};

/// One resource as ordered fields (the table's columns, in order).
pub type Record = Vec<(&'static str, Value)>;

/// How to print.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// A table for people.
    Table,
    /// JSON (one document).
    Json,
    /// YAML (one document).
    Yaml,
}

impl Format {
    /// Parses a profile's `output` value.
    pub fn parse(s: &str) -> Option<Format> {
        match s {
            "table" => Some(Format::Table),
            "json" => Some(Format::Json),
            "yaml" => Some(Format::Yaml),
            _ => None,
        }
    }
}

fn object(r: &Record) -> Value {
    let mut m = Map::new();
    for (k, v) in r {
        m.insert((*k).to_owned(), v.clone());
    }
    Value::Object(m)
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        Value::Array(a) => a.iter().map(cell).collect::<Vec<_>>().join(","),
        Value::Object(o) => o
            .iter()
            .map(|(k, v)| format!("{k}={}", cell(v)))
            .collect::<Vec<_>>()
            .join(","),
        other => other.to_string(),
    }
}

fn emit(text: &str) {
    let mut out = std::io::stdout().lock();
    // A closed pipe (`neph ... | head`) is not an error worth reporting.
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

fn document(v: &Value, format: Format) -> String {
    match format {
        Format::Yaml => serde_norway::to_string(v).unwrap_or_default(),
        _ => format!("{}\n", serde_json::to_string_pretty(v).unwrap_or_default()),
    }
}

/// Prints one resource.
pub fn one(format: Format, r: &Record) {
    match format {
        Format::Table => {
            let mut t = Table::new();
            t.load_preset(comfy_table::presets::NOTHING);
            for (k, v) in r {
                t.add_row(vec![(*k).to_uppercase(), cell(v)]);
            }
            emit(&format!("{t}\n"));
        }
        f => emit(&document(&object(r), f)),
    }
}

/// Prints a list; `empty` says what there is none of, for tables.
pub fn list(format: Format, rows: &[Record], empty: &str) {
    match format {
        Format::Table => {
            let Some(first) = rows.first() else {
                eprintln!("no {empty}");
                return;
            };
            let mut t = Table::new();
            t.load_preset(comfy_table::presets::NOTHING);
            t.set_header(first.iter().map(|(k, _)| k.to_uppercase()));
            for r in rows {
                t.add_row(r.iter().map(|(_, v)| cell(v)));
            }
            emit(&format!("{t}\n"));
        }
        f => emit(&document(
            &Value::Array(rows.iter().map(object).collect()),
            f,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_flatten_values() {
        assert_eq!(cell(&Value::Null), "");
        assert_eq!(cell(&serde_json::json!(["a", "b"])), "a,b");
        assert_eq!(cell(&serde_json::json!({"k": "v"})), "k=v");
        assert_eq!(cell(&serde_json::json!(3)), "3");
        let r: Record = vec![("name", "x".into()), ("n", 1.into())];
        assert_eq!(
            document(&object(&r), Format::Json),
            "{\n  \"n\": 1,\n  \"name\": \"x\"\n}\n"
        );
        assert_eq!(document(&object(&r), Format::Yaml), "n: 1\nname: x\n");
    }
}
