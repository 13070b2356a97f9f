//! Reads PyTorch `pytorch_model.bin` state dicts without executing code.
//!
//! Two container formats exist. `torch.save` since torch 1.6 writes a zip archive
//! (`<prefix>/data.pkl`, one `<prefix>/data/<key>` entry per storage, `<prefix>/byteorder`);
//! older torch, or `_use_new_zipfile_serialization=False`, writes the legacy format: five pickles
//! in a row (magic number, protocol version, sys info, the object, the list of storage keys)
//! followed by each storage as a u64 element count and its raw bytes. Either way the object pickle
//! runs in the allow-list VM of [`super::pickle`], which describes each tensor as a view into a
//! storage; this module checks every view against its storage before allocating anything, then
//! copies each tensor out contiguously (honouring offsets and strides, so tied weights and
//! transposed tensors come out right).

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use zip::ZipArchive;

use super::pickle::{StorageRoot, TensorSpec, Unpickled, unpickle};
use super::tensor::RawTensor;

const ZIP_MAGIC: &[u8] = b"PK\x03\x04";
/// The first pickle of a legacy checkpoint: protocol 2, `LONG1 0x1950a86a20f9469cfc6c`, STOP.
const LEGACY_MAGIC_PICKLE: &[u8] = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19\x2e";
const LEGACY_PROTOCOL_VERSION: i64 = 1001;
/// A tensor whose strides overlap (an `expand`ed tensor) can be larger than its storage; such
/// tensors may reach this size before they are refused as crafted.
const MAX_EXPANDED_TENSOR_BYTES: u64 = 1 << 30;

/// Reads a torch.save'd state dict (zip format of torch >= 1.6, or the legacy pre-1.6 format),
/// returning the tensors in file order. Never executes code: an allow-list unpickler.
pub fn load_torch_state_dict(path: &Path) -> Result<Vec<(String, RawTensor)>> {
    let origin = path.display().to_string();
    let mut file = File::open(path).with_context(|| format!("{origin}: cannot open"))?;
    let file_len = file.metadata().with_context(|| format!("{origin}: cannot read metadata"))?.len();
    let mut head = Vec::with_capacity(LEGACY_MAGIC_PICKLE.len());
    (&mut file)
        .take(LEGACY_MAGIC_PICKLE.len() as u64)
        .read_to_end(&mut head)
        .with_context(|| format!("{origin}: cannot read"))?;
    let result = match detect_format(&head) {
        Ok(Format::Zip) => {
            // Zip entries are read one at a time, so the file is never held in memory whole.
            file.seek(SeekFrom::Start(0)).with_context(|| format!("{origin}: cannot read"))?;
            load_zip(BufReader::new(file), file_len)
        }
        Ok(Format::Legacy) => {
            let bytes = std::fs::read(path).with_context(|| format!("{origin}: cannot read"))?;
            load_legacy(&bytes)
        }
        Err(e) => Err(e),
    };
    result.map_err(|e| anyhow!("{origin}: {e:#}"))
}

/// Same, from bytes (for fuzzing/tests); `origin` names the source in error messages.
pub fn load_torch_state_dict_bytes(bytes: &[u8], origin: &str) -> Result<Vec<(String, RawTensor)>> {
    let result = match detect_format(bytes) {
        Ok(Format::Zip) => load_zip(std::io::Cursor::new(bytes), bytes.len() as u64),
        Ok(Format::Legacy) => load_legacy(bytes),
        Err(e) => Err(e),
    };
    result.map_err(|e| anyhow!("{origin}: {e:#}"))
}

#[derive(Debug)]
enum Format {
    Zip,
    Legacy,
}

fn detect_format(head: &[u8]) -> Result<Format> {
    if head.is_empty() {
        bail!("the file is empty");
    }
    if head.starts_with(ZIP_MAGIC) {
        return Ok(Format::Zip);
    }
    if head.starts_with(LEGACY_MAGIC_PICKLE) {
        return Ok(Format::Legacy);
    }
    if LEGACY_MAGIC_PICKLE.starts_with(head) {
        bail!("truncated: the file ends inside the legacy torch magic number ({} bytes)", head.len());
    }
    if head.first() == Some(&0x80) {
        bail!(
            "the file is a pickle but not a PyTorch checkpoint (no legacy torch magic number); \
             only torch.save'd state dicts are supported"
        );
    }
    let shown: Vec<String> = head.iter().take(8).map(|b| format!("{b:02x}")).collect();
    bail!(
        "not a PyTorch checkpoint: it starts with bytes [{}], expected a zip archive (50 4b 03 04) or \
         torch's legacy pickle (80 02 8a 0a ...)",
        shown.join(" ")
    )
}

// ---------------------------------------------------------------------------------------------
// Zip format

fn load_zip<R: Read + Seek>(reader: R, archive_len: u64) -> Result<Vec<(String, RawTensor)>> {
    let mut archive = ZipArchive::new(reader).map_err(|e| anyhow!("not a valid zip archive: {e}"))?;
    let names = archive
        .file_names()
        .map(|n| n.map(|n| n.into_owned()))
        .collect::<Result<Vec<String>, _>>()
        .map_err(|e| anyhow!("unreadable zip entry name: {e}"))?;
    let pickles: Vec<&String> = names
        .iter()
        .filter(|n| n.as_str() == "data.pkl" || (n.ends_with("/data.pkl") && n.matches('/').count() == 1))
        .collect();
    let pkl_name = match pickles.as_slice() {
        [one] => (*one).clone(),
        [] => {
            let listed: Vec<&str> = names.iter().take(5).map(String::as_str).collect();
            bail!(
                "the zip archive has no '<prefix>/data.pkl' entry, so it is not a torch.save checkpoint \
                 (entries: {}{})",
                listed.join(", "),
                if names.len() > 5 { ", ..." } else { "" }
            )
        }
        several => bail!("the zip archive has {} data.pkl entries; expected one", several.len()),
    };
    let prefix = &pkl_name[..pkl_name.len() - "data.pkl".len()];

    let byteorder_name = format!("{prefix}byteorder");
    if archive.index_for_name(&byteorder_name).is_some() {
        let raw = read_entry(&mut archive, &byteorder_name, archive_len, Some(16))?;
        match raw.as_slice() {
            b"little" => {}
            b"big" => bail!(
                "refusing to load: the checkpoint was written on a big-endian machine ({byteorder_name} \
                 says 'big'); only little-endian checkpoints are supported"
            ),
            other => bail!("{byteorder_name} holds {:?}, expected 'little'", String::from_utf8_lossy(other)),
        }
    }

    let pkl = read_entry(&mut archive, &pkl_name, archive_len, None)?;
    let unpickled = unpickle(&pkl, &pkl_name)?;
    check_fully_consumed(&unpickled, pkl.len(), &pkl_name)?;
    let specs = unpickled.state_dict()?;

    // Check every storage entry's declared size before reading any of them.
    let roots = &unpickled.storages;
    let mut root_bytes = Vec::with_capacity(roots.len());
    for root in roots {
        let name = format!("{prefix}data/{}", root.key);
        let expected = root_byte_len(root)?;
        let declared = match archive.by_name(&name) {
            Ok(entry) => entry.size(),
            Err(zip::result::ZipError::FileNotFound) => {
                bail!("storage '{}' is missing: the archive has no entry '{name}'", root.key)
            }
            Err(e) => bail!("cannot read zip entry '{name}': {e}"),
        };
        if declared != expected {
            bail!(
                "zip entry '{name}' holds {declared} bytes, but the pickle declares storage '{}' as {} \
                 elements ({expected} bytes)",
                root.key,
                root.numel
            );
        }
        root_bytes.push(expected);
    }
    let plans = plan_tensors(&specs, roots, &root_bytes)?;

    let mut data: Vec<Option<Cow<'_, [u8]>>> = Vec::with_capacity(roots.len());
    for (root, used) in roots.iter().zip(plans.uses.iter()) {
        if *used == 0 {
            data.push(None);
            continue;
        }
        let name = format!("{prefix}data/{}", root.key);
        let bytes = read_entry(&mut archive, &name, archive_len, None)?;
        data.push(Some(Cow::Owned(bytes)));
    }
    materialise_all(specs, plans, data, roots)
}

/// Reads one zip entry whole. The declared size is checked against the archive's length before
/// allocating, and the zip reader refuses data past the declared size, so a lying header cannot
/// grow memory.
fn read_entry<R: Read + Seek>(
    archive: &mut ZipArchive<R>,
    name: &str,
    archive_len: u64,
    max_len: Option<u64>,
) -> Result<Vec<u8>> {
    let entry = archive.by_name(name).map_err(|e| anyhow!("cannot read zip entry '{name}': {e}"))?;
    let declared = entry.size();
    if let Some(max) = max_len
        && declared > max
    {
        bail!("zip entry '{name}' holds {declared} bytes, expected at most {max}");
    }
    let stored = entry.compression() == zip::CompressionMethod::Stored;
    if stored && declared > archive_len {
        bail!(
            "zip entry '{name}' claims {declared} bytes, more than the whole archive ({archive_len} bytes)"
        );
    }
    // Compressed entries can legitimately exceed the archive; reserve a bounded amount up front.
    let reserve = if stored { declared } else { declared.min(1 << 26) };
    let mut buf = Vec::new();
    buf.try_reserve_exact(usize::try_from(reserve).unwrap_or(usize::MAX))
        .map_err(|_| anyhow!("cannot allocate {reserve} bytes for zip entry '{name}'"))?;
    // The zip reader fails past the declared size and checks the CRC at the end, so corrupted
    // tensor bytes are caught here.
    let mut entry = entry;
    entry.read_to_end(&mut buf).map_err(|e| anyhow!("cannot read zip entry '{name}': {e}"))?;
    if buf.len() as u64 != declared {
        bail!("zip entry '{name}' is truncated: {} of {declared} bytes", buf.len());
    }
    Ok(buf)
}

// ---------------------------------------------------------------------------------------------
// Legacy format

fn load_legacy(bytes: &[u8]) -> Result<Vec<(String, RawTensor)>> {
    let mut pos = LEGACY_MAGIC_PICKLE.len();

    let version = unpickle(&bytes[pos..], "protocol-version pickle")?;
    pos += version.consumed;
    match version.root {
        super::pickle::Value::Int(LEGACY_PROTOCOL_VERSION) => {}
        super::pickle::Value::Int(v) => {
            bail!("unsupported legacy torch protocol version {v} (expected 1001)")
        }
        _ => bail!("the legacy protocol-version pickle does not hold an int"),
    }

    let sys_info = unpickle(&bytes[pos..], "sys-info pickle")?;
    pos += sys_info.consumed;
    if let Some(super::pickle::Value::Bool(false)) = sys_info_field(&sys_info, "little_endian") {
        bail!(
            "refusing to load: the checkpoint was written on a big-endian machine (sys info says \
             little_endian=False); only little-endian checkpoints are supported"
        );
    }

    let main = unpickle(&bytes[pos..], "state-dict pickle")?;
    pos += main.consumed;
    let specs = main.state_dict()?;

    let key_list = unpickle(&bytes[pos..], "storage-key pickle")?;
    pos += key_list.consumed;
    let keys = key_list.string_list()?;

    let roots = &main.storages;
    let by_key: HashMap<&str, usize> = roots.iter().enumerate().map(|(i, r)| (r.key.as_str(), i)).collect();
    let mut ranges: Vec<Option<(usize, usize)>> = vec![None; roots.len()];
    for key in &keys {
        let &i = by_key
            .get(key.as_str())
            .ok_or_else(|| anyhow!("the storage list names '{key}', which no tensor in the pickle uses"))?;
        if ranges[i].is_some() {
            bail!("the storage list names '{key}' twice");
        }
        let root = &roots[i];
        let header = bytes
            .get(pos..pos + 8)
            .ok_or_else(|| anyhow!("truncated file: storage '{key}' has no size header at byte {pos}"))?;
        let mut count = [0u8; 8];
        count.copy_from_slice(header);
        let count = u64::from_le_bytes(count);
        pos += 8;
        if count != root.numel {
            bail!(
                "storage '{key}' at byte {} holds {count} elements, but the pickle declares {}",
                pos - 8,
                root.numel
            );
        }
        let len = root_byte_len(root)?;
        let remaining = (bytes.len() - pos) as u64;
        if len > remaining {
            bail!("truncated file: storage '{key}' needs {len} bytes at byte {pos}, only {remaining} remain");
        }
        // `len <= remaining` fits in usize.
        let len = len as usize;
        ranges[i] = Some((pos, len));
        pos += len;
    }
    let mut root_bytes = Vec::with_capacity(roots.len());
    for (root, range) in roots.iter().zip(&ranges) {
        if range.is_none() {
            bail!("storage '{}' is missing: the storage list does not name it", root.key);
        }
        root_bytes.push(root_byte_len(root)?);
    }
    let plans = plan_tensors(&specs, roots, &root_bytes)?;
    let data =
        ranges.iter().map(|r| r.map(|(start, len)| Cow::Borrowed(&bytes[start..start + len]))).collect();
    materialise_all(specs, plans, data, roots)
}

fn sys_info_field<'a>(info: &'a Unpickled, field: &str) -> Option<&'a super::pickle::Value> {
    let super::pickle::Value::Obj(i) = &info.root else { return None };
    let super::pickle::Obj::Dict(d) = &info.heap[*i] else { return None };
    d.items.iter().find(|(k, _)| matches!(k, super::pickle::Value::Str(s) if &**s == field)).map(|(_, v)| v)
}

fn check_fully_consumed(u: &Unpickled, len: usize, name: &str) -> Result<()> {
    if u.consumed != len {
        bail!("{name}: {} bytes of trailing data after the pickle's STOP", len - u.consumed);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Checking views and copying tensors out

fn root_byte_len(root: &StorageRoot) -> Result<u64> {
    root.numel
        .checked_mul(root.element_size()?)
        .ok_or_else(|| anyhow!("storage '{}' declares {} elements, which overflows", root.key, root.numel))
}

/// How each tensor lies in its storage, checked; and how many tensors use each storage.
struct Plans {
    layouts: Vec<Layout>,
    uses: Vec<usize>,
}

struct Layout {
    shape: Vec<usize>,
    stride: Vec<usize>,
    /// Element offset of the first element, counted from the start of the storage slice.
    offset: usize,
    out_bytes: usize,
    contiguous: bool,
}

fn plan_tensors(specs: &[(String, TensorSpec)], roots: &[StorageRoot], root_bytes: &[u64]) -> Result<Plans> {
    let mut layouts = Vec::with_capacity(specs.len());
    let mut uses = vec![0usize; roots.len()];
    let mut total_out: u64 = 0;
    for (name, spec) in specs {
        let root = &roots[spec.storage.root];
        let layout = plan_tensor(name, spec, root, root_bytes[spec.storage.root])?;
        uses[spec.storage.root] += 1;
        total_out = total_out.saturating_add(layout.out_bytes as u64);
        layouts.push(layout);
    }
    // Views let many tensors share one storage; bound the copies by what the file holds so a
    // crafted pickle naming one storage a million times cannot demand terabytes.
    let stored: u64 = root_bytes.iter().zip(&uses).filter(|(_, u)| **u > 0).map(|(b, _)| *b).sum();
    let cap = stored.saturating_mul(4).saturating_add(1 << 26);
    if total_out > cap {
        bail!(
            "the tensors would take {total_out} bytes once copied out of {stored} bytes of storage; \
             refusing (more than 4x the storage: a crafted checkpoint?)"
        );
    }
    Ok(Plans { layouts, uses })
}

fn plan_tensor(name: &str, spec: &TensorSpec, root: &StorageRoot, root_bytes: u64) -> Result<Layout> {
    let slice = &spec.storage;
    let slice_end = slice.byte_start.checked_add(slice.byte_len);
    if slice_end.is_none_or(|end| end > root_bytes) {
        bail!("tensor '{name}': its storage view lies outside storage '{}'", root.key);
    }
    let el = spec.dtype.size() as u64;
    let describe = || {
        format!(
            "tensor '{name}' ({:?}, shape {:?}, stride {:?}, offset {})",
            spec.dtype, spec.shape, spec.stride, spec.offset
        )
    };
    let numel = spec
        .shape
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| anyhow!("{}: the element count overflows", describe()))?;
    let out_bytes = numel
        .checked_mul(el)
        .filter(|&b| b <= isize::MAX as u64)
        .ok_or_else(|| anyhow!("{}: the size in bytes overflows", describe()))?;
    if numel > 0 {
        let last = spec
            .shape
            .iter()
            .zip(&spec.stride)
            .try_fold(spec.offset, |acc, (&d, &s)| (d - 1).checked_mul(s).and_then(|x| acc.checked_add(x)))
            .ok_or_else(|| anyhow!("{}: the last element's index overflows", describe()))?;
        let needed = last.checked_add(1).and_then(|n| n.checked_mul(el));
        if needed.is_none_or(|n| n > slice.byte_len) {
            bail!(
                "{}: it reaches element {last} but its storage '{}' holds only {} bytes ({} elements)",
                describe(),
                root.key,
                slice.byte_len,
                slice.byte_len / el
            );
        }
        if out_bytes > slice.byte_len && out_bytes > MAX_EXPANDED_TENSOR_BYTES {
            bail!(
                "{}: it has {out_bytes} bytes of overlapping elements from a {}-byte storage; refusing",
                describe(),
                slice.byte_len
            );
        }
    }
    // Every value below is bounded by `out_bytes` or the storage length, both of which fit.
    let shape: Vec<usize> = spec.shape.iter().map(|&d| d as usize).collect();
    let stride: Vec<usize> = spec.stride.iter().map(|&s| s as usize).collect();
    let mut expected = 1usize;
    let mut contiguous = true;
    for (&d, &s) in shape.iter().zip(&stride).rev() {
        if d != 1 && s != expected {
            contiguous = false;
        }
        expected = expected.saturating_mul(d);
    }
    Ok(Layout { shape, stride, offset: spec.offset as usize, out_bytes: out_bytes as usize, contiguous })
}

fn materialise_all(
    specs: Vec<(String, TensorSpec)>,
    plans: Plans,
    mut data: Vec<Option<Cow<'_, [u8]>>>,
    roots: &[StorageRoot],
) -> Result<Vec<(String, RawTensor)>> {
    let Plans { layouts, mut uses } = plans;
    let mut out = Vec::with_capacity(specs.len());
    for ((name, spec), layout) in specs.into_iter().zip(layouts) {
        let r = spec.storage.root;
        uses[r] -= 1;
        let storage = data[r].as_ref().ok_or_else(|| anyhow!("storage '{}' was not read", roots[r].key))?;
        let start = spec.storage.byte_start as usize;
        let whole = layout.contiguous
            && layout.offset == 0
            && start == 0
            && layout.out_bytes == storage.len()
            && spec.storage.byte_len as usize == storage.len();
        let bytes = if whole && uses[r] == 0 {
            // The last user of a storage that is exactly this tensor takes it without a copy.
            data[r].take().map(Cow::into_owned).unwrap_or_default()
        } else {
            let view = &storage[start..start + spec.storage.byte_len as usize];
            copy_strided(&name, view, &layout, spec.dtype.size())?
        };
        if uses[r] == 0 {
            data[r] = None;
        }
        out.push((name, RawTensor { dtype: spec.dtype, shape: layout.shape, data: bytes }));
    }
    Ok(out)
}

/// Gathers the elements of a (checked) strided view into a contiguous row-major buffer.
fn copy_strided(name: &str, view: &[u8], layout: &Layout, el: usize) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    out.try_reserve_exact(layout.out_bytes)
        .map_err(|_| anyhow!("tensor '{name}': cannot allocate {} bytes", layout.out_bytes))?;
    if layout.out_bytes == 0 {
        return Ok(out);
    }
    let oob = || anyhow!("tensor '{name}': element outside its storage");
    if layout.contiguous {
        let start = layout.offset * el;
        out.extend_from_slice(view.get(start..start + layout.out_bytes).ok_or_else(oob)?);
        return Ok(out);
    }
    // Walk the outer dimensions with an index counter; copy the innermost dimension as a run
    // when it is dense, element by element otherwise.
    let ndim = layout.shape.len();
    let inner_len = layout.shape[ndim - 1];
    let inner_stride = layout.stride[ndim - 1];
    let outer = &layout.shape[..ndim - 1];
    let mut index = vec![0usize; outer.len()];
    loop {
        let base = layout.offset + index.iter().zip(&layout.stride).map(|(i, s)| i * s).sum::<usize>();
        if inner_stride == 1 {
            out.extend_from_slice(view.get(base * el..(base + inner_len) * el).ok_or_else(oob)?);
        } else {
            for j in 0..inner_len {
                let at = (base + j * inner_stride) * el;
                out.extend_from_slice(view.get(at..at + el).ok_or_else(oob)?);
            }
        }
        // Advance the counter, last outer dimension fastest.
        let mut d = outer.len();
        loop {
            if d == 0 {
                return Ok(out);
            }
            d -= 1;
            index[d] += 1;
            if index[d] < outer[d] {
                break;
            }
            index[d] = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tensor::DType;

    fn layout(shape: &[usize], stride: &[usize], offset: usize) -> Layout {
        let spec = TensorSpec {
            storage: super::super::pickle::StorageSlice { root: 0, byte_start: 0, byte_len: 400 },
            dtype: DType::F32,
            offset: offset as u64,
            shape: shape.iter().map(|&d| d as u64).collect(),
            stride: stride.iter().map(|&d| d as u64).collect(),
        };
        let root = StorageRoot {
            key: "0".into(),
            kind: super::super::pickle::StorageKind::Typed(DType::F32),
            numel: 100,
        };
        plan_tensor("t", &spec, &root, 400).unwrap()
    }

    fn values(bytes: &[u8]) -> Vec<f32> {
        bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
    }

    #[test]
    fn copies_transposed_and_offset_views() {
        let storage: Vec<u8> = (0..100).flat_map(|i| (i as f32).to_le_bytes()).collect();
        // A 2x3 matrix stored row-major at offset 4, read transposed: shape [3, 2], stride [1, 3].
        let l = layout(&[3, 2], &[1, 3], 4);
        assert!(!l.contiguous);
        let v = values(&copy_strided("t", &storage, &l, 4).unwrap());
        assert_eq!(v, vec![4.0, 7.0, 5.0, 8.0, 6.0, 9.0]);
        // 3-D with a gap: shape [2, 2, 2], stride [10, 3, 1], offset 1.
        let l = layout(&[2, 2, 2], &[10, 3, 1], 1);
        let v = values(&copy_strided("t", &storage, &l, 4).unwrap());
        assert_eq!(v, vec![1.0, 2.0, 4.0, 5.0, 11.0, 12.0, 14.0, 15.0]);
        // Expanded (stride 0) rows.
        let l = layout(&[3, 2], &[0, 1], 7);
        let v = values(&copy_strided("t", &storage, &l, 4).unwrap());
        assert_eq!(v, vec![7.0, 8.0, 7.0, 8.0, 7.0, 8.0]);
        // Size-1 dims with arbitrary strides are still contiguous.
        let l = layout(&[1, 4], &[99, 1], 2);
        assert!(l.contiguous);
        assert_eq!(values(&copy_strided("t", &storage, &l, 4).unwrap()), vec![2.0, 3.0, 4.0, 5.0]);
        // Scalars.
        let l = layout(&[], &[], 42);
        assert_eq!(values(&copy_strided("t", &storage, &l, 4).unwrap()), vec![42.0]);
        // Empty tensors need no storage at all.
        let l = layout(&[0, 5], &[5, 1], 0);
        assert!(copy_strided("t", &storage, &l, 4).unwrap().is_empty());
    }

    #[test]
    fn refuses_views_outside_the_storage() {
        let spec = |shape: Vec<u64>, stride: Vec<u64>, offset: u64| TensorSpec {
            storage: super::super::pickle::StorageSlice { root: 0, byte_start: 0, byte_len: 40 },
            dtype: DType::F32,
            offset,
            shape,
            stride,
        };
        let root = StorageRoot {
            key: "7".into(),
            kind: super::super::pickle::StorageKind::Typed(DType::F32),
            numel: 10,
        };
        let err =
            |s: TensorSpec| plan_tensor("w", &s, &root, 40).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(plan_tensor("w", &spec(vec![2, 5], vec![5, 1], 0), &root, 40).is_ok());
        let e = err(spec(vec![2, 5], vec![5, 1], 1));
        assert!(
            e.contains("tensor 'w'") && e.contains("reaches element 10") && e.contains("storage '7'"),
            "{e}"
        );
        assert!(err(spec(vec![3, 4], vec![4, 1], 0)).contains("reaches element 11"));
        assert!(err(spec(vec![u64::MAX, 2], vec![1, 1], 0)).contains("overflows"));
        assert!(err(spec(vec![1 << 40, 1 << 40], vec![0, 0], 0)).contains("overflows"));
        assert!(err(spec(vec![1 << 20, 1 << 20], vec![0, 0], 0)).contains("overlapping"));
        assert!(err(spec(vec![3], vec![u64::MAX], 0)).contains("overflows"));
        assert!(err(spec(vec![1], vec![1], u64::MAX)).contains("reaches element"));
    }

    #[test]
    fn detects_formats() {
        assert!(detect_format(b"").unwrap_err().to_string().contains("empty"));
        assert!(detect_format(b"\x80\x02}q\x00.").unwrap_err().to_string().contains("not a PyTorch"));
        let e = detect_format(b"{\"__metadata__\"").unwrap_err().to_string();
        assert!(e.contains("starts with bytes [7b 22 5f 5f"), "{e}");
        assert!(detect_format(b"\x80\x02\x8a").unwrap_err().to_string().contains("truncated"));
        assert!(matches!(detect_format(b"PK\x03\x04rest"), Ok(Format::Zip)));
        assert!(matches!(detect_format(LEGACY_MAGIC_PICKLE), Ok(Format::Legacy)));
    }
}
