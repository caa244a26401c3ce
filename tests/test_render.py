"""The terminal rendering people read: captured for one fixture and kept in docs/terminal.md (the README shows it).

The doc is compared with numbers masked (they may differ in the last digit across CPUs). After a deliberate
change of the output, regenerate it: `RLEXPORT_UPDATE_DOCS=1 pytest tests/test_render.py`.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file, save_file

import rlexport
from rlexport.render import render_inspect, render_verify

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "terminal.md"
WIDTH = 100
CASE = "lf_ppo_lora_qwen2"


def capture(render, report: dict) -> str:
    console = Console(width=WIDTH, record=True, file=io.StringIO(), color_system=None, force_terminal=False)
    render(console, report)
    return "\n".join(line.rstrip() for line in console.export_text().splitlines()) + "\n"


def swap_layers(folder: Path) -> None:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = folder / sorted(set(index["weight_map"].values()))[0]
    sd = load_file(shard)

    def swap(k: str) -> str:
        return k.replace("layers.0.", "layers.@.").replace("layers.1.", "layers.0.").replace("layers.@.", "layers.1.")
    save_file({swap(k): v for k, v in sd.items()}, shard, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[str, str]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    cwd = os.getcwd()
    os.chdir(REPO)  # fixture paths show relative to the repo, as in the README
    try:
        ckpt = Path("tests/fixtures") / CASE / "ckpt"
        tmp = tmp_path_factory.mktemp("render")
        rlexport.export(ckpt, tmp / "policy")
        shutil.copytree(tmp / "policy", tmp / "broken")
        swap_layers(tmp / "broken")
        good = rlexport.verify(tmp / "policy", against=ckpt, engine="transformers").to_json()
        bad = rlexport.verify(tmp / "broken", against=ckpt, engine="none").to_json()
        out = {"inspect": capture(render_inspect, rlexport.inspect(ckpt)),
               "verify": capture(render_verify, good), "verify_fail": capture(render_verify, bad)}
    finally:
        os.chdir(cwd)
        torch.set_num_threads(n)
    return {k: v.replace(str(tmp) + "/", "out/") for k, v in out.items()}


def document(o: dict[str, str]) -> str:
    ckpt = f"tests/fixtures/{CASE}/ckpt"
    return f"""# Terminal output

What `rlexport inspect` and `rlexport verify` print, captured by `tests/test_render.py` from the LLaMA-Factory
LoRA PPO fixture ({CASE}) at {WIDTH} columns (regenerate: `RLEXPORT_UPDATE_DOCS=1 pytest tests/test_render.py`).
`--json` prints the same reports as JSON ([inspect.schema.json](inspect.schema.json),
[verify.schema.json](verify.schema.json)).

## inspect: what it is and what will break

```
$ rlexport inspect {ckpt}
{o["inspect"].rstrip()}
```

## verify: the export is right

```
$ rlexport export {ckpt} --out out/policy
$ rlexport verify out/policy --against {ckpt} --engine transformers
{o["verify"].rstrip()}
```

## verify: a silent error caught (layers 0 and 1 swapped in out/broken)

The folder loads everywhere and generates; only the comparison with the training-time model shows it.

```
$ rlexport verify out/broken --against {ckpt} --engine none; echo "exit $?"
{o["verify_fail"].rstrip()}
exit 1
```
"""


def masked(text: str) -> list[str]:
    return re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", "#", text).split()


def test_terminal_rendering_is_readable(outputs):
    for name, text in outputs.items():
        assert "\x1b[" not in text, f"{name}: ANSI escapes in captured text"
        assert max(len(line) for line in text.splitlines()) <= WIDTH
    for code in ("value-head-present", "adapter-needs-merge", "eos-mismatch"):
        assert code in outputs["inspect"]
    for check in ("files", "tensor-names", "weights", "logprobs", "greedy", "engine-load", "engine-parity"):
        assert re.search(rf"^\W*{check}\s.*PASS", outputs["verify"], re.M), check
    assert "OK:" in outputs["verify"]
    assert re.search(r"^\W*weights\s.*FAIL", outputs["verify_fail"], re.M) and "FAILED: weights" in \
        outputs["verify_fail"]


def test_docs_terminal_md_is_current(outputs):
    text = document(outputs)
    if os.environ.get("RLEXPORT_UPDATE_DOCS"):
        DOC.write_text(text)
    assert DOC.is_file(), "run RLEXPORT_UPDATE_DOCS=1 pytest tests/test_render.py"
    assert masked(DOC.read_text()) == masked(text), \
        "docs/terminal.md is stale: RLEXPORT_UPDATE_DOCS=1 pytest tests/test_render.py"
