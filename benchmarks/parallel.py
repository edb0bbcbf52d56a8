"""Tensor / expert parallel at the released shapes: per-rank memory and the communication of one step.

    python benchmarks/parallel.py            # tables (from the config and the sharding code; ~30 s, no GPU)
    python benchmarks/parallel.py --json

Per-rank weights: the released text stack (letterpress.quant.GEMMA4_26B_A4B_TEXT: 30 layers, 25 sliding with
8 KV heads x 256 and 5 full with 2 KV heads x 512, hidden 2816, 16 heads, dense MLP 2112, 128 experts of
704, top 8, vocab 262,144) is built on the meta device and cut by `letterpress.parallel.shard_model` for
rank 0 of N, so the figures are what the code keeps, not a formula beside it. bf16 counts 2 bytes per
parameter; fp8/int8 count what `quantize_model` stores for each quantized weight of the slice (1 byte per
weight + a float32 scale per output channel), the embedding, router and norms staying bf16.

Per-rank KV cache: bytes per token of the rank's KV heads (bf16), and of one row of 32,768 tokens in the
paged layout (sliding layers keep window - 1 + one 2048-token chunk).

Communication of one denoising step (batch rows x canvas 256 tokens), per rank: every layer all-reduces
[tokens, hidden] three times (attention output, dense MLP, experts), the self-conditioning MLP once; rank
0 broadcasts the soft embeddings [tokens, hidden] and gathers the float32 logits [tokens, vocab / N] of
each other rank. A ring all-reduce of P bytes sends and receives 2 (N - 1) / N x P per rank. Compared with
the step's own cost on one H100 SXM (3.35 TB/s HBM, 989 TFLOP/s dense bf16, NVLink 450 GB/s per direction;
PCIe 5.0 x16 ~ 55 GB/s) as a roofline: the step reads the rank's weights once (at 256 tokens x top 8 every
expert is hit) and does 2 x active parameters x tokens FLOPs. These are estimates from datasheet figures,
not measurements: no GPU machine was lent to this task.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from letterpress.config import model_config_from_dict  # noqa: E402
from letterpress.quant import GEMMA4_26B_A4B_TEXT  # noqa: E402

GB = 1e9
HBM, FLOPS, NVLINK, PCIE = 3.35e12, 989e12, 450e9, 55e9  # H100 SXM datasheet figures, bytes/s and FLOP/s
CANVAS, CONTEXT, BLOCK, CHUNK = 256, 32_768, 16, 2048
SIZES = [1, 2, 4, 8]


def released_model():
    from letterpress.model import DiffusionGemma

    cfg = model_config_from_dict({"model_type": "diffusion_gemma", "canvas_length": CANVAS,
                                  "text_config": {"model_type": "diffusion_gemma_text", **GEMMA4_26B_A4B_TEXT}})
    with torch.device("meta"):
        return DiffusionGemma(cfg).to(torch.bfloat16)


def weight_bytes(model) -> dict[str, float]:
    """Bytes per part of one rank's model: bf16, and with the linear layers and experts in 8 bits."""
    from letterpress.model.layers import Experts
    from letterpress.parallel.shard import ParallelExperts, RowParallelLinear

    parts = {"embedding": 0, "attention": 0, "dense MLP + self-cond.": 0, "experts": 0, "router + norms": 0}
    eight_bit = 0
    for name, module in model.named_modules():
        if isinstance(module, (RowParallelLinear, ParallelExperts)):
            continue
        own = list(module.named_parameters(recurse=False))
        if not own:
            continue
        numel = sum(p.numel() for _, p in own)
        if isinstance(module, torch.nn.Linear):
            part = "attention" if "self_attn" in name else "router + norms" if "router" in name else "dense MLP + self-cond."
            if part != "router + norms":
                eight_bit += numel + 4 * module.out_features
            else:
                eight_bit += 2 * numel
        elif isinstance(module, Experts):
            part = "experts"
            eight_bit += numel + 4 * (module.gate_up_proj.shape[0] * module.gate_up_proj.shape[1]
                                      + module.down_proj.shape[0] * module.down_proj.shape[1])
        elif isinstance(module, torch.nn.Embedding):
            part = "embedding"
            eight_bit += 2 * numel
        else:
            part = "router + norms"
            eight_bit += 2 * numel
        parts[part] += 2 * numel
    return {**parts, "bf16": sum(parts.values()), "fp8 / int8": eight_bit}


def kv_bytes(text, tokens: int) -> dict[str, int]:
    from letterpress.cache import blocks_for_row, layer_kinds

    per_token = sum(k.bytes_per_token(torch.bfloat16) for k in layer_kinds(text))
    row = sum(blocks_for_row(k, tokens, BLOCK, CHUNK) * BLOCK * k.bytes_per_token(torch.bfloat16) for k in layer_kinds(text))
    return {"per_token": per_token, "row": row}


def active_params(text) -> float:
    """Parameters one token multiplies through in a denoising step (top-k experts, LM head and the
    self-conditioning matmul over the vocabulary included)."""
    h = text.hidden_size
    attn = sum(h * text.num_attention_heads * s.head_dim * 2 + h * s.num_kv_heads * s.head_dim * (2 if s.is_sliding else 1)
               for s in text.layers)
    mlp = 3 * h * text.intermediate_size * (len(text.layers) + 1)  # + the self-conditioning block
    experts = 3 * h * text.moe_intermediate_size * text.top_k_experts * len(text.layers)
    router = h * text.num_experts * len(text.layers)
    vocab = 2 * h * text.vocab_size  # LM head + soft embeddings
    return attn + mlp + experts + router + vocab


def communication(text, n: int, rows: int) -> dict[str, float]:
    """Bytes one rank sends + receives in one denoising step, and per layer."""
    tokens = rows * CANVAS
    act = tokens * text.hidden_size * 2  # one [tokens, hidden] bf16 all-reduce payload
    ring = 2 * (n - 1) / n
    layer = 3 * act * ring
    reduces = len(text.layers) * layer + act * ring  # + the self-conditioning MLP
    broadcast = act * (n - 1) / n if n > 1 else 0  # soft embeddings, pipelined ring
    vocab_slice = math.ceil(text.vocab_size / n)
    gather = tokens * vocab_slice * 4 * (n - 1)  # rank 0 receives every other rank's float32 logits
    return {"per_layer": layer, "all_reduce": reduces, "broadcast": broadcast, "gather_to_rank0": gather,
            "rank0_total": reduces + broadcast + gather, "collectives": 3 * len(text.layers) + 3}


def roofline(text, weights: float, n: int, rows: int) -> dict[str, float]:
    tokens = rows * CANVAS
    compute_s = max(weights / HBM, 2 * active_params(text) * tokens / n / FLOPS)
    comm = communication(text, n, rows)
    return {"compute_ms": 1e3 * compute_s, "nvlink_ms": 1e3 * comm["rank0_total"] / NVLINK,
            "pcie_ms": 1e3 * comm["rank0_total"] / PCIE}


def main() -> None:
    from letterpress.parallel import Shard, shard_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    base = released_model()
    text = base.text_config
    memory, steps = [], []
    for n in SIZES:
        for ep in ([False, True] if n > 1 else [False]):
            model = copy.deepcopy(base)
            with torch.device("meta"):
                shard_model(model, Shard(0, n, ep))
            w = weight_bytes(model)
            kv = kv_bytes(model.text_config, CONTEXT)
            memory.append({"tp": n, "ep": ep, **{k: v / GB for k, v in w.items()},
                           "kv_heads": sorted({(s.num_kv_heads, s.head_dim) for s in model.text_config.layers}),
                           "kv_per_token_kb": kv["per_token"] / 1e3, "kv_row_gb": kv["row"] / GB})
            if not ep:
                for rows in (1, 8):
                    steps.append({"tp": n, "rows": rows, **{k: (v / 1e6 if k != "collectives" else v)
                                                             for k, v in communication(text, n, rows).items()},
                                  **roofline(text, w["bf16"], n, rows)})
    if args.json:
        print(json.dumps({"memory": memory, "steps": steps}, indent=1))
        return
    print("Per-rank memory, released shapes (GB = 1e9 bytes); KV in bf16, a row of 32,768 tokens in the paged layout")
    print("| TP | experts | embedding | attention | dense MLP + self-cond. | experts | router + norms | bf16 total "
          "| fp8/int8 total | KV heads x dim (local) | KV KB/token | KV GB/row |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for m in memory:
        heads = ", ".join(f"{h} x {d}" for h, d in m["kv_heads"])
        print(f"| {m['tp']} | {'by id (EP)' if m['ep'] else 'by width'} | {m['embedding']:.2f} | {m['attention']:.2f} "
              f"| {m['dense MLP + self-cond.']:.2f} | {m['experts']:.2f} | {m['router + norms']:.3f} | {m['bf16']:.2f} "
              f"| {m['fp8 / int8']:.2f} | {heads} | {m['kv_per_token_kb']:.1f} | {m['kv_row_gb']:.2f} |")
    print()
    print("Communication per denoising step, per rank (MB = 1e6 bytes), bf16 activations, vs a roofline of the step")
    print("| TP | rows | all-reduce per layer | 91 all-reduces | soft-emb. broadcast | logits gathered to rank 0 "
          "| rank 0 total | step roofline ms | comm ms NVLink | comm ms PCIe |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for s in steps:
        print(f"| {s['tp']} | {s['rows']} | {s['per_layer']:.2f} | {s['all_reduce']:.1f} | {s['broadcast']:.2f} "
              f"| {s['gather_to_rank0']:.1f} | {s['rank0_total']:.1f} | {s['compute_ms']:.2f} | {s['nvlink_ms']:.2f} "
              f"| {s['pcie_ms']:.2f} |")


if __name__ == "__main__":
    main()
