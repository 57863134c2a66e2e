"""The CPU target: what CPU kernels allocate that their meta kernels do not show, measured here.

A meta kernel returns an op's outputs and nothing else. A CPU kernel may allocate more while it
runs, and free it before it returns: oneDNN's reorders into blocked layouts and its scratchpads
(convolutions, LSTMs), flash attention's per-thread buffers and bf16 packing, the reductions of
normalization backward, the gradient copy of ``embedding_dense_backward``, the masks of
``_safe_softmax``. These buffers count in a CPU run's peak when the peak falls inside such an op
(a CNN's first convolution, the last layer's attention backward).

Their sizes depend on the instruction set: oneDNN and ATen pick the implementation and its
memory layouts for the running CPU (AVX2: 8-float blocks, AVX-512: 16, AVX512-BF16 and AMX: bf16
convolutions in oneDNN instead of ATen's im2col). They also depend on the thread count and on
the shapes. So they are not modelled from source but measured on this machine, the way the
kernels choose them: for each distinct call that ``needs_probe`` (the ops in ``PROBED_OPS``;
bf16/fp16 matrix products; elementwise ops on mixed float dtypes) the real CPU kernel runs
on zero-filled tensors of the traced shapes at the plan's micro-batch and at the next (dims that
carry the trace's prime batch are scaled to them; not at 1 below it: oneDNN picks other
implementations at batch 1), with ``CPU_RANK_THREADS`` threads, under torch's profiler, which
reports every CPU allocation and free with its address. Each buffer born and freed inside the op
is then a constant part plus a part proportional to the micro-batch, fitted from the two runs:
exact at the plan's batch and extrapolated to others (tests/planner/test_cpu_kernels.py checks
the extrapolation against the real kernels), and the tracer replays it at the trace batch
(``StorageTracer._replay_kernel``). To plan for another CPU, set oneDNN's and ATen's own ISA
caps before torch starts (``ONEDNN_MAX_CPU_ISA``, ``ATEN_CPU_CAPABILITY``; ``dpplan estimate
--cpu-isa`` does that): the kernels, and so the probes, then choose as on that CPU.

The ops were found by running every op of the bundled and third-party zoo models for real under
the profiler (tests/planner/test_cpu_kernels.py keeps that survey as a canary): those whose
kernel allocates more than ``SURVEY_MIN_BYTES`` inside the op.
"""

from __future__ import annotations

import contextlib
import os
import platform
from typing import Any

import torch

aten = torch.ops.aten
META = torch.device("meta")

PROBED_OPS = frozenset({
    aten.convolution.default,  # oneDNN reorders + scratchpad, or ATen's im2col columns (Slow2d)
    aten.convolution_backward.default,
    aten.mkldnn_rnn_layer.default,  # oneDNN LSTM: weight reorders, bias sum, gates scratchpad
    aten.mkldnn_rnn_layer_backward.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,  # per-thread q/k blocks, bf16 packing
    aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
    aten.native_layer_norm.default,
    aten.native_layer_norm_backward.default,
    aten.native_batch_norm.default,
    aten.native_batch_norm_backward.default,
    aten.native_group_norm.default,
    aten.native_group_norm_backward.default,
    aten.embedding_dense_backward.default,  # a contiguous copy of the gradient
    aten._safe_softmax.default,  # the -inf mask and its row reduction
    # contiguous copies of strided inputs, scans' and sorts' scratch (wav2vec2's transposed
    # convolution features, MoE routers' sort and cumsum)
    aten.gelu_backward.default,
    aten._softmax_backward_data.default,
    aten._log_softmax_backward_data.default,
    aten._weight_norm_interface_backward.default,
    aten.cumsum.default,
    aten.sort.default,
    aten.sort.stable,
})

LOW_PRECISION_MATMULS = frozenset({aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default})
"""bf16/fp16 matrix products: on CPUs with AVX512-BF16 or AMX they run in oneDNN, which packs
its operands into buffers of its own (fp32 products run in MKL/OpenBLAS without any)."""

MIXED_DTYPE_OPS = frozenset({
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.where.self,
})
"""Elementwise ops whose CPU kernel converts an operand of another float dtype into a temporary
first (a bf16 attention output added to an fp32 residual under autocast)."""

LOW_PRECISION_REDUCTIONS = frozenset({aten.mean.dim, aten.sum.dim_IntList, aten.mean.default, aten.sum.default})
"""Reductions of bf16, fp16, bool or integer tensors, which the CPU kernel may run on a copy of
the input in the accumulation dtype (autocast's fp32 ``mean``; a mask's ``sum``)."""

PROBE_MAX_FLOPS = 2e10
"""Matrix products larger than this at the plan's batch are not run for real (about a second on
one core); the plan says so."""


def needs_probe(func, args: tuple) -> bool:
    """Whether this call's in-op buffers are measured (its kernel may allocate beyond its outputs)."""
    if func in PROBED_OPS:
        return True
    if func in LOW_PRECISION_MATMULS:
        return any(isinstance(a, torch.Tensor) and a.dtype in (torch.bfloat16, torch.float16) for a in args[:3])
    if func in LOW_PRECISION_REDUCTIONS:
        return isinstance(args[0], torch.Tensor) and args[0].dtype not in (torch.float32, torch.float64)
    if func in MIXED_DTYPE_OPS:
        dtypes = {a.dtype for a in args[:3] if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dim()}
        return len(dtypes) > 1
    return False


def _matmul_flops(func, args: tuple) -> float:
    if func not in LOW_PRECISION_MATMULS:
        return 0.0
    a, b = (args[1], args[2]) if func in (aten.addmm.default, aten.baddbmm.default) else (args[0], args[1])
    batch = a.shape[0] if a.dim() == 3 else 1
    return 2.0 * batch * a.shape[-2] * a.shape[-1] * b.shape[-1]


CPU_RANK_THREADS = int(os.environ.get("OMP_NUM_THREADS", "1") or 1)
"""Threads of one CPU rank: torchrun sets OMP_NUM_THREADS=1 for each process it starts
(torch/distributed/run.py), and dpplan's CPU runs do the same; scratchpads are per thread."""

PROBE_MAX_BYTES = 256 * 2**20
"""Inputs larger than this at micro-batch 2 are not run for real (the op is planned without its
in-op buffers, and the plan says so): the CPU target is for runs that fit a CPU."""

SURVEY_MIN_BYTES = 64
"""In-op allocations below this are ignored by the survey: wrapped Python scalars (12 bytes)."""

class ProbeSkipped(Exception):
    """A probed op could not be run for real; its message says why (for the plan's notes)."""


def cpu_description() -> str:
    """This CPU's instruction sets and those its kernels are planned for (``--cpu-isa``)."""
    from dpplan.planner import cpu_isa

    has = [name for name, supported in (
        ("AVX2", torch.cpu._is_avx2_supported), ("AVX-512", torch.cpu._is_avx512_supported),
        ("AVX512-BF16", torch.cpu._is_avx512_bf16_supported), ("AMX", torch.cpu._is_amx_tile_supported),
    ) if supported()]
    kernels = f"ATen {torch.backends.cpu.get_cpu_capability()}"
    if torch.backends.mkldnn.is_available():
        kernels += ", oneDNN bf16 " + ("yes" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "no")
    return (
        f"{platform.machine()} with {', '.join(has) or 'no AVX2'}; kernels for {cpu_isa.active()} ({kernels}); "
        f"{CPU_RANK_THREADS} thread(s) per rank"
    )


# -- the probe ---------------------------------------------------------------------------------

_PROBED: dict[Any, list[tuple] | None] = {}


def in_op_steps(
    func, args: tuple, kwargs: dict, trace_batch_size: int, cache_key: Any, *, batch_size: int = 2
) -> list[tuple] | None:
    """The op's in-op buffers as ``StorageTracer._replay_kernel`` steps at the trace batch (None:
    it allocates its outputs and nothing else), measured at ``batch_size`` and the next batch.
    Raises ProbeSkipped when the op cannot run for real here."""
    key = None if cache_key is None else (cache_key, trace_batch_size, batch_size, CPU_RANK_THREADS)
    if key is not None and key in _PROBED:
        return _PROBED[key]
    if _has_batch_dim((args, kwargs), trace_batch_size):
        # oneDNN may pick another implementation at batch 1 than at 2 (other buffers), so the
        # fit is anchored at the plan's batch, where it is exact.
        batch_sizes = (batch_size, batch_size + 1)
        runs = [_measure(func, args, kwargs, trace_batch_size, n) for n in batch_sizes]
        steps = _fitted_steps(runs, batch_sizes, trace_batch_size)
    else:
        steps = _fitted_steps([_measure(func, args, kwargs, trace_batch_size, 1)], (), trace_batch_size)
    if key is not None:
        _PROBED[key] = steps
    return steps


def _has_batch_dim(value: Any, trace_batch_size: int) -> bool:
    if trace_batch_size < 2:
        return False  # no batch to tell apart (a tracer used without one)
    if isinstance(value, torch.Tensor):
        return any(d and d % trace_batch_size == 0 for d in value.shape)
    if isinstance(value, (list, tuple)):
        return any(_has_batch_dim(v, trace_batch_size) for v in value)
    if isinstance(value, dict):
        return any(_has_batch_dim(v, trace_batch_size) for v in value.values())
    return False


def _scale_dim(size: int, trace_batch_size: int, n: int) -> int:
    """A dim holding the trace batch ``k`` times (``size = rest * batch^k``) at batch ``n``."""
    power = 0
    while size and trace_batch_size > 1 and size % trace_batch_size == 0:
        size //= trace_batch_size
        power += 1
    return size * n**power


def _real_tensor(tensor: torch.Tensor, trace_batch_size: int, n: int) -> torch.Tensor:
    """A zero-filled CPU tensor like ``tensor`` (shape scaled to batch ``n``, same dtype, same
    memory format and broadcast dims)."""
    shape = [_scale_dim(d, trace_batch_size, n) for d in tensor.shape]
    strides = tensor.stride()
    expanded = [s == 0 and d > 1 for s, d in zip(strides, tensor.shape)]
    base_shape = [1 if e else d for d, e in zip(shape, expanded)]
    # the physical order of the dims, outermost first, as the traced tensor has them
    order = sorted(range(len(shape)), key=lambda i: (-strides[i], i))
    real = torch.empty_permuted(base_shape, order, dtype=tensor.dtype, device="cpu")
    real.zero_()
    return real.expand(shape) if any(expanded) else real


def _real_args(value: Any, trace_batch_size: int, n: int) -> Any:
    if isinstance(value, torch.Tensor):
        return _real_tensor(value, trace_batch_size, n)
    if isinstance(value, (list, tuple)):
        return type(value)(_real_args(v, trace_batch_size, n) for v in value)
    if isinstance(value, dict):
        return {k: _real_args(v, trace_batch_size, n) for k, v in value.items()}
    if isinstance(value, int) and not isinstance(value, bool):
        return _scale_dim(value, trace_batch_size, n)  # sizes passed as ints (batch_sizes, ...)
    if isinstance(value, torch.device) and value.type != "cpu":
        return torch.device("cpu")
    return value


def _input_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.untyped_storage().nbytes() if value.numel() else 0
    if isinstance(value, (list, tuple)):
        return sum(_input_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_input_bytes(v) for v in value.values())
    return 0


def _output_storages(outputs: Any) -> dict[int, int]:
    """data_ptr of each output's storage -> the output's index (as ``_replay_kernel`` counts)."""
    values = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
    found: dict[int, int] = {}
    for index, value in enumerate(values):
        if isinstance(value, torch.Tensor) and value.numel():
            found.setdefault(value.untyped_storage().data_ptr(), index)
    return found


def _measure(func, args: tuple, kwargs: dict, trace_batch_size: int, n: int) -> list[tuple]:
    """Run the op for real at batch ``n`` and read its allocations."""
    from torch.autograd import profiler as autograd_profiler
    from torch.utils._python_dispatch import _disable_current_modes

    # Grad mode stays as the trace has it (the LSTM keeps its workspace only when it is on);
    # the real inputs require no grad, so nothing is recorded.
    with _disable_current_modes(), torch.autocast("cpu", enabled=False):
        real_args = _real_args(args, trace_batch_size, n)
        real_kwargs = _real_args(kwargs, trace_batch_size, n)
        if _input_bytes((real_args, real_kwargs)) > PROBE_MAX_BYTES:
            raise ProbeSkipped(f"{func}: inputs over {PROBE_MAX_BYTES // 2**20} MiB, not run for real")
        if _matmul_flops(func, real_args) > PROBE_MAX_FLOPS:
            raise ProbeSkipped(f"{func}: over {PROBE_MAX_FLOPS:.0e} FLOPs, not run for real")
        threads = torch.get_num_threads()
        torch.set_num_threads(CPU_RANK_THREADS)
        # torch.autograd.profiler, not torch.profiler: the latter imports torch._inductor (2 s)
        # the first time it starts.
        recorder = autograd_profiler.profile(use_cpu=True, profile_memory=True, use_kineto=True)
        try:
            with quiet_stderr():
                recorder.__enter__()
                try:
                    outputs = func(*real_args, **real_kwargs)
                finally:
                    recorder.__exit__(None, None, None)
        except Exception as exc:  # the real kernel refused zero-filled inputs
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ProbeSkipped(f"{func} could not run for real: {message[:120]}") from None
        finally:
            torch.set_num_threads(threads)
        return kernel_sequence(_allocation_events(recorder.kineto_results), _output_storages(outputs))


def _allocation_events(results) -> list[tuple[int, int]]:
    """(address, bytes) of every CPU allocation (+) and free (-) in time order."""
    found: list[tuple[int, int, int]] = []
    stack = list(results.experimental_event_tree())
    while stack:
        node = stack.pop()
        fields = node.extra_fields
        if type(fields).__name__.endswith("Allocation") and fields.device.type == "cpu":
            found.append((node.start_time_ns, fields.ptr, fields.alloc_size))
        stack.extend(node.children)
    found.sort(key=lambda event: event[0])  # a stable sort: simultaneous events keep their order
    return [(ptr, size) for _, ptr, size in found]


def kernel_sequence(events: list[tuple[int, int]], output_of: dict[int, int]) -> list[tuple]:
    """The op's allocations as steps: ("+", buffer, bytes), ("-", buffer), ("out", output, bytes)
    (an allocation that is alive when the op returns, at an output's address)."""
    steps: list[list] = []
    live: dict[int, int] = {}  # ptr -> position of its "+" step
    for ptr, size in events:
        if size > 0:
            live[ptr] = len(steps)
            steps.append(["+", len(steps), size])
        elif size < 0 and ptr in live:
            steps.append(["-", steps[live.pop(ptr)][1]])
        # a free of memory from before the op (an input's) is not the op's
    for ptr, position in live.items():
        if ptr in output_of:
            steps[position] = ["out", output_of[ptr], steps[position][2]]
    return [tuple(step) for step in steps]


def _fitted_steps(sequences: list[list[tuple]], batch_sizes: tuple[int, ...], trace_batch_size: int) -> list[tuple] | None:
    """Replay steps at the trace batch from the sequences measured at ``batch_sizes`` (none: the
    op has no batch dim): each buffer a constant part and a part proportional to the batch
    (fitted), one storage each.

    Kernels whose sequences differ in shape between the two batches (a loop that allocates a
    block per iteration: flash attention's bf16 backward) are first reduced to their segments
    (``_segments``); kernels whose outputs are born in another order keep the plan's batch only."""
    if not any(step[0] != "out" for sequence in sequences for step in sequence):
        return None  # the op allocates its outputs and nothing else
    shapes = {tuple(step[:2] for step in sequence) for sequence in sequences}
    if len(shapes) > 1:
        sequences = [_segments(sequence) for sequence in sequences]
        if len({tuple(step[:2] for step in sequence) for sequence in sequences}) > 1:
            sequences, batch_sizes = sequences[:1], batch_sizes[:1]
    steps: list[tuple] = []
    for position, step in enumerate(sequences[0]):
        kind, ident = step[0], step[1]
        if kind == "out":
            steps.append(("out", ident))
        elif kind == "-":
            steps += [("-", f"{ident}c"), ("-", f"{ident}b")]
        else:
            constant, per_sample = _linear([sequence[position][2] for sequence in sequences], batch_sizes)
            steps += [("+", f"{ident}c", constant), ("+", f"{ident}b", per_sample * trace_batch_size)]
    return steps


def _segments(sequence: list[tuple]) -> list[tuple]:
    """The sequence reduced to what a peak depends on: between consecutive outputs, how far the
    op's buffers rise above their level (one buffer, born and freed) and the level they leave
    (one buffer that replaces the previous level's). A loop of alike blocks becomes one rise."""
    steps: list[tuple] = []
    level = start = peak = 0
    sizes: dict[Any, int] = {}
    segment = 0

    def close() -> None:
        steps.extend([("+", f"rise{segment}", peak - start), ("-", f"rise{segment}")])
        if segment:
            steps.append(("-", f"level{segment - 1}"))
        steps.append(("+", f"level{segment}", level))

    for step in sequence:
        if step[0] == "out":
            close()
            steps.append(step)
            segment += 1
            start = peak = level
        elif step[0] == "+":
            sizes[step[1]] = step[2]
            level += step[2]
            peak = max(peak, level)
        else:
            level -= sizes.pop(step[1])
    close()
    return steps


def _linear(sizes: list[int], batch_sizes: tuple[int, ...]) -> tuple[int, int]:
    """(constant, per-sample) bytes of a buffer from its sizes at the probe batch sizes, exact at
    the first of them."""
    if not batch_sizes:  # no batch dim: a constant
        return sizes[0], 0
    if len(sizes) == 1:  # measured at the plan's batch only: taken as proportional to it
        per_sample, remainder = divmod(sizes[0], batch_sizes[0])
        return remainder, per_sample
    (s1, s2), (n1, n2) = sizes, batch_sizes
    per_sample = (s2 - s1) // (n2 - n1)
    constant = s1 - per_sample * n1
    if per_sample < 0 or constant < 0:
        # Not linear (a block choice that changed): the plan's batch keeps its exact size.
        per_sample, constant = 0, s1
    return constant, per_sample


@contextlib.contextmanager
def quiet_stderr():
    """Kineto prints a line to the process's stderr each time a profiler starts and stops
    ("USDT: ... profiler_start"), whatever its log level; a plan's output must not show it."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# -- outputs whose meta kernel differs from the CPU kernel ---------------------------------------
# Unlike in-op buffers, outputs live on after the op, so they must have their true size and dtype
# from the start. The rules below are derived from the kernels' code (cited) and compared with
# the real kernels in tests/planner/test_cpu_kernels.py.

def _onednn_good_ld(dim: int, itemsize: int) -> int:
    """oneDNN src/cpu/rnn/rnn_utils.cpp ``get_good_ld``: round up to 64 bytes, and one more
    64-byte block when the result is a multiple of 256 elements (4K aliasing)."""
    block = 64 // itemsize
    ld = -(-dim // block) * block
    return ld + block if ld % 256 == 0 else ld


def onednn_lstm_workspace_bytes(seq_len: int, batch: int, input_size: int, hidden: int) -> int:
    """Bytes of the training workspace oneDNN's f32 LSTM forward hands to its backward, for one
    layer and one direction (``mkldnn_rnn_layer`` runs once per layer and direction).

    aten/src/ATen/native/mkldnn/RNN.cpp ``mkldnn_rnn_layer`` allocates it as
    ``at::empty(pd.workspace_desc().get_size(), kByte)`` when ``train``; the size is oneDNN's
    (v3, src/cpu/rnn/rnn_utils.hpp ``init_conf`` leading dimensions and
    ``set_workspace_sizes``, rnn_utils.cpp ``set_offsets``), with n_layer = n_dir = 1:
    gates T*N*ld(4H), h_t T*N*ld(H), states (T+1)*N*ld(max(I,H)) and c states (T+1)*N*H for
    the two "layer+1" slots, and the same three for their gradients; all f32.

    oneDNN starts each part on a 4096-byte page and the total is page-rounded; that padding
    (under 8 pages) is left out, so the size stays proportional to the batch (the tracer's
    batch scaling needs that): at batch 2 this is 0.3% under the real 4,096,000 bytes of a
    256-wide LSTM over 128 steps.
    """
    t, n = seq_len, batch
    states_ld = _onednn_good_ld(max(input_size, hidden), 4)
    gates = t * n * _onednn_good_ld(4 * hidden, 4)
    h_t = t * n * _onednn_good_ld(hidden, 4)
    states = 2 * (t + 1) * n * (states_ld + hidden)  # h/x states (good ld) and c states
    diff_states = 2 * (t + 1) * n * (2 * states_ld + hidden)  # d layer, d iter, d c
    return 4 * (gates + h_t + states + diff_states)


_ONEDNN_LSTM = 2  # ideep::rnn_kind::LSTM, the only mode ATen sends to mkldnn_rnn_layer


def _mkldnn_rnn_layer_workspace(args, result):
    """``mkldnn_rnn_layer``'s meta kernel returns an empty workspace (torch/_meta_registrations.py)."""
    input, w0 = args[0], args[1]
    mode, hidden, train = args[9], args[10], args[15]
    if not train or mode != _ONEDNN_LSTM or input.dtype != torch.float32:
        return result  # bf16 LSTMs need avx512_bf16: not modelled (kept at the meta size)
    # ATen's mkldnn_rnn transposes a batch-first input before this op, whose kernel reads
    # (seq, batch, features) whatever its batch_first argument says (RNNParams).
    seq_len, batch = input.shape[0], input.shape[1]
    nbytes = onednn_lstm_workspace_bytes(seq_len, batch, w0.shape[1], hidden)
    output, hy, cy, _ = result
    return output, hy, cy, torch.empty(nbytes, dtype=torch.uint8, device=META)


# -- CPU kernels whose outputs differ from the meta kernel's -----------------------------------
# Meta kernels keep normalization statistics in the accumulation dtype (fp32 for bf16/fp16
# inputs), as CUDA does. The CPU kernels keep them in the input dtype unless the weight is fp32
# ("mixed type"): aten/src/ATen/native/layer_norm.cpp (layer_norm_cpu: mean/rstd use
# param_scalar_type(input, mixed_type)) and native/Normalization.cpp (batch_norm_cpu).
_CPU_STATISTICS_OPS = {aten.native_layer_norm.default, aten.native_batch_norm.default}
_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _cpu_output_dtypes(func, args, result):
    input_ = args[0]
    weight = args[2] if func is aten.native_layer_norm.default else args[1]
    if input_.dtype not in _LOW_PRECISION:
        return result
    mixed = weight is not None and weight.dtype == torch.float32
    stats_dtype = torch.float32 if mixed else input_.dtype
    output, *stats = result
    return (output, *(s if s.dtype == stats_dtype else torch.empty_like(s, dtype=stats_dtype) for s in stats))


# -- in-op buffers of kernels that cannot run on zeros ----------------------------------------
# A probe runs the kernel on zero-filled inputs; a kernel whose work is set by the values of its
# inputs (sequence lengths) would do nothing there. Its buffers come from its code instead.


def _ctc_loss_backward_steps(args: tuple) -> list[tuple]:
    """aten/src/ATen/native/LossCTC.cpp ``ctc_loss_backward_cpu_template``: ``log_beta``, shaped
    like the forward's ``log_alpha`` (args[6]), is allocated before the gradient and freed when
    the op returns."""
    log_alpha = args[6]
    return [("+", "log_beta", log_alpha.untyped_storage().nbytes()), ("out", 0), ("-", "log_beta")]


RULED_OPS = {
    aten._ctc_loss_backward.Tensor: _ctc_loss_backward_steps,
    aten._ctc_loss_backward.default: _ctc_loss_backward_steps,
}


def corrected_outputs(func, args: tuple, result: Any) -> Any:
    """``result`` of the meta kernel with the outputs a CPU kernel returns instead."""
    if func in _CPU_STATISTICS_OPS:
        result = _cpu_output_dtypes(func, args, result)
    if func is aten.mkldnn_rnn_layer.default:
        result = _mkldnn_rnn_layer_workspace(args, result)
    return result


CORRECTED_OPS = frozenset(_CPU_STATISTICS_OPS | {aten.mkldnn_rnn_layer.default})
