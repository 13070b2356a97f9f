//! A small pickle virtual machine for PyTorch checkpoints that never executes code.
//!
//! Python's unpickler imports and calls whatever globals a pickle names, so loading an untrusted
//! `pytorch_model.bin` with it can run arbitrary code. This VM instead knows a fixed allow-list of
//! globals (`collections.OrderedDict`, torch's tensor-rebuild functions, storage classes and
//! dtypes) and *interprets* calls to them itself: a tensor becomes a [`TensorSpec`] that points
//! into a storage, and nothing else is ever imported or called. Any other global is refused.
//!
//! Objects live in a flat heap addressed by index, so shared references (the memo) cost nothing,
//! there is no recursion anywhere (a deeply nested pickle cannot overflow the stack), and stack,
//! memo and heap sizes are capped so a crafted pickle cannot exhaust memory.

use std::collections::HashMap;
use std::rc::Rc;

use anyhow::{Result, anyhow, bail};

use super::tensor::DType;

/// Most values the pickle stack may hold at once (a state dict needs a few thousand).
const MAX_STACK: usize = 1 << 20;
/// Most objects (tuples, lists, dicts, tensors) one pickle may create.
const MAX_HEAP: usize = 1 << 22;
/// Most memo entries one pickle may create.
const MAX_MEMO: usize = 1 << 22;
/// Most dimensions a tensor may have (torch itself allows 64).
const MAX_DIMS: usize = 64;

/// A callable or class the pickle may name: the allow-list, resolved.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Global {
    OrderedDict,
    RebuildTensor,
    RebuildTensorV2,
    RebuildTensorV3,
    RebuildParameter,
    RebuildParameterWithState,
    CodecsEncode,
    /// A storage class, used as the type tag of a persistent id.
    Storage(StorageKind),
    /// A dtype object, an argument of `_rebuild_tensor_v3`.
    Dtype(Result<DType, String>),
}

/// The element type of a storage class: typed (`torch.FloatStorage`), untyped bytes, or a torch
/// storage type this crate has no `DType` for (kept by name for the error message).
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum StorageKind {
    Typed(DType),
    Untyped,
    Unsupported(String),
}

/// A pickle value. Containers and tensors live in the heap and are referenced by index.
#[derive(Clone, Debug)]
pub(crate) enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer wider than 64 bits; torch state dicts never need its value.
    BigInt,
    /// Floats and bytes appear only in metadata, so their values are not kept.
    Float,
    Str(Rc<str>),
    Bytes,
    Global(Global),
    /// A slice of a storage, the result of a persistent load.
    Storage(StorageSlice),
    Obj(usize),
}

/// A heap object.
#[derive(Debug)]
pub(crate) enum Obj {
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Dict),
    Tensor(TensorSpec),
}

/// An insertion-ordered dict. Only string keys are deduplicated (state dicts use only those);
/// other keys appear only in metadata that is never read.
#[derive(Debug, Default)]
pub(crate) struct Dict {
    pub items: Vec<(Value, Value)>,
    str_index: HashMap<Rc<str>, usize>,
}

impl Dict {
    fn insert(&mut self, key: Value, value: Value) {
        if let Value::Str(s) = &key {
            if let Some(&i) = self.str_index.get(s) {
                self.items[i].1 = value;
                return;
            }
            self.str_index.insert(s.clone(), self.items.len());
        }
        self.items.push((key, value));
    }
}

/// A storage named by a persistent id: the file-level key, its element type and element count.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct StorageRoot {
    pub key: String,
    pub kind: StorageKind,
    pub numel: u64,
}

impl StorageRoot {
    /// Bytes per storage element (untyped storages count bytes).
    pub fn element_size(&self) -> Result<u64> {
        match &self.kind {
            StorageKind::Typed(d) => Ok(d.size() as u64),
            StorageKind::Untyped => Ok(1),
            StorageKind::Unsupported(name) => {
                bail!("storage '{}' has type torch.{name}, which is not supported", self.key)
            }
        }
    }
}

/// A range of a storage root in bytes. Legacy checkpoints may name a view of a root storage.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct StorageSlice {
    pub root: usize,
    pub byte_start: u64,
    pub byte_len: u64,
}

/// A tensor as the pickle describes it: where its elements lie in which storage.
/// Offsets and strides count elements of `dtype`, from the start of the storage slice.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct TensorSpec {
    pub storage: StorageSlice,
    pub dtype: DType,
    pub offset: u64,
    pub shape: Vec<u64>,
    pub stride: Vec<u64>,
}

/// The outcome of running one pickle: its root value, the heap it refers to, the storages its
/// persistent ids named, and how many bytes the pickle took (legacy files hold several in a row).
#[derive(Debug)]
pub(crate) struct Unpickled {
    pub root: Value,
    pub heap: Vec<Obj>,
    pub storages: Vec<StorageRoot>,
    pub consumed: usize,
}

impl Unpickled {
    /// The root as a torch state dict: string keys mapping to tensors, in insertion order.
    pub fn state_dict(&self) -> Result<Vec<(String, TensorSpec)>> {
        let Value::Obj(i) = &self.root else {
            bail!("the checkpoint holds {}, not a state dict (a dict of tensors)", describe(&self.root));
        };
        let Obj::Dict(dict) = &self.heap[*i] else {
            bail!("the checkpoint holds {}, not a state dict (a dict of tensors)", self.describe_obj(*i));
        };
        let mut out = Vec::with_capacity(dict.items.len());
        for (key, value) in &dict.items {
            let Value::Str(name) = key else {
                bail!("the state dict has a key that is {}, not a string", describe(key));
            };
            let tensor = match value {
                Value::Obj(j) => match &self.heap[*j] {
                    Obj::Tensor(t) => t.clone(),
                    _ => bail!("state dict entry '{name}' is {}, not a tensor", self.describe_obj(*j)),
                },
                other => bail!("state dict entry '{name}' is {}, not a tensor", describe(other)),
            };
            out.push((name.to_string(), tensor));
        }
        Ok(out)
    }

    /// The root as a list of strings (the storage-key list of a legacy checkpoint).
    pub fn string_list(&self) -> Result<Vec<String>> {
        let items = match &self.root {
            Value::Obj(i) => match &self.heap[*i] {
                Obj::List(items) | Obj::Tuple(items) => items,
                _ => bail!("expected a list of storage keys, found {}", self.describe_obj(*i)),
            },
            other => bail!("expected a list of storage keys, found {}", describe(other)),
        };
        items
            .iter()
            .map(|v| match v {
                Value::Str(s) => Ok(s.to_string()),
                other => Err(anyhow!("expected a storage key string, found {}", describe(other))),
            })
            .collect()
    }

    fn describe_obj(&self, i: usize) -> &'static str {
        match &self.heap[i] {
            Obj::Tuple(_) => "a tuple",
            Obj::List(_) => "a list",
            Obj::Dict(_) => "a dict",
            Obj::Tensor(_) => "a tensor",
        }
    }
}

fn describe(v: &Value) -> &'static str {
    match v {
        Value::None => "None",
        Value::Bool(_) => "a bool",
        Value::Int(_) | Value::BigInt => "an int",
        Value::Float => "a float",
        Value::Str(_) => "a string",
        Value::Bytes => "bytes",
        Value::Global(_) => "a class or function",
        Value::Storage(_) => "a storage",
        Value::Obj(_) => "an object",
    }
}

/// Maps `module.name` to an allowed global, or refuses it.
fn resolve_global(module: &str, name: &str) -> Result<Global> {
    let g = match (module, name) {
        ("collections", "OrderedDict") => Global::OrderedDict,
        ("torch._utils", "_rebuild_tensor") => Global::RebuildTensor,
        ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
        ("torch._utils", "_rebuild_tensor_v3") => Global::RebuildTensorV3,
        ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
        ("torch._utils", "_rebuild_parameter_with_state") => Global::RebuildParameterWithState,
        // Protocol 2 pickles Python 3 `bytes` as `_codecs.encode(text, 'latin1')`.
        ("_codecs", "encode") => Global::CodecsEncode,
        ("torch", "UntypedStorage") | ("torch.storage", "UntypedStorage") => {
            Global::Storage(StorageKind::Untyped)
        }
        ("torch", storage) if storage.ends_with("Storage") => Global::Storage(match storage_dtype(storage) {
            Some(d) => StorageKind::Typed(d),
            None if storage.chars().all(|c| c.is_ascii_alphanumeric()) => {
                StorageKind::Unsupported(storage.to_string())
            }
            None => return Err(refusal(module, name)),
        }),
        ("torch", dtype) if KNOWN_TORCH_DTYPES.contains(&dtype) => {
            Global::Dtype(torch_dtype(dtype).ok_or_else(|| dtype.to_string()))
        }
        _ => return Err(refusal(module, name)),
    };
    Ok(g)
}

fn refusal(module: &str, name: &str) -> anyhow::Error {
    anyhow!(
        "refusing to load: the pickle asks for global '{module}.{name}', which is not on the allow-list \
         of tensor types"
    )
}

fn storage_dtype(class: &str) -> Option<DType> {
    Some(match class {
        "FloatStorage" => DType::F32,
        "DoubleStorage" => DType::F64,
        "HalfStorage" => DType::F16,
        "BFloat16Storage" => DType::BF16,
        "LongStorage" => DType::I64,
        "IntStorage" => DType::I32,
        "ShortStorage" => DType::I16,
        "CharStorage" => DType::I8,
        "ByteStorage" => DType::U8,
        "BoolStorage" => DType::Bool,
        _ => return None,
    })
}

/// Every dtype name torch pickles as `torch.<name>`; the ones without a `DType` give a clear
/// "unsupported dtype" error instead of a refusal.
const KNOWN_TORCH_DTYPES: &[&str] = &[
    "float32",
    "float",
    "float64",
    "double",
    "float16",
    "half",
    "bfloat16",
    "int64",
    "long",
    "int32",
    "int",
    "int16",
    "short",
    "int8",
    "uint8",
    "bool",
    "uint16",
    "uint32",
    "uint64",
    "complex32",
    "complex64",
    "complex128",
    "cfloat",
    "cdouble",
    "chalf",
    "float8_e4m3fn",
    "float8_e5m2",
    "float8_e4m3fnuz",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
    "float4_e2m1fn_x2",
    "qint8",
    "quint8",
    "qint32",
    "quint4x2",
    "quint2x4",
];

fn torch_dtype(name: &str) -> Option<DType> {
    Some(match name {
        "float32" | "float" => DType::F32,
        "float64" | "double" => DType::F64,
        "float16" | "half" => DType::F16,
        "bfloat16" => DType::BF16,
        "int64" | "long" => DType::I64,
        "int32" | "int" => DType::I32,
        "int16" | "short" => DType::I16,
        "int8" => DType::I8,
        "uint8" => DType::U8,
        "bool" => DType::Bool,
        _ => return None,
    })
}

/// Opcode names, for error messages.
fn opcode_name(op: u8) -> &'static str {
    match op {
        b'(' => "MARK",
        b'.' => "STOP",
        b'0' => "POP",
        b'1' => "POP_MARK",
        b'2' => "DUP",
        b'F' => "FLOAT",
        b'I' => "INT",
        b'J' => "BININT",
        b'K' => "BININT1",
        b'L' => "LONG",
        b'M' => "BININT2",
        b'N' => "NONE",
        b'P' => "PERSID",
        b'Q' => "BINPERSID",
        b'R' => "REDUCE",
        b'S' => "STRING",
        b'T' => "BINSTRING",
        b'U' => "SHORT_BINSTRING",
        b'V' => "UNICODE",
        b'X' => "BINUNICODE",
        b'a' => "APPEND",
        b'b' => "BUILD",
        b'c' => "GLOBAL",
        b'd' => "DICT",
        b'}' => "EMPTY_DICT",
        b'e' => "APPENDS",
        b'g' => "GET",
        b'h' => "BINGET",
        b'i' => "INST",
        b'j' => "LONG_BINGET",
        b'l' => "LIST",
        b']' => "EMPTY_LIST",
        b'o' => "OBJ",
        b'p' => "PUT",
        b'q' => "BINPUT",
        b'r' => "LONG_BINPUT",
        b's' => "SETITEM",
        b't' => "TUPLE",
        b')' => "EMPTY_TUPLE",
        b'u' => "SETITEMS",
        b'G' => "BINFLOAT",
        0x80 => "PROTO",
        0x81 => "NEWOBJ",
        0x82 => "EXT1",
        0x83 => "EXT2",
        0x84 => "EXT4",
        0x85 => "TUPLE1",
        0x86 => "TUPLE2",
        0x87 => "TUPLE3",
        0x88 => "NEWTRUE",
        0x89 => "NEWFALSE",
        0x8a => "LONG1",
        0x8b => "LONG4",
        b'B' => "BINBYTES",
        b'C' => "SHORT_BINBYTES",
        0x8c => "SHORT_BINUNICODE",
        0x8d => "BINUNICODE8",
        0x8e => "BINBYTES8",
        0x8f => "EMPTY_SET",
        0x90 => "ADDITEMS",
        0x91 => "FROZENSET",
        0x92 => "NEWOBJ_EX",
        0x93 => "STACK_GLOBAL",
        0x94 => "MEMOIZE",
        0x95 => "FRAME",
        0x96 => "BYTEARRAY8",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        _ => "unknown",
    }
}

/// Runs the pickle at the start of `bytes` up to its STOP opcode. `name` labels error messages
/// (e.g. `archive/data.pkl`). Persistent ids must be torch storage tuples.
pub(crate) fn unpickle(bytes: &[u8], name: &str) -> Result<Unpickled> {
    let mut vm = Vm {
        bytes,
        pos: 0,
        op_pos: 0,
        op: 0,
        name,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        heap: Vec::new(),
        storages: Vec::new(),
        storage_index: HashMap::new(),
    };
    let root = vm.run()?;
    Ok(Unpickled { root, heap: vm.heap, storages: vm.storages, consumed: vm.pos })
}

struct Vm<'a> {
    bytes: &'a [u8],
    pos: usize,
    /// Byte offset and opcode of the instruction being executed, for error messages.
    op_pos: usize,
    op: u8,
    name: &'a str,
    stack: Vec<Value>,
    /// Stack lengths at each MARK.
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    heap: Vec<Obj>,
    storages: Vec<StorageRoot>,
    storage_index: HashMap<String, usize>,
}

impl<'a> Vm<'a> {
    fn err(&self, msg: impl std::fmt::Display) -> anyhow::Error {
        anyhow!("{}: byte {}: {} ({}): {msg}", self.name, self.op_pos, opcode_name(self.op), OpByte(self.op))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let remaining = self.bytes.len() - self.pos;
        if n > remaining {
            return Err(self.err(format!("truncated pickle: needs {n} more bytes, {remaining} remain")));
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn take_array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let s = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn take_len(&mut self, width: usize) -> Result<usize> {
        let n = match width {
            1 => u64::from(self.take_array::<1>()?[0]),
            4 => u64::from(u32::from_le_bytes(self.take_array()?)),
            _ => u64::from_le_bytes(self.take_array()?),
        };
        usize::try_from(n).map_err(|_| self.err(format!("length {n} does not fit in memory")))
    }

    fn take_line(&mut self) -> Result<&'a str> {
        let rest = &self.bytes[self.pos..];
        let Some(end) = rest.iter().position(|&b| b == b'\n') else {
            return Err(self.err("truncated pickle: unterminated text argument"));
        };
        let line = std::str::from_utf8(&rest[..end]).map_err(|_| self.err("text argument is not UTF-8"))?;
        self.pos += end + 1;
        Ok(line)
    }

    fn take_str(&mut self, len: usize) -> Result<Value> {
        let raw = self.take(len)?;
        let s = std::str::from_utf8(raw).map_err(|e| self.err(format!("string is not valid UTF-8: {e}")))?;
        Ok(Value::Str(Rc::from(s)))
    }

    fn push(&mut self, v: Value) -> Result<()> {
        if self.stack.len() >= MAX_STACK {
            return Err(self.err(format!("the pickle stack exceeds {MAX_STACK} values")));
        }
        self.stack.push(v);
        Ok(())
    }

    fn pop(&mut self) -> Result<Value> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(self.err("pickle stack underflow"));
        }
        self.stack.pop().ok_or_else(|| self.err("pickle stack underflow"))
    }

    fn top(&self) -> Result<&Value> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(self.err("pickle stack underflow"));
        }
        self.stack.last().ok_or_else(|| self.err("pickle stack underflow"))
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let Some(mark) = self.marks.pop() else {
            return Err(self.err("no MARK on the stack"));
        };
        Ok(self.stack.split_off(mark))
    }

    fn alloc(&mut self, obj: Obj) -> Result<Value> {
        if self.heap.len() >= MAX_HEAP {
            return Err(self.err(format!("the pickle creates more than {MAX_HEAP} objects")));
        }
        self.heap.push(obj);
        Ok(Value::Obj(self.heap.len() - 1))
    }

    fn memo_put(&mut self, index: u32) -> Result<()> {
        if self.memo.len() >= MAX_MEMO && !self.memo.contains_key(&index) {
            return Err(self.err(format!("the pickle memoizes more than {MAX_MEMO} values")));
        }
        let v = self.top()?.clone();
        self.memo.insert(index, v);
        Ok(())
    }

    fn memo_get(&mut self, index: u32) -> Result<()> {
        let v =
            self.memo.get(&index).cloned().ok_or_else(|| self.err(format!("memo key {index} is not set")))?;
        self.push(v)
    }

    fn run(&mut self) -> Result<Value> {
        loop {
            self.op_pos = self.pos;
            let Some(&op) = self.bytes.get(self.pos) else {
                self.op = 0;
                return Err(anyhow!(
                    "{}: byte {}: truncated pickle: ended before its STOP opcode",
                    self.name,
                    self.pos
                ));
            };
            self.op = op;
            self.pos += 1;
            match op {
                0x80 => {
                    let proto = self.take_array::<1>()?[0];
                    if proto > 5 {
                        return Err(self.err(format!("unsupported pickle protocol {proto}")));
                    }
                }
                0x95 => {
                    // FRAME only announces how many bytes follow; data is read in place.
                    let len = self.take_len(8)?;
                    if len > self.bytes.len() - self.pos {
                        return Err(self.err(format!(
                            "truncated pickle: frame of {len} bytes, {} remain",
                            self.bytes.len() - self.pos
                        )));
                    }
                }
                b'.' => {
                    let v = self.pop()?;
                    if !self.stack.is_empty() || !self.marks.is_empty() {
                        return Err(self.err("STOP with values left on the stack"));
                    }
                    return Ok(v);
                }
                b'(' => {
                    if self.marks.len() >= MAX_STACK {
                        return Err(self.err("too many nested MARKs"));
                    }
                    self.marks.push(self.stack.len());
                }
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.push(v)?;
                }
                b'N' => self.push(Value::None)?,
                0x88 => self.push(Value::Bool(true))?,
                0x89 => self.push(Value::Bool(false))?,
                b'J' => {
                    let v = i32::from_le_bytes(self.take_array()?);
                    self.push(Value::Int(i64::from(v)))?;
                }
                b'K' => {
                    let v = self.take_array::<1>()?[0];
                    self.push(Value::Int(i64::from(v)))?;
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.take_array()?);
                    self.push(Value::Int(i64::from(v)))?;
                }
                0x8a | 0x8b => {
                    let len = self.take_len(if op == 0x8a { 1 } else { 4 })?;
                    let raw = self.take(len)?;
                    self.push(decode_long(raw))?;
                }
                b'G' => {
                    self.take(8)?;
                    self.push(Value::Float)?;
                }
                b'X' | 0x8c | 0x8d => {
                    let len = self.take_len(match op {
                        0x8c => 1,
                        b'X' => 4,
                        _ => 8,
                    })?;
                    let v = self.take_str(len)?;
                    self.push(v)?;
                }
                b'T' | b'U' => {
                    // Python 2 str: bytes that Python 3 decodes as ASCII by default.
                    let len = self.take_len(if op == b'U' { 1 } else { 4 })?;
                    let v = self.take_str(len)?;
                    self.push(v)?;
                }
                b'B' | b'C' | 0x8e => {
                    let len = self.take_len(match op {
                        b'C' => 1,
                        b'B' => 4,
                        _ => 8,
                    })?;
                    self.take(len)?;
                    self.push(Value::Bytes)?;
                }
                b')' => {
                    let v = self.alloc(Obj::Tuple(Vec::new()))?;
                    self.push(v)?;
                }
                b't' => {
                    let items = self.pop_mark()?;
                    let v = self.alloc(Obj::Tuple(items))?;
                    self.push(v)?;
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    let v = self.alloc(Obj::Tuple(items))?;
                    self.push(v)?;
                }
                b']' => {
                    let v = self.alloc(Obj::List(Vec::new()))?;
                    self.push(v)?;
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    let v = self.alloc(Obj::List(items))?;
                    self.push(v)?;
                }
                b'a' => {
                    let item = self.pop()?;
                    self.extend_list(vec![item])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.extend_list(items)?;
                }
                b'}' => {
                    let v = self.alloc(Obj::Dict(Dict::default()))?;
                    self.push(v)?;
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    let v = self.alloc(Obj::Dict(Dict::default()))?;
                    self.push(v)?;
                    self.set_items(items)?;
                }
                b's' => {
                    let value = self.pop()?;
                    let key = self.pop()?;
                    self.set_items(vec![key, value])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.set_items(items)?;
                }
                b'q' => {
                    let i = self.take_array::<1>()?[0];
                    self.memo_put(u32::from(i))?;
                }
                b'r' => {
                    let i = u32::from_le_bytes(self.take_array()?);
                    self.memo_put(i)?;
                }
                0x94 => {
                    let i = u32::try_from(self.memo.len()).map_err(|_| self.err("memo is full"))?;
                    self.memo_put(i)?;
                }
                b'p' => {
                    let line = self.take_line()?;
                    let i =
                        line.trim().parse::<u32>().map_err(|_| self.err(format!("bad memo key {line:?}")))?;
                    self.memo_put(i)?;
                }
                b'h' => {
                    let i = self.take_array::<1>()?[0];
                    self.memo_get(u32::from(i))?;
                }
                b'j' => {
                    let i = u32::from_le_bytes(self.take_array()?);
                    self.memo_get(i)?;
                }
                b'g' => {
                    let line = self.take_line()?;
                    let i =
                        line.trim().parse::<u32>().map_err(|_| self.err(format!("bad memo key {line:?}")))?;
                    self.memo_get(i)?;
                }
                b'c' => {
                    let module = self.take_line()?;
                    let name = self.take_line()?;
                    let g = resolve_global(module, name)?;
                    self.push(Value::Global(g))?;
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Value::Str(module), Value::Str(name)) = (&module, &name) else {
                        return Err(self.err("STACK_GLOBAL needs two strings"));
                    };
                    let g = resolve_global(module, name)?;
                    self.push(Value::Global(g))?;
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let v = self.call(callable, args)?;
                    self.push(v)?;
                }
                0x81 => {
                    let args = self.pop()?;
                    let class = self.pop()?;
                    if !matches!(class, Value::Global(Global::OrderedDict)) {
                        return Err(self.err(format!("cannot instantiate {}", describe(&class))));
                    }
                    let v = self.call(class, args)?;
                    self.push(v)?;
                }
                b'b' => {
                    // BUILD sets attributes (`__setstate__`); tensors and dicts need none that
                    // matter here (OrderedDict's `_metadata`, tensor hooks), so the state is dropped.
                    let _state = self.pop()?;
                    match self.top()? {
                        Value::Obj(i) if matches!(self.heap[*i], Obj::Dict(_) | Obj::Tensor(_)) => {}
                        other => return Err(self.err(format!("cannot set the state of {}", describe(other)))),
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = self.persistent_load(pid)?;
                    self.push(v)?;
                }
                b'P' => {
                    let line = self.take_line()?;
                    let v = self.persistent_load(Value::Str(Rc::from(line)))?;
                    self.push(v)?;
                }
                _ => {
                    return Err(anyhow!(
                        "{}: byte {}: unsupported pickle opcode {} ({})",
                        self.name,
                        self.op_pos,
                        opcode_name(op),
                        OpByte(op)
                    ));
                }
            }
        }
    }

    fn extend_list(&mut self, items: Vec<Value>) -> Result<()> {
        let target = self.top()?.clone();
        match target {
            Value::Obj(i) => match &mut self.heap[i] {
                Obj::List(list) => {
                    list.extend(items);
                    Ok(())
                }
                _ => Err(self.err("APPEND to something that is not a list")),
            },
            _ => Err(self.err("APPEND to something that is not a list")),
        }
    }

    fn set_items(&mut self, items: Vec<Value>) -> Result<()> {
        if !items.len().is_multiple_of(2) {
            return Err(self.err("odd number of values for dict items"));
        }
        let target = self.top()?.clone();
        let Value::Obj(i) = target else {
            return Err(self.err("SETITEM on something that is not a dict"));
        };
        let Obj::Dict(dict) = &mut self.heap[i] else {
            return Err(self.err("SETITEM on something that is not a dict"));
        };
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            dict.insert(k, v);
        }
        Ok(())
    }

    fn tuple_items(&self, v: &Value, what: &str) -> Result<Vec<Value>> {
        if let Value::Obj(i) = v
            && let Obj::Tuple(items) = &self.heap[*i]
        {
            return Ok(items.clone());
        }
        Err(self.err(format!("{what} must be a tuple, found {}", describe(v))))
    }

    fn call(&mut self, callable: Value, args: Value) -> Result<Value> {
        let Value::Global(g) = callable else {
            return Err(self.err(format!("cannot call {}", describe(&callable))));
        };
        let args = self.tuple_items(&args, "call arguments")?;
        match g {
            Global::OrderedDict => {
                if !args.is_empty() {
                    return Err(self.err("OrderedDict with arguments is not supported"));
                }
                self.alloc(Obj::Dict(Dict::default()))
            }
            Global::RebuildTensorV2 | Global::RebuildTensor | Global::RebuildTensorV3 => {
                let spec = self.rebuild_tensor(&g, &args)?;
                self.alloc(Obj::Tensor(spec))
            }
            Global::RebuildParameter | Global::RebuildParameterWithState => {
                let expected = if g == Global::RebuildParameter { 3 } else { 4 };
                if args.len() != expected {
                    return Err(self.err(format!(
                        "_rebuild_parameter takes {expected} arguments, the pickle passes {}",
                        args.len()
                    )));
                }
                match &args[0] {
                    Value::Obj(i) if matches!(self.heap[*i], Obj::Tensor(_)) => Ok(args[0].clone()),
                    other => {
                        Err(self.err(format!("a parameter must wrap a tensor, found {}", describe(other))))
                    }
                }
            }
            Global::CodecsEncode => match args.as_slice() {
                [Value::Str(text), Value::Str(enc)] if matches!(&**enc, "latin1" | "latin-1") => {
                    if text.chars().any(|c| u32::from(c) > 0xff) {
                        return Err(self.err("latin1 text out of range"));
                    }
                    Ok(Value::Bytes)
                }
                _ => Err(self.err("_codecs.encode supports only (text, 'latin1')")),
            },
            Global::Storage(_) | Global::Dtype(_) => {
                Err(self.err("storage classes and dtypes cannot be called"))
            }
        }
    }

    fn int_arg(&self, v: &Value, what: &str) -> Result<u64> {
        match v {
            Value::Int(i) => u64::try_from(*i).map_err(|_| self.err(format!("{what} is negative ({i})"))),
            Value::BigInt => Err(self.err(format!("{what} is too large"))),
            other => Err(self.err(format!("{what} must be an int, found {}", describe(other)))),
        }
    }

    fn dims_arg(&self, v: &Value, what: &str) -> Result<Vec<u64>> {
        let items = self.tuple_items(v, what)?;
        if items.len() > MAX_DIMS {
            return Err(self.err(format!("{what} has {} dimensions, more than {MAX_DIMS}", items.len())));
        }
        items.iter().map(|x| self.int_arg(x, what)).collect()
    }

    /// `_rebuild_tensor(storage, offset, size, stride)`,
    /// `_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])`,
    /// `_rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype[, metadata])`.
    fn rebuild_tensor(&self, g: &Global, args: &[Value]) -> Result<TensorSpec> {
        let arity_ok = match g {
            Global::RebuildTensor => args.len() == 4,
            Global::RebuildTensorV2 => matches!(args.len(), 6 | 7),
            _ => matches!(args.len(), 7 | 8),
        };
        if !arity_ok {
            return Err(self.err(format!("tensor rebuild with {} arguments is not supported", args.len())));
        }
        let Value::Storage(storage) = &args[0] else {
            return Err(
                self.err(format!("a tensor's storage must be a persistent id, found {}", describe(&args[0])))
            );
        };
        let root = &self.storages[storage.root];
        let dtype = match (g, &root.kind) {
            (Global::RebuildTensorV3, _) => match &args[6] {
                Value::Global(Global::Dtype(Ok(d))) => *d,
                Value::Global(Global::Dtype(Err(name))) => {
                    return Err(self.err(format!("tensor dtype torch.{name} is not supported")));
                }
                other => {
                    return Err(
                        self.err(format!("tensor dtype must be a torch dtype, found {}", describe(other)))
                    );
                }
            },
            (_, StorageKind::Typed(d)) => *d,
            (_, StorageKind::Untyped) => {
                return Err(self.err("an untyped storage needs _rebuild_tensor_v3 to give its dtype"));
            }
            (_, StorageKind::Unsupported(name)) => {
                return Err(self.err(format!("storage type torch.{name} is not supported")));
            }
        };
        let offset = self.int_arg(&args[1], "storage offset")?;
        let shape = self.dims_arg(&args[2], "size")?;
        let stride = self.dims_arg(&args[3], "stride")?;
        if shape.len() != stride.len() {
            return Err(self.err(format!(
                "size has {} dimensions but stride has {}",
                shape.len(),
                stride.len()
            )));
        }
        Ok(TensorSpec { storage: storage.clone(), dtype, offset, shape, stride })
    }

    /// Resolves `('storage', storage_type, key, location, numel[, view_metadata])`.
    /// The 6-element form is the legacy format's; its view metadata is `None` or
    /// `(view_key, offset, view_numel)` naming a slice of the root storage.
    fn persistent_load(&mut self, pid: Value) -> Result<Value> {
        let items = self.tuple_items(&pid, "persistent id")?;
        if !matches!(items.len(), 5 | 6) || !matches!(&items[0], Value::Str(s) if &**s == "storage") {
            return Err(self.err("persistent id is not ('storage', type, key, location, numel)"));
        }
        let kind = match &items[1] {
            Value::Global(Global::Storage(kind)) => kind.clone(),
            other => {
                return Err(
                    self.err(format!("storage type must be a storage class, found {}", describe(other)))
                );
            }
        };
        let key = match &items[2] {
            Value::Str(s) => s.to_string(),
            other => return Err(self.err(format!("storage key must be a string, found {}", describe(other)))),
        };
        if !matches!(&items[3], Value::Str(_)) {
            return Err(self.err("storage location must be a string"));
        }
        let numel = self.int_arg(&items[4], "storage size")?;
        let root = StorageRoot { key: key.clone(), kind, numel };
        let index = match self.storage_index.get(&key) {
            Some(&i) => {
                if self.storages[i] != root {
                    return Err(
                        self.err(format!("storage '{key}' is declared twice with different types or sizes"))
                    );
                }
                i
            }
            None => {
                self.storages.push(root.clone());
                self.storage_index.insert(key.clone(), self.storages.len() - 1);
                self.storages.len() - 1
            }
        };
        let elem = root.element_size().map_err(|e| self.err(e))?;
        let root_bytes = numel
            .checked_mul(elem)
            .ok_or_else(|| self.err(format!("storage '{key}' size {numel} overflows")))?;
        let slice = match items.get(5) {
            None | Some(Value::None) => StorageSlice { root: index, byte_start: 0, byte_len: root_bytes },
            Some(view) => {
                let view = self.tuple_items(view, "storage view metadata")?;
                let [_, offset, len] = view.as_slice() else {
                    return Err(self.err("storage view metadata is not (key, offset, size)"));
                };
                let offset = self.int_arg(offset, "storage view offset")?;
                let len = self.int_arg(len, "storage view size")?;
                let end = offset.checked_add(len).filter(|&e| e <= numel).ok_or_else(|| {
                    self.err(format!(
                        "storage view [{offset}, {offset}+{len}) lies outside storage '{key}' of {numel} elements"
                    ))
                })?;
                StorageSlice { root: index, byte_start: offset * elem, byte_len: (end - offset) * elem }
            }
        };
        Ok(Value::Storage(slice))
    }
}

/// Decodes a LONG1/LONG4 little-endian two's-complement integer.
fn decode_long(raw: &[u8]) -> Value {
    if raw.is_empty() {
        return Value::Int(0);
    }
    if raw.len() > 8 {
        // Wider than 64 bits unless it is only sign extension.
        let sign = if raw[raw.len() - 1] & 0x80 != 0 { 0xff } else { 0 };
        if raw[8..].iter().any(|&b| b != sign) || (raw[7] & 0x80 != 0) != (sign == 0xff) {
            return Value::BigInt;
        }
        return decode_long(&raw[..8]);
    }
    let sign = if raw[raw.len() - 1] & 0x80 != 0 { 0xff } else { 0 };
    let mut buf = [sign; 8];
    buf[..raw.len()].copy_from_slice(raw);
    Value::Int(i64::from_le_bytes(buf))
}

/// Prints an opcode byte as Python's pickletools would show it.
struct OpByte(u8);

impl std::fmt::Display for OpByte {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_ascii_graphic() {
            write!(f, "0x{:02x} '{}'", self.0, self.0 as char)
        } else {
            write!(f, "0x{:02x}", self.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(bytes: &[u8]) -> Result<Unpickled> {
        unpickle(bytes, "test.pkl")
    }

    #[test]
    fn decodes_longs() {
        assert!(matches!(decode_long(&[]), Value::Int(0)));
        assert!(matches!(decode_long(&[0xff]), Value::Int(-1)));
        assert!(matches!(decode_long(&[0x00, 0x01]), Value::Int(256)));
        assert!(matches!(decode_long(&[0xff; 12]), Value::Int(-1)));
        assert!(matches!(decode_long(&[1, 0, 0, 0, 0, 0, 0, 0, 0]), Value::Int(1)));
        assert!(matches!(decode_long(&[0, 0, 0, 0, 0, 0, 0, 0x80, 0]), Value::BigInt));
        let magic = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];
        assert!(matches!(decode_long(&magic), Value::BigInt));
    }

    #[test]
    fn builds_nested_containers_and_memo() {
        // {'a': [1, 2], 'b': (True, None)} with the list memoized and fetched again.
        let p = b"\x80\x02}q\x00(X\x01\x00\x00\x00a]q\x01(K\x01K\x02eX\x01\x00\x00\x00bh\x01u.";
        let u = run(p).unwrap();
        let Value::Obj(i) = u.root else { panic!("root") };
        let Obj::Dict(d) = &u.heap[i] else { panic!("dict") };
        assert_eq!(d.items.len(), 2);
        let (Value::Obj(a), Value::Obj(b)) = (&d.items[0].1, &d.items[1].1) else { panic!("objs") };
        assert_eq!(a, b, "memo GET returns the same object");
        let Obj::List(l) = &u.heap[*a] else { panic!("list") };
        assert!(matches!(l.as_slice(), [Value::Int(1), Value::Int(2)]));
        assert_eq!(u.consumed, p.len());
    }

    #[test]
    fn less_common_opcodes() {
        // NEWOBJ OrderedDict, text PUT/GET, POP, DUP, MARK/POP_MARK, BINFLOAT, SETITEM, BUILD.
        let p = b"\x80\x02ccollections\nOrderedDict\n)\x81p0\n0g0\n20(N1X\x01\x00\x00\x00kG\x3f\xf0\0\0\0\0\0\0s}b.";
        let u = run(p).unwrap();
        let Value::Obj(i) = u.root else { panic!("root") };
        let Obj::Dict(d) = &u.heap[i] else { panic!("dict") };
        assert!(matches!(d.items.as_slice(), [(Value::Str(k), Value::Float)] if &**k == "k"));
        // Protocol 4 FRAME, MEMOIZE, bytes and string forms, BININT/BININT2/LONG1.
        let p = b"\x80\x04\x95\x10\0\0\0\0\0\0\0]\x94(C\x02abU\x01a\x8d\x01\0\0\0\0\0\0\0bJ\xff\xff\xff\xffM\x01\x01\x8a\0e.";
        let u = run(p).unwrap();
        let Value::Obj(i) = u.root else { panic!("root") };
        let Obj::List(l) = &u.heap[i] else { panic!("list") };
        assert!(matches!(
            l.as_slice(),
            [Value::Bytes, Value::Str(a), Value::Str(b), Value::Int(-1), Value::Int(257), Value::Int(0)]
                if &**a == "a" && &**b == "b"
        ));
        // Protocol 2's spelling of bytes.
        let p = b"c_codecs\nencode\nX\x03\0\0\0abcX\x06\0\0\0latin1\x86R.";
        assert!(matches!(run(p).unwrap().root, Value::Bytes));
        let e = run(b"c_codecs\nencode\nX\x03\0\0\0abcX\x05\0\0\0utf-8\x86R.").unwrap_err().to_string();
        assert!(e.contains("only (text, 'latin1')"), "{e}");
        // A FRAME longer than the pickle.
        let e = run(b"\x80\x04\x95\xff\0\0\0\0\0\0\0N.").unwrap_err().to_string();
        assert!(e.contains("frame of 255 bytes, 2 remain"), "{e}");
        // Calling something that is not a global, instantiating something other than OrderedDict.
        assert!(run(b"N)R.").unwrap_err().to_string().contains("cannot call None"));
        let e = run(b"ctorch\nFloatStorage\n)\x81.").unwrap_err().to_string();
        assert!(e.contains("cannot instantiate"), "{e}");
        let e = run(b"ctorch\nFloatStorage\n)R.").unwrap_err().to_string();
        assert!(e.contains("cannot be called"), "{e}");
        // Memo keys that were never set.
        assert!(run(b"h\x05.").unwrap_err().to_string().contains("memo key 5 is not set"));
    }

    #[test]
    fn duplicate_string_keys_replace_in_place() {
        let p = b"}(X\x01\x00\x00\x00aK\x01X\x01\x00\x00\x00bK\x02X\x01\x00\x00\x00aK\x03u.";
        let u = run(p).unwrap();
        let Value::Obj(i) = u.root else { panic!("root") };
        let Obj::Dict(d) = &u.heap[i] else { panic!("dict") };
        assert_eq!(d.items.len(), 2);
        assert!(matches!(d.items[0].1, Value::Int(3)));
    }

    #[test]
    fn refuses_globals_off_the_allow_list() {
        let e = run(b"\x80\x02cos\nsystem\nq\x00.").unwrap_err().to_string();
        assert_eq!(
            e,
            "refusing to load: the pickle asks for global 'os.system', which is not on the allow-list of \
             tensor types"
        );
        let e = run(b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93.").unwrap_err().to_string();
        assert!(e.contains("'builtins.eval'"), "{e}");
        let e = run(b"ctorch\nload\n.").unwrap_err().to_string();
        assert!(e.contains("'torch.load'"), "{e}");
        let e = run(b"ctorch\nx.yStorage\n.").unwrap_err().to_string();
        assert!(e.contains("refusing"), "{e}");
    }

    #[test]
    fn reports_opcode_and_offset() {
        let e = run(b"\x80\x02N\xff.").unwrap_err().to_string();
        assert_eq!(e, "test.pkl: byte 3: unsupported pickle opcode unknown (0xff)");
        let e = run(b"\x80\x02(i__main__\nX\n.").unwrap_err().to_string();
        assert_eq!(e, "test.pkl: byte 3: unsupported pickle opcode INST (0x69 'i')");
        let e = run(b"X\xff\xff\xff\x7fab").unwrap_err().to_string();
        assert!(
            e.contains("byte 0: BINUNICODE (0x58 'X'): truncated pickle: needs 2147483647 more bytes"),
            "{e}"
        );
        let e = run(b"N").unwrap_err().to_string();
        assert!(e.contains("ended before its STOP"), "{e}");
        let e = run(b"0.").unwrap_err().to_string();
        assert!(e.contains("stack underflow"), "{e}");
        let e = run(b"N(N.").unwrap_err().to_string();
        assert!(e.contains("STOP with values left"), "{e}");
        let e = run(b"Nt.").unwrap_err().to_string();
        assert!(e.contains("no MARK"), "{e}");
    }

    #[test]
    fn pops_never_cross_a_mark() {
        // MARK then TUPLE1 must not take the value below the mark.
        let e = run(b"N(\x85.").unwrap_err().to_string();
        assert!(e.contains("stack underflow"), "{e}");
    }

    #[test]
    fn deep_nesting_is_flat() {
        // 200k nested lists: `]` then (`]` `a`) appends each new list into the previous top...
        // built as 200k EMPTY_LISTs followed by 199,999 APPENDs folding them together.
        let n = 200_000;
        let mut p = vec![b']'; n];
        p.extend(std::iter::repeat_n(b'a', n - 1));
        p.push(b'.');
        let u = run(&p).unwrap();
        assert_eq!(u.heap.len(), n);
    }

    #[test]
    fn stack_is_capped() {
        let mut p = vec![b'N'; MAX_STACK + 1];
        p.push(b'.');
        let e = run(&p).unwrap_err().to_string();
        assert!(e.contains("exceeds"), "{e}");
    }
}
