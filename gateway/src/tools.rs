//! Tool calling: the request's `tools`, `tool_choice` and `parallel_tool_calls`
//! ([`Tools`]), the grammar that forces a call when one is required ([`Tools::grammar`]),
//! and the parser that turns what a Llama 4 model wrote into `tool_calls`
//! ([`parse_calls`]).
//!
//! Llama 4 writes calls in two forms, which vLLM's `llama4_pythonic` and `llama3_json`
//! parsers read and this one reads the same way:
//! - pythonic: `[get_weather(city="Paris", days=2), get_time(tz='CET')]`, keyword arguments
//!   whose values are Python literals (strings, numbers, `True`/`False`/`None`, lists,
//!   dicts);
//! - JSON: `{"name": "get_weather", "parameters": {"city": "Paris"}}` (or `"arguments"`),
//!   several separated by `;`, or a JSON list of them (what the forcing grammar produces).
//!
//! Either may be wrapped in `<|python_start|>` … `<|python_end|>`. Only calls of declared
//! functions count; anything else is the assistant's text.

use serde_json::{json, Map, Value};

use expertmesh_model::GrammarSpec;

use crate::error::ApiError;

/// Functions one request may declare.
pub const TOOLS_MAX: usize = 128;

/// Whether and how the model may call the declared functions.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolChoice {
    /// Never: the output is text.
    None,
    /// The model decides; a call it writes is parsed.
    Auto,
    /// At least one call, forced by a grammar.
    Required,
    /// A call of this function, forced by a grammar.
    Named(String),
}

/// A request's tools.
#[derive(Debug, Clone, PartialEq)]
pub struct Tools {
    /// The `tools` list as given (what the chat template renders).
    pub list: Value,
    pub names: Vec<String>,
    /// Each function's parameter schema (an object schema when none is given).
    parameters: Vec<Value>,
    pub choice: ToolChoice,
    /// More than one call per answer (OpenAI's `parallel_tool_calls`, true by default).
    pub parallel: bool,
}

/// One call the model made.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub name: String,
    /// The arguments as JSON text (OpenAI's `function.arguments`).
    pub arguments: String,
}

impl Tools {
    /// Parses `tools`, `tool_choice` and `parallel_tool_calls` of a chat body; `None` when
    /// it declares no tools.
    pub fn parse(obj: &Map<String, Value>) -> Result<Option<Self>, ApiError> {
        let list = match obj.get("tools") {
            None | Some(Value::Null) => {
                return match obj.get("tool_choice") {
                    None | Some(Value::Null) => Ok(None),
                    Some(Value::String(s)) if s == "none" || s == "auto" => Ok(None),
                    Some(_) => Err(ApiError::bad("tool_choice needs tools", "tool_choice")),
                }
            }
            Some(Value::Array(a)) if a.len() <= TOOLS_MAX => a,
            Some(_) => {
                return Err(ApiError::bad(
                    format!("tools must be a list of at most {TOOLS_MAX} functions"),
                    "tools",
                ))
            }
        };
        let (mut names, mut parameters) = (Vec::new(), Vec::new());
        for (i, t) in list.iter().enumerate() {
            let field = format!("tools[{i}]");
            let f = t
                .get("function")
                .filter(|_| t.get("type").and_then(Value::as_str) == Some("function"))
                .ok_or_else(|| ApiError::bad(format!("{field} must be a function tool"), &field))?;
            let name = f.get("name").and_then(Value::as_str).filter(|n| {
                !n.is_empty()
                    && n.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
            });
            let name = name.ok_or_else(|| {
                ApiError::bad(format!("{field}.function.name must be a name"), &field)
            })?;
            let params = match f.get("parameters") {
                None | Some(Value::Null) => json!({"type": "object"}),
                Some(p @ Value::Object(_)) => p.clone(),
                Some(_) => {
                    return Err(ApiError::bad(
                        format!("{field}.function.parameters must be a JSON schema"),
                        &field,
                    ))
                }
            };
            names.push(name.to_owned());
            parameters.push(params);
        }
        let choice = match obj.get("tool_choice") {
            None | Some(Value::Null) => ToolChoice::Auto,
            Some(Value::String(s)) => match s.as_str() {
                "none" => ToolChoice::None,
                "auto" => ToolChoice::Auto,
                "required" => ToolChoice::Required,
                _ => {
                    return Err(ApiError::bad(
                        "tool_choice must be none, auto, required or a function",
                        "tool_choice",
                    ))
                }
            },
            Some(v) => {
                let name = v
                    .get("function")
                    .and_then(|f| f.get("name"))
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        ApiError::bad("tool_choice must name a function", "tool_choice")
                    })?;
                if !names.iter().any(|n| n == name) {
                    return Err(ApiError::bad(
                        format!("tool_choice names `{name}`, which tools does not declare"),
                        "tool_choice",
                    ));
                }
                ToolChoice::Named(name.to_owned())
            }
        };
        if choice == ToolChoice::Required && names.is_empty() {
            return Err(ApiError::bad(
                "tool_choice required needs tools",
                "tool_choice",
            ));
        }
        let parallel = match obj.get("parallel_tool_calls") {
            None | Some(Value::Null) => true,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(ApiError::bad(
                    "parallel_tool_calls must be a boolean",
                    "parallel_tool_calls",
                ))
            }
        };
        Ok(Some(Self {
            list: Value::Array(list.clone()),
            names,
            parameters,
            choice,
            parallel,
        }))
    }

    /// Whether the output is read for calls.
    pub fn parsed(&self) -> bool {
        self.choice != ToolChoice::None
    }

    /// The grammar that forces a call (`required`: any declared function, one or more
    /// unless parallel calls are off; a named function: that one): a JSON list of
    /// `{"name", "parameters"}` objects, each name's parameters fitting its schema.
    pub fn grammar(&self) -> Option<GrammarSpec> {
        let call = |i: usize| {
            json!({"type": "object", "additionalProperties": false,
                   "required": ["name", "parameters"],
                   "properties": {"name": {"const": self.names[i]},
                                  "parameters": self.parameters[i]}})
        };
        let (items, max) = match &self.choice {
            ToolChoice::None | ToolChoice::Auto => return None,
            ToolChoice::Required => (
                json!({"anyOf": (0..self.names.len()).map(call).collect::<Vec<_>>()}),
                (!self.parallel).then_some(1),
            ),
            ToolChoice::Named(name) => {
                let i = self.names.iter().position(|n| n == name)?;
                (call(i), Some(1))
            }
        };
        let mut schema = json!({"type": "array", "minItems": 1, "items": items});
        if let Some(max) = max {
            schema["maxItems"] = json!(max);
        }
        Some(GrammarSpec::JsonSchema(schema.to_string()))
    }
}

/// What a streamed answer's text so far may still turn into a call (so it is held back).
pub fn may_be_call(text: &str) -> bool {
    let t = text.trim_start();
    t.is_empty()
        || t.starts_with('[')
        || t.starts_with('{')
        || "<|python_start|>".starts_with(t)
        || t.starts_with("<|python_start|>")
}

/// The calls of declared functions in `text`, if the whole text is calls.
pub fn parse_calls(text: &str, names: &[String]) -> Option<Vec<ToolCall>> {
    let mut t = text.trim();
    if let Some(inner) = t.strip_prefix("<|python_start|>") {
        t = inner.trim();
        t = t.strip_suffix("<|python_end|>").unwrap_or(t).trim();
    }
    let calls = if t.starts_with('[') {
        pythonic(t).or_else(|| json_calls(t))
    } else {
        json_calls(t)
    }?;
    let declared = |c: &ToolCall| names.contains(&c.name);
    (!calls.is_empty() && calls.iter().all(declared)).then_some(calls)
}

/// JSON calls: one object, a list of them, or objects separated by `;`.
fn json_calls(t: &str) -> Option<Vec<ToolCall>> {
    let one = |v: &Value| -> Option<ToolCall> {
        let name = v.get("name")?.as_str()?.to_owned();
        let args = v.get("parameters").or_else(|| v.get("arguments"))?;
        let arguments = match args {
            Value::Object(_) => args.to_string(),
            // Some models write the arguments as a JSON string.
            Value::String(s) if serde_json::from_str::<Value>(s).is_ok_and(|v| v.is_object()) => {
                s.clone()
            }
            _ => return None,
        };
        Some(ToolCall { name, arguments })
    };
    match serde_json::from_str::<Value>(t) {
        Ok(Value::Array(list)) => return list.iter().map(one).collect(),
        Ok(v @ Value::Object(_)) => return one(&v).map(|c| vec![c]),
        _ => {}
    }
    t.split(';')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| serde_json::from_str::<Value>(p).ok().as_ref().and_then(one))
        .collect()
}

/// Pythonic calls: `[name(key=value, ...), ...]`.
fn pythonic(t: &str) -> Option<Vec<ToolCall>> {
    let mut p = Py {
        s: t.as_bytes(),
        at: 0,
    };
    p.eat(b'[')?;
    let mut calls = Vec::new();
    loop {
        let name = p.name()?;
        p.eat(b'(')?;
        let mut args = Map::new();
        if !p.try_eat(b')') {
            loop {
                let key = p.name()?;
                p.eat(b'=')?;
                args.insert(key, p.value(0)?);
                if p.try_eat(b')') {
                    break;
                }
                p.eat(b',')?;
            }
        }
        calls.push(ToolCall {
            name,
            arguments: Value::Object(args).to_string(),
        });
        if p.try_eat(b']') {
            break;
        }
        p.eat(b',')?;
    }
    p.skip_space();
    (p.at == p.s.len()).then_some(calls)
}

/// Nesting of lists and dicts a pythonic value may have.
const DEPTH_MAX: usize = 64;

/// A cursor over pythonic call text.
struct Py<'a> {
    s: &'a [u8],
    at: usize,
}

impl Py<'_> {
    fn skip_space(&mut self) {
        while self.s.get(self.at).is_some_and(u8::is_ascii_whitespace) {
            self.at += 1;
        }
    }

    fn try_eat(&mut self, b: u8) -> bool {
        self.skip_space();
        let found = self.s.get(self.at) == Some(&b);
        self.at += usize::from(found);
        found
    }

    fn eat(&mut self, b: u8) -> Option<()> {
        self.try_eat(b).then_some(())
    }

    fn name(&mut self) -> Option<String> {
        self.skip_space();
        let start = self.at;
        while self
            .s
            .get(self.at)
            .is_some_and(|&c| c.is_ascii_alphanumeric() || c == b'_' || c == b'.' || c == b'-')
        {
            self.at += 1;
        }
        let name = std::str::from_utf8(&self.s[start..self.at]).ok()?;
        (!name.is_empty() && !name.as_bytes()[0].is_ascii_digit()).then(|| name.to_owned())
    }

    fn value(&mut self, depth: usize) -> Option<Value> {
        if depth > DEPTH_MAX {
            return None;
        }
        self.skip_space();
        match *self.s.get(self.at)? {
            q @ (b'"' | b'\'') => self.string(q).map(Value::String),
            b'[' => {
                self.at += 1;
                let mut items = Vec::new();
                if !self.try_eat(b']') {
                    loop {
                        items.push(self.value(depth + 1)?);
                        if self.try_eat(b']') {
                            break;
                        }
                        self.eat(b',')?;
                    }
                }
                Some(Value::Array(items))
            }
            b'{' => {
                self.at += 1;
                let mut map = Map::new();
                if !self.try_eat(b'}') {
                    loop {
                        let key = match self.value(depth + 1)? {
                            Value::String(s) => s,
                            other => other.to_string(),
                        };
                        self.eat(b':')?;
                        map.insert(key, self.value(depth + 1)?);
                        if self.try_eat(b'}') {
                            break;
                        }
                        self.eat(b',')?;
                    }
                }
                Some(Value::Object(map))
            }
            _ => {
                let start = self.at;
                while self.s.get(self.at).is_some_and(|&c| {
                    c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b'+' | b'_')
                }) {
                    self.at += 1;
                }
                let word = std::str::from_utf8(&self.s[start..self.at]).ok()?;
                match word {
                    "True" => Some(Value::Bool(true)),
                    "False" => Some(Value::Bool(false)),
                    "None" => Some(Value::Null),
                    _ => serde_json::from_str::<serde_json::Number>(word)
                        .ok()
                        .map(Value::Number),
                }
            }
        }
    }

    /// A quoted string with Python's common escapes.
    fn string(&mut self, quote: u8) -> Option<String> {
        self.at += 1;
        let mut out = Vec::new();
        loop {
            let c = *self.s.get(self.at)?;
            self.at += 1;
            match c {
                b'\\' => {
                    let e = *self.s.get(self.at)?;
                    self.at += 1;
                    out.push(match e {
                        b'n' => b'\n',
                        b't' => b'\t',
                        b'r' => b'\r',
                        other => other,
                    });
                }
                c if c == quote => return String::from_utf8(out).ok(),
                c => out.push(c),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        vec!["get_weather".into(), "get_time".into()]
    }

    fn call(name: &str, args: Value) -> ToolCall {
        ToolCall {
            name: name.into(),
            arguments: args.to_string(),
        }
    }

    #[test]
    fn both_llama_forms_parse() {
        let cases: [(&str, Option<Vec<ToolCall>>); 10] = [
            (
                r#"[get_weather(city="Paris", days=2, metric=True, extra=None)]"#,
                Some(vec![call(
                    "get_weather",
                    json!({"city": "Paris", "days": 2, "metric": true, "extra": null}),
                )]),
            ),
            (
                "<|python_start|>[get_time(tz='CET'), get_weather(city=\"O\\\"slo\", at=[1, 2.5], o={'a': [True]})]<|python_end|>",
                Some(vec![
                    call("get_time", json!({"tz": "CET"})),
                    call("get_weather", json!({"city": "O\"slo", "at": [1, 2.5], "o": {"a": [true]}})),
                ]),
            ),
            ("[get_time()]", Some(vec![call("get_time", json!({}))])),
            (
                r#"{"name": "get_time", "parameters": {"tz": "UTC"}}"#,
                Some(vec![call("get_time", json!({"tz": "UTC"}))]),
            ),
            (
                r#"{"name": "get_time", "arguments": {"tz": "UTC"}}; {"name": "get_weather", "parameters": {}}"#,
                Some(vec![call("get_time", json!({"tz": "UTC"})), call("get_weather", json!({}))]),
            ),
            (
                r#"[{"name": "get_weather", "parameters": {"city": "Rome"}}]"#,
                Some(vec![call("get_weather", json!({"city": "Rome"}))]),
            ),
            ("The weather is fine.", None),
            ("[send_email(to='x')]", None),
            ("[get_time(tz='CET')] and more", None),
            (r#"{"name": "get_time"}"#, None),
        ];
        for (text, want) in cases {
            assert_eq!(parse_calls(text, &names()), want, "{text}");
        }
    }

    #[test]
    fn hostile_text_is_not_a_call() {
        let deep = format!("[get_time(a={}{})]", "[".repeat(10_000), "]".repeat(10_000));
        assert_eq!(parse_calls(&deep, &names()), None);
        assert_eq!(parse_calls("[get_time(a='unterminated)]", &names()), None);
        assert_eq!(parse_calls("[", &names()), None);
    }

    #[test]
    fn streams_hold_what_may_become_a_call() {
        for t in [
            "",
            "  ",
            "[get",
            "<|python",
            "<|python_start|>[",
            "{\"name\"",
        ] {
            assert!(may_be_call(t), "{t:?}");
        }
        assert!(!may_be_call("Sure"));
    }

    fn parse(body: Value) -> Result<Option<Tools>, ApiError> {
        Tools::parse(body.as_object().unwrap())
    }

    #[test]
    fn choices_and_their_grammars() {
        let tools = json!([
            {"type": "function", "function": {"name": "get_time",
             "parameters": {"type": "object", "properties": {"tz": {"enum": ["CET", "UTC"]}}}}},
            {"type": "function", "function": {"name": "get_weather"}}]);
        let t = parse(json!({"tools": tools})).unwrap().unwrap();
        assert_eq!((t.choice.clone(), t.parallel), (ToolChoice::Auto, true));
        assert!(t.grammar().is_none() && t.parsed());
        let t = parse(json!({"tools": tools, "tool_choice": "required",
                             "parallel_tool_calls": false}))
        .unwrap()
        .unwrap();
        let Some(GrammarSpec::JsonSchema(s)) = t.grammar() else {
            panic!("a schema")
        };
        let s: Value = serde_json::from_str(&s).unwrap();
        assert_eq!(s["maxItems"], 1);
        assert_eq!(s["items"]["anyOf"].as_array().unwrap().len(), 2);
        let t = parse(json!({"tools": tools,
                             "tool_choice": {"type": "function", "function": {"name": "get_time"}}}))
        .unwrap()
        .unwrap();
        assert_eq!(t.choice, ToolChoice::Named("get_time".into()));
        let Some(GrammarSpec::JsonSchema(s)) = t.grammar() else {
            panic!("a schema")
        };
        assert!(s.contains(r#""const":"get_time""#), "{s}");
        assert!(!parse(json!({"tools": tools, "tool_choice": "none"}))
            .unwrap()
            .unwrap()
            .parsed());
        assert_eq!(parse(json!({"tool_choice": "auto"})).unwrap(), None);
        let bad = [
            (json!({"tools": "x"}), "tools"),
            (json!({"tools": [{"type": "code"}]}), "tools[0]"),
            (
                json!({"tools": [{"type": "function", "function": {"name": "a b"}}]}),
                "tools[0]",
            ),
            (
                json!({"tools": tools, "tool_choice": "always"}),
                "tool_choice",
            ),
            (
                json!({"tools": tools, "tool_choice": {"type": "function", "function": {"name": "x"}}}),
                "tool_choice",
            ),
            (json!({"tool_choice": "required"}), "tool_choice"),
            (
                json!({"tools": tools, "parallel_tool_calls": 1}),
                "parallel_tool_calls",
            ),
        ];
        for (body, param) in bad {
            match parse(body.clone()) {
                Err(ApiError::BadRequest { param: Some(p), .. }) => assert_eq!(p, param, "{body}"),
                other => panic!("{body}: {other:?}"),
            }
        }
    }
}
