#!/usr/bin/env python3
"""Runs every case of the bad-input corpus (tests/corpus/bad/cases.tsv) through the moetune CLI.

usage: run_bad_corpus.py <moetune binary> <corpus dir> <scratch dir>
       (BAD_CORPUS_ONLY=<regex> runs only the cases whose id matches; BAD_CORPUS_JOBS=<n>
       cases at a time, default 2; BAD_CORPUS_TIMEOUT=<s> per case, default 20)

First it builds one small valid checkpoint: 2 training steps of <corpus>/valid/run.json
(weights, AdamW state, trainer_state.json, tokenizer.json, manifest.json). Its sharded
files are merged into one model.safetensors and one optimizer.safetensors (the other form
a checkpoint may take; the manifest is rewritten), and it must load (resume, generate). Then, per case,
in <scratch>/cases/<id>: the files of <corpus>/valid/ are copied in, the checkpoint is
copied to ckpt/ when the case uses it, the case's files are overlaid (see cases.tsv), and
the command runs there with a timeout. A case passes when
  - the exit status is exactly 1 (not 0, not a signal, not another code),
  - stderr contains "error: " and the expected substring, and names the file (a case
    file's name or a path), a line ("<file>:<n>:") or a key ("key '...'"),
  - stderr shows no crash ("terminate called", a sanitizer report, "Segmentation fault"),
  - it ends within the timeout (BAD_CORPUS_TIMEOUT seconds, default 20),
  - every file that was in the case directory before (inputs, checkpoint, outputs) has
    the same SHA-256 afterwards.
Prints one line per case and a summary; exits 1 on any failure or if fewer than 100 ran.
"""
import concurrent.futures
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import time

MIN_CASES = 100
CRASH_MARKERS = ("terminate called", "AddressSanitizer", "UndefinedBehaviorSanitizer", "LeakSanitizer",
                 "runtime error:", "Segmentation fault", "core dumped", "Aborted", "stack smashing")


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def snapshot(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            if os.path.isfile(p) and not os.path.islink(p):
                out[os.path.relpath(p, root)] = sha256(p)
    return out


def write_manifest(ckpt):
    """The manifest moetune writes (io/manifest.cpp): every regular file but itself."""
    files = {}
    for name in sorted(os.listdir(ckpt)):
        p = os.path.join(ckpt, name)
        if name != "manifest.json" and os.path.isfile(p):
            files[name] = {"bytes": os.path.getsize(p), "sha256": sha256(p)}
    with open(os.path.join(ckpt, "manifest.json"), "w") as f:
        f.write(json.dumps({"format": "moetune-checkpoint-manifest-1", "files": files}, indent=2) + "\n")


def read_cases(path):
    cases = []
    with open(path, encoding="utf-8") as f:
        header = None
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip() or line.startswith("#"):
                continue
            cols = line.split("\t")
            if header is None:
                header = cols
                if cols != ["id", "format", "files", "command", "expected", "description"]:
                    sys.exit(f"{path}:{lineno}: expected the header id/format/files/command/expected/description")
                continue
            if len(cols) != 6:
                sys.exit(f"{path}:{lineno}: expected 6 tab-separated columns, got {len(cols)}")
            cases.append(dict(zip(header, cols), line=lineno))
    ids = [c["id"] for c in cases]
    dup = {i for i in ids if ids.count(i) > 1}
    if dup:
        sys.exit(f"{path}: duplicate case ids {sorted(dup)}")
    return cases


def run(cmd, cwd, env, timeout):
    """Runs cmd in its own process group, so that a hang is killed with all it started
    (mpirun, its ranks)."""
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, err = p.communicate()
        timed_out = True
    return (None if timed_out else p.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"),
            timed_out)


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    return header, data[8 + n:]


def merge_shards(ckpt, stem):
    """Replaces <stem>-0000k-of-0000n.safetensors + index by one <stem>.safetensors (the other
    form a checkpoint may take; the corpus overlays single files)."""
    index = os.path.join(ckpt, stem + ".safetensors.index.json")
    if not os.path.exists(index):
        return
    with open(index) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    header, blobs, off, meta = {}, [], 0, None
    for s in shards:
        h, buf = read_safetensors(os.path.join(ckpt, s))
        meta = h.pop("__metadata__", meta)
        for name, t in sorted(h.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            b, e = t["data_offsets"]
            header[name] = {"dtype": t["dtype"], "shape": t["shape"], "data_offsets": [off, off + e - b]}
            blobs.append(buf[b:e])
            off += e - b
        os.remove(os.path.join(ckpt, s))
    os.remove(index)
    if meta:
        header = {"__metadata__": meta, **header}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(os.path.join(ckpt, stem + ".safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def build_checkpoint(moetune, corpus, scratch, env):
    base = os.path.join(scratch, "base")
    shutil.copytree(os.path.join(corpus, "valid"), base)
    out = os.path.join(base, "run")
    rc, so, se, to = run([moetune, "train", "--config", os.path.join(base, "run.json"), "--out", out, "--peak-gflops",
                          "1", "--quiet"], base, env, 300)
    ckpt = os.path.join(out, "step-00000002")
    if rc == 0:
        merge_shards(ckpt, "model")
        merge_shards(ckpt, "optimizer")
        write_manifest(ckpt)
    need = ["config.json", "model.safetensors", "optimizer.safetensors", "trainer_state.json", "tokenizer.json",
            "manifest.json"]
    if rc != 0 or not all(os.path.isfile(os.path.join(ckpt, n)) for n in need):
        sys.exit(f"could not build the valid checkpoint (exit {rc}):\n{so}\n{se}")
    # The valid inputs must pass where the corpus makes them fail (a self-test of the setup).
    sanity = [
        [moetune, "train", "--config", os.path.join(base, "run.json"), "--out", os.path.join(base, "resumed"),
         "--resume-from", ckpt, "--set", "train.steps=3", "--peak-gflops", "1", "--quiet"],
        [moetune, "generate", "--ckpt", ckpt, "--prompts", os.path.join(base, "prompts.jsonl"), "--out",
         os.path.join(base, "gen.jsonl"), "--max-new-tokens", "2", "--quiet"],
        [moetune, "tokenizer", "info", "--tokenizer", os.path.join(corpus, "tokenizer", "valid_tokenizer.json")],
        [moetune, "data", "prepare", "--input", os.path.join(base, "text.txt"), "--out", os.path.join(base, "t.bin"),
         "--quiet"],
    ]
    for cmd in sanity:
        rc, so, se, to = run(cmd, base, env, 120)
        if rc != 0:
            sys.exit(f"self-test failed: {' '.join(cmd)} (exit {rc}):\n{so}\n{se}")
    return ckpt


def prepare_case(c, corpus, ckpt, work):
    os.makedirs(work)
    for name in os.listdir(os.path.join(corpus, "valid")):
        shutil.copy2(os.path.join(corpus, "valid", name), os.path.join(work, name))
    entries = [] if c["files"] == "-" else c["files"].split(",")
    uses_ckpt = "{ckpt}" in c["command"] or any("ckpt/" in e for e in entries)
    if uses_ckpt:
        shutil.copytree(ckpt, os.path.join(work, "ckpt"))
    first = None
    manifests = []
    for e in entries:
        if e.startswith("+manifest"):
            manifests.append(e.partition(":")[2] or "ckpt")
        elif e.startswith("@ckpt>"):
            shutil.copytree(ckpt, os.path.join(work, e[len("@ckpt>"):]))
        elif e.startswith("!"):
            target = os.path.join(work, e[1:])
            if not os.path.exists(target):
                raise ValueError(f"{e}: nothing to delete")
            os.remove(target)
        else:
            src, _, dest = e.partition(">")
            dest = dest or os.path.basename(src)
            target = os.path.join(work, dest)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copyfile(os.path.join(corpus, src), target)
            first = first or target
    for m in manifests:
        write_manifest(os.path.join(work, m))
    names = set()
    for e in entries:
        if not e.startswith("+") and not e.startswith("@"):
            names.add(os.path.basename(e.lstrip("!").partition(">")[2] or e.lstrip("!")))
    return first, names


def check(c, rc, err, timed_out, names, before, after, timeout):
    if timed_out:
        return f"hung: no exit within {timeout} s"
    if rc is None or rc < 0:
        return f"killed by signal {-rc if rc else '?'}"
    for m in CRASH_MARKERS:
        if m in err:
            return f"crash marker '{m}' in stderr"
    if rc != 1:
        return f"exit status {rc}, expected 1"
    if "error: " not in err:
        return "no 'error: ' line on stderr"
    if c["expected"] not in err:
        return f"stderr lacks the expected '{c['expected']}'"
    located = (any(n and n in err for n in names) or "key '" in err or re.search(r"\.[A-Za-z0-9]+:\d+:", err)
               or re.search(r"(/|\w\.\w+)[^ ]*: ", err))
    if not located:
        return "stderr names no file, line or key"
    changed = [p for p, h in before.items() if after.get(p) != h]
    if changed:
        return "modified or removed existing files: " + ", ".join(sorted(changed)[:5])
    return None


def run_case(c, moetune, corpus, scratch, ckpt, env, timeout):
    """Returns (failure reason or None, the report line(s))."""
    work = os.path.join(scratch, "cases", c["id"])
    try:
        first, names = prepare_case(c, corpus, ckpt, work)
    except (OSError, ValueError) as e:
        return "setup", f"FAIL {c['id']}: cannot set up the case: {e}"
    subst = {"{moetune}": moetune, "{work}": work, "{ckpt}": os.path.join(work, "ckpt"), "{corpus}": corpus,
             "{case}": first or ""}
    cmd = shlex.split(c["command"])
    for i, a in enumerate(cmd):
        for k, v in subst.items():
            a = a.replace(k, v)
        cmd[i] = a
    before = snapshot(work)
    t = time.time()
    rc, out, err, timed_out = run(cmd, work, env, timeout)
    dt = time.time() - t
    after = snapshot(work)
    why = check(c, rc, err, timed_out, names, before, after, timeout)
    if why:
        return why, (f"FAIL {c['id']} ({dt:.1f} s): {why}\n     command: {' '.join(cmd)}\n"
                     f"     stderr: {err.strip()[-1500:]}")
    shutil.rmtree(work, ignore_errors=True)
    lines = err.strip().splitlines()
    last = next((l for l in lines if l.startswith("error: ")), lines[-1] if lines else "(no stderr)")
    return None, f"ok   {c['id']} ({dt:.1f} s): {last[:200]}"


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    moetune, corpus, scratch = (os.path.abspath(a) for a in sys.argv[1:])
    timeout = float(os.environ.get("BAD_CORPUS_TIMEOUT", "20"))
    only = re.compile(os.environ["BAD_CORPUS_ONLY"]) if os.environ.get("BAD_CORPUS_ONLY") else None
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="passive", OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", LC_ALL="C")
    cases = read_cases(os.path.join(corpus, "cases.tsv"))
    shutil.rmtree(scratch, ignore_errors=True)
    os.makedirs(scratch)
    t0 = time.time()
    ckpt = build_checkpoint(moetune, corpus, scratch, env)
    print(f"valid checkpoint: {ckpt} ({time.time() - t0:.1f} s)")
    todo = [c for c in cases if not only or only.search(c["id"])]
    jobs = max(1, int(os.environ.get("BAD_CORPUS_JOBS", "2")))
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        results = pool.map(lambda c: run_case(c, moetune, corpus, scratch, ckpt, env, timeout), todo)
        ran, failed, per_format = 0, [], {}
        for c, (why, report) in zip(todo, results):  # in manifest order, as they finish
            ran += 1
            per_format.setdefault(c["format"], [0, 0])[0] += 1
            if why:
                failed.append(c["id"])
                per_format[c["format"]][1] += 1
            print(report, flush=True)
    print("\nper format (cases, failures):")
    for f, (n, bad) in sorted(per_format.items()):
        print(f"  {f:15s} {n:4d} {bad:4d}")
    print(f"\n{ran - len(failed)} of {ran} cases passed, {len(failed)} failed, in {time.time() - t0:.1f} s")
    if failed:
        print("failed: " + " ".join(failed))
        return 1
    if not only and ran < MIN_CASES:
        print(f"only {ran} cases ran; the corpus must have at least {MIN_CASES}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
