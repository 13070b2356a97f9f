#!/usr/bin/env python3
"""Writes the pytorch_model.bin fixtures that tests/torch_bin.rs reads.

Run with the project venv (torch, transformers):
    /work/main/.venv/bin/python scripts/make_torch_bin_fixtures.py

For each state dict it writes the zip format (torch >= 1.6), the legacy format
(`_use_new_zipfile_serialization=False`) and a JSON file of the expected tensors in file order:
name, dtype (our DType name), shape and the flattened row-major values as floats. Every value
is exactly representable as f64, so the Rust test compares exactly.
"""

import collections
import json
import os

import torch

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "torch_bin")

DTYPE_NAMES = {
    torch.float32: "F32",
    torch.float64: "F64",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "Bool",
}


def tiny_state_dict():
    """A BERT-like state dict that exercises every dtype and the awkward layouts."""
    g = torch.Generator().manual_seed(1234)
    sd = collections.OrderedDict()
    sd["embeddings.word_embeddings.weight"] = torch.randn(6, 4, generator=g)
    sd["embeddings.LayerNorm.bias"] = torch.randn(4, generator=g)
    sd["embeddings.position_ids"] = torch.arange(8).expand((1, -1))
    sd["half"] = torch.randn(3, generator=g).half()
    sd["bf16"] = torch.randn(2, 2, generator=g).bfloat16()
    # Non-contiguous: a transpose, stride (1, 5).
    sd["transposed"] = torch.randn(3, 5, generator=g).t()
    # Two tensors sharing one storage, the second a view at an offset (like tied weights), and
    # a strided 2-D window into the same storage.
    base = torch.randn(10, generator=g)
    sd["shared.full"] = base
    sd["shared.view"] = base[3:7]
    sd["shared.window"] = base.view(2, 5)[:, 1:4]
    sd["param"] = torch.nn.Parameter(torch.randn(3, generator=g))
    sd["scalar"] = torch.tensor(3.5)
    sd["empty"] = torch.zeros(0, 3)
    # Multiples of 2^-10 print in few digits, so any JSON parser reads them exactly.
    sd["f64"] = (torch.randn(3, generator=g).double() * 1024).round() / 1024
    sd["i32"] = torch.tensor([-7, 2**31 - 1], dtype=torch.int32)
    sd["i16"] = torch.tensor([-300, 300], dtype=torch.int16)
    sd["i8"] = torch.tensor([-128, 127], dtype=torch.int8)
    sd["u8"] = torch.tensor([0, 255], dtype=torch.uint8)
    sd["mask"] = torch.tensor([True, False, True])
    sd["i64_big"] = torch.tensor([-(2**40), 2**40], dtype=torch.int64)
    return sd


def tiny_bert_state_dict():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
        type_vocab_size=2,
        num_labels=2,
    )
    return BertForSequenceClassification(config).state_dict()


def expected(sd):
    tensors = []
    for name, t in sd.items():
        t = t.detach()
        dtype = DTYPE_NAMES[t.dtype]
        if t.dtype in (torch.float16, torch.bfloat16):
            t = t.float()  # exact: every f16/bf16 value is an f32 value
        values = t.reshape(-1).tolist()
        tensors.append(
            {
                "name": name,
                "dtype": dtype,
                "shape": list(t.shape),
                "values": [float(v) for v in values],
            }
        )
    return {"tensors": tensors}


def write(stem, sd):
    torch.save(sd, os.path.join(OUT, f"{stem}_zip.bin"))
    torch.save(sd, os.path.join(OUT, f"{stem}_legacy.bin"), _use_new_zipfile_serialization=False)
    with open(os.path.join(OUT, f"{stem}.json"), "w") as f:
        # One tensor per line keeps diffs readable.
        lines = [json.dumps(t) for t in expected(sd)["tensors"]]
        f.write('{"tensors": [\n' + ",\n".join(lines) + "\n]}\n")


def main():
    os.makedirs(OUT, exist_ok=True)
    tiny = tiny_state_dict()
    write("tiny", tiny)
    # Protocol 4 exercises FRAME, MEMOIZE, SHORT_BINUNICODE and STACK_GLOBAL.
    torch.save(tiny, os.path.join(OUT, "tiny_zip_proto4.bin"), pickle_protocol=4)
    write("bert", tiny_bert_state_dict())
    # torch pickles dtypes it has no typed storage for with _rebuild_tensor_v3 + UntypedStorage.
    torch.save({"u16": torch.tensor([1, 2], dtype=torch.uint16)}, os.path.join(OUT, "uint16_zip.bin"))
    for name in sorted(os.listdir(OUT)):
        print(f"{os.path.getsize(os.path.join(OUT, name)):>7}  {name}")


if __name__ == "__main__":
    main()
