"""Mask pooling of the DeRIS loopback ("f_s" in the paper).

    pooled[b, n, c] = mean over the (H/4 x W/4) grid of
                      sigmoid(bilinear(mask_logits, (H/4, W/4)))[b, n] * AvgPool4(features)[b, c]

The official code builds the [B, N, C, H/4, W/4] product and averages it with a 5-D
AdaptiveAvgPool2d; the mean of a product over the grid is a matrix product, so the reference
below never materialises that tensor. :func:`mask_pool_triton` does the same in one Triton
kernel that also never builds the downsampled maps, with a Triton backward pass, behind the custom
operators ``torch.ops.deris_kernels.mask_pool_forward`` / ``mask_pool_backward`` (see ms_deform_attn.py).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ._triton_support import (
    INTERPRETING,
    check_float,
    check_same_device,
    check_shape,
    gradient_like,
    jit,
    launch,
    multiprocessors,
    reference_vjp,
    require_triton,
    skipped_gradient,
    tl,
    traced_on_cpu,
    triton,
    triton_op,
)


def mask_pool_reference(mask_logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """mask_logits [B, N, H, W], features [B, C, H, W] -> [B, N, C]; H and W divisible by 4."""
    height, width = mask_logits.shape[-2:]
    if height % 4 or width % 4:
        raise ValueError(f"mask_pool needs H and W divisible by 4, got {tuple(mask_logits.shape[-2:])}")
    size = (height // 4, width // 4)
    masks = F.interpolate(mask_logits, size=size, mode="bilinear", align_corners=False).sigmoid()
    pooled_features = F.avg_pool2d(features, kernel_size=4, stride=4)
    return torch.bmm(masks.flatten(2), pooled_features.flatten(2).transpose(1, 2)) / (size[0] * size[1])


# ---------------------------------------------------------------------------------------------
# Triton kernels
#
# With h = H/4, w = W/4 and K = h*w grid cells, the op is a matrix product per batch:
#     pooled[n, c] = sum_k probs[n, k] * cells[c, k] / K
# probs = sigmoid of the bilinear downsample: for an exact factor 4 with align_corners=False,
#         cell (i, j) samples the logits at (4i + 1.5, 4j + 1.5), the mean of its 2x2 centre pixels;
# cells = AvgPool4 of the features: the mean of the cell's 4x4 pixels.
# The kernels build (block, BLOCK_K) tiles of both straight from the full-resolution inputs and
# multiply them with tl.dot, so the [B, N, C, h, w] product and the downsampled maps never exist.
# tl.dot runs in "ieee" fp32: TF32 would cost ~1e-3 relative error on a memory-bound op.
# A cell's 4x4 feature pixels are read (and their gradient written) as 4 rows of 4 contiguous
# pixels, one vector access each. Launches use num_stages=1: software pipelining would stage the
# gathered feature rows in shared memory (ptxas, sm_90, fp32: 300 KB at 32 x 64 x 32 blocks, over
# the 227 KB limit), and gathers gain little from it.
# ---------------------------------------------------------------------------------------------


@jit
def _cell_probs(logits_ptr, top_left, width, mask):
    """sigmoid(mean of the 2x2 centre pixels) of the cells whose top-left pixels are at ``top_left``."""
    centre = top_left + width + 1
    total = tl.load(logits_ptr + centre, mask=mask, other=0.0).to(tl.float32)
    total += tl.load(logits_ptr + centre + 1, mask=mask, other=0.0).to(tl.float32)
    total += tl.load(logits_ptr + centre + width, mask=mask, other=0.0).to(tl.float32)
    total += tl.load(logits_ptr + centre + width + 1, mask=mask, other=0.0).to(tl.float32)
    return tl.sigmoid(total * 0.25)


@jit
def _cell_means(features_ptr, top_left, width, mask):
    """Mean of the 4x4 pixels of the cells whose top-left pixels are at ``top_left`` (0 where masked).

    Each of a cell's 4 rows is read as one vector of 4 contiguous pixels (8 bytes in half
    precision, 16 in fp32) and summed in registers.
    """
    row_mask = mask[:, :, None]
    total = tl.zeros(top_left.shape, dtype=tl.float32)
    for row in tl.static_range(4):
        pixels = tl.load(features_ptr + _cell_row(top_left, row, width), mask=row_mask, other=0.0)
        total += tl.sum(pixels.to(tl.float32), axis=2)
    return total * (1.0 / 16.0)


@jit
def _cell_row(top_left, row, width):
    """Offsets of the 4 contiguous pixels of row ``row`` of the cells at ``top_left``: a trailing axis of 4."""
    return (top_left + row * width)[:, :, None] + tl.arange(0, 4)[None, None, :]


@jit
def _cell_top_left(k, cells_w, width):
    """Offset in a full-resolution plane of the top-left pixel of cell k (row-major over the grid)."""
    return (k // cells_w) * 4 * width + (k % cells_w) * 4


@jit
def _mask_pool_forward_kernel(
    logits_ptr, features_ptr, partial_ptr,
    num_masks, channels, height, width, cells_w, num_cells, cells_per_split,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Program (n block x c block, split, batch) sums the cells of its split into
    # partial[split, batch]: [splits, B, N, C] fp32, added up by the launcher.
    c_blocks = tl.cdiv(channels, BLOCK_C)
    split = tl.program_id(1)
    batch = tl.program_id(2)
    n = (tl.program_id(0) // c_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    c = (tl.program_id(0) % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    n_mask = n < num_masks
    c_mask = c < channels
    plane = height * width
    logit_planes = (batch * num_masks + n).to(tl.int64) * plane
    feature_planes = (batch * channels + c).to(tl.int64) * plane
    first_cell = split * cells_per_split
    end_cell = tl.minimum(first_cell + cells_per_split, num_cells)

    acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    for k_start in range(first_cell, end_cell, BLOCK_K):
        k = k_start + tl.arange(0, BLOCK_K)
        k_mask = k < end_cell
        top_left = _cell_top_left(k, cells_w, width)
        # Masked cells give zero feature means, so they add nothing to the product.
        probs = _cell_probs(logits_ptr, logit_planes[:, None] + top_left[None, :], width,
                            n_mask[:, None] & k_mask[None, :])
        means = _cell_means(features_ptr, top_left[:, None] + feature_planes[None, :], width,
                            k_mask[:, None] & c_mask[None, :])
        acc = tl.dot(probs, means, acc, input_precision="ieee")

    rows = ((split * tl.num_programs(2) + batch) * num_masks + n).to(tl.int64)
    tl.store(partial_ptr + rows[:, None] * channels + c[None, :], acc / num_cells,
             mask=n_mask[:, None] & c_mask[None, :])


@jit
def _mask_pool_grad_logits_kernel(
    logits_ptr, features_ptr, grad_out_ptr, grad_logits_ptr,
    num_masks, channels, height, width, cells_w, num_cells,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # d(probs)[n, k] = sum_c grad_out[n, c] * cells[c, k] / K, then through the sigmoid and the
    # 2x2 centre mean: each centre pixel gets a quarter; the other 12 pixels get nothing.
    batch = tl.program_id(2)
    k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_mask = k < num_cells
    n_mask = n < num_masks
    plane = height * width
    top_left = _cell_top_left(k, cells_w, width)

    grad_probs = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for c_start in range(0, channels, BLOCK_C):
        c = c_start + tl.arange(0, BLOCK_C)
        c_mask = c < channels
        grad_out = tl.load(grad_out_ptr + (batch * num_masks + n).to(tl.int64)[:, None] * channels + c[None, :],
                           mask=n_mask[:, None] & c_mask[None, :], other=0.0).to(tl.float32)
        feature_planes = (batch * channels + c).to(tl.int64) * plane
        means = _cell_means(features_ptr, feature_planes[:, None] + top_left[None, :], width,
                            c_mask[:, None] & k_mask[None, :])
        grad_probs = tl.dot(grad_out, means, grad_probs, input_precision="ieee")

    top_left = (batch * num_masks + n).to(tl.int64)[:, None] * plane + top_left[None, :]
    mask = n_mask[:, None] & k_mask[None, :]
    probs = _cell_probs(logits_ptr, top_left, width, mask)
    centre = top_left + width + 1
    grad_pixel = (grad_probs / num_cells * probs * (1.0 - probs) * 0.25).to(grad_logits_ptr.dtype.element_ty)
    tl.store(grad_logits_ptr + centre, grad_pixel, mask=mask)
    tl.store(grad_logits_ptr + centre + 1, grad_pixel, mask=mask)
    tl.store(grad_logits_ptr + centre + width, grad_pixel, mask=mask)
    tl.store(grad_logits_ptr + centre + width + 1, grad_pixel, mask=mask)


@jit
def _mask_pool_grad_features_kernel(
    logits_ptr, grad_out_ptr, grad_features_ptr,
    num_masks, channels, height, width, cells_w, num_cells,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # d(cells)[c, k] = sum_n grad_out[n, c] * probs[n, k] / K, spread evenly over the 4x4 pixels.
    batch = tl.program_id(2)
    k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    k_mask = k < num_cells
    c_mask = c < channels
    plane = height * width
    top_left = _cell_top_left(k, cells_w, width)

    grad_cells = tl.zeros((BLOCK_C, BLOCK_K), dtype=tl.float32)
    for n_start in range(0, num_masks, BLOCK_N):
        n = n_start + tl.arange(0, BLOCK_N)
        n_mask = n < num_masks
        # grad_out[n, c] read transposed, as (BLOCK_C, BLOCK_N).
        grad_out_t = tl.load(grad_out_ptr + (batch * num_masks + n).to(tl.int64)[None, :] * channels + c[:, None],
                             mask=c_mask[:, None] & n_mask[None, :], other=0.0).to(tl.float32)
        logit_planes = (batch * num_masks + n).to(tl.int64) * plane
        # Masked masks get zero gradients above, so their (sigmoid(0)) probabilities add nothing.
        probs = _cell_probs(logits_ptr, logit_planes[:, None] + top_left[None, :], width,
                            n_mask[:, None] & k_mask[None, :])
        grad_cells = tl.dot(grad_out_t, probs, grad_cells, input_precision="ieee")

    grad_pixel = (grad_cells * (1.0 / 16.0) / num_cells).to(grad_features_ptr.dtype.element_ty)
    top_left = (batch * channels + c).to(tl.int64)[:, None] * plane + top_left[None, :]
    mask = (c_mask[:, None] & k_mask[None, :])[:, :, None]
    # Each of a cell's 4 rows written as one vector of 4 pixels, as _cell_means reads them.
    row = tl.broadcast_to(grad_pixel[:, :, None], (BLOCK_C, BLOCK_K, 4))
    for y in tl.static_range(4):
        tl.store(grad_features_ptr + _cell_row(top_left, y, width), row, mask=mask)


# ---------------------------------------------------------------------------------------------
# Launchers, autograd and input checks
# ---------------------------------------------------------------------------------------------


def mask_pool_launch_config(num_masks: int, channels: int, num_cells: int,
                            interpreting: bool = INTERPRETING) -> dict[str, int]:
    """BLOCK_N, BLOCK_C, BLOCK_K, num_warps and num_stages of every mask-pooling launch.

    tl.dot needs every block dimension to be at least 16. ``interpreting`` asks for the
    configuration of Triton's interpreter instead of a GPU's (see msda_forward_config).
    """
    def fit(size: int, cap: int) -> int:
        return max(16, min(triton.next_power_of_2(size), cap))

    if interpreting:
        # The interpreter runs programs one after another at a roughly fixed cost each: cover
        # everything in as few programs (and loop steps) as reasonable.
        blocks = fit(num_masks, 256), fit(channels, 256), fit(num_cells, 256)
    else:
        # ptxas (sm_90, 4 warps): with 32 x 64 x 16 blocks the forward takes 80 (fp32) to 96 registers
        # and issues fewer instructions per multiply-add than at BLOCK_K = 32, where its fp32 build
        # spills since the cell rows are read as vectors. Not yet tuned on hardware.
        blocks = fit(num_masks, 32), fit(channels, 64), 16
    return dict(zip(("BLOCK_N", "BLOCK_C", "BLOCK_K"), blocks), num_warps=4, num_stages=1)


def _cell_splits(programs: int, num_cells: int, block_k: int, device: torch.device) -> int:
    """How many ranges to split the grid cells into so that the forward fills the device.

    Without a split a batch of one image runs only (N blocks x C blocks) programs, each looping
    over every cell; two programs per SM is enough for a memory-bound loop.
    """
    if INTERPRETING:  # programs run one after another: splitting only adds work
        return 1
    return max(1, min(triton.cdiv(2 * multiprocessors(device), programs), triton.cdiv(num_cells, block_k)))


# The custom operators, built as those of ms_deform_attn.py: the forward body launches the kernel
# (traced on CPU: runs the reference), fakes describe the outputs, the backward is functional.

def _mask_pool_forward(mask_logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    if traced_on_cpu(mask_logits):
        return mask_pool_reference(mask_logits, features)
    batch, num_masks, height, width = mask_logits.shape
    channels = features.shape[1]
    cells_w, num_cells = width // 4, (height // 4) * (width // 4)
    config = mask_pool_launch_config(num_masks, channels, num_cells)
    block_k = config["BLOCK_K"]
    tiles = triton.cdiv(num_masks, config["BLOCK_N"]) * triton.cdiv(channels, config["BLOCK_C"])
    splits = _cell_splits(tiles * batch, num_cells, block_k, features.device)
    cells_per_split = triton.cdiv(triton.cdiv(num_cells, splits), block_k) * block_k
    splits = triton.cdiv(num_cells, cells_per_split)
    # Partial sums per split, added in a fixed order afterwards: deterministic, unlike atomics.
    partial = torch.empty(splits, batch, num_masks, channels, dtype=torch.float32, device=features.device)
    launch(_mask_pool_forward_kernel, (tiles, splits, batch), mask_logits, features, partial, num_masks, channels,
           height, width, cells_w, num_cells, cells_per_split, **config)
    return partial.sum(dim=0).to(features.dtype)


def _mask_pool_backward(mask_logits: torch.Tensor, features: torch.Tensor, grad_out: torch.Tensor,
                        logits_grad: bool, features_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    batch, num_masks, height, width = mask_logits.shape
    channels = features.shape[1]
    cells_w, num_cells = width // 4, (height // 4) * (width // 4)
    config = mask_pool_launch_config(num_masks, channels, num_cells)
    cell_blocks = triton.cdiv(num_cells, config["BLOCK_K"])
    sizes = (num_masks, channels, height, width, cells_w, num_cells)
    # Each gradient element is written by exactly one program: no atomics, deterministic.
    grad_logits, grad_features = skipped_gradient(mask_logits), skipped_gradient(features)
    if logits_grad:
        # Only the 2x2 centre of each 4x4 cell reaches the downsampled logits.
        grad_logits = torch.zeros_like(mask_logits)
        launch(_mask_pool_grad_logits_kernel, (cell_blocks, triton.cdiv(num_masks, config["BLOCK_N"]), batch),
               mask_logits, features, grad_out, grad_logits, *sizes, **config)
    if features_grad:
        grad_features = torch.empty_like(features)
        launch(_mask_pool_grad_features_kernel, (cell_blocks, triton.cdiv(channels, config["BLOCK_C"]), batch),
               mask_logits, grad_out, grad_features, *sizes, **config)
    return grad_logits, grad_features


mask_pool_forward_op = triton_op("mask_pool_forward", _mask_pool_forward)
mask_pool_backward_op = triton_op("mask_pool_backward", _mask_pool_backward)


@mask_pool_forward_op.register_fake
def _mask_pool_forward_fake(mask_logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    return features.new_empty(mask_logits.shape[0], mask_logits.shape[1], features.shape[1])


@mask_pool_backward_op.register_fake
def _mask_pool_backward_fake(mask_logits: torch.Tensor, features: torch.Tensor, grad_out: torch.Tensor,
                             logits_grad: bool, features_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return gradient_like(mask_logits, logits_grad), gradient_like(features, features_grad)


def _save_inputs(ctx: Any, inputs: tuple[torch.Tensor, torch.Tensor], output: torch.Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _mask_pool_gradients(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    needs = ctx.needs_input_grad
    if traced_on_cpu(grad_out):  # the forward traced as the reference: differentiate that
        grads = reference_vjp(mask_pool_reference, ctx.saved_tensors, grad_out)
    else:
        grads = mask_pool_backward_op(*ctx.saved_tensors, grad_out.contiguous(), needs[0], needs[1])
    return grads[0] if needs[0] else None, grads[1] if needs[1] else None


mask_pool_forward_op.register_autograd(_mask_pool_gradients, setup_context=_save_inputs)


def mask_pool_triton(mask_logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Triton mask pooling with autograd; same contract and result as :func:`mask_pool_reference`.

    mask_logits [B, N, H, W] and features [B, C, H, W], one dtype (float32, float16 or bfloat16),
    H and W divisible by 4 -> [B, N, C] in that dtype. Downsampling, sigmoid, pooling and the
    product run in float32. Gradients flow to mask_logits and features.
    """
    op = "mask_pool"
    check_float(op, "mask_logits", mask_logits)
    check_float(op, "features", features)
    check_shape(op, "mask_logits", mask_logits, ("B", "N", "H", "W"))
    batch, _, height, width = mask_logits.shape
    check_shape(op, "features", features, (batch, "C", height, width))
    if height % 4 or width % 4:
        raise ValueError(f"{op}: H and W must be divisible by 4, got {height}x{width}")
    if mask_logits.dtype != features.dtype:
        raise ValueError(f"{op}: mask_logits ({mask_logits.dtype}) and features ({features.dtype}) "
                         "must share one dtype")
    device = check_same_device(op, mask_logits=mask_logits, features=features)
    require_triton(op, device)
    return mask_pool_forward_op(mask_logits.contiguous(), features.contiguous())
