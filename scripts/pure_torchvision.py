"""Repack a torchvision wheel as a Python-only wheel for a CPU torch (used by scripts/setup.sh).

The only torchvision wheels the registry serves for torch 2.13.0 are CUDA builds: their native ops (_C.so,
image.so and the bundled CUDA/codec libraries) fail to load beside torch 2.13.0+cpu, and
`_meta_registrations.py` then calls torch.library.register_fake("torchvision::nms") on an operator that does
not exist, so `import torchvision` fails. transformers' Qwen2-VL image/video processors (which vLLM imports)
need only torchvision's pure-torch transforms. This drops the native files, makes the two unconditional
register_fake calls conditional on the native ops being there (as every other registration in that file
already is), and writes `torchvision-<version>-py3-none-any.whl`.

usage: python pure_torchvision.py TORCHVISION_WHEEL OUT_DIR
"""
from __future__ import annotations

import base64
import hashlib
import re
import sys
import zipfile
from pathlib import Path

FAKE = "@torch.library.register_fake("
GUARDED = "@(torch.library.register_fake if torchvision.extension._has_ops() else (lambda *a, **k: (lambda f: f)))("


def _native(name: str) -> bool:
    return name.endswith(".so") or ".so." in name or name.startswith("torchvision.libs/")


def repack(wheel: Path, out_dir: Path) -> Path:
    version = wheel.name.split("-")[1]
    out = out_dir / f"torchvision-{version}-py3-none-any.whl"
    records = []
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        record_name = next(n for n in src.namelist() if n.endswith(".dist-info/RECORD"))
        for info in src.infolist():
            name = info.filename
            if name.endswith("/") or _native(name) or name == record_name:
                continue
            data = src.read(name)
            if name == "torchvision/_meta_registrations.py":
                data = data.decode().replace(FAKE, GUARDED).encode()
            elif name.endswith(".dist-info/WHEEL"):
                text = re.sub(r"(?m)^Root-Is-Purelib:.*$", "Root-Is-Purelib: true", data.decode())
                data = re.sub(r"(?m)^Tag:.*$", "Tag: py3-none-any", text).encode()
            dst.writestr(name, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            records.append(f"{name},sha256={digest},{len(data)}")
        records.append(f"{record_name},,")
        dst.writestr(record_name, "\n".join(records) + "\n")
    return out


if __name__ == "__main__":
    print(repack(Path(sys.argv[1]), Path(sys.argv[2])))
