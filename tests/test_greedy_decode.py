"""generate()'s greedy loop that reads the device's progress every few tokens
(``goom_ssm.modeling.generation_goom_ssm``): the same token ids as transformers' own loop,
in every case it takes, with far fewer host reads; everything else runs transformers' loop.
The GPU cases run on CUDA too (CUDA-graph decoder)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import GenerationMixin, StoppingCriteria, StoppingCriteriaList

from conftest import tiny_config
from goom_ssm import GoomSSMForCausalLM
from goom_ssm.modeling import generation_goom_ssm, modeling_goom_ssm
from goom_ssm.modeling.cache_goom_ssm import CACHE_NAME
from goom_ssm.modeling.generation_goom_ssm import next_greedy_tokens

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


class HostReads(TorchDispatchMode):
    """Counts the reads of a tensor's value by the host (``.item()``, ``bool(tensor)``, ``.tolist()``)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket.__name__ == "_local_scalar_dense"
        return func(*args, **(kwargs or {}))


def make_model(device="cpu"):
    torch.manual_seed(0)
    config = tiny_config(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_state_heads=2, state_size=8)
    return GoomSSMForCausalLM(config).to(device).eval()


def transformers_loop(model, ids, monkeypatch, **kwargs):
    """``generate()`` through transformers' own ``_sample``."""
    with monkeypatch.context() as patch:
        patch.setattr(GoomSSMForCausalLM, "_sample", GenerationMixin._sample)
        return generate(model, ids, **kwargs)


def generate(model, ids, **kwargs):
    with torch.no_grad():
        return model.generate(ids, do_sample=False, **kwargs)


def eos_of_every_row(model, ids, step_of_row, **kwargs):
    """EOS ids that end row ``i`` at its new token ``step_of_row[i]`` at the latest (greedy run without EOS)."""
    free = generate(model, ids, max_new_tokens=max(step_of_row) + 1, **kwargs)[:, ids.shape[1]:]
    return sorted({int(free[row, step]) for row, step in enumerate(step_of_row)})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("finish", ["max_length", "eos_some", "eos_all_early", "eos_all_late"])
def test_the_same_tokens_as_transformers_loop_with_fewer_host_reads(device, finish, monkeypatch):
    """Rows that stop at EOS get pad tokens after it; when every row has stopped, the output
    ends where transformers' loop ends it (the steps decoded past that point are dropped),
    wherever that falls between two reads."""
    model = make_model(device)
    ids = torch.randint(1, 300, (3, 9), generator=torch.Generator().manual_seed(2)).to(device)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # a left-padded row
    kwargs = dict(attention_mask=mask, max_new_tokens=40, pad_token_id=0)
    steps = {"max_length": None, "eos_some": [3], "eos_all_early": [2, 0, 4], "eos_all_late": [21, 25, 19]}[finish]
    if steps is not None:  # eos_some: the EOS of the first row only (the others may meet it too)
        kwargs["eos_token_id"] = eos_of_every_row(model, ids, steps + [0] * (3 - len(steps)), attention_mask=mask,
                                                  pad_token_id=0)[: len(steps) if finish == "eos_some" else None]
    expected = transformers_loop(model, ids, monkeypatch, **kwargs)
    with HostReads() as reads:
        got = generate(model, ids, **kwargs)
    assert torch.equal(got, expected)
    new_tokens = expected.shape[1] - ids.shape[1]
    assert new_tokens == 40 if finish == "max_length" else (finish == "eos_some" or new_tokens < 40)
    if finish != "max_length":
        assert (expected[:, ids.shape[1]:] == 0).any()  # a finished row was padded
    assert reads.count <= 8  # transformers' loop reads once per token (plus its set-up's)


@pytest.mark.parametrize("options", [dict(repetition_penalty=1.3, min_new_tokens=5), dict(use_cache=False),
                                     dict(no_repeat_ngram_size=2)])
def test_the_same_tokens_with_logits_processors_and_without_cache(options, monkeypatch):
    model = make_model()
    ids = torch.randint(1, 300, (2, 7), generator=torch.Generator().manual_seed(3))
    kwargs = dict(max_new_tokens=19, pad_token_id=0, eos_token_id=eos_of_every_row(model, ids, [6, 30]), **options)
    assert torch.equal(generate(model, ids, **kwargs), transformers_loop(model, ids, monkeypatch, **kwargs))


@pytest.mark.parametrize("options", [dict(return_dict_in_generate=True), dict(do_sample=True), dict(streamer=True),
                                     dict(cache=True)])
def test_other_calls_run_transformers_loop(options, monkeypatch):
    """Results with more than the token ids, sampling, a streamer or the caller's cache (whose
    final state the caller sees: a read every few tokens would advance it too far)."""
    from transformers import TextStreamer

    model = make_model()
    ids = torch.randint(1, 300, (1, 5))
    if "streamer" in options:
        options = dict(streamer=TextStreamer(_NoTokenizer()))
    if "cache" in options:
        options = {CACHE_NAME: model(ids[:, :2], use_cache=True)[CACHE_NAME], "attention_mask": torch.ones_like(ids)}
    taken = []
    monkeypatch.setattr(modeling_goom_ssm, "greedy_decode", lambda *args: taken.append(args))
    with torch.no_grad():
        model.generate(ids, max_new_tokens=3, pad_token_id=0, **{"do_sample": False, **options})
    assert not taken


class _NoTokenizer:
    def decode(self, ids, **kwargs):
        return ""


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def spy_on_chunks(monkeypatch) -> list:
    """The ``steps`` of every call of ``CUDAGraphDecoder.greedy_tokens``, in order."""
    from goom_ssm.modeling.cuda_graph_goom_ssm import CUDAGraphDecoder

    chunks, greedy_tokens = [], CUDAGraphDecoder.greedy_tokens

    def spy(self, model, cache, last_tokens, unfinished, seen, steps, rule):
        chunks.append(steps)
        return greedy_tokens(self, model, cache, last_tokens, unfinished, seen, steps, rule)

    monkeypatch.setattr(CUDAGraphDecoder, "greedy_tokens", spy)
    return chunks


@CUDA
@pytest.mark.parametrize("new_tokens", [1, 2, 3, 18, 40])
@pytest.mark.parametrize("finish", ["max_length", "max_length_without_pad", "eos_some", "eos_all_late"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("penalty", [None, 1.3])
def test_cuda_greedy_steps_run_in_graph_chunks(new_tokens, finish, batch, penalty, monkeypatch):
    """On CUDA the steps after the first run in graph-replayed chunks of up to 16 (powers of
    two) that also pick (with or without a repetition penalty), pad and check the tokens: the
    ids of transformers' loop (which decodes through the one-step graph), whatever length and
    wherever EOS falls."""
    model = make_model("cuda")
    ids = torch.randint(1, 300, (batch, 9), generator=torch.Generator().manual_seed(4)).cuda()
    kwargs = dict(max_new_tokens=new_tokens) if finish == "max_length_without_pad" else dict(max_new_tokens=new_tokens,
                                                                                              pad_token_id=0)
    if finish.startswith("eos"):
        steps = [new_tokens // 2, new_tokens - 1, new_tokens // 3][:batch]
        eos = eos_of_every_row(model, ids, steps, pad_token_id=0)
        kwargs["eos_token_id"] = eos[:1] if finish == "eos_some" else eos
    if penalty is not None:
        kwargs["repetition_penalty"] = penalty
    expected = transformers_loop(model, ids, monkeypatch, **kwargs)
    chunks = spy_on_chunks(monkeypatch)
    got = generate(model, ids, **kwargs)
    assert torch.equal(got, expected)
    assert all(steps in (1, 2, 4, 8, 16) for steps in chunks)
    if finish.startswith("max_length"):
        assert sum(chunks) == new_tokens - 1
    assert bool(chunks) == (got.shape[1] - ids.shape[1] > 1)  # chunks ran wherever a step followed the first


@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_chunks_give_the_step_by_step_tokens(dtype, monkeypatch):
    """With padded prompts: in float32, the tokens of the model's module path (no CUDA graphs);
    in bfloat16, where the fused decoding kernels round differently from the modules' products
    and near-ties of the logits can go either way, those of the one-step graph (the same kernels)."""
    model = make_model("cuda").to(dtype)
    ids = torch.randint(1, 300, (4, 11), generator=torch.Generator().manual_seed(5)).cuda()
    mask = torch.ones_like(ids)
    mask[2, :5] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=37, pad_token_id=0)
    if dtype == torch.float32:
        model.config.decode_with_cuda_graphs = False
        expected = generate(model, ids, **kwargs)
        model.config.decode_with_cuda_graphs = True
    else:
        expected = transformers_loop(model, ids, monkeypatch, **kwargs)
    chunks = spy_on_chunks(monkeypatch)
    assert torch.equal(generate(model, ids, **kwargs), expected)
    assert chunks


@CUDA
@pytest.mark.parametrize("options", [dict(no_repeat_ngram_size=2), dict(repetition_penalty=1.3, min_new_tokens=5),
                                     dict(stopping_criteria="own"), dict(max_time=100.0)])
def test_cuda_graph_chunks_only_without_processors_and_other_criteria(options, monkeypatch):
    """Logits processors besides a repetition penalty, or stopping criteria other than length
    and EOS: the step-by-step loop."""
    model = make_model("cuda")
    ids = torch.randint(1, 300, (2, 7), generator=torch.Generator().manual_seed(3)).cuda()
    if "stopping_criteria" in options:
        options = dict(stopping_criteria=StoppingCriteriaList([_NeverStop()]))
    kwargs = dict(max_new_tokens=19, pad_token_id=0, eos_token_id=eos_of_every_row(model, ids, [6, 30]), **options)
    expected = transformers_loop(model, ids, monkeypatch, **kwargs)
    chunks = spy_on_chunks(monkeypatch)
    assert torch.equal(generate(model, ids, **kwargs), expected)
    assert not chunks


class _NeverStop(StoppingCriteria):
    def __call__(self, input_ids, scores, **kwargs):
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class _EagerChunks:
    """What ``CUDAGraphDecoder.greedy_tokens`` computes, step by step through the model's module
    path: a stand-in that runs the chunked loop on the CPU."""

    def __init__(self):
        self.chunks = []

    def greedy_tokens(self, model, cache, last_tokens, unfinished, seen, steps, rule):
        self.chunks.append(steps)
        tokens, any_unfinished = [], []
        for _ in range(steps):
            logits = model(input_ids=last_tokens[:, None], **{CACHE_NAME: cache}, use_cache=True).logits
            last_tokens, unfinished = next_greedy_tokens(logits[:, -1], unfinished, rule, seen)
            tokens.append(last_tokens)
            any_unfinished.append(unfinished.any())
        return torch.stack(tokens, dim=1), torch.stack(any_unfinished), unfinished, seen


@pytest.mark.parametrize("new_tokens", [2, 3, 18, 40])
@pytest.mark.parametrize("finish", ["max_length", "max_length_without_pad", "eos_some", "eos_all_late"])
@pytest.mark.parametrize("penalty", [None, 1.3])
def test_the_chunked_loop_ends_where_transformers_loop_ends(new_tokens, finish, penalty, monkeypatch):
    """The loop around the chunks (their sizes, where the output ends when every row has met
    EOS inside a chunk) and the token choice the graph replays (``next_greedy_tokens``, with
    and without a repetition penalty), on the CPU with an eager stand-in for the graph."""
    model = make_model()
    ids = torch.randint(1, 300, (3, 9), generator=torch.Generator().manual_seed(4))
    kwargs = dict(max_new_tokens=new_tokens) if finish == "max_length_without_pad" else dict(max_new_tokens=new_tokens,
                                                                                              pad_token_id=0)
    if finish.startswith("eos"):
        eos = eos_of_every_row(model, ids, [new_tokens // 2, new_tokens - 1, new_tokens // 3], pad_token_id=0)
        kwargs["eos_token_id"] = eos[:1] if finish == "eos_some" else eos
    if penalty is not None:
        kwargs["repetition_penalty"] = penalty
    expected = transformers_loop(model, ids, monkeypatch, **kwargs)
    stand_in, choose = _EagerChunks(), generation_goom_ssm._graph_chunks_decoder

    def choose_the_stand_in(model, *args):  # where the CUDA-graph decoder would be chosen
        with monkeypatch.context() as patch:
            patch.setattr(GoomSSMForCausalLM, "_cuda_graph_decoder", lambda *_: stand_in)
            return choose(model, *args)

    monkeypatch.setattr(generation_goom_ssm, "_graph_chunks_decoder", choose_the_stand_in)
    got = generate(model, ids, **kwargs)
    assert torch.equal(got, expected)
    assert stand_in.chunks and all(steps in (1, 2, 4, 8, 16) for steps in stand_in.chunks)
    if finish.startswith("max_length"):
        assert sum(stand_in.chunks) == new_tokens - 1
