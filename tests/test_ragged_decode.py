"""Ragged batched decoding, as a continuous-batching server does it: requests prefilled alone, their
caches merged into one whose rows are at different positions, decoded together one batched forward
pass per step, rows leaving (select) and joining (merge) between steps. Every row must get exactly
what decoding its sequence alone gives."""

from __future__ import annotations

import itertools

import pytest
import torch

from bench import autotune
from models import build_model
from models.attention_backends import PADDING_POSITION, AutoAttention, Mask, needed_capabilities
from models.config import attention_features
from models.gpt import Cache
from models.positional import alibi_slopes
from models.registry import build, get
from tests.conftest import registered, tiny

ATTENTIONS = {
    "mha": {"name": "mha"},
    "gqa": {"name": "gqa", "n_kv_head": 2},
    "mqa": {"name": "mqa"},
    "window": {"name": "window", "window": 5},  # shorter than the longest prompt: the rolling cache rolls
    "mla": {"name": "mla", "kv_rank": 16},
    "diff": {"name": "diff"},
}
POSITIONALS = ["learned", "sinusoidal", "rope", "alibi", "none"]
BACKENDS = {"math": "math", "baddbmm": "baddbmm", "sdpa": "sdpa", "auto": "auto"}
# every positional × attention with the reference kernel; every ragged-capable backend on two configs
COMBOS = [(a, p, "math") for a, p in itertools.product(ATTENTIONS, POSITIONALS)]
COMBOS += [(a, p, b) for a, p in (("window", "alibi"), ("mla", "rope")) for b in BACKENDS if b != "math"]

PROMPTS = (3, 7, 12)  # tokens of the three first requests
JOINER = 5  # tokens of the request that joins mid-way
STEPS = 6  # batched decode steps
SWAP_AT = 3  # after this many steps the 7-token request leaves and the joiner joins


@pytest.fixture(autouse=True, scope="module")
def _measuring_auto():
    """auto measures its choices, briefly: what these tests check is among which backends it chooses."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(autotune, "CHOICE_MIN_TIME", 0.002)
        yield


def model_for(attention: str, positional: str, backend: str = "math", **overrides):
    spec = {**ATTENTIONS[attention], "backend": BACKENDS[backend]}
    return build_model(tiny(attention=spec, positional=positional, **overrides), seed=0, kernels=autotune.KernelChoices()).eval()


def prompts_of(lengths, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 50, (n,), generator=gen) for n in lengths]


def prefill(model, prompt: torch.Tensor) -> tuple[Cache, torch.Tensor]:
    """A request prefilled alone: its cache and the logits (vocab,) of its last token."""
    cache = model.new_cache()
    return cache, model(prompt[None], cache=cache).logits[0, -1]


def decode_alone(model, prompt: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding of one sequence with its own cache: the logits (n, vocab) each token was picked
    from, and the n tokens."""
    cache, logits = prefill(model, prompt)
    seen, tokens = [], []
    for _ in range(n):
        seen.append(logits)
        tokens.append(logits.argmax())
        logits = model(tokens[-1].view(1, 1), cache=cache).logits[0, -1]
    return torch.stack(seen), torch.stack(tokens)


def serve(model, prompts: list[torch.Tensor], joiner: torch.Tensor) -> dict[int, list[torch.Tensor]]:
    """What a continuous-batching server does: each request prefilled alone and merged into the running
    batch; one batched forward pass per decode step; after SWAP_AT steps request 1 leaves and the
    joiner (request 3) joins. The logits each request's tokens were picked from, by request."""
    seen: dict[int, list[torch.Tensor]] = {}
    caches, last = [], []
    for i, prompt in enumerate(prompts):
        cache, logits = prefill(model, prompt)
        caches.append(cache)
        last.append(logits)
        seen[i] = []
    cache, rows = Cache.merge(caches), [0, 1, 2]  # rows: which request each cache row holds
    assert cache.ragged and cache.lengths.tolist() == [len(p) for p in prompts]
    logits = torch.stack(last)  # (B, vocab)
    for step in range(STEPS):
        for row, request in enumerate(rows):
            seen[request].append(logits[row])
        tokens = logits.argmax(-1)  # (B,)
        if step == SWAP_AT:
            keep = [row for row, request in enumerate(rows) if request != 1]
            cache.select(keep)
            tokens, rows = tokens[keep], [rows[row] for row in keep]
            joined, joined_logits = prefill(model, joiner)
            cache = Cache.merge([cache, joined])
            seen[3] = [joined_logits]
            tokens, rows = torch.cat([tokens, joined_logits.argmax()[None]]), rows + [3]
        logits = model(tokens[:, None], cache=cache).logits[:, -1]  # one batched forward for every row
    return seen


@pytest.mark.parametrize("attention,positional,backend", COMBOS)
@torch.no_grad()
def test_ragged_batch_decodes_every_row_as_if_alone(attention, positional, backend):
    model = model_for(attention, positional, backend)
    *prompts, joiner = prompts_of((*PROMPTS, JOINER))
    seen = serve(model, prompts, joiner)
    for request, prompt in enumerate([*prompts, joiner]):
        got = torch.stack(seen[request])  # (n, vocab)
        expected, tokens = decode_alone(model, prompt, len(got))
        assert torch.allclose(got, expected, atol=1e-5, rtol=0), (request, (got - expected).abs().max())
        assert torch.equal(got.argmax(-1), tokens)
        assert torch.equal(tokens, model.generate(prompt[None], len(got), temperature=0)[0, len(prompt):])


@torch.no_grad()
def test_auto_chooses_only_among_backends_that_take_a_batched_mask():
    model = model_for("mha", "rope", "auto")
    caches = [prefill(model, p)[0] for p in prompts_of(PROMPTS)]
    cache = Cache.merge(caches)
    model(torch.randint(0, 50, (3, 1)), cache=cache)
    auto = model.blocks[0].attn.attend.kernel
    ragged = [record for call, record in auto.choices.items() if call.split(":")[9:11] == ["general", "True"]]  # kind, batched
    assert ragged, auto.choices.keys()
    for record in ragged:
        assert record["backend"] in ("math", "baddbmm", "sdpa", "sdpa.math"), record


def test_a_backend_without_ragged_is_never_a_candidate_for_a_batched_mask():
    class UniformOnly:
        """math, declaring everything but ragged."""

        name = "test_uniform_only"

        @staticmethod
        def capabilities(options: dict) -> frozenset[str]:
            return frozenset({"causal", "window", "bias", "dropout", "decode"})

        def __call__(self, q, k, v, mask, dropout_p=0.0):
            return build("attention_backend", "math")(q, k, v, mask, dropout_p)

    q, (k, v) = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 4, 6, 8)  # B 2, H 4, one query over 6 keys
    k_pos = torch.tensor([[PADDING_POSITION] * 3 + [0, 1, 2], [0, 1, 2, 3, 4, 5]])
    mask = Mask(k_pos[:, -1:], k_pos)
    assert "ragged" in needed_capabilities(q, k, mask, 0.0)
    with registered("attention_backend", "test_uniform_only", UniformOnly):
        record = autotune.choose_attention(q, k, v, mask, 0.0, "forward")[1]
        assert record["rejected"]["test_uniform_only"] == "cannot ragged"
        # auto's choices: a batched mask and a uniform one of the same shapes and kind are chosen apart
        slopes = alibi_slopes(4)
        auto = AutoAttention()
        auto.use(autotune.choose_attention)
        auto(q, k, v, Mask(mask.q_pos, mask.k_pos, None, slopes))
        auto(q, k, v, Mask(torch.tensor([5]), torch.arange(6), None, slopes))
        assert len(auto.choices) == 2
        assert "test_uniform_only" in next(iter(auto.choices.values()))["rejected"]


@pytest.mark.parametrize("kind", ["causal", "window", "alibi", "window+alibi"])
@pytest.mark.parametrize("backend", ["math", "baddbmm", "sdpa"])
@torch.no_grad()
def test_a_batched_mask_gives_each_row_what_its_own_mask_gives(kind, backend):
    """Rows of 2 queries at different positions over right-aligned, left-padded keys (padding holds
    junk): each row's output equals the math kernel on that row alone, without its padding."""
    B, H, Hkv, D, Tq = 3, 4, 2, 8, 2
    ends = [3, 9, 6]  # each row's tokens: keys 0..end-1, the last Tq of which are its queries
    Tk = max(ends)
    k_pos = torch.stack([torch.cat([torch.full((Tk - e,), PADDING_POSITION), torch.arange(e)]) for e in ends])
    q_pos = k_pos[:, -Tq:].clone()
    window = 4 if "window" in kind else None
    slopes = alibi_slopes(H) if "alibi" in kind else None
    q, k, v = torch.randn(B, H, Tq, D), torch.randn(B, Hkv, Tk, D), torch.randn(B, Hkv, Tk, D)
    got = build("attention_backend", backend)(q, k, v, Mask(q_pos, k_pos, window, slopes))  # (B, H, Tq, D)
    math = build("attention_backend", "math")
    for row, end in enumerate(ends):
        real = slice(Tk - end, Tk)
        alone = math(q[row:row + 1], k[row:row + 1, :, real], v[row:row + 1, :, real],
                     Mask(q_pos[row], k_pos[row, real], window, slopes))
        assert torch.allclose(got[row:row + 1], alone, atol=1e-5, rtol=0), (row, (got[row] - alone[0]).abs().max())


HELD = {"k": 2, "v": 2, "c_kv": 1, "k_rope": 1}  # the tensors a layer's cache holds, and their token dim


def held(layer) -> dict[str, torch.Tensor]:
    return {name: getattr(layer, name) for name in HELD if getattr(layer, name, None) is not None}


@pytest.mark.parametrize("attention", ["gqa", "window", "mla", "diff"])
@torch.no_grad()
def test_padding_and_other_rows_never_leak_into_a_row(attention):
    model = model_for(attention, "alibi")
    prompts = prompts_of(PROMPTS)
    step = torch.randint(0, 50, (3, 1))

    def row_0(prompts: list[torch.Tensor], junk: bool = False) -> torch.Tensor:
        """The logits of row 0 (3 tokens: the most padding) after one batched step."""
        cache = Cache.merge([prefill(model, p)[0] for p in prompts])
        if junk:  # large finite values wherever row 0 is padding
            for layer in cache.layers:
                pad = layer.pos[0] == PADDING_POSITION
                assert pad.any()
                for name, tensor in held(layer).items():
                    tensor = tensor.clone()
                    row = tensor[0].movedim(HELD[name] - 1, 0)  # a view: (T, ...) of row 0
                    row[pad] = 1e3 * torch.randn_like(row[pad])
                    setattr(layer, name, tensor)
        return model(step, cache=cache).logits[0]

    reference = row_0(prompts)
    others = prompts_of(PROMPTS, seed=2)  # the other rows' contents change, their lengths do not
    assert torch.equal(row_0([prompts[0], others[1], others[2]]), reference)
    assert torch.equal(row_0(prompts, junk=True), reference)
    longer = prompts_of((3, 9, 4), seed=3)  # and with other lengths (other padding): the same numbers
    assert torch.allclose(row_0([prompts[0], longer[1], longer[2]]), reference, atol=1e-5, rtol=0)


def held_bytes(cache: Cache) -> int:
    """Bytes of every tensor the layers' caches hold, counted here."""
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in held(layer).values())


@pytest.mark.parametrize("attention", ["mha", "window", "mla"])
@torch.no_grad()
def test_select_drops_the_columns_no_remaining_row_uses(attention):
    model = model_for(attention, "rope")
    cache = Cache.merge([prefill(model, p)[0] for p in prompts_of(PROMPTS)])
    keep = model.blocks[0].attn.window - 1 if attention == "window" else None  # a rolling cache keeps window − 1

    def columns() -> int:
        """The columns every layer holds (each held tensor's and the positions' agree)."""
        found = {t.shape[HELD[name]] for layer in cache.layers for name, t in held(layer).items()}
        found |= {layer.pos.shape[-1] for layer in cache.layers}
        assert len(found) == 1, found
        return found.pop()

    assert columns() == min(12, keep or 12) and cache.nbytes() == held_bytes(cache)
    cache.select([1, 0])  # the 12-token row leaves: rows of 7 and 3 tokens, in that order
    assert cache.lengths.tolist() == [7, 3] and cache.ragged
    assert columns() == min(7, keep or 7) and cache.nbytes() == held_bytes(cache)
    assert all(layer.pos.shape == (2, columns()) for layer in cache.layers)
    cache.select([1])  # one row: at one position again, positions (T,) as a prefilled cache's
    assert not cache.ragged and cache.length == 3 and cache.lengths.tolist() == [3]
    assert all(layer.pos.tolist() == list(range(3)) for layer in cache.layers)
    assert columns() == 3 and cache.nbytes() == held_bytes(cache)


@torch.no_grad()
def test_caches_of_one_length_merge_into_one_at_one_position():
    model = model_for("mha", "rope")
    a, b = prompts_of((6, 6))
    cache = Cache.merge([prefill(model, a)[0], prefill(model, b)[0]])
    assert not cache.ragged and cache.length == 6 and cache.layers[0].pos.shape == (6,)
    step = torch.randint(0, 50, (2, 1))
    together = model(step, cache=cache).logits
    alone = [model(step[i:i + 1], cache=prefill(model, p)[0]).logits for i, p in enumerate((a, b))]
    assert torch.allclose(together, torch.cat(alone), atol=1e-5, rtol=0)


@torch.no_grad()
def test_merged_learned_positions_stop_at_block_size():
    model = build_model(tiny(positional="learned", block_size=8), seed=0).eval()
    cache = Cache.merge([prefill(model, p)[0] for p in prompts_of((3, 8))])
    with pytest.raises(ValueError, match="positions up to 9 but this positional encoding covers 8"):
        model(torch.randint(0, 50, (2, 1)), cache=cache)


def test_backends_that_cannot_take_a_batched_mask_say_so():
    for name in ("flex", "flash_attn", "xformers"):
        assert "ragged" not in get("attention_backend", name).factory.capabilities({})
    assert "ragged" not in get("attention_backend", "sdpa").factory.capabilities({"kernel": "flash"})
    assert "ragged" in attention_features(tiny())  # auto: math is always a candidate
    assert "ragged" not in attention_features(tiny(attention={"name": "mha", "backend": "flex"}))
    # and refuse a batched mask rather than read one row's positions for all
    k_pos = torch.tensor([[PADDING_POSITION, 0], [0, 1]])
    with pytest.raises(ValueError, match="backend 'flex' cannot attend with rows at different positions"):
        build("attention_backend", "flex", compile=False)(*torch.randn(3, 2, 1, 1, 8), Mask(k_pos[:, -1:], k_pos))


@torch.no_grad()
def test_a_model_that_cannot_decode_ragged_refuses_to_merge_naming_backends_that_can():
    model = build_model(tiny(attention={"name": "mha", "backend": {"name": "flex", "compile": False}}), seed=0).eval()
    cache = model.new_cache()
    assert cache is not None  # it decodes, rows at one position
    with pytest.raises(ValueError, match=r"attention 'mha' cannot decode rows at different positions in one batch "
                                         r"\(ragged\) with backend 'flex'; backends that can: .*math"):
        Cache.merge([cache, cache])


def test_an_empty_cache_cannot_merge_and_a_ragged_one_has_no_single_length():
    model = model_for("mha", "rope")
    with pytest.raises(ValueError, match="cannot merge an empty cache"):
        Cache.merge([model.new_cache()])
    with torch.no_grad():
        cache = Cache.merge([prefill(model, p)[0] for p in prompts_of((2, 4))])
    with pytest.raises(ValueError, match=r"different positions \(\[2, 4\]\): use cache.lengths"):
        _ = cache.length
