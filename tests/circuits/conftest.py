import warnings

import pytest
import torch

from madlens.circuits.ioi import make_ioi
from madlens.circuits.patching import PatchingSession
from madlens.models import load_model
from madlens.models.tiny import tiny_tokenizer

# The hand-built model: a 1-layer, attention-only GPT-2 on tiny-test's byte tokenizer, with
# one-hot token embeddings (dims 0..258), one-hot positions (dims 259..322) and a large
# constant in dim 323, which keeps the layer norms close to linear.
D_MODEL, N_HEADS, N_POS, VOCAB = 324, 4, 64, 259
D_HEAD = D_MODEL // N_HEADS
PLANTED_TEMPLATE = "When [A] and [B] went to the [PLACE], [B] gave a [OBJECT] to [A]"
MOVER, NEGATIVE, SILENT, PREVIOUS = 0, 1, 2, 3  # the heads' planted roles


@pytest.fixture(scope="package", autouse=True)
def one_thread():
    """These tests run many small forwards; on a shared 2-core machine two OpenMP threads
    spend most of their time waiting for each other (measured: 30x slower under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ioi_letters(tokenizer, n, seed=0, **kwargs):
    """IOI prompts for a byte-level tokenizer (capital letters stand in for names)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return make_ioi(tokenizer, n, seed, **kwargs)


def planted_weights(io_position):
    """State dict of the hand-built model.

    Head 0 copies the token at position `io_position` (where IOI's indirect object sits in
    the one ABBA template used with it) to the logits: its query is a constant bias, its key
    reads that position's one-hot, its OV circuit maps each letter to its own logit. Head 1
    does the same with -0.3 times the output (a negative name mover). Head 2 is all zeros.
    Head 3 is a previous-token head (query position i matches key position i - 1) with no
    output. MLP weights are zero, so the model is attention-only.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCAB, n_positions=N_POS, n_embd=D_MODEL, n_layer=1, n_head=N_HEADS,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2,
        pad_token_id=2, tie_word_embeddings=True,
    )  # fmt: skip
    model = GPT2LMHeadModel(config)
    state = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    state["transformer.wte.weight"][:, :VOCAB] = torch.eye(VOCAB)
    state["lm_head.weight"] = state["transformer.wte.weight"]  # tied: one tensor
    state["transformer.wpe.weight"][:, VOCAB : VOCAB + N_POS] = torch.eye(N_POS)
    state["transformer.wpe.weight"][:, -1] = 40.0  # after ln_1 a one-hot dim reads ~0.39
    for name in ("transformer.h.0.ln_1", "transformer.h.0.ln_2", "transformer.ln_f"):
        state[f"{name}.weight"] = torch.ones(D_MODEL)
    w_qkv = state["transformer.h.0.attn.c_attn.weight"]  # (in, 3 * d): Q | K | V
    b_qkv = state["transformer.h.0.attn.c_attn.bias"]
    w_out = state["transformer.h.0.attn.c_proj.weight"]  # (head * d_head, d)
    letters = [tiny_tokenizer().convert_tokens_to_ids(chr(c)) for c in range(65, 91)]
    for head, sign in ((MOVER, 1.0), (NEGATIVE, -0.3)):
        q, k, v = (part * D_MODEL + head * D_HEAD for part in range(3))
        b_qkv[q] = 20.0
        w_qkv[VOCAB + io_position, k] = 20.0
        for i, token in enumerate(letters):
            w_qkv[token, v + i] = 1.0
            w_out[head * D_HEAD + i, token] = 25.0 * sign
    q, k = PREVIOUS * D_HEAD, D_MODEL + PREVIOUS * D_HEAD
    for i in range(N_POS - 1):
        w_qkv[VOCAB + i + 1, q + i] = 32.0
        w_qkv[VOCAB + i, k + i] = 32.0
    model.load_state_dict(state)
    return model


@pytest.fixture(scope="session")
def letters_ioi():
    return ioi_letters


@pytest.fixture(scope="session")
def planted_data():
    return ioi_letters(tiny_tokenizer(), 8, templates=[PLANTED_TEMPLATE], orders=("ABBA",))


@pytest.fixture(scope="session")
def planted(tmp_path_factory, planted_data):
    """The hand-built model, saved and loaded through `load_model` like any local model."""
    io_position = int(planted_data.positions["IO"][0])
    assert (planted_data.positions["IO"] == io_position).all()
    folder = tmp_path_factory.mktemp("planted")
    planted_weights(io_position).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return load_model(str(folder))


# Short templates keep the byte-level prompts short, so references that loop over positions
# (TransformerLens's patching) stay fast.
SHORT_TEMPLATES = ["When [A] and [B] met, [B] thanked [A]", "Then [A] and [B] ate. [B] fed [A]"]


@pytest.fixture(scope="session")
def tiny_data(tiny):
    return ioi_letters(tiny.tokenizer, 8, seed=3, templates=SHORT_TEMPLATES)


@pytest.fixture(scope="session")
def tiny_session(tiny, tiny_data):
    d = tiny_data
    return PatchingSession(tiny, d.tokens, d.corrupted_tokens, d.answers, d.end, progress=False)


def small_llama(folder, kv_heads):
    """A 2-layer Llama on the byte tokenizer with larger weights than tiny-test (init 0.2),
    so that patching effects stand well above float noise."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True,
        initializer_range=0.2,
    )  # fmt: skip
    state = torch.random.get_rng_state()
    torch.manual_seed(1)
    model = LlamaForCausalLM(config)
    torch.random.set_rng_state(state)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return load_model(str(folder))


@pytest.fixture(scope="session")
def mha(tmp_path_factory):
    """One key/value head per query head: TransformerLens's own direct-path patching is
    defined there for keys and values too."""
    return small_llama(tmp_path_factory.mktemp("mha"), kv_heads=4)


@pytest.fixture(scope="session")
def silenced(tmp_path_factory):
    """Grouped-query attention (2 key/value heads for 4 query heads) and head 0.1 writing
    nothing: its slice of W_O is zero."""
    model = small_llama(tmp_path_factory.mktemp("gqa"), kv_heads=2)
    d_head = model.bridge.cfg.d_head
    with torch.no_grad():
        model.bridge.blocks[0].attn.o.original_component.weight[:, d_head : 2 * d_head] = 0
    return model
