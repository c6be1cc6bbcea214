"""Regional compilation: torch.compile each repeated region of the encoder in place,
not the whole training module (torchtitan's `apply_compile`, which compiles every
TransformerBlock on its own: torchtitan/models/llama3/infra/parallelize.py).

Why regions and not the model:
* compile time: the blocks of a tower share one structure, and dynamo turns parameters
  into graph inputs (inline_inbuilt_nn_modules, always on since PyTorch 2.6), so the 12
  vision blocks of a B/16 compile once and the text blocks once more (a causal and a
  bidirectional graph), instead of one graph the size of the whole step;
* what is fused is where the bf16 step loses its time: LayerNorm, QuickGELU, the residual
  adds and the casts between the matmuls, and the BatchNorm/ReLU/add chains of MS-CLIP-S's
  conv stem, parallel branch and lateral adapters;
* what stays eager is what changes between objectives and what DeepSpeed hooks into: the
  embeddings, the pooling, the objective heads and losses, the engine's backward and step.

Graphs per region: an adapter or branch stage has one shape per stage, and every region
runs under grad and without it (exact accumulation's first pass) and, with token dropping's
unmasked phase, on all tokens and on the kept ones: more variants of one code object than
dynamo's default recompile limit (8), past which it would run the region eager (or, under
fullgraph, fail), so the limit is raised to RECOMPILE_LIMIT.

The trainer compiles without `fullgraph`: ZeRO-3 gathers a module's parameters in hooks
DeepSpeed marks `torch.compiler.disable`, which break a compiled region's graph by design,
and a run must never stop on a compiler limit. tests/test_fast_paths.py compiles with
`fullgraph=True`, so a graph break in any region fails there instead of slowing every run.
"""
from __future__ import annotations

import torch._dynamo
from torch import nn

from .layers import Block
from .vision import EarlyConvStem, LateralAdapter, ParallelBranch


RECOMPILE_LIMIT = 64


def regions(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs compile_regions compiles, in module order: every transformer
    block of both towers, the conv stem, each parallel-branch stage and each lateral adapter.
    A block module shared by both towers (MS-CLIP's attn/mlp) lives inside two distinct
    Block objects (their LayerNorms are per modality), so no region is listed twice."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, (Block, EarlyConvStem, LateralAdapter)):
            found.append((name, module))
        elif isinstance(module, ParallelBranch):
            found.extend((f"{name}.stages.{i}", stage) for i, stage in enumerate(module.stages))
    return found


def compile_regions(model: nn.Module, fullgraph: bool = False, dynamic: bool = False,
                    backend: str = "inductor") -> list[str]:
    """Compile every region of `model` in place (nn.Module.compile: the module object and its
    parameters stay the same, so DeepSpeed's flat buffers, hooks and checkpoints see the
    eager module). Compilation happens on each region's first call. Returns the names.

    Static shapes: a training run's shapes do not vary (a fixed micro batch, a fixed number
    of kept tokens); the regions that meet several shapes (the adapters, the branch stages)
    meet one per stage, each compiled once. Dynamic shapes would cost compile time and, on
    the adapters with token dropping, hit an inductor error (PyTorch 2.14: "cannot
    determine truth value of Relational"). `backend`: torch.compile's; the fake-device
    tests trace with "aot_eager" (dynamo and AOT autograd, no code generation)."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit,
                                                           4 * RECOMPILE_LIMIT)
    compiled = []
    for name, module in regions(model):
        module.compile(fullgraph=fullgraph, dynamic=dynamic, backend=backend)
        compiled.append(name)
    return compiled
