//! What `gatehouse schema` is made of: the settings of the generator every config type's
//! schema comes from, and the pieces that serde's derive cannot say (the types of a
//! tagged array, the string value types of [`super::value`]).
//!
//! Draft-07, with `definitions`: the draft Taplo (and so Even Better TOML) validates with
//! and resolves `$ref`s in when it completes keys.

use schemars::generate::SchemaSettings;
use schemars::transform::{transform_subschemas, Transform};
use schemars::{json_schema, Schema, SchemaGenerator};
use serde_json::{Map, Value};

/// The generator of the config's schema.
pub fn generator() -> SchemaGenerator {
    SchemaSettings::draft07()
        .with_transform(NoNull)
        .into_generator()
}

/// TOML has no null: a key left out is how an option is not set, so schemas never offer
/// null (which serde's `Option` would otherwise add).
#[derive(Clone)]
struct NoNull;

impl Transform for NoNull {
    fn transform(&mut self, schema: &mut Schema) {
        if let Some(obj) = schema.as_object_mut() {
            if let Some(Value::Array(types)) = obj.get_mut("type") {
                types.retain(|t| t != "null");
                if let [only] = &types[..] {
                    let only = only.clone();
                    obj.insert("type".into(), only);
                }
            }
            if let Some(Value::Array(values)) = obj.get_mut("enum") {
                values.retain(|v| !v.is_null());
            }
            if let Some(Value::Array(branches)) = obj.get_mut("anyOf") {
                branches.retain(|b| b.get("type").and_then(Value::as_str) != Some("null"));
                if let [only] = &mut branches[..] {
                    let only = std::mem::take(only);
                    obj.remove("anyOf");
                    // Draft-07 ignores the siblings of a `$ref` (a description, say).
                    if only.get("$ref").is_some() && !obj.is_empty() {
                        obj.insert("allOf".into(), Value::Array(vec![only]));
                    } else if let Value::Object(only) = only {
                        for (key, value) in only {
                            obj.entry(key).or_insert(value);
                        }
                    }
                }
            }
            if obj.get("default").is_some_and(Value::is_null) {
                obj.remove("default");
            }
        }
        transform_subschemas(self, schema);
    }
}

/// A string written in a form the loader parses: `what` describes the form.
pub fn string(what: &str) -> Schema {
    json_schema!({ "type": "string", "description": what })
}

/// A string matching `pattern` (an anchored ECMA-262 regular expression, as JSON Schema's
/// are), or holding a `${VAR}`: such a value is only known, and checked, when the config
/// is loaded.
pub fn pattern(what: &str, pattern: &str) -> Schema {
    json_schema!({
        "type": "string",
        "description": what,
        "pattern": format!("{pattern}|\\$\\{{"),
    })
}

/// One branch of a tagged array's `oneOf`: `settings` (an object schema) with
/// `type = kind` required and the keys of `shared` (an object schema too) added.
pub fn tagged(kind: &str, mut settings: Schema, shared: &Schema) -> Schema {
    let obj = settings.ensure_object();
    let properties = obj
        .entry("properties")
        .or_insert_with(|| Value::Object(Map::new()));
    if let Value::Object(properties) = properties {
        if let Some(Value::Object(more)) = shared.get("properties") {
            for (key, value) in more {
                properties.insert(key.clone(), value.clone());
            }
        }
        properties.insert(
            "type".into(),
            serde_json::json!({ "type": "string", "const": kind }),
        );
    }
    let required = obj
        .entry("required")
        .or_insert_with(|| Value::Array(Vec::new()));
    if let Value::Array(required) = required {
        required.insert(0, "type".into());
    }
    obj.insert("type".into(), "object".into());
    settings
}

/// An array whose items are each one of `types` (made with [`tagged`]).
pub fn array_of_one_of(types: Vec<Schema>) -> Schema {
    json_schema!({ "type": "array", "items": { "oneOf": types } })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_do_not_offer_null() {
        let mut s = json_schema!({
            "properties": {
                "a": { "type": ["string", "null"], "default": null },
                "b": { "anyOf": [{ "$ref": "#/definitions/X" }, { "type": "null" }] },
                "d": { "anyOf": [{ "$ref": "#/definitions/X" }, { "type": "null" }], "description": "d" },
                "c": { "enum": ["x", null] },
            }
        });
        NoNull.transform(&mut s);
        assert_eq!(
            s,
            json_schema!({
                "properties": {
                    "a": { "type": "string" },
                    "b": { "$ref": "#/definitions/X" },
                    "d": { "allOf": [{ "$ref": "#/definitions/X" }], "description": "d" },
                    "c": { "enum": ["x"] },
                }
            })
        );
    }

    #[test]
    fn a_tagged_branch_requires_its_type_and_has_the_shared_keys() {
        let settings = json_schema!({
            "type": "object",
            "properties": { "max": { "type": "string" } },
            "required": ["max"],
            "additionalProperties": false,
        });
        let shared = json_schema!({ "properties": { "name": { "type": "string" } } });
        let branch = tagged("sized", settings, &shared);
        assert_eq!(
            branch.get("required").unwrap(),
            &serde_json::json!(["type", "max"])
        );
        let properties = branch.get("properties").unwrap();
        assert_eq!(properties["type"]["const"], "sized");
        assert!(properties.get("name").is_some() && properties.get("max").is_some());
        assert_eq!(branch.get("additionalProperties").unwrap(), false);
    }
}
