"""Model cards (README.md with Hub metadata) filled from a model's config and real numbers."""

import os
from importlib import resources
from pathlib import Path
from string import Template
from typing import Optional, Sequence

DEFAULT_LIMITATIONS = (
    "A small research model: it continues text in the style of its training data and knows "
    "nothing else. It can produce false, repetitive or offensive text; do not use its output "
    "as fact."
)


def render_model_card(config, num_parameters: int, *, model_name: str, repo_id: Optional[str] = None,
                      training: str = "Not trained by this package (converted or initialised).",
                      evaluation: str = "Not evaluated.", datasets: Sequence[str] = (), license: str = "mit",
                      limitations: str = DEFAULT_LIMITATIONS) -> str:
    """The card's Markdown text. ``training`` and ``evaluation`` are Markdown paragraphs or
    tables with measured numbers; ``datasets`` are Hub dataset ids or names."""
    template = Template(resources.files("goom_ssm.model_cards").joinpath("template.md").read_text())
    return template.substitute(
        model_name=model_name,
        repo_id=repo_id or model_name,
        license=license,
        datasets="\n".join(f"- {d}" for d in datasets) or "[]",
        num_parameters=f"{num_parameters:,}",
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_state_heads=config.num_state_heads,
        state_size=config.state_size,
        training=training,
        evaluation=evaluation,
        limitations=limitations,
    )


def write_model_card(folder: os.PathLike, model, **facts) -> Path:
    """Write ``folder/README.md`` for ``model`` (see :func:`render_model_card` for ``facts``)."""
    path = Path(folder) / "README.md"
    num_parameters = sum(p.numel() for p in model.parameters())
    facts.setdefault("model_name", Path(folder).name)
    path.write_text(render_model_card(model.config, num_parameters, **facts))
    return path
