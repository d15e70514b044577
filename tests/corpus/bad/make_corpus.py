#!/usr/bin/env python3
"""Writes the bad-input corpus of moetune: every case file under tests/corpus/bad/<format>/
and the manifest tests/corpus/bad/cases.tsv (python3 standard library only).

    python3 tests/corpus/bad/make_corpus.py        # rewrites the corpus in place

The output is deterministic, and committed: the runner (tests/corpus/run_bad_corpus.sh)
only reads cases.tsv and the files. To add a case, add one `case(...)` call below (its
files, command, expected stderr substring and description), re-run this script and
commit its output. The valid inputs the cases start from live in valid/ (hand-written).

The model files follow the checkpoint layout of valid/model_config.json (the runner's
base checkpoint): 264 tokens, d = 4, 2 layers (one dense, one MoE with 4 experts and a
shared expert), see moe/params.cpp for the names and shapes.
"""
import json
import os
import random
import shutil
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

# ----------------------------------------------------------------------------- helpers

FILES = {}  # relative path -> bytes
CASES = []  # rows of cases.tsv


def put(rel, data):
    if isinstance(data, str):
        data = data.encode("utf-8")
    assert rel not in FILES, rel
    FILES[rel] = data
    return rel


def case(cid, fmt, files, command, expected, description):
    """files: list of corpus paths, "src>dest" overlays, "!dest" deletions, "+manifest"."""
    for f in files:
        src = f.split(">")[0]
        assert f[0] in "!+@" or src in FILES or src.startswith("valid/"), (cid, f)
    for col in (cid, fmt, command, expected, description):
        assert "\t" not in col and "\n" not in col, cid
    assert all(c[0] != cid for c in CASES), cid
    CASES.append((cid, fmt, ",".join(files) if files else "-", command, expected, description))


def jdump(obj):
    return json.dumps(obj, indent=1) + "\n"


# ----------------------------------------------------------------------------- the model layout

V, D, H, HKV, HD, I, E, F, S = 264, 4, 2, 1, 2, 8, 4, 4, 4


def layout():
    """(name, shape) of model.safetensors in the order moetune writes it."""
    t = [("model.embed_tokens.weight", [V, D])]
    for layer in range(2):
        p = f"model.layers.{layer}."
        t += [(p + "input_layernorm.weight", [D]), (p + "self_attn.q_proj.weight", [H * HD, D]),
              (p + "self_attn.k_proj.weight", [HKV * HD, D]), (p + "self_attn.v_proj.weight", [HKV * HD, D]),
              (p + "self_attn.o_proj.weight", [D, H * HD]), (p + "post_attention_layernorm.weight", [D])]
        if layer == 0:
            t += [(p + "mlp.gate_proj.weight", [I, D]), (p + "mlp.up_proj.weight", [I, D]),
                  (p + "mlp.down_proj.weight", [D, I])]
        else:
            t += [(p + "mlp.gate.weight", [E, D]), (p + "mlp.gate.e_score_correction_bias", [E])]
            for e in range(E):
                t += [(p + f"mlp.experts.{e}.gate_proj.weight", [F, D]), (p + f"mlp.experts.{e}.up_proj.weight", [F, D]),
                      (p + f"mlp.experts.{e}.down_proj.weight", [D, F])]
            t += [(p + "mlp.shared_experts.gate_proj.weight", [S, D]), (p + "mlp.shared_experts.up_proj.weight", [S, D]),
                  (p + "mlp.shared_experts.down_proj.weight", [D, S])]
    t += [("model.norm.weight", [D]), ("lm_head.weight", [V, D])]
    return t


def numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def values(name, shape, rng):
    if name.endswith("e_score_correction_bias"):
        return [0.0] * numel(shape)
    if len(shape) == 1:
        return [1.0] * numel(shape)
    return [round(rng.gauss(0, 0.02), 6) for _ in range(numel(shape))]


def model_tensors(seed=7):
    rng = random.Random(seed)
    return [[n, "F32", s, values(n, s, rng)] for n, s in layout()]


def optimizer_tensors(seed=8):
    rng = random.Random(seed)
    out = []
    for n, s in layout():
        if n.endswith("e_score_correction_bias"):
            continue
        out.append([n + ".exp_avg", "F32", s, [round(rng.gauss(0, 1e-3), 8) for _ in range(numel(s))]])
        out.append([n + ".exp_avg_sq", "F32", s, [round(rng.random() * 1e-6, 12) for _ in range(numel(s))]])
    return out


PACK = {"F32": "f", "F64": "d", "I32": "i", "I64": "q"}


def safetensors(tensors, metadata=None, header_override=None):
    """tensors: [name, dtype, shape, values] (values packed with the dtype; F16/BF16 take raw bytes)."""
    header, blobs, off = {}, [], 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, dtype, shape, vals in tensors:
        blob = vals if isinstance(vals, bytes) else struct.pack("<%d%s" % (len(vals), PACK[dtype]), *vals)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(blob)]}
        blobs.append(blob)
        off += len(blob)
    h = (header_override if header_override is not None else json.dumps(header, separators=(",", ":"))).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    return struct.pack("<Q", len(h)) + h + b"".join(blobs)


def raw_safetensors(header_text, data=b"", length=None):
    h = header_text.encode() if isinstance(header_text, str) else header_text
    return struct.pack("<Q", len(h) if length is None else length) + h + data


GEN = "{moetune} generate --ckpt {ckpt} --prompts {work}/prompts.jsonl --out {work}/out.jsonl --max-new-tokens 4 --quiet"
INIT_FROM = "{moetune} train --config {work}/run.json --out {work}/out --init-from {ckpt} --peak-gflops 1 --quiet"
SFT = "{moetune} sft --init-from {ckpt} --data {work}/sft.jsonl --out {work}/out --set train.steps=1 --peak-gflops 1 --quiet"
SFT_OPT = SFT + " --continue-optimizer"
RESUME = ("{moetune} train --config {work}/run.json --out {work}/out --resume-from {ckpt} --set train.steps=3 "
          "--peak-gflops 1 --quiet")
TRAIN = "{moetune} train --config {case} --out {work}/out --peak-gflops 1 --quiet"
TRAIN_DATA = "{moetune} train --config {work}/run.json --out {work}/out --set data.train={case} --peak-gflops 1 --quiet"
TRAIN_BIN = TRAIN_DATA + " --set data.format=bin"
SFT_DATA = "{moetune} sft --init-from {ckpt} --data {case} --out {work}/out --set train.steps=1 --peak-gflops 1 --quiet"
RL = ("{moetune} rl --init-from {ckpt} --prompts {case} --out {work}/out --set rl.prompts_per_step=2 "
      "--set rl.num_generations=2 --set rl.max_new_tokens=4 --set train.steps=1 --peak-gflops 1 --quiet")
TOK_INFO = "{moetune} tokenizer info --tokenizer {case}"
MST = ">ckpt/model.safetensors"
OST = ">ckpt/optimizer.safetensors"


def build():
    # ------------------------------------------------------------------ safetensors: model weights
    good = model_tensors()
    good_bytes = safetensors(good, {"format": "pt"})
    d = "safetensors/"

    put(d + "empty.safetensors", b"")
    case("st_empty", "safetensors", [d + "empty.safetensors" + MST], GEN,
         "model.safetensors: not a safetensors file: 0 bytes", "zero-byte weights file")
    put(d + "short.safetensors", b"\x10\x00\x00")
    case("st_short", "safetensors", [d + "short.safetensors" + MST], GEN,
         "shorter than the 8-byte header length", "3 bytes: no room for the header length")
    put(d + "header_10gb.safetensors", raw_safetensors("{}", length=10_000_000_000))
    case("st_header_10gb", "safetensors", [d + "header_10gb.safetensors" + MST], GEN,
         "header length 10000000000 is absurd", "header length declares 10 GB in a 10-byte file")
    put(d + "header_past_end.safetensors", raw_safetensors('{"a":', length=4096))
    case("st_header_past_end", "safetensors", [d + "header_past_end.safetensors" + MST], GEN,
         "header length 4096 runs past the end of the file", "header length larger than the file")
    put(d + "header_max_u64.safetensors", b"\xff" * 8 + b"{}")
    case("st_header_max_u64", "safetensors", [d + "header_max_u64.safetensors" + MST], GEN,
         "header length 18446744073709551615 is absurd", "header length 2^64-1 (8 + n overflows)")
    put(d + "truncated.safetensors", good_bytes[:-100])
    case("st_truncated", "safetensors", [d + "truncated.safetensors" + MST], GEN,
         "lie outside the data buffer", "valid weights with the last 100 bytes cut off")
    put(d + "truncated_header.safetensors", good_bytes[:200])
    case("st_truncated_header", "safetensors", [d + "truncated_header.safetensors" + MST], GEN,
         "runs past the end of the file", "cut inside the JSON header")
    put(d + "not_json.safetensors", raw_safetensors("this is not JSON at all!"))
    case("st_not_json", "safetensors", [d + "not_json.safetensors" + MST], GEN,
         "model.safetensors: header is not valid JSON", "header is plain text")
    put(d + "header_array.safetensors", raw_safetensors("[1, 2, 3]"))
    case("st_header_array", "safetensors", [d + "header_array.safetensors" + MST], GEN,
         "header is not a JSON object", "header is a JSON array")
    put(d + "header_non_utf8.safetensors", raw_safetensors(b'{"emb\xff\xfe": {"dtype": "F32"}}'))
    case("st_header_non_utf8", "safetensors", [d + "header_non_utf8.safetensors" + MST], GEN,
         "header is not valid JSON", "tensor name with invalid UTF-8 bytes")
    put(d + "negative_shape.safetensors",
        raw_safetensors('{"model.embed_tokens.weight":{"dtype":"F32","shape":[-1,8],"data_offsets":[0,0]}}'))
    case("st_negative_shape", "safetensors", [d + "negative_shape.safetensors" + MST], GEN,
         "tensor 'model.embed_tokens.weight': 'shape' entries must be non-negative integers", "shape [-1, 8]")
    put(d + "huge_shape.safetensors", raw_safetensors(
        '{"model.embed_tokens.weight":{"dtype":"F32","shape":[4611686018427387904,4611686018427387904],'
        '"data_offsets":[0,16]}}', b"\0" * 16))
    case("st_huge_shape", "safetensors", [d + "huge_shape.safetensors" + MST], GEN,
         "tensor 'model.embed_tokens.weight': shape [4611686018427387904,4611686018427387904] overflows",
         "shape whose element count overflows 64 bits")
    put(d + "shape_float.safetensors",
        raw_safetensors('{"model.norm.weight":{"dtype":"F32","shape":[2.5],"data_offsets":[0,8]}}', b"\0" * 8))
    case("st_shape_float", "safetensors", [d + "shape_float.safetensors" + MST], GEN,
         "tensor 'model.norm.weight': 'shape' entries must be non-negative integers", "fractional dimension")
    put(d + "shape_missing.safetensors",
        raw_safetensors('{"model.norm.weight":{"dtype":"F32","data_offsets":[0,8]}}', b"\0" * 8))
    case("st_shape_missing", "safetensors", [d + "shape_missing.safetensors" + MST], GEN,
         "tensor 'model.norm.weight': missing or non-array 'shape'", "tensor entry without a shape")
    put(d + "dtype_missing.safetensors",
        raw_safetensors('{"model.norm.weight":{"shape":[2],"data_offsets":[0,8]}}', b"\0" * 8))
    case("st_dtype_missing", "safetensors", [d + "dtype_missing.safetensors" + MST], GEN,
         "tensor 'model.norm.weight': missing or non-string 'dtype'", "tensor entry without a dtype")
    put(d + "offsets_past_end.safetensors", raw_safetensors(
        '{"model.norm.weight":{"dtype":"F32","shape":[2],"data_offsets":[999992,1000000]}}', b"\0" * 8))
    case("st_offsets_past_end", "safetensors", [d + "offsets_past_end.safetensors" + MST], GEN,
         "tensor 'model.norm.weight': data_offsets [999992, 1000000] lie outside the data buffer of 8 bytes",
         "data_offsets beyond the end of the file")
    put(d + "offsets_reversed.safetensors", raw_safetensors(
        '{"model.norm.weight":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}}', b"\0" * 8))
    case("st_offsets_reversed", "safetensors", [d + "offsets_reversed.safetensors" + MST], GEN,
         "data_offsets [8, 0] end before begin", "end offset before begin offset")
    put(d + "offsets_missing.safetensors",
        raw_safetensors('{"model.norm.weight":{"dtype":"F32","shape":[2],"data_offsets":[0]}}', b"\0" * 8))
    case("st_offsets_missing", "safetensors", [d + "offsets_missing.safetensors" + MST], GEN,
         "'data_offsets' must be an array of two non-negative integers", "data_offsets with one entry")
    put(d + "overlap.safetensors", raw_safetensors(
        '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}',
        b"\0" * 12))
    case("st_overlap", "safetensors", [d + "overlap.safetensors" + MST], GEN,
         "tensor 'b' overlaps tensor 'a'", "two tensors share bytes")
    put(d + "hole.safetensors", raw_safetensors(
        '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[12,20]}}',
        b"\0" * 20))
    case("st_hole", "safetensors", [d + "hole.safetensors" + MST], GEN,
         "hole in the data buffer: bytes [8, 12) before tensor 'b'", "4 bytes that belong to no tensor")
    put(d + "trailing.safetensors",
        raw_safetensors('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', b"\0" * 16))
    case("st_trailing", "safetensors", [d + "trailing.safetensors" + MST], GEN,
         "data buffer has 16 bytes but the tensors cover 8 (trailing garbage)", "bytes after the last tensor")
    put(d + "unknown_dtype.safetensors",
        raw_safetensors('{"model.norm.weight":{"dtype":"F33","shape":[2],"data_offsets":[0,8]}}', b"\0" * 8))
    case("st_unknown_dtype", "safetensors", [d + "unknown_dtype.safetensors" + MST], GEN,
         "tensor 'model.norm.weight': unknown dtype 'F33'", "dtype that does not exist")
    put(d + "dtype_shape_mismatch.safetensors",
        raw_safetensors('{"model.norm.weight":{"dtype":"F16","shape":[8],"data_offsets":[0,32]}}', b"\0" * 32))
    case("st_dtype_shape_mismatch", "safetensors", [d + "dtype_shape_mismatch.safetensors" + MST], GEN,
         "data_offsets [0, 32] hold 32 bytes but F16 (8) needs 16", "F16 tensor with the byte count of F32")
    ints = [list(t) for t in good]
    for t in ints:
        if t[0] == "model.norm.weight":
            t[1], t[3] = "I32", [1] * numel(t[2])
    put(d + "int_dtype.safetensors", safetensors(ints, {"format": "pt"}))
    case("st_int_dtype", "safetensors", [d + "int_dtype.safetensors" + MST], GEN,
         "tensor 'model.norm.weight' has dtype I32; only F32, F64, BF16 and F16 can be read",
         "complete weights with one integer tensor")
    dup = ('{"model.norm.weight":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
           '"model.norm.weight":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}')
    put(d + "duplicate_name.safetensors", raw_safetensors(dup, b"\0" * 16))
    case("st_duplicate_name", "safetensors", [d + "duplicate_name.safetensors" + MST], GEN,
         "duplicate key 'model.norm.weight'", "the same tensor name twice in the header")
    put(d + "metadata_array.safetensors", raw_safetensors('{"__metadata__":[1]}'))
    case("st_metadata_array", "safetensors", [d + "metadata_array.safetensors" + MST], GEN,
         "__metadata__ is not a JSON object", "__metadata__ is an array")
    put(d + "metadata_number.safetensors", raw_safetensors('{"__metadata__":{"format":5}}'))
    case("st_metadata_number", "safetensors", [d + "metadata_number.safetensors" + MST], GEN,
         "__metadata__ value of 'format' is not a string", "a metadata value that is a number")
    put(d + "deep_header.safetensors", raw_safetensors('{"a":' + "[" * 30000 + "]" * 30000 + "}"))
    case("st_deep_header", "safetensors", [d + "deep_header.safetensors" + MST], GEN,
         "nested deeper than", "header nested 30000 arrays deep")
    for kind, bits in (("nan", b"\x00\x00\xc0\x7f"), ("inf", b"\x00\x00\x80\x7f")):
        t = [list(x) for x in good]
        for x in t:
            if x[0] == ("lm_head.weight" if kind == "nan" else "model.layers.1.mlp.experts.2.up_proj.weight"):
                blob = bytearray(struct.pack("<%df" % len(x[3]), *x[3]))
                blob[20:24] = bits
                x[3] = bytes(blob)
        put(d + f"{kind}_weight.safetensors", safetensors(t, {"format": "pt"}))
    case("st_nan_weight", "safetensors", [d + "nan_weight.safetensors" + MST], GEN,
         "tensor 'lm_head.weight' holds a non-finite value (nan) at element 5", "complete weights, one NaN")
    case("st_inf_weight", "safetensors", [d + "inf_weight.safetensors" + MST], INIT_FROM,
         "tensor 'model.layers.1.mlp.experts.2.up_proj.weight' holds a non-finite value (inf) at element 5",
         "complete weights, one +Inf, via train --init-from")
    case("st_nan_weight_sft", "safetensors", [d + "nan_weight.safetensors" + MST], SFT,
         "non-finite value (nan)", "NaN weights via sft --init-from")
    put(d + "missing_all.safetensors", safetensors([["unrelated", "F32", [2], [0.0, 0.0]]]))
    case("st_missing_tensors", "safetensors", [d + "missing_all.safetensors" + MST], GEN,
         "model.safetensors: missing tensor 'model.embed_tokens.weight' (expected shape (264, 4))",
         "a file holding none of the model's tensors")
    put(d + "missing_lm_head.safetensors", safetensors([t for t in good if t[0] != "lm_head.weight"]))
    case("st_missing_lm_head", "safetensors", [d + "missing_lm_head.safetensors" + MST], INIT_FROM,
         "missing tensor 'lm_head.weight'", "complete weights except lm_head.weight")
    put(d + "missing_bias.safetensors",
        safetensors([t for t in good if not t[0].endswith("e_score_correction_bias")]))
    case("st_missing_bias", "safetensors", [d + "missing_bias.safetensors" + MST], GEN,
         "missing tensor 'model.layers.1.mlp.gate.e_score_correction_bias'",
         "noaux_tc routing without its correction bias")
    put(d + "extra_tensor.safetensors", safetensors(good + [["model.layers.7.extra.weight", "F32", [2], [0.0, 0.0]]]))
    case("st_extra_tensor", "safetensors", [d + "extra_tensor.safetensors" + MST], GEN,
         "unexpected tensor 'model.layers.7.extra.weight'", "complete weights plus a tensor of no layer")
    t = [list(x) for x in good]
    for x in t:
        if x[0] == "model.embed_tokens.weight":
            x[2] = [D, V]
    put(d + "wrong_shape.safetensors", safetensors(t))
    case("st_wrong_shape", "safetensors", [d + "wrong_shape.safetensors" + MST], GEN,
         "tensor 'model.embed_tokens.weight' has shape (4, 264) but the model configuration needs (264, 4)",
         "embedding stored transposed")
    t = [list(x) for x in good]
    for x in t:
        if x[0].endswith("e_score_correction_bias"):
            x[2], x[3] = [5], [0.0] * 5
    put(d + "bias_wrong_shape.safetensors", safetensors(t))
    case("st_bias_wrong_shape", "safetensors", [d + "bias_wrong_shape.safetensors" + MST], GEN,
         "tensor 'model.layers.1.mlp.gate.e_score_correction_bias' has shape (5)", "routing bias of 5 experts, not 4")

    # ------------------------------------------------------------------ safetensors: optimizer state
    o = "optimizer/"
    gopt = optimizer_tensors()
    put(o + "no_step.safetensors", safetensors(gopt, {"format": "pt"}))
    case("opt_no_step", "optimizer", [o + "no_step.safetensors" + OST], SFT_OPT,
         "optimizer.safetensors: __metadata__ needs \"step\"", "moments without the step count")
    put(o + "step_text.safetensors", safetensors(gopt, {"format": "pt", "step": "two"}))
    case("opt_step_text", "optimizer", [o + "step_text.safetensors" + OST], SFT_OPT,
         "__metadata__ needs \"step\" as a non-negative integer string", "step is not a number")
    put(o + "step_negative.safetensors", safetensors(gopt, {"format": "pt", "step": "-3"}))
    case("opt_step_negative", "optimizer", [o + "step_negative.safetensors" + OST], SFT_OPT,
         "__metadata__ needs \"step\" as a non-negative integer string", "negative step")
    put(o + "missing_moment.safetensors",
        safetensors([t for t in gopt if t[0] != "model.norm.weight.exp_avg_sq"], {"step": "2"}))
    case("opt_missing_moment", "optimizer", [o + "missing_moment.safetensors" + OST], SFT_OPT,
         "missing tensor 'model.norm.weight.exp_avg_sq'", "one second moment missing")
    t = [list(x) for x in gopt]
    for x in t:
        if x[0] == "model.layers.0.self_attn.q_proj.weight.exp_avg":
            x[3] = x[3][:]
            x[3][3] = float("nan")
    put(o + "nan_moment.safetensors", safetensors(t, {"step": "2"}))
    case("opt_nan_moment", "optimizer", [o + "nan_moment.safetensors" + OST], SFT_OPT,
         "tensor 'model.layers.0.self_attn.q_proj.weight.exp_avg' holds a non-finite value (nan) at element 3",
         "NaN in a first moment")
    t = [list(x) for x in gopt]
    for x in t:
        if x[0] == "lm_head.weight.exp_avg_sq":
            x[3] = x[3][:]
            x[3][10] = -1e-3
    put(o + "negative_second_moment.safetensors", safetensors(t, {"step": "2"}))
    case("opt_negative_second_moment", "optimizer", [o + "negative_second_moment.safetensors" + OST], SFT_OPT,
         "tensor 'lm_head.weight.exp_avg_sq' holds a negative value (-0.001) at element 10",
         "a second moment below zero (sqrt would be NaN)")
    t = [list(x) for x in gopt]
    for x in t:
        if x[0] == "model.norm.weight.exp_avg":
            x[2], x[3] = [2], x[3][:2]
    put(o + "wrong_shape.safetensors", safetensors(t, {"step": "2"}))
    case("opt_wrong_shape", "optimizer", [o + "wrong_shape.safetensors" + OST], SFT_OPT,
         "tensor 'model.norm.weight.exp_avg' has shape (2) but the model configuration needs (4)",
         "moment of the wrong size")
    put(o + "extra.safetensors", safetensors(gopt + [["model.norm.weight.exp_avg_cube", "F32", [1], [0.0]]], {"step": "2"}))
    case("opt_extra_tensor", "optimizer", [o + "extra.safetensors" + OST], SFT_OPT,
         "unexpected tensor 'model.norm.weight.exp_avg_cube'", "a tensor that is no moment")
    put(o + "truncated.safetensors", safetensors(gopt, {"step": "2"})[:-7])
    case("opt_truncated", "optimizer", [o + "truncated.safetensors" + OST, "+manifest"], RESUME,
         "optimizer.safetensors: tensor", "moments cut short, resumed with a matching manifest")
    case("opt_missing_resume", "optimizer", ["!ckpt/optimizer.safetensors", "+manifest"], RESUME,
         "no optimizer state; cannot resume exactly", "--resume-from a checkpoint without optimizer state")
    case("opt_missing_continue", "optimizer", ["!ckpt/optimizer.safetensors"], SFT_OPT,
         "--continue-optimizer: the checkpoint has no optimizer state", "--continue-optimizer without moments")
    case("opt_switch_to_muon", "optimizer", [], RESUME + " --set optim.name=muon",
         "but this run has key 'optim.name' = \"muon\"", "resuming an AdamW checkpoint with Muon")

    # ------------------------------------------------------------------ checkpoint config.json
    c = "ckpt_config/"
    base_cfg = json.load(open(os.path.join(HERE, "valid", "model_config.json")))

    def cfg_case(cid, edit, expected, description, command=GEN, raw=None):
        if raw is None:
            cf = dict(base_cfg)
            edit(cf)
            raw = jdump(cf)
        put(c + cid + ".json", raw)
        case("ckc_" + cid, "ckpt_config", [c + cid + ".json>ckpt/config.json"], command, expected, description)

    cfg_case("bad_json", None, "config.json: invalid JSON", "truncated JSON", raw='{"vocab_size": 264, "hidden')
    cfg_case("not_object", None, "config.json: expected a JSON object", "a JSON array", raw="[264, 8]\n")
    cfg_case("empty", None, "config.json: invalid JSON", "empty file", raw="")
    cfg_case("string_int", lambda j: j.update(hidden_size="8"),
             "config.json: key 'hidden_size': expected an integer, got \"8\"", "a size given as a string")
    cfg_case("float_int", lambda j: j.update(num_hidden_layers=2.5),
             "key 'num_hidden_layers': expected an integer, got 2.5", "fractional layer count", command=INIT_FROM)
    cfg_case("bool_type", lambda j: j.update(norm_topk_prob="yes"),
             "key 'norm_topk_prob': expected true or false", "a string for a boolean")
    cfg_case("unknown_key", lambda j: j.update(hidden_sizes=8),
             "config.json: key 'hidden_sizes': unknown model config key", "misspelt key")
    cfg_case("missing_keys", None,
             "tensor 'model.embed_tokens.weight' has shape (264, 4) but the model configuration needs (264, 256)",
             "only vocab_size: the other keys take their defaults, which do not fit the weights",
             raw='{"vocab_size": 264}\n')
    cfg_case("huge_wraps", lambda j: j.update(hidden_size=4294967304),
             "key 'hidden_size': integer 4294967304 is out of range", "2^32 + 8 (would wrap to 8 in an int)")
    cfg_case("huge_u64", lambda j: j.update(vocab_size=18446744073709551615),
             "key 'vocab_size': integer 18446744073709551615 is out of range", "2^64 - 1", command=INIT_FROM)
    cfg_case("huge_model", lambda j: j.update(hidden_size=1000000000, intermediate_size=16),
             "config.json: the model has", "a valid int hidden size of 10^9 (petabytes of weights)")
    cfg_case("negative_vocab", lambda j: j.update(vocab_size=-5), "key 'vocab_size': must be positive, got -5",
             "negative vocabulary")
    cfg_case("zero_layers", lambda j: j.update(num_hidden_layers=0), "key 'num_hidden_layers': must be positive",
             "no layers")
    cfg_case("heads_kv", lambda j: j.update(num_attention_heads=3, num_key_value_heads=2, head_dim=2),
             "key 'num_key_value_heads': num_attention_heads (3) must be divisible by num_key_value_heads (2)",
             "inconsistent heads")
    cfg_case("topk_gt_experts", lambda j: j.update(num_experts_per_tok=8),
             "key 'num_experts_per_tok': K = 8 exceeds n_routed_experts = 4", "more experts per token than experts",
             command=SFT)
    cfg_case("odd_head_dim", lambda j: j.update(head_dim=3), "key 'head_dim': must be even for RoPE",
             "odd head_dim")
    cfg_case("groups", lambda j: j.update(n_group=3), "key 'n_group': n_routed_experts (4) must be divisible by n_group (3)",
             "expert groups that do not divide the experts")
    cfg_case("bad_scoring", lambda j: j.update(scoring_func="relu"),
             "key 'scoring_func': must be \"softmax\", \"sigmoid\" or \"sqrtsoftplus\"", "unknown scoring function")
    cfg_case("hash_layers_gt_moe", lambda j: j.update(num_hash_layers=2),
             "key 'num_hash_layers': 2 hash-routed layers exceed the 1 MoE layers", "more hash-routed than MoE layers")
    cfg_case("hash_layers_negative", lambda j: j.update(num_hash_layers=-1), "key 'num_hash_layers': must be >= 0",
             "negative hash layer count", command=INIT_FROM)
    cfg_case("swiglu_limit_negative", lambda j: j.update(swiglu_limit=-0.5),
             "key 'swiglu_limit': must be a finite number >= 0", "negative SwiGLU clamp")
    cfg_case("swiglu_limit_string", lambda j: j.update(swiglu_limit="7"),
             "key 'swiglu_limit': expected a number, got \"7\"", "a clamp given as a string", command=SFT)
    # DeepSeek-V4 attention keys (MODEL.md section 12); the base model has H = 2 heads of dim 2.
    v4 = dict(attention_type="v4", q_lora_rank=4, qk_rope_head_dim=2, o_groups=1, o_lora_rank=4)
    cfg_case("attention_type_unknown", lambda j: j.update(attention_type="mla"),
             "key 'attention_type': must be \"llama\" or \"v4\", got \"mla\"", "unknown attention type")
    cfg_case("v4_rope_odd", lambda j: j.update(v4, qk_rope_head_dim=1),
             "key 'qk_rope_head_dim': must be even and in [0, head_dim = 2], got 1", "odd RoPE width")
    cfg_case("v4_rope_gt_head_dim", lambda j: j.update(v4, qk_rope_head_dim=4),
             "key 'qk_rope_head_dim': must be even and in [0, head_dim = 2], got 4", "RoPE wider than the head",
             command=INIT_FROM)
    cfg_case("v4_o_groups", lambda j: j.update(v4, o_groups=3),
             "key 'o_groups': num_attention_heads (2) must be divisible by o_groups (3)",
             "output groups that do not divide the heads")
    cfg_case("v4_q_lora_rank_zero", lambda j: j.update(v4, q_lora_rank=0), "key 'q_lora_rank': must be positive, got 0",
             "no q rank", command=SFT)
    cfg_case("v4_o_lora_rank_negative", lambda j: j.update(v4, o_lora_rank=-4),
             "key 'o_lora_rank': must be positive, got -4", "negative output rank")
    cfg_case("sliding_window_negative", lambda j: j.update(v4, sliding_window=-1),
             "key 'sliding_window': must be >= 0", "negative sliding window")
    cfg_case("sliding_window_llama", lambda j: j.update(sliding_window=8),
             "key 'sliding_window': applies to attention_type \"v4\" only", "a window for the default attention")
    cfg_case("v4_on_llama_weights", lambda j: j.update(v4),
             "model.safetensors: missing tensor 'model.layers.0.self_attn.q_a_proj.weight' (expected shape (4, 4))",
             "a valid V4-attention config over weights of the default attention", command=INIT_FROM)
    # mHC and MTP keys (MODEL.md section 12).
    cfg_case("hc_mult_zero", lambda j: j.update(hc_mult=0),
             "key 'hc_mult': must be >= 1 (1 = no hyper-connections), got 0", "no residual stream")
    cfg_case("hc_sinkhorn_iters_zero", lambda j: j.update(hc_mult=2, hc_sinkhorn_iters=0),
             "key 'hc_sinkhorn_iters': must be >= 1, got 0", "no Sinkhorn round", command=SFT)
    cfg_case("hc_eps_negative", lambda j: j.update(hc_mult=2, hc_eps=-1e-6),
             "key 'hc_eps': must be a finite number >= 0", "negative mHC epsilon", command=INIT_FROM)
    cfg_case("mtp_two_layers", lambda j: j.update(num_nextn_predict_layers=2),
             "key 'num_nextn_predict_layers': must be 0 or 1 (one MTP block), got 2", "two MTP blocks")
    cfg_case("mtp_loss_weight_negative", lambda j: j.update(num_nextn_predict_layers=1, mtp_loss_weight=-0.3),
             "key 'mtp_loss_weight': must be a finite number >= 0", "negative MTP loss weight", command=INIT_FROM)
    cfg_case("hc_on_plain_weights", lambda j: j.update(hc_mult=2),
             "model.safetensors: missing tensor 'model.layers.0.attn_hc.fn'",
             "a valid mHC config over weights without hyper-connections", command=INIT_FROM)
    cfg_case("dense_gt_layers", lambda j: j.update(first_k_dense_replace=3),
             "key 'first_k_dense_replace': must be in [0, num_hidden_layers]", "more dense layers than layers")
    cfg_case("shape_mismatch", lambda j: j.update(hidden_size=16),
             "has shape (264, 4) but the model configuration needs (264, 16)",
             "a valid config that does not match the weights", command=INIT_FROM)
    cfg_case("duplicate_key", None, "config.json: invalid JSON: duplicate key 'hidden_size'",
             "hidden_size given twice (nlohmann would keep the last)",
             raw=jdump(base_cfg)[:-2] + ',\n "hidden_size": 16\n}\n')
    cfg_case("negative_eps", lambda j: j.update(rms_norm_eps=-1e-6), "key 'rms_norm_eps': must be positive",
             "negative epsilon")
    cfg_case("overflow_float", None, "config.json: invalid JSON: [json.exception.out_of_range.406] number overflow", "rope_theta 1e999 (beyond double)",
             raw=jdump(base_cfg)[:-2] + ',\n "rope_theta": 1e999\n}\n')
    case("ckc_missing", "ckpt_config", ["!ckpt/config.json"], GEN, "config.json: missing",
         "checkpoint without config.json")

    # ------------------------------------------------------------------ hash-routing tables (tid2eid)
    # The checkpoint with MoE layer 1 hash-routed (MODEL.md section 12): no bias, an I32
    # (V, K) table whose rows hold K distinct experts in [0, E).
    hash_cfg = dict(base_cfg, num_hash_layers=1)
    put(c + "hash_config.json", jdump(hash_cfg))
    table_name = "model.layers.1.mlp.gate.tid2eid"
    bias1 = "model.layers.1.mlp.gate.e_score_correction_bias"
    K = base_cfg["num_experts_per_tok"]

    def table_rows():
        return [[(v + k) % E for k in range(K)] for v in range(V)]

    def hash_model(rows=None, dtype="I32", shape=None):
        rows = table_rows() if rows is None else rows
        flat = [x for r in rows for x in r]
        out = []
        for t in good:
            if t[0] == bias1:
                out.append([table_name, dtype, shape or [V, K], [float(x) for x in flat] if dtype == "F32" else flat])
            else:
                out.append(list(t))
        return safetensors(out, {"format": "pt"})

    HCFG = c + "hash_config.json>ckpt/config.json"

    def hash_case(cid, model_bytes, expected, description, with_config=True, command=GEN):
        f = put(d + "hash_" + cid + ".safetensors", model_bytes)
        files = ([HCFG] if with_config else []) + [f + MST, "+manifest"]
        case("tid2eid_" + cid, "safetensors", files, command, expected, description)

    rows = table_rows()
    rows[7] = [3, 3]
    hash_case("repeat", hash_model(rows), "tensor '" + table_name + "': row 7 (token 7) names expert 3 twice",
              "a token's row repeats an expert")
    rows = table_rows()
    rows[5] = [1, 4]
    hash_case("out_of_range", hash_model(rows),
              "tensor '" + table_name + "': row 5 (token 5) holds expert 4, outside [0, n_routed_experts = 4)",
              "an expert id >= E", command=INIT_FROM)
    rows = table_rows()
    rows[0] = [-1, 0]
    hash_case("negative", hash_model(rows), "row 0 (token 0) holds expert -1", "a negative expert id",
              command=SFT)
    wide = [[(v + k) % E for k in range(K + 1)] for v in range(V)]
    hash_case("shape", hash_model(wide, shape=[V, K + 1]),
              "tensor '" + table_name + "' has shape (264, 3) but the model configuration needs (264, 2)",
              "a table of K + 1 columns")
    hash_case("flat", hash_model(shape=[V * K]),
              "tensor '" + table_name + "' has shape (528) but the model configuration needs (264, 2)",
              "the table flattened to one dimension")
    hash_case("f32", hash_model(dtype="F32"),
              "tensor '" + table_name + "' has dtype F32; the hash-routing table must be I32", "a float table")
    hash_case("i64", hash_model(dtype="I64"),
              "tensor '" + table_name + "' has dtype I64; the hash-routing table must be I32",
              "an int64 table (not converted)")
    hash_case("missing", good_bytes, "missing tensor '" + table_name + "' (expected shape (264, 2))",
              "a hash-routed config over weights that have the bias instead")
    hash_case("without_config", hash_model(), "missing tensor '" + bias1 + "'",
              "a table in the weights but no hash-routed layer in config.json", with_config=False)
    both = [list(t) for t in good] + [[table_name, "I32", [V, K], [x for r in table_rows() for x in r]]]
    hash_case("and_bias", safetensors(both, {"format": "pt"}), "unexpected tensor '" + bias1 + "'",
              "a hash-routed layer that also has a bias")

    # ------------------------------------------------------------------ trainer_state.json (resume)
    s = "trainer_state/"

    def ts_case(cid, raw, expected, description):
        put(s + cid + ".json", raw)
        case("ts_" + cid, "trainer_state", [s + cid + ".json>ckpt/trainer_state.json", "+manifest"], RESUME, expected,
             description)

    ts_case("bad_json", '{"step": 2, "data": {', "trainer_state.json: invalid JSON", "truncated JSON")
    ts_case("not_object", "[2]\n", "trainer_state.json: expected a JSON object", "an array")
    ts_case("missing_data", '{"step": 2}\n', "trainer_state.json: needs \"step\" and \"data\"", "no data position")
    ts_case("step_string", '{"step": "2", "data": {"epoch": 0, "row": 4}}\n',
            "trainer_state.json: key 'step': expected a non-negative integer", "step as a string")
    ts_case("step_negative", '{"step": -4, "data": {"epoch": 0, "row": 4}}\n',
            "trainer_state.json: key 'step': expected a non-negative integer, got -4", "negative step")
    ts_case("data_no_epoch", '{"step": 2, "data": {"row": 4}}\n',
            "trainer_state.json: key 'data.epoch'", "data position without epoch")
    ts_case("row_negative", '{"step": 2, "data": {"epoch": 0, "row": -1}}\n',
            "trainer_state.json: key 'data.row': expected a non-negative integer, got -1", "negative row")
    ts_case("data_not_object", '{"step": 2, "data": [0, 4]}\n',
            "trainer_state.json: key 'data'", "data position as an array")
    case("ts_auto_resume_keeps_out", "trainer_state",
         ["@ckpt>out/step-00000002", s + "row_negative.json>out/step-00000002/trainer_state.json",
          "+manifest:out/step-00000002", "valid/tokens.jsonl>out/metrics.jsonl"],
         "{moetune} train --config {work}/run.json --out {work}/out --auto-resume --set train.steps=3 --peak-gflops 1 "
         "--quiet", "trainer_state.json: key 'data.row': expected a non-negative integer, got -1",
         "--auto-resume into a run directory: its checkpoint and metrics.jsonl stay untouched")
    ts_case("duplicate_key", '{"step": 2, "step": 7, "data": {"epoch": 0, "row": 4}}\n',
            "trainer_state.json: invalid JSON: duplicate key 'step'", "step given twice")

    # ------------------------------------------------------------------ manifest.json (resume)
    m = "manifest/"
    cfg_text = jdump(base_cfg)  # the config.json the manifest cases put in place (valid, known size)

    def mf_case(cid, obj_or_raw, expected, description, extra=()):
        raw = obj_or_raw if isinstance(obj_or_raw, str) else jdump(obj_or_raw)
        put(m + cid + ".json", raw)
        case("mf_" + cid, "manifest", list(extra) + [m + cid + ".json>ckpt/manifest.json"], RESUME, expected,
             description)

    put(m + "config.json", cfg_text)
    cfg_over = m + "config.json>ckpt/config.json"
    mf_case("bad_json", '{"format": "moetune-checkpoint-manifest-1", "files": {', "manifest.json: invalid JSON",
            "truncated JSON")
    mf_case("no_files", {"format": "moetune-checkpoint-manifest-1"}, "manifest.json: expected an object with \"files\"",
            "no files object")
    mf_case("hash_mismatch", {"format": "moetune-checkpoint-manifest-1",
                              "files": {"config.json": {"bytes": len(cfg_text), "sha256": "0" * 64}}},
            "config.json: SHA-256 differs from the manifest", "right size, wrong hash", extra=[cfg_over])
    mf_case("size_mismatch", {"format": "moetune-checkpoint-manifest-1",
                              "files": {"config.json": {"bytes": 1, "sha256": "0" * 64}}},
            "config.json: size %d differs from the manifest's 1" % len(cfg_text), "wrong size", extra=[cfg_over])
    mf_case("missing_file", {"format": "moetune-checkpoint-manifest-1",
                             "files": {"model-extra.safetensors": {"bytes": 1, "sha256": "0" * 64}}},
            "model-extra.safetensors: listed in the manifest but missing", "lists a file that is not there")
    mf_case("missing_entry", {"format": "moetune-checkpoint-manifest-1", "files": {}},
            ": not listed in the manifest", "an empty file list (every file unlisted)")
    mf_case("bytes_string", {"format": "moetune-checkpoint-manifest-1",
                             "files": {"config.json": {"bytes": "12", "sha256": "0" * 64}}},
            "manifest.json: entry 'config.json': 'bytes' must be a non-negative integer", "size as a string",
            extra=[cfg_over])
    mf_case("sha_number", {"format": "moetune-checkpoint-manifest-1",
                           "files": {"config.json": {"bytes": len(cfg_text), "sha256": 0}}},
            "manifest.json: entry 'config.json': 'sha256' must be a string", "hash as a number", extra=[cfg_over])
    mf_case("entry_not_object", {"format": "moetune-checkpoint-manifest-1", "files": {"config.json": 5}},
            "manifest.json: entry 'config.json' needs bytes and sha256", "entry is a number")
    mf_case("path_escape", {"format": "moetune-checkpoint-manifest-1",
                            "files": {"../run.json": {"bytes": 1, "sha256": "0" * 64}}},
            "manifest.json: entry '../run.json' is not a file of the checkpoint directory", "a path outside the checkpoint")
    mf_case("not_object", "[]\n", "manifest.json: expected an object with \"files\"", "an array")
    case("mf_missing", "manifest", ["!ckpt/manifest.json"], RESUME, "manifest.json: missing",
         "--resume-from a checkpoint without manifest")

    # ------------------------------------------------------------------ model.safetensors.index.json (shards)
    x = "index/"
    names = [n for n, _ in layout()]
    half = len(good) // 2
    put(x + "model-00001-of-00002.safetensors", safetensors(good[:half], {"format": "pt"}))
    put(x + "model-00002-of-00002.safetensors", safetensors(good[half:], {"format": "pt"}))
    shards = [x + "model-00001-of-00002.safetensors>ckpt/model-00001-of-00002.safetensors",
              x + "model-00002-of-00002.safetensors>ckpt/model-00002-of-00002.safetensors"]
    wmap = {n: ("model-00001-of-00002.safetensors" if i < half else "model-00002-of-00002.safetensors")
            for i, n in enumerate(names)}

    def ix_case(cid, obj_or_raw, expected, description, with_shards=True, keep_single=False, command=GEN):
        raw = obj_or_raw if isinstance(obj_or_raw, str) else jdump(obj_or_raw)
        put(x + cid + ".json", raw)
        files = ([] if keep_single else ["!ckpt/model.safetensors"]) + (shards if with_shards else [])
        case("ix_" + cid, "index", files + [x + cid + ".json>ckpt/model.safetensors.index.json"], command, expected,
             description)

    ix_case("bad_json", '{"weight_map": {"lm_head.weight": ', "model.safetensors.index.json: invalid JSON",
            "truncated JSON")
    ix_case("no_weight_map", {"metadata": {}}, "expected a JSON object with a \"weight_map\" object",
            "no weight_map")
    ix_case("missing_shard", {"metadata": {}, "weight_map": wmap},
            "model-00001-of-00002.safetensors: cannot open safetensors file", "points to shards that are not there",
            with_shards=False)
    wrong = dict(wmap)
    wrong["lm_head.weight"] = "model-00001-of-00002.safetensors"
    ix_case("wrong_shard", {"metadata": {}, "weight_map": wrong},
            "weight_map puts tensor 'lm_head.weight' in", "a tensor mapped to the shard that does not hold it",
            command=INIT_FROM)
    ix_case("both", {"metadata": {}, "weight_map": wmap},
            "both model.safetensors and model.safetensors.index.json exist", "single file and index side by side",
            keep_single=True)
    esc = dict(wmap)
    esc["lm_head.weight"] = "../model-00002-of-00002.safetensors"
    ix_case("path_escape", {"metadata": {}, "weight_map": esc},
            "weight_map entry 'lm_head.weight' names '../model-00002-of-00002.safetensors', not a file of the checkpoint",
            "a shard outside the checkpoint directory")
    nonstr = dict(wmap)
    nonstr["lm_head.weight"] = 2
    ix_case("entry_number", {"metadata": {}, "weight_map": nonstr}, "weight_map entry 'lm_head.weight' is not a string",
            "shard given as a number")
    ix_case("empty_map", {"metadata": {}, "weight_map": {}}, "model.safetensors.index.json: empty weight_map",
            "empty weight_map")
    unl = dict(wmap)
    del unl["lm_head.weight"]
    ix_case("unlisted", {"metadata": {}, "weight_map": unl}, "tensor 'lm_head.weight' is not listed in",
            "a shard holds a tensor that the index omits")
    put(x + "model-00003-of-00003.safetensors", safetensors([good[0]], {"format": "pt"}))
    three = dict(wmap)
    three["extra.weight"] = "model-00003-of-00003.safetensors"
    put(x + "twice.json", jdump({"metadata": {}, "weight_map": three}))
    case("ix_tensor_twice", "index", ["!ckpt/model.safetensors"] + shards +
         [x + "model-00003-of-00003.safetensors>ckpt/model-00003-of-00003.safetensors",
          x + "twice.json>ckpt/model.safetensors.index.json"], GEN,
         "tensor 'model.embed_tokens.weight' also appears in", "one tensor in two shards")

    # ------------------------------------------------------------------ run configs (--config, --set)
    r = "run_config/"
    base_run = json.load(open(os.path.join(HERE, "valid", "run.json")))

    def rc_case(cid, edit, expected, description, raw=None, command=TRAIN):
        if raw is None:
            j = json.loads(json.dumps(base_run))
            edit(j)
            raw = jdump(j)
        put(r + cid + ".json", raw)
        case("rc_" + cid, "run_config", [r + cid + ".json", "valid/tokens.jsonl"], command, expected, description)

    rc_case("bad_json", None, "bad_json.json: invalid JSON", "missing closing braces", raw='{"train": {"steps": 2')
    rc_case("empty", None, "empty.json: invalid JSON", "empty file", raw="")
    rc_case("not_object", None, "not_object.json: expected a JSON object with sections", "a JSON string",
            raw='"train"\n')
    rc_case("unknown_section", lambda j: j.update(trian={"steps": 2}),
            "key 'trian': unknown section", "misspelt section")
    rc_case("unknown_key", lambda j: j["train"].update(stepz=2),
            "key 'train.stepz': unknown key in section 'train'", "misspelt key")
    rc_case("section_number", lambda j: j.update(optim=5), "key 'optim': expected a JSON object, got 5",
            "section that is a number")
    rc_case("string_int", lambda j: j["train"].update(steps="2"), "key 'train.steps': expected an integer, got \"2\"",
            "steps as a string")
    rc_case("float_int", lambda j: j["train"].update(micro_batch_size=2.5),
            "key 'train.micro_batch_size': expected an integer, got 2.5", "fractional batch size")
    rc_case("negative_steps", lambda j: j["train"].update(steps=-1), "key 'train.steps': must be positive, got -1",
            "negative steps")
    rc_case("huge_int", lambda j: j["train"].update(micro_batch_size=99999999999),
            "key 'train.micro_batch_size': integer 99999999999 is too large", "beyond int")
    rc_case("huge_seed", lambda j: j["train"].update(seed=-5), "key 'train.seed': expected a non-negative integer",
            "negative seed")
    rc_case("bool_string", lambda j: j["data"].update(packing="true"), "key 'data.packing': expected true or false",
            "boolean as a string")
    rc_case("bad_enum", lambda j: j["data"].update(format="csv"), "key 'data.format': must be one of",
            "unknown data format")
    rc_case("model_key", lambda j: j["model"].update(hidden_size="x"),
            "key 'model.hidden_size': expected an integer", "bad model key inside a run config")
    rc_case("model_huge", lambda j: j["model"].update(num_hidden_layers=2147483648),
            "key 'model.num_hidden_layers': integer 2147483648 is out of range", "2^31 layers (wraps negative)")
    rc_case("seq_len", lambda j: j["data"].update(seq_len=128),
            "key 'data.seq_len': must be <= model.max_position_embeddings (64), got 128", "rows longer than positions")
    rc_case("pad_id", lambda j: j["data"].update(pad_id=264), "key 'data.pad_id': must be < model.vocab_size (264)",
            "pad id outside the vocabulary")
    rc_case("warmup", lambda j: j["optim"].update(warmup_steps=10), "key 'optim.warmup_steps': must be <= train.steps",
            "warmup longer than the run")
    rc_case("beta", lambda j: j["optim"].update(beta2=1.0), "key 'optim.beta2': must be in [0, 1)", "beta2 = 1")
    rc_case("ep_three", lambda j: j.update(parallel={"ep": 3}), "parallel.ep",
            "expert parallel group of 3 with 1 rank and 4 experts")
    rc_case("ep_two", lambda j: j.update(parallel={"ep": 2}), "parallel.ep", "ep = 2 with one rank")
    rc_case("zero_stage", lambda j: j.update(parallel={"zero_stage": 2}), "key 'parallel.zero_stage': must be 0 or 1",
            "ZeRO stage 2")
    rc_case("global_batch", lambda j: j["train"].update(global_batch_size=3),
            "key 'train.global_batch_size': 3 rows must be a multiple of train.micro_batch_size (2)",
            "global batch not a multiple of the micro-batch")
    rc_case("overlong_skip", lambda j: j["data"].update(overlong="skip"), "key 'data.overlong': \"skip\" applies",
            "skip policy for token data")
    rc_case("no_data", lambda j: j["data"].pop("train"), "key 'data.train': no training data",
            "a run config without training data")
    rc_case("missing_data", lambda j: j["data"].update(train="nope.jsonl"), "nope.jsonl: cannot open file",
            "training data file that does not exist")
    rc_case("duplicate_key", None, "invalid JSON: duplicate key 'train.steps'",
            "train.steps given twice (nlohmann would keep the last)",
            raw='{"model": %s, "data": {"train": "tokens.jsonl", "seq_len": 16},\n "train": {"steps": 2, "steps": 9}}\n'
            % json.dumps(base_run["model"]))
    rc_case("duplicate_section", None, "invalid JSON: duplicate key 'train'", "section given twice",
            raw='{"train": {"steps": 2}, "train": {"steps": 3}}\n')
    rc_case("deep_nesting", None, "nested deeper than", "train.steps nested 30000 arrays deep",
            raw='{"train": {"steps": ' + "[" * 30000 + "]" * 30000 + "}}\n")
    rc_case("deep_objects", None, "nested deeper than", "10000 nested objects",
            raw='{"train": ' + '{"a":' * 10000 + "1" + "}" * 10000 + "}\n")
    put(r + "non_utf8.json", b'{"data": {"train": "caf\xe9.jsonl"}}\n')
    case("rc_non_utf8", "run_config", [r + "non_utf8.json"], TRAIN, "non_utf8.json: invalid JSON",
         "a Latin-1 byte inside a string")
    rc_case("lr_overflow", None, "lr_overflow.json: invalid JSON: [json.exception.out_of_range.406] number overflow", "lr = 1e999 (beyond double)",
            raw='{"optim": {"lr": 1e999}}\n')
    rc_case("init_bad_model", lambda j: j["model"].update(n_routed_experts=0),
            "key 'model.n_routed_experts': must be positive", "init with a run config of zero experts",
            command="{moetune} init --config {case} --out {work}/newckpt")
    put(r + "model_only_bad.json", jdump(dict(base_cfg, moe_intermediate_size=-8)))
    case("rc_init_model_config", "run_config", [r + "model_only_bad.json"],
         "{moetune} init --config {case} --out {work}/newckpt",
         "model_only_bad.json: key 'moe_intermediate_size': must be positive", "init with a bare model config")
    case("rc_init_existing_dir", "run_config", ["valid/text.txt>notckpt/keep.txt"],
         "{moetune} init --config {work}/model_config.json --out {work}/notckpt",
         "notckpt: exists and is not a moetune checkpoint", "init over a directory that is not a checkpoint")
    rc_case("sft_config_bad", lambda j: j["train"].update(steps=0), "key 'train.steps': must be positive",
            "sft --config with zero steps", command=SFT.replace("--set train.steps=1", "--config {case}"))
    rc_case("rl_config_bad", lambda j: j.update(rl={"num_generations": 0}), "key 'rl.num_generations': must be positive",
            "rl --config with no generations",
            command="{moetune} rl --init-from {ckpt} --prompts {work}/prompts.jsonl --out {work}/out --config {case}")

    MPI2 = ("mpirun -np 2 --oversubscribe {moetune} train --config {work}/run.json --out {work}/out --peak-gflops 1 "
            "--quiet")
    case("mpi_ep_not_dividing", "run_config", [], MPI2 + " --set parallel.ep=3", "parallel.ep",
         "2 ranks, expert-parallel group of 3")
    case("mpi_ranks_gt_micro_batches", "run_config", [], MPI2 + " --set train.global_batch_size=2",
         "key 'train.global_batch_size'", "2 ranks but one micro-batch per step")

    def set_case(cid, sets, expected, description, command=None):
        cmd = (command or "{moetune} train --config {work}/run.json --out {work}/out --peak-gflops 1 --quiet") + "".join(
            " --set " + s for s in sets)
        case("set_" + cid, "run_config", [], cmd, expected, description)

    set_case("no_equals", ["train.steps"], "--set train.steps: expected <section>.<key>=<value>", "no '='")
    set_case("no_dot", ["steps=3"], "key 'steps': expected <section>.<key>", "no section")
    set_case("unknown_section", ["foo.bar=1"], "key 'foo.bar': unknown section 'foo'", "unknown section")
    set_case("unknown_key", ["train.nope=1"], "key 'train.nope': unknown key in section 'train'", "unknown key")
    set_case("wrong_type", ["train.steps=abc"], "key 'train.steps': expected an integer, got \"abc\"", "a word for an int")
    set_case("huge", ["train.micro_batch_size=99999999999"], "key 'train.micro_batch_size': integer 99999999999 is too large",
             "beyond int")
    set_case("model_k", ["model.num_experts_per_tok=9"], "key 'model.num_experts_per_tok': K = 9 exceeds", "K > E")
    set_case("model_wraps", ["model.hidden_size=4294967304"], "key 'model.hidden_size': integer 4294967304 is out of range",
             "2^32 + 8")
    set_case("ep", ["parallel.ep=2"], "parallel.ep", "ep = 2 with one rank")
    set_case("lr_nan", ["optim.lr=NaN"], "key 'optim.lr': expected a number", "NaN is not JSON")
    set_case("optim_name", ["optim.name=lion"], "key 'optim.name': must be one of \"adamw\", \"muon\", got \"lion\"",
             "an optimizer moetune does not have")
    set_case("muon_momentum", ["optim.name=muon", "optim.muon_momentum=1"],
             "key 'optim.muon_momentum': must be in [0, 1), got 1", "Muon momentum 1 (M would never decay)")
    set_case("init_model", ["model.hidden_size=-8"], "key 'hidden_size': must be positive", "init --set",
             command="{moetune} init --config {work}/model_config.json --out {work}/newckpt")

    # ------------------------------------------------------------------ token JSONL (train)
    t = "tokens_jsonl/"
    ok = '{"input_ids": [1, 2, 3]}\n'

    def tj_case(cid, raw, expected, description):
        put(t + cid + ".jsonl", raw)
        case("tj_" + cid, "tokens_jsonl", [t + cid + ".jsonl"], TRAIN_DATA, expected, description)

    tj_case("bad_json", ok * 2 + '{"input_ids": [1, 2\n', "bad_json.jsonl:3: invalid JSON", "truncated line 3")
    tj_case("out_of_vocab", ok + '{"input_ids": [5, 264]}\n',
            "out_of_vocab.jsonl:2: token id 264 at input_ids[1] is outside the vocabulary [0, 264)", "id = vocab_size")
    tj_case("negative", '{"input_ids": [-1]}\n', "negative.jsonl:1: token id -1 at input_ids[0]", "negative id")
    tj_case("huge_id", '{"input_ids": [18446744073709551615]}\n', "huge_id.jsonl:1: token id 18446744073709551615",
            "2^64 - 1")
    tj_case("empty_row", ok + '{"input_ids": []}\n', "empty_row.jsonl:2: 'input_ids' is empty", "no tokens")
    tj_case("float", '{"input_ids": [1, 2.5]}\n', "float.jsonl:1: input_ids[1] must be an integer, got 2.5",
            "fractional id")
    tj_case("string", '{"input_ids": ["7"]}\n', "string.jsonl:1: input_ids[0] must be an integer", "id as a string")
    tj_case("not_array", '{"input_ids": 7}\n', "not_array.jsonl:1: 'input_ids' must be an array", "scalar ids")
    tj_case("not_object", "[1, 2, 3]\n", "not_object.jsonl:1: expected a JSON object", "bare array")
    tj_case("unknown_key", '{"input_ids": [1], "text": "a"}\n', "unknown_key.jsonl:1: unknown key 'text'",
            "extra key")
    tj_case("missing_ids", '{"labels": [1]}\n', "missing_ids.jsonl:1: missing key 'input_ids'", "labels only")
    tj_case("labels_length", '{"input_ids": [1, 2], "labels": [1]}\n', "labels_length.jsonl:1: 'labels' has 1 elements",
            "labels shorter than ids")
    tj_case("bad_label", '{"input_ids": [1, 2], "labels": [1, -5]}\n', "bad_label.jsonl:1: label -5 at labels[1]",
            "label neither an id nor -100")
    tj_case("empty_file", "", "empty_file.jsonl: no documents", "empty file")
    tj_case("blank_lines", "\n   \n\t\n", "blank_lines.jsonl: no documents", "only blank lines")
    tj_case("duplicate_key", '{"input_ids": [1], "input_ids": [2]}\n',
            "duplicate_key.jsonl:1: invalid JSON: duplicate key 'input_ids'", "input_ids twice")
    tj_case("deep", '{"input_ids": ' + "[" * 30000 + "]" * 30000 + "}\n", "deep.jsonl:1: invalid JSON: nested deeper than",
            "ids nested 30000 arrays deep")
    put(t + "non_utf8.jsonl", ok.encode() + b'{"input_ids": [1], "\xc3\x28": 1}\n')
    case("tj_non_utf8", "tokens_jsonl", [t + "non_utf8.jsonl"], TRAIN_DATA, "non_utf8.jsonl:2: invalid JSON",
         "invalid UTF-8 in a key")
    rng = random.Random(3)
    huge = [rng.randrange(264) for _ in range(20000)] + [999]
    tj_case("huge_line", ok + json.dumps({"input_ids": huge}, separators=(",", ":")) + "\n",
            "huge_line.jsonl:2: token id 999 at input_ids[20000]", "a 75 KB line whose last id is out of range")

    # ------------------------------------------------------------------ SFT JSONL
    f = "sft_jsonl/"
    good_chat = '{"messages": [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}]}\n'

    def sft_case(cid, raw, expected, description, command=SFT_DATA):
        put(f + cid + ".jsonl", raw)
        case("sft_" + cid, "sft_jsonl", [f + cid + ".jsonl"], command, expected, description)

    sft_case("bad_role", good_chat + '{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}\n',
             "bad_role.jsonl:2: unknown role 'robot' in messages[0]", "role that is not system/user/assistant")
    sft_case("missing_content", '{"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]}\n',
             "missing_content.jsonl:1: missing key 'content' in messages[0]", "message without content")
    sft_case("content_number", '{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]}\n',
             "content_number.jsonl:1: 'content' in messages[0] must be a string, got number 5", "content is a number")
    sft_case("role_null", '{"messages": [{"role": null, "content": "x"}]}\n',
             "role_null.jsonl:1: 'role' in messages[0] must be a string, got null", "role is null")
    put(f + "non_utf8.jsonl", good_chat.encode() +
        b'{"messages": [{"role": "user", "content": "caf\xe9"}, {"role": "assistant", "content": "y"}]}\n')
    case("sft_non_utf8", "sft_jsonl", [f + "non_utf8.jsonl"], SFT_DATA,
         "non_utf8.jsonl:2: not valid UTF-8 (byte 0xE9 at column 47)", "a Latin-1 byte in the content")
    sft_case("completion_number", '{"prompt": "1+1=", "completion": 2}\n',
             "completion_number.jsonl:1: 'completion' must be a string, got number 2", "completion as a number")
    sft_case("missing_completion", '{"prompt": "1+1="}\n', "missing_completion.jsonl:1: missing key 'completion'",
             "prompt without completion")
    sft_case("prompt_array", '{"prompt": ["1+1="], "completion": "2"}\n',
             "prompt_array.jsonl:1: 'prompt' must be a string, got array", "prompt as an array")
    sft_case("messages_object", '{"messages": {"role": "user"}}\n',
             "messages_object.jsonl:1: 'messages' must be an array", "messages is an object")
    sft_case("message_string", '{"messages": ["hello"]}\n', "message_string.jsonl:1: messages[0] must be an object",
             "message is a string")
    sft_case("no_assistant", '{"messages": [{"role": "user", "content": "x"}]}\n',
             "no_assistant.jsonl:1: no assistant message", "nothing to train on")
    sft_case("empty_messages", '{"messages": []}\n', "empty_messages.jsonl:1: 'messages' is empty", "no turns")
    sft_case("mixed", '{"messages": [], "prompt": "x", "completion": "y"}\n',
             "mixed.jsonl:1: keys of two formats in one sample", "chat and prompt-completion keys together")
    sft_case("unknown_key", '{"messages": [{"role": "user", "content": "x", "name": "bob"}]}\n',
             "unknown_key.jsonl:1: unknown key 'name' in messages[0]", "extra message key")
    sft_case("empty_object", good_chat + "{}\n", "empty_object.jsonl:2: empty object", "{} sample")
    sft_case("bad_json", good_chat + '{"messages": [\n', "bad_json.jsonl:2: invalid JSON", "truncated JSON")
    sft_case("ids_out_of_vocab", '{"input_ids": [1, 300]}\n', "ids_out_of_vocab.jsonl:1: token id 300 at input_ids[1]",
             "pre-tokenized ids beyond the vocabulary")
    sft_case("empty_file", "", "empty_file.jsonl: no samples", "empty file")
    sft_case("overlong_error", '{"prompt": "%s", "completion": "y"}\n' % ("x" * 100),
             "overlong_error.jsonl:1: sample has", "a sample longer than seq_len with data.overlong = error",
             command=SFT_DATA + " --set data.overlong=error")
    sft_case("duplicate_key", '{"prompt": "a", "prompt": "b", "completion": "c"}\n',
             "duplicate_key.jsonl:1: invalid JSON: duplicate key 'prompt'", "prompt given twice")
    sft_case("valid_file_bad", '{"prompt": "1+1=", "completion": null}\n',
             "valid_file_bad.jsonl:1: 'completion' must be a string, got null", "a bad --valid file",
             command="{moetune} sft --init-from {ckpt} --data {work}/sft.jsonl --valid {case} --out {work}/out "
                     "--set train.steps=1 --peak-gflops 1 --quiet")

    # ------------------------------------------------------------------ RL / generate / eval prompts
    p = "prompts/"

    def rl_case(cid, raw, expected, description, command=RL, ext=".jsonl"):
        put(p + cid + ext, raw)
        case("pr_" + cid, "prompts", [p + cid + ext], command, expected, description)

    rl_case("missing_prompt", '{"answer": "2"}\n', "missing_prompt.jsonl:1: no prompt", "answer only")
    rl_case("missing_answer", '{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2="}\n',
            "missing_answer.jsonl:2: missing key 'answer'", "the math reward needs an answer")
    rl_case("prompt_number", '{"prompt": 5, "answer": "5"}\n', "prompt_number.jsonl:1: 'prompt' must be a string",
            "prompt as a number")
    rl_case("answer_null", '{"prompt": "x", "answer": null}\n', "answer_null.jsonl:1: 'answer' is null", "null answer")
    rl_case("answer_array", '{"prompt": "x", "answer": [2]}\n',
            "answer_array.jsonl:1: 'answer' must be a string or a number, got array", "answer as an array")
    rl_case("answer_empty", '{"prompt": "x", "answer": ""}\n', "answer_empty.jsonl:1: 'answer' is empty", "empty answer")
    rl_case("two_prompts", '{"prompt": "x", "question": "y", "answer": "1"}\n',
            "two_prompts.jsonl:1: several prompts in one row", "prompt and question")
    rl_case("last_assistant", '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "1"}], '
            '"answer": "1"}\n', "last_assistant.jsonl:1: the last turn of 'messages' is the assistant's",
            "chat prompt that ends with the answer")
    rl_case("bad_role", '{"messages": [{"role": "tool", "content": "x"}], "answer": "1"}\n',
            "bad_role.jsonl:1: unknown role 'tool'", "unknown role")
    put(p + "non_utf8.jsonl", b'{"prompt": "\xff\xfe", "answer": "1"}\n')
    case("pr_non_utf8", "prompts", [p + "non_utf8.jsonl"], RL, "non_utf8.jsonl:1: not valid UTF-8 (byte 0xFF",
         "invalid UTF-8 in the prompt")
    rl_case("bad_json", '{"prompt": "x", "answer": 1\n', "bad_json.jsonl:1: invalid JSON", "unclosed object")
    rl_case("empty_file", "", "empty_file.jsonl: no prompts", "empty prompt file")
    rl_case("plain_text", "What is 1+1?\nWhat is 2+2?\n", "plain_text.txt: a plain-text prompt file has no answers",
            "a plain-text prompt list for rl with the math reward", ext=".txt")
    rl_case("valid_prompts_bad", '{"question": 7, "answer": "7"}\n',
            "valid_prompts_bad.jsonl:1: 'question' must be a string", "bad --valid-prompts",
            command="{moetune} rl --init-from {ckpt} --prompts {work}/prompts.jsonl --valid-prompts {case} --out {work}/out "
                    "--set rl.prompts_per_step=2 --set rl.num_generations=2 --set train.steps=1 --peak-gflops 1 --quiet")
    rl_case("generate_bad", '{"prompt": "x"}\n{"promt": "y"}\n', "generate_bad.jsonl:2: no prompt",
            "generate: a row with a misspelt key",
            command="{moetune} generate --ckpt {ckpt} --prompts {case} --out {work}/out.jsonl --quiet")
    rl_case("eval_no_answer", '{"prompt": "1+1="}\n', "eval_no_answer.jsonl:1: missing key 'answer'",
            "eval with the math reward and no answers",
            command="{moetune} eval --ckpt {ckpt} --prompts {case}")
    rl_case("generate_keeps_out", '{"prompt": 1}\n', "generate_keeps_out.jsonl:1: 'prompt' must be a string",
            "bad prompts leave an existing --out file untouched",
            command="{moetune} generate --ckpt {ckpt} --prompts {case} --out {work}/tokens.jsonl --quiet")

    # ------------------------------------------------------------------ text corpus (data prepare, tokenizer train)
    q = "text_corpus/"
    PREP = "{moetune} data prepare --input {case} --out {work}/out.bin --quiet"

    def tc_case(cid, raw, expected, description, ext=".jsonl", command=PREP):
        put(q + cid + ext, raw)
        case("tc_" + cid, "text_corpus", [q + cid + ext], command, expected, description)

    tc_case("non_utf8", b"good line\nbad \xff line\n", "non_utf8.txt:2: not valid UTF-8", "a stray 0xFF byte",
            ext=".txt")
    tc_case("missing_key", '{"text": "a"}\n{"body": "b"}\n', "missing_key.jsonl:2: missing key 'text'", "no text key")
    tc_case("not_string", '{"text": ["a"]}\n', "not_string.jsonl:1: 'text' must be a string", "text is an array")
    tc_case("bad_json", '{"text": "a"}\n{"text": \n', "bad_json.jsonl:2: invalid JSON", "truncated JSON")
    tc_case("not_object", '"just a string"\n', "not_object.jsonl:1: expected a JSON object", "bare string")
    tc_case("tokenizer_train", '{"text": 5}\n', "tokenizer_train.jsonl:1: 'text' must be a string",
            "tokenizer train on a bad JSONL file",
            command="{moetune} tokenizer train --input {case} --vocab-size 300 --out {work}/tok.json --quiet")
    tc_case("deep", '{"text": ' + "[" * 30000 + "]" * 30000 + "}\n", "deep.jsonl:1: invalid JSON: nested deeper than",
            "text nested 30000 arrays deep")

    # ------------------------------------------------------------------ tokenizer.json
    k = "tokenizer/"
    bl = [chr(c) for c in range(0x21, 0x7f)] + [chr(c) for c in range(0xa1, 0xad)] + [chr(c) for c in range(0xae, 0x100)]
    byte_chars = {}
    n = 0
    for b in range(256):
        if chr(b) in bl:
            byte_chars[b] = chr(b)
        else:
            byte_chars[b] = chr(256 + n)
            n += 1
    vocab = {byte_chars[b]: b for b in range(256)}
    specials = ["<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

    def tok_json(vocab=vocab, merges=(), added=None, model_extra=None, drop=(), top_extra=None):
        j = {"version": "1.0", "truncation": None, "padding": None,
             "added_tokens": added if added is not None else
             [{"id": 256 + len(vocab) - 256 + i, "content": s, "special": True} for i, s in enumerate(specials)],
             "normalizer": None,
             "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
             "post_processor": None, "decoder": {"type": "ByteLevel"},
             "model": {"type": "BPE", "dropout": None, "unk_token": None, "vocab": vocab, "merges": list(merges)}}
        if model_extra:
            j["model"].update(model_extra)
        if top_extra:
            j.update(top_extra)
        for key in drop:
            if "." in key:
                a, b = key.split(".")
                del j[a][b]
            else:
                del j[key]
        return jdump(j)

    def tk_case(cid, raw, expected, description, command=TOK_INFO):
        put(k + cid + ".json", raw)
        case("tk_" + cid, "tokenizer", [k + cid + ".json"], command, expected, description)

    put(k + "valid_tokenizer.json", tok_json())  # not a case: checked to load in the runner's self-test
    ab = dict(vocab)
    ab["ab"] = 256
    tk_case("bad_json", tok_json()[:300], "bad_json.json: not a valid tokenizer.json: invalid JSON", "truncated")
    tk_case("not_object", "[]\n", "not_object.json: not a valid tokenizer.json: expected a JSON object", "an array")
    tk_case("missing_model", tok_json(drop=["model"]), "missing_model.json: key 'model': missing", "no model section")
    tk_case("model_wordpiece", tok_json(model_extra={"type": "WordPiece"}), "key 'model.type': must be \"BPE\"",
            "WordPiece model")
    tk_case("model_type_number", tok_json(model_extra={"type": 5}), "model_type_number.json: key 'model.type': must be",
            "model type is a number")
    tk_case("pre_tokenizer_type_number", tok_json(top_extra={"pre_tokenizer": {"type": 1}}),
            "pre_tokenizer_type_number.json: key 'pre_tokenizer'", "pre_tokenizer type is a number")
    tk_case("missing_vocab", tok_json(drop=["model.vocab"]), "key 'model.vocab': missing", "no vocab")
    tk_case("merges_not_array", tok_json(model_extra={"merges": "a b"}), "key 'model.merges': missing (expected an array)",
            "merges is a string")
    tk_case("merge_unknown", tok_json(ab, merges=["a b", "ab zz"], added=[]),
            "key 'model.merges[1]': \"zz\" is not in model.vocab", "merge referencing an unknown token")
    tk_case("merge_result_missing", tok_json(merges=["a b"], added=[]),
            "key 'model.merges[0]': the merged token \"ab\" is not in model.vocab", "merge whose result has no id")
    tk_case("merge_twice", tok_json(ab, merges=["a b", "a b"], added=[]), "key 'model.merges[1]': \"a b\" is listed twice",
            "the same merge twice")
    tk_case("merge_format", tok_json(ab, merges=["ab"], added=[]), "key 'model.merges[0]': must be \"LEFT RIGHT\"",
            "merge without a space")
    dupv = dict(vocab)
    dupv["ab"] = 97
    tk_case("duplicate_ids", tok_json(dupv, added=[]), "key 'model.vocab': id 97 is given to both", "two tokens, one id")
    big = dict(vocab)
    big["ab"] = 2147483648
    tk_case("id_out_of_range", tok_json(big, added=[]), "key 'model.vocab': the id of \"ab\" must be an integer in [0, 2^31)",
            "id 2^31")
    neg = dict(vocab)
    neg["ab"] = -1
    tk_case("id_negative", tok_json(neg, added=[]), "key 'model.vocab': the id of \"ab\" must be an integer", "id -1")
    sparse = dict(vocab)
    sparse["ab"] = 2000000000
    tk_case("id_sparse_huge", tok_json(sparse, added=[]), "key 'model.vocab': the id of \"ab\"",
            "id 2e9 in a 257-token vocabulary (a 2e9-entry table)")
    nob = {t_: i for t_, i in vocab.items() if i != 65}
    tk_case("missing_byte", tok_json(nob, added=[]), "key 'model.vocab': lacks the byte token \"A\" (byte 0x41)",
            "a byte-level vocabulary without 'A'")
    tk_case("added_conflict", tok_json(added=[{"id": 97, "content": "<|eos|>", "special": True}]),
            "key 'added_tokens[0]': id 97 is \"<|eos|>\" here but \"a\" in model.vocab", "special token on a byte id")
    tk_case("added_bad", tok_json(added=[{"id": "x", "content": "<|eos|>"}]), "key 'added_tokens[0]': must be",
            "special token with a string id")
    tk_case("normalizer", tok_json(top_extra={"normalizer": {"type": "NFC"}}),
            "key 'normalizer': normalizers are not supported", "a normalizer")
    tk_case("duplicate_key", tok_json().replace('"version": "1.0",', '"version": "1.0", "model": {},', 1),
            "invalid JSON: duplicate key 'model'", "model section twice")
    tk_case("in_run_config", tok_json(drop=["model"]), "in_run_config.json: key 'model': missing",
            "a bad tokenizer given as data.tokenizer",
            command="{moetune} train --config {work}/run.json --out {work}/out --set data.tokenizer={case} "
                    "--peak-gflops 1 --quiet")
    put(k + "ckpt_tokenizer.json", tok_json(model_extra={"merges": 7}))
    case("tk_in_checkpoint", "tokenizer", [k + "ckpt_tokenizer.json>ckpt/tokenizer.json"], GEN,
         "ckpt/tokenizer.json: key 'model.merges': missing", "a checkpoint carrying a corrupt tokenizer.json")

    # ------------------------------------------------------------------ token files (.bin)
    b = "token_file/"

    def tokfile(docs, vocab=264, version=1, token_bytes=2, magic=b"MOETOKF1", sha=None, num_docs=None, num_tokens=None,
                offsets=None, tail=b""):
        ids = [i for d_ in docs for i in d_]
        offs = [0]
        for d_ in docs:
            offs.append(offs[-1] + len(d_))
        h = bytearray(128)
        h[0:8] = magic
        struct.pack_into("<IIQQQ", h, 8, version, token_bytes, len(docs) if num_docs is None else num_docs,
                         len(ids) if num_tokens is None else num_tokens, vocab)
        h[40:72] = sha if sha is not None else bytes.fromhex(BYTE_SHA)
        body = struct.pack("<%d%s" % (len(ids), "H" if token_bytes == 2 else "I"), *ids)
        o = offsets if offsets is not None else offs
        return bytes(h) + body + struct.pack("<%dQ" % len(o), *o) + tail

    docs = [[72, 105, 1], [10, 20, 30, 40]]

    def bin_case(cid, data, expected, description, command=TRAIN_BIN):
        put(b + cid + ".bin", data)
        case("bin_" + cid, "token_file", [b + cid + ".bin"], command, expected, description)

    INSPECT = "{moetune} data inspect {case}"
    bin_case("bad_magic", tokfile(docs, magic=b"MOETOKF9"), "bad_magic.bin: not a moetune token file (bad magic",
             "wrong magic")
    bin_case("truncated_header", tokfile(docs)[:50], "truncated_header.bin: not a moetune token file: 50 bytes",
             "cut inside the 128-byte header", command=INSPECT)
    bin_case("version", tokfile(docs, version=2), "version.bin: token file version 2 is not supported", "version 2")
    bin_case("token_bytes", tokfile(docs, token_bytes=3), "token_bytes.bin: corrupt token file: token_bytes is 3",
             "3-byte ids", command=INSPECT)
    bin_case("no_docs", tokfile([], num_docs=0), "no_docs.bin: corrupt token file: no documents", "zero documents")
    bin_case("size_mismatch", tokfile(docs, num_tokens=9), "size_mismatch.bin: corrupt token file:",
             "header claims 9 tokens, the file holds 7", command=INSPECT)
    bin_case("appended", tokfile(docs, tail=b"\0" * 8), "appended.bin: corrupt token file:", "8 bytes appended")
    bin_case("huge_counts", tokfile(docs, num_docs=2**63), "huge_counts.bin: corrupt token file:",
             "2^63 documents declared", command=INSPECT)
    bin_case("offsets_decreasing", tokfile(docs, offsets=[0, 5, 3]), "offsets_decreasing.bin: corrupt token file: doc_offsets",
             "offsets going down")
    bin_case("first_offset", tokfile(docs, offsets=[1, 3, 7]), "first_offset.bin: corrupt token file: doc_offsets[0] is not 0",
             "offsets starting at 1", command=INSPECT)
    bin_case("last_offset", tokfile(docs, offsets=[0, 3, 6]), "last_offset.bin: corrupt token file: the last doc offset is 6",
             "last offset short of num_tokens")
    bin_case("id_out_of_range", tokfile([[1, 2], [3, 300]]), "id_out_of_range.bin: corrupt token file: id 300 in document 1",
             "id beyond the file's vocab")
    bin_case("vocab_zero", tokfile(docs, vocab=0), "vocab_zero.bin: corrupt token file: vocab_size 0", "vocab_size 0",
             command=INSPECT)
    bin_case("vocab_big_for_model", tokfile(docs, vocab=1000), "vocab_big_for_model.bin: the token file's vocabulary has 1000",
             "token file of a 1000-token tokenizer for a 264-token model")
    bin_case("wrong_tokenizer", tokfile(docs, sha=b"\x11" * 32),
             "wrong_tokenizer.bin: this token file was prepared with the tokenizer of sha256 111111111111",
             "tokenizer checksum that is not the run's tokenizer")
    bin_case("inspect_wrong_tokenizer", tokfile(docs, sha=b"\x22" * 32),
             "inspect_wrong_tokenizer.bin: --tokenizer byte (sha256 70e7cf85eea0", "data inspect --tokenizer with another tokenizer's file",
             command=INSPECT + " --tokenizer byte")
    bin_case("jsonl_as_bin", b'{"input_ids": [1, 2, 3]}\n' * 10, "jsonl_as_bin.bin: not a moetune token file (it starts with '{'",
             "JSONL given as data.format bin")
    bin_case("bin_as_tokens", tokfile(docs), "bin_as_tokens.bin: is a token file", "a token file given as data.format tokens",
             command=TRAIN_DATA)


# sha256 of the byte tokenizer's JSON (moetune tokenizer info --tokenizer byte)
BYTE_SHA = None


def main():
    global BYTE_SHA
    sha_file = os.path.join(HERE, "valid", "byte_tokenizer.sha256")
    BYTE_SHA = open(sha_file).read().split()[0]
    build()
    for sub in sorted({p.split("/")[0] for p in FILES}):
        shutil.rmtree(os.path.join(HERE, sub), ignore_errors=True)
    for rel, data in FILES.items():
        path = os.path.join(HERE, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(data)
    with open(os.path.join(HERE, "cases.tsv"), "w") as fh:
        fh.write("# moetune bad-input corpus: written by make_corpus.py (edit that, then re-run it).\n")
        fh.write("# Placeholders: {moetune} binary, {work} the case's scratch directory (also the working directory),\n")
        fh.write("# {ckpt} = {work}/ckpt, a copy of the runner's valid checkpoint, {case} = {work}/<first file's name>.\n")
        fh.write("# files: comma-separated; SRC (copied to {work}/basename), SRC>DEST (copied to {work}/DEST),\n")
        fh.write("# !DEST (deleted from {work}), @ckpt>DEST (another copy of the checkpoint at {work}/DEST),\n")
        fh.write("# +manifest[:DIR] (DIR/manifest.json, default ckpt, rewritten to match DIR's files).\n")
        fh.write("id\tformat\tfiles\tcommand\texpected\tdescription\n")
        for row in CASES:
            fh.write("\t".join(row) + "\n")
    total = sum(len(v) for v in FILES.values())
    print(f"wrote {len(CASES)} cases, {len(FILES)} files, {total} bytes")


if __name__ == "__main__":
    sys.exit(main())
