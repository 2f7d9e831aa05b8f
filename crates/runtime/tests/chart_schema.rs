//! The Helm chart's values schema names exactly the settings Correu knows:
//! a key Correu lacks would be accepted by `helm install` and then stop
//! every pod (exit 64); a key the schema lacks could not be set at all.
//! The schema is written by helm/tools/values_schema.py.

use std::collections::BTreeSet;

use correu_runtime::Config;
use serde_json::Value;

/// Dotted keys of a value: objects are walked, except the maps whose keys
/// are the user's (routes, DKIM keys, shaping rules and inbound policies
/// by domain or name).
fn config_keys(v: &Value, prefix: &str, out: &mut BTreeSet<String>) {
    let Value::Object(map) = v else { return };
    for (k, v) in map {
        let key = format!("{prefix}{k}");
        match v {
            Value::Object(_)
                if !matches!(
                    key.as_str(),
                    "delivery.routes" | "delivery.dkim" | "delivery.shaping" | "inbound.domains"
                ) =>
            {
                config_keys(v, &format!("{key}."), out)
            }
            _ => {
                out.insert(key);
            }
        }
    }
}

fn schema_keys(v: &Value, prefix: &str, out: &mut BTreeSet<String>) {
    let Some(Value::Object(props)) = v.get("properties") else {
        return;
    };
    for (k, v) in props {
        let key = format!("{prefix}{k}");
        if v.get("properties").is_some() {
            assert_eq!(
                v.get("additionalProperties"),
                Some(&Value::Bool(false)),
                "{key}: a section must refuse unknown keys"
            );
            schema_keys(v, &format!("{key}."), out);
        } else {
            out.insert(key);
        }
    }
}

#[test]
fn the_chart_schema_names_every_setting_and_no_other() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../helm/correu/values.schema.json"
    );
    let text = std::fs::read_to_string(path).expect("the chart's values.schema.json");
    let schema: Value = serde_json::from_str(&text).expect("valid JSON");
    let config = &schema["properties"]["config"];
    assert_eq!(config["additionalProperties"], Value::Bool(false));
    let mut in_schema = BTreeSet::new();
    schema_keys(config, "", &mut in_schema);
    // Unset options serialise as null, so every key is there.
    let mut known = BTreeSet::new();
    config_keys(
        &serde_json::to_value(Config::default()).expect("the defaults as JSON"),
        "",
        &mut known,
    );
    let missing: Vec<_> = known.difference(&in_schema).collect();
    let unknown: Vec<_> = in_schema.difference(&known).collect();
    assert!(
        missing.is_empty() && unknown.is_empty(),
        "settings the schema lacks: {missing:?}; schema keys Correu does not know: {unknown:?} \
         (edit helm/tools/values_schema.py and run it)"
    );
    assert!(known.len() > 60, "{known:?}");
}
