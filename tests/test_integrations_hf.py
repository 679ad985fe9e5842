"""``tokpo_kernels.integrations.hf_hidden``: hidden states + lm-head reproduce each model's own logits.

Tiny randomly initialised models of each family (nothing downloaded): Llama, Qwen2, Qwen3, Mistral,
Gemma2 (final-logit softcap), Gemma3 (softcap), GPT-2 (tied embeddings, ``transformer`` base), PEFT
LoRA-wrapped Llama (adapters on attention, on the lm-head itself, and ``modules_to_save``), plus
DDP and FSDP2 on a single-process gloo group (forward redirection through the wrapper).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the HF integration tests need transformers")

import tokpo_kernels as tk  # noqa: E402
from tokpo_kernels.integrations import hf_hidden  # noqa: E402
from tokpo_kernels.integrations.hf_hidden import (  # noqa: E402
    LMHead,
    causal_lm_hidden_states,
    frozen_lm_head,
    gathered_lm_head,
    lm_head_params,
)

V = 61
COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)


def _build(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    t = transformers
    if family == "llama":
        return t.LlamaForCausalLM(t.LlamaConfig(**COMMON))
    if family == "llama_tied":
        return t.LlamaForCausalLM(t.LlamaConfig(**COMMON, tie_word_embeddings=True))
    if family == "qwen2":
        return t.Qwen2ForCausalLM(t.Qwen2Config(**COMMON))
    if family == "qwen3":
        return t.Qwen3ForCausalLM(t.Qwen3Config(**COMMON, head_dim=8))
    if family == "mistral":
        return t.MistralForCausalLM(t.MistralConfig(**COMMON))
    if family == "gemma2":
        return t.Gemma2ForCausalLM(t.Gemma2Config(**COMMON, head_dim=8, final_logit_softcapping=3.0))
    if family == "gemma3":
        return t.Gemma3ForCausalLM(t.Gemma3TextConfig(**COMMON, head_dim=8, final_logit_softcapping=3.0))
    if family == "gpt2":
        return t.GPT2LMHeadModel(t.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                              bos_token_id=0, eos_token_id=0))
    raise AssertionError(family)


def _batch(rows: int = 3, length: int = 7):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # right padding
    mask[2, :3] = 0  # left padding
    return ids, mask


def _check_matches_logits(model: torch.nn.Module, atol: float = 1e-5) -> LMHead:
    model.eval()
    ids, mask = _batch()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        hidden = causal_lm_hidden_states(model, ids, mask)
        head = lm_head_params(model)
        got = head.logits(hidden)
    assert hidden.shape == (3, 7, hidden.shape[-1])
    valid = mask.bool()
    torch.testing.assert_close(got[valid], ref[valid], atol=atol, rtol=1e-5)
    return head


FAMILIES = ["llama", "llama_tied", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "gpt2"]


@pytest.mark.parametrize("family", FAMILIES)
def test_hidden_states_times_head_equal_model_logits(family: str) -> None:
    model = _build(family)
    head = _check_matches_logits(model)
    assert head.weight.shape == (V, model.config.get_text_config().hidden_size
                                 if hasattr(model.config, "get_text_config") else 32)
    if family.startswith("gemma"):
        assert head.softcap == 3.0
    else:
        assert head.softcap is None
    if family in ("gpt2", "llama_tied"):
        assert head.weight is model.get_input_embeddings().weight  # tied: the shared parameter itself
    else:
        assert head.weight is model.get_output_embeddings().weight
    assert head.scale == 1.0 and head.temperature(2.0) == 2.0


def test_fused_loss_matches_model_loss_and_grads() -> None:
    """Gemma2 (softcap): CE through hidden + head equals the model's own CE, values and gradients."""
    model = _build("gemma2")
    model.eval()
    ids, _ = _batch()
    labels = ids.clone()
    labels[0, :3] = -100
    ref_loss = model(input_ids=ids, labels=labels).loss
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    hidden = causal_lm_hidden_states(model, ids)[:, :-1]
    with gathered_lm_head(model) as head:
        out = tk.linear_cross_entropy(hidden, head.weight, labels[:, 1:], **head.loss_kwargs(), impl="torch")
    out.loss.backward()
    torch.testing.assert_close(out.loss, ref_loss, atol=1e-5, rtol=1e-5)
    for name, p in model.named_parameters():
        if name in ref_grads:
            torch.testing.assert_close(p.grad, ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def _peft():
    return pytest.importorskip("peft", reason="PEFT tests need peft")


def test_peft_lora_wrapped_llama() -> None:
    peft = _peft()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                          init_lora_weights=False)
    model = peft.get_peft_model(_build("llama"), cfg)
    head = _check_matches_logits(model)
    assert head.weight is model.get_base_model().lm_head.weight
    with model.disable_adapter():  # adapters off: still the model's own logits
        _check_matches_logits(model)


def test_peft_lora_on_lm_head_is_folded_into_the_weight() -> None:
    peft = _peft()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], lora_dropout=0.0,
                          init_lora_weights=False)
    model = peft.get_peft_model(_build("llama"), cfg)
    _check_matches_logits(model)
    head = lm_head_params(model)
    assert head.weight.requires_grad  # base + ΔW, differentiable w.r.t. the LoRA factors
    lora_a = model.get_base_model().lm_head.lora_A["default"].weight
    (head.weight.sum()).backward()
    assert lora_a.grad is not None


def test_peft_modules_to_save_lm_head() -> None:
    peft = _peft()
    cfg = peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"], init_lora_weights=False)
    model = peft.get_peft_model(_build("llama"), cfg)
    with torch.no_grad():
        model.get_base_model().lm_head.modules_to_save["default"].weight.mul_(2.0)  # differ from the original
    _check_matches_logits(model)


def test_config_lookup_for_multimodal_and_scaled_heads() -> None:
    text = SimpleNamespace(final_logit_softcapping=30.0)
    cfg = SimpleNamespace(text_config=text)
    assert hf_hidden._config_value(cfg, "final_logit_softcapping") == 30.0
    assert hf_hidden._config_value(SimpleNamespace(), "final_logit_softcapping") is None
    head = LMHead(weight=torch.zeros(3, 2), scale=0.5)
    assert head.temperature(1.0) == 2.0
    with pytest.raises(NotImplementedError):
        LMHead(weight=torch.zeros(3, 2), scale=0.5, softcap=1.0).temperature()


def test_gathered_and_frozen_head_passthrough() -> None:
    model = _build("llama")
    with gathered_lm_head(model) as head:
        assert head.weight is model.lm_head.weight
    frozen = frozen_lm_head(model)
    assert not frozen.weight.requires_grad
    assert frozen.weight.data_ptr() == model.lm_head.weight.data_ptr()  # no copy when nothing is sharded


def test_errors_are_clear() -> None:
    base = transformers.LlamaModel(transformers.LlamaConfig(**COMMON))
    with pytest.raises((ValueError, TypeError), match="output embedding|get_output_embeddings"):
        lm_head_params(base)


@pytest.fixture
def gloo_group(tmp_path):
    dist = torch.distributed
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_ddp_wrapper_is_redirected(gloo_group) -> None:
    model = _build("llama").eval()
    ids, mask = _batch()
    with torch.no_grad():
        want = causal_lm_hidden_states(model, ids, mask)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    hidden = causal_lm_hidden_states(ddp, ids, mask)
    torch.testing.assert_close(hidden, want)
    assert "forward" not in model.__dict__  # the redirection was undone
    with gathered_lm_head(ddp) as head:
        hidden[:, :-1].float().pow(2).mean().backward()
        assert head.weight is model.lm_head.weight
    assert model.model.embed_tokens.weight.grad is not None


def test_fsdp2_root_is_redirected_and_head_gathered(gloo_group) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # pragma: no cover
        pytest.skip("FSDP2 (fully_shard) not available in this torch")
    model = _build("llama").eval()
    ids, mask = _batch()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    mesh = init_device_mesh("cpu", (1,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    hidden = causal_lm_hidden_states(model, ids, mask)
    with gathered_lm_head(model) as head:
        assert not hasattr(head.weight, "full_tensor")
        got = head.logits(hidden)
        torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=1e-5, rtol=1e-5)
        got.float().logsumexp(-1).mean().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads, "no gradient reached the sharded parameters"


def test_import_integrations_is_lazy() -> None:
    code = (
        "import json, sys\n"
        "import tokpo_kernels.integrations as I\n"
        "before = 'transformers' in sys.modules or 'trl' in sys.modules\n"
        "I.hf_hidden\n"
        "after_hf = 'transformers' in sys.modules\n"
        "print(json.dumps({'before': before, 'after_hf': after_hf, 'has': 'TDPOTrainer' in dir(I)}))\n"
    )
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == {"before": False, "after_hf": False, "has": True}


def test_prompt_learning_peft_is_rejected() -> None:
    peft = _peft()
    model = peft.get_peft_model(_build("llama"), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    ids, mask = _batch()
    with pytest.raises(NotImplementedError, match="prompt-learning"):
        causal_lm_hidden_states(model, ids, mask)
