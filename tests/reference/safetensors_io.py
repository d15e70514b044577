"""Minimal, strict safetensors reader/writer (F32, F64 and I32 only), no safetensors library.

File layout (https://github.com/huggingface/safetensors, format section):

    [8 bytes]  N, little-endian unsigned 64-bit: length of the JSON header
    [N bytes]  JSON object, UTF-8, possibly right-padded with spaces:
               {"<name>": {"dtype": "F32", "shape": [d0, d1, ...], "data_offsets": [begin, end]},
                ..., "__metadata__": {"<key>": "<string>", ...}}   (metadata optional)
    [rest]     the data buffer; begin/end are byte offsets into it, relative to its start,
               tensors stored row-major, little-endian

The reader checks everything a careless writer could get wrong: header length inside the
file, valid JSON object, known dtype, integer non-negative shape, end - begin equal to
numel * itemsize, tensors non-overlapping and together covering the whole data buffer.
Any violation raises SafetensorsError naming the file and the tensor.

Sharded checkpoints (model.safetensors.index.json with a "weight_map") are read by
`load_checkpoint_tensors`.
"""
import json
import os
import struct

import numpy as np
import torch

DTYPES = {"F32": np.dtype("<f4"), "F64": np.dtype("<f8"), "I32": np.dtype("<i4")}
TORCH_TO_CODE = {torch.float32: "F32", torch.float64: "F64", torch.int32: "I32"}
MAX_HEADER_BYTES = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    pass


def _parse_header(path, blob):
    """Returns (header dict without __metadata__, metadata dict, data buffer offset)."""
    if len(blob) < 8:
        raise SafetensorsError(f"{path}: file too short ({len(blob)} bytes) for the 8-byte header length")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > MAX_HEADER_BYTES or 8 + n > len(blob):
        raise SafetensorsError(f"{path}: header length {n} does not fit in a file of {len(blob)} bytes")
    try:
        header = json.loads(blob[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{path}: header is not valid UTF-8 JSON: {e}") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header must be a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsError(f"{path}: __metadata__ must map strings to strings")
    return header, metadata, 8 + n


def read_safetensors(path, with_metadata=False):
    """Reads a .safetensors file into {name: torch tensor (float32 or float64, as stored)}.

    Tensors come back in the file's dtype; callers convert (the reference works in float64).
    """
    with open(path, "rb") as f:
        blob = f.read()
    header, metadata, start = _parse_header(path, blob)
    data_len = len(blob) - start

    spans = []
    for name, info in header.items():
        where = f"{path}: tensor '{name}'"
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise SafetensorsError(f"{where}: entry must have exactly dtype, shape and data_offsets")
        if info["dtype"] not in DTYPES:
            raise SafetensorsError(f"{where}: dtype {info['dtype']!r} unsupported (only F32, F64 and I32)")
        shape = info["shape"]
        if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
            raise SafetensorsError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
        offs = info["data_offsets"]
        if (not isinstance(offs, list) or len(offs) != 2 or not all(isinstance(o, int) for o in offs)
                or not 0 <= offs[0] <= offs[1] <= data_len):
            raise SafetensorsError(f"{where}: data_offsets {offs!r} outside the data buffer of {data_len} bytes")
        numel = 1
        for s in shape:
            numel *= s
        itemsize = DTYPES[info["dtype"]].itemsize
        if offs[1] - offs[0] != numel * itemsize:
            raise SafetensorsError(f"{where}: data_offsets {offs} span {offs[1] - offs[0]} bytes but shape "
                                   f"{shape} of {info['dtype']} needs {numel * itemsize}")
        spans.append((offs[0], offs[1], name))

    # The tensors must tile the data buffer exactly: no gaps, no overlaps, nothing after.
    pos = 0
    for begin, end, name in sorted(spans):
        if begin != pos:
            raise SafetensorsError(f"{path}: tensor '{name}' starts at byte {begin}, expected {pos} "
                                   "(gap or overlap in the data buffer)")
        pos = end
    if pos != data_len:
        raise SafetensorsError(f"{path}: tensors cover {pos} bytes of a {data_len}-byte data buffer")

    tensors = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        arr = np.frombuffer(blob, dtype=DTYPES[info["dtype"]], count=(end - begin) // DTYPES[info["dtype"]].itemsize,
                            offset=start + begin)
        tensors[name] = torch.from_numpy(arr.astype(arr.dtype.newbyteorder("="), copy=True)).reshape(info["shape"])
    return (tensors, metadata) if with_metadata else tensors


def write_safetensors(path, tensors, metadata=None):
    """Writes {name: tensor} (float32, float64 or int32 torch tensors or numpy arrays) to `path`.

    Tensors are stored in name order; the header is padded with spaces to a multiple of 8
    bytes so that every tensor starts 8-byte aligned.
    """
    header = {}
    chunks = []
    pos = 0
    for name in sorted(tensors):
        t = tensors[name]
        if isinstance(t, torch.Tensor):
            t = t.detach().cpu().contiguous().numpy()
        arr = np.ascontiguousarray(t)
        code = {np.dtype("float32"): "F32", np.dtype("float64"): "F64", np.dtype("int32"): "I32"}.get(arr.dtype)
        if code is None:
            raise SafetensorsError(f"{path}: tensor '{name}' has dtype {arr.dtype}, only float32/float64/int32 "
                                   "supported")
        raw = arr.astype(DTYPES[code], copy=False).tobytes()
        header[name] = {"dtype": code, "shape": list(arr.shape), "data_offsets": [pos, pos + len(raw)]}
        chunks.append(raw)
        pos += len(raw)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    hbytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hbytes += b" " * (-len(hbytes) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hbytes)))
        f.write(hbytes)
        for c in chunks:
            f.write(c)
    os.replace(tmp, path)


def load_checkpoint_tensors(ckpt_dir, stem="model"):
    """Reads <stem>.safetensors, or the shards listed in <stem>.safetensors.index.json.

    For shards, every tensor named in weight_map must be in the shard it names, no tensor
    may appear twice, and no shard may hold a tensor the index does not list.
    """
    single = os.path.join(ckpt_dir, f"{stem}.safetensors")
    index = os.path.join(ckpt_dir, f"{stem}.safetensors.index.json")
    if os.path.exists(single):
        return read_safetensors(single)
    if not os.path.exists(index):
        raise SafetensorsError(f"{ckpt_dir}: neither {stem}.safetensors nor {stem}.safetensors.index.json exists")
    with open(index) as f:
        try:
            weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise SafetensorsError(f"{index}: expected a JSON object with a 'weight_map': {e}") from None
    tensors = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = os.path.join(ckpt_dir, shard)
        part = read_safetensors(shard_path)
        for name, t in part.items():
            if weight_map.get(name) != shard:
                raise SafetensorsError(f"{shard_path}: tensor '{name}' is not mapped to this shard in {index}")
            if name in tensors:
                raise SafetensorsError(f"{shard_path}: tensor '{name}' appears in two shards")
            tensors[name] = t
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise SafetensorsError(f"{index}: tensors listed but not found in their shard: {missing[:5]}")
    return tensors
