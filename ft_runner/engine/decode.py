"""The decode forward pass: one new token per row -> logits, for one pipeline stage.

`FusedDecoder` runs the step on a `GPTStage`'s own weights through `ft_runner.kernels.ops`
(Triton on GPUs). Per layer of a sequential block: a residual-add + norm kernel, the projections
(one kernel each with bias and activation: a GEMV at batch 1, with the norm folded in too; a
few-row GEMM up to 64 rows; cuBLAS beyond), and one attention kernel that rotates q/k, appends
k/v to the cache and attends. A parallel-residual block (GPT-J, GPT-NeoX)
writes attention output, activated MLP hidden and QKV side by side in one buffer, so its two
output projections are one GEMM (and, with one shared norm, its two input projections too).
Gated MLPs run gate and up as one GEMV. Weights are fused in place: the modules' parameters
become views into the fused tensors, so nothing is held twice. Quantized weights (model/quant.py)
fuse the same way where outputs are stacked (each channel keeps its scale); a parallel block's two
output projections, whose channels have a scale each, stay two products (the second adds the
first as its residual), and no norm is folded into a quantized GEMV.

`ModuleDecoder` runs the model's own modules instead, for blocks FusedDecoder does not cover
(post-layernorm, ALiBi, sliding windows, dynamic RoPE).
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist

from ft_runner.engine.symm_reduce import SymmetricAllReduce
from ft_runner.kernels import ops
from ft_runner.model import quant

# FT activation name -> (ops activation, gated)
_ACTS = {"Gelu": ("gelu", False), "GeluExact": ("gelu_exact", False), "Relu": ("relu", False),
         "Silu": ("silu", False), "GeGLU": ("gelu", True), "SiGLU": ("silu", True)}


@dataclasses.dataclass
class Norm:
    weight: torch.Tensor
    bias: torch.Tensor | None
    eps: float
    rms: bool

    @classmethod
    def of(cls, module) -> Norm:
        return cls(module.weight, getattr(module, "bias", None), module.eps, not hasattr(module, "bias"))

    def args(self):
        return self.weight, self.bias, self.eps, self.rms


@dataclasses.dataclass
class FusedLayer:
    norm1: Norm
    norm2: Norm | None  # sequential blocks, and parallel ones with their own MLP norm (NeoX)
    parallel: bool
    qkv_w: torch.Tensor  # parallel with one shared norm: [fc1 ; qkv] stacked (MLP columns first)
    qkv_b: torch.Tensor | None
    out_w: torch.Tensor  # parallel: [dense | fc2] side by side, over [attention out | MLP hidden]
    out_b: torch.Tensor | None  # added once, after the TP all-reduce
    fc1_w: torch.Tensor | None  # None when folded into qkv_w; gated: [gate ; up] stacked
    fc1_b: torch.Tensor | None
    fc2_w: torch.Tensor | None  # None when folded into out_w (parallel blocks, unquantized)
    fc2_b: torch.Tensor | None
    # (any of the weights may be a quant.QuantizedWeight: ops.linear takes either)
    mlp_width: int  # local MLP hidden width
    fold1: tuple | None = None  # single-row path: norm1 folded into qkv_w (ops.fold_norm)
    fold2: tuple | None = None  # single-row path: the MLP's norm folded into fc1_w


def unsupported_reason(stage) -> str | None:
    """Why FusedDecoder cannot run this stage, or None."""
    config = stage.config
    if config.layernorm_type != "pre_layernorm":
        return "post-layernorm blocks"
    if config.use_attention_linear_bias:
        return "ALiBi"
    if any(config.window(stage.first_layer + i) for i in range(len(stage.layers))):
        return "sliding-window attention"
    if stage.rotary is not None and stage.rotary.dynamic:
        return "dynamic RoPE"
    if config.activation_type not in _ACTS:
        return f"activation {config.activation_type}"
    return None


def _sum_bias(*biases):
    present = [b for b in biases if b is not None]
    return None if not present else sum(present[1:], present[0].clone())


def _fuse_rows(*linears) -> tuple:
    """Stack Linear weights (out, in) along out (quantized ones with their scales); each module's
    parameters become views of the result."""
    weight = torch.cat([m.weight for m in linears])
    scale = torch.cat([m.weight_scale for m in linears]) if linears[0].quant is not None else None
    bias = None
    present = [m.bias for m in linears if m.bias is not None]
    if present:
        bias = torch.cat([m.bias if m.bias is not None else present[0].new_zeros(m.weight.shape[0]) for m in linears])
    start = 0
    for m in linears:
        rows = m.weight.shape[0]
        m.weight.data = weight[start:start + rows]
        if scale is not None:
            m.weight_scale.data = scale[start:start + rows]
        if m.bias is not None:
            m.bias.data = bias[start:start + rows]
        start += rows
    if scale is not None:
        return quant.QuantizedWeight(weight, scale, linears[0].quant), bias
    return weight, bias


def _fuse_cols(*linears) -> torch.Tensor:
    """Concatenate Linear weights along `in` (one GEMM over concatenated inputs); views as above."""
    weight = torch.cat([m.weight for m in linears], dim=1)
    start = 0
    for m in linears:
        cols = m.weight.shape[1]
        m.weight.data = weight[:, start:start + cols]
        start += cols
    return weight


# torch 2.13 renamed all_gather_into_tensor (and warns on each call of the old name); 2.11 has only the old one
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def fused_decoder(stage, runtime) -> FusedDecoder:
    """The stage's one FusedDecoder: fusing rebinds the modules' weights, so it must happen once
    per stage however many engines (in-flight, static) run it."""
    if getattr(stage, "fused_decoder", None) is None:
        stage.fused_decoder = FusedDecoder(stage, runtime)
    return stage.fused_decoder


class FusedDecoder:
    """Decode step of one pipeline stage through fused kernels."""

    def __init__(self, stage, runtime):
        self.stage = stage
        self.grid = runtime.grid
        self.pipe = runtime.pipe
        self.group = runtime.tp_group if runtime.grid.tp > 1 else None
        config = stage.config
        self.act, self.gated = _ACTS[config.activation_type]
        first = stage.layers[0].attn
        self.heads, self.kv_heads, self.head_dim = first.heads, first.kv_heads, first.head_dim
        self.scale = first.head_dim ** -0.5
        self.dtype = stage.dtype
        self.layers = [self._fuse(block) for block in stage.layers]
        self.final_norm = Norm.of(stage.ln_f) if stage.ln_f is not None else None
        self.head_w, self.head_b = self._pad_head(stage.lm_head)
        self.head_fold = None
        if self.group is None and self.layers[0].qkv_w.is_cuda:  # the single-row path folds its norms
            for layer in self.layers:
                if not quant.is_quantized(layer.qkv_w):  # a quantized GEMV reads normed rows
                    self._fold(layer)
            if self.final_norm is not None and self.head_w is not None:
                self.head_fold = self._folded(self.final_norm, self.head_w)
        self.vocab = config.vocab_size
        self.rot_dim = config.rotary_embedding
        self.rope = None  # (cos, sin, rot_dim, interleaved), sized by `prepare`
        self.symm: SymmetricAllReduce | None = None  # the TP sums of small products, set up by `prepare`
        self._symm_pending = self.group is not None

    def _fuse(self, block) -> FusedLayer:
        attn, mlp = block.attn, block.mlp
        fc1 = (mlp.fc1, mlp.up) if mlp.up is not None else (mlp.fc1,)
        width = mlp.fc1.weight.shape[0]
        norm2 = Norm.of(block.ln2) if block.ln2 is not None else None
        if not block.parallel:
            fc1_w, fc1_b = _fuse_rows(*fc1) if len(fc1) > 1 else (mlp.fc1.qweight, mlp.fc1.bias)
            return FusedLayer(Norm.of(block.ln1), norm2, False, attn.qkv.qweight, attn.qkv.bias, attn.dense.qweight,
                              attn.dense.bias, fc1_w, fc1_b, mlp.fc2.qweight, mlp.fc2.bias, width)
        out_b = _sum_bias(attn.dense.bias, mlp.fc2.bias)
        if attn.dense.quant is None:  # one GEMM over [attention out | MLP hidden]
            out_w, fc2_w = _fuse_cols(attn.dense, mlp.fc2), None
        else:  # each output channel of dense and of fc2 has its own scale: two products
            out_w, fc2_w = attn.dense.qweight, mlp.fc2.qweight
        if norm2 is None and not self.gated:  # GPT-J: one norm feeds both, so one input GEMM
            in_w, in_b = _fuse_rows(mlp.fc1, attn.qkv)
            return FusedLayer(Norm.of(block.ln1), None, True, in_w, in_b, out_w, out_b, None, None, fc2_w, None, width)
        fc1_w, fc1_b = _fuse_rows(*fc1) if len(fc1) > 1 else (mlp.fc1.qweight, mlp.fc1.bias)
        return FusedLayer(Norm.of(block.ln1), norm2, True, attn.qkv.qweight, attn.qkv.bias, out_w, out_b,
                          fc1_w, fc1_b, fc2_w, None, width)

    def _pad_head(self, head) -> tuple:
        """The head's weight and bias; on one GPU with their rows padded with zeros to a multiple of
        64, the module's parameters becoming views. cuBLAS writes logits of an odd width (GPT-2's
        50257) through a slow unaligned kernel: 84 us a step at batch 32 on an H200, where reading
        the weight takes 26. The padding's logits are never read (see `full_logits`)."""
        if head is None:
            return None, None
        weight, bias = head.weight, head.bias
        rows = weight.shape[0]
        if self.group is not None or not weight.is_cuda or rows % 64 == 0:
            return weight, bias
        pad = 64 - rows % 64
        weight = torch.cat([weight, weight.new_zeros(pad, weight.shape[1])])
        head.weight.data = weight[:rows]
        if bias is not None:
            bias = torch.cat([bias, bias.new_zeros(pad)])
            head.bias.data = bias[:rows]
        return weight, bias

    @staticmethod
    def _folded(norm: Norm, weight) -> tuple:
        return (*norm.args(), *ops.fold_norm(norm.weight, norm.bias, weight))

    def _fold(self, layer: FusedLayer) -> None:
        layer.fold1 = self._folded(layer.norm1, layer.qkv_w)
        if layer.fc1_w is not None:
            layer.fold2 = self._folded(layer.norm2 or layer.norm1, layer.fc1_w)

    def prepare(self, max_len: int) -> None:
        """Size the rotary tables for cache slots [0, max_len). The first call also sets up the
        symmetric-memory all-reduce: a collective, and every TP rank prepares at the same point of
        `generate`, before any step (and so before any CUDA-graph capture)."""
        device = self.layers[0].qkv_w.device
        if self._symm_pending:
            self._symm_pending = False
            self.symm = SymmetricAllReduce.create(self.group, device)
        rotary = self.stage.rotary
        if rotary is None or (self.rope is not None and self.rope[0].shape[0] >= max_len):
            return
        cos, sin = ops.rope_tables(rotary.inv.to(device), max_len)
        self.rope = (cos * rotary.scale, sin * rotary.scale, self.rot_dim, rotary.interleaved)

    # --- the step ------------------------------------------------------------------------------

    def logits(self, tokens: torch.Tensor, positions: torch.Tensor, cache, last: torch.Tensor | None = None):
        """tokens, positions (R,) -> logits (R, V_local) or gathered (TP, R, V_local) on the last
        stage (vocab padding included, and on one GPU padding to a multiple of 64: see
        `full_logits`), None on the others. `cache` attends (KVCache, or the in-flight engine's
        PagedBatch); `last` (S,): the rows whose logits are wanted (default: all)."""
        h = self._stage_input(tokens, positions)
        if self.group is None and tokens.shape[0] == 1 and os.environ.get("FT_RUNNER_FUSE_NORM", "1") != "0":
            return self._logits_single(h, positions, cache)
        h, x = ops.add_norm(h, None, None, *self.layers[0].norm1.args())
        for i, layer in enumerate(self.layers):
            nxt = self.layers[i + 1].norm1 if i + 1 < len(self.layers) else self.final_norm
            attend = self._attend(cache, i, positions)
            h, x = (self._parallel if layer.parallel else self._sequential)(layer, h, x, nxt, attend)
        if not self.grid.is_last_stage:
            self.pipe.send_next(h)
            return None
        x = h if x is None else x  # x is None: the model has no final norm
        return self._head(x if last is None else x[last])

    def _logits_single(self, h, positions, cache):
        """One row, one rank: every norm runs inside the GEMV that reads it and every residual add
        inside the GEMV that produces it (3 to 5 kernels a layer)."""
        for i, layer in enumerate(self.layers):
            attend = self._attend(cache, i, positions)
            h = (self._parallel_single if layer.parallel else self._sequential_single)(layer, h, attend)
        if not self.grid.is_last_stage:
            self.pipe.send_next(h)
            return None
        return self._head(h, self.head_fold or (self.final_norm.args() if self.final_norm is not None else None))

    @staticmethod
    def _norms(layer: FusedLayer):
        """The norm arguments of the single-row path: folded on GPUs, plain elsewhere."""
        second = layer.norm2 or layer.norm1
        return layer.fold1 or layer.norm1.args(), layer.fold2 or second.args()

    def _sequential_single(self, layer: FusedLayer, h, attend):
        norm1, norm2 = self._norms(layer)
        attn = attend(ops.linear(h, layer.qkv_w, layer.qkv_b, norm=norm1))
        h = ops.linear(attn, layer.out_w, layer.out_b, residual=h)
        f = ops.linear(h, layer.fc1_w, layer.fc1_b, self.act, self.gated, norm=norm2)
        return ops.linear(f, layer.fc2_w, layer.fc2_b, residual=h)

    def _parallel_single(self, layer: FusedLayer, h, attend):
        local, width, buf = self._parallel_buffer(layer, h)
        norm1, norm2 = self._norms(layer)
        if layer.fc1_w is None:
            ops.linear(h, layer.qkv_w, layer.qkv_b, self.act, act_cols=width, out=buf[:, local:], norm=norm1)
        else:
            ops.linear(h, layer.qkv_w, layer.qkv_b, out=buf[:, local + width:], norm=norm1)
            ops.linear(h, layer.fc1_w, layer.fc1_b, self.act, self.gated, out=buf[:, local:local + width], norm=norm2)
        attend(buf[:, local + width:], out=buf[:, :local])
        if layer.fc2_w is not None:  # quantized: dense, then fc2 adding it
            y = ops.linear(buf[:, :local], layer.out_w, residual=h)
            return ops.linear(buf[:, local:local + width], layer.fc2_w, layer.out_b, residual=y)
        return ops.linear(buf[:, :local + width], layer.out_w, layer.out_b, residual=h)

    def _parallel_buffer(self, layer: FusedLayer, x):
        """[attention out | activated MLP hidden | q k v] for R rows: the output GEMM reads its first
        two parts as one input."""
        local, width = self.heads * self.head_dim, layer.mlp_width
        qkv_width = (self.heads + 2 * self.kv_heads) * self.head_dim
        return local, width, torch.empty((x.shape[0], local + width + qkv_width), dtype=x.dtype, device=x.device)

    def _stage_input(self, tokens, positions):
        if self.grid.is_first_stage:  # the stage's embed() in one kernel (a lookup, its TP mask, wpe)
            stage = self.stage
            wpe = stage.wpe.weight if stage.wpe is not None and self.grid.tp_rank == 0 else None  # added once
            h = ops.embed(tokens, positions, stage.wte.weight, stage.wte.start, wpe)
            if self.group is not None:
                dist.all_reduce(h, group=self.group)
            return h if stage.ln_embed is None else stage.ln_embed(h)
        h = torch.empty((tokens.shape[0], self.stage.config.hidden_size), dtype=self.dtype, device=tokens.device)
        return self.pipe.recv_prev(h)

    def _attend(self, cache, layer: int, positions):
        def attend(qkv, out=None):
            return cache.attend(layer, qkv, positions, self.heads, self.kv_heads, self.head_dim, self.scale,
                                self.rope, out)
        return attend

    def _project_reduce(self, x, weight, residual=None):
        """x W^T (+ residual) summed over the TP group (a row-parallel output projection). With symmetric
        memory the product goes straight into the shared buffer in fp32 and one one-shot kernel sums
        it (the sum comes back in fp32); products too large for the buffer, and gloo, take dist.all_reduce."""
        partial = self.symm.partial(x.shape[0], weight.shape[0]) if self.symm is not None else None
        if partial is not None:
            return self.symm(ops.linear(x, weight, out=partial, residual=residual))
        y = ops.linear(x, weight, residual=residual)
        if self.group is not None:
            dist.all_reduce(y, group=self.group)
        return y

    def _residual(self, h, y, bias, nxt: Norm | None):
        """(h + y + bias, its norm for the next layer); no norm at the end of a non-last stage."""
        if nxt is None:
            total = h.float() + y.float() + (bias.float() if bias is not None else 0)
            return total.to(h.dtype), None
        return ops.add_norm(h, y, bias, *nxt.args())

    def _sequential(self, layer: FusedLayer, h, x, nxt, attend):
        attn = attend(ops.linear(x, layer.qkv_w, layer.qkv_b))
        h, x = ops.add_norm(h, self._project_reduce(attn, layer.out_w), layer.out_b, *layer.norm2.args())
        f = ops.linear(x, layer.fc1_w, layer.fc1_b, self.act, self.gated)
        return self._residual(h, self._project_reduce(f, layer.fc2_w), layer.fc2_b, nxt)

    def _parallel(self, layer: FusedLayer, h, x, nxt, attend):
        local, width, buf = self._parallel_buffer(layer, x)
        if layer.fc1_w is None:  # [fc1 ; qkv] in one GEMM, the activation on its MLP columns only
            ops.linear(x, layer.qkv_w, layer.qkv_b, self.act, act_cols=width, out=buf[:, local:])
        else:
            ops.linear(x, layer.qkv_w, layer.qkv_b, out=buf[:, local + width:])
            x_mlp = x if layer.norm2 is None else ops.add_norm(h, None, None, *layer.norm2.args())[1]
            ops.linear(x_mlp, layer.fc1_w, layer.fc1_b, self.act, self.gated, out=buf[:, local:local + width])
        attend(buf[:, local + width:], out=buf[:, :local])
        if layer.fc2_w is not None:  # quantized: dense, then fc2 adding it, one sum over the TP group
            y = self._project_reduce(buf[:, local:local + width], layer.fc2_w, ops.linear(buf[:, :local], layer.out_w))
        else:
            y = self._project_reduce(buf[:, :local + width], layer.out_w)
        return self._residual(h, y, layer.out_b, nxt)

    def _head(self, x, norm: tuple | None = None):
        local = ops.linear(x, self.head_w, self.head_b, norm=norm)
        if self.group is None:
            return local
        parts = torch.empty((self.grid.tp * local.shape[0], local.shape[1]), dtype=local.dtype, device=local.device)
        _all_gather(parts, local.contiguous(), group=self.group)
        return parts.view(self.grid.tp, *local.shape)


class ModuleDecoder:
    """Decode step through the model's own modules: every block type, nothing fused."""

    def __init__(self, generator):
        self.generator = generator
        self.vocab = generator.model.config.vocab_size

    def prepare(self, max_len: int) -> None:
        pass

    def logits(self, tokens, positions, cache):
        h = self.generator._hidden(tokens[:, None], positions[:, None], positions, cache, prefill=False)
        return None if h is None else self.generator.model.logits(h[:, 0])


def full_logits(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """(R, vocab) fp32 from a decoder's logits: TP parts (TP, R, V_local) joined, vocab padding dropped."""
    if logits.dim() == 3:  # (an explicit width: a step may sample no row at all)
        logits = logits.permute(1, 0, 2).reshape(logits.shape[1], logits.shape[0] * logits.shape[2])
    return logits[:, :vocab].float()
