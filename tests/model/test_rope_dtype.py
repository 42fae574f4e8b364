"""RoPE stays in full precision whatever the model dtype: `inv_freq` survives `.to(bf16)` as float32 and
the cos/sin tables at far positions match a float64 reference up to the output dtype's rounding."""

from __future__ import annotations

import pytest
import torch

from kvforge import ops
from kvforge.config import ModelConfig, RopeScaling
from kvforge.model.llama import LlamaForCausalLM

HEAD_DIM = 64
POSITION = 1000


def tiny_config(scaling: RopeScaling | None = None) -> ModelConfig:
    return ModelConfig("LlamaForCausalLM", vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=1,
                       num_heads=2, num_kv_heads=1, head_dim=HEAD_DIM, max_position_embeddings=4096,
                       rope_theta=500000.0, rope_scaling=scaling)


def reference_cos_sin(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    angles = POSITION * ops.rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)  # float64
    return angles.cos(), angles.sin()


@pytest.mark.parametrize("scaling", [None, RopeScaling(8.0, 1.0, 4.0, 8192)], ids=["plain", "llama3"])
def test_inv_freq_stays_float32_after_casting_the_model_to_bf16(scaling):
    cfg = tiny_config(scaling)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    assert model.embed_tokens.weight.dtype == model.lm_head.weight.dtype == torch.bfloat16  # the rest did cast
    assert model.inv_freq.dtype == torch.float32 and model.inv_freq.device == model.lm_head.weight.device
    exact = ops.rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).float()
    assert torch.equal(model.inv_freq, exact)
    assert torch.equal(model.to(torch.float16).to(torch.float32).inv_freq, exact)  # round trips lose nothing
    assert "inv_freq" not in model.state_dict()  # still a non-persistent buffer


def test_bf16_cos_sin_at_position_1000_match_float64_within_output_rounding():
    cfg = tiny_config()
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    cos, sin = ops.rope_cos_sin(torch.tensor([POSITION]), model.inv_freq, torch.bfloat16)
    assert cos.dtype == sin.dtype == torch.bfloat16 and cos.shape == (1, HEAD_DIM // 2)
    ref_cos, ref_sin = reference_cos_sin(cfg)
    assert (cos[0].double() - ref_cos).abs().max() < 1e-2  # bf16 rounds values in [-1, 1] by <= 2**-9
    assert (sin[0].double() - ref_sin).abs().max() < 1e-2
    # What a bf16 inv_freq (the old behaviour of `.to(bf16)` on the buffer) gives: far off.
    bad = POSITION * ops.rope_inv_freq(cfg.head_dim, cfg.rope_theta).to(torch.bfloat16).double()
    assert (bad.cos() - ref_cos).abs().max() > 0.3 and (bad.sin() - ref_sin).abs().max() > 0.3


def test_rope_cos_sin_refuses_low_precision_frequencies():
    inv = ops.rope_inv_freq(HEAD_DIM, 10000.0)
    for dtype in (torch.bfloat16, torch.float16):
        with pytest.raises(ValueError, match="inv_freq must be float32 or float64"):
            ops.rope_cos_sin(torch.tensor([0, 1]), inv.to(dtype), torch.bfloat16)
