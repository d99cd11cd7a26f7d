"""LoRA for PPO (pipelines/ppo/lora.py) on the tiny random policy, without an engine."""

import copy

import pytest
import torch

from pipelines.models_init import build_tiny_policy
from pipelines.ppo import lora
from pipelines.ppo.models import ValueModel, load_policy, pack, policy_forward
from pipelines.ppo.train import reference_logprobs, trainable

BATCH = pack([[5, 6, 7], [8, 9]], [[10, 11, 12], [13]], pad_id=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_policy(tmp_path_factory.mktemp("lora") / "tiny", max_position_embeddings=256)


def perturbed(model):
    """The adapters moved away from their B = 0 start, as training would move them."""
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    return model


def test_fresh_adapters_change_nothing_and_only_adapters_train(tiny):
    base = load_policy(tiny)
    adapted = lora.add_adapters(load_policy(tiny), rank=4, alpha=8)
    torch.testing.assert_close(policy_forward(adapted, BATCH)[0], policy_forward(base, BATCH)[0])
    names = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert sum(p.numel() for p in trainable(adapted)) < 0.1 * sum(p.numel() for p in base.parameters())


def test_merged_weights_are_what_peft_merges_under_the_plain_model_names(tiny):
    adapted = perturbed(lora.add_adapters(load_policy(tiny), rank=4, alpha=8))
    merged = dict(lora.merged_weights(adapted))
    reference = copy.deepcopy(adapted).merge_and_unload().state_dict()
    assert merged.keys() == reference.keys() == load_policy(tiny).state_dict().keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(merged[name], tensor)
    # Computing them left the trained module untouched (no merge-unmerge rounding drift).
    assert any(".base_layer." in n for n in adapted.state_dict())
    torch.testing.assert_close(adapted.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight,
                               load_policy(tiny).model.layers[0].self_attn.q_proj.weight)


def test_the_reference_is_the_policy_with_adapters_off(tiny):
    base = load_policy(tiny)
    adapted = perturbed(lora.add_adapters(load_policy(tiny), rank=4, alpha=8))
    with torch.no_grad():
        ref = reference_logprobs(None, adapted, BATCH)
        now = policy_forward(adapted, BATCH)[0]
    torch.testing.assert_close(ref, policy_forward(base, BATCH)[0].detach())
    assert (now - ref).abs().max() > 1e-3  # the adapters are back on afterwards
    # A separate reference network is used as it is.
    torch.testing.assert_close(reference_logprobs(base, adapted, BATCH), policy_forward(base, BATCH)[0])


def test_the_critic_trains_its_adapters_and_its_whole_head(tiny):
    critic = ValueModel.from_policy_folder(tiny)
    critic.body = lora.add_adapters(critic.body, rank=4, alpha=8)
    state = lora.trainable_state(critic)
    assert {"head.weight", "head.bias"} <= state.keys()
    assert all(k.startswith("head.") or ".lora_" in k for k in state)
    assert critic(BATCH).shape == BATCH.response_ids.shape


def test_trainable_state_round_trips_and_a_foreign_one_is_refused(tiny):
    a = perturbed(lora.add_adapters(load_policy(tiny), rank=4, alpha=8))
    b = lora.add_adapters(load_policy(tiny), rank=4, alpha=8)
    lora.load_trainable_state(b, lora.trainable_state(a))
    torch.testing.assert_close(policy_forward(b, BATCH)[0], policy_forward(a, BATCH)[0])
    other_rank = lora.add_adapters(load_policy(tiny), rank=2, alpha=8, target_modules="q_proj,v_proj")
    with pytest.raises(ValueError, match="does not fit"):
        lora.load_trainable_state(other_rank, lora.trainable_state(a))


def test_a_tied_output_head_cannot_take_an_adapter(tiny):
    with pytest.raises(ValueError, match="lora_target_modules: .*ties lm_head"):
        lora.add_adapters(load_policy(tiny), rank=4, alpha=8, target_modules="q_proj,lm_head")


def test_a_plain_model_yields_its_own_weights(tiny):
    model = load_policy(tiny)
    assert dict(lora.merged_weights(model)).keys() == model.state_dict().keys()
    assert lora.merged_model(model) is model
