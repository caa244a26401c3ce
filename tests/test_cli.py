"""The CLI contract: one-line errors with a code and a fix, exit 2, no traceback, nothing written."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest

from factories import FIXTURES, copy_fixture, make_tiny_model


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "rlexport", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd)


def assert_one_line_error(proc, code, out=None):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error[{code}]: "), proc.stderr
    assert "Traceback" not in proc.stderr and ": " in lines[0].split("]: ", 1)[1]
    if out is not None:
        assert not out.exists()
        assert not list(out.parent.glob(f".{out.name}.rlexport-tmp-*"))


def test_export_and_inspect_json_happy_path(tmp_path):
    proc = run("export", FIXTURES / "lf_ppo_lora_qwen2" / "ckpt", "--out", tmp_path / "out", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    report = json.loads(run("inspect", FIXTURES / "lf_ppo_lora_qwen2" / "ckpt", "--json").stdout)
    assert report["format"] == "peft" and report["producer"] == "llama-factory" and report["stage"] == "ppo"
    codes = {f["code"] for f in report["findings"]}
    assert {"value-head-present", "adapter-needs-merge", "eos-mismatch", "reward-adapter-beside"} <= codes


def test_missing_base(tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(FIXTURES / "lf_ppo_lora_qwen2" / "ckpt", ckpt)  # ../base no longer resolves from here
    assert_one_line_error(run("export", ckpt, "--out", tmp_path / "out"), "base-unresolved", tmp_path / "out")


def test_base_with_other_shapes(tmp_path):
    other = make_tiny_model(tmp_path / "other", hidden_size=192, num_attention_heads=3)
    proc = run("export", FIXTURES / "lf_ppo_lora_qwen2" / "ckpt", "--base", other, "--out", tmp_path / "out")
    assert_one_line_error(proc, "base-shape-mismatch", tmp_path / "out")


def test_truncated_safetensors(tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(FIXTURES / "lf_ppo_full_qwen2" / "ckpt", ckpt)
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert_one_line_error(run("export", ckpt, "--out", tmp_path / "out"), "corrupt-safetensors", tmp_path / "out")


def test_out_inside_input(tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(FIXTURES / "lf_ppo_full_qwen2" / "ckpt", ckpt)
    before = sorted(p.name for p in ckpt.iterdir())
    assert_one_line_error(run("export", ckpt, "--out", ckpt / "export"), "out-overlaps-input", ckpt / "export")
    assert sorted(p.name for p in ckpt.iterdir()) == before


def test_existing_out_needs_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = run("export", FIXTURES / "lf_ppo_full_qwen2" / "ckpt", "--out", out)
    assert proc.returncode == 2 and proc.stderr.startswith("error[out-exists]")
    assert (out / "keep.txt").read_text() == "mine"
    assert run("export", FIXTURES / "lf_ppo_full_qwen2" / "ckpt", "--out", out, "-q", "--force").returncode == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()


@pytest.mark.parametrize("args", [["--dtype", "int3"], ["--target", "critic"]])
def test_usage_errors_exit_2(tmp_path, args):
    proc = run("export", FIXTURES / "lf_ppo_full_qwen2" / "ckpt", "--out", tmp_path / "out", *args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


@pytest.mark.parametrize("link", ["hard", "copy"])
def test_link_flag_places_unchanged_shards(tmp_path, link):
    import os
    src = make_tiny_model(tmp_path / "m")  # bf16 in, bf16 out: the shard comes out unchanged
    proc = run("export", src, "--out", tmp_path / "out", "--link", link, "--quiet")
    assert proc.returncode == 0, proc.stderr
    (out,) = (tmp_path / "out").glob("*.safetensors")
    assert (os.stat(out).st_ino == os.stat(src / "model.safetensors").st_ino) == (link == "hard")


def _run_on_a_terminal(*args) -> str:
    """stderr as a terminal sees it (rich draws the progress bar only on one)."""
    import os
    import pty
    primary, secondary = pty.openpty()
    env = {**os.environ, "COLUMNS": "120", "TERM": "xterm"}
    proc = subprocess.Popen([sys.executable, "-m", "rlexport", *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=secondary, env=env)
    os.close(secondary)
    chunks = []
    while True:
        try:
            data = os.read(primary, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait() == 0
    os.close(primary)
    import re
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode(errors="replace"))  # colours, cursor


def test_progress_bar_on_a_terminal_and_quiet(tmp_path):
    ckpt = FIXTURES / "lf_ppo_lora_qwen2" / "ckpt"
    shown = _run_on_a_terminal("export", ckpt, "--out", tmp_path / "a")
    assert "export policy" in shown and "/s" in shown and "MB" in shown  # bytes done and throughput
    assert "exported policy" in shown
    assert _run_on_a_terminal("export", ckpt, "--out", tmp_path / "b", "--quiet") == ""


def test_missing_root_adapter_config_is_named_not_the_reward_adapter_beside_it(tmp_path):
    """LLaMA-Factory PPO run folder without its root adapter_config.json: the reward/ adapter beside it is not the
    problem (it used to be reported as reward-adapter-without-head)."""
    ckpt = copy_fixture("lf_ppo_lora_qwen2", tmp_path) / "ckpt"
    (ckpt / "adapter_config.json").unlink()
    proc = run("export", ckpt, "--out", tmp_path / "out", "--base", FIXTURES / "lf_ppo_lora_qwen2" / "base")
    assert_one_line_error(proc, "adapter-without-config", tmp_path / "out")
    assert "reward/ is another model's" in proc.stderr


def test_unsafe_legacy_pickle_prints_only_the_error_line(tmp_path):
    """A protocol-4 legacy pickle makes torch warn (UserWarning: Detected pickle protocol 4 ...) before refusing
    it: the only output is rlexport's one line."""
    ckpt = tmp_path / "evil"
    ckpt.mkdir()
    shutil.copy(FIXTURES / "lf_ppo_full_qwen2" / "ckpt" / "config.json", ckpt)
    with open(ckpt / "pytorch_model.bin", "wb") as f:
        pickle.dump({"w": _Evil()}, f, protocol=4)  # the legacy (non-zip) layout torch.load unpickles directly
    proc = run("export", ckpt, "--out", tmp_path / "out", cwd=tmp_path)
    assert_one_line_error(proc, "unsafe-pickle", tmp_path / "out")
    assert "Warning" not in proc.stderr and not (tmp_path / "pwned").exists()


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))
