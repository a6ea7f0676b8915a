"""Shared fixtures: reference vectors of the original implementation and small models."""

import importlib.util
import inspect
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels then run on CPU tensors in Triton's interpreter (set before triton is imported).
    os.environ.setdefault("TRITON_INTERPRET", "1")
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where the "triton" scan can run


def _patch_the_language_once_per_launch():
    """Make Triton's interpreter patch ``triton.language`` once per kernel launch, not again at
    every call of a ``@triton.jit`` helper inside the kernel (the kernels call several per step).

    The interpreter swaps the language's builtins for numpy-backed ones when a launch starts
    (``_patch_lang``) and restores them when it ends (``_LangPatchScope.restore``). A helper's
    call repeats ``_patch_lang``, walking every member of ``tl``, ``tl.tensor`` and ``tl.math``:
    with the same modules already patched by the launch, the walk finds no builtin left to
    swap and re-installs replacements equal to those in place, undone at the launch's end like
    them; on CPU it is most of an interpreted scan's time. Skipping that repeat (only for
    modules the running launch has patched) leaves what runs, and every result, unchanged.
    Does nothing where the interpreter is not used or its internals are not these."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    patch_lang = getattr(interpreter, "_patch_lang", None)
    scope_type = getattr(interpreter, "_LangPatchScope", None)
    if patch_lang is None or scope_type is None or not hasattr(scope_type, "restore"):
        return
    restore = scope_type.restore
    patched = set()  # the language modules the running launch has patched

    def patch_unless_patched(fn):
        languages = {v for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)}
        if languages and languages <= patched:
            return scope_type()  # nothing to restore
        scope = patch_lang(fn)
        patched.update(languages)
        return scope

    def restore_and_forget(scope):
        patched.clear()
        restore(scope)

    interpreter._patch_lang = patch_unless_patched
    scope_type.restore = restore_and_forget


_patch_the_language_once_per_launch()


def _precision_knobs() -> dict:
    """The process-wide settings that decide how float32 and half-precision products round,
    as ``name: (get, set)``, in the order they must be set back: torch's legacy settings
    first (the matmul precision, cuDNN's ``allow_tf32``), then the ``fp32_precision`` of
    ``torch.backends`` and of each backend under it (the generic one first, so that each
    backend's own value, set after it, is the one that stays), then cuBLAS's
    reduced-precision reductions. Setting back only the new ones
    after a legacy change (accelerate sets ``torch.backends.cuda.matmul.allow_tf32 = True``
    when ``torch_compile`` trains without mixed precision) would leave the two disagreeing,
    and torch refuses float32 products then."""
    b = torch.backends
    knobs = {"float32_matmul_precision": (torch.get_float32_matmul_precision, torch.set_float32_matmul_precision),
             "cudnn.allow_tf32": (lambda: b.cudnn.allow_tf32, lambda v: setattr(b.cudnn, "allow_tf32", v))}
    holders = {"generic": b, "cuda.matmul": b.cuda.matmul, "cudnn": b.cudnn, "cudnn.conv": getattr(b.cudnn, "conv", None),
               "cudnn.rnn": getattr(b.cudnn, "rnn", None)}
    for name, holder in holders.items():
        if hasattr(holder, "fp32_precision"):  # torch 2.9 and later
            knobs[f"{name}.fp32_precision"] = (lambda h=holder: h.fp32_precision,
                                               lambda v, h=holder: setattr(h, "fp32_precision", v))
    for flag in ("allow_bf16_reduced_precision_reduction", "allow_fp16_reduced_precision_reduction"):
        knobs[f"cuda.matmul.{flag}"] = (lambda f=flag: getattr(b.cuda.matmul, f),
                                        lambda v, f=flag: setattr(b.cuda.matmul, f, v))
    return knobs


def _precision_settings() -> dict:
    """``name: value`` of each of :func:`_precision_knobs`; a value that torch refuses to read
    (legacy and new settings that disagree) is ``"unreadable"``."""
    settings = {}
    for name, (get, _) in _precision_knobs().items():
        try:
            settings[name] = get()
        except RuntimeError:
            settings[name] = "unreadable"
    return settings


def _set_precision_settings(settings: dict) -> None:
    for name, (_, set_) in _precision_knobs().items():
        set_(settings[name])


_PRECISION_CHANGES = []  # (test, {setting: (before, after)}) for the terminal summary


@pytest.fixture(autouse=True)
def _precision_settings_kept(request):
    """Every test ends with the precision settings it started with, and a test that changed
    them is named at the end of the run. Training through transformers' ``Trainer`` with
    ``torch_compile`` turns TF32 on for the whole process (``TrainingArguments`` unless
    ``tf32=False``; accelerate's state through cuBLAS's legacy flag whenever there is no mixed
    precision), and the float32 tests after such a test on a GPU would compare TF32 results."""
    saved = _precision_settings()
    yield
    now = _precision_settings()
    if now != saved:
        _PRECISION_CHANGES.append((request.node.nodeid, {k: (saved[k], now[k]) for k in saved if saved[k] != now[k]}))
        _set_precision_settings(saved)


def pytest_terminal_summary(terminalreporter):
    for test, changes in _PRECISION_CHANGES:
        described = ", ".join(f"{name}: {before} -> {after}" for name, (before, after) in changes.items())
        terminalreporter.write_line(f"precision settings changed (and restored) by {test}: {described}")


REFERENCE_DIR = Path(__file__).parent / "reference"


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    """The script ``benchmarks/<name>.py`` as a module (its ``main()`` not run)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference divided by the largest magnitude of ``expected``."""
    actual, expected = actual.detach().double().cpu(), expected.double().cpu()
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def norm_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` (Frobenius norms)."""
    actual, expected = actual.detach().double().cpu(), expected.double().cpu()
    return ((actual - expected).norm() / expected.norm()).item()


def random_scan_case(batch, length, n, d, radius, dtype=torch.float64, seed=0, device="cpu"):
    """A scan problem: inputs ``u [batch, length, n, d]``, ``A [d, d]`` (orthogonal times
    ``radius``), an initial state ``[batch, n, ...]`` with rows in (-0.1, 0.1); drawn in
    float64, then cast to ``dtype`` and moved to ``device``."""
    from goom_ssm.scan import ScaledRows, normalize_rows

    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    A = (q * radius).to(dtype)
    u = torch.randn(batch, length, n, d, generator=g, dtype=torch.float64).to(dtype)
    initial = normalize_rows((torch.rand(batch, n, d, generator=g, dtype=torch.float64) * 0.2 - 0.1).to(dtype))
    return u.to(device), A.to(device), ScaledRows(*(t.to(device) for t in initial))


@pytest.fixture(scope="session")
def reference_vectors():
    return torch.load(REFERENCE_DIR / "original_tiny_vectors.pt", weights_only=True)


@pytest.fixture(scope="session")
def stress_case():
    return torch.load(REFERENCE_DIR / "stress_radius_1p5.pt", weights_only=True)


@pytest.fixture(scope="session")
def converted_tiny_dir(tmp_path_factory):
    """The original tiny checkpoint converted to a Hugging Face folder."""
    from goom_ssm.conversion.original import convert_original_checkpoint

    out = tmp_path_factory.mktemp("converted") / "tiny"
    convert_original_checkpoint(REFERENCE_DIR / "original_tiny.pt", out)
    return out


def tiny_config(**overrides):
    from goom_ssm import GoomSSMConfig

    sizes = dict(vocab_size=97, hidden_size=16, num_hidden_layers=2, num_state_heads=2, state_size=4)
    sizes.update(overrides)
    return GoomSSMConfig(**sizes)


def enable_checkpointing(model, use_reentrant=None, every_n_layers: int = 1) -> None:
    """Activation checkpointing of the residual layers, as Trainer's option turns it on:
    transformers' ``activation_checkpointing_enable`` where it has it (newer releases, which
    deprecate ``gradient_checkpointing_enable``), else the older name; ``use_reentrant`` (None:
    transformers' default) and ``every_n_layers`` (every layer where transformers has no such
    option, before 5.16). Asserts which layers then checkpoint."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    options_name = "activation_checkpointing_kwargs"
    if enable is None:
        enable, options_name = model.gradient_checkpointing_enable, "gradient_checkpointing_kwargs"
    options = {} if use_reentrant is None else {options_name: {"use_reentrant": use_reentrant}}
    if "every_n_layers" in inspect.signature(enable).parameters:
        options["every_n_layers"] = every_n_layers
    else:
        every_n_layers = 1
    enable(**options)
    assert [layer.gradient_checkpointing for layer in model.base_model.layers] == [
        i % every_n_layers == 0 for i in range(len(model.base_model.layers))]


@pytest.fixture
def tiny_model():
    from goom_ssm import GoomSSMForCausalLM

    torch.manual_seed(0)
    return GoomSSMForCausalLM(tiny_config()).eval()
