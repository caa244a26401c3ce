"""rlexport.checks: the export's self-check without transformers in the export process (issue 27), its facts
cache, and the facts a child process computes equal to the ones computed in-process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from factories import FIXTURES
from rlexport.checks import cache
from rlexport.checks.facts import Facts, compute

CKPT = FIXTURES / "lf_ppo_full_qwen2" / "ckpt"

# Run in a fresh interpreter: the test process has transformers imported, so its exports compute the facts in-process.
SCRIPT = textwrap.dedent("""
    import dataclasses, json, os, sys
    from pathlib import Path
    import torch
    import rlexport
    import rlexport.checks.selfcheck as sc
    from rlexport.errors import RlexportError
    from rlexport.export import plan, write
    from rlexport.formats import open_checkpoint
    from rlexport.tensors import TensorRef

    ckpt, tmp = Path(sys.argv[1]), Path(sys.argv[2])
    small, sc.CHILD_MIN_BYTES = sc.CHILD_MIN_BYTES, 0  # the fixture is tiny: take the large exports' path
    out = {}
    def run(name, fn):
        try:
            fn()
            out[name] = "ok"
        except RlexportError as e:
            out[name] = e.code + ": " + e.message
        out[name + "-cached"] = len(list(Path(os.environ["RLEXPORT_CACHE_DIR"]).glob("*.json")))

    run("first", lambda: rlexport.export(ckpt, tmp / "a"))          # a miss: the facts from a child process
    run("again", lambda: rlexport.export(ckpt, tmp / "b"))          # a hit
    p = plan(open_checkpoint(ckpt))
    stray = TensorRef("v_head.summary.weight", torch.bfloat16, (1, 128), lambda: torch.zeros(1, 128, dtype=torch.bfloat16), "t")
    bad = dataclasses.replace(p, tensors=p.tensors + (stray,))
    run("stray-hit", lambda: write(bad, tmp / "c"))                  # caught on the plan, before any weight
    os.environ["RLEXPORT_CACHE_DIR"] = str(tmp / "cache2")
    run("stray-miss", lambda: write(bad, tmp / "d"))                 # caught on the written headers
    wide = dataclasses.replace(p, config={**p.config, "intermediate_size": p.config["intermediate_size"] * 2})
    run("shape-miss", lambda: write(wide, tmp / "e"))                # a config.json the tensors do not fit
    out["written"] = sorted(x.name for x in tmp.iterdir())
    out["transformers"] = "transformers" in sys.modules
    sc.CHILD_MIN_BYTES = small
    os.environ["RLEXPORT_CACHE_DIR"] = str(tmp / "cache3")
    run("small-miss", lambda: write(bad, tmp / "f"))                 # a small export: facts in-process, on the plan
    out["small-transformers"] = "transformers" in sys.modules
    print(json.dumps(out))
""")


def test_the_export_process_never_imports_transformers_and_still_catches_bad_plans(tmp_path):
    env = {**os.environ, "RLEXPORT_CACHE_DIR": str(tmp_path / "cache")}
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(CKPT), str(work)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["first"] == "ok" and r["again"] == "ok", r
    assert r["first-cached"] == 1 and r["again-cached"] == 1  # computed once, then read back
    for case in ("stray-hit", "stray-miss"):
        assert r[case].startswith("export-self-check: tensor-names") and "v_head.summary.weight" in r[case], r
    assert r["shape-miss"].startswith("export-self-check: tensor-shapes") and ".mlp." in r["shape-miss"], r
    assert r["written"] == ["a", "b", "cache2"]  # nothing committed for the bad plans, no temporary left
    assert r["transformers"] is False
    assert r["small-miss"].startswith("export-self-check: tensor-names") and r["small-transformers"] is True, r


def test_facts_survive_the_cache_unchanged(tmp_path, monkeypatch):
    monkeypatch.setenv("RLEXPORT_CACHE_DIR", str(tmp_path / "cache"))
    facts, live = compute(CKPT)
    assert live.model_cls.__name__ == "Qwen2ForCausalLM" and facts.has_class and facts.config_error is None
    assert facts.expected["model.embed_tokens.weight"] == (live.hf_config.vocab_size, live.hf_config.hidden_size)
    assert facts.tokenizer is not None and facts.tokenizer.size > 0 and facts.tokenizer.eos_token_id is not None
    k = cache.key(CKPT, cache.transformers_version())
    cache.save(k, facts)
    assert cache.load(k) == facts
    assert Facts.from_json(json.loads(json.dumps(facts.to_json()))) == facts


def test_the_key_follows_the_files_transformers_reads(tmp_path):
    for name in ("config.json", "tokenizer_config.json", "tokenizer.json", "generation_config.json"):
        (tmp_path / name).write_bytes((CKPT / name).read_bytes())
    k = cache.key(tmp_path, "5.0")
    assert cache.key(tmp_path, "5.0") == k
    assert cache.key(tmp_path, "5.1") != k  # another transformers version
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 1}))
    assert cache.key(tmp_path, "5.0") != k
    (tmp_path / "config.json").write_bytes((CKPT / "config.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text("{}")
    assert cache.key(tmp_path, "5.0") != k
