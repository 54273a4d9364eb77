"""The one dispatch point between the Triton kernels and the PyTorch references, and the facts
about the target that the launch configurations depend on.

`backend="auto"` picks Triton for CUDA tensors and the reference otherwise;
`"triton"` on CPU tensors is allowed only under Triton's interpreter
(`TRITON_INTERPRET=1` set before `kernels` is imported), which is how the CPU test-suite
exercises the kernels.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass

import torch
import triton.language as tl

BACKENDS = ("auto", "triton", "torch")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
POINT_DTYPES = (torch.float32, torch.float64)


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


# Triton decides at decoration time (when the kernel modules are imported) whether a kernel runs
# compiled or in the interpreter; the environment is read once here, beside those imports.
INTERPRETER_AT_IMPORT = _interpret_env()


def _mend_interpreter_index() -> bool:
    """Triton's interpreter passes a scalar kernel argument as a 1-element array, and a loop
    `range(0, C, BLOCK)` over it calls the tensor's `__index__`. Up to at least triton 3.6 that is
    `int(data)`, which numpy >= 2.4 refuses ("only 0-dimensional arrays can be converted to Python
    scalars"): every kernel fails in the interpreter. Later tritons squeeze first; this does the same
    for the older ones. Applied only where that exact line is in the installed interpreter; returns
    whether it was."""
    import inspect

    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    try:
        buggy = original is not None and "int(self.handle.data))" in inspect.getsource(original)
    except (OSError, TypeError):
        buggy = False
    if not buggy:
        return False

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_lang_tensor
    return True


if INTERPRETER_AT_IMPORT:
    _mend_interpreter_index()


def triton_interpreter_enabled() -> bool:
    """True when the kernels were decorated for Triton's CPU interpreter."""
    return INTERPRETER_AT_IMPORT


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map `auto|triton|torch` to the implementation that will run on `device`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        # on a GPU the compiled kernels, except where they cannot run compiled: kernels decorated for the
        # interpreter (TRITON_INTERPRET=1 at import), or a ROCm build (the kernels target NVIDIA)
        compiled = device.type == "cuda" and not INTERPRETER_AT_IMPORT and not torch.version.hip
        return "triton" if compiled else "torch"
    if backend == "triton" and device.type == "cuda" and torch.version.hip:
        raise ValueError("backend='triton': the kernels are built and checked for NVIDIA GPUs (their fp32 dot "
                         "precision and shared-memory table are NVIDIA's); on ROCm use backend='torch'")
    if backend == "triton" and device.type != "cuda":
        if INTERPRETER_AT_IMPORT:
            return backend
        if _interpret_env():
            raise RuntimeError(
                "backend='triton' on CPU: TRITON_INTERPRET=1 was set after `kernels` was imported, so the kernels "
                "were built for a GPU; set it before the first `import kernels` (e.g. on the command line: "
                "TRITON_INTERPRET=1 python ...)"
            )
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got {device}); on CPU use backend='torch' "
            "or set TRITON_INTERPRET=1 before importing `kernels` to run the kernels in Triton's interpreter"
        )
    if backend == "triton" and INTERPRETER_AT_IMPORT:
        # interpreted kernels on CUDA tensors would copy every tensor to the host and back
        raise RuntimeError("backend='triton' on CUDA tensors, but TRITON_INTERPRET=1 built the kernels for the CPU "
                           "interpreter; unset it to run them compiled")
    return backend


def device_guard(device: torch.device):
    """Context for a kernel launch: Triton launches on the *current* CUDA device and its stream, not on
    the tensors' device, so make the tensors' device current (tensors on cuda:1 with cuda:0 current
    would otherwise run on the wrong GPU)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


_FITTING: dict = {}  # (kernel, target, tensor dtypes, configs) -> the config that fits


def launch(kernel, grid, args, configs: list[dict], device: torch.device) -> None:
    """Every kernel launch of the host wrappers: `kernel[grid](*args, **config)` on `device`
    (`device_guard`) with the first of `configs` (fastest first, each one kernel's constexprs and launch
    options; the sampling kernels have one) whose build fits the target's shared memory per block. The
    compiler's own figure decides (it is hard to predict: e.g. fp32 3xTF32 dots stage both halves of
    each operand), so on a GPU the configs are built in turn until one fits, once per kernel, target
    and dtypes; under the interpreter (no limit) the first runs. A config trades speed
    only, never accuracy: none lowers the dot precision. When none fits, a RuntimeError says what
    each needs and what to change."""
    tgt = target(device)
    with device_guard(device):
        config = configs[0]
        if len(configs) > 1 and tgt.shared_bytes < _INTERPRETER_TARGET.shared_bytes:
            key = (_kernel_name(kernel), tgt,
                   tuple(a.dtype for a in args if isinstance(a, torch.Tensor)), repr(configs))
            if key not in _FITTING:
                _FITTING[key] = _first_fitting(kernel, grid, args, configs, tgt)
            config = _FITTING[key]
        kernel[grid](*args, **config)


def _kernel_name(kernel) -> str:
    """A @triton.jit kernel's name (or a stand-in's: kernels.aot's, the tests')."""
    inner = getattr(kernel, "fn", None)
    return getattr(kernel, "__name__", None) or getattr(inner, "__name__", None) or type(kernel).__name__


def _first_fitting(kernel, grid, args, configs: list[dict], tgt: Target) -> dict:
    needs = []
    for config in configs:
        compiled = kernel.warmup(*args, grid=grid, **config)  # a build, no launch (nor the launch-time limit check)
        compiled = compiled.result() if hasattr(compiled, "result") else compiled  # triton's async compile mode
        shared = int(compiled.metadata.shared)
        if shared <= tgt.shared_bytes:
            return config
        needs.append(shared)
    raise RuntimeError(
        f"{_kernel_name(kernel)}: no launch configuration fits sm_{tgt.arch}'s {tgt.shared_bytes} B of shared "
        f"memory per block (the {len(configs)} tried need {', '.join(map(str, needs))} B): the tiles grow with "
        "the number of sampling points and channels; train in bf16/fp16 (hardware precision), use fewer points, "
        "or backend='torch'")


def check_inputs(op: str, **tensors: torch.Tensor) -> None:
    """Same device and a floating dtype for every tensor of one op, or a ValueError naming them."""
    items = list(tensors.items())
    for name, t in items:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{op}: {name} must be float16/bfloat16/float32/float64, got {t.dtype}")
    name0, t0 = items[0]
    for name, t in items[1:]:
        if t.device != t0.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {name0} is on {t0.device}; move them to one device")


def check_same_dtype(op: str, **tensors: torch.Tensor) -> None:
    items = list(tensors.items())
    name0, t0 = items[0]
    for name, t in items[1:]:
        if t.dtype != t0.dtype:
            raise ValueError(f"{op}: {name} is {t.dtype} but {name0} is {t0.dtype}; cast them to one dtype")


def check_points(op: str, points: torch.Tensor, features: torch.Tensor) -> None:
    """Sampling coordinates are fp32 (fp64 with an fp64 map): a 16-bit coordinate would be quantised
    (bf16 resolves 1/256 of the image near its far edge, coarser than a pixel of a 56-pixel map)."""
    if points.dtype not in POINT_DTYPES:
        raise ValueError(f"{op}: points are {points.dtype}; sampling coordinates must be float32 (or float64), "
                         "16-bit coordinates would be quantised: pass points.float()")
    if (features.dtype == torch.float64) != (points.dtype == torch.float64):
        raise ValueError(f"{op}: points are {points.dtype} but features are {features.dtype}; float64 maps take "
                         "float64 points and the other way round: cast them to one precision")


def empty_output(shape, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate a buffer that a kernel must write in full.

    Every kernel output goes through this one function so the tests can swap it for a
    NaN-filled allocation and catch elements a kernel leaves unwritten.
    """
    return torch.empty(shape, dtype=dtype, device=device)


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The torch dtype of gradient accumulators and bias partials: fp64 for fp64, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def compute_dtype(*tensors: torch.Tensor):
    """Triton accumulation dtype: fp64 inputs stay fp64 (so gradcheck runs on the kernels), the rest fp32."""
    return tl.float64 if any(t.dtype == torch.float64 for t in tensors) else tl.float32


def dot_dtype(dtype: torch.dtype):
    """Operand dtype of `tl.dot`: 16-bit tiles go to the tensor cores as they are on a GPU; under the
    interpreter they are upcast first (its bf16 arithmetic and dots are wrong)."""
    if dtype == torch.float64:
        return tl.float64
    if dtype in (torch.float16, torch.bfloat16) and not INTERPRETER_AT_IMPORT:
        return tl.bfloat16 if dtype == torch.bfloat16 else tl.float16
    return tl.float32


def dot_precision(dtype: torch.dtype) -> str:
    """fp64: exact fp64 dots. fp16/bf16: exact (their products fit fp32). fp32: torch's own knob —
    TF32 where the user opted into it (torch.set_float32_matmul_precision("high"/"medium")); at
    "highest", 3xTF32 on a GPU (three TF32 products: fp32 accuracy on the tensor cores; Triton's IEEE
    fp32 dot is an FMA loop that spills 10+ KB per thread at these tiles, `python -m kernels.aot`),
    exact under the interpreter."""
    if dtype == torch.float32:
        if torch.get_float32_matmul_precision() != "highest":
            return "tf32"
        if not INTERPRETER_AT_IMPORT:
            return "tf32x3"
    return "ieee"


def check_deterministic(op: str) -> None:
    """As ATen's `alert_not_deterministic`: an error (a warning with warn_only=True) under
    `torch.use_deterministic_algorithms(True)`, for ops whose float atomics make the result depend
    on the order in which programs run."""
    if not torch.are_deterministic_algorithms_enabled():
        return
    msg = (f"{op} does not have a deterministic implementation (the feature-map gradient is accumulated with "
           "atomic adds), but you set 'torch.use_deterministic_algorithms(True)'. Use backend='torch' for this "
           "model, or torch.use_deterministic_algorithms(True, warn_only=True) to accept it; everything else "
           "these kernels compute is reproducible run to run.")
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(msg, stacklevel=3)
    else:
        raise RuntimeError(msg)


# ----------------------------------------------------------------------------- target facts
@dataclass(frozen=True)
class Target:
    """What the launch configurations depend on: the compute capability and the shared memory one
    block may use (the opt-in maximum, which Triton requests for kernels that need it)."""

    arch: int
    shared_bytes: int


# Opt-in shared memory per block, by compute capability (CUDA C programming guide, "Compute
# capabilities"): A100 163 KB, RTX 30xx/40xx, A10, L4, L40S 99 KB, H100/H200 227 KB.
SHARED_BYTES = {70: 96 * 1024, 75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024,
                90: 227 * 1024}
_INTERPRETER_TARGET = Target(arch=0, shared_bytes=1 << 30)
_override: Target | None = None


def target_for_arch(arch: int) -> Target:
    if arch not in SHARED_BYTES:
        raise ValueError(f"unknown CUDA arch sm_{arch}; known: {sorted(SHARED_BYTES)}")
    return Target(arch, SHARED_BYTES[arch])


def target(device: torch.device) -> Target:
    """The target the kernels are built for on `device`: the interpreter (no limits), an ahead-of-time
    build (`use_target`), or the CUDA device's own properties."""
    if _override is not None:
        return _override
    if device.type != "cuda":
        return _INTERPRETER_TARGET
    major, minor = torch.cuda.get_device_capability(device)
    arch = 10 * major + minor
    props = torch.cuda.get_device_properties(device)
    shared = getattr(props, "shared_memory_per_block_optin", None) or SHARED_BYTES.get(arch, 99 * 1024)
    return Target(arch, int(shared))


@contextlib.contextmanager
def use_target(t: Target):
    """Pick launch configurations for `t` instead of the current device (kernels.aot)."""
    global _override
    previous, _override = _override, t
    try:
        yield t
    finally:
        _override = previous
