"""The μP coordinate check (Yang et al., Tensor Programs V, §D): train the recipe's model at several widths
for a few Adam steps, with and without μP, and record per block the size of its output and of that
output's change since initialisation. Under μP the curves are flat in width; under the standard
parametrisation (the same Adam LR for every parameter, 1/√d attention) the changes grow with it.

    python -m pretrain.scaling coord-check --config configs/tiny.yaml --widths 64,128,256,512 --steps 10 --out DIR

The model is the recipe's (`model:`), with hidden_size set to each width; num_heads and num_kv_heads stay
(head size grows), ffn_hidden_size keeps its ratio to the width. μP's base width is the recipe's
model.mup_base_width, or the smallest width. Every width trains on the same batch of random tokens
(seeded: the check is about sizes, not about language), with optim.lr, beta1, beta2 and eps of the
recipe, no weight decay, no clipping, no warmup; the optimizer groups are the engines' (model/mup.py).

Recorded per parametrisation, width, step t = 0..steps (before update t+1), and quantity:
  embedding    mean |coordinate| of the embedding's output
  <n>:<type>   block n's output minus its input (its residual contribution), for each block type of
               model.layer_pattern
  <n>:<type> attention logits / feedback logits   q_t.k_t times the logit scale (per head, each position
               with itself), for `S` and `*` blocks: where 1/sqrt(d) instead of 1/d shows
  logits       mean |coordinate| of the logits
each as `size` (mean |x_t|) and `change` (mean |x_t - x_0|), averaged over `seeds` initialisations.
`slope` is the least-squares slope of log(value at the last step) against log(width).
"""
import json
import math
from dataclasses import replace
from pathlib import Path

import torch

from model import ModelConfig, SessaLM
from model.mup import feedback_query_multiplier, lr_multiplier, query_multiplier

PARAMETRISATIONS = ("standard", "mup")


def width_config(model: ModelConfig, width: int, mup: bool, base_width: int) -> ModelConfig:
    """The recipe's model at `width`: heads kept, the MLP's ratio kept, μP on or off."""
    ffn = max(1, round(model.ffn_hidden_size * width / model.hidden_size))
    return replace(model, hidden_size=width, ffn_hidden_size=ffn, mup=mup, mup_base_width=base_width if mup else None,
                   mup_base_head_size=None, init_scheme="scaled")


def _optimizer(model: SessaLM, config: ModelConfig, lr: float, betas: tuple[float, float], eps: float):
    groups: dict[float, list] = {}
    for name, param in model.named_parameters():
        groups.setdefault(lr_multiplier(name, param.ndim, config), []).append(param)
    return torch.optim.Adam([{"params": params, "lr": lr * mult} for mult, params in groups.items()],
                            betas=betas, eps=eps)


def _projections(layer) -> dict[str, tuple]:
    """(query, key projection, head size, scale of q.k) of each attention logit a block computes."""
    config = layer.sessa
    scale = query_multiplier(config) / math.sqrt(config.head_size)
    mixer = getattr(layer, "mixer", layer)  # `S`: the mixer holds them; `*`: the block
    found = {}
    if hasattr(mixer, "q_proj"):
        found["attention logits"] = (mixer.q_proj, mixer.k_proj, config.head_size, scale)
    if hasattr(mixer, "fb_q_proj"):
        found["feedback logits"] = (mixer.fb_q_proj, mixer.fb_k_proj, config.hidden_size,
                                    feedback_query_multiplier(config) / math.sqrt(config.hidden_size))
    return found


def _activations(model: SessaLM, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """The embedding output, each block's residual contribution and attention logits, and the logits of one
    forward. An attention logit here is q_t.k_t times the block's scale, per head: each position with
    itself, which RoPE leaves unchanged (it rotates q_t and k_t alike), so the projections' outputs suffice."""
    captured, outputs = {}, {}

    def keep(name, contribution):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            captured[name] = (out - args[0]).detach() if contribution else out.detach()
        return hook

    def keep_output(module, args, output):
        outputs[module] = output[0].detach()

    handles = [model.embedding.register_forward_hook(keep("embedding", False))]
    logits_of = {}
    for layer in model.layers:
        name = f"{layer.layer_number}:{model.sessa.block_types[layer.layer_number]}"
        handles.append(layer.register_forward_hook(keep(name, True)))
        for what, (q_proj, k_proj, head, scale) in _projections(layer).items():
            logits_of[f"{name} {what}"] = (q_proj, k_proj, head, scale)
            handles += [q_proj.register_forward_hook(keep_output), k_proj.register_forward_hook(keep_output)]
    with torch.no_grad():
        captured["logits"] = model(tokens).detach()
    for handle in handles:
        handle.remove()
    for name, (q_proj, k_proj, head, scale) in logits_of.items():
        q, k = (outputs[p].unflatten(-1, (-1, head)) for p in (q_proj, k_proj))  # [T, B, heads, head]
        k = k.repeat_interleave(q.shape[-2] // k.shape[-2], dim=-2)  # grouped-query attention
        captured[name] = (q * k).sum(-1) * scale
    return captured


def run_width(config: ModelConfig, tokens: torch.Tensor, steps: int, lr: float, betas, eps: float,
              seed: int) -> dict[str, dict[str, list[float]]]:
    """{quantity: {"size": [steps + 1 values], "change": [...]}} of one model trained `steps` Adam steps."""
    model = SessaLM(config, init_seed=seed)
    optimizer = _optimizer(model, config, lr, betas, eps)
    initial, record = None, {}
    for step in range(steps + 1):
        acts = _activations(model, tokens[:, :-1])
        if initial is None:
            initial = acts
        for name, value in acts.items():
            entry = record.setdefault(name, {"size": [], "change": []})
            entry["size"].append(value.abs().mean().item())
            entry["change"].append((value - initial[name]).abs().mean().item())
        if step < steps:
            loss = model(tokens[:, :-1], tokens[:, 1:]).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return record


def slope(widths: list[int], values: list[float]) -> float:
    """Least-squares slope of log(value) against log(width)."""
    xs, ys = [math.log(w) for w in widths], [math.log(max(v, 1e-30)) for v in values]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def coord_check(model: ModelConfig, widths: list[int], steps: int, *, lr: float, betas=(0.9, 0.95), eps: float = 1e-8,
                seq_len: int = 64, batch: int = 8, seeds: int = 1, base_width: int | None = None) -> dict:
    """The check's JSON: {"widths", "steps", "base_width", "records": {parametrisation: {quantity: {"size":
    [[per step] per width], "change": ...}}}, "slopes": {parametrisation: {quantity: {"size": s, "change": s}}}}."""
    widths = sorted(widths)
    base_width = base_width or model.mup_base_width or widths[0]
    tokens = torch.randint(0, model.vocab_size, (batch, seq_len + 1), generator=torch.Generator().manual_seed(0))
    configs = {(p, w): width_config(model, w, p == "mup", base_width) for p in PARAMETRISATIONS for w in widths}
    records, slopes = {}, {}  # (every width's model validated above, before any training)
    for parametrisation in PARAMETRISATIONS:
        per_width = []
        for width in widths:
            config = configs[parametrisation, width]
            runs = [run_width(config, tokens, steps, lr, betas, eps, seed) for seed in range(seeds)]
            per_width.append({q: {k: [sum(r[q][k][t] for r in runs) / seeds for t in range(steps + 1)]
                                  for k in ("size", "change")} for q in runs[0]})
        quantities = list(per_width[0])
        records[parametrisation] = {q: {k: [w[q][k] for w in per_width] for k in ("size", "change")}
                                    for q in quantities}
        slopes[parametrisation] = {q: {k: slope(widths, [w[q][k][-1] for w in per_width]) for k in ("size", "change")}
                                   for q in quantities}
    return {"widths": widths, "steps": steps, "base_width": base_width, "lr": lr, "seeds": seeds,
            "records": records, "slopes": slopes}


def plot(result: dict, path: Path) -> None:
    """One panel per quantity (columns) and parametrisation (rows): mean |change| against width, a line per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quantities = list(result["records"]["mup"])
    fig, axes = plt.subplots(len(PARAMETRISATIONS), len(quantities), figsize=(3 * len(quantities), 5.5),
                             squeeze=False, sharex=True)
    cmap = plt.get_cmap("viridis")
    for row, parametrisation in enumerate(PARAMETRISATIONS):
        for col, quantity in enumerate(quantities):
            ax = axes[row][col]
            series = result["records"][parametrisation][quantity]["change"]
            for t in range(1, result["steps"] + 1):
                ax.plot(result["widths"], [s[t] for s in series], color=cmap(t / result["steps"]), marker=".")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{parametrisation}: {quantity}\nslope {result['slopes'][parametrisation][quantity]['change']:+.2f}",
                         fontsize=8)
            if col == 0:
                ax.set_ylabel("mean |x_t - x_0|")
            if row == len(PARAMETRISATIONS) - 1:
                ax.set_xlabel("width")
    fig.tight_layout()
    fig.savefig(path, dpi=60)
    plt.close(fig)


def write(result: dict, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / "coord_check.json", out / "coord_check.png"
    json_path.write_text(json.dumps(result, indent=1))
    plot(result, png_path)
    return json_path, png_path
