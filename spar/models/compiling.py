"""``torch.compile`` of a backbone's transformer blocks, for images of any size.

A backbone's forward is two stages (see :class:`spar.models.base.DenseBackbone`): ``embed``
(patch embedding and position encoding; its shape arithmetic depends on the patch grid, and the
resampled position tables are cached per grid) and ``run_blocks`` (the transformer blocks and the
dense head, on a token sequence). Only ``run_blocks`` is compiled, with ``dynamic=True``: its
code never branches on the sequence length, so one graph serves every image size and batch size
above one (batch 1 gets its own graph, as PyTorch specialises sizes 0 and 1). Compiling the
whole forward instead recompiles at every new grid, and after ``torch._dynamo``'s recompile limit
(8) silently runs eagerly.

The setting is spelled ``compile`` everywhere: ``false``, ``true`` (PyTorch's default mode),
``reduce-overhead`` (CUDA graphs; one graph is recorded per input shape) or ``max-autotune``
(searches kernels; slow to compile).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from ..timing import timed_call

COMPILE_MODES = ("reduce-overhead", "max-autotune")
CompileSetting = bool | str


def check_compile_setting(setting: Any, key: str = "compile") -> None:
    """Raise ``ValueError`` unless ``setting`` is ``True``, ``False`` or one of
    :data:`COMPILE_MODES` (``key`` names the setting in the message)."""
    if not (isinstance(setting, bool) or setting in COMPILE_MODES):
        raise ValueError(f"{key} must be true, false or one of {COMPILE_MODES}, got {setting!r}")


def compile_mode(setting: CompileSetting) -> str | None:
    """The ``mode=`` argument of ``torch.compile`` for a compile setting that is not ``False``."""
    check_compile_setting(setting)
    return None if setting is True else setting


class CompiledBlocks:
    """A compiled ``run_blocks`` that times its first call at each input shape.

    The first call at a shape includes the compilation when one happens (the first shape, batch
    1 against larger batches, a change of grad mode, dtype or device); later calls at that shape
    are not timed. A deep copy of a backbone (the teacher's low-precision copy) does not carry
    the compiled function: the copy runs eagerly.

    Args:
        run_blocks: the backbone's bound ``run_blocks``.
        setting: ``True`` or one of :data:`COMPILE_MODES`.
        backend: ``torch.compile``'s backend: ``"inductor"``, or another name or a backend
            function (tests use ones that capture graphs without generating code).
    """

    def __init__(
        self,
        run_blocks: Callable[..., torch.Tensor],
        setting: CompileSetting,
        backend: str | Callable = "inductor",
    ) -> None:
        if setting is False:
            raise ValueError("CompiledBlocks needs compile true or a mode, got false")
        self.setting = setting
        self.backend = backend
        self.function = torch.compile(
            run_blocks, mode=compile_mode(setting), dynamic=True, backend=backend
        )
        self.run_blocks = run_blocks
        self.first_calls: dict[tuple, float] = {}

    def __call__(self, *inputs: torch.Tensor | None) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # Traced by an outer compile (``teacher.compile`` over the same backbone): it
            # compiles the blocks itself; timing here would only break its graph.
            return self.run_blocks(*inputs)
        key = (tuple(inputs[0].shape), inputs[0].dtype, str(inputs[0].device))
        key += (torch.is_grad_enabled(),)
        if key in self.first_calls:
            return self.function(*inputs)
        output, self.first_calls[key] = timed_call(
            partial(self.function, *inputs), inputs[0].device
        )
        return output

    def __deepcopy__(self, memo: dict) -> None:
        return None

    def report(self, slowest: int = 8) -> dict[str, Any]:
        """JSON-ready: ``{"compile", "backend", "shapes", "first_call_seconds_total",
        "slowest_first_calls": [{"tokens": [B, N, D], "dtype", "device", "grad", "seconds"}]}``,
        the ``slowest`` first calls (those that compiled), slowest first."""
        calls = sorted(self.first_calls.items(), key=lambda item: -item[1])[:slowest]
        return {
            "compile": self.setting,
            "backend": self.backend if isinstance(self.backend, str) else repr(self.backend),
            "shapes": len(self.first_calls),
            "first_call_seconds_total": round(sum(self.first_calls.values()), 4),
            "slowest_first_calls": [
                {
                    "tokens": list(shape),
                    "dtype": str(dtype).removeprefix("torch."),
                    "device": device,
                    "grad": grad,
                    "seconds": round(seconds, 4),
                }
                for (shape, dtype, device, grad), seconds in calls
            ],
        }


def describe_compile_report(report: dict[str, Any] | None) -> str | None:
    """One line for a log: ``None`` for an eager backbone."""
    if report is None:
        return None
    worst = ""
    if report["slowest_first_calls"]:
        slowest = report["slowest_first_calls"][0]
        worst = f"; slowest {slowest['seconds']:.1f} s at tokens {slowest['tokens']}"
    return (
        f"compile={report['compile']}: {report['shapes']} input shapes, first calls (compilation "
        f"included) {report['first_call_seconds_total']:.1f} s in all{worst}"
    )


def compile_backbone(
    backbone: Any, setting: CompileSetting = True, backend: str | Callable = "inductor"
):
    """Compile ``backbone``'s transformer blocks in place (``setting`` ``False``: leave it eager)
    and return it.

    State-dict keys, parameters and every other method are unchanged; compile *after* building
    copies of the backbone (a teacher's low-precision copy runs eagerly either way).
    :func:`compile_report` gives the first-call times.
    """
    check_compile_setting(setting)
    backbone.compiled_blocks = (
        CompiledBlocks(backbone.run_blocks, setting, backend) if setting else None
    )
    return backbone


def compile_report(backbone: Any) -> dict[str, Any] | None:
    """:meth:`CompiledBlocks.report` of a compiled backbone, ``None`` for an eager one."""
    compiled = getattr(backbone, "compiled_blocks", None)
    return compiled.report() if compiled is not None else None


def check_compile_target(setting: Any, features: str) -> CompileSetting:
    """``setting`` checked for a run whose dense features come from ``features`` (``student`` or
    ``teacher``): the ``compile`` setting compiles the student's single pass, so with teacher
    features it would compile nothing that runs; the teacher's switch is ``teacher.compile``."""
    check_compile_setting(setting)
    if setting and features == "teacher":
        raise ValueError(
            f"compile={setting!r} compiles the student's single pass, but features=teacher: "
            "use teacher.compile to compile the sliding-window teacher's window forward"
        )
    return setting
