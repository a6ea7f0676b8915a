"""Optional packages: imported where they are used, with an error that names the extra to install."""

import importlib
from types import ModuleType


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import ``module``, or raise ``ModuleNotFoundError`` saying that ``purpose`` needs it and
    which ``goom-ssm[extra]`` installs it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(f"{purpose} needs the package '{error.name}', which is not installed: "
                                  f"pip install 'goom-ssm[{extra}]'", name=error.name) from None


def versions(optional: tuple = ("triton", "flash-linear-attention")) -> dict:
    """Versions of torch and transformers, and of each distribution in ``optional`` that is
    installed: what a measured result depends on (benchmarks record it beside their numbers)."""
    from importlib.metadata import PackageNotFoundError, version

    import torch
    import transformers

    found = {"torch": torch.__version__, "transformers": transformers.__version__}
    for package in optional:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found
