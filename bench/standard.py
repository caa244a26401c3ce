"""The standard path, as users write it: transformers + PEFT in bf16, merge_and_unload, save_pretrained, sync.

Prints one JSON line with the time of each phase (imports included in the process's wall time, measured by
the caller).
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


def main(base: str, adapter: str, out: str) -> None:
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
    model.save_pretrained(out)
    phases["save"] = time.perf_counter() - t
    t = time.perf_counter()
    os.sync()
    phases["sync"] = time.perf_counter() - t
    print(json.dumps({"phases": phases}), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:4])
