"""The non-weight files of an export: config.json, generation_config.json, tokenizer, chat template and, for a
vision-language model, the processor files."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch

from . import archs, moe
from .errors import RlexportError
from .formats import Source
from .formats.common import TOKENIZER_FILES, json_or_empty
from .tensors import TensorRef, dtype_name

# Keys trainers flip for training that make no sense when serving.
SERVING_DEFAULTS = {"use_cache": True}
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
SCORE = "score.weight"
# What a vision-language model's processor reads besides the tokenizer: transformers < 5 writes the image
# processor to preprocessor_config.json (+ video_preprocessor_config.json), transformers 5 both into
# processor_config.json. vLLM will not start without the image processor's.
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json")
IMAGE_PROCESSOR = "preprocessor_config.json or processor_config.json"


def architecture(config: dict, target: str, *, file) -> str:
    """The class the export is loaded as: the base's causal LM (policy) or its token classifier (value)."""
    vision = archs.vision_of(config)
    if vision is not None and target != "policy":
        # verl's critic on Qwen2.5-VL is TRL's value head around the conditional-generation model: neither
        # transformers nor vLLM has a token-classification class for a vision-language model to serve it as
        raise RlexportError("target-unavailable", f"a value head on a vision-language model ({vision.cls}) has no "
                            "token-classification class in transformers or vLLM to be served as", file=file,
                            hint="export the policy (--target policy); the value head stays in the checkpoint")
    for arch in config.get("architectures") or []:
        for suffix in CAUSAL_SUFFIXES:
            if arch.endswith(suffix):
                return arch if target == "policy" else arch[: -len(suffix)] + "ForTokenClassification"
    if vision is not None:
        return vision.cls
    what = "a causal LM" if target == "policy" else "a token-classification architecture"
    raise RlexportError("no-causal-architecture", f"cannot derive {what} from architectures "
                        f"{config.get('architectures')}", file=file,
                        hint="pass --base the causal-LM model the checkpoint was trained from")


def _text(cfg: dict) -> dict:
    """The sub-config that describes the language model (multimodal configs nest it in text_config)."""
    return cfg["text_config"] if isinstance(cfg.get("text_config"), dict) and "vocab_size" not in cfg else cfg


def derive_config(src: Source, refs: list[TensorRef], *, dtype: torch.dtype, target: str,
                  record: dict | None = None, quantization: dict | None = None) -> dict:
    """config.json for exactly the tensors that will be written: the one place every target's config comes from.

    The base's config supplies what the tensors cannot say (layers, rope, eos ...); everything the tensors do
    say wins: vocab_size and hidden_size from the embedding, tie_word_embeddings from whether an output layer
    is written, num_labels from the score head, architectures from the target.
    """
    cfg = copy.deepcopy(src.config)
    text = _text(cfg)
    by_name = {r.name: r for r in refs}
    emb_name, head_name = archs.embedding_pair(cfg)
    emb = by_name.get(emb_name)
    name = dtype_name(dtype)
    cfg["torch_dtype"] = name  # transformers < 5 and vLLM's older readers
    cfg["dtype"] = name        # transformers >= 5
    if emb is not None and len(emb.shape) == 2:
        text["vocab_size"] = emb.shape[0]
        if "hidden_size" in text:
            text["hidden_size"] = emb.shape[1]
    tied = target == "policy" and emb is not None and head_name not in by_name
    cfg["tie_word_embeddings"] = tied
    if isinstance(cfg.get("text_config"), dict):
        cfg["text_config"]["tie_word_embeddings"] = tied
    for sub in ("text_config", "vision_config"):  # transformers 5 reads each sub-config's own dtype
        if isinstance(cfg.get(sub), dict):
            cfg[sub]["dtype"] = name
            if "torch_dtype" in cfg[sub]:
                cfg[sub]["torch_dtype"] = name
    cfg["architectures"] = [architecture(src.config, target, file=src.path)]
    moe.hub_config(cfg)  # the expert count under the hub config's key (what transformers 4.x reads)
    if SCORE in by_name:
        n = by_name[SCORE].shape[0]
        labels = ["value"] if n == 1 else [f"LABEL_{i}" for i in range(n)]
        cfg.update(num_labels=n, id2label={str(i): lab for i, lab in enumerate(labels)},
                   label2id={lab: i for i, lab in enumerate(labels)}, problem_type="regression")
    cfg.update(SERVING_DEFAULTS)
    if record is not None:
        cfg["rlexport"] = record
    if quantization is not None:  # a --quantize export (rlexport.quant): compressed-tensors
        cfg["quantization_config"] = quantization
    return cfg


def tokenizer_dir(src: Source) -> Path | None:
    return src.tokenizer_dirs[0] if src.tokenizer_dirs else None


def copy_tokenizer(src: Source, out: Path) -> list[str]:
    """Copy the tokenizer the model was trained with (the checkpoint's, else the base's)."""
    tdir = tokenizer_dir(src)
    if tdir is None:
        return []
    copied = []
    for name in TOKENIZER_FILES:
        if (tdir / name).is_file():
            shutil.copyfile(tdir / name, out / name)
            copied.append(name)
    # A chat template only the base carries still belongs to the model.
    if not any(n in copied for n in ("chat_template.jinja", "chat_template.json")) and \
            "chat_template" not in json_or_empty(tdir / "tokenizer_config.json"):
        for d in src.tokenizer_dirs[1:]:
            if (d / "chat_template.jinja").is_file():
                shutil.copyfile(d / "chat_template.jinja", out / "chat_template.jinja")
                copied.append("chat_template.jinja")
                break
    return copied + copy_processor(src, out, copied)


def _dirs(src: Source) -> list[Path]:
    """Where the checkpoint's own files are (first), then the base's."""
    out = []
    for d in (*src.tokenizer_dirs, src.config_dir, src.path, src.base_dir):
        if d is not None and Path(d).is_dir() and Path(d) not in out:
            out.append(Path(d))
    return sorted(out, key=lambda d: d == src.base_dir)


def _has_image_processor(d: Path) -> bool:
    return (d / "preprocessor_config.json").is_file() or \
        "image_processor" in json_or_empty(d / "processor_config.json")


def processor_dir(src: Source) -> Path:
    """The folder whose processor files a vision-language export carries: the checkpoint's as the trainer saved
    them, else the base's. Refused (missing-processor-file) when neither has the image processor's config."""
    dirs = _dirs(src)
    found = next((d for d in dirs if _has_image_processor(d)), None)
    if found is None:
        where = ", ".join(str(d) for d in dirs) or "nowhere (no checkpoint or base folder)"
        raise RlexportError("missing-processor-file", f"vision-language model without its image processor: no "
                            f"{IMAGE_PROCESSOR} in {where}", file=src.path,
                            hint="pass --base the model the run started from, or copy the file from it into the "
                                 "checkpoint")
    return found


def copy_processor(src: Source, out: Path, copied: list[str]) -> list[str]:
    """A vision-language model's processor files, and the chat template its chat needs (LLM.chat refuses a
    model without one): from the checkpoint, else from the base."""
    if archs.vision_of(src.config) is None:
        return []
    pdir = processor_dir(src)
    names = [n for n in PROCESSOR_FILES if (pdir / n).is_file()]
    for n in names:
        shutil.copyfile(pdir / n, out / n)
    if not _has_chat_template(out):
        for d in _dirs(src):
            n = next((n for n in ("chat_template.jinja", "chat_template.json") if (d / n).is_file()), None)
            if n is not None:
                shutil.copyfile(d / n, out / n)
                names.append(n)
                break
        else:
            where = ", ".join(str(d) for d in _dirs(src))
            raise RlexportError("missing-processor-file", "vision-language model without a chat template: no "
                                f"chat_template.jinja, chat_template.json or tokenizer_config.json chat_template "
                                f"in {where}", file=src.path,
                                hint="pass --base the model the run started from, or copy its chat template into "
                                     "the checkpoint")
    return names


def _has_chat_template(d: Path) -> bool:
    return (d / "chat_template.jinja").is_file() or (d / "chat_template.json").is_file() or \
        "chat_template" in json_or_empty(d / "tokenizer_config.json")


def token_id(tdir: Path | None, token) -> int | None:
    """Id of a special token string, read from tokenizer.json / tokenizer_config.json without loading it."""
    if tdir is None or token is None:
        return None
    if isinstance(token, dict):
        token = token.get("content")
    for added in json_or_empty(tdir / "tokenizer.json").get("added_tokens", []):
        if added.get("content") == token:
            return int(added["id"])
    for tid, spec in json_or_empty(tdir / "tokenizer_config.json").get("added_tokens_decoder", {}).items():
        if spec.get("content") == token:
            return int(tid)
    vocab = json_or_empty(tdir / "tokenizer.json").get("model", {}).get("vocab", {})
    return vocab.get(token) if isinstance(vocab, dict) else None


def tokenizer_eos_id(src: Source) -> int | None:
    tdir = tokenizer_dir(src)
    return token_id(tdir, json_or_empty(tdir / "tokenizer_config.json").get("eos_token")) if tdir else None


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def generation_config(src: Source) -> dict:
    """The base's (or checkpoint's) generation config with every turn-ending id in eos_token_id.

    Chat templates often change the tokenizer's eos (LLaMA-Factory's qwen template sets <|im_end|>) while
    generation_config keeps the pretraining eos; vLLM stops on the union, so list both.
    """
    gen = {}
    for d in (src.config_dir, src.path, src.base_dir):
        if d is not None and (d / "generation_config.json").is_file():
            gen = json_or_empty(d / "generation_config.json")
            break
    eos = []
    for v in (tokenizer_eos_id(src), *_ids(gen.get("eos_token_id")), *_ids(src.config.get("eos_token_id"))):
        if v is not None and v not in eos:
            eos.append(v)
    gen.pop("_from_model_config", None)
    if eos:
        gen["eos_token_id"] = eos if len(eos) > 1 else eos[0]
    if "pad_token_id" not in gen and src.config.get("pad_token_id") is not None:
        gen["pad_token_id"] = src.config["pad_token_id"]
    return gen


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
