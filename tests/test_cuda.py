"""GPU paths: CUDA-graph decoding and compiled training against the eager ones (skipped without CUDA)."""

import pytest
import torch

from conftest import tiny_config
from goom_ssm import GoomSSMForCausalLM
from goom_ssm.modeling.cache_goom_ssm import CACHE_NAME
from goom_ssm.modeling.cuda_graph_goom_ssm import decoders_of

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def make_model(**overrides):
    torch.manual_seed(0)
    return GoomSSMForCausalLM(tiny_config(vocab_size=500, hidden_size=64, num_hidden_layers=3, num_state_heads=4,
                                          state_size=16, **overrides)).cuda().eval()


@pytest.mark.parametrize("scan", ["auto", "chunked"])  # the fused Triton layer step, and the layer op by op
@torch.no_grad()
def test_graph_decoding_equals_eager_decoding(scan):
    model = make_model(scan_implementation=scan)
    ids = torch.randint(0, 500, (3, 40), device="cuda")
    eager_cache = model(ids[:, :20], use_cache=True)[CACHE_NAME]
    graph_cache = model(ids[:, :20], use_cache=True)[CACHE_NAME]
    model.config.decode_with_cuda_graphs = False
    eager = [model(ids[:, t : t + 1], cache=eager_cache).logits for t in range(20, 40)]
    model.config.decode_with_cuda_graphs = True
    graphed = [model(ids[:, t : t + 1], cache=graph_cache).logits for t in range(20, 40)]
    assert decoders_of(model)
    for a, b in zip(eager, graphed):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    full = model(ids).logits[:, 20:]
    assert torch.allclose(torch.cat(graphed, 1), full, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_graph_decoding_with_a_head_that_has_a_bias():
    """A head replaced by one with a bias (set_output_embeddings) is run as it is, not by the
    fused bias-free head kernel."""
    model = make_model()
    head = torch.nn.Linear(64, 500, bias=True).cuda()
    model.set_output_embeddings(head)
    ids = torch.randint(0, 500, (2, 12), device="cuda")
    cache = model(ids[:, :10], use_cache=True)[CACHE_NAME]
    graphed = [model(ids[:, t : t + 1], cache=cache).logits for t in (10, 11)]
    assert decoders_of(model)
    assert torch.allclose(torch.cat(graphed, 1), model(ids).logits[:, 10:], atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_a_kept_cache_is_not_overwritten_by_another_generation():
    model = make_model()
    a_ids, b_ids = torch.randint(0, 500, (2, 1, 10), device="cuda")
    cache_a = model(a_ids, use_cache=True)[CACHE_NAME]
    model(a_ids[:, -1:], cache=cache_a)
    kept = [s.rows.clone() for s in cache_a.states]
    cache_b = model(b_ids, use_cache=True)[CACHE_NAME]
    for _ in range(3):
        model(b_ids[:, -1:], cache=cache_b)
    assert all(torch.equal(k, s.rows) for k, s in zip(kept, cache_a.states))


@torch.no_grad()
def test_an_id_outside_the_vocabulary_in_graph_decoding_is_refused_and_changes_nothing():
    model = make_model()
    ids = torch.randint(0, 500, (2, 12), device="cuda")
    cache = model(ids[:, :10], use_cache=True)[CACHE_NAME]
    model(ids[:, 10:11], cache=cache)  # captures the graph
    before = [s.rows.clone() for s in cache.states]
    with pytest.raises(ValueError, match="token id 500, outside the vocabulary"):
        model(torch.tensor([[3], [500]], device="cuda"), cache=cache)
    assert cache.get_seq_length() == 11
    assert all(torch.equal(b, s.rows) for b, s in zip(before, cache.states))
    logits = model(ids[:, 11:12], cache=cache).logits
    assert torch.allclose(logits, model(ids).logits[:, 11:12], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("settings", [dict(do_sample=False), dict(do_sample=False, num_beams=3),
                                      dict(do_sample=True, top_p=0.9)])
def test_generate_with_graphs_equals_without(settings):
    model = make_model()
    ids = torch.randint(0, 500, (2, 16), device="cuda")
    outs = []
    for graphs in (True, False):
        model.config.decode_with_cuda_graphs = graphs
        torch.manual_seed(1)
        outs.append(model.generate(ids, max_new_tokens=24, pad_token_id=0, **settings))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("dynamic, lengths", [(None, (200,)), (True, (200, 300))])
def test_compiled_training_step_equals_eager(dynamic, lengths):
    """Loss and every gradient as in eager mode; with ``dynamic=True`` the traced launches take
    symbolic lengths (two lengths, one chunk of ``L`` steps too many for the other)."""
    model = make_model().train()
    compiled = torch.compile(model, fullgraph=True, dynamic=dynamic)
    for length in lengths:
        ids = torch.randint(0, 500, (2, length), device="cuda")
        model.zero_grad()
        eager_loss = model(ids, labels=ids).loss
        eager_loss.backward()
        eager_grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        loss = compiled(input_ids=ids, labels=ids).loss
        loss.backward()
        assert torch.allclose(loss, eager_loss, rtol=1e-5)
        for a, p in zip(eager_grads, model.parameters()):
            assert torch.allclose(a, p.grad, rtol=1e-3, atol=1e-5)


def test_compiled_training_step_launches_the_scan_kernels_itself():
    """The scan's operators are Triton operators: Inductor's code for the compiled forward and
    backward launches the recurrence and matrix-power kernels, with no call of an operator."""
    from torch._inductor.utils import run_and_get_code

    from goom_ssm import triton_scan

    assert triton_scan._WRAP is torch.library.wrap_triton  # compiled kernels: Triton operators
    model = make_model().train()
    ids = torch.randint(0, 500, (2, 200), device="cuda")  # 13 chunks: every stage and the power run
    compiled = torch.compile(model, fullgraph=True)
    _, codes = run_and_get_code(lambda: compiled(input_ids=ids, labels=ids).loss.backward())
    code = "\n".join(codes)
    assert code.count("_recurrence_kernel") >= 2 and "_power_kernel" in code
    assert "goom_ssm.scan" not in code and "goom_ssm::scan" not in code


@pytest.mark.parametrize("autocast", [False, True])
def test_the_padded_head_equals_the_linear_head(autocast):
    """Many positions on CUDA: the head runs against its weight padded with zero rows
    (vocabulary 500 -> 512); logits and gradients as accurate as the plain linear head's."""
    model = make_model().train()
    hidden = torch.randn(2, 600, 64, device="cuda", requires_grad=True)
    weights = torch.randn(2, 600, 500, device="cuda")
    weight = model.lm_head.weight

    def run(head):
        hidden.grad = weight.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            logits = head(hidden)
        (logits * weights).sum().backward()
        return logits.detach(), hidden.grad, weight.grad

    padded = run(model._logits)
    plain = run(lambda h: model.lm_head(h).float())
    h, w, g = hidden.detach().double(), weight.detach().double(), weights.double()
    exact = (h @ w.T, g @ w, (g.flatten(0, 1).T @ h.flatten(0, 1)))
    assert padded[0].shape == (2, 600, 500) and padded[0].is_contiguous() and padded[0].dtype == torch.float32
    for ours, theirs, want in zip(padded, plain, exact):
        error = lambda t: ((t.double() - want).norm() / want.norm()).item()  # noqa: E731
        assert error(ours) <= 1.5 * error(theirs) + 1e-7


@pytest.mark.parametrize("training", [True, False])  # the fused training layer, and the Triton module path
def test_packed_documents_equal_documents_alone_in_float32(training):
    """A packed row of 1,023 tokens (documents of 1 to 700 tokens, crossing the kernels'
    chunk boundaries) against each document alone: hidden states and every parameter's
    gradient, in float32, as close to the float64 result as the documents alone are."""
    lengths = [300, 1, 17, 700, 5]
    model = make_model().train(training)
    ids = torch.randint(0, 500, (1, sum(lengths)), device="cuda")
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None].cuda()
    weights = torch.randn(1, sum(lengths), 64, device="cuda", dtype=torch.float64)

    def run(dtype, packed):
        model.to(dtype).zero_grad()
        if packed:
            hidden = model.backbone(ids, position_ids=position_ids).last_hidden_state
        else:
            hidden = torch.cat([model.backbone(doc).last_hidden_state for doc in ids.split(lengths, dim=1)], dim=1)
        (hidden * weights.to(dtype)).sum().backward()
        return [hidden.detach().double()] + [p.grad.double() for p in model.parameters()]

    exact = run(torch.float64, packed=False)
    alone, packed = run(torch.float32, packed=False), run(torch.float32, packed=True)
    error = lambda t, want: ((t - want).norm() / want.norm()).item()  # noqa: E731
    for name, a, p, want in zip(["hidden"] + [n for n, _ in model.named_parameters()], alone, packed, exact):
        assert error(p, want) <= 2 * error(a, want) + 1e-7, name


class _Rows(torch.utils.data.Dataset):
    """Fixed rows of token ids, labels equal to them (a causal LM's batches)."""

    def __init__(self, rows: torch.Tensor):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def _trainer_losses(tmp_path, **compile_args):
    from transformers import Trainer, TrainingArguments

    model = make_model().train()
    rows = torch.randint(0, 500, (12, 64), generator=torch.Generator().manual_seed(3))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=6, learning_rate=1e-3,
                             report_to=[], save_strategy="no", logging_steps=1, seed=0, tf32=False, **compile_args)
    trainer = Trainer(model=model, args=args, train_dataset=_Rows(rows))
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_the_trainer_with_cuda_graphs_trains_as_eager(tmp_path):
    """The README's recipe for the ``Trainer``: ``torch_compile_mode="reduce-overhead"`` (the
    compiled forward and backward replayed as CUDA graphs, the Triton scan's kernels traced into
    them) trains as the eager model does."""
    eager = _trainer_losses(tmp_path / "eager")
    graphed = _trainer_losses(tmp_path / "graphed", torch_compile=True, torch_compile_mode="reduce-overhead")
    assert len(eager) == len(graphed) == 6
    assert all(abs(a - b) <= 1e-3 * abs(a) for a, b in zip(eager, graphed)), (eager, graphed)
