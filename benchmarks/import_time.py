"""Time to import goom_ssm against transformers' own entry point, in fresh processes.

    python benchmarks/import_time.py [--repeats 3]

Prints a table (best of ``--repeats`` fresh interpreters per row) and the ratio the project
holds itself to: ``import goom_ssm`` at most 1.5x ``from transformers import
AutoModelForCausalLM``. ``python -X importtime -c "import goom_ssm"`` shows what remains.
"""

import argparse
import subprocess
import sys
import time

STATEMENTS = {
    "python (nothing imported)": "pass",
    "import torch": "import torch",
    "from transformers import AutoModelForCausalLM": "from transformers import AutoModelForCausalLM",
    "import goom_ssm": "import goom_ssm",
    "goom-ssm --help": "import sys; sys.argv = ['goom-ssm', '--help']; from goom_ssm.cli import main\ntry: main()\n"
                       "except SystemExit: pass",
    "from transformers import GPT2LMHeadModel": "from transformers import GPT2LMHeadModel",
    "goom_ssm.GoomSSMForCausalLM": "import goom_ssm; goom_ssm.GoomSSMForCausalLM",
}


def best_time(statement: str, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", statement], check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    seconds = {name: best_time(code, args.repeats) for name, code in STATEMENTS.items()}
    print(f"| what | seconds (best of {args.repeats}) |\n|---|---|")
    for name, value in seconds.items():
        print(f"| `{name}` | {value:.2f} |")
    ratio = seconds["import goom_ssm"] / seconds["from transformers import AutoModelForCausalLM"]
    print(f"\nimport goom_ssm / from transformers import AutoModelForCausalLM: {ratio:.2f}x (target <= 1.5x)")


if __name__ == "__main__":
    main()
