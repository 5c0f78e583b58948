"""An analytic model of one training step's memory on one rank, to set beside a measurement.

Every term is counted from the model's shapes, the parallel layout and the step's settings
(no measured input), in the terms megatron's step allocates:

* parameters: this rank's shard (TP splits the matrices and the vocabulary, PP the layers,
  EP the experts) in the parameter dtype;
* gradients: megatron DDP's fp32 buffer (``grad_reduce_in_fp32``), trainable parameters only;
* optimizer state: Adam's two fp32 moments, plus an fp32 master copy of bf16 parameters,
  sharded over the data-parallel group by the distributed optimizer;
* attention workspace: megatron's global buffer for the unfused attention scores (local
  spec on GPU, from the first step on; on CPU ``baddbmm(beta=0)`` never touches its pages,
  so the kernel never backs them);
* activations: what autograd keeps per layer for the backward (listed in
  :func:`layer_activation_bytes`) for every layer, or with full recomputation each layer's
  input; plus, with recomputation, the one layer rebuilt during its backward;
* logits: the vocabulary shard [b, s, v/tp], turned into its softmax in place by the
  vocab-parallel cross entropy (bf16 logits add the fp32 copy it works on);
* backward transients: at the LM head, its weight gradient before it joins the buffer
  (with its input's gradient); in a layer, the attention scores' two gradients;
* optimizer-step transient: torch's Adam on CPU makes two temporaries the size of the
  largest parameter (``exp_avg_sq.sqrt() / c``); fused Adam (Transformer Engine, apex)
  none; torch's foreach Adam on GPU two of every parameter.

The step's peak is the largest of three moments: the LM head's backward (activations,
logits, the head's gradient), a layer's backward (activations, the recomputed layer, the
scores' gradients; the logits are gone by then) and the optimizer step.
The figures of this model against measurement are in bench/README.md (bench/train_memory.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from megatron_bar.bar.freeze import ANCHOR_EXPERT, FREEZE_POLICIES
from megatron_bar.model.config import ModelConfig


@dataclass(frozen=True)
class StepShape:
    """What decides the memory of one step on one rank, besides the model."""

    seq_length: int
    micro_batch_size: int
    tp: int = 1
    pp: int = 1
    ep: int = 1
    dp: int = 1  # data-parallel size of the dense parameters (world / (tp * pp))
    stage: str = "full"
    recompute: bool = False
    distributed_optimizer: bool = False
    param_bytes: int = 4  # 4 fp32 (CPU), 2 bf16 (GPU)
    flash_attention: bool = False  # Transformer Engine's fused attention: no s x s scores
    adam: str = "single_tensor"  # single_tensor (torch, CPU) | foreach (torch, GPU) | fused
    fp8_weight_copies: bool = False  # TE FP8: one byte per parameter more
    gpu: bool = False  # the CUDA allocator counts allocations; the CPU's kernel touched pages
    pp_rank: int = 0
    ep_rank: int = 0


@dataclass
class ParamCounts:
    """This rank's parameters by freeze group (elements)."""

    by_group: dict[str, int]
    largest: int  # elements of the largest trainable tensor

    def total(self) -> int:
        return sum(self.by_group.values())


def param_counts(cfg: ModelConfig, shape: StepShape) -> ParamCounts:
    """This rank's parameter elements per freeze group (megatron_bar.bar.freeze's groups),
    from the shapes: the layout of megatron's GPTModel as the spec builds it."""
    tp, h, f = shape.tp, cfg.hidden_size, cfg.ffn_hidden_size
    vp = cfg.padded_vocab_size // tp
    hq, hk = cfg.num_attention_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    layers = cfg.num_layers // shape.pp
    first, last = shape.pp_rank == 0, shape.pp_rank == shape.pp - 1
    groups = {"embedding": vp * h if first else 0, "lm_head": vp * h if last else 0}
    # fused QKV and output projections, the full-width QK norms (TP-split with the heads)
    groups["attention"] = layers * ((h * (hq + 2 * hk) + hq * h + hq + hk) // tp)
    groups["norms"] = layers * 2 * h + (h if last else 0)  # post-attention, post-MLP, final
    expert = 3 * h * f // tp  # SwiGLU fc1 (2f) and fc2 (f), expert-TP = TP
    if cfg.is_moe:
        local = cfg.num_experts // shape.ep
        first_expert = shape.ep_rank * local
        anchor = int(first_expert <= ANCHOR_EXPERT < first_expert + local)
        groups["router"] = layers * cfg.num_experts * h
        groups["anchor_expert"] = layers * anchor * expert
        groups["experts"] = layers * (local - anchor) * expert
    else:
        groups["dense_mlp"] = layers * expert
    # the largest single tensor that trains here (the optimizer's temporaries are its size)
    trainable = FREEZE_POLICIES[shape.stage].trainable
    tensors = {"embedding": vp * h, "lm_head": vp * h, "attention": h * (hq + 2 * hk) // tp,
               "dense_mlp": 2 * h * f // tp, "experts": 2 * h * f // tp, "router": cfg.num_experts * h}
    largest = max((n for g, n in tensors.items() if g in trainable and groups.get(g)), default=0)
    return ParamCounts({g: n for g, n in groups.items() if n}, largest)


def trainable_split(counts: ParamCounts, stage: str) -> tuple[int, int]:
    """(trainable dense elements, trainable expert elements) on this rank."""
    trainable = FREEZE_POLICIES[stage].trainable
    dense = sum(n for g, n in counts.by_group.items() if g in trainable and g not in ("experts", "anchor_expert"))
    experts = sum(n for g, n in counts.by_group.items() if g in trainable and g in ("experts", "anchor_expert"))
    return dense, experts


def layer_activation_bytes(cfg: ModelConfig, shape: StepShape, act_bytes: int) -> int:
    """Bytes autograd keeps for one transformer layer's backward, one microbatch.

    With sequence parallelism the norms' tensors and the linear layers' inputs are kept as
    the rank's sequence shard (megatron gathers them again in the backward)."""
    tp, h, f = shape.tp, cfg.hidden_size, cfg.ffn_hidden_size
    t = shape.seq_length * shape.micro_batch_size
    hq, hk = cfg.num_attention_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    heads = cfg.num_attention_heads // tp
    elems = t * h // tp                         # QKV projection's input
    elems += t * (hq + 2 * hk) // tp            # its output, kept by the QK norms (q, k views)
    if shape.flash_attention:
        elems += t * (hq + 2 * hk) // tp + t * hq // tp  # q, k, v after RoPE, and the output
        elems += shape.micro_batch_size * heads * shape.seq_length * 4 // act_bytes  # fp32 LSE
    else:
        elems += 3 * t * hq // tp               # q, and k, v repeated to every query head
        elems += shape.micro_batch_size * heads * shape.seq_length ** 2  # softmax probabilities
    elems += t * hq // tp                       # attention output, the projection's input
    elems += t * h // tp                        # post-attention norm's input
    topk = cfg.moe_topk if cfg.is_moe else 1
    elems += t * h // tp                        # FC1's input
    elems += topk * 4 * t * f // tp             # FC1's output (SwiGLU keeps both halves and
    #                                             silu of the first) and FC2's input
    if cfg.is_moe:
        elems += t * cfg.num_experts * 4 // act_bytes  # fp32 router probabilities
        elems += 2 * topk * t * h // tp * shape.tp    # permuted tokens (gathered over TP)
    elems += t * h // tp                        # post-MLP norm's input
    return elems * act_bytes


@dataclass
class MemoryEstimate:
    params: int
    grads: int
    optimizer: int
    fp8_copies: int
    attention_workspace: int
    activations: int
    recomputed_layer: int
    logits: int
    lm_head_backward: int
    attention_backward: int
    optimizer_transient: int

    @property
    def state(self) -> int:
        """What the rank holds between steps."""
        return self.params + self.grads + self.optimizer + self.fp8_copies + self.attention_workspace

    @property
    def step_peak(self) -> int:
        """The step's peak above the state."""
        at_lm_head = self.activations + self.logits + self.lm_head_backward
        in_a_layer = self.activations + self.recomputed_layer + self.attention_backward
        return max(at_lm_head, in_a_layer, self.optimizer_transient)

    @property
    def peak(self) -> int:
        return self.state + self.step_peak

    def as_dict(self) -> dict:
        return {**asdict(self), "state": self.state, "step_peak": self.step_peak, "peak": self.peak}


def estimate(cfg: ModelConfig, shape: StepShape) -> MemoryEstimate:
    counts = param_counts(cfg, shape)
    dense, experts = trainable_split(counts, shape.stage)
    trainable = dense + experts
    pb = shape.param_bytes
    act = pb  # activations and logits in the parameter dtype (autocast dtype = params dtype)
    expert_dp = max(1, shape.dp // shape.ep)
    # Adam's m and v in fp32, plus an fp32 master copy when the parameters are bf16
    per_param = 8 + (4 if pb < 4 else 0)
    if shape.distributed_optimizer:
        optimizer = per_param * (dense / shape.dp + experts / expert_dp)
    else:
        optimizer = per_param * trainable
    t = shape.seq_length * shape.micro_batch_size
    heads = cfg.num_attention_heads // shape.tp
    workspace = 0
    if shape.gpu and not shape.flash_attention:
        workspace = shape.micro_batch_size * heads * shape.seq_length ** 2 * act

    layers = cfg.num_layers // shape.pp
    per_layer = layer_activation_bytes(cfg, shape, act)
    if shape.recompute:
        activations, recomputed = layers * t * cfg.hidden_size // shape.tp * act, per_layer
    else:
        activations, recomputed = layers * per_layer, 0
    last = shape.pp_rank == shape.pp - 1
    in_flight = shape.pp - shape.pp_rank  # 1F1B: microbatches whose activations wait
    activations = activations * in_flight
    activations += 3 * t * cfg.hidden_size // shape.tp * act  # embedding out, final norm in, LM head in
    vp = cfg.padded_vocab_size // shape.tp
    logits = 0
    if last:
        # the shard, and for bf16 the fp32 softmax built from it (the model computes the loss
        # on its [s, b, v/tp] logits: no [b, s] copy on the training path)
        logits = t * vp * act + (t * vp * 4 if act < 4 else 0)
    # the LM head's weight gradient (before it is added to the buffer) with its input's
    # gradient; a layer's attention score gradients (two s x s tensors per head)
    head_trains = "lm_head" in FREEZE_POLICIES[shape.stage].trainable
    head_grad = ((vp * cfg.hidden_size * 4 if head_trains else 0) + t * cfg.hidden_size * act) if last else 0
    scores_grad = 0 if shape.flash_attention else 2 * shape.micro_batch_size * heads * shape.seq_length ** 2 * act
    if shape.adam == "fused":
        optimizer_transient = 0
    elif shape.adam == "foreach":
        optimizer_transient = 2 * 4 * (trainable if not shape.distributed_optimizer
                                       else dense / shape.dp + experts / expert_dp)
    else:
        optimizer_transient = 2 * 4 * counts.largest
    return MemoryEstimate(
        params=counts.total() * pb,
        grads=trainable * 4,
        optimizer=int(optimizer),
        fp8_copies=counts.total() if shape.fp8_weight_copies else 0,
        attention_workspace=workspace,
        activations=int(activations),
        recomputed_layer=int(recomputed),
        logits=int(logits),
        lm_head_backward=int(head_grad),
        attention_backward=int(scores_grad),
        optimizer_transient=int(optimizer_transient),
    )
