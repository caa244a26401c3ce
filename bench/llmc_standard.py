"""The standard quantized-export path: transformers + PEFT merge (bf16) + llm-compressor `oneshot`, data-free.

Run with the llm-compressor venv (it cannot share rlexport's .venv; peft installed into it):

    $LLMC_PYTHON bench/llmc_standard.py BASE ADAPTER OUT SCHEME      # SCHEME: W8A8 | W4A16

`AutoModelForCausalLM.from_pretrained(bf16)`, `PeftModel.from_pretrained`, `merge_and_unload`, then
`oneshot(model=..., recipe=QuantizationModifier(targets="Linear", scheme=SCHEME, ignore=["lm_head"]),
output_dir=OUT, save_compressed=True)` (the call tests/fixtures/make/llmc/make_llmc.py makes), then `os.sync()`.
Prints one JSON line with the time of each phase.
"""
from __future__ import annotations

import json
import os
import sys
import time

t0 = time.perf_counter()
import torch  # noqa: E402
from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from llmcompressor import oneshot  # noqa: E402
from llmcompressor.modifiers.quantization import QuantizationModifier  # noqa: E402


def main(base: str, adapter: str, out: str, scheme: str) -> None:
    phases = {"import": time.perf_counter() - t0}
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    phases["load base"] = time.perf_counter() - t
    t = time.perf_counter()
    model = PeftModel.from_pretrained(model, adapter)
    phases["load adapter"] = time.perf_counter() - t
    t = time.perf_counter()
    model = model.merge_and_unload()
    phases["merge"] = time.perf_counter() - t
    t = time.perf_counter()
    recipe = QuantizationModifier(targets="Linear", scheme=scheme, ignore=["lm_head"])
    oneshot(model=model, recipe=recipe, output_dir=out, save_compressed=True)
    phases["oneshot + save"] = time.perf_counter() - t
    t = time.perf_counter()
    os.sync()
    phases["sync"] = time.perf_counter() - t
    print(json.dumps({"phases": phases}), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:5])
