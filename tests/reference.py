"""Helpers to build tiny random DiffusionGemma checkpoints with transformers (the reference) and to replay
the reference's random draws into our engine."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

BASE_TEXT = dict(
    vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1, sliding_window=8,
    num_experts=8, top_k_experts=2, moe_intermediate_size=32,
    layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
)
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                   num_key_value_heads=2, head_dim=16)


@contextmanager
def reference_bidirectional_fix():
    """transformers 5.23 cannot run `use_bidirectional_attention="all"`: the encoder attention receives
    `is_causal` twice (its own argument and the config default merged into kwargs) and raises TypeError.
    Drop the duplicate so the reference's own masks still decide what is attended to."""
    from transformers.models.diffusion_gemma import modeling_diffusion_gemma as m

    original = m.DiffusionGemmaEncoderTextAttention.forward

    def forward(self, *args, **kwargs):
        kwargs.pop("is_causal", None)
        return original(self, *args, **kwargs)

    m.DiffusionGemmaEncoderTextAttention.forward = forward
    try:
        yield
    finally:
        m.DiffusionGemmaEncoderTextAttention.forward = original


def build_reference(folder: Path, canvas_length: int = 16, seed: int = 0, weight_std: float = 0.15,
                    embed_std: float = 1.0, **text_overrides):
    """Save a random transformers DiffusionGemma whose every weight matters: norms, scales and both sets of
    layer scalars are perturbed away from 1, and embeddings are large enough for peaked distributions."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    text = {**BASE_TEXT, **text_overrides}
    config = DiffusionGemmaConfig(text_config=text, vision_config=TINY_VISION, canvas_length=canvas_length)
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(config).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vision" in name:
                continue
            if p.ndim == 1:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.normal_(0.0, weight_std, generator=g)
        model.model.decoder.embed_tokens.weight.normal_(0.0, embed_std, generator=g)
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
    model.save_pretrained(folder)
    return model


class RecordedDraws:
    """Records the reference's global-RNG draws (initial canvas, proposals, noise) during `generate`."""

    def __init__(self):
        self.initial: list[torch.Tensor] = []  # per canvas: [B, C]
        self.proposals: list[list[torch.Tensor]] = []  # per canvas, per step: [B, C]
        self.noise: list[list[torch.Tensor]] = []

    @contextmanager
    def recording(self, batch: int, canvas: int):
        real_randint, real_multinomial = torch.randint, torch.multinomial
        after_multinomial = False

        def randint(*args, **kwargs):
            nonlocal after_multinomial
            out = real_randint(*args, **kwargs)
            if after_multinomial:  # the re-noising draw of a step
                self.noise[-1].append(out)
            else:  # a randint that does not follow a multinomial starts a new canvas
                self.initial.append(out)
                self.proposals.append([])
                self.noise.append([])
            after_multinomial = False
            return out

        def multinomial(probs, *args, **kwargs):
            nonlocal after_multinomial
            out = real_multinomial(probs, *args, **kwargs)
            self.proposals[-1].append(out.view(batch, canvas))
            after_multinomial = True
            return out

        torch.randint, torch.multinomial = randint, multinomial
        try:
            yield self
        finally:
            torch.randint, torch.multinomial = real_randint, real_multinomial

    def for_row(self, row: int) -> "ReplayDraws":
        return ReplayDraws(self, row)


class ReplayDraws:
    """Our `Draws` interface, answering with what the reference drew for one row at (canvas, step)."""

    def __init__(self, recorded: RecordedDraws, row: int):
        self.recorded, self.row = recorded, row

    def initial_canvas(self, length, vocab_size, canvas):
        return self.recorded.initial[canvas][self.row].clone()

    def proposals(self, probs, canvas, step):
        return self.recorded.proposals[canvas][step][self.row].clone()

    def noise(self, length, vocab_size, canvas, step):
        return self.recorded.noise[canvas][step][self.row].clone()
