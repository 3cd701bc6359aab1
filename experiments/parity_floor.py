"""How close can fp32 parity with transformers be? On the embedded SmolLM2 (the first 4 windows of 512
tokens of the shipped text `expand-docs`, whose sha256 the results record; residual stream up to ~3e4),
measure in one run, per window:

- expand fp32 vs transformers fp32 (what the parity tests bound),
- transformers fp32 vs transformers float64 (the reference's own fp32 error),
- expand fp32 vs expand float64 (expand's own fp32 error),
- expand float64 vs transformers float64 (the implementations, nearly without rounding).

    python -m experiments.parity_floor
"""

from __future__ import annotations

import numpy as np

import expand
from expand.check import run_in
from expand.text import shipped_text, text_sha256, token_batch
from experiments.benchlib import device_line, write_results

TEXT, WINDOWS = "expand-docs", 4


def main() -> None:
    import torch

    from experiments.bench_forward import torch_model

    model = expand.load("smollm2")
    text = shipped_text(TEXT)
    ids = token_batch(model, text, 512, WINDOWS)
    ref32, ref64 = torch_model(model, torch.float32), torch_model(model, torch.float64)
    rows = []
    for w, window in enumerate(ids):
        tokens = window[None]
        with torch.no_grad():
            t32 = ref32(torch.as_tensor(tokens)).logits.double().numpy()
            t64 = ref64(torch.as_tensor(tokens)).logits.double().numpy()
        e32 = run_in("fp32", model, tokens)[0].astype(np.float64)
        e64 = run_in("fp64", model, tokens)[0]
        row = {"window": w, "expand32_vs_torch32": np.abs(e32 - t32).max(), "torch32_vs_torch64": np.abs(t32 - t64).max(),
               "expand32_vs_expand64": np.abs(e32 - e64).max(), "expand64_vs_torch64": np.abs(e64 - t64).max(),
               "max_abs_logit": np.abs(t64).max()}
        rows.append({k: v if k == "window" else float(v) for k, v in row.items()})
        print(" ".join(f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}" for k, v in rows[-1].items()), flush=True)
    texts = {TEXT: text_sha256(text)}
    lines = [f"device: {device_line()}", f"text: {TEXT} (sha256 {texts[TEXT]}), {len(ids)} windows of 512 "
             "tokens", "",
             f"{'window':>6s} {'e32-t32':>9s} {'t32-t64':>9s} {'e32-e64':>9s} {'e64-t64':>9s} {'max|logit|':>10s}"]
    for r in rows:
        lines.append(f"{r['window']:6d} {r['expand32_vs_torch32']:9.2e} {r['torch32_vs_torch64']:9.2e} "
                     f"{r['expand32_vs_expand64']:9.2e} {r['expand64_vs_torch64']:9.2e} {r['max_abs_logit']:10.1f}")
    write_results("parity_floor", {"device": device_line(), "texts": texts, "rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()
