"""Tensor / expert parallel at the released shapes: per-rank memory and the communication of one step.

    python benchmarks/parallel.py              # tables (from the config and the sharding code; ~30 s, no GPU)
    python benchmarks/parallel.py --measure    # + the sampler pass's per-rank memory, measured on the CPU
                                               #   with gloo at 1, 2, 4 ranks at the released vocabulary (~2 min)
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
[tokens, hidden] three times (attention output, dense MLP, experts); the self-conditioning MLP, the
embedding lookup (vocabulary-parallel: each id's row from the rank that holds it) and the soft embeddings
(each rank's probabilities x its embedding rows) once each; the soft embeddings' softmax needs the previous
logits' max and sum of exponentials per position ([tokens] float32 twice; none with --impl fast, whose state
is already the softmax); the sampler all-reduces per position an int64 argmax key, three float32
statistics (sum of exponentials, entropy term, non-finite count) and an int64 proposal key. A ring
all-reduce of P bytes sends and receives 2 (N - 1) / N x P per rank. Compared with the step's own cost on
one H100 SXM (3.35 TB/s HBM, 989 TFLOP/s dense bf16, NVLink 450 GB/s per direction; PCIe 5.0 x16 ~ 55
GB/s) as a roofline: the step reads the rank's weights once (at 256 tokens x top 8 every expert is hit)
and does 2 x active parameters x tokens FLOPs. These are estimates from datasheet figures, not
measurements: no GPU machine was lent to this task.

Sampler pass, per rank (letterpress.parallel.sampler): the float32 logits of the rank's vocabulary slice,
the rows' self-conditioning state (bf16, the previous step's and the new one), and one drawing row's
exponential noise: a [32 / N, vocab] chunk on the CPU (the generator's stream drawn a chunk at a time gives
the single process's numbers), the whole [256, vocab] on CUDA (there chunking would change the numbers). The
computed table counts these; `--measure` runs `sample_slice` (float32, so the plain state is the logits
themselves) under letterpress.profiling.AllocationPeak in N gloo processes and the single-process
`denoise_step` / `fused_denoise_step` for N = 1.
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
CHUNK_BYTES_DEFAULT = 32 * 2**20  # letterpress.chunks.CHUNK_BYTES
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


def communication(text, n: int, rows: int, fast: bool = False) -> dict[str, float]:
    """Bytes one rank sends + receives in one denoising step, and per layer."""
    tokens = rows * CANVAS
    act = tokens * text.hidden_size * 2  # one [tokens, hidden] bf16 all-reduce payload
    ring = 2 * (n - 1) / n
    layer = 3 * act * ring
    reduces = len(text.layers) * layer + 3 * act * ring  # + self-conditioning MLP, embedding, soft embeddings
    soft_stats = 0 if fast else 2 * tokens * 4 * ring  # max and sum of exp of the previous logits
    sampler = tokens * (8 + 3 * 4 + 8) * ring  # argmax key, 3 statistics, proposal key
    vocab_stats = soft_stats + sampler
    return {"per_layer": layer, "all_reduce": reduces, "vocab_stats": vocab_stats, "total": reduces + vocab_stats,
            # before the vocabulary split (issue 17's first cut): 91 all-reduces, the soft embeddings broadcast
            # from rank 0 and every rank's float32 logits gathered to it: what rank 0 moved
            "before_rank0": (len(text.layers) * layer + act * ring + (act * (n - 1) / n if n > 1 else 0)
                             + tokens * math.ceil(text.vocab_size / n) * 4 * (n - 1)),
            "collectives": 3 * len(text.layers) + 3 + (0 if fast else 2) + 3}


def sampler_memory(text, n: int, rows: int) -> dict[str, float]:
    """Bytes one rank holds in the sampler pass of the default (plain) path, bf16 model: logits slice
    (float32), the previous and the new state slices (bf16), one drawing row's noise."""
    vocab = math.ceil(text.vocab_size / n)
    logits = rows * CANVAS * vocab * 4
    state = 2 * rows * CANVAS * vocab * 2
    chunk = max(1, CHUNK_BYTES_DEFAULT // n // (4 * text.vocab_size))  # positions of noise drawn at a time
    cpu_noise, cuda_noise = chunk * text.vocab_size * 4, CANVAS * text.vocab_size * 4
    if n == 1:  # the single process: denoise_step draws the row's whole noise into one [C, V] buffer
        cpu_noise = cuda_noise
    return {"logits": logits, "state": state, "noise_cpu": cpu_noise, "noise_cuda": cuda_noise,
            "total_cpu": logits + state + cpu_noise, "total_cuda": logits + state + cuda_noise}


def roofline(text, weights: float, n: int, rows: int) -> dict[str, float]:
    tokens = rows * CANVAS
    compute_s = max(weights / HBM, 2 * active_params(text) * tokens / n / FLOPS)
    comm = communication(text, n, rows)
    return {"compute_ms": 1e3 * compute_s, "nvlink_ms": 1e3 * comm["total"] / NVLINK,
            "pcie_ms": 1e3 * comm["total"] / PCIE}


def _measure_rank(rank: int, world: int, port: int, vocab: int, out: str) -> None:
    """One rank of `--measure`: the sampler pass on a [1, 256, vocab / N] float32 slice, plain and fused."""
    import torch.distributed as dist

    from letterpress.parallel.sampler import plan_step, sample_slice, worker_generators
    from letterpress.parallel.vocab import vocab_range
    from letterpress.profiling import AllocationPeak
    from letterpress.sampling import GeneratorDraws

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    v0, v1 = vocab_range(vocab, rank, world)
    moved = []
    reduce = dist.all_reduce

    def counting(tensor, *a, **k):
        moved.append(tensor.numel() * tensor.element_size())
        return reduce(tensor, *a, **k)

    dist.all_reduce = counting
    result = {}
    for keep_probs in (False, True):
        draws = [GeneratorDraws(0)]
        plan, generators = plan_step(torch.tensor([0.8]), draws, [False], None, [], keep_probs, torch.float32)
        generators = generators if rank == 0 else worker_generators(plan, torch.device("cpu"))
        x = torch.randn(1, CANVAS, v1 - v0, generator=torch.Generator().manual_seed(rank)) * 4
        moved.clear()
        with AllocationPeak() as peak:
            sample_slice(x, plan, (v0, v1, vocab), None, generators)
        result[keep_probs] = {"logits": x.numel() * 4, "added": peak.peak, "all_reduced": sum(moved)}
        del x
    dist.all_reduce = reduce
    if rank == 0:
        torch.save(result, out)
    dist.destroy_process_group()


def measure_sampler(vocab: int, sizes=(1, 2, 4)) -> list[dict]:
    """Per-rank bytes of the sampler pass at the released vocabulary and canvas, one row (module docstring)."""
    import socket
    import tempfile

    import torch.multiprocessing as mp

    from letterpress.fast_sampling import fused_denoise_step
    from letterpress.profiling import AllocationPeak
    from letterpress.sampling import GeneratorDraws, denoise_step

    torch.set_num_threads(1)
    rows = []
    for keep_probs in (False, True):
        logits = torch.randn(1, CANVAS, vocab, generator=torch.Generator().manual_seed(0)) * 4
        args = (torch.tensor([0.8]), torch.tensor([0.1]), [GeneratorDraws(0)], [0], [0])
        with AllocationPeak() as peak:
            if keep_probs:
                fused_denoise_step(logits, *args, keep_processed=False)
            else:
                denoise_step(logits, *args, in_place=True)
        rows.append({"tp": 1, "fast": keep_probs, "logits": logits.numel() * 4, "added": peak.peak, "all_reduced": 0})
        del logits
    for n in sizes:
        if n == 1:
            continue
        with tempfile.TemporaryDirectory() as folder, socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            sock.close()
            out = f"{folder}/rank0.pt"
            mp.spawn(_measure_rank, args=(n, port, vocab, out), nprocs=n)
            for keep_probs, r in torch.load(out).items():
                rows.append({"tp": n, "fast": keep_probs, **r})
    for r in rows:
        r["total"] = r["logits"] + r["added"]
    return sorted(rows, key=lambda r: (r["fast"], r["tp"]))


def main() -> None:
    from letterpress.parallel import Shard, shard_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--measure", action="store_true", help="measure the sampler pass on the CPU (gloo, 1/2/4 ranks)")
    args = ap.parse_args()
    base = released_model()
    text = base.text_config
    memory, steps, sampler = [], [], []
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
                    sampler.append({"tp": n, "rows": rows, **{k: v / 1e6 for k, v in sampler_memory(text, n, rows).items()}})
    measured = measure_sampler(text.vocab_size) if args.measure else []
    if args.json:
        print(json.dumps({"memory": memory, "steps": steps, "sampler": sampler, "measured": measured}, indent=1))
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
    print("| TP | rows | all-reduce per layer | 93 all-reduces of [tokens, hidden] | vocabulary statistics "
          "| total | before: rank 0 total (logits gathered) | step roofline ms | comm ms NVLink | comm ms PCIe |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for s in steps:
        print(f"| {s['tp']} | {s['rows']} | {s['per_layer']:.2f} | {s['all_reduce']:.1f} | {s['vocab_stats']:.3f} "
              f"| {s['total']:.1f} | {s['before_rank0']:.1f} | {s['compute_ms']:.2f} | {s['nvlink_ms']:.2f} "
              f"| {s['pcie_ms']:.2f} |")
    print()
    print("Sampler pass per rank, plain path, bf16 model (MB = 1e6 bytes): logits slice (float32) + the previous "
          "and new state slices (bf16) + one drawing row's noise")
    print("| TP | rows | logits slice | state slices | noise CPU | noise CUDA | total CPU | total CUDA |")
    print("|---|---|---|---|---|---|---|---|")
    for m in sampler:
        print(f"| {m['tp']} | {m['rows']} | {m['logits']:.0f} | {m['state']:.0f} | {m['noise_cpu']:.0f} "
              f"| {m['noise_cuda']:.0f} | {m['total_cpu']:.0f} | {m['total_cuda']:.0f} |")
    if measured:
        print()
        print("Measured on the CPU (gloo), one row, float32, released vocabulary and canvas (MB = 1e6 bytes): the "
              "rank's logits + what the pass allocates at its peak (AllocationPeak); bytes all-reduced by the pass")
        print("| path | TP | logits slice | allocated at peak | per-rank total | vs TP 1 | all-reduced payload |")
        print("|---|---|---|---|---|---|---|")
        base_total = {r["fast"]: r["total"] for r in measured if r["tp"] == 1}
        for r in measured:
            print(f"| {'fused (--impl fast)' if r['fast'] else 'plain'} | {r['tp']} | {r['logits'] / 1e6:.0f} "
                  f"| {r['added'] / 1e6:.0f} | {r['total'] / 1e6:.0f} | {r['total'] / base_total[r['fast']]:.2f} "
                  f"| {r['all_reduced'] / 1e3:.1f} KB |")


if __name__ == "__main__":
    main()
