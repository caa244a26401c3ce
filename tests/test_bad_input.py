"""Bad input (issue 9): one clear line, exit 2, no traceback, nothing written, the input untouched, no code run.

The corpus lives in tests/malformed.py (generated here, never kept as binaries); each case names its code.
Commands run as real processes through malformed.Cli (a fork server, so ~60 runs take seconds, not minutes);
one case also goes through `python -m rlexport` itself.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from factories import make_tiny_model
from malformed import (CASES, ERROR_LINE, Goods, build, leftovers, marker_of, shared_cli, tree_state,
                       why_incomplete, write_evil_pickle, _poke)


@pytest.fixture(scope="session")
def cli():
    return shared_cli()


@pytest.fixture(scope="session")
def goods(tiny_base, tiny_lora, tmp_path_factory) -> Goods:
    d = tmp_path_factory.mktemp("goods")
    return Goods(base=tiny_base, lora=tiny_lora,
                 wide=make_tiny_model(d / "wide", hidden_size=256, num_attention_heads=4),
                 gpt2=make_tiny_model(d / "gpt2", model_type="gpt2"))


def _non_utf8_names_work(d: Path) -> bool:
    try:
        p = os.path.join(os.fsencode(d), b"probe-\xff")
        open(p, "wb").close()
        os.unlink(p)
        return True
    except (OSError, ValueError):
        return False


def _permissions_bite() -> bool:
    return os.geteuid() != 0 or hasattr(os, "setuid")


def assert_clean_failure(r, code: str, *, stdout_empty: bool = True) -> re.Match:
    assert "Traceback" not in r.stderr, r.stderr
    assert r.rc == 2, f"exit {r.rc}: {r.stderr}"
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    m = re.match(ERROR_LINE, lines[0])
    assert m, f"not `error[code]: message (file): fix`: {lines[0]}"
    assert m["code"] == code, lines[0]
    if stdout_empty:
        assert r.stdout == ""
    return m


def test_corpus_is_big_enough_and_codes_are_stable():
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)
    assert all(re.fullmatch(r"[a-z0-9-]+", c.code) for c in CASES)
    covered = " ".join(c.id for c in CASES)
    for topic in ("st-truncated", "header-longer-than-file", "offsets", "dtype-lies", "shape-lies", "overlap",
                  "2gb", "config-invalid-json", "adapter-config-invalid-json", "index-invalid-json",
                  "index-names-missing-shard", "duplicate-tensor-across-shards", "adapter-rank-disagrees",
                  "other-hidden-size", "other-architecture", "nan", "inf", "fp16-overflow", "empty-folder",
                  "file-not-folder", "symlink-loop", "unreadable", "non-utf8", "out-is-input", "out-inside-input",
                  "out-parent-of-input", "out-exists", "pickle-reduce", "disk-full"):
        assert topic in covered, topic


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_malformed_input(case, goods, cli, tmp_path):
    if case.needs == "non-utf8-fs" and not _non_utf8_names_work(tmp_path):
        pytest.skip("this filesystem refuses non-UTF-8 names")
    if case.needs == "permissions" and not _permissions_bite():
        pytest.skip("running as root without setuid: permissions cannot be denied")
    d = tmp_path / "case"
    run = build(case, d, goods)
    before = tree_state(*run.inputs)
    chain = [run.out, *[p for p in run.out.parents if d in p.parents or p == d]]
    existed = {p: os.path.lexists(p) for p in chain}

    r = cli.run(*run.args, fsize=run.fsize, user=run.user)

    assert_clean_failure(r, case.code)
    assert tree_state(*run.inputs) == before, "the input changed"
    assert {p: os.path.lexists(p) for p in chain} == existed, "an output path was created"
    assert leftovers(run.out) == []
    assert not marker_of(d).exists(), "code from a pickle ran"
    if "2gb" in case.id:
        assert r.maxrss_mb < 1500, f"peak memory {r.maxrss_mb:.0f} MB: the 2 GB header was allocated"


def test_pickle_payload_through_python_m_rlexport(goods, tmp_path):
    """The real entry point (`python -m rlexport`), not the fork server: the payload still never runs."""
    ckpt = shutil.copytree(goods.base, tmp_path / "ckpt")
    (ckpt / "model.safetensors").unlink()
    marker = tmp_path / "PWNED"
    write_evil_pickle(ckpt / "pytorch_model.bin", marker, zip_format=True)
    shutil.copy(ckpt / "pytorch_model.bin", ckpt / "value_head.bin")
    before = tree_state(ckpt)
    proc = subprocess.run([sys.executable, "-m", "rlexport", "export", str(ckpt), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert_clean_failure(proc_result(proc), "unsafe-pickle")
    assert not marker.exists() and not (tmp_path / "out").exists()
    assert tree_state(ckpt) == before


def test_pickle_payload_through_inspect(goods, cli, tmp_path):
    """inspect reads the same files: also refused, also without running anything."""
    ckpt = shutil.copytree(goods.base, tmp_path / "ckpt")
    marker = tmp_path / "PWNED"
    write_evil_pickle(ckpt / "value_head.bin", marker, zip_format=False)
    r = cli.run("inspect", ckpt)
    assert_clean_failure(r, "unsafe-pickle", stdout_empty=False)
    assert not marker.exists()


def proc_result(proc):
    from malformed import Result
    return Result(proc.returncode, proc.stdout, proc.stderr)


def test_allow_nonfinite_exports_the_nan(goods, cli, tmp_path):
    ckpt = shutil.copytree(goods.base, tmp_path / "ckpt")
    _poke(ckpt / "model.safetensors", "layers.1.mlp.down_proj", float("nan"))
    r = cli.run("export", ckpt, "--out", tmp_path / "out", "--allow-nonfinite", "-q")
    assert r.rc == 0, r.stderr
    assert why_incomplete(tmp_path / "out", None) is None
    from safetensors.torch import load_file
    sd = {}
    for f in (tmp_path / "out").glob("*.safetensors"):
        sd.update(load_file(f))
    assert torch.isnan(sd["model.layers.1.mlp.down_proj.weight"]).sum() == 1


def test_bfloat16_is_the_fix_for_fp16_overflow(goods, cli, tmp_path):
    ckpt = shutil.copytree(goods.base, tmp_path / "ckpt")
    _poke(ckpt / "model.safetensors", "layers.0.mlp.up_proj", 1e6)
    r = cli.run("export", ckpt, "--out", tmp_path / "out", "--dtype", "bfloat16", "-q")
    assert r.rc == 0, r.stderr


def test_legacy_torch_save_weights_export(goods, cli, tmp_path):
    """A plain-tensor pytorch_model.bin in torch's pre-zip format (not mmap-able) is read, safely."""
    from safetensors.torch import load_file
    ckpt = shutil.copytree(goods.base, tmp_path / "ckpt")
    sd = load_file(ckpt / "model.safetensors")
    (ckpt / "model.safetensors").unlink()
    torch.save(sd, ckpt / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    r = cli.run("export", ckpt, "--out", tmp_path / "out", "-q")
    assert r.rc == 0, r.stderr
    assert why_incomplete(tmp_path / "out", None) is None


def test_input_changing_during_export_cli(goods, cli, tmp_path):
    """A trainer still writing: the weights file is touched over and over while rlexport reads it."""
    ckpt = shutil.copytree(goods.base, tmp_path / "ckpt")
    out = tmp_path / "out"
    target = ckpt / "model.safetensors"
    stop = threading.Event()

    def keep_writing():
        t = target.stat().st_mtime_ns
        while not stop.is_set():
            t += 1_000_000
            os.utime(target, ns=(t, t))
            time.sleep(0.001)

    # The export must see the file change after it opened it: start writing only once it runs.
    th = threading.Thread(target=keep_writing, daemon=True)
    running = cli.start("export", ckpt, "--out", out, "--max-shard-size", "100KB")
    th.start()
    try:
        r = cli.wait(running)
    finally:
        stop.set()
        th.join()
    assert_clean_failure(r, "input-changed")
    assert not out.exists() and leftovers(out) == []


def test_input_changing_during_export_library(goods, tmp_path):
    """Deterministic: the file is rewritten (same size) right after the first tensor is written."""
    import rlexport
    from rlexport.errors import RlexportError
    ckpt = shutil.copytree(goods.base, tmp_path / "ckpt")
    out = tmp_path / "out"
    f = ckpt / "model.safetensors"
    done = []

    def on_bytes(n):
        if not done:
            done.append(n)
            f.write_bytes(f.read_bytes())  # same bytes, new mtime: a re-save
            os.utime(f, ns=(f.stat().st_mtime_ns + 10**9,) * 2)

    with pytest.raises(RlexportError) as e:
        rlexport.export(ckpt, out, max_shard_size="100KB", on_bytes=on_bytes)
    assert e.value.code == "input-changed" and Path(e.value.file).resolve() == f.resolve()
    assert not out.exists() and leftovers(out) == []


def test_disk_full_on_a_real_small_filesystem(goods, cli, tmp_path):
    """ENOSPC from a real 512 KiB tmpfs (root only; RLIMIT_FSIZE covers the rest in the corpus)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        out = mnt / "out"
        r = cli.run("export", goods.base, "--out", out)
        assert_clean_failure(r, "disk-full")
        assert not out.exists() and leftovers(out) == []
        assert os.listdir(mnt) == []
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_unwritable_out_parent(goods, cli, tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    user = None
    if os.geteuid() == 0:
        for p in [tmp_path, *tmp_path.parents]:
            if p != Path(p.anchor) and p.stat().st_mode & 0o005 != 0o005:
                p.chmod(p.stat().st_mode | 0o005)
        ckpt = shutil.copytree(goods.base, tmp_path / "ckpt")
        for dirpath, _, files in os.walk(ckpt):
            for f in files:
                os.chmod(os.path.join(dirpath, f), 0o644)
        user = 65534
    else:
        ckpt = goods.base
    r = cli.run("export", ckpt, "--out", parent / "out", user=user)
    assert_clean_failure(r, "out-unwritable")
    assert os.listdir(parent) == []


def test_checkpoint_code_is_never_run_or_copied(goods, cli, tmp_path):
    """A config.json/tokenizer_config.json auto_map pointing at .py files that would create a marker on import:
    export and inspect never import them (no trust_remote_code anywhere), and no .py lands in the export."""
    ckpt = shutil.copytree(goods.base, tmp_path / "ckpt")
    marker = tmp_path / "PWNED"
    payload = f"open({str(marker)!r}, 'w').write('ran')\n"
    for name in ("modeling_evil.py", "configuration_evil.py", "tokenization_evil.py", "__init__.py"):
        (ckpt / name).write_text(payload)
    import json
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                       "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    tok = json.loads((ckpt / "tokenizer_config.json").read_text())
    tok["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (ckpt / "tokenizer_config.json").write_text(json.dumps(tok))
    before = tree_state(ckpt)
    out = tmp_path / "out"
    r = cli.run("export", ckpt, "--out", out, "-q")
    assert "Traceback" not in r.stderr, r.stderr
    r2 = cli.run("inspect", ckpt, "--json")
    assert "Traceback" not in r2.stderr, r2.stderr
    assert not marker.exists(), "code from the checkpoint ran"
    assert tree_state(ckpt) == before
    if out.exists():
        assert not list(out.glob("*.py"))


def test_no_code_path_enables_trust_remote_code():
    src = Path(__file__).resolve().parents[1] / "src" / "rlexport"
    hits = [f"{p.relative_to(src)}:{i}" for p in src.rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1)
            if re.search(r"trust_remote_code\s*=\s*True\b", line)]
    assert hits == [], f"trust_remote_code must stay off unless an explicit flag sets it: {hits}"
