"""Engine and sampling options as command-line arguments, shared by every command that loads a model
(`letterpress generate / chat / infill / edit / serve`), as vLLM's `engine/arg_utils.py` is.

It sits below both the CLI and the server, so neither imports the other. Importing it is cheap (argparse only):
torch and the engine load inside the functions that build an `LLM`.
"""

from __future__ import annotations

import argparse


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="float32",
                   help="float32 (default), bfloat16, float16, or auto (the checkpoint's own dtype, from config.json)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, mps, xpu, ...")
    p.add_argument("--offline", action="store_true", help="never touch the network (Hub cache only)")
    p.add_argument("--max-model-len", type=int, default=None, help="context budget per request (tokens)")
    add_engine_arguments(p)


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speed (README, 'Performance' and 'Quantization')")
    g.add_argument("--quantization", choices=["int8", "int4", "fp8"], default=None,
                   help="weight-only quantization of the linear layers and experts, applied while loading "
                        "(default: none; a compressed-tensors checkpoint loads quantized without it)")
    g.add_argument("--impl", choices=["plain", "fast"], default="plain",
                   help="plain: the reference path (default); fast: grouped MoE, sliced attention, fused sampler")
    g.add_argument("--compile", action="store_true", help="torch.compile the layers (slow first steps)")
    g.add_argument("--compile-mode", default=None, metavar="MODE",
                   help="torch.compile mode with --compile, e.g. reduce-overhead (CUDA graphs)")
    g.add_argument("--profile", metavar="DIR", default=None,
                   help="write a torch profiler trace (chrome trace JSON) of the first --profile-steps steps to DIR")
    g.add_argument("--profile-steps", type=int, default=8, metavar="N", help="steps to profile (default 8)")
    t = p.add_argument_group("multiple GPUs (README, 'Multiple GPUs')")
    t.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, metavar="N",
                   help="split the model and the KV cache over N processes (one GPU each with --device cuda; gloo "
                        "on CPU); rank 0 runs the engine, the others are started by this command (default 1)")
    t.add_argument("--enable-expert-parallel", action="store_true",
                   help="split the experts by id over the tensor-parallel ranks instead of by width")
    c = p.add_argument_group("KV cache (README, 'KV cache and prefix caching')")
    c.add_argument("--kv-cache-memory", default=None, metavar="BYTES",
                   help="size of the paged KV cache, e.g. 4GiB (default: room for --max-num-seqs rows of --max-model-len)")
    c.add_argument("--gpu-memory-utilization", type=float, default=None, metavar="FRACTION",
                   help="CUDA only: size the KV cache so letterpress uses this fraction of the device's memory")
    c.add_argument("--block-size", type=int, default=16, help="positions per KV cache block (default 16)")
    c.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="share the KV blocks of equal prompt prefixes between requests (default: on)")
    s = p.add_argument_group("structured output (README, 'Structured output')")
    s.add_argument("--max-constraint-edges", type=int, default=None, metavar="N",
                   help="the largest automaton (transitions over the vocabulary) one request's response_format, "
                        "structured_outputs or tool_choice may compile; larger ones get a 400 (default 32000000: "
                        "json_object at a 262,144-token vocabulary is ~8 M; 12 bytes per edge)")
    m = p.add_argument_group("images and video (README, 'Images and video')")
    m.add_argument("--limit-mm-per-prompt", type=json_object, default=None, metavar="JSON",
                   help='the most media items of each kind one prompt may hold, e.g. \'{"image":2,"video":1}\' '
                        "(default: no limit beyond max_model_len)")
    m.add_argument("--mm-processor-kwargs", type=json_object, default=None, metavar="JSON",
                   help='the default image resolution tier, e.g. \'{"max_soft_tokens":560}\' '
                        "(70, 140, 280, 560 or 1120; default: the checkpoint's)")


def json_object(text: str) -> dict:
    """A JSON object flag value (vLLM's syntax for --limit-mm-per-prompt / --mm-processor-kwargs)."""
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"image\": 2}}', got {text!r}")
    return value


def engine_options(args: argparse.Namespace) -> dict:
    """`LLM` keyword arguments from `add_engine_arguments`."""
    compile_ = (getattr(args, "compile_mode", None) or True) if getattr(args, "compile", False) else False
    return dict(quantization=getattr(args, "quantization", None), impl=getattr(args, "impl", "plain"),
                compile=compile_, kv_cache_memory=getattr(args, "kv_cache_memory", None),
                gpu_memory_utilization=getattr(args, "gpu_memory_utilization", None),
                block_size=getattr(args, "block_size", 16),
                enable_prefix_caching=getattr(args, "enable_prefix_caching", True),
                tensor_parallel_size=getattr(args, "tensor_parallel_size", 1),
                enable_expert_parallel=getattr(args, "enable_expert_parallel", False),
                limit_mm_per_prompt=getattr(args, "limit_mm_per_prompt", None),
                mm_processor_kwargs=getattr(args, "mm_processor_kwargs", None),
                max_constraint_edges=getattr(args, "max_constraint_edges", None))


def attach_profiler(llm, args: argparse.Namespace) -> None:
    if getattr(args, "profile", None):
        from ..profiling import StepProfiler

        StepProfiler(args.profile, args.profile_steps).attach(llm.runner)


def llm_from_args(model, args: argparse.Namespace, **kwargs):
    """An `LLM` built from `add_model_arguments`' flags (plus `kwargs`, e.g. max_num_seqs), profiler attached."""
    from .llm import LLM

    llm = LLM(model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
              offline=True if args.offline else None, **kwargs, **engine_options(args))
    attach_profiler(llm, args)
    return llm


def add_sampling_arguments(p: argparse.ArgumentParser, max_new_tokens: bool = True) -> None:
    g = p.add_argument_group("sampling (defaults come from the checkpoint's generation_config.json)")
    if max_new_tokens:
        g.add_argument("--max-new-tokens", type=int, default=None)
    g.add_argument("--max-denoising-steps", type=int, default=None)
    g.add_argument("--entropy-bound", type=float, default=None)
    g.add_argument("--t-min", type=float, default=None)
    g.add_argument("--t-max", type=float, default=None)
    g.add_argument("--seed", type=int, default=None, help="fixes the output (per-request generator)")


SAMPLING_FLAGS = ("max_new_tokens", "max_denoising_steps", "entropy_bound", "t_min", "t_max", "seed")


# torch.compile's modes (torch._inductor.list_mode_options), named here so the check needs no torch
COMPILE_MODES = ("default", "lite", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check_model_arguments(model: str | None, args: argparse.Namespace) -> None:
    """What can be checked of `add_model_arguments`' flags and of MODEL (None: the embedded default) without
    torch: a command runs this before loading either, so a typo is refused at once (exit 2, one line)."""
    from ..errors import ConfigError
    from ..model_ref import check_dtype_name, is_local_folder

    check_dtype_name(args.dtype)
    if model is not None:
        is_local_folder(model)
    if getattr(args, "profile_steps", 1) < 1:
        raise ConfigError(f"--profile-steps must be a positive integer, got {args.profile_steps}")
    if getattr(args, "block_size", 1) < 1:
        raise ConfigError(f"--block-size must be a positive integer, got {args.block_size}")
    mode = getattr(args, "compile_mode", None)
    if mode is not None and mode not in COMPILE_MODES:
        raise ConfigError(f"--compile-mode {mode!r}: torch.compile takes one of {', '.join(COMPILE_MODES)}")


def check_sampling_arguments(args: argparse.Namespace) -> None:
    """`add_sampling_arguments`' flags that are given, against the limits `SamplingParams` enforces (the
    checkpoint's defaults fill the others later), without torch."""
    from .limits import check_sampling_values

    check_sampling_values({name: getattr(args, name, None) for name in SAMPLING_FLAGS})


def sampling_params(args: argparse.Namespace):
    """`SamplingParams` from `add_sampling_arguments`' flags."""
    from .request import SamplingParams

    return SamplingParams(max_new_tokens=getattr(args, "max_new_tokens", None),
                          max_denoising_steps=args.max_denoising_steps, entropy_bound=args.entropy_bound,
                          t_min=args.t_min, t_max=args.t_max, seed=args.seed)


def check_device(name: str) -> None:
    """Refuse a device this torch cannot use, before any weight loads (one line instead of a traceback from
    deep inside the loader). cuda, mps and xpu are checked for a build and a visible device; a device index
    must exist."""
    import torch

    from ..errors import NotSupportedError

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise NotSupportedError(f"unknown device {name!r}: use cpu, cuda, cuda:N, mps or xpu") from None
    backends = {
        "cuda": (torch.backends.cuda.is_built(), torch.cuda.is_available, torch.cuda.device_count),
        "mps": (torch.backends.mps.is_built(), torch.backends.mps.is_available, lambda: 1),
        "xpu": (hasattr(torch, "xpu"), lambda: hasattr(torch, "xpu") and torch.xpu.is_available(),
                lambda: torch.xpu.device_count()),
    }
    if device.type not in backends:
        return
    built, available, count = backends[device.type]
    if not built:
        raise NotSupportedError(f"--device {name}: this torch ({torch.__version__}) was built without "
                                f"{device.type.upper()}; use --device cpu, or install a torch built with {device.type.upper()}")
    if not available():
        raise NotSupportedError(f"--device {name}: no {device.type.upper()} device is available to this torch "
                                f"({torch.__version__}); use --device cpu")
    if device.index is not None and device.index >= count():
        raise NotSupportedError(f"--device {name}: there are only {count()} {device.type} device(s)")
