"""Fixtures and builders for model-loading tests: the embedded GGUF, HF's view of it, and tiny
GGUF files written the way llama.cpp's converter writes them (q/k rows permuted for llama)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kvforge.model.loader import resolve_model_path
from kvforge.model.tokenizer import Tokenizer

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="session")
def smollm_path() -> Path:
    return resolve_model_path("smollm2-135m")


@pytest.fixture(scope="module")
def smollm_tokenizer(smollm_path) -> Tokenizer:
    return Tokenizer.from_gguf(smollm_path)


@pytest.fixture(scope="session")
def hf_tokenizer(smollm_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(smollm_path.parent), gguf_file=smollm_path.name)


# ------------------------------------------------------------------ tiny byte-level tokenizer
def tiny_bpe_fields() -> dict:
    """A byte-level BPE vocabulary: the 256 byte letters, a few merges, two control tokens."""
    letters = [chr(c) for c in [*range(33, 127), *range(161, 173), *range(174, 256)]]
    letters += [chr(256 + i) for i in range(256 - len(letters))]
    merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d", "1 2"]  # 1 2: unused,
    # because the "smollm" pre-tokenizer isolates digits
    merged = [m.replace(" ", "") for m in merges]
    tokens = ["<|im_start|>", "<|im_end|>", *letters, *merged]
    return {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3, 3] + [1] * (len(tokens) - 2), "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                                   "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                                   "{% endif %}",
    }


# ------------------------------------------------------------------ tiny GGUF writer
_HF_TO_GGUF = {
    "model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def gguf_name(hf_name: str) -> str:
    stem, kind = hf_name.rsplit(".", 1)
    if stem.startswith("model.layers."):
        _, _, layer, rest = stem.split(".", 3)
        return f"blk.{layer}.{_HF_TO_GGUF[rest]}.{kind}"
    return f"{_HF_TO_GGUF[stem]}.{kind}"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q/k rows of llama models."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path, arch: str, hf_config, state_dict: dict[str, torch.Tensor] | None,
               tokenizer: dict, qtypes: dict[str, int] | None = None, permute: bool = True,
               rope_freqs: np.ndarray | None = None, name: str = "tiny") -> Path:
    """Write `state_dict` (HF names, HF layout) as a llama.cpp-style GGUF.

    `qtypes` maps a substring of the HF name to a GGML type (default F32). Without `state_dict`
    only the metadata is written.
    """
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    if hf_config is not None:
        c = hf_config
        w.add_block_count(c.num_hidden_layers)
        w.add_context_length(c.max_position_embeddings)
        w.add_embedding_length(c.hidden_size)
        w.add_feed_forward_length(c.intermediate_size)
        w.add_head_count(c.num_attention_heads)
        w.add_head_count_kv(c.num_key_value_heads)
        w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
        w.add_layer_norm_rms_eps(c.rms_norm_eps)
        w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_tokenizer_model(tokenizer["tokenizer.ggml.model"])
    if "tokenizer.ggml.pre" in tokenizer:
        w.add_tokenizer_pre(tokenizer["tokenizer.ggml.pre"])
    w.add_token_list(tokenizer["tokenizer.ggml.tokens"])
    w.add_token_types(tokenizer["tokenizer.ggml.token_type"])
    if "tokenizer.ggml.merges" in tokenizer:
        w.add_token_merges(tokenizer["tokenizer.ggml.merges"])
    if "tokenizer.ggml.scores" in tokenizer:
        w.add_token_scores(tokenizer["tokenizer.ggml.scores"])
    w.add_bos_token_id(tokenizer["tokenizer.ggml.bos_token_id"])
    w.add_eos_token_id(tokenizer["tokenizer.ggml.eos_token_id"])
    if "tokenizer.ggml.unknown_token_id" in tokenizer:
        w.add_unk_token_id(tokenizer["tokenizer.ggml.unknown_token_id"])
    w.add_add_bos_token(tokenizer["tokenizer.ggml.add_bos_token"])
    if "tokenizer.chat_template" in tokenizer:
        w.add_chat_template(tokenizer["tokenizer.chat_template"])
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    for hf_name, tensor in (state_dict or {}).items():
        arr = tensor.detach().float().numpy()
        if permute and ".q_proj." in hf_name:
            arr = llama_cpp_permute(arr, hf_config.num_attention_heads)
        elif permute and ".k_proj." in hf_name:
            arr = llama_cpp_permute(arr, hf_config.num_key_value_heads)
        qtype = next((t for key, t in (qtypes or {}).items() if key in hf_name), Q.F32)
        if qtype == Q.F32:
            w.add_tensor(gguf_name(hf_name), np.ascontiguousarray(arr))
        elif qtype == Q.F16:
            w.add_tensor(gguf_name(hf_name), arr.astype(np.float16))
        else:
            w.add_tensor(gguf_name(hf_name), gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def roundtrip(tensor: torch.Tensor, qtype: int) -> torch.Tensor:
    """What a tensor stored as `qtype` reads back as (row-local, so row permutations commute)."""
    arr = tensor.detach().float().numpy()
    if qtype == Q.F32:
        return torch.from_numpy(arr.copy())
    if qtype == Q.F16:
        return torch.from_numpy(arr.astype(np.float16).astype(np.float32))
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(arr, qtype), qtype).reshape(arr.shape).copy())
