"""megacore.interop.hf: a transformers model and its megacore twin compute the same thing, and weights
move between them (and through the HF safetensors layout) exactly: GPT2LMHeadModel <-> GPTModel;
BertForPreTraining, BertForMaskedLM, RobertaForMaskedLM <-> BertModel; ElectraForPreTraining (+ its
generator, ElectraForMaskedLM) <-> ElectraDiscriminatorModel / ElectraModel.

Every HF model here is built locally from a small random config with odd sizes (vocab 101: not a
multiple of the tensor-parallel size 2; hidden 48, FFN 80), in fp32 and eval mode unless a test says
otherwise. Logits agree within 1e-4; weights after a round trip are bit-identical.

The logits and loss equalities run on every device present (the ``device`` fixture): megacore's model is
built there (``from_hf(..., device=device)``) and compared with Hugging Face's on the CPU; the conversions,
round trips and files stay on the CPU.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from megacore.interop import hf as interop  # noqa: E402
from megacore.models import GPTModel, ModelConfig  # noqa: E402
from tests.parallel.utils import run_distributed  # noqa: E402

VOCAB, HIDDEN, HEADS, LAYERS, FFN, POSITIONS = 101, 48, 4, 2, 80, 64
ATOL = 1e-4
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def _quiet_transformers():
    # Small vocabularies make GPT2Config warn that its default bos/eos ids (50256) are out of range.
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(verbosity)


def gpt2_config(**kw):
    fields = dict(n_layer=LAYERS, n_embd=HIDDEN, n_head=HEADS, n_inner=FFN, vocab_size=VOCAB, n_positions=POSITIONS)
    return transformers.GPT2Config(**{**fields, **kw})


def make_gpt2(seed=0, **kw):
    """A random-initialized GPT2LMHeadModel in eval mode, with nonzero biases and norm parameters (HF
    initializes them to 0 and 1, which would hide a mis-mapped bias or a swapped norm)."""
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(gpt2_config(**kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def input_ids(batch=3, seq=17, seed=1):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def assert_close_on_cpu(actual: torch.Tensor, expected: torch.Tensor, device: str):
    """``actual`` (computed on ``device``) against ``expected``, on the CPU: within ATOL; on CUDA also within 1e-4
    relative (its fp32 GEMMs sum in another order than the CPU's)."""
    torch.testing.assert_close(actual.cpu(), expected.cpu(), atol=ATOL, rtol=0 if device == "cpu" else 1e-4)


def on(device, *tensors):
    """``tensors`` moved to ``device`` (None stays None)."""
    return [None if t is None else t.to(device) for t in tensors]


def assert_same_weights(expected: dict, actual: dict):
    assert expected.keys() == actual.keys()
    for k in expected:
        assert expected[k].dtype == actual[k].dtype, k
        assert torch.equal(expected[k], actual[k]), k


def megacore_gpt(**kw):
    fields = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=LAYERS, num_attention_heads=HEADS,
                  ffn_hidden_size=FFN, max_position_embeddings=POSITIONS, activation="gelu_tanh")
    torch.manual_seed(5)
    model = GPTModel(ModelConfig(**{**fields, **kw}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


# ---- GPT-2: from_hf ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["gelu_new", "gelu"])
def test_gpt2_from_hf_logits_equal_transformers(activation, device):
    hf = make_gpt2(activation_function=activation)
    model = interop.from_hf(hf, device=device)
    assert isinstance(model, GPTModel) and not model.training
    ids = input_ids()
    with torch.no_grad():
        assert_close_on_cpu(model(ids.to(device)), hf(ids).logits, device)


def test_gpt2_from_hf_loss_equals_transformers_shifted_loss(device):
    # HF shifts the labels inside; megacore takes each position's target as given.
    hf, ids = make_gpt2(), input_ids()
    model = interop.from_hf(hf, device=device)
    with torch.no_grad():
        on_device = ids.to(device)
        loss = model(on_device[:, :-1], labels=on_device[:, 1:])
        assert_close_on_cpu(loss.mean(), hf(ids, labels=ids).loss, device)


def test_gpt2_from_hf_config_maps_every_field():
    hf = make_gpt2(resid_pdrop=0.2, embd_pdrop=0.2, attn_pdrop=0.05, layer_norm_epsilon=1e-6, initializer_range=0.03)
    c = interop.from_hf(hf).config
    assert (c.vocab_size, c.hidden_size, c.num_layers, c.num_attention_heads, c.ffn_hidden_size,
            c.max_position_embeddings) == (VOCAB, HIDDEN, LAYERS, HEADS, FFN, POSITIONS)
    assert (c.activation, c.norm_epsilon, c.hidden_dropout, c.attention_dropout, c.init_method_std) == \
        ("gelu_tanh", 1e-6, 0.2, 0.05, 0.03)
    assert (c.pre_norm, c.normalization, c.attention_mask_type, c.position_embedding_type, c.params_dtype) == \
        (True, "layernorm", "causal", "learned_absolute", torch.float32)


def test_gpt2_n_inner_none_means_four_times_hidden():
    assert interop.from_hf(make_gpt2(n_inner=None)).config.ffn_hidden_size == 4 * HIDDEN


def test_gpt2_qkv_rows_are_regrouped_per_head():
    # HF's c_attn columns are [q heads | k heads | v heads]; megacore's qkv rows are (head, {q,k,v}, d).
    hf = make_gpt2()
    model = interop.from_hf(hf)
    d = HIDDEN // HEADS
    c_attn = hf.transformer.h[0].attn.c_attn.weight  # Conv1D: [in, out]
    qkv = model.decoder.layers[0].attention.qkv.weight  # [out, in]
    for head in range(HEADS):
        for which in range(3):
            rows = qkv[(head * 3 + which) * d:(head * 3 + which + 1) * d]
            cols = c_attn[:, which * HIDDEN + head * d:which * HIDDEN + (head + 1) * d]
            assert torch.equal(rows, cols.t())


def test_gpt2_from_hf_keeps_train_mode_and_dtype():
    hf = make_gpt2().train().to(torch.bfloat16)
    model = interop.from_hf(hf)
    assert model.training
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert_same_weights(hf.state_dict(), interop.to_hf(model).state_dict())


def test_gpt2_from_hf_overrides_set_model_config_fields():
    model = interop.from_hf(make_gpt2(), recompute="full", params_dtype=torch.float64)
    assert model.config.recompute == "full"
    assert all(p.dtype == torch.float64 for p in model.parameters())


def test_gpt2_embd_pdrop_differing_from_resid_pdrop_warns():
    with pytest.warns(UserWarning, match="embd_pdrop=0.3 differs from resid_pdrop=0.1"):
        model = interop.from_hf(make_gpt2(embd_pdrop=0.3, resid_pdrop=0.1))
    assert model.config.hidden_dropout == 0.1


@pytest.mark.parametrize("kw, message", [
    (dict(activation_function="relu"), "activation_function='relu'"),
    (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx=True"),
    (dict(scale_attn_weights=False), "scale_attn_weights=False"),
    (dict(tie_word_embeddings=False), "tie_word_embeddings=False"),
])
def test_gpt2_from_hf_rejects_options_megacore_cannot_reproduce(kw, message):
    with pytest.raises(ValueError, match=f"megacore.interop.hf.from_hf: .*{message}"):
        interop.from_hf(make_gpt2(**kw))


def test_from_hf_rejects_an_unsupported_class_naming_the_supported_ones():
    with pytest.raises(ValueError, match="megacore.interop.hf.from_hf: GPT2Model is not supported; supported: .*GPT2LMHeadModel"):
        interop.from_hf(transformers.GPT2Model(gpt2_config()))


def test_from_hf_rejects_an_override_that_is_not_a_config_field():
    with pytest.raises(TypeError, match=r"megacore.interop.hf.from_hf: \['tensor_parallel_size'\] are not ModelConfig fields"):
        interop.from_hf(make_gpt2(), tensor_parallel_size=2)


# ---- GPT-2: to_hf and round trips ----------------------------------------------------------------------------


def test_gpt2_round_trip_to_hf_from_hf_reproduces_weights_exactly():
    hf = make_gpt2()
    back = interop.to_hf(interop.from_hf(hf))
    assert type(back) is transformers.GPT2LMHeadModel and not back.training
    assert_same_weights(hf.state_dict(), back.state_dict())
    assert back.lm_head.weight.data_ptr() == back.transformer.wte.weight.data_ptr()  # still tied
    for key in ("n_embd", "n_layer", "n_head", "n_inner", "vocab_size", "n_positions", "activation_function",
                "layer_norm_epsilon", "resid_pdrop", "attn_pdrop", "embd_pdrop"):
        assert getattr(back.config, key) == getattr(hf.config, key), key


def test_megacore_gpt_to_hf_logits_equal_and_round_trip_exact(device):
    # Built on the CPU from the seed, then moved: to_hf gives the HF model on the model's device, and
    # from_hf keeps the HF model's device, so the round trip compares tensors on ``device``.
    model = megacore_gpt().to(device)
    hf = interop.to_hf(model)
    ids = input_ids().to(device)
    with torch.no_grad():
        assert_close_on_cpu(hf(ids).logits, model(ids), device)
    assert_same_weights(model.state_dict(), interop.from_hf(hf).state_dict())


@pytest.mark.parametrize("kw, message", [
    (dict(position_embedding_type="rope"), "position_embedding_type='rope'"),
    (dict(normalization="rmsnorm"), "normalization='rmsnorm'"),
    (dict(add_bias_linear=False), "add_bias_linear=False"),
    (dict(attention_mask_type="sliding_window", window_size=4), "attention_mask_type='sliding_window'"),
])
def test_to_hf_rejects_options_gpt2_cannot_hold(kw, message):
    with pytest.raises(ValueError, match=f"megacore.interop.hf.to_hf: this GPTModel cannot be converted: .*{message}"):
        interop.to_hf(megacore_gpt(**kw))


def test_to_hf_rejects_an_unsupported_model():
    with pytest.raises(TypeError, match="megacore.interop.hf.to_hf: model is a Linear"):
        interop.to_hf(torch.nn.Linear(2, 2))


def test_to_hf_rejects_an_architecture_of_another_family():
    with pytest.raises(ValueError, match="architecture='BertForMaskedLM'; a GPTModel converts to GPT2LMHeadModel"):
        interop.to_hf(megacore_gpt(), architecture="BertForMaskedLM")


# ---- safetensors in the HF layout --------------------------------------------------------------------------


def test_save_hf_safetensors_writes_what_save_pretrained_writes(tmp_path):
    from safetensors import safe_open

    hf = make_gpt2()
    interop.save_hf_safetensors(interop.from_hf(hf), str(tmp_path / "mc"))
    hf.save_pretrained(str(tmp_path / "hf"))
    assert sorted(os.listdir(tmp_path / "mc")) == ["config.json", "model.safetensors"]  # no temp files left
    with safe_open(str(tmp_path / "mc" / "model.safetensors"), "pt") as ours, \
            safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as theirs:
        assert sorted(ours.keys()) == sorted(theirs.keys())  # lm_head.weight left out: tied
        assert ours.metadata() == {"format": "pt"}
        for k in ours.keys():
            assert torch.equal(ours.get_tensor(k), theirs.get_tensor(k)), k


def test_saved_directory_loads_in_transformers_with_equal_logits(tmp_path):
    model = megacore_gpt()
    interop.save_hf_safetensors(model, str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert type(hf) is transformers.GPT2LMHeadModel
    ids = input_ids()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=ATOL, rtol=0)
    base = transformers.AutoModel.from_pretrained(str(tmp_path))  # the bare GPT2Model loads too
    assert torch.equal(base.wte.weight, model.embedding.word.weight)


def test_load_hf_safetensors_round_trip_is_exact(tmp_path):
    model = megacore_gpt(hidden_dropout=0.2, attention_dropout=0.05)
    interop.save_hf_safetensors(model, str(tmp_path))
    loaded = interop.load_hf_safetensors(str(tmp_path))
    assert isinstance(loaded, GPTModel) and not loaded.training
    assert_same_weights(model.state_dict(), loaded.state_dict())
    assert loaded.config == model.config


def test_load_hf_safetensors_reads_save_pretrained_output(tmp_path):
    hf = make_gpt2()
    hf.save_pretrained(str(tmp_path))
    model = interop.load_hf_safetensors(str(tmp_path))
    ids = input_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=ATOL, rtol=0)


def test_load_hf_safetensors_fills_absent_config_keys_with_gpt2config_defaults(tmp_path):
    # Older transformers' save_pretrained (and hand-written configs) keep only the keys that differ from
    # GPT2Config's defaults.
    hf = make_gpt2()
    hf.save_pretrained(str(tmp_path))
    defaults = transformers.GPT2Config().to_dict()
    config = json.loads((tmp_path / "config.json").read_text())
    diff = {k: v for k, v in config.items() if k not in defaults or defaults[k] != v or k == "model_type"}
    assert "activation_function" not in diff and "n_layer" in diff
    (tmp_path / "config.json").write_text(json.dumps(diff))
    model = interop.load_hf_safetensors(str(tmp_path))
    assert model.config.activation == "gelu_tanh" and model.config.norm_epsilon == 1e-5
    ids = input_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=ATOL, rtol=0)


def test_load_hf_safetensors_reads_a_base_model_checkpoint_with_mask_buffers(tmp_path):
    # The hub's gpt2 checkpoint: GPT2Model names (no "transformer."), old causal-mask buffers "attn.bias".
    from safetensors.torch import save_file

    hf = make_gpt2()
    tensors = {k.removeprefix("transformer."): v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    for i in range(LAYERS):
        tensors[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, POSITIONS, POSITIONS))
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps({**hf.config.to_dict(), "architectures": ["GPT2Model"]}))
    model = interop.load_hf_safetensors(str(tmp_path))
    assert_same_weights(hf.state_dict(), interop.to_hf(model).state_dict())


def test_load_hf_safetensors_reads_a_sharded_checkpoint(tmp_path):
    hf = make_gpt2()
    hf.save_pretrained(str(tmp_path), max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert_same_weights(hf.state_dict(), interop.to_hf(interop.load_hf_safetensors(str(tmp_path))).state_dict())


def test_gpt2_config_defaults_are_transformers_defaults():
    from megacore.interop.hf.gpt2 import HF_DEFAULTS

    defaults = transformers.GPT2Config().to_dict()
    assert {k: defaults[k] for k in HF_DEFAULTS} == HF_DEFAULTS


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    import safetensors.torch

    model = megacore_gpt()
    path = interop.save_hf_safetensors(model, str(tmp_path))
    before = (tmp_path / "model.safetensors").read_bytes()

    def fail(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        interop.save_hf_safetensors(megacore_gpt(num_layers=1), str(tmp_path))
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    assert path == str(tmp_path / "model.safetensors")


def test_load_hf_safetensors_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="megacore.interop.hf.load_hf_safetensors: no config.json"):
        interop.load_hf_safetensors(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type='llama' is not supported"):
        interop.load_hf_safetensors(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor model.safetensors.index.json"):
        interop.load_hf_safetensors(str(tmp_path))


def test_weights_that_do_not_match_the_config_are_named(tmp_path):
    hf = make_gpt2()
    hf.save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_layer": LAYERS + 1}))
    with pytest.raises(ValueError, match=r"missing \[transformer.h.2.ln_1.weight"):
        interop.load_hf_safetensors(str(tmp_path))


def test_safetensors_functions_work_without_transformers(tmp_path):
    # A user without transformers saves and loads the HF layout; importing megacore.interop.hf does not
    # import transformers either.
    script = textwrap.dedent(f"""
        import sys
        sys.modules["transformers"] = None  # any import of transformers now fails
        import torch
        from megacore.interop import hf
        from megacore.models import GPTModel, ModelConfig
        model = GPTModel(ModelConfig(vocab_size=101, hidden_size=48, num_layers=1, num_attention_heads=4))
        hf.save_hf_safetensors(model, {str(tmp_path)!r})
        loaded = hf.load_hf_safetensors({str(tmp_path)!r})
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
        try:
            hf.to_hf(model)
        except ImportError as e:
            assert "megacore.interop.hf.to_hf needs the transformers package" in str(e)
        else:
            raise AssertionError("to_hf without transformers")
        print("ok")
    """)
    env = {**os.environ, "PYTHONPATH": os.path.join(REPO, "python")}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# ---- tensor parallelism (TP=2 in real processes) -------------------------------------------------------------


def _check_tensor_parallel(rank, world, directory):
    import torch.distributed as dist

    from megacore.interop import hf as interop
    from megacore.parallel import initialize_model_parallel

    transformers.logging.set_verbosity_error()
    initialize_model_parallel(world)
    hf = make_gpt2()  # the same seed on every rank: the same HF model
    ids = input_ids(seq=17)  # 16 inputs and their 16 targets: sequence parallelism splits 16 in 2
    with torch.no_grad():
        expected, expected_loss = hf(ids[:, :-1]).logits, hf(ids, labels=ids).loss
    for sp in (False, True):
        model = interop.from_hf(hf, tensor_parallel=True, sequence_parallel=sp)
        # The vocab table is padded to 102 rows and split: rank r holds rows [51 r, 51 r + 51); the
        # padding row (101, the last of rank 1) is zero.
        word = model.embedding.word.weight
        assert word.shape == (51, HIDDEN)
        assert torch.equal(word[: VOCAB - 51 * rank], hf.transformer.wte.weight[51 * rank:51 * rank + 51])
        if rank == 1:
            assert torch.equal(word[-1], torch.zeros(HIDDEN))
        assert model.decoder.layers[0].attention.qkv.weight.shape == (3 * HIDDEN // world, HIDDEN)
        assert model.decoder.layers[0].mlp.fc2.weight.shape == (HIDDEN, FFN // world)
        with torch.no_grad():
            torch.testing.assert_close(model(ids[:, :-1]), expected, atol=ATOL, rtol=0)
            loss = model(ids[:, :-1], labels=ids[:, 1:])  # vocab-parallel cross-entropy
            torch.testing.assert_close(loss.mean(), expected_loss, atol=ATOL, rtol=0)
        # to_hf gathers the shards (every rank gets the whole model): the exact HF weights.
        assert_same_weights(hf.state_dict(), interop.to_hf(model).state_dict())
    # save at TP=2 (rank 0 writes), load at TP=2 and at TP=1.
    interop.save_hf_safetensors(model, directory)
    assert_same_weights(hf.state_dict(), transformers.GPT2LMHeadModel.from_pretrained(directory).state_dict())
    sharded = interop.load_hf_safetensors(directory, tensor_parallel=True)
    assert_same_weights(model.state_dict(), sharded.state_dict())
    whole = interop.load_hf_safetensors(directory)
    assert_same_weights(interop.from_hf(hf).state_dict(), whole.state_dict())
    dist.barrier()


def test_tensor_parallel_from_hf_shards_and_to_hf_gathers(tmp_path):
    run_distributed(_check_tensor_parallel, 2, str(tmp_path / "tp2"), timeout_s=120)


# ---- BERT / RoBERTa --------------------------------------------------------------------------------------------

ENCODER = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
               intermediate_size=FFN, max_position_embeddings=POSITIONS)
ENCODERS = {  # HF class -> its config
    "BertForPreTraining": lambda **kw: transformers.BertConfig(**{**ENCODER, **kw}),
    "BertForMaskedLM": lambda **kw: transformers.BertConfig(**{**ENCODER, **kw}),
    "RobertaForMaskedLM": lambda **kw: transformers.RobertaConfig(**{**ENCODER, "type_vocab_size": 1, **kw}),
}


def make_encoder(architecture, seed=0, **kw):
    torch.manual_seed(seed)
    return randomize_vectors(getattr(transformers, architecture)(ENCODERS[architecture](**kw)))


def randomize_vectors(model):
    """Nonzero biases, norm weights not all 1 (HF's init would hide a swapped bias or norm); eval mode."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def encoder_inputs(architecture, batch=3, seq=13):
    """ids, a padding mask (rows of 13, 9 and 5 real tokens) and token types (None for RoBERTa, whose
    padding positions hold its pad id 1 so that its offset position ids are HF's)."""
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, 9:], mask[2, 5:] = 0, 0
    if architecture.startswith("Roberta"):
        return ids.masked_fill(mask == 0, 1), mask, None
    return ids, mask, torch.randint(0, 2, (batch, seq), generator=g)


@pytest.mark.parametrize("architecture", list(ENCODERS))
def test_encoder_from_hf_logits_equal_transformers(architecture, device):
    from megacore.models.bert import BertModel

    hf = make_encoder(architecture)
    model = interop.from_hf(hf, device=device)
    assert isinstance(model, BertModel)
    ids, mask, types = encoder_inputs(architecture)
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, token_type_ids=types)
        d_ids, d_mask, d_types = on(device, ids, mask, types)
        out = model(d_ids, attention_mask=d_mask, token_type_ids=d_types)
    mlm = expected.prediction_logits if architecture == "BertForPreTraining" else expected.logits
    assert_close_on_cpu(out.mlm, mlm, device)
    if architecture == "BertForPreTraining":
        assert_close_on_cpu(out.binary_logits, expected.seq_relationship_logits, device)
    else:
        assert model.pooler is None and model.binary_head is None


@pytest.mark.parametrize("architecture", list(ENCODERS))
def test_encoder_round_trip_reproduces_weights_exactly(architecture):
    hf = make_encoder(architecture, hidden_act="gelu_new", layer_norm_eps=1e-5, hidden_dropout_prob=0.2)
    back = interop.to_hf(interop.from_hf(hf))
    assert type(back).__name__ == architecture
    assert_same_weights(hf.state_dict(), back.state_dict())
    for key in ("hidden_act", "layer_norm_eps", "hidden_dropout_prob", "attention_probs_dropout_prob",
                "type_vocab_size", "pad_token_id", "intermediate_size"):
        assert getattr(back.config, key) == getattr(hf.config, key), key


def test_roberta_positions_follow_its_padding_id(device):
    hf = make_encoder("RobertaForMaskedLM", pad_token_id=4)
    model = interop.from_hf(hf, device=device)
    assert model.position_offset_padding_idx == 4
    ids, mask, _ = encoder_inputs("RobertaForMaskedLM")
    ids = ids.masked_fill(mask == 0, 4).masked_fill((ids == 4) & (mask == 1), 5)
    with torch.no_grad():
        d_ids, d_mask = on(device, ids, mask)
        assert_close_on_cpu(model(d_ids, attention_mask=d_mask).mlm, hf(ids, attention_mask=mask).logits, device)


def test_bert_pretraining_mlm_and_nsp_loss_equal_transformers(device):
    hf = make_encoder("BertForPreTraining")
    model = interop.from_hf(hf, device=device)
    ids, mask, types = encoder_inputs("BertForPreTraining")
    labels = torch.full_like(ids, -100)
    labels[:, 1:4] = ids[:, 1:4]
    nsp = torch.tensor([0, 1, 1])
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, token_type_ids=types, labels=labels, next_sentence_label=nsp).loss
        d_ids, d_mask, d_types, d_labels, d_nsp = on(device, ids, mask, types, labels, nsp)
        out = model(d_ids, attention_mask=d_mask, token_type_ids=d_types, labels=d_labels, next_sentence_label=d_nsp)
    assert_close_on_cpu(out.loss, expected, device)


@pytest.mark.parametrize("build, message", [
    (dict(add_pooler=True, head=None), "BertForMaskedLM has no pooler .build BertModel with add_pooler=False"),
    (dict(add_pooler=True, head=None, position_offset_padding_idx=1),
     "RobertaForMaskedLM has no pooler .build BertModel with add_pooler=False"),
])
def test_to_hf_rejects_a_bert_structure_the_hf_class_cannot_hold(build, message):
    from megacore.models.bert import BertModel

    config = ModelConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=1, num_attention_heads=HEADS,
                         pre_norm=False, embedding_norm=True, attention_mask_type="padding", type_vocab_size=2)
    with pytest.raises(ValueError, match=f"megacore.interop.hf.to_hf: this BertModel cannot be converted: {message}"):
        interop.to_hf(BertModel(config, **build))


@pytest.mark.parametrize("kw, message", [
    (dict(hidden_act="relu"), "hidden_act='relu'"),
    (dict(is_decoder=True), "is_decoder=True"),
])
def test_bert_from_hf_rejects_options_megacore_cannot_reproduce(kw, message):
    with pytest.raises(ValueError, match=f"megacore.interop.hf.from_hf: this BertForMaskedLM cannot be converted: .*{message}"):
        interop.from_hf(make_encoder("BertForMaskedLM", **kw))


@pytest.mark.parametrize("architecture", list(ENCODERS))
def test_encoder_safetensors_load_in_transformers_and_back_exactly(architecture, tmp_path):
    hf = make_encoder(architecture)
    model = interop.from_hf(hf)
    interop.save_hf_safetensors(model, str(tmp_path))
    loaded = getattr(transformers, architecture).from_pretrained(str(tmp_path))
    assert_same_weights(hf.state_dict(), loaded.state_dict())
    assert_same_weights(model.state_dict(), interop.load_hf_safetensors(str(tmp_path)).state_dict())
    hf.save_pretrained(str(tmp_path / "hf"))
    assert_same_weights(model.state_dict(), interop.load_hf_safetensors(str(tmp_path / "hf")).state_dict())


def test_encoder_config_defaults_are_transformers_defaults():
    from megacore.interop.hf.bert import BERT_DEFAULTS, ROBERTA_DEFAULTS

    for defaults, config in ((BERT_DEFAULTS, transformers.BertConfig()), (ROBERTA_DEFAULTS, transformers.RobertaConfig())):
        hf = config.to_dict()
        assert {k: hf[k] for k in defaults} == defaults


def _check_encoders_tensor_parallel(rank, world):
    from megacore.interop import hf as interop
    from megacore.parallel import initialize_model_parallel

    transformers.logging.set_verbosity_error()
    initialize_model_parallel(world)
    for architecture in ENCODERS:
        hf = make_encoder(architecture)  # the same seed on every rank
        ids, mask, types = encoder_inputs(architecture, seq=14)  # sequence parallelism splits 14 in 2
        with torch.no_grad():
            expected = hf(ids, attention_mask=mask, token_type_ids=types)
        expected = expected.prediction_logits if architecture == "BertForPreTraining" else expected.logits
        for sp in (False, True):
            model = interop.from_hf(hf, tensor_parallel=True, sequence_parallel=sp)
            assert model.mlm_head.bias.shape == (51,)  # the output bias is vocab-parallel like the table
            with torch.no_grad():
                out = model(ids, attention_mask=mask, token_type_ids=types)
            torch.testing.assert_close(out.mlm, expected, atol=ATOL, rtol=0)
            assert_same_weights(hf.state_dict(), interop.to_hf(model).state_dict())


def test_tensor_parallel_encoders_shard_and_gather():
    run_distributed(_check_encoders_tensor_parallel, 2, timeout_s=120)


# ---- ELECTRA ---------------------------------------------------------------------------------------------------

ELECTRA = dict(vocab_size=VOCAB, embedding_size=32, num_hidden_layers=LAYERS, max_position_embeddings=POSITIONS)


def make_electra_pair(seed=0, discriminator_hidden=48, **kw):
    """A discriminator (hidden 48, 4 heads) and a generator (hidden 24, 2 heads) with equal embeddings
    (32 wide: both project them), as ELECTRA's pre-training leaves them."""
    torch.manual_seed(seed)
    config = lambda **size: transformers.ElectraConfig(**{**ELECTRA, **size, **kw})  # noqa: E731
    discriminator = randomize_vectors(transformers.ElectraForPreTraining(
        config(hidden_size=discriminator_hidden, num_attention_heads=4, intermediate_size=80)))
    generator = randomize_vectors(transformers.ElectraForMaskedLM(
        config(hidden_size=24, num_attention_heads=2, intermediate_size=40)))
    generator.electra.embeddings.load_state_dict(discriminator.electra.embeddings.state_dict())
    return discriminator, generator


def test_electra_discriminator_from_hf_logits_equal_transformers(device):
    from megacore.models.electra import ElectraDiscriminatorModel

    discriminator, _ = make_electra_pair()
    model = interop.from_hf(discriminator, device=device)
    assert isinstance(model, ElectraDiscriminatorModel)
    ids, mask, types = encoder_inputs("ElectraForPreTraining")
    with torch.no_grad():
        expected = discriminator(ids, attention_mask=mask, token_type_ids=types).logits
        d_ids, d_mask, d_types = on(device, ids, mask, types)
        assert_close_on_cpu(model(d_ids, attention_mask=d_mask, token_type_ids=d_types).logits, expected, device)


def test_electra_pair_from_hf_is_one_model_whose_parts_equal_transformers(device):
    from megacore.models.electra import ElectraModel

    discriminator, generator = make_electra_pair()
    model = interop.from_hf(discriminator, device=device, generator=generator)
    assert isinstance(model, ElectraModel)
    assert model.generator_config.hidden_size == 24 and model.config.hidden_size == 48
    ids, mask, types = encoder_inputs("ElectraForPreTraining")
    d_ids, d_mask, d_types = on(device, ids, mask, types)
    with torch.no_grad():
        assert_close_on_cpu(model.generator_logits(d_ids, attention_mask=d_mask, token_type_ids=d_types),
                            generator(ids, attention_mask=mask, token_type_ids=types).logits, device)
        assert_close_on_cpu(model.discriminator_model()(d_ids, attention_mask=d_mask, token_type_ids=d_types).logits,
                            discriminator(ids, attention_mask=mask, token_type_ids=types).logits, device)


def test_electra_round_trips_reproduce_both_models_exactly():
    discriminator, generator = make_electra_pair()
    model = interop.from_hf(discriminator, generator=generator)
    back = interop.to_hf(model)
    assert type(back) is transformers.ElectraForPreTraining
    assert_same_weights(discriminator.state_dict(), back.state_dict())
    back = interop.to_hf(model, architecture="ElectraForMaskedLM")
    assert type(back) is transformers.ElectraForMaskedLM
    assert_same_weights(generator.state_dict(), back.state_dict())
    assert back.config.embedding_size == 32 and back.config.hidden_size == 24
    assert_same_weights(discriminator.state_dict(), interop.to_hf(interop.from_hf(discriminator)).state_dict())


def test_electra_without_projection_when_embedding_size_equals_hidden_size():
    discriminator, _ = make_electra_pair(discriminator_hidden=32)
    assert not hasattr(discriminator.electra, "embeddings_project")
    model = interop.from_hf(discriminator)
    assert model.discriminator.projection is None
    assert_same_weights(discriminator.state_dict(), interop.to_hf(model).state_dict())


def test_electra_pair_safetensors_round_trip(tmp_path):
    discriminator, generator = make_electra_pair()
    model = interop.from_hf(discriminator, generator=generator)
    interop.save_hf_safetensors(model, str(tmp_path / "discriminator"))
    interop.save_hf_safetensors(model, str(tmp_path / "generator"), architecture="ElectraForMaskedLM")
    assert_same_weights(generator.state_dict(),
                        transformers.ElectraForMaskedLM.from_pretrained(str(tmp_path / "generator")).state_dict())
    loaded = interop.load_hf_safetensors(str(tmp_path / "discriminator"), generator=str(tmp_path / "generator"))
    assert_same_weights(model.state_dict(), loaded.state_dict())


def test_electra_pair_with_different_embeddings_is_rejected():
    discriminator, generator = make_electra_pair()
    with torch.no_grad():
        generator.electra.embeddings.word_embeddings.weight[0, 0] += 1
    with pytest.raises(ValueError, match="embedding.word.weight differs between the ElectraForPreTraining and the "
                                         "ElectraForMaskedLM; megacore shares it"):
        interop.from_hf(discriminator, generator=generator)


def test_electra_generator_alone_or_misplaced_is_rejected():
    discriminator, generator = make_electra_pair()
    with pytest.raises(ValueError, match="is ELECTRA's generator: pass it as generator="):
        interop.from_hf(generator)
    with pytest.raises(ValueError, match="generator is a ElectraForPreTraining, expected a ElectraForMaskedLM"):
        interop.from_hf(discriminator, generator=discriminator)
    with pytest.raises(ValueError, match="a generator goes only with a model that has one"):
        interop.from_hf(make_gpt2(), generator=generator)
    with pytest.raises(ValueError, match="a ElectraDiscriminatorModel has none"):
        interop.to_hf(interop.from_hf(discriminator), architecture="ElectraForMaskedLM")


def test_electra_generator_needs_exact_gelu():
    # HF's generator head applies exact GeLU whatever hidden_act says; megacore's follows the config.
    discriminator, generator = make_electra_pair(hidden_act="gelu_new")
    with pytest.raises(ValueError, match="hidden_act='gelu_new' .HF's generator head applies exact GeLU"):
        interop.from_hf(discriminator, generator=generator)
    interop.from_hf(discriminator)  # the discriminator's head follows hidden_act: fine


def test_electra_config_defaults_are_transformers_defaults():
    from megacore.interop.hf.electra import ELECTRA_DEFAULTS

    hf = transformers.ElectraConfig().to_dict()
    assert {k: hf[k] for k in ELECTRA_DEFAULTS} == ELECTRA_DEFAULTS


def _check_electra_tensor_parallel(rank, world):
    from megacore.interop import hf as interop
    from megacore.parallel import initialize_model_parallel

    transformers.logging.set_verbosity_error()
    initialize_model_parallel(world)
    discriminator, generator = make_electra_pair()  # the same seed on every rank
    ids, mask, types = encoder_inputs("ElectraForPreTraining", seq=14)
    with torch.no_grad():
        expected = generator(ids, attention_mask=mask, token_type_ids=types).logits
        expected_rtd = discriminator(ids, attention_mask=mask, token_type_ids=types).logits
    for sp in (False, True):
        model = interop.from_hf(discriminator, generator=generator, tensor_parallel=True, sequence_parallel=sp)
        assert model.generator.mlm_head.bias.shape == (51,)
        with torch.no_grad():
            torch.testing.assert_close(model.generator_logits(ids, attention_mask=mask, token_type_ids=types), expected,
                                       atol=ATOL, rtol=0)
            torch.testing.assert_close(model.discriminator_model()(ids, attention_mask=mask, token_type_ids=types).logits,
                                       expected_rtd, atol=ATOL, rtol=0)
        assert_same_weights(discriminator.state_dict(), interop.to_hf(model).state_dict())
        assert_same_weights(generator.state_dict(), interop.to_hf(model, architecture="ElectraForMaskedLM").state_dict())


def test_tensor_parallel_electra_shards_and_gathers():
    run_distributed(_check_electra_tensor_parallel, 2, timeout_s=120)
