//! The placement language: how many instances of a service run, and on which nodes.
//!
//! ```text
//! count 3; where os == "linux" and mem_gb >= 8 and rack != "r7"; distinct host; spread rack
//! ```
//!
//! A placement is clauses separated by `;` (a trailing `;`, spaces and newlines are allowed), in
//! any order, each at most once:
//!
//! | clause | meaning |
//! | --- | --- |
//! | `count N` | required: run N instances, N a whole number ≥ 1 |
//! | `where EXPR` | only on nodes whose attributes satisfy EXPR |
//! | `distinct ATTR` | never two instances on nodes that share a value of ATTR (`distinct host`: one per host) |
//! | `spread ATTR` | spread instances evenly across the values of ATTR |
//!
//! `EXPR` is made of comparisons `ATTR OP LITERAL` (OP one of `== != < <= > >=`), membership
//! `ATTR in (LIT, LIT, ...)`, `not`, `and`, `or` and parentheses; `not` binds tighter than `and`,
//! which binds tighter than `or`. Literals are double-quoted strings (escapes `\"` and `\\`),
//! numbers (`8`, `-1`, `2.5`) and `true`/`false`. Attribute names match
//! `[A-Za-z_][A-Za-z0-9_.-]*`; the words `and`, `or`, `not`, `in`, `true` and `false` are reserved.
//!
//! # Evaluation
//!
//! - **A missing attribute makes any comparison false**, `!=` and `in` included (SQL's "unknown
//!   is not true"). `not` of such a comparison is true: `not rack == "r7"` holds on a node
//!   without a `rack`, `rack != "r7"` does not.
//! - Numbers compare numerically (`8` equals `8.0`); strings compare by `==`/`!=` and
//!   lexicographically (by Unicode scalar values) with `<`, `<=`, `>`, `>=`; booleans compare
//!   only with `==`/`!=` (an ordering against a boolean literal is a parse error).
//! - Values of different types are never equal: such a comparison is false, except `!=`, which
//!   is true (`mem_gb != "8"` holds when `mem_gb` is the number 8).
//! - `ATTR in (a, b)` is true when the attribute is present and equals one of the values.
//!
//! [`Placement`]'s and [`Expr`]'s `Display` print a normalised form that parses back to the same
//! tree.

use std::collections::BTreeMap;
use std::fmt;

/// Longest placement text accepted, in bytes (a placement is a line or two in an intent file).
pub const PLACEMENT_BYTES_MAX: usize = 64 * 1024;

/// Deepest nesting of parentheses and `not` accepted (keeps evaluation's recursion bounded).
pub const NESTING_MAX: usize = 64;

/// The clause keywords, in the order the normalised form prints them.
const CLAUSES: [&str; 4] = ["count", "where", "distinct", "spread"];

/// Words that cannot be attribute names.
const RESERVED: [&str; 6] = ["and", "or", "not", "in", "true", "false"];

/// An attribute value of a node, or a literal in a placement.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum Value {
    /// A string; displayed double-quoted with `"` and `\` escaped, as the language writes it.
    Str(String),
    /// A number (TOML integers and floats both become numbers).
    Num(f64),
    /// A boolean.
    Bool(bool),
}

/// A node's attributes by name (`host`, `os`, `rack`, `mem_gb`, ...).
pub type Attrs = BTreeMap<String, Value>;

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Str(s) => {
                f.write_str("\"")?;
                for c in s.chars() {
                    if c == '"' || c == '\\' {
                        f.write_str("\\")?;
                    }
                    write!(f, "{c}")?;
                }
                f.write_str("\"")
            }
            // `f64`'s Display is the shortest text that parses back to the same number and
            // never uses an exponent, so it is also valid placement syntax (when finite).
            Value::Num(n) => write!(f, "{n}"),
            Value::Bool(b) => write!(f, "{b}"),
        }
    }
}

/// A TOML value that cannot be a node attribute (a date, an array or a table).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("attribute value {text}: {reason}")]
pub struct AttrValueError {
    /// The value as given (TOML text).
    pub text: String,
    /// Why it is refused.
    pub reason: String,
}

impl TryFrom<&toml::Value> for Value {
    type Error = AttrValueError;

    fn try_from(v: &toml::Value) -> Result<Value, AttrValueError> {
        match v {
            toml::Value::String(s) => Ok(Value::Str(s.clone())),
            // Integers beyond 2^53 lose precision; attributes are sizes and counts, far below.
            toml::Value::Integer(i) => Ok(Value::Num(*i as f64)),
            toml::Value::Float(x) => Ok(Value::Num(*x)),
            toml::Value::Boolean(b) => Ok(Value::Bool(*b)),
            other => Err(AttrValueError {
                text: other.to_string(),
                reason: format!(
                    "a {} is not an attribute value (use a string, a number or a boolean)",
                    other.type_str()
                ),
            }),
        }
    }
}

impl Value {
    /// Parses one value written as TOML text (`"linux"`, `16`, `2.5`, `true`), the form the
    /// dean reports node attributes in.
    pub fn from_toml_text(text: &str) -> Result<Value, AttrValueError> {
        let v: toml::Value = text.parse().map_err(|e: toml::de::Error| AttrValueError {
            text: text.to_string(),
            reason: e.message().to_string(),
        })?;
        Value::try_from(&v)
    }

    /// This value as TOML text (the inverse of [`Value::from_toml_text`]).
    pub fn to_toml_text(&self) -> String {
        match self {
            Value::Str(s) => toml::Value::String(s.clone()).to_string(),
            Value::Num(n) => toml::Value::Float(*n).to_string(),
            Value::Bool(b) => b.to_string(),
        }
    }
}

/// A comparison operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CmpOp {
    /// `==`
    Eq,
    /// `!=`
    Ne,
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
}

impl CmpOp {
    /// The operator as written.
    pub fn as_str(self) -> &'static str {
        match self {
            CmpOp::Eq => "==",
            CmpOp::Ne => "!=",
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
            CmpOp::Gt => ">",
            CmpOp::Ge => ">=",
        }
    }

    fn is_ordering(self) -> bool {
        !matches!(self, CmpOp::Eq | CmpOp::Ne)
    }

    fn holds(self, ord: std::cmp::Ordering) -> bool {
        use std::cmp::Ordering::*;
        match self {
            CmpOp::Eq => ord == Equal,
            CmpOp::Ne => ord != Equal,
            CmpOp::Lt => ord == Less,
            CmpOp::Le => ord != Greater,
            CmpOp::Gt => ord == Greater,
            CmpOp::Ge => ord != Less,
        }
    }
}

impl fmt::Display for CmpOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A parsed `where` expression.
///
/// The parser builds `And`/`Or` with at least two operands (`a and b and c` is one `And` of
/// three); a parenthesised group stays a separate node, so printing and parsing again gives the
/// same tree.
#[derive(Clone, Debug, PartialEq)]
pub enum Expr {
    /// `attr op value`
    Cmp {
        /// The attribute compared.
        attr: String,
        /// The operator.
        op: CmpOp,
        /// The literal compared with.
        value: Value,
    },
    /// `attr in (v, ...)`
    In {
        /// The attribute tested.
        attr: String,
        /// The accepted values (at least one).
        values: Vec<Value>,
    },
    /// `not e`
    Not(Box<Expr>),
    /// `e and e and ...`: true when all are (an empty `And` is true).
    And(Vec<Expr>),
    /// `e or e or ...`: true when any is (an empty `Or` is false).
    Or(Vec<Expr>),
}

impl Expr {
    /// Evaluates the expression against a node's attributes (the rules are in the module doc).
    pub fn eval(&self, attrs: &Attrs) -> bool {
        match self {
            Expr::Cmp { attr, op, value } => match attrs.get(attr) {
                None => false,
                Some(have) => compare(have, *op, value),
            },
            Expr::In { attr, values } => match attrs.get(attr) {
                None => false,
                Some(have) => values.iter().any(|v| compare(have, CmpOp::Eq, v)),
            },
            Expr::Not(e) => !e.eval(attrs),
            Expr::And(es) => es.iter().all(|e| e.eval(attrs)),
            Expr::Or(es) => es.iter().any(|e| e.eval(attrs)),
        }
    }
}

/// `have op want` for a present attribute.
fn compare(have: &Value, op: CmpOp, want: &Value) -> bool {
    let ord = match (have, want) {
        (Value::Num(a), Value::Num(b)) => a.partial_cmp(b),
        (Value::Str(a), Value::Str(b)) => Some(a.cmp(b)),
        (Value::Bool(a), Value::Bool(b)) if !op.is_ordering() => Some(a.cmp(b)),
        (Value::Bool(_), Value::Bool(_)) => return false,
        // Different types: never equal, never ordered.
        _ => return op == CmpOp::Ne,
    };
    match ord {
        Some(ord) => op.holds(ord),
        // NaN: equal to nothing.
        None => op == CmpOp::Ne,
    }
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expr::Cmp { attr, op, value } => write!(f, "{attr} {op} {value}"),
            Expr::In { attr, values } => {
                write!(f, "{attr} in (")?;
                for (i, v) in values.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{v}")?;
                }
                f.write_str(")")
            }
            Expr::Not(e) => {
                f.write_str("not ")?;
                write_operand(f, e, matches!(**e, Expr::And(_) | Expr::Or(_)))
            }
            Expr::And(es) => {
                for (i, e) in es.iter().enumerate() {
                    if i > 0 {
                        f.write_str(" and ")?;
                    }
                    write_operand(f, e, matches!(e, Expr::And(_) | Expr::Or(_)))?;
                }
                Ok(())
            }
            Expr::Or(es) => {
                for (i, e) in es.iter().enumerate() {
                    if i > 0 {
                        f.write_str(" or ")?;
                    }
                    write_operand(f, e, matches!(e, Expr::Or(_)))?;
                }
                Ok(())
            }
        }
    }
}

fn write_operand(f: &mut fmt::Formatter<'_>, e: &Expr, parens: bool) -> fmt::Result {
    if parens {
        write!(f, "({e})")
    } else {
        write!(f, "{e}")
    }
}

/// A parsed placement.
#[derive(Clone, Debug, PartialEq)]
pub struct Placement {
    /// How many instances to run (≥ 1 when parsed).
    pub count: u32,
    /// The `where` filter; `None`: every node is eligible.
    pub filter: Option<Expr>,
    /// The `distinct` attribute: no two instances on nodes sharing its value.
    pub distinct: Option<String>,
    /// The `spread` attribute: instances balanced across its values.
    pub spread: Option<String>,
}

impl Placement {
    /// Whether a node with these attributes passes the `where` filter (only the filter:
    /// `distinct` and `spread` depend on where the other instances are).
    pub fn eligible(&self, attrs: &Attrs) -> bool {
        self.filter.as_ref().is_none_or(|e| e.eval(attrs))
    }
}

impl fmt::Display for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "count {}", self.count)?;
        if let Some(e) = &self.filter {
            write!(f, "; where {e}")?;
        }
        if let Some(a) = &self.distinct {
            write!(f, "; distinct {a}")?;
        }
        if let Some(a) = &self.spread {
            write!(f, "; spread {a}")?;
        }
        Ok(())
    }
}

/// Why a placement does not parse, and where (the offending token).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}, column {column}: {message}")]
pub struct ParseError {
    /// 1-based line of the offending token.
    pub line: u32,
    /// 1-based column (in characters) of the offending token.
    pub column: u32,
    /// What is wrong.
    pub message: String,
}

/// Parses a placement (the grammar and the rules are in the module doc).
pub fn parse(src: &str) -> Result<Placement, ParseError> {
    if src.len() > PLACEMENT_BYTES_MAX {
        return Err(ParseError {
            line: 1,
            column: 1,
            message: format!(
                "placement is {} bytes long; at most {PLACEMENT_BYTES_MAX} are accepted",
                src.len()
            ),
        });
    }
    let tokens = lex(src)?;
    Parser {
        tokens,
        at: 0,
        depth: 0,
    }
    .placement()
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    /// The number and its text (to tell `3` from `3.0` and `-3` for `count`).
    Num(f64, String),
    Op(CmpOp),
    Semi,
    Comma,
    LParen,
    RParen,
    Eof,
}

#[derive(Clone, Debug)]
struct Token {
    tok: Tok,
    line: u32,
    column: u32,
}

impl Token {
    fn err(&self, message: impl Into<String>) -> ParseError {
        ParseError {
            line: self.line,
            column: self.column,
            message: message.into(),
        }
    }

    /// How the token is named in messages.
    fn describe(&self) -> String {
        match &self.tok {
            Tok::Ident(s) => format!("`{s}`"),
            Tok::Str(s) => format!("the string {}", Value::Str(s.clone())),
            Tok::Num(_, text) => format!("`{text}`"),
            Tok::Op(op) => format!("`{op}`"),
            Tok::Semi => "`;`".into(),
            Tok::Comma => "`,`".into(),
            Tok::LParen => "`(`".into(),
            Tok::RParen => "`)`".into(),
            Tok::Eof => "the end of the placement".into(),
        }
    }

    fn is_word(&self, w: &str) -> bool {
        matches!(&self.tok, Tok::Ident(s) if s == w)
    }
}

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_'
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-'
}

fn lex(src: &str) -> Result<Vec<Token>, ParseError> {
    let chars: Vec<char> = src.chars().collect();
    let mut tokens = Vec::new();
    let (mut i, mut line, mut column) = (0usize, 1u32, 1u32);
    // Advances over chars[i..j] (which may contain newlines inside strings).
    let advance = |from: usize, to: usize, line: &mut u32, column: &mut u32| {
        for &c in &chars[from..to] {
            if c == '\n' {
                *line += 1;
                *column = 1;
            } else {
                *column += 1;
            }
        }
    };
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            advance(i, i + 1, &mut line, &mut column);
            i += 1;
            continue;
        }
        let here = |message: String| ParseError {
            line,
            column,
            message,
        };
        let (tok, len) = match c {
            ';' => (Tok::Semi, 1),
            ',' => (Tok::Comma, 1),
            '(' => (Tok::LParen, 1),
            ')' => (Tok::RParen, 1),
            '=' | '!' | '<' | '>' => {
                let next_eq = chars.get(i + 1) == Some(&'=');
                match (c, next_eq) {
                    ('=', true) => (Tok::Op(CmpOp::Eq), 2),
                    ('!', true) => (Tok::Op(CmpOp::Ne), 2),
                    ('<', true) => (Tok::Op(CmpOp::Le), 2),
                    ('>', true) => (Tok::Op(CmpOp::Ge), 2),
                    ('<', false) => (Tok::Op(CmpOp::Lt), 1),
                    ('>', false) => (Tok::Op(CmpOp::Gt), 1),
                    ('=', false) => {
                        return Err(here("unexpected `=`: equality is written `==`".into()))
                    }
                    _ => {
                        return Err(here(
                            "unexpected `!`: write `!=` to compare, `not` to negate".into(),
                        ))
                    }
                }
            }
            '"' => {
                let mut s = String::new();
                let mut j = i + 1;
                loop {
                    match chars.get(j) {
                        None => return Err(here("unterminated string: no closing `\"`".into())),
                        Some('"') => break,
                        Some('\\') => match chars.get(j + 1) {
                            Some(&e @ ('"' | '\\')) => {
                                s.push(e);
                                j += 2;
                            }
                            other => {
                                let (mut l, mut col) = (line, column);
                                advance(i, j, &mut l, &mut col);
                                let what = match other {
                                    Some(o) => format!("`\\{o}`"),
                                    None => "`\\` at the end".into(),
                                };
                                return Err(ParseError {
                                    line: l,
                                    column: col,
                                    message: format!(
                                        "unknown escape {what} in a string: only `\\\"` and `\\\\` are escapes"
                                    ),
                                });
                            }
                        },
                        Some(&o) => {
                            s.push(o);
                            j += 1;
                        }
                    }
                }
                (Tok::Str(s), j + 1 - i)
            }
            c if c.is_ascii_digit() || c == '-' => {
                let mut j = i + 1;
                while j < chars.len() && is_ident_char(chars[j]) {
                    j += 1;
                }
                let text: String = chars[i..j].iter().collect();
                if !is_number(&text) {
                    let message = if text == "-" {
                        "unexpected `-`: a negative number is written `-1`".to_string()
                    } else {
                        format!("malformed number `{text}` (numbers are like 8, -1 or 2.5)")
                    };
                    return Err(here(message));
                }
                let n: f64 = text
                    .parse()
                    .map_err(|_| here(format!("malformed number `{text}`")))?;
                (Tok::Num(n, text), j - i)
            }
            c if is_ident_start(c) => {
                let mut j = i + 1;
                while j < chars.len() && is_ident_char(chars[j]) {
                    j += 1;
                }
                (Tok::Ident(chars[i..j].iter().collect()), j - i)
            }
            '\'' => {
                return Err(here(
                    "unexpected character `'`: strings are written in double quotes".to_string(),
                ))
            }
            other => return Err(here(format!("unexpected character `{other}`"))),
        };
        tokens.push(Token { tok, line, column });
        advance(i, i + len, &mut line, &mut column);
        i += len;
    }
    tokens.push(Token {
        tok: Tok::Eof,
        line,
        column,
    });
    Ok(tokens)
}

/// `-?[0-9]+(\.[0-9]+)?`
fn is_number(text: &str) -> bool {
    let digits = text.strip_prefix('-').unwrap_or(text);
    let (int, frac) = match digits.split_once('.') {
        Some((a, b)) => (a, Some(b)),
        None => (digits, None),
    };
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    all_digits(int) && frac.is_none_or(all_digits)
}

/// Levenshtein distance, for "did you mean".
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, &cb) in b.iter().enumerate() {
            let cost = usize::from(ca != cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

struct Parser {
    tokens: Vec<Token>,
    at: usize,
    depth: usize,
}

impl Parser {
    fn peek(&self) -> &Token {
        &self.tokens[self.at]
    }

    fn next(&mut self) -> Token {
        let t = self.tokens[self.at].clone();
        if t.tok != Tok::Eof {
            self.at += 1;
        }
        t
    }

    fn placement(mut self) -> Result<Placement, ParseError> {
        let mut seen: BTreeMap<&'static str, Token> = BTreeMap::new();
        let mut count = None;
        let mut filter = None;
        let mut distinct = None;
        let mut spread = None;
        loop {
            let kw = self.next();
            let name = match &kw.tok {
                Tok::Eof => break,
                Tok::Semi => {
                    return Err(kw.err("empty clause: `;` must follow a clause"));
                }
                Tok::Ident(name) => name.clone(),
                _ => {
                    return Err(kw.err(format!(
                        "expected a clause (count, where, distinct, spread), found {}",
                        kw.describe()
                    )))
                }
            };
            let Some(clause) = CLAUSES.iter().copied().find(|c| *c == name) else {
                let near = CLAUSES
                    .iter()
                    .copied()
                    .filter(|c| edit_distance(&name.to_ascii_lowercase(), c) <= 2)
                    .min_by_key(|c| edit_distance(&name.to_ascii_lowercase(), c));
                let hint = match near {
                    Some(c) => format!("did you mean `{c}`? "),
                    None => String::new(),
                };
                return Err(kw.err(format!(
                    "unknown clause `{name}`: {hint}the clauses are `count N`, `where EXPR`, `distinct ATTR` and `spread ATTR`"
                )));
            };
            if let Some(first) = seen.get(clause) {
                return Err(kw.err(format!(
                    "duplicate `{clause}` clause (the first is at line {}, column {})",
                    first.line, first.column
                )));
            }
            seen.insert(clause, kw.clone());
            match clause {
                "count" => count = Some(self.count()?),
                "where" => filter = Some(self.or_expr()?),
                "distinct" => distinct = Some(self.attr_name(clause)?),
                _ => spread = Some(self.attr_name(clause)?),
            }
            let end = self.next();
            match end.tok {
                Tok::Semi => continue,
                Tok::Eof => break,
                _ => {
                    let also = if clause == "where" {
                        ", `and`, `or`"
                    } else {
                        ""
                    };
                    return Err(end.err(format!(
                        "expected `;`{also} or the end after the `{clause}` clause, found {}",
                        end.describe()
                    )));
                }
            }
        }
        let Some(count) = count else {
            return Err(self
                .peek()
                .err("missing `count N` clause: it says how many instances run"));
        };
        Ok(Placement {
            count,
            filter,
            distinct,
            spread,
        })
    }

    fn count(&mut self) -> Result<u32, ParseError> {
        let t = self.next();
        let Tok::Num(n, text) = &t.tok else {
            return Err(t.err(format!(
                "`count` needs a whole number of instances (1 or more), found {}",
                t.describe()
            )));
        };
        if text.contains('.') {
            return Err(t.err(format!("count must be a whole number, found `{text}`")));
        }
        if *n < 1.0 {
            return Err(t.err(format!("count must be at least 1, found `{text}`")));
        }
        if *n > f64::from(u32::MAX) {
            return Err(t.err(format!(
                "count `{text}` is too large (at most {})",
                u32::MAX
            )));
        }
        Ok(*n as u32)
    }

    /// An attribute name: for `distinct`/`spread` (`clause`) or in an expression.
    fn attr_name(&mut self, after: &str) -> Result<String, ParseError> {
        let t = self.next();
        match &t.tok {
            Tok::Ident(name) if RESERVED.contains(&name.as_str()) => Err(t.err(format!(
                "`{name}` is a reserved word, not an attribute name"
            ))),
            Tok::Ident(name) => Ok(name.clone()),
            _ => Err(t.err(format!(
                "expected an attribute name after `{after}`, found {}",
                t.describe()
            ))),
        }
    }

    fn or_expr(&mut self) -> Result<Expr, ParseError> {
        let mut es = vec![self.and_expr()?];
        while self.peek().is_word("or") {
            self.next();
            es.push(self.and_expr()?);
        }
        Ok(if es.len() == 1 {
            es.pop().expect("one operand")
        } else {
            Expr::Or(es)
        })
    }

    fn and_expr(&mut self) -> Result<Expr, ParseError> {
        let mut es = vec![self.not_expr()?];
        while self.peek().is_word("and") {
            self.next();
            es.push(self.not_expr()?);
        }
        Ok(if es.len() == 1 {
            es.pop().expect("one operand")
        } else {
            Expr::And(es)
        })
    }

    fn enter(&mut self, t: &Token) -> Result<(), ParseError> {
        self.depth += 1;
        if self.depth > NESTING_MAX {
            return Err(t.err(format!(
                "expression nested too deeply (at most {NESTING_MAX} levels of `(` and `not`)"
            )));
        }
        Ok(())
    }

    fn not_expr(&mut self) -> Result<Expr, ParseError> {
        let t = self.peek().clone();
        if t.is_word("not") {
            self.next();
            self.enter(&t)?;
            let e = self.not_expr()?;
            self.depth -= 1;
            return Ok(Expr::Not(Box::new(e)));
        }
        self.primary()
    }

    fn primary(&mut self) -> Result<Expr, ParseError> {
        let t = self.peek().clone();
        match &t.tok {
            Tok::LParen => {
                self.next();
                self.enter(&t)?;
                let e = self.or_expr()?;
                self.depth -= 1;
                let close = self.next();
                match close.tok {
                    Tok::RParen => Ok(e),
                    Tok::Semi | Tok::Eof => {
                        Err(t.err(format!("unclosed `(`: no `)` before {}", close.describe())))
                    }
                    _ => Err(close.err(format!(
                        "expected `)`, `and` or `or`, found {}",
                        close.describe()
                    ))),
                }
            }
            Tok::Ident(name) if !RESERVED.contains(&name.as_str()) => {
                self.next();
                let attr = name.clone();
                let op = self.next();
                match &op.tok {
                    Tok::Op(op) => {
                        let value = self.literal()?;
                        if op.is_ordering() && matches!(value, Value::Bool(_)) {
                            let lit = &self.tokens[self.at - 1];
                            return Err(lit.err(format!(
                                "`{op}` orders numbers or strings; a boolean compares only with `==` or `!=`"
                            )));
                        }
                        Ok(Expr::Cmp {
                            attr,
                            op: *op,
                            value,
                        })
                    }
                    Tok::Ident(w) if w == "in" => {
                        let open = self.next();
                        if open.tok != Tok::LParen {
                            return Err(open.err(format!(
                                "expected `(` after `in`, found {}",
                                open.describe()
                            )));
                        }
                        let mut values = vec![self.literal()?];
                        loop {
                            let sep = self.next();
                            match sep.tok {
                                Tok::Comma => values.push(self.literal()?),
                                Tok::RParen => break,
                                Tok::Semi | Tok::Eof => {
                                    return Err(open.err(format!(
                                        "unclosed `(` of `in`: no `)` before {}",
                                        sep.describe()
                                    )))
                                }
                                _ => {
                                    return Err(sep.err(format!(
                                        "expected `,` or `)` in the `in` list, found {}",
                                        sep.describe()
                                    )))
                                }
                            }
                        }
                        Ok(Expr::In { attr, values })
                    }
                    _ => Err(op.err(format!(
                        "expected a comparison (== != < <= > >=) or `in` after `{attr}`, found {}",
                        op.describe()
                    ))),
                }
            }
            _ => Err(t.err(format!(
                "expected an attribute name, `not` or `(`, found {}",
                t.describe()
            ))),
        }
    }

    fn literal(&mut self) -> Result<Value, ParseError> {
        let t = self.next();
        match &t.tok {
            Tok::Str(s) => Ok(Value::Str(s.clone())),
            Tok::Num(n, _) => Ok(Value::Num(*n)),
            Tok::Ident(w) if w == "true" => Ok(Value::Bool(true)),
            Tok::Ident(w) if w == "false" => Ok(Value::Bool(false)),
            Tok::Ident(w) => Err(t.err(format!(
                "expected a value (a \"string\", a number, true or false), found `{w}`: strings are double-quoted"
            ))),
            _ => Err(t.err(format!(
                "expected a value (a \"string\", a number, true or false), found {}",
                t.describe()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(pairs: &[(&str, Value)]) -> Attrs {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    fn s(v: &str) -> Value {
        Value::Str(v.into())
    }

    fn err(src: &str) -> ParseError {
        parse(src).expect_err(src)
    }

    #[test]
    fn parses_the_design_example() {
        let p = parse(
            r#"count 3; where os == "linux" and mem_gb >= 8 and rack != "r7"; distinct host; spread rack"#,
        )
        .unwrap();
        assert_eq!(p.count, 3);
        assert_eq!(p.distinct.as_deref(), Some("host"));
        assert_eq!(p.spread.as_deref(), Some("rack"));
        assert_eq!(
            p.filter,
            Some(Expr::And(vec![
                Expr::Cmp {
                    attr: "os".into(),
                    op: CmpOp::Eq,
                    value: s("linux")
                },
                Expr::Cmp {
                    attr: "mem_gb".into(),
                    op: CmpOp::Ge,
                    value: Value::Num(8.0)
                },
                Expr::Cmp {
                    attr: "rack".into(),
                    op: CmpOp::Ne,
                    value: s("r7")
                },
            ]))
        );
        let node = attrs(&[
            ("os", s("linux")),
            ("mem_gb", Value::Num(16.0)),
            ("rack", s("r1")),
        ]);
        assert!(p.eligible(&node));
        let small = attrs(&[
            ("os", s("linux")),
            ("mem_gb", Value::Num(4.0)),
            ("rack", s("r1")),
        ]);
        assert!(!p.eligible(&small));
    }

    #[test]
    fn clauses_in_any_order_with_trailing_semicolon_and_newlines() {
        let p = parse("\n  spread rack;\n  distinct host;\n  count 2;\n").unwrap();
        assert_eq!(
            p,
            Placement {
                count: 2,
                filter: None,
                distinct: Some("host".into()),
                spread: Some("rack".into())
            }
        );
        assert_eq!(p.to_string(), "count 2; distinct host; spread rack");
        assert!(p.eligible(&Attrs::new()));
    }

    #[test]
    fn precedence_is_not_then_and_then_or() {
        let p = parse("count 1; where not a == 1 and b == 2 or c == 3").unwrap();
        let cmp = |a: &str, n: f64| Expr::Cmp {
            attr: a.into(),
            op: CmpOp::Eq,
            value: Value::Num(n),
        };
        assert_eq!(
            p.filter.unwrap(),
            Expr::Or(vec![
                Expr::And(vec![Expr::Not(Box::new(cmp("a", 1.0))), cmp("b", 2.0)]),
                cmp("c", 3.0)
            ])
        );
        let p = parse("count 1; where a == 1 and (b == 2 or c == 3)").unwrap();
        assert_eq!(
            p.filter.unwrap(),
            Expr::And(vec![
                cmp("a", 1.0),
                Expr::Or(vec![cmp("b", 2.0), cmp("c", 3.0)])
            ])
        );
    }

    #[test]
    fn literals_strings_numbers_booleans() {
        let p = parse(r#"count 1; where a == "q\"uo\\te" and b >= -2.5 and c == true and d in ("x", 1, false)"#)
            .unwrap();
        let Some(Expr::And(es)) = p.filter else {
            panic!()
        };
        assert_eq!(
            es[0],
            Expr::Cmp {
                attr: "a".into(),
                op: CmpOp::Eq,
                value: s("q\"uo\\te")
            }
        );
        assert_eq!(
            es[1],
            Expr::Cmp {
                attr: "b".into(),
                op: CmpOp::Ge,
                value: Value::Num(-2.5)
            }
        );
        assert_eq!(
            es[2],
            Expr::Cmp {
                attr: "c".into(),
                op: CmpOp::Eq,
                value: Value::Bool(true)
            }
        );
        assert_eq!(
            es[3],
            Expr::In {
                attr: "d".into(),
                values: vec![s("x"), Value::Num(1.0), Value::Bool(false)]
            }
        );
        // Identifiers may hold `.` and `-`; operators need no spaces.
        let p = parse(r#"count 1;where net.zone-a>=-1"#).unwrap();
        assert_eq!(
            p.filter.unwrap(),
            Expr::Cmp {
                attr: "net.zone-a".into(),
                op: CmpOp::Ge,
                value: Value::Num(-1.0)
            }
        );
    }

    #[test]
    fn missing_attribute_makes_every_comparison_false_and_not_true() {
        let none = Attrs::new();
        for src in [
            r#"rack == "r7""#,
            r#"rack != "r7""#,
            "rack < 1",
            "rack >= 1",
            r#"rack in ("r7")"#,
        ] {
            let p = parse(&format!("count 1; where {src}")).unwrap();
            assert!(!p.eligible(&none), "{src} on no attributes");
            let p = parse(&format!("count 1; where not {src}")).unwrap();
            assert!(p.eligible(&none), "not {src} on no attributes");
        }
    }

    #[test]
    fn comparison_semantics() {
        let node = attrs(&[
            ("mem_gb", Value::Num(8.0)),
            ("os", s("linux")),
            ("gpu", Value::Bool(false)),
            ("ver", s("10")),
        ]);
        let holds = |src: &str| {
            parse(&format!("count 1; where {src}"))
                .unwrap()
                .eligible(&node)
        };
        // Numbers compare numerically.
        assert!(holds("mem_gb == 8.0"));
        assert!(holds("mem_gb >= 8") && holds("mem_gb <= 8") && !holds("mem_gb < 8"));
        assert!(holds("mem_gb > 7.5") && !holds("mem_gb > 8"));
        // Strings compare lexicographically: "10" < "9".
        assert!(holds(r#"ver < "9""#));
        assert!(holds(r#"os > "bsd""#) && !holds(r#"os < "bsd""#));
        // A string and a number are never equal; only != holds.
        assert!(!holds(r#"mem_gb == "8""#));
        assert!(holds(r#"mem_gb != "8""#));
        assert!(!holds(r#"mem_gb < "9""#) && !holds(r#"ver > 1"#));
        assert!(!holds("ver == 10"));
        // Booleans.
        assert!(holds("gpu == false") && holds("gpu != true") && !holds("gpu == true"));
        // in
        assert!(holds(r#"os in ("bsd", "linux")"#));
        assert!(!holds(r#"os in ("bsd", "mac")"#));
        assert!(holds("mem_gb in (4, 8)"));
        assert!(!holds(r#"mem_gb in ("8")"#));
    }

    #[test]
    fn count_errors_point_at_the_value() {
        let e = err("count three");
        assert_eq!((e.line, e.column), (1, 7));
        assert!(e.message.contains("`three`"), "{e}");
        assert_eq!(e.to_string(), format!("line 1, column 7: {}", e.message));
        let e = err("count 0");
        assert_eq!((e.line, e.column), (1, 7));
        assert!(e.message.contains("at least 1"), "{e}");
        let e = err("count -2");
        assert!(e.message.contains("at least 1"), "{e}");
        let e = err("count 1.5");
        assert!(e.message.contains("whole number"), "{e}");
        let e = err("count 4294967296");
        assert!(e.message.contains("too large"), "{e}");
        assert_eq!(parse("count 4294967295").unwrap().count, u32::MAX);
        let e = err("count");
        assert!(e.message.contains("end of the placement"), "{e}");
    }

    #[test]
    fn missing_count_is_an_error() {
        for src in ["", "  ", "distinct host", "where a == 1;"] {
            let e = err(src);
            assert!(e.message.contains("missing `count N`"), "{src}: {e}");
        }
    }

    #[test]
    fn unknown_clause_suggests_the_known_ones() {
        let e = err("count 3; spred rack");
        assert_eq!((e.line, e.column), (1, 10));
        assert!(e.message.contains("unknown clause `spred`"), "{e}");
        assert!(e.message.contains("did you mean `spread`?"), "{e}");
        assert!(e
            .message
            .contains("`count N`, `where EXPR`, `distinct ATTR` and `spread ATTR`"));
        let e = err("count 3; colour blue");
        assert!(!e.message.contains("did you mean"), "{e}");
        assert!(e.message.contains("`distinct ATTR`"), "{e}");
    }

    #[test]
    fn duplicate_clause_points_at_the_second() {
        let e = err("count 3; distinct host;\ncount 4");
        assert_eq!((e.line, e.column), (2, 1));
        assert!(e.message.contains("duplicate `count`"), "{e}");
        assert!(e.message.contains("line 1, column 1"), "{e}");
        let e = err("count 1; where a == 1; where b == 2");
        assert_eq!(e.column, 24);
    }

    #[test]
    fn unclosed_paren_points_at_it() {
        let e = err("count 1; where (a == 1 or b == 2; distinct host");
        assert_eq!((e.line, e.column), (1, 16));
        assert!(e.message.contains("unclosed `(`"), "{e}");
        let e = err("count 1; where a in (1, 2");
        assert_eq!(e.column, 21);
        assert!(e.message.contains("unclosed `(`"), "{e}");
        let e = err("count 1; where (a == 1 b == 2)");
        assert_eq!(e.column, 24);
        assert!(e.message.contains("found `b`"), "{e}");
        let e = err("count 1; where a == 1)");
        assert_eq!(e.column, 22);
    }

    #[test]
    fn expression_errors_point_at_the_token() {
        let cases: &[(&str, u32, &str)] = &[
            ("count 1; where os = \"linux\"", 19, "`==`"),
            ("count 1; where os == linux", 22, "double-quoted"),
            ("count 1; where 3 == os", 16, "attribute name"),
            ("count 1; where os", 18, "end of the placement"),
            ("count 1; where os ~ 1", 19, "unexpected character `~`"),
            ("count 1; where os == 'linux'", 22, "double quotes"),
            ("count 1; where a == \"abc", 21, "unterminated string"),
            ("count 1; where a == \"a\\nb\"", 23, "unknown escape `\\n`"),
            ("count 1; where a == 1.2.3", 21, "malformed number `1.2.3`"),
            ("count 1; where a == 8gb", 21, "malformed number `8gb`"),
            ("count 1; where a < true", 20, "boolean"),
            ("count 1; where a and b", 18, "comparison"),
            ("count 1; where not and", 20, "attribute name"),
            ("count 1; where a in 1", 21, "`(` after `in`"),
            ("count 1; where a in ()", 22, "value"),
            ("count 1; distinct", 18, "attribute name after `distinct`"),
            ("count 1; distinct and", 19, "reserved"),
            ("count 1; spread rack host", 22, "found `host`"),
            ("count 1;; distinct host", 9, "empty clause"),
            ("; count 1", 1, "empty clause"),
            ("count 1; where a == 1 b", 23, "`and`, `or`"),
            ("count 1 2", 9, "found `2`"),
            ("(count 1)", 1, "expected a clause"),
        ];
        for (src, column, needle) in cases {
            let e = err(src);
            assert_eq!(e.column, *column, "{src}: {e}");
            assert!(e.message.contains(needle), "{src}: {e} lacks {needle}");
        }
    }

    #[test]
    fn positions_count_lines_and_characters() {
        let e = err("count 2;\n  where é == \"ü\" and\n   x ==");
        // `é` is not an identifier start.
        assert_eq!((e.line, e.column), (2, 9));
        let e = err("count 2;\n  where a == \"ü\" and\n   x ==");
        assert_eq!((e.line, e.column), (3, 8));
        assert!(e.message.contains("end of the placement"));
    }

    #[test]
    fn bounds_nesting_and_length() {
        let deep = format!("count 1; where {}a == 1{}", "(".repeat(65), ")".repeat(65));
        assert!(err(&deep).message.contains("nested too deeply"));
        let ok = format!("count 1; where {}a == 1{}", "(".repeat(64), ")".repeat(64));
        assert!(parse(&ok).is_ok());
        let nots = format!("count 1; where {}a == 1", "not ".repeat(65));
        assert!(err(&nots).message.contains("nested too deeply"));
        let long = format!("count 1; where {}", vec!["a == 1"; 20_000].join(" and "));
        assert!(err(&long).message.contains("bytes long"));
        // A long flat chain is one node, not a deep tree.
        let flat = format!("count 1; where {}", vec!["a == 1"; 5_000].join(" and "));
        let p = parse(&flat).unwrap();
        assert!(matches!(&p.filter, Some(Expr::And(es)) if es.len() == 5_000));
        assert!(p.eligible(&attrs(&[("a", Value::Num(1.0))])));
    }

    #[test]
    fn display_is_normalised_and_parses_back() {
        let src = r#"spread rack ; where not (a==1 or b=="x\"y") and (c in (1,2) and d<=-0.5) or e!=true; count 7"#;
        let p = parse(src).unwrap();
        let printed = p.to_string();
        assert_eq!(
            printed,
            r#"count 7; where not (a == 1 or b == "x\"y") and (c in (1, 2) and d <= -0.5) or e != true; spread rack"#
        );
        assert_eq!(parse(&printed).unwrap(), p);
    }

    #[test]
    fn values_from_toml() {
        assert_eq!(Value::from_toml_text("\"linux\"").unwrap(), s("linux"));
        assert_eq!(Value::from_toml_text("16").unwrap(), Value::Num(16.0));
        assert_eq!(Value::from_toml_text("2.5").unwrap(), Value::Num(2.5));
        assert_eq!(Value::from_toml_text("true").unwrap(), Value::Bool(true));
        let e = Value::from_toml_text("[1, 2]").unwrap_err();
        assert!(e.to_string().contains("array"), "{e}");
        assert!(Value::from_toml_text("linux").is_err());
        assert!(Value::from_toml_text("1\nx = 2").is_err());
        for v in [
            s("a\"b"),
            Value::Num(16.0),
            Value::Num(-2.5),
            Value::Bool(false),
        ] {
            assert_eq!(Value::from_toml_text(&v.to_toml_text()).unwrap(), v);
        }
        let table: toml::Table = "os = \"linux\"\nmem_gb = 8\n".parse().unwrap();
        let a: Attrs = table
            .iter()
            .map(|(k, v)| (k.clone(), Value::try_from(v).unwrap()))
            .collect();
        assert_eq!(a, attrs(&[("mem_gb", Value::Num(8.0)), ("os", s("linux"))]));
        // JSON: untagged.
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(json, r#"{"mem_gb":8.0,"os":"linux"}"#);
        assert_eq!(serde_json::from_str::<Attrs>(&json).unwrap(), a);
    }
}
