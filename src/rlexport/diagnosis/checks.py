"""The checks behind `rlexport inspect`: each takes the Source and the Facts and returns Findings."""
from __future__ import annotations

from collections import Counter
from typing import Callable

import torch

from .. import archs
from ..findings import Finding
from ..folder import token_id, tokenizer_eos_id
from ..formats import Source
from ..formats.common import json_or_empty
from ..tensors import FLOATS
from ..transforms import clean_name
from .facts import (VHEAD_ERROR, all_refs, arch_of, architecture_known, export_cmd, Facts,
                    gather, names_of, optimizer_files)


def check_stage(src: Source, facts: Facts) -> list[Finding]:
    if src.stage == "rm":
        return [Finding("reward-model", "info", "reward-model (stage rm) checkpoint: the LM head is untrained",
                        "served as a causal LM it would generate from the base's head",
                        export_cmd(src, " --target value"))]
    return []


def check_value_head(src: Source, facts: Facts) -> list[Finding]:
    if not src.value_head:
        return []
    f = src.value_head_file
    inside = f is not None and f.name.startswith(("model", "pytorch_model")) and src.adapter is None
    where = "inside the model weights" if inside else f"in {f.name if f else '?'}"
    indexed = (src.path / "model.safetensors.index.json").is_file()
    if src.kind == "hf" and f is not None and (inside or (f.suffix == ".safetensors" and not indexed)):
        # without an index vLLM loads every *.safetensors in the folder, value_head.safetensors included
        engine = f"vLLM: {VHEAD_ERROR.format(arch=arch_of(src))}"
    else:
        engine = "vLLM and transformers ignore it: the value model is lost unless exported with --target value"
    role = "reward" if src.facts.pooling == "last" else "value"
    head = src.head
    if head.convention != "trl-v-head":
        return _sequence_head(src, head, role) + _normalization(src, head)
    return [Finding("value-head-present", "warning", f"a TRL/LLaMA-Factory {role} head (v_head.summary) is {where}",
                    engine, f"{export_cmd(src)} (policy) and {export_cmd(src, ' --target value')}",
                    str(f or ""), names_of(src.value_head))]


CONVENTIONS = {"openrlhf": "an OpenRLHF {arch} ({prefix}.weight [1, H], no bias; a class created at run time)",
               "sequence-classification": "a *ForSequenceClassification reward model (TRL RewardTrainer: score "
                                          "without bias)",
               "token-classification": "a token-classification critic (score.weight + score.bias; verl saves it "
                                       "with the base's causal-LM config.json)"}
ENGINES = {"openrlhf": "vLLM: ValueError: Model architectures ['{arch}'] are not supported for now; transformers "
                       "cannot import the class either",
           "sequence-classification": "vLLM serves it with a sigmoid on the one label (squashed rewards) unless "
                                      "told use_activation=False; transformers drops nothing",
           "token-classification": "vLLM and transformers load it as a causal LM: the score head is ignored and "
                                   "lm_head is random"}


def _sequence_head(src: Source, head, role: str) -> list[Finding]:
    arch = (src.config.get("architectures") or ["?"])[0] if head.convention != "openrlhf" else \
        ("RewardModel" if head.pooling == "last" else "CriticModel")
    what = CONVENTIONS[head.convention].format(arch=arch, prefix=head.prefix)
    return [Finding("value-head-present", "warning", f"{what}: the {role} model's head", ENGINES[head.convention]
                    .format(arch=arch), export_cmd(src, " --target value"), str(src.value_head_file or ""),
                    names_of(src.value_head))]


def _normalization(src: Source, head) -> list[Finding]:
    if not head.normalizable:
        return []
    said = "true" if head.normalize_in_config else "false (OpenRLHF's reward trainer always saves false)"
    return [Finding("reward-normalization", "info", f"config.json carries the reward normalisation mean "
                    f"{head.mean:g}, std {head.std:g} (normalize_reward: {said}); the export folds it into the "
                    f"head: served = (score - {head.mean:g}) / {head.std:g}, what the PPO run that used the model "
                    "computes", "", f"{export_cmd(src, ' --target value')}; add --no-normalize for the raw head",
                    str(src.path / "config.json"))]


def check_adapter(src: Source, facts: Facts) -> list[Finding]:
    if src.adapter is None:
        return []
    a = src.adapter
    out = [Finding("adapter-needs-merge", "warning", f"{a.config.get('peft_type', 'LORA')} adapter (r={a.rank}, "
                   f"{len(a.modules)} modules) is not merged; base: {src.base_dir}",
                   f"vLLM: '{src.path}' has no config.json, so it cannot be served as a model; runtime LoRA needs "
                   f"--enable-lora --max-lora-rank {max(16, a.rank)} and the base",
                   export_cmd(src), str(a.path))]
    if a.full:
        out.append(Finding("adapter-full-modules", "info", f"the adapter carries {len(a.full)} full tensors "
                           f"(modules_to_save / embeddings): {', '.join(list(a.full)[:3])}",
                           "vLLM's runtime LoRA: modules_to_save other than classifier/score are rejected",
                           export_cmd(src), str(a.path), tuple(a.full)))
    return out


def check_base_shapes(src: Source, facts: Facts) -> list[Finding]:
    """Adapter A/B shapes against the base weights, from headers (what PEFT's load_state_dict would say)."""
    if src.adapter is None:
        return []
    base = {clean_name(r.name): r for r in src.weights}
    missing, wrong = [], []
    for target, u in src.adapter.modules.items():
        w = base.get(target)
        if w is None:
            missing.append(u.module)
        elif u.a is not None and u.b is not None and len(w.shape) == 2 and u.kind == "linear" and \
                {(u.b.shape[0], u.a.shape[1]), (u.a.shape[1], u.b.shape[0])}.isdisjoint({tuple(w.shape)}):
            wrong.append((u, w))
    if missing:
        return [Finding("base-shape-mismatch", "error", f"the adapter targets {len(missing)} modules the base does "
                        f"not have (e.g. {missing[0]})",
                        f"PEFT: ValueError: Target modules {set(missing[:3])} not found in the base model.",
                        "pass --base with the model the adapter was trained on", str(src.base_dir),
                        tuple(missing))]
    if wrong:
        u, w = wrong[0]
        # what PEFT builds for the base's layer, and which saved tensor does not fit it
        part, saved, built = ("lora_A", u.a.shape, (u.a.shape[0], w.shape[1])) \
            if tuple(u.a.shape) != (u.a.shape[0], w.shape[1]) else ("lora_B", u.b.shape, (w.shape[0], u.b.shape[1]))
        key = f"base_model.model.{u.module}.{part}.default.weight"
        return [Finding("base-shape-mismatch", "error", f"{len(wrong)} adapted modules do not fit the base: "
                        f"{u.target} is {list(w.shape)} in the base, the adapter's delta "
                        f"{[u.b.shape[0], u.a.shape[1]]}",
                        f"PEFT: size mismatch for {key}: copying a param with shape {torch.Size(saved)} from "
                        f"checkpoint, the shape in current model is {torch.Size(built)}.",
                        "pass --base with the model the adapter was trained on", str(src.base_dir),
                        tuple(x.target for x, _ in wrong))]
    return []


def check_dtype(src: Source, facts: Facts) -> list[Finding]:
    counts = Counter(r.dtype for r in src.weights if r.dtype in FLOATS)
    if src.adapter is not None or not counts or counts.most_common(1)[0][0] != torch.float32:
        return []
    return [Finding("fp32-weights", "warning", "weights are float32 (the trainer's upcast), twice the size",
                    "vLLM --dtype auto serves float32 checkpoints in a 16-bit dtype it picks (float16 for pooling "
                    "models), which can overflow",
                    export_cmd(src, " (writes the base's 16-bit dtype; --dtype bfloat16 to choose)"))]


def check_values(src: Source, facts: Facts) -> list[Finding]:
    out = []
    empty = [r for r in all_refs(src) if r.numel == 0 and r.dtype in FLOATS]
    if empty:
        out.append(Finding("zero3-placeholder", "error", f"{len(empty)} tensors are empty [0]-shaped placeholders "
                           "(DeepSpeed ZeRO-3 saved without gathering the weights)",
                           f"vLLM/transformers: ValueError: Trying to set a tensor of shape torch.Size([0]) in "
                           f"\"weight\" ... this looks incorrect (or size mismatch for {clean_name(empty[0].name)})",
                           "rlexport reads the fp32 partitions in global_stepN/ directly: rlexport export "
                           f"{src.path} --out OUT --tag global_stepN (no DeepSpeed needed)", empty[0].origin, names_of(empty)))
    if not facts.scanned:
        total = sum(r.nbytes for r in src.weights)
        out.append(Finding("values-not-scanned", "info", f"tensor values were not read ({total / 1e9:.1f} GB): "
                           "NaN/Inf and float16 range unchecked", "",
                           f"rlexport inspect {src.path} --scan (streams every tensor once)"))
        return out
    if facts.nonfinite:
        out.append(Finding("nonfinite-weights", "error", f"{len(facts.nonfinite)} tensors hold NaN or Inf "
                           f"(e.g. {facts.nonfinite[0]})",
                           "vLLM/transformers load them; generation fails with RuntimeError: probability tensor "
                           "contains either inf, nan or element < 0, or emits one token forever",
                           "the run diverged: export an earlier checkpoint (or --allow-nonfinite to keep them)",
                           "", tuple(facts.nonfinite)))
    if facts.overflow:
        out.append(Finding("fp16-overflow-risk", "warning", f"{len(facts.overflow)} tensors exceed float16's "
                           f"range (|x| up to {facts.peak:.4g} > 65504)",
                           "served in float16 (vLLM --dtype half, or auto on GPUs without bf16) they become Inf: "
                           "NaN logits, '!!!!' output",
                           export_cmd(src, " --dtype bfloat16 (never float16)"), "", tuple(facts.overflow)))
    return out


def check_vocab(src: Source, facts: Facts) -> list[Finding]:
    rows, vocab, tok = facts.embedding_rows, src.config.get("vocab_size"), facts.tokenizer_size
    out = []
    if rows is not None and vocab is not None and rows != vocab:
        out.append(Finding("vocab-resized", "warning", f"the embedding has {rows} rows, config.json's vocab_size "
                           f"is {vocab}",
                           f"vLLM: AssertionError in VocabParallelEmbedding.weight_loader (rows != org_vocab_size); "
                           f"transformers: size mismatch for model.embed_tokens.weight "
                           f"([{rows}, …] vs [{vocab}, …])",
                           export_cmd(src) + " (writes vocab_size = embedding rows)"))
    if rows is not None and tok is not None and tok > rows:
        out.append(Finding("tokenizer-exceeds-embedding", "error", f"the tokenizer has {tok} tokens but the "
                           f"embedding only {rows} rows",
                           f"vLLM: ValueError: Token id {rows} is out of vocabulary (any id >= {rows}); "
                           "transformers: IndexError: index out of range in self",
                           "export with the tokenizer the model was trained with (the checkpoint's, not the base's), "
                           "or resize the embedding before training"))
    return out


def check_ties(src: Source, facts: Facts) -> list[Finding]:
    emb, head = archs.embedding_pair(src.config)
    tied = archs.is_tied(src.config)
    names = {clean_name(r.name): r for r in src.weights}
    if src.adapter is not None:
        touched = sorted({u.target for u in src.adapter.updates} | set(src.adapter.full)) if tied else []
        touched = [n for n in touched if n in (emb, head)]
        if touched:
            return [Finding("tied-embeddings-split", "warning", f"the base ties {head} to {emb} but the adapter "
                            f"trains its own copy of {', '.join(touched)}",
                            "vLLM skips lm_head.weight when config.json ties it: the trained side is dropped "
                            "silently", export_cmd(src) + " (unties and writes tie_word_embeddings: false)",
                            str(src.adapter.path), tuple(touched))]
        return []
    if tied and emb in names and head in names and "policy" in src.targets:
        e, h = names[emb], names[head]
        if e.shape != h.shape or not torch.equal(e.load(), h.load()):
            return [Finding("tied-embeddings-split", "warning", f"config.json ties {head} to {emb}, but the "
                            f"stored {head} differs from it", "vLLM skips lm_head.weight for tied models "
                            "(AutoWeightsLoader) and transformers re-ties it on load: the trained head is replaced "
                            "by the embedding, silently", export_cmd(src) + " (writes tie_word_embeddings: false)",
                            h.origin, (head,))]
    if not tied and emb in names and head not in names and "policy" in src.targets:
        return [Finding("lm-head-missing", "error", f"config.json unties the output layer but no {head} is stored",
                        f"vLLM: ValueError: Following weights were not initialized from checkpoint: {{'{head}'}}; "
                        f"transformers: {head} MISSING (newly initialized at random)",
                        export_cmd(src) + " (re-ties it: tie_word_embeddings: true)")]
    return []


def check_files(src: Source, facts: Facts) -> list[Finding]:
    out = []
    if not src.tokenizer_dirs:
        return [Finding("missing-tokenizer", "error", "no tokenizer in the checkpoint or the base",
                        f"vLLM/transformers: OSError: {src.path} does not appear to have a file named "
                        "tokenizer_config.json (or a tokenizer model)", "pass --base with the base model that has one")]
    tdir = src.tokenizer_dirs[0]
    has_template = any((d / "chat_template.jinja").is_file() or (d / "chat_template.json").is_file() or
                       "chat_template" in json_or_empty(d / "tokenizer_config.json") for d in src.tokenizer_dirs)
    if not has_template:
        out.append(Finding("missing-chat-template", "warning", "no chat template in the checkpoint or the base",
                           "vLLM /v1/chat/completions: ValueError: As of transformers v4.44, default chat template "
                           "is no longer allowed, so you must provide a chat template if the tokenizer does not "
                           "define one.", "add the template the model was trained with (chat_template.jinja) or "
                           "serve with --chat-template FILE"))
    gen_dirs = [d for d in (src.config_dir, src.path, src.base_dir) if d and (d / "generation_config.json").is_file()]
    if not gen_dirs:
        out.append(Finding("missing-generation-config", "info", "no generation_config.json",
                           "vLLM builds one from config.json: only its eos_token_id stops generation",
                           export_cmd(src) + " (writes one with every eos id)"))
    eos = tokenizer_eos_id(src)
    eos_token = json_or_empty(tdir / "tokenizer_config.json").get("eos_token")
    if eos is None and (eos_token is None or token_id(tdir, eos_token) is None):
        out.append(Finding("missing-eos", "warning", f"the tokenizer in {tdir.name}/ defines no eos token",
                           "vLLM stops only on generation_config's eos_token_id; without one it runs to max_tokens",
                           "set eos_token in tokenizer_config.json to the token that ends a turn"))
    gen_eos = json_or_empty(gen_dirs[0] / "generation_config.json").get("eos_token_id") if gen_dirs else \
        src.config.get("eos_token_id")
    gen_ids = gen_eos if isinstance(gen_eos, list) else [gen_eos]
    if eos is not None and eos not in gen_ids:
        out.append(Finding("eos-mismatch", "warning", f"the tokenizer's eos (id {eos}, from {tdir.name}/) is not in "
                           f"generation_config's eos_token_id {gen_eos}",
                           "vLLM stops on both, transformers generate() only on generation_config's: a turn may "
                           "not end", export_cmd(src) + " (lists both ids)"))
    return out


def check_architecture(src: Source, facts: Facts) -> list[Finding]:
    arch = arch_of(src)
    auto_map = src.config.get("auto_map")
    if auto_map:
        files = sorted({str(v).split(".")[0] + ".py" for v in (auto_map.values() if isinstance(auto_map, dict)
                        else []) if isinstance(v, str) and "--" not in v})
        here = [d for d in (src.config_dir, src.path) if d]
        lost = [f for f in files if not any((d / f).is_file() for d in here)]
        return [Finding("remote-code", "error" if lost else "warning",
                        f"{arch} is defined by the checkpoint's own code (auto_map: {', '.join(files) or '?'})"
                        + (f"; {', '.join(lost)} missing" if lost else ""),
                        "transformers: ValueError: Loading this model requires you to execute custom code contained "
                        "in the model repository on your local machine. Please set the option `trust_remote_code="
                        "True` to permit loading of this model. (vLLM: --trust-remote-code)",
                        "copy the modeling/configuration .py files auto_map names into the export and serve with "
                        "--trust-remote-code", str(src.config_dir))]
    known = architecture_known(arch)
    if arch != "?" and known is False:
        in_vllm = architecture_known(arch, "vllm")
        engine = f"transformers: no class {arch}" + (
            f"; vLLM: ValueError: Model architectures ['{arch}'] are not supported for now." if in_vllm is False
            else "")
        return [Finding("unknown-architecture", "error", f"architectures[0] = {arch} is not a transformers class",
                        engine, "set architectures in config.json to the class the weights belong to "
                        "(e.g. the base model's)", str(src.config_dir / "config.json"))]
    return []


def check_pieces(src: Source, facts: Facts) -> list[Finding]:
    out = []
    for p in src.pieces:
        if p.kind == "reward-adapter":
            out.append(Finding("reward-adapter-beside", "info", f"{p.path.name}/ holds the PPO reward model's "
                               "adapter; its value head was not saved with it (LLaMA-Factory keeps it in memory)",
                               "not part of the policy; exporting it alone would make up a head",
                               "export the reward model from its own RM run folder with --target value",
                               str(p.path)))
    opt = optimizer_files(src)
    if opt:
        out.append(Finding("optimizer-state", "info", f"{len(opt)} optimizer/trainer-state files "
                           f"({sum(f.stat().st_size for f in opt) / 1e6:.1f} MB) beside the weights",
                           "not loaded by vLLM or transformers", "nothing to do: rlexport export leaves them out",
                           str(opt[0])))
    return out


CHECKS: tuple[Callable[[Source, Facts], list[Finding]], ...] = (
    check_stage, check_value_head, check_adapter, check_base_shapes, check_architecture, check_dtype, check_values,
    check_vocab, check_ties, check_files, check_pieces,
)


def diagnose(src: Source, *, scan: bool | str = "auto") -> list[Finding]:
    facts = gather(src, scan=scan)
    return [f for check in CHECKS for f in check(src, facts)]
