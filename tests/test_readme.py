"""The README's loop example runs as printed and ends at the sparsity it asks for."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_loop_example_runs_and_hits_its_target():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(b for b in blocks if "hf.attach(optimizer)" in b)
    namespace: dict = {}
    exec(compile(example, str(README), "exec"), namespace)
    model = namespace["model"]
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    zeros = sum(int((w == 0).sum()) for w in weights)
    total = sum(w.numel() for w in weights)
    assert abs(zeros / total - 0.98) < 0.0005
    assert not any(hasattr(m, "parametrizations") for m in model.modules())
