//! Avro binary decoding against a plan compiled once per writer schema.
//!
//! apache-avro parses the schema JSON; this module turns that schema into a [`Node`] tree that
//! a tight loop can walk without lookups or allocation per field name, and decodes bare Avro
//! datums (no container header) with it. Every read is bounds-checked: a truncated or
//! corrupt payload is an error naming the offset, never a panic.

use crate::model::Value;
use apache_avro::Schema;
use apache_avro::schema::Name;
use std::collections::HashMap;
use std::sync::Arc;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AvroError {
    #[error("Avro payload ends early at byte {offset} (reading {what})")]
    Truncated { offset: usize, what: &'static str },
    #[error("Avro payload is corrupt at byte {offset}: {message}")]
    Corrupt { offset: usize, message: String },
    #[error("Avro schema is not usable: {0}")]
    Schema(String),
}

/// A compiled schema node.
#[derive(Debug, Clone)]
pub enum Node {
    Null,
    Boolean,
    Int,
    Long,
    Float,
    Double,
    Bytes,
    String,
    Fixed(usize),
    Enum(Arc<[String]>),
    Array(Box<Node>),
    Map(Box<Node>),
    Union(Arc<[Node]>),
    Record(Arc<Record>),
}

#[derive(Debug)]
pub struct Record {
    pub name: String,
    pub fields: Vec<(String, Node)>,
}

impl Node {
    /// Compiles an apache-avro schema, resolving named references.
    pub fn compile(schema: &Schema) -> Result<Node, AvroError> {
        let mut names = HashMap::new();
        compile(schema, &mut names)
    }

    /// The record branch of this node: itself, or the first record inside a union.
    pub fn record(&self) -> Option<&Arc<Record>> {
        match self {
            Node::Record(r) => Some(r),
            Node::Union(branches) => branches.iter().find_map(|b| match b {
                Node::Record(r) => Some(r),
                _ => None,
            }),
            _ => None,
        }
    }
}

fn compile(schema: &Schema, names: &mut HashMap<String, Node>) -> Result<Node, AvroError> {
    Ok(match schema {
        Schema::Null => Node::Null,
        Schema::Boolean => Node::Boolean,
        Schema::Int | Schema::Date | Schema::TimeMillis => Node::Int,
        Schema::Long
        | Schema::TimeMicros
        | Schema::TimestampMillis
        | Schema::TimestampMicros
        | Schema::TimestampNanos
        | Schema::LocalTimestampMillis
        | Schema::LocalTimestampMicros
        | Schema::LocalTimestampNanos => Node::Long,
        Schema::Float => Node::Float,
        Schema::Double => Node::Double,
        Schema::Bytes | Schema::BigDecimal => Node::Bytes,
        Schema::String | Schema::Uuid => Node::String,
        Schema::Duration => Node::Fixed(12),
        Schema::Decimal(d) => compile(&d.inner, names)?,
        Schema::Array(a) => Node::Array(Box::new(compile(&a.items, names)?)),
        Schema::Map(m) => Node::Map(Box::new(compile(&m.types, names)?)),
        Schema::Union(u) => Node::Union(
            u.variants()
                .iter()
                .map(|v| compile(v, names))
                .collect::<Result<Vec<_>, _>>()?
                .into(),
        ),
        Schema::Record(r) => {
            let mut fields = Vec::with_capacity(r.fields.len());
            for f in &r.fields {
                fields.push((f.name.clone(), compile(&f.schema, names)?));
            }
            let node = Node::Record(Arc::new(Record {
                name: r.name.name.clone(),
                fields,
            }));
            names.insert(full_name(&r.name), node.clone());
            node
        }
        Schema::Enum(e) => {
            let node = Node::Enum(e.symbols.clone().into());
            names.insert(full_name(&e.name), node.clone());
            node
        }
        Schema::Fixed(f) => {
            let node = Node::Fixed(f.size);
            names.insert(full_name(&f.name), node.clone());
            node
        }
        Schema::Ref { name } => names
            .get(&full_name(name))
            .cloned()
            .ok_or_else(|| AvroError::Schema(format!("unresolved type reference `{name}`")))?,
    })
}

fn full_name(name: &Name) -> String {
    name.fullname(None)
}

/// A cursor over one Avro datum.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { buf, pos: 0 }
    }

    pub fn offset(&self) -> usize {
        self.pos
    }

    pub fn is_at_end(&self) -> bool {
        self.pos == self.buf.len()
    }

    fn corrupt(&self, message: impl Into<String>) -> AvroError {
        AvroError::Corrupt {
            offset: self.pos,
            message: message.into(),
        }
    }

    #[inline]
    fn varint(&mut self, what: &'static str) -> Result<u64, AvroError> {
        // Union branches, lengths and most small numbers fit in one byte.
        if let Some(&byte) = self.buf.get(self.pos)
            && byte & 0x80 == 0
        {
            self.pos += 1;
            return Ok(u64::from(byte));
        }
        self.varint_long(what)
    }

    fn varint_long(&mut self, what: &'static str) -> Result<u64, AvroError> {
        let mut value: u64 = 0;
        let mut shift = 0u32;
        loop {
            let byte = *self.buf.get(self.pos).ok_or(AvroError::Truncated {
                offset: self.pos,
                what,
            })?;
            self.pos += 1;
            if shift >= 64 {
                return Err(self.corrupt(format!("varint too long in {what}")));
            }
            value |= u64::from(byte & 0x7F) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
            shift += 7;
        }
    }

    #[inline]
    pub fn long(&mut self) -> Result<i64, AvroError> {
        let n = self.varint("long")?;
        Ok((n >> 1) as i64 ^ -((n & 1) as i64))
    }

    #[inline]
    pub fn int(&mut self) -> Result<i32, AvroError> {
        let v = self.long()?;
        i32::try_from(v).map_err(|_| self.corrupt(format!("int out of range: {v}")))
    }

    #[inline]
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], AvroError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        match end {
            Some(end) => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(AvroError::Truncated {
                offset: self.pos,
                what,
            }),
        }
    }

    #[inline]
    fn len(&mut self, what: &'static str) -> Result<usize, AvroError> {
        let n = self.long()?;
        usize::try_from(n).map_err(|_| self.corrupt(format!("negative length {n} for {what}")))
    }

    #[inline]
    pub fn bytes(&mut self) -> Result<&'a [u8], AvroError> {
        let n = self.len("bytes")?;
        self.take(n, "bytes")
    }

    #[inline]
    pub fn str(&mut self) -> Result<&'a str, AvroError> {
        let start = self.pos;
        let b = self.bytes()?;
        std::str::from_utf8(b).map_err(|_| AvroError::Corrupt {
            offset: start,
            message: "string is not UTF-8".to_string(),
        })
    }

    pub fn boolean(&mut self) -> Result<bool, AvroError> {
        match self.take(1, "boolean")?[0] {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(self.corrupt(format!("invalid boolean byte {b}"))),
        }
    }

    pub fn float(&mut self) -> Result<f32, AvroError> {
        let b = self.take(4, "float")?;
        Ok(f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn double(&mut self) -> Result<f64, AvroError> {
        let b = self.take(8, "double")?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(f64::from_le_bytes(a))
    }

    /// Reads a union branch index and returns the branch.
    #[inline]
    pub fn branch<'n>(&mut self, branches: &'n [Node]) -> Result<&'n Node, AvroError> {
        let i = self.long()?;
        usize::try_from(i)
            .ok()
            .and_then(|i| branches.get(i))
            .ok_or_else(|| {
                self.corrupt(format!(
                    "union branch {i} out of range ({} branches)",
                    branches.len()
                ))
            })
    }

    pub fn enum_symbol<'n>(&mut self, symbols: &'n [String]) -> Result<&'n str, AvroError> {
        let i = self.int()?;
        usize::try_from(i)
            .ok()
            .and_then(|i| symbols.get(i))
            .map(String::as_str)
            .ok_or_else(|| {
                self.corrupt(format!(
                    "enum index {i} out of range ({} symbols)",
                    symbols.len()
                ))
            })
    }

    /// Calls `item` for each element of an array (or map, with `map` set) block sequence.
    fn blocks(
        &mut self,
        map: bool,
        mut item: impl FnMut(&mut Self) -> Result<(), AvroError>,
    ) -> Result<(), AvroError> {
        loop {
            let mut count = self.long()?;
            if count == 0 {
                return Ok(());
            }
            if count < 0 {
                count = count
                    .checked_neg()
                    .ok_or_else(|| self.corrupt("block count"))?;
                self.long()?; // block size in bytes, not needed when reading items
            }
            // A block cannot hold more items than bytes remain; refuse absurd counts early.
            if count as u64 > (self.buf.len() - self.pos) as u64 + 1 {
                return Err(self.corrupt(format!("block count {count} exceeds payload")));
            }
            for _ in 0..count {
                if map {
                    self.str()?;
                }
                item(self)?;
            }
        }
    }

    /// Skips one value of `node`.
    pub fn skip(&mut self, node: &Node) -> Result<(), AvroError> {
        match node {
            Node::Null => {}
            Node::Boolean => {
                self.boolean()?;
            }
            Node::Int | Node::Long | Node::Enum(_) => {
                self.long()?;
            }
            Node::Float => {
                self.take(4, "float")?;
            }
            Node::Double => {
                self.take(8, "double")?;
            }
            Node::Bytes | Node::String => {
                self.bytes()?;
            }
            Node::Fixed(n) => {
                self.take(*n, "fixed")?;
            }
            Node::Array(item) => self.blocks(false, |r| r.skip(item))?,
            Node::Map(item) => self.blocks(true, |r| r.skip(item))?,
            Node::Union(branches) => {
                let b = self.branch(branches)?;
                self.skip(b)?;
            }
            Node::Record(rec) => {
                for (_, f) in &rec.fields {
                    self.skip(f)?;
                }
            }
        }
        Ok(())
    }

    /// Reads a list of strings (`array<string>`, possibly inside a nullable union).
    pub fn string_list(&mut self, node: &Node) -> Result<Vec<String>, AvroError> {
        match node {
            Node::Array(item) if matches!(**item, Node::String) => {
                let mut out = Vec::new();
                self.blocks(false, |r| {
                    out.push(r.str()?.to_string());
                    Ok(())
                })?;
                Ok(out)
            }
            Node::Union(branches) => {
                let b = self.branch(branches)?;
                self.string_list(b)
            }
            Node::Null => Ok(Vec::new()),
            other => Err(self.corrupt(format!("expected array<string>, schema has {other:?}"))),
        }
    }

    /// Calls `each` with every string of a list (`array<string>`, possibly inside a nullable
    /// union), borrowed from the payload: nothing is copied.
    pub fn for_each_str(
        &mut self,
        node: &Node,
        mut each: impl FnMut(&'a str),
    ) -> Result<(), AvroError> {
        match node {
            Node::Array(item) if matches!(**item, Node::String) => self.blocks(false, |r| {
                each(r.str()?);
                Ok(())
            }),
            Node::Union(branches) => {
                let b = self.branch(branches)?;
                self.for_each_str(b, each)
            }
            Node::Null => Ok(()),
            other => Err(self.corrupt(format!("expected array<string>, schema has {other:?}"))),
        }
    }

    /// Reads a scalar value; `None` for null. Arrays and maps are rendered as JSON text, since
    /// Salesforce record fields are scalar and a column can still hold what arrives.
    pub fn value(&mut self, node: &Node) -> Result<Option<Value>, AvroError> {
        Ok(Some(match node {
            Node::Null => return Ok(None),
            Node::Boolean => Value::Boolean(self.boolean()?),
            Node::Int => Value::Int(self.int()?),
            Node::Long => Value::Long(self.long()?),
            Node::Float => Value::Float(self.float()?),
            Node::Double => Value::Double(self.double()?),
            Node::String => Value::String(self.str()?.to_string()),
            Node::Bytes => Value::Bytes(self.bytes()?.to_vec()),
            Node::Fixed(n) => Value::Bytes(self.take(*n, "fixed")?.to_vec()),
            Node::Enum(symbols) => Value::String(self.enum_symbol(symbols)?.to_string()),
            Node::Union(branches) => {
                let b = self.branch(branches)?;
                return self.value(b);
            }
            Node::Array(_) | Node::Map(_) | Node::Record(_) => {
                Value::String(self.json(node)?.to_string())
            }
        }))
    }

    fn json(&mut self, node: &Node) -> Result<serde_json::Value, AvroError> {
        use serde_json::Value as J;
        Ok(match node {
            Node::Array(item) => {
                let mut out = Vec::new();
                self.blocks(false, |r| {
                    out.push(r.json(item)?);
                    Ok(())
                })?;
                J::Array(out)
            }
            Node::Map(item) => {
                let mut out = serde_json::Map::new();
                loop {
                    let mut count = self.long()?;
                    if count == 0 {
                        break;
                    }
                    if count < 0 {
                        count = count
                            .checked_neg()
                            .ok_or_else(|| self.corrupt("block count"))?;
                        self.long()?;
                    }
                    for _ in 0..count {
                        let k = self.str()?.to_string();
                        out.insert(k, self.json(item)?);
                    }
                }
                J::Object(out)
            }
            Node::Record(rec) => {
                let mut out = serde_json::Map::new();
                for (name, f) in &rec.fields {
                    out.insert(name.clone(), self.json(f)?);
                }
                J::Object(out)
            }
            Node::Union(branches) => {
                let b = self.branch(branches)?;
                self.json(b)?
            }
            scalar => match self.value(scalar)? {
                None => J::Null,
                Some(Value::Boolean(b)) => J::Bool(b),
                Some(Value::Int(i)) => J::from(i),
                Some(Value::Long(i)) => J::from(i),
                Some(Value::Float(f)) => J::from(f64::from(f)),
                Some(Value::Double(f)) => J::from(f),
                Some(Value::String(s)) => J::String(s),
                Some(Value::Bytes(b)) => J::String(base64_encode(&b)),
            },
        })
    }
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use apache_avro::types::Value as AV;
    use proptest::prelude::*;

    fn schema() -> Schema {
        Schema::parse_str(
            r#"{"type":"record","name":"T","fields":[
              {"name":"b","type":"boolean"},
              {"name":"i","type":"int"},
              {"name":"l","type":"long"},
              {"name":"d","type":"double"},
              {"name":"s","type":["null","string"],"default":null},
              {"name":"a","type":{"type":"array","items":"string"}},
              {"name":"e","type":{"type":"enum","name":"E","symbols":["X","Y","Z"]}},
              {"name":"r","type":["null",{"type":"record","name":"R","fields":[
                  {"name":"x","type":["null","string"],"default":null}]}],"default":null},
              {"name":"r2","type":["null","R"],"default":null}
            ]}"#,
        )
        .expect("schema parses")
    }

    proptest! {
        #[test]
        fn decodes_what_apache_avro_encodes(
            b in any::<bool>(), i in any::<i32>(), l in any::<i64>(), d in any::<f64>(),
            s in proptest::option::of(".*"), a in proptest::collection::vec(".*", 0..5),
            e in 0u32..3, x in proptest::option::of(".{0,8}")
        ) {
            let schema = schema();
            let rec = |x: &Option<String>| AV::Union(1, Box::new(AV::Record(vec![(
                "x".to_string(),
                match x { Some(v) => AV::Union(1, Box::new(AV::String(v.clone()))),
                          None => AV::Union(0, Box::new(AV::Null)) },
            )])));
            let value = AV::Record(vec![
                ("b".into(), AV::Boolean(b)),
                ("i".into(), AV::Int(i)),
                ("l".into(), AV::Long(l)),
                ("d".into(), AV::Double(d)),
                ("s".into(), match &s { Some(v) => AV::Union(1, Box::new(AV::String(v.clone()))),
                                         None => AV::Union(0, Box::new(AV::Null)) }),
                ("a".into(), AV::Array(a.iter().cloned().map(AV::String).collect())),
                ("e".into(), AV::Enum(e, ["X","Y","Z"][e as usize].to_string())),
                ("r".into(), rec(&x)),
                ("r2".into(), AV::Union(0, Box::new(AV::Null))),
            ]);
            let bytes = apache_avro::to_avro_datum(&schema, value).expect("encodes");
            let node = Node::compile(&schema).expect("compiles");
            let Node::Record(r) = &node else { panic!("record") };
            let mut rd = Reader::new(&bytes);
            prop_assert_eq!(rd.value(&r.fields[0].1).expect("b"), Some(Value::Boolean(b)));
            prop_assert_eq!(rd.value(&r.fields[1].1).expect("i"), Some(Value::Int(i)));
            prop_assert_eq!(rd.value(&r.fields[2].1).expect("l"), Some(Value::Long(l)));
            match rd.value(&r.fields[3].1).expect("d") {
                Some(Value::Double(got)) => prop_assert!(got.to_bits() == d.to_bits()),
                other => prop_assert!(false, "double decoded as {:?}", other),
            }
            prop_assert_eq!(rd.value(&r.fields[4].1).expect("s"), s.map(Value::String));
            prop_assert_eq!(rd.string_list(&r.fields[5].1).expect("a"), a);
            let Node::Enum(symbols) = &r.fields[6].1 else { panic!("enum") };
            prop_assert_eq!(rd.enum_symbol(symbols).expect("e"), ["X","Y","Z"][e as usize]);
            rd.skip(&r.fields[7].1).expect("skip record");
            rd.skip(&r.fields[8].1).expect("skip ref");
            prop_assert!(rd.is_at_end());
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let node = Node::compile(&schema()).expect("compiles");
            let mut rd = Reader::new(&bytes);
            let _ = rd.skip(&node);
        }
    }

    /// The shape of a generated schema; rendered to Avro schema JSON by [`render`].
    #[derive(Debug, Clone)]
    enum Shape {
        Null,
        Boolean,
        Int,
        Long,
        Float,
        Double,
        Bytes,
        String,
        /// Number of symbols.
        Enum(usize),
        /// Size in bytes.
        Fixed(usize),
        Array(Box<Shape>),
        Map(Box<Shape>),
        /// `["null", T]` when the flag is set, `[T, "null"]` otherwise.
        Nullable(Box<Shape>, bool),
        Record(Vec<Shape>),
    }

    /// Shapes nested at most three levels deep (below the top-level record), with at most
    /// three fields per record and four items per collection: small enough that a thousand
    /// cases run in about a second, deep enough for Salesforce's compound fields (a nullable
    /// record of nullable scalars).
    fn shape() -> impl Strategy<Value = Shape> {
        let leaf = prop_oneof![
            Just(Shape::Null),
            Just(Shape::Boolean),
            Just(Shape::Int),
            Just(Shape::Long),
            Just(Shape::Float),
            Just(Shape::Double),
            Just(Shape::Bytes),
            Just(Shape::String),
            (1usize..=4).prop_map(Shape::Enum),
            (1usize..=6).prop_map(Shape::Fixed),
        ];
        leaf.prop_recursive(3, 24, 3, |inner| {
            prop_oneof![
                // Items that encode to no bytes at all (null, a record of nulls) are left out of
                // arrays: `Reader` refuses a block that counts more items than bytes remain, so
                // that a few bytes cannot ask for billions of items. apache-avro accepts them;
                // no Salesforce schema has such an array.
                inner.clone().prop_map(|s| if width(&s) == 0 {
                    Shape::Map(Box::new(s))
                } else {
                    Shape::Array(Box::new(s))
                }),
                inner.clone().prop_map(|s| Shape::Map(Box::new(s))),
                // A union holds no union and one null at most: such a shape stays as it is.
                (inner.clone(), any::<bool>()).prop_map(|(s, null_first)| match s {
                    Shape::Null | Shape::Nullable(..) => s,
                    s => Shape::Nullable(Box::new(s), null_first),
                }),
                proptest::collection::vec(inner, 0..=3).prop_map(Shape::Record),
            ]
        })
    }

    /// The fewest bytes a value of `shape` encodes to.
    fn width(shape: &Shape) -> usize {
        match shape {
            Shape::Null => 0,
            Shape::Float => 4,
            Shape::Double => 8,
            Shape::Fixed(size) => *size,
            Shape::Record(fields) => fields.iter().map(width).sum(),
            _ => 1,
        }
    }

    /// Avro schema JSON for `shape`; `next` numbers the named types so each name is unique.
    fn render(shape: &Shape, next: &mut usize) -> serde_json::Value {
        use serde_json::json;
        *next += 1;
        let n = *next;
        match shape {
            Shape::Null => json!("null"),
            Shape::Boolean => json!("boolean"),
            Shape::Int => json!("int"),
            Shape::Long => json!("long"),
            Shape::Float => json!("float"),
            Shape::Double => json!("double"),
            Shape::Bytes => json!("bytes"),
            Shape::String => json!("string"),
            Shape::Enum(k) => json!({"type": "enum", "name": format!("E{n}"),
                "symbols": (0..*k).map(|i| format!("S{i}")).collect::<Vec<_>>()}),
            Shape::Fixed(size) => json!({"type": "fixed", "name": format!("F{n}"), "size": size}),
            Shape::Array(item) => json!({"type": "array", "items": render(item, next)}),
            Shape::Map(item) => json!({"type": "map", "values": render(item, next)}),
            Shape::Nullable(inner, true) => json!(["null", render(inner, next)]),
            Shape::Nullable(inner, false) => json!([render(inner, next), "null"]),
            Shape::Record(fields) => {
                let fields: Vec<_> = fields
                    .iter()
                    .enumerate()
                    .map(|(i, f)| json!({"name": format!("f{i}"), "type": render(f, next)}))
                    .collect();
                json!({"type": "record", "name": format!("R{n}"), "fields": fields})
            }
        }
    }

    /// Values that conform to `shape`, in apache-avro's representation.
    fn value_of(shape: &Shape) -> BoxedStrategy<AV> {
        use proptest::collection::{hash_map, vec};
        match shape {
            Shape::Null => Just(AV::Null).boxed(),
            Shape::Boolean => any::<bool>().prop_map(AV::Boolean).boxed(),
            Shape::Int => any::<i32>().prop_map(AV::Int).boxed(),
            Shape::Long => any::<i64>().prop_map(AV::Long).boxed(),
            // Infinities, NaN and subnormals included.
            Shape::Float => any::<f32>().prop_map(AV::Float).boxed(),
            Shape::Double => any::<f64>().prop_map(AV::Double).boxed(),
            Shape::Bytes => vec(any::<u8>(), 0..8).prop_map(AV::Bytes).boxed(),
            Shape::String => ".{0,8}".prop_map(AV::String).boxed(),
            Shape::Enum(k) => (0..*k as u32)
                .prop_map(|i| AV::Enum(i, format!("S{i}")))
                .boxed(),
            Shape::Fixed(size) => {
                let size = *size;
                vec(any::<u8>(), size)
                    .prop_map(move |b| AV::Fixed(size, b))
                    .boxed()
            }
            Shape::Array(item) => vec(value_of(item), 0..4).prop_map(AV::Array).boxed(),
            Shape::Map(item) => hash_map(".{0,4}", value_of(item), 0..4)
                .prop_map(AV::Map)
                .boxed(),
            Shape::Nullable(inner, null_first) => {
                let (null, other) = if *null_first { (0, 1) } else { (1, 0) };
                prop_oneof![
                    Just(AV::Union(null, Box::new(AV::Null))),
                    value_of(inner).prop_map(move |v| AV::Union(other, Box::new(v))),
                ]
                .boxed()
            }
            Shape::Record(fields) => fields
                .iter()
                .map(value_of)
                .collect::<Vec<_>>()
                .prop_map(|values| {
                    AV::Record(
                        values
                            .into_iter()
                            .enumerate()
                            .map(|(i, v)| (format!("f{i}"), v))
                            .collect(),
                    )
                })
                .boxed(),
        }
    }

    /// An apache-avro value in the form [`Reader::json`] gives: unions by their value, enums
    /// by symbol, bytes and fixed as base64, floats widened (NaN and infinities as null, as
    /// JSON has no such numbers).
    fn to_json(v: &AV) -> serde_json::Value {
        use serde_json::Value as J;
        match v {
            AV::Null => J::Null,
            AV::Boolean(b) => J::Bool(*b),
            AV::Int(i) => J::from(*i),
            AV::Long(i) => J::from(*i),
            AV::Float(f) => J::from(f64::from(*f)),
            AV::Double(f) => J::from(*f),
            AV::Bytes(b) | AV::Fixed(_, b) => J::String(base64_encode(b)),
            AV::String(s) | AV::Enum(_, s) => J::String(s.clone()),
            AV::Union(_, inner) => to_json(inner),
            AV::Array(items) => J::Array(items.iter().map(to_json).collect()),
            AV::Map(entries) => J::Object(
                entries
                    .iter()
                    .map(|(k, v)| (k.clone(), to_json(v)))
                    .collect(),
            ),
            AV::Record(fields) => J::Object(
                fields
                    .iter()
                    .map(|(k, v)| (k.clone(), to_json(v)))
                    .collect(),
            ),
            other => panic!("the generator makes no {other:?}"),
        }
    }

    /// Whether what [`Reader::value`] gave for a field is the value apache-avro decoded:
    /// scalars exactly (floats by their bits), arrays, maps and records by their JSON text.
    fn same_field(ours: &Option<Value>, theirs: &AV) -> bool {
        match (ours, theirs) {
            (_, AV::Union(_, inner)) => same_field(ours, inner),
            (None, AV::Null) => true,
            (Some(Value::Boolean(a)), AV::Boolean(b)) => a == b,
            (Some(Value::Int(a)), AV::Int(b)) => a == b,
            (Some(Value::Long(a)), AV::Long(b)) => a == b,
            (Some(Value::Float(a)), AV::Float(b)) => a.to_bits() == b.to_bits(),
            (Some(Value::Double(a)), AV::Double(b)) => a.to_bits() == b.to_bits(),
            (Some(Value::String(a)), AV::String(b) | AV::Enum(_, b)) => a == b,
            (Some(Value::Bytes(a)), AV::Bytes(b) | AV::Fixed(_, b)) => a == b,
            (Some(Value::String(text)), AV::Array(_) | AV::Map(_) | AV::Record(_)) => {
                serde_json::from_str::<serde_json::Value>(text).ok() == Some(to_json(theirs))
            }
            _ => false,
        }
    }

    /// A top-level record of one to four fields of any generated shape, and a value for it.
    fn datum() -> impl Strategy<Value = (Shape, AV)> {
        proptest::collection::vec(shape(), 1..=4)
            .prop_map(Shape::Record)
            .prop_flat_map(|s| {
                let v = value_of(&s);
                (Just(s), v)
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        /// Differential test against apache-avro: a random schema and a value for it, encoded
        /// by apache-avro as a bare datum (what Pub/Sub sends), decode to the same value with
        /// this module as with apache-avro's `from_avro_datum`; and every strict prefix of the
        /// payload is an error here, not a panic and not a value.
        #[test]
        fn agrees_with_apache_avro_on_random_schemas((shape, value) in datum()) {
            let json = render(&shape, &mut 0);
            let schema = Schema::parse_str(&json.to_string()).expect("generated schema parses");
            let bytes = apache_avro::to_avro_datum(&schema, value.clone()).expect("encodes");
            let theirs = apache_avro::from_avro_datum(&schema, &mut bytes.as_slice(), None)
                .expect("apache-avro decodes its own datum");
            prop_assert_eq!(to_json(&theirs), to_json(&value));

            let node = Node::compile(&schema).expect("compiles");
            let (Node::Record(rec), AV::Record(their_fields)) = (&node, &theirs) else {
                panic!("the top level is a record");
            };
            // Field by field, as events are decoded.
            let mut rd = Reader::new(&bytes);
            for ((name, field), (_, theirs)) in rec.fields.iter().zip(their_fields) {
                let ours = rd.value(field).expect("decodes");
                prop_assert!(same_field(&ours, theirs), "{}: ours {:?}, apache-avro {:?}",
                    name, ours, theirs);
            }
            prop_assert!(rd.is_at_end(), "{} of {} bytes read", rd.offset(), bytes.len());
            // As one tree.
            let mut rd = Reader::new(&bytes);
            prop_assert_eq!(rd.json(&node).expect("decodes"), to_json(&theirs));
            prop_assert!(rd.is_at_end());
            // Skipped whole.
            let mut rd = Reader::new(&bytes);
            rd.skip(&node).expect("skips");
            prop_assert!(rd.is_at_end());

            for cut in 0..bytes.len() {
                let prefix = &bytes[..cut];
                prop_assert!(Reader::new(prefix).skip(&node).is_err(), "skip at {}", cut);
                prop_assert!(Reader::new(prefix).json(&node).is_err(), "json at {}", cut);
                let mut rd = Reader::new(prefix);
                let fields = rec.fields.iter().try_for_each(|(_, f)| rd.value(f).map(drop));
                prop_assert!(fields.is_err(), "value at {}", cut);
            }
        }
    }

    /// The one place this decoder knowingly parts from apache-avro (see [`shape`]).
    #[test]
    fn zero_width_items_cannot_outnumber_the_payload() {
        let schema = Schema::parse_str(r#"{"type":"array","items":"null"}"#).expect("parses");
        let three_nulls = [0x06, 0x00];
        let theirs = apache_avro::from_avro_datum(&schema, &mut &three_nulls[..], None);
        assert_eq!(
            theirs.expect("apache-avro decodes"),
            AV::Array(vec![AV::Null; 3])
        );
        let node = Node::compile(&schema).expect("compiles");
        let ours = Reader::new(&three_nulls).skip(&node);
        assert!(matches!(ours, Err(AvroError::Corrupt { .. })), "{ours:?}");
    }

    #[test]
    fn named_references_resolve() {
        let node = Node::compile(&schema()).expect("compiles");
        let Node::Record(r) = &node else {
            panic!("record")
        };
        let sub = r.fields[8].1.record().expect("ref resolves to the record");
        assert_eq!(sub.name, "R");
    }

    #[test]
    fn truncation_is_an_error() {
        let mut rd = Reader::new(&[0x80]);
        assert!(matches!(rd.long(), Err(AvroError::Truncated { .. })));
        let mut rd = Reader::new(&[0x0A, b'a']);
        assert!(matches!(rd.str(), Err(AvroError::Truncated { .. })));
    }
}
