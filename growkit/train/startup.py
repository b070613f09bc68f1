"""The one line for an `Accelerator` that cannot be built.

Why: every ValueError/RuntimeError from accelerate's start-up used to be reported as "--mixed-precision X is not
available here", also with `--mixed-precision no` and for problems that have nothing to do with precision (a bad
ACCELERATE_* variable, a launcher's configuration). Accelerate's own precision refusals all say "precision".
"""

from __future__ import annotations

from growkit.errors import GrowkitError


def accelerator_error(exc: BaseException, mixed_precision: str) -> GrowkitError:
    """`--mixed-precision X is not available here: ...` when it is about precision, else what accelerate said."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    first = lines[0] if lines else type(exc).__name__
    if mixed_precision != "no" and "precision" in first.lower():
        return GrowkitError(f"--mixed-precision {mixed_precision} is not available here: {first}")
    return GrowkitError(f"accelerate cannot set up this process (check the launcher and ACCELERATE_* settings): "
                        f"{type(exc).__name__}: {first}")
