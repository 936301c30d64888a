"""VideoLLaMA3 (https://arxiv.org/abs/2501.13106): a SigLIP-shaped vision encoder with 2D RoPE, a
bilinear merge, an MLP projector and a Qwen2.5 LLM.

Attribute names equal the official checkpoint keys (`model.vision_encoder.*`,
`model.mm_projector.readout.*`, Qwen2 names), so official weights load with no remapping. Classes
come in dependency order: patch embedding, vision RoPE, vision attention, MLP, layer, encoder,
merger, the vision encoder model, projector, the LLM wrapper, the causal LM; the packed-row LLM
attention function ends the file.

Shape letters, used by every shape comment in this file:
    N         patches of all visual items in a call (rows of `pixel_values`); C, p channels, patch size
    n         patches of one piece of N (a group of frames, an attention chunk)
    T, H, W   one item's grid row `[t, h, w]`: frames (1 for an image), patch rows, patch columns
    m         one item's merge size; the item gives T*(H/m)*(W/m) merged tokens (`num_merged_tokens`)
    M         merged tokens of all items in a call
    K         merged tokens kept by `compression_mask` (= `<image>` placeholders in the prompt)
    F, L      frames in one vision attention call, patches per frame (L = H*W)
    nh, hd    attention heads (this rank's under tensor parallelism) and head width
    D_v, D_t  vision and text widths
    B, S, V   batch size, text length, vocabulary size
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface, GenerationMixin, PreTrainedModel, Qwen2Model
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, find_packed_sequence_indices
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils.deprecation import deprecate_kwarg

from .configuration_videollama3 import Videollama3Qwen2Config, Videollama3VisionEncoderConfig

# Processor outputs that describe visual items; generation must move them together per sample.
VISION_INPUT_NAMES = ("pixel_values", "grid_sizes", "merge_sizes", "compression_mask")

# `model.set_attn_implementation(PACKED_SDPA)` (the trainer does it for packed batches): padded batches
# and generation keep sdpa's masks, packed rows attend per sample (`packed_sdpa_attention`, at the end).
PACKED_SDPA = "videollama3_packed_sdpa"


def num_merged_tokens(t: int, h: int, w: int, m: int) -> int:
    """Tokens of an item with grid (T, H, W) after merging m x m patches; each is one `<image>` unless pruned."""
    return t * (h // m) * (w // m)


def check_visual_inputs(pixel_values, grid_sizes, merge_sizes, compression_mask=None, patch_dim=None):
    """Validate the processor's visual outputs where they enter the model; return grids and merges as lists.

    Wrong dtypes raise `TypeError`, wrong shapes and disagreeing counts `ValueError`, each naming the
    input and both numbers.
    """
    for name, value in (("pixel_values", pixel_values), ("grid_sizes", grid_sizes), ("merge_sizes", merge_sizes)):
        if not torch.is_tensor(value):
            raise TypeError(f"{name} must be a tensor, got {type(value).__name__}")
    if not pixel_values.is_floating_point():
        raise TypeError(f"pixel_values must be a floating-point tensor, got {pixel_values.dtype}")
    for name, value in (("grid_sizes", grid_sizes), ("merge_sizes", merge_sizes)):
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {value.dtype}")
    if pixel_values.ndim != 2 or (patch_dim is not None and pixel_values.shape[1] != patch_dim):
        expected = f"(N, {patch_dim})" if patch_dim is not None else "(N, C*patch*patch)"
        raise ValueError(f"pixel_values must have shape {expected}, got {tuple(pixel_values.shape)}")
    if grid_sizes.ndim != 2 or grid_sizes.shape[1] != 3:
        raise ValueError(f"grid_sizes must have shape (k, 3), one [t, h, w] row per item, got {tuple(grid_sizes.shape)}")
    if merge_sizes.ndim != 1 or merge_sizes.shape[0] != grid_sizes.shape[0]:
        raise ValueError(
            f"merge_sizes must have shape (k,) with k = {grid_sizes.shape[0]} items of grid_sizes, "
            f"got {tuple(merge_sizes.shape)}"
        )
    grids = [tuple(g) for g in grid_sizes.tolist()]
    merges = merge_sizes.tolist()
    for i, ((t, h, w), m) in enumerate(zip(grids, merges)):
        if min(t, h, w, m) < 1 or h % m or w % m:
            raise ValueError(f"item {i}: grid (t={t}, h={h}, w={w}) is not a positive multiple of merge size {m}")
    patches = sum(t * h * w for t, h, w in grids)
    if pixel_values.shape[0] != patches:
        raise ValueError(f"pixel_values has {pixel_values.shape[0]} patches but grid_sizes describe {patches}")
    if compression_mask is not None:
        if not torch.is_tensor(compression_mask) or compression_mask.is_floating_point():
            kind = compression_mask.dtype if torch.is_tensor(compression_mask) else type(compression_mask).__name__
            raise TypeError(f"compression_mask must be a bool tensor, got {kind}")
        merged = sum(num_merged_tokens(t, h, w, m) for (t, h, w), m in zip(grids, merges))
        if compression_mask.ndim != 1 or compression_mask.shape[0] != merged:
            raise ValueError(
                f"compression_mask has {compression_mask.shape[0] if compression_mask.ndim else 0} entries "
                f"but the visual inputs give {merged} merged tokens"
            )
    return grids, merges


class Videollama3VisionEmbeddings(nn.Module):
    def __init__(self, config: Videollama3VisionEncoderConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # A stride-p conv over one p x p patch is a matmul with the flattened (C, p, p) kernel.
        weight = self.patch_embedding.weight
        return F.linear(pixel_values.to(weight.dtype), weight.flatten(1), self.patch_embedding.bias)  # (N, D_v)


class Videollama3VisionRotaryEmbedding(nn.Module):
    """2D RoPE: a patch at (row, col) rotates half its channels by row angles and half by col angles.

    Frequencies are recomputed from two numbers on each call instead of living in a buffer: they
    are not in the checkpoint, and a buffer would need re-initialising after meta-device loading.
    """

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.rotary_dim = head_dim // 2  # rows and cols each rotate a quarter of head_dim pairs
        self.theta = theta

    def forward(self, grids: list[tuple[int, int, int]], merge_sizes: list[int], device) -> tuple[torch.Tensor, ...]:
        inv_freq = 1.0 / (
            self.theta ** (torch.arange(0, self.rotary_dim, 2, device=device, dtype=torch.float32) / self.rotary_dim)
        )
        angles = []
        for (t, h, w), m in zip(grids, merge_sizes):
            # Patches come in merge-block order: (H/m, W/m, m, m), so one merged token is contiguous.
            rows = torch.arange(h, device=device).view(h // m, 1, m, 1).expand(h // m, w // m, m, m)
            cols = torch.arange(w, device=device).view(1, w // m, 1, m).expand(h // m, w // m, m, m)
            frame = torch.cat([rows.reshape(-1, 1) * inv_freq, cols.reshape(-1, 1) * inv_freq], dim=-1)  # (L, hd/2)
            angles.append(frame.repeat(t, 1))  # (T*L, hd/2): no temporal position, every frame alike
        angles = torch.cat(angles)[:, None, :]  # (N, 1, hd/2)
        sin = angles.sin()
        # Both halves of the head turn by the same angles; `rotate` wants sin's first half negated.
        return angles.cos().repeat(1, 1, 2), torch.cat([-sin, sin], dim=-1)  # 2 x (N, 1, hd)


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """RoPE on `(n, nh, hd)` by `(n, 1, hd)` angles, in float32: bf16 angles lose the low bits that
    distinguish neighbouring positions.

    `x * cos + rotate_half(x) * sin`, where rotate_half(x) = (-x2, x1), written as one flip of the
    halves times `signed_sin` (sin with its first half negated): no negated and concatenated copy of
    `x`. Products and sum round as in the textbook form, so results are bit-identical to it (a fused
    multiply-add would not be).
    """
    xf = x.float()
    half = xf.shape[-1] // 2
    swapped = xf.unflatten(-1, (2, half)).flip(-2).flatten(-2)  # (n, nh, hd): (x2, x1)
    return (xf * cos + swapped * signed_sin).to(x.dtype)


# Inference-only memory paths. Without autograd nothing is kept for a backward, so the vision
# encoder may work on pieces of a long video and free each as it goes: the same values (bit for bit
# in the tests), a fraction of the peak memory. `Videollama3VisionEncoderModel.forward` is the one place that
# chooses them (`low_memory = not torch.is_grad_enabled()`); training always takes whole tensors.

# Patches per group of whole frames that CPU inference takes through all encoder layers at once:
# on CPU, RAM is the scarce resource and each large fresh tensor costs page faults.
INFERENCE_GROUP_TOKENS = 4096
# Rows of one vision-MLP call: bounds the (rows, intermediate) activation, the encoder's largest tensor.
MLP_CHUNK_TOKENS = 8192


def frame_groups(grids, budget: int) -> list[tuple[int, int, list[tuple[int, int, int]]]]:
    """Consecutive whole frames in groups of at most `budget` patches (a larger frame alone):
    `(first_patch, end_patch, grids of the group's frames)`, the grids as `(frames, h, w)` runs."""
    groups, runs, start, size = [], [], 0, 0
    for t, h, w in grids:
        length = h * w
        done = 0
        while done < t:
            if runs and size + length > budget:
                groups.append((start, start + size, runs))
                runs, start, size = [], start + size, 0
            frames = min(t - done, max(1, (budget - size) // length))
            runs.append((frames, h, w))
            size += frames * length
            done += frames
    if runs:
        groups.append((start, start + size, runs))
    return groups


def write_pieces(chunks, pieces, shape) -> torch.Tensor:
    """Each piece written into one buffer of `shape` as soon as the iterable makes it, so a long
    video's forward never holds all pieces and their concatenation at once."""
    out = None
    for (start, frames, length), piece in zip(chunks, pieces):
        out = piece.new_empty(shape) if out is None else out
        out[start : start + frames * length] = piece
    return out


def mlp_in_chunks(mlp: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """`mlp(hidden_states)` over row chunks of at most MLP_CHUNK_TOKENS, written into one `(N, D_v)` buffer."""
    if hidden_states.shape[0] <= MLP_CHUNK_TOKENS:
        return mlp(hidden_states)
    out = hidden_states.new_empty(hidden_states.shape[0], mlp.fc2.out_features)  # (N, D_v)
    for start in range(0, hidden_states.shape[0], MLP_CHUNK_TOKENS):
        out[start : start + MLP_CHUNK_TOKENS] = mlp(hidden_states[start : start + MLP_CHUNK_TOKENS])
    return out


# Upper bound on one eager/sdpa vision attention call's score tensor (F*nh*L*L fp32 values, nh all the
# config's heads, so a tensor-parallel rank's calls stay under it), so memory stays flat however many frames
# a video has: longer videos take more calls, not bigger ones.
ATTENTION_CHUNK_SCORES = 1 << 26


@dataclass
class VisionAttentionPlan:
    """How the N patches of one vision forward split into independent attention sequences.

    Every image and every video frame attends only to itself (the paper's any-resolution tokenization). Consecutive frames
    of one size are batched, within an item or across items (a training batch of same-size images
    is one call per layer, not one per image): `chunks` holds `(first_patch, frames, patches_per_frame)`.
    `cu_seqlens` and `max_seqlen` describe the same frames for one varlen flash-attention call.
    `low_memory` (set without autograd) lets pieces be written out and freed as they are made.
    """

    chunks: list[tuple[int, int, int]]
    cu_seqlens: torch.Tensor
    max_seqlen: int
    low_memory: bool = False

    @classmethod
    def from_grids(cls, grids, num_heads: int, device, low_memory: bool = False) -> "VisionAttentionPlan":
        runs, lengths = [], []  # runs: [patches per frame, frames] of consecutive frames of one size
        for t, h, w in grids:
            if runs and runs[-1][0] == h * w:
                runs[-1][1] += t
            else:
                runs.append([h * w, t])
            lengths += [h * w] * t
        chunks, start = [], 0
        for length, count in runs:
            frames_per_call = max(1, ATTENTION_CHUNK_SCORES // (num_heads * length * length))
            for first in range(0, count, frames_per_call):
                frames = min(frames_per_call, count - first)
                chunks.append((start, frames, length))
                start += frames * length
        cu_seqlens = F.pad(torch.tensor(lengths, device=device, dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0))
        return cls(chunks, cu_seqlens, max(lengths), low_memory)

    def split(self, *tensors: torch.Tensor) -> list[tuple]:
        """Per chunk: `(frames, length, *pieces)`, each piece the chunk's rows of one `(N, ...)` tensor.

        One `split` per tensor, not a slice per chunk: a slice's backward writes into a zeroed tensor
        of all N rows, which made the backward O(chunks x N); split's backward is one pass.
        """
        sizes = [frames * length for _, frames, length in self.chunks]
        pieces = zip(*(x.split(sizes) for x in tensors))
        return [(frames, length, *parts) for (_, frames, length), parts in zip(self.chunks, pieces)]

    def join(self, pieces, shape) -> torch.Tensor:
        """The chunks' `pieces` (an iterable in chunk order) as one `(N, ...)` tensor of `shape`."""
        if self.low_memory:
            return write_pieces(self.chunks, pieces, shape)
        return torch.cat(list(pieces))  # one cat: writes into slices of a buffer have an O(N) backward each


def eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Plain softmax attention over `(F, nh, L, hd)`; returns `(F, L, nh, hd)` like the other backends."""
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling  # (F, nh, L, L)
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights  # (F, L, nh, hd)


class Videollama3VisionAttention(nn.Module):
    """Multi-head self-attention with 2D RoPE, each frame its own sequence, through transformers'
    attention-function registry (`config._attn_implementation`, read per call as transformers' own layers do)."""

    def __init__(self, config: Videollama3VisionEncoderConfig):
        super().__init__()
        self.config = config  # the attention interface reads the implementation from it
        self.head_dim = config.hidden_size // config.num_attention_heads
        if self.head_dim * config.num_attention_heads != config.hidden_size:
            raise ValueError(
                f"hidden_size {config.hidden_size} is not divisible by num_attention_heads {config.num_attention_heads}"
            )
        self.scaling = self.head_dim**-0.5
        self.dropout = config.attention_dropout
        self.is_causal = False
        self.num_key_value_groups = 1
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states, rope: tuple[torch.Tensor, torch.Tensor], plan: VisionAttentionPlan):
        N = hidden_states.shape[0]
        # -1 heads: under tensor parallelism q/k/v hold this rank's heads only.
        q = self.q_proj(hidden_states).view(N, -1, self.head_dim)  # (N, nh, hd)
        k = self.k_proj(hidden_states).view(N, -1, self.head_dim)  # (N, nh, hd)
        v = self.v_proj(hidden_states).view(N, -1, self.head_dim)  # (N, nh, hd)

        implementation = self.config._attn_implementation
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention)
        dropout = self.dropout if self.training else 0.0
        if implementation.startswith("flash_attention"):
            # One varlen call over all frames; RoPE chunk by chunk keeps its float32 temporaries small.
            chunks = plan.split(q, k, *rope)  # per chunk: (frames, length, q, k, cos, signed_sin)
            q_rot = plan.join((rotate(q_c, cos, sin) for _, _, q_c, _, cos, sin in chunks), q.shape)  # (N, nh, hd)
            k_rot = plan.join((rotate(k_c, cos, sin) for _, _, _, k_c, cos, sin in chunks), k.shape)  # (N, nh, hd)
            out, _ = attention(
                self,
                q_rot.transpose(0, 1)[None],  # (1, nh, N, hd)
                k_rot.transpose(0, 1)[None],
                v.transpose(0, 1)[None],
                attention_mask=None,
                scaling=self.scaling,
                dropout=dropout,
                is_causal=False,
                cu_seq_lens_q=plan.cu_seqlens,
                cu_seq_lens_k=plan.cu_seqlens,
                max_length_q=plan.max_seqlen,
                max_length_k=plan.max_seqlen,
            )  # (1, N, nh, hd)
            return self.out_proj(out.reshape(N, -1))  # (N, D_v)

        def chunk_attention(frames, length, q_c, k_c, v_c, cos, signed_sin):
            q_c, k_c = rotate(q_c, cos, signed_sin), rotate(k_c, cos, signed_sin)
            q_c, k_c, v_c = (x.view(frames, length, -1, self.head_dim).transpose(1, 2)
                             for x in (q_c, k_c, v_c))  # (F, nh, L, hd)
            out_c, _ = attention(self, q_c, k_c, v_c, None, scaling=self.scaling, dropout=dropout, is_causal=False)
            return out_c.reshape(frames * length, -1)  # (F*L, nh*hd)

        chunks = plan.split(q, k, v, *rope)  # per chunk: (frames, length, q, k, v, cos, signed_sin)
        out = plan.join((chunk_attention(*c) for c in chunks), (N, q.shape[1] * self.head_dim))  # (N, nh*hd)
        return self.out_proj(out)  # (N, D_v)


class Videollama3VisionMLP(nn.Module):
    def __init__(self, config: Videollama3VisionEncoderConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(hidden_states)))  # (N, D_v)


class Videollama3VisionEncoderLayer(GradientCheckpointingLayer):
    """Pre-LN transformer block of the SigLIP encoder."""

    def __init__(self, config: Videollama3VisionEncoderConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = Videollama3VisionAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = Videollama3VisionMLP(config)

    def forward(self, hidden_states, rope, plan: VisionAttentionPlan):
        hidden_states = hidden_states + self.self_attn(self.layer_norm1(hidden_states), rope, plan)
        normed = self.layer_norm2(hidden_states)
        return hidden_states + (mlp_in_chunks(self.mlp, normed) if plan.low_memory else self.mlp(normed))


class Videollama3VisionEncoder(nn.Module):
    def __init__(self, config: Videollama3VisionEncoderConfig):
        super().__init__()
        self.layers = nn.ModuleList(Videollama3VisionEncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, hidden_states, rope, plan):
        for layer in self.layers:
            hidden_states = layer(hidden_states, rope, plan)
        return hidden_states


class Videollama3VisionMerger(nn.Module):
    """Each item's patches bilinearly downsampled by its merge size m (align_corners False), as the
    official encoder does after its last layer norm; no weights."""

    def forward(self, hidden_states: torch.Tensor, grids, merge_sizes) -> torch.Tensor:
        items = hidden_states.split([t * h * w for t, h, w in grids])  # per item (T*H*W, D_v)
        return torch.cat([self.downsample(x, grid, m) for x, grid, m in zip(items, grids, merge_sizes)])  # (M, D_v)

    @staticmethod
    def downsample(x: torch.Tensor, grid: tuple[int, int, int], m: int) -> torch.Tensor:
        """One item's `(T*H*W, D_v)` patches in merge-block order, resized by `1/m` per side."""
        if m == 1:
            return x  # (T*H*W, D_v): merge-block order with m=1 is already row-major
        if m == 2:
            # A factor-2 bilinear resize (align_corners=False) samples midway between each pixel pair:
            # exactly the mean of each 2x2 block, and those 4 patches are contiguous in merge-block order.
            return x.view(-1, 4, x.shape[-1]).mean(1)  # (T*H/2*W/2, D_v)
        t, h, w = grid
        D = x.shape[-1]
        spatial = x.view(t, h // m, w // m, m, m, D).permute(0, 5, 1, 3, 2, 4).reshape(t, D, h, w)  # (T, D_v, H, W)
        merged = F.interpolate(spatial, size=(h // m, w // m), mode="bilinear", align_corners=False)  # (T, D_v, H/m, W/m)
        return merged.permute(0, 2, 3, 1).reshape(-1, D)  # (T*H/m*W/m, D_v)


class Videollama3VisionEncoderModel(PreTrainedModel):
    """Encodes flat patches of any number of images/frames, each at its own size, into merged tokens."""

    config_class = Videollama3VisionEncoderConfig
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Videollama3VisionEncoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def __init__(self, config: Videollama3VisionEncoderConfig):
        super().__init__(config)
        self.num_heads = config.num_attention_heads
        self.patch_dim = config.num_channels * config.patch_size**2
        self.rotary = Videollama3VisionRotaryEmbedding(config.hidden_size // config.num_attention_heads, config.rope_theta)
        self.embeddings = Videollama3VisionEmbeddings(config)
        self.encoder = Videollama3VisionEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.merger = Videollama3VisionMerger()
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, grid_sizes: torch.Tensor, merge_sizes: torch.Tensor,
                compression_mask: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            pixel_values: `(N, C*p*p)` patches, items in order, frames in order, patches of each frame
                in merge-block order.
            grid_sizes: `(k, 3)` rows `[t, h, w]` in patches before merging, one per item.
            merge_sizes: `(k,)` spatial downsampling factor `m` of each item.
            compression_mask: `(M,)` the merged tokens a caller keeps; only checked here, with the
                other inputs, so that one check covers a call from the LLM.

        Returns:
            `(M, D_v)` merged tokens: each item bilinearly downsampled by its `m`, row-major per frame.
        """
        grids, merges = check_visual_inputs(pixel_values, grid_sizes, merge_sizes, compression_mask, self.patch_dim)
        device = pixel_values.device
        cos, signed_sin = self.rotary(grids, merges, device)  # 2 x (N, 1, hd)
        hidden_states = self.embeddings(pixel_values)  # (N, D_v)
        low_memory = not torch.is_grad_enabled()  # the one switch to the inference-only memory paths
        if low_memory and device.type == "cpu":
            # No frame attends to another, so CPU inference takes groups of whole frames through all
            # layers, in place: every intermediate has at most INFERENCE_GROUP_TOKENS rows instead of N.
            for start, end, group in frame_groups(grids, INFERENCE_GROUP_TOKENS):
                plan = VisionAttentionPlan.from_grids(group, self.num_heads, device, low_memory=True)
                rope = (cos[start:end], signed_sin[start:end])
                group_states = self.encoder(hidden_states[start:end], rope, plan)  # (n, D_v)
                hidden_states[start:end] = self.post_layernorm(group_states)  # (n, D_v)
        else:
            plan = VisionAttentionPlan.from_grids(grids, self.num_heads, device, low_memory=low_memory)
            hidden_states = self.post_layernorm(self.encoder(hidden_states, (cos, signed_sin), plan))  # (N, D_v)
        return self.merger(hidden_states, grids, merges)  # (M, D_v)


class Videollama3Projector(nn.Module):
    """`mlp2x_gelu`: Linear, GELU (erf), Linear from the vision width into the LLM width."""

    def __init__(self, vision_hidden_size: int, text_hidden_size: int):
        super().__init__()
        self.readout = nn.Sequential(
            nn.Linear(vision_hidden_size, text_hidden_size), nn.GELU(), nn.Linear(text_hidden_size, text_hidden_size)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.readout(features)  # (M, D_t)


class Videollama3PreTrainedModel(PreTrainedModel):
    config_class = Videollama3Qwen2Config
    base_model_prefix = "model"
    input_modalities = ("image", "video", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["Videollama3VisionEncoderLayer", "Qwen2DecoderLayer"]
    _skip_keys_device_placement = "past_key_values"
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True


def packed_boundaries(position_ids: torch.Tensor) -> dict:
    """Flash-attention's varlen kwargs for one row of `position_ids` `(1, S)`; empty unless it is packed.

    The samples are those of transformers' own packed mask (`find_packed_sequence_indices`: a new
    sample wherever the positions do not go up by one), so per-sample attention matches it exactly.
    """
    samples = find_packed_sequence_indices(position_ids)  # (1, S) sample index of each token, None for one sample
    if samples is None:
        return {}
    lengths = torch.bincount(samples[0])  # (samples,)
    cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)  # (samples + 1,)
    longest = int(lengths.max())
    return {"cu_seq_lens_q": cu_seqlens, "cu_seq_lens_k": cu_seqlens, "max_length_q": longest, "max_length_k": longest}


class Videollama3Qwen2Model(Qwen2Model):
    """Qwen2 decoder whose `<image>` placeholder embeddings are replaced by projected vision tokens.

    Its tensor-parallel and FSDP2 plans are Qwen2's (the config's `base_model_*_plan`) plus the vision
    encoder's (its own config's), which transformers collects from the child model; tensor
    parallelism leaves the projector whole.
    """

    config_class = Videollama3Qwen2Config
    _no_split_modules = ["Videollama3VisionEncoderLayer", "Qwen2DecoderLayer"]
    _supports_flash_attn = True

    def __init__(self, config: Videollama3Qwen2Config):
        super().__init__(config)
        self.vision_encoder = Videollama3VisionEncoderModel(config.vision_encoder_config)
        self.mm_projector = Videollama3Projector(config.vision_encoder_config.hidden_size, config.hidden_size)
        self.image_token_index = config.image_token_index
        self.post_init()

    def get_visual_features(self, pixel_values, grid_sizes, merge_sizes, compression_mask=None) -> torch.Tensor:
        """Project all items' merged tokens and keep those the processor kept: `(K, D_t)`."""
        merged = self.vision_encoder(pixel_values, grid_sizes, merge_sizes, compression_mask)  # (M, D_v)
        features = self.mm_projector(merged)  # (M, D_t)
        if compression_mask is not None:
            features = features[compression_mask.bool()]  # (K, D_t)
        return features

    def embed_multimodal(self, input_ids, pixel_values, grid_sizes, merge_sizes, compression_mask, is_prefill):
        inputs_embeds = self.embed_tokens(input_ids)  # (B, S, D_t)
        placeholders = input_ids == self.image_token_index  # (B, S)
        if pixel_values is not None:
            features = self.get_visual_features(pixel_values, grid_sizes, merge_sizes, compression_mask)  # (K, D_t)
            num_tokens = int(placeholders.sum())
            if num_tokens != features.shape[0]:
                # TRL recognises this wording and adds a hint about truncation by max_length.
                raise ValueError(
                    f"Image features and image tokens do not match: tokens: {num_tokens}, features {features.shape[0]}"
                )
            return inputs_embeds.masked_scatter(placeholders[..., None], features.to(inputs_embeds.dtype))
        if is_prefill and bool(placeholders.any()):
            raise ValueError(
                f"Image features and image tokens do not match: tokens: {int(placeholders.sum())}, features 0 "
                "(the prompt has <image> placeholders but no pixel_values were given)"
            )
        if self.training and torch.is_grad_enabled():
            # Sharded data-parallel training (ZeRO-3, FSDP) hangs if one rank skips the vision tower
            # while others run it; a one-patch dummy pass, multiplied by zero, keeps ranks in step.
            weight = self.vision_encoder.embeddings.patch_embedding.weight
            dummy = weight.new_zeros(1, self.vision_encoder.patch_dim)  # (1, C*p*p)
            grid = torch.ones(1, 3, dtype=torch.long, device=dummy.device)
            merge = torch.ones(1, dtype=torch.long, device=dummy.device)
            inputs_embeds = inputs_embeds + 0.0 * self.get_visual_features(dummy, grid, merge).sum()
        return inputs_embeds

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        pixel_values: torch.Tensor | None = None,
        grid_sizes: torch.LongTensor | None = None,
        merge_sizes: torch.LongTensor | None = None,
        compression_mask: torch.BoolTensor | None = None,
        **kwargs,
    ):
        """Returns the LLM's `last_hidden_state`, aligned with `input_ids` (nothing is dropped here)."""
        past_length = cache.get_seq_length() if cache is not None else 0
        if use_cache is None and (self.training or (attention_mask is None and position_ids is not None)):
            # A cache is never read in training; and position_ids without an attention mask mean a
            # padding-free (packed) row, whose sample boundaries transformers ignores once a cache
            # exists: packed samples would attend to each other.
            use_cache = False
        if inputs_embeds is None:
            inputs_embeds = self.embed_multimodal(
                input_ids, pixel_values, grid_sizes, merge_sizes, compression_mask, is_prefill=past_length == 0
            )  # (B, S, D_t)
        elif pixel_values is not None:
            raise ValueError("pass either inputs_embeds or input_ids with pixel_values, not both")
        if position_ids is None and attention_mask is not None and attention_mask.ndim == 2:
            # Left padding must not shift positions: a padded row then equals the same row alone.
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -inputs_embeds.shape[1]:]  # (B, S)
        one_unmasked_row = (attention_mask is None and past_length == 0 and position_ids is not None
                            and position_ids.ndim == 2 and position_ids.shape[0] == 1)
        if one_unmasked_row and "cu_seq_lens_q" not in kwargs:
            # A packed row's sample boundaries, as flash-attention's varlen kwargs; PACKED_SDPA reads them too.
            boundaries = packed_boundaries(position_ids)
            if boundaries and self.config._attn_implementation == PACKED_SDPA:
                # PACKED_SDPA slices by these as Python ints in every layer: a host copy, made once
                # here, keeps each layer from waiting on the device.
                boundaries = {k: v.cpu() if torch.is_tensor(v) else v for k, v in boundaries.items()}
            kwargs.update(boundaries)
        return super().forward(
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )


def repeat_items_per_sample(vision: dict, placeholders_per_sample: list[int], expand_size: int) -> dict:
    """Repeat each sample's visual items `expand_size` times, keeping samples in order."""
    grids = vision["grid_sizes"].tolist()
    merges = vision["merge_sizes"].tolist()
    patches = [t * h * w for t, h, w in grids]
    merged = [num_merged_tokens(t, h, w, m) for (t, h, w), m in zip(grids, merges)]
    mask = vision["compression_mask"]
    kept = mask.split(merged) if mask is not None else None
    kept_counts = [int(k.sum()) for k in kept] if kept is not None else merged

    items_of_sample, item = [], 0
    for sample, wanted in enumerate(placeholders_per_sample):
        first, count = item, 0
        while count < wanted and item < len(grids):
            count += kept_counts[item]
            item += 1
        if count != wanted:
            raise ValueError(
                f"Image features and image tokens do not match: sample {sample} has {wanted} <image> tokens but its "
                f"visual items give {count} features"
            )
        items_of_sample.append(range(first, item))
    if item != len(grids):
        raise ValueError(
            f"Image features and image tokens do not match: {len(grids) - item} visual items have no <image> tokens"
        )
    order = [i for items in items_of_sample for _ in range(expand_size) for i in items]

    pixel_chunks = vision["pixel_values"].split(patches)
    return {
        "pixel_values": torch.cat([pixel_chunks[i] for i in order]),
        "grid_sizes": vision["grid_sizes"][order],
        "merge_sizes": vision["merge_sizes"][order],
        "compression_mask": torch.cat([kept[i] for i in order]) if kept is not None else None,
    }


class Videollama3Qwen2ForCausalLM(Videollama3PreTrainedModel, GenerationMixin):
    # Makes `save_pretrained` copy this file and its relative imports next to the weights, also
    # for a model built in code rather than loaded through an Auto class.
    _auto_class = "AutoModelForCausalLM"
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}  # as Qwen2ForCausalLM: each rank a vocabulary slice, gathered
    _fsdp_plan = {"lm_head": "keep_full_weight"}  # as Qwen2ForCausalLM: the last forward, the first the backward needs

    def __init__(self, config: Videollama3Qwen2Config):
        super().__init__(config)
        self.model = Videollama3Qwen2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def adjust_generation_fn(self, *args, **kwargs):
        super().adjust_generation_fn(*args, **kwargs)
        # Official config.json files say `use_cache: false`, a leftover of their training runs that
        # the generation config inherits when no generation_config.json says otherwise; decoding
        # would then re-run the whole sequence per token. A call may still pass use_cache=False.
        if self.generation_config.use_cache is False:
            self.generation_config.use_cache = True

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        pixel_values: torch.Tensor | None = None,
        grid_sizes: torch.LongTensor | None = None,
        merge_sizes: torch.LongTensor | None = None,
        compression_mask: torch.BoolTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        r"""
        Args:
            pixel_values: `(N, 3*14*14)` flat patches of every image and video frame in the batch.
            grid_sizes: `(k, 3)` rows `[t, h, w]` per visual item, in patches before merging.
            merge_sizes: `(k,)` per-item merge size (1 for images, 2 for videos by default).
            compression_mask: `(M,)` bool over all merged tokens, True where the processor kept the
                token (Differential Frame Pruner); the prompt holds one `<image>` per kept token.
            labels: `(B, S)` with -100 on positions that carry no loss.
        """
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            pixel_values=pixel_values,
            grid_sizes=grid_sizes,
            merge_sizes=merge_sizes,
            compression_mask=compression_mask,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden_states = hidden_states[:, -logits_to_keep:] if logits_to_keep else hidden_states
        else:
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states)  # (B, S, V)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        """Beam search and `num_return_sequences` copy each prompt; its visual items must follow it.

        The default expansion repeats every tensor along dim 0, which for flat `pixel_values` would
        interleave patches of different samples. Here each sample's items are copied as a block.
        """
        if expand_size == 1 or model_kwargs.get("pixel_values") is None:
            return super()._expand_inputs_for_generation(expand_size, is_encoder_decoder, input_ids, **model_kwargs)
        vision = {name: model_kwargs.pop(name, None) for name in VISION_INPUT_NAMES}
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size, is_encoder_decoder, input_ids, **model_kwargs
        )
        placeholders_per_sample = (input_ids[::expand_size] == self.config.image_token_index).sum(-1).tolist()
        model_kwargs.update(repeat_items_per_sample(vision, placeholders_per_sample, expand_size))
        return input_ids, model_kwargs


def packed_sdpa_attention(module, query, key, value, attention_mask, cu_seq_lens_q=None, **kwargs):
    """sdpa that attends within each sample of a packed row, one causal call per sample.

    transformers' sdpa path gives a packed row (one row, `position_ids` restarting per sample) a
    block-diagonal `(S, S)` mask, so every call computes all S x S scores and cannot use the causal
    kernel. The samples' boundaries (`cu_seq_lens_q`, passed by `Videollama3Qwen2Model` for packed
    rows, as flash-attention reads them) make it sum(S_i^2) / 2 instead. Anything else (padded
    batches, generation with a cache) is plain sdpa with its mask.
    """
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    if cu_seq_lens_q is None:
        return sdpa(module, query, key, value, attention_mask, **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"cu_seq_lens_q describes the samples of one packed row, but the batch has {query.shape[0]} rows")
    kwargs.pop("is_causal", None)
    # split, not one slice per sample: each slice's backward writes its gradient into a zeroed
    # tensor of the whole row, which makes the backward O(samples x S); split's is one cat.
    sizes = cu_seq_lens_q.diff().tolist()
    outputs = [
        sdpa(module, q, k, v, None, is_causal=True, **kwargs)[0]
        for q, k, v in zip(query.split(sizes, dim=2), key.split(sizes, dim=2), value.split(sizes, dim=2))
    ]  # each (1, S_i, nh, hd)
    return torch.cat(outputs, dim=1), None  # (1, S, nh, hd)


AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
AttentionMaskInterface.register(PACKED_SDPA, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


__all__ = [
    "Videollama3VisionEncoderModel",
    "Videollama3Qwen2Model",
    "Videollama3Qwen2ForCausalLM",
    "Videollama3PreTrainedModel",
]
