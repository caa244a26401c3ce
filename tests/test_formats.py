"""The registry (src/rlexport/formats/__init__.py): one way in, --tag and --adapter through the formats' hooks,
and the stage table that says which targets a checkpoint offers."""
from __future__ import annotations

from pathlib import Path

import pytest

from factories import FIXTURES
from rlexport import RlexportError
from rlexport.export import plan
from rlexport.formats import FORMATS, STAGES, _module, open_checkpoint, stage_facts, steps_of


def test_every_format_module_has_the_contract_and_its_kind_name():
    for fmt in FORMATS:
        mod = _module(fmt)
        assert callable(mod.detect) and callable(mod.read), fmt.kind
        # the kind and the module agree: verl-megatron lives in verl_megatron.py
        assert fmt.module.rsplit(".", 1)[-1] == fmt.kind.replace("-", "_"), fmt


@pytest.mark.parametrize("case, tag, expect_parent", [
    ("ds_z2_ws2", "global_step4", "global_step4"),          # DeepSpeed: the tag folder beside complete HF weights
    ("verl_fsdp2_actor_qwen2", "global_step_4", "actor"),    # verl: the step's actor/
    ("verl_fsdp2_actor_qwen2", "4", "actor"),                # verl takes the bare number too
])
def test_tag_goes_through_the_owning_formats_hook(case, tag, expect_parent):
    ckpt = FIXTURES / case / "ckpt"
    src = open_checkpoint(ckpt, tag=tag)
    origins = {Path(r.origin).parent.name for r in src.weights}
    assert origins == {expect_parent}, origins


def test_tag_on_a_folder_no_format_steps_is_refused_in_one_line():
    with pytest.raises(RlexportError) as e:
        open_checkpoint(FIXTURES / "lf_ppo_full_qwen2" / "ckpt", tag="global_step_1")
    assert e.value.code == "tag-not-found" and "run folder" in e.value.hint
    with pytest.raises(RlexportError) as e:
        open_checkpoint(FIXTURES / "nowhere", tag="x")
    assert e.value.code == "missing-input"


def test_adapter_goes_through_the_peft_hook(tmp_path):
    ckpt = FIXTURES / "lf_ppo_lora_qwen2" / "ckpt"
    assert open_checkpoint(ckpt).stage == "ppo"
    reward = open_checkpoint(ckpt, adapter="reward")
    assert reward.path.name == "reward" and reward.stage == "ppo-reward-adapter"
    with pytest.raises(RlexportError) as e:
        open_checkpoint(ckpt, adapter="nope")
    assert e.value.code == "adapter-not-found" and "reward" in e.value.message


def test_stage_table_drives_targets_and_refusals():
    rm = open_checkpoint(FIXTURES / "lf_rm_lora_qwen2" / "ckpt")
    assert rm.stage == "rm" and rm.targets == ("value",) and rm.facts.pooling == "last"
    with pytest.raises(RlexportError) as e:
        plan(rm, target="policy")
    assert e.value.code == "rm-has-no-policy"
    ppo = open_checkpoint(FIXTURES / "lf_ppo_lora_qwen2" / "ckpt")
    assert ppo.targets == ("policy", "value") and ppo.refusal("policy") is None
    reward = open_checkpoint(FIXTURES / "lf_ppo_lora_qwen2" / "ckpt" / "reward")
    assert reward.targets == ()
    for target in ("policy", "value"):
        with pytest.raises(RlexportError) as e:
            plan(reward, target=target)
        assert e.value.code == "reward-adapter-without-head"
    # a stage no reader sets is read as unknown: policy, and value only with a head
    assert stage_facts("no-such-stage") is STAGES[None]
    assert set(STAGES) >= {None, "ppo", "rm", "critic", "ppo-reward-adapter"}


def test_steps_of_a_folder_that_is_no_run_is_empty():
    # a plain model folder (the base of a run) has no checkpoints of its own
    assert steps_of(FIXTURES / "lf_ppo_full_qwen2" / "base") == []
