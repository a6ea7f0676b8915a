"""Sequential image modelling on scikit-learn's 8x8 digits: generation and classification.

The original GOOM-SSM paper models MNIST (28x28 images, 784 pixels) as sequences of pixels,
generating them and classifying them. MNIST cannot be fetched here, so scikit-learn's 8x8
digits (1,797 images shipped with scikit-learn, pixel values 0-16) stand in, with the
original's recipe scaled down: AdamW and the one-cycle LR schedule of ``goom-ssm train``'s
defaults (a higher peak LR), smaller widths, fewer steps. Each pixel is a token (vocabulary
17), 64 tokens per image, row by row. The same stratified 80/20 split of the images
(random_state 0) serves both tasks: 1,437 to train on, 360 held out.

(a) Generation: ``GoomSSMForCausalLM`` learns the pixel sequences, each after a start token
    (id 17, vocabulary 18). Reported: held-out negative log-likelihood in bits per pixel,
    next to a per-position pixel histogram fitted on the training images (add-one smoothed),
    and a PNG grid of sampled digits (written with Pillow where it is installed).
(b) Classification: ``GoomSSMModel`` reads the 64 pixel tokens and a linear head maps the
    last position's hidden state to the 10 classes. Reported: held-out accuracy, next to a
    logistic regression on the 64 pixel values (scaled to 0-1; scikit-learn).

    python examples/digits.py                                  # on a GPU
    python examples/digits.py --device cpu                     # smaller, on CPU

Prints a Markdown table and writes the raw numbers (settings, losses per step) to ``--out``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from example_utils import (add_run_arguments, count_parameters, goom_ssm_config, markdown_table, parse, train,
                           write_results)
from goom_ssm import GoomSSMForCausalLM, GoomSSMModel

PIXEL_VALUES = 17  # pixel tokens 0..16
WHITE = PIXEL_VALUES - 1
START = PIXEL_VALUES  # the start token of a generated image
NUM_CLASSES = 10
TEST_IMAGES = 360
MODEL = {"hidden_size": 64, "num_layers": 2, "state_heads": 4, "state_size": 16}
# The data set is small: a larger model (width 128, 4 layers, 8 state rows) overfits it sooner.
PRESETS = {
    "cuda": {"steps": 1000, "batch_size": 32, "lr": 3e-3, **MODEL},
    "cpu": {"steps": 300, "batch_size": 32, "lr": 3e-3, **MODEL},
}


def load_split(eval_size: int) -> dict:
    """The digits as pixel tokens: ``{"train", "test"}`` each ``(pixels [n, 64] long, labels [n])``,
    a stratified split of :data:`TEST_IMAGES` held-out images (``random_state=0``), of which the
    first ``eval_size`` are kept."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    images, labels = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(images, labels, test_size=TEST_IMAGES, stratify=labels,
                                                        random_state=0)
    as_tensors = lambda x, y: (torch.as_tensor(x, dtype=torch.long), torch.as_tensor(y, dtype=torch.long))  # noqa: E731
    return {"train": as_tensors(x_train, y_train), "test": as_tensors(x_test[:eval_size], y_test[:eval_size])}


def batch_indices(n: int, batch_size: int, generator: torch.Generator):
    """Endless batches of indices into ``n`` examples: each pass a new random order (a batch may span two)."""
    order = torch.empty(0, dtype=torch.long)
    while True:
        while len(order) < batch_size:
            order = torch.cat([order, torch.randperm(n, generator=generator)])
        yield order[:batch_size]
        order = order[batch_size:]


def with_start(pixels: torch.Tensor) -> torch.Tensor:
    """``[n, 64]`` pixel tokens -> ``[n, 65]`` with the start token first."""
    return F.pad(pixels, (1, 0), value=START)


def histogram_bits_per_pixel(train_pixels: torch.Tensor, test_pixels: torch.Tensor) -> float:
    """Held-out bits per pixel of the per-position pixel histogram of ``train_pixels [n, 64]``
    (counts plus one, so that no value has probability 0)."""
    counts = F.one_hot(train_pixels, PIXEL_VALUES).sum(0).double() + 1  # [64, 17]
    log_probs = (counts / counts.sum(-1, keepdim=True)).log2()
    return -log_probs.gather(1, test_pixels.T).mean().item()


@torch.no_grad()
def bits_per_pixel(model: GoomSSMForCausalLM, pixels: torch.Tensor, batch_size: int, bf16: bool) -> float:
    """Mean negative log2-likelihood per pixel of ``pixels [n, 64]`` under ``model``."""
    total = 0.0
    for start in range(0, len(pixels), batch_size):
        ids = with_start(pixels[start:start + batch_size])
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=ids[:, :-1], use_cache=False).logits.float()
        total += F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
    return total / pixels.numel() / math.log(2)


@torch.no_grad()
def sample_images(model: GoomSSMForCausalLM, count: int, seed: int) -> torch.Tensor:
    """``count`` sampled images ``[count, 8, 8]`` (pixel values 0..16; the start token is never sampled)."""
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    prompt = torch.full((count, 1), START, dtype=torch.long, device=device)
    ids = model.generate(prompt, max_new_tokens=64, do_sample=True, top_k=0, suppress_tokens=[START])
    return ids[:, 1:].view(count, 8, 8).cpu()


def save_grid(images: torch.Tensor, path: Path) -> Optional[str]:
    """Write ``images [n, 8, 8]`` (0..16, white on black) as a PNG grid, 4x enlarged, to ``path``;
    returns the path, or ``None`` without Pillow."""
    try:
        from PIL import Image
    except ImportError:
        print("Pillow is not installed: no PNG of the samples (pip install pillow)")
        return None
    columns = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    cell, gap = 32, 4
    grid = np.full((rows * (cell + gap) + gap, columns * (cell + gap) + gap), 64, dtype=np.uint8)
    for i, image in enumerate(images):
        top, left = gap + (i // columns) * (cell + gap), gap + (i % columns) * (cell + gap)
        pixels = (image.numpy() * 255 // WHITE).astype(np.uint8).repeat(cell // 8, 0).repeat(cell // 8, 1)
        grid[top:top + cell, left:left + cell] = pixels
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return str(path)


class LastPositionClassifier(nn.Module):
    """A ``GoomSSMModel`` and a linear head on the last position's hidden state. (Where the
    package has ``GoomSSMForSequenceClassification``, it does the same for unpadded inputs.)"""

    def __init__(self, backbone: GoomSSMModel, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.hidden_size, num_classes)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``input_ids [batch, seq_len]`` -> class logits ``[batch, num_classes]`` (float32)."""
        hidden = self.backbone(input_ids=input_ids, use_cache=False).last_hidden_state[:, -1]
        return self.head(hidden).float()


@torch.no_grad()
def accuracy(model: LastPositionClassifier, pixels: torch.Tensor, labels: torch.Tensor, batch_size: int,
             bf16: bool) -> float:
    """Fraction of ``pixels [n, 64]`` whose predicted class is ``labels [n]``."""
    correct = 0
    for start in range(0, len(pixels), batch_size):
        with torch.autocast(pixels.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(pixels[start:start + batch_size])
        correct += (logits.argmax(-1) == labels[start:start + batch_size]).sum().item()
    return correct / len(labels)


def run_generation(data: dict, args: argparse.Namespace) -> dict:
    """Train the generative model; held-out bits per pixel (and the histogram's), samples."""
    pixels = data["train"][0].to(args.device)
    batches = batch_indices(len(pixels), args.batch_size, torch.Generator().manual_seed(args.seed))
    torch.manual_seed(args.seed)
    model = GoomSSMForCausalLM(goom_ssm_config(args, PIXEL_VALUES + 1)).to(args.device)

    def batch_loss() -> torch.Tensor:
        ids = with_start(pixels[next(batches).to(args.device)])
        return model(input_ids=ids, labels=ids, use_cache=False).loss

    trained = train(model, batch_loss, args.steps, args.lr, args.bf16, "generation")
    test_pixels = data["test"][0].to(args.device)
    samples = sample_images(model, args.samples, args.seed) if args.samples else None
    grid = save_grid(samples, Path(args.out).with_suffix(".png")) if samples is not None else None
    return {"parameters": count_parameters(model),
            "bits_per_pixel": bits_per_pixel(model, test_pixels, args.batch_size, args.bf16),
            "histogram_bits_per_pixel": histogram_bits_per_pixel(data["train"][0], data["test"][0]),
            "uniform_bits_per_pixel": math.log2(PIXEL_VALUES), "samples_png": grid,
            "samples": None if samples is None else samples.tolist(),
            "train_seconds": trained["seconds"], "losses": trained["losses"]}


def run_classification(data: dict, args: argparse.Namespace) -> dict:
    """Train the classifier; held-out accuracy (and a logistic regression's on the pixel values)."""
    from sklearn.linear_model import LogisticRegression

    pixels, labels = (t.to(args.device) for t in data["train"])
    batches = batch_indices(len(pixels), args.batch_size, torch.Generator().manual_seed(args.seed))
    torch.manual_seed(args.seed)
    model = LastPositionClassifier(GoomSSMModel(goom_ssm_config(args, PIXEL_VALUES)), NUM_CLASSES).to(args.device)

    def batch_loss() -> torch.Tensor:
        index = next(batches).to(args.device)
        return F.cross_entropy(model(pixels[index]), labels[index])

    trained = train(model, batch_loss, args.steps, args.lr, args.bf16, "classification")
    test_pixels, test_labels = (t.to(args.device) for t in data["test"])
    logistic = LogisticRegression(max_iter=1000).fit(data["train"][0].numpy() / WHITE, data["train"][1].numpy())
    return {"parameters": count_parameters(model),
            "accuracy": accuracy(model, test_pixels, test_labels, args.batch_size, args.bf16),
            "logistic_regression_accuracy": logistic.score(data["test"][0].numpy() / WHITE, data["test"][1].numpy()),
            "train_seconds": trained["seconds"], "losses": trained["losses"]}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", choices=["generation", "classification"],
                        default=["generation", "classification"], help="which tasks to run (default: both)")
    parser.add_argument("--eval-size", type=int, default=TEST_IMAGES,
                        help=f"held-out images to score, of the {TEST_IMAGES} (default: all)")
    parser.add_argument("--samples", type=int, default=64,
                        help="digits to sample into a PNG beside --out (its name with .png), 0: none (default: 64)")
    add_run_arguments(parser, PRESETS)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the tasks from the command line ``argv``; returns the results written to ``--out``."""
    parser = build_parser()
    args = parse(parser, argv, PRESETS)
    if not 1 <= args.eval_size <= TEST_IMAGES:
        parser.error(f"--eval-size must be between 1 and {TEST_IMAGES}, got {args.eval_size}")
    if args.samples < 0:
        parser.error(f"--samples must be 0 (none) or positive, got {args.samples}")

    data = load_split(args.eval_size)
    results = {"task": "digits", "settings": vars(args), "train_images": len(data["train"][0]),
               "test_images": len(data["test"][0])}
    rows = []
    if "generation" in args.tasks:
        results["generation"] = generation = run_generation(data, args)
        rows += [["generation", "GOOM-SSM", f"{generation['parameters']:,}",
                  f"{generation['bits_per_pixel']:.3f} bits/pixel", f"{generation['train_seconds']:.0f}"],
                 ["generation", "per-position histogram", "-",
                  f"{generation['histogram_bits_per_pixel']:.3f} bits/pixel", "-"]]
    if "classification" in args.tasks:
        results["classification"] = classification = run_classification(data, args)
        rows += [["classification", "GOOM-SSM", f"{classification['parameters']:,}",
                  f"{classification['accuracy']:.3f} accuracy", f"{classification['train_seconds']:.0f}"],
                 ["classification", "logistic regression on pixels", "-",
                  f"{classification['logistic_regression_accuracy']:.3f} accuracy", "-"]]
    table = markdown_table(["task", "model", "parameters", "held-out result", "train seconds"], rows)
    note = (f"{results['train_images']} training and {results['test_images']} held-out images, {args.steps} steps of "
            f"{args.batch_size} images per model, device {args.device}{', bf16' if args.bf16 else ''}; uniform: "
            f"{math.log2(PIXEL_VALUES):.3f} bits/pixel, chance accuracy {1 / NUM_CLASSES:.3f}.")
    print(f"\n{table}\n\n{note}")
    results.update(table=table, note=note)
    write_results(args.out, results)
    return results


if __name__ == "__main__":
    main()
