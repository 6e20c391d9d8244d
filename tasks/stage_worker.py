"""One process of a launched training stage: ``python -m tasks.stage_worker REQUEST.json``.

``accelerate launch`` starts this in every process (``tasks/launch.py`` writes the request).
It rebuilds the stage's typed inputs from JSON, runs ``run_<stage>`` and, in the main process,
writes the typed result where the request says; a data error is written there too, so the
parent raises it as the data error it is. Any other failure leaves its traceback beside the
result (``<result>.rank<N>.error``), so the parent reports the error itself rather than the
launcher's account of a failed child.
"""

from __future__ import annotations

import json
import sys
import traceback
import typing
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from pydantic import BaseModel, TypeAdapter

    from dataio import DataError
    from tasks.distributed import is_main_process, process_index
    from tasks.launch import stage_function

    (request_path,) = argv if argv is not None else sys.argv[1:]
    request = json.loads(Path(request_path).read_text())
    fn = stage_function(request["stage"])
    hints = typing.get_type_hints(fn)
    inputs = {k: TypeAdapter(hints[k]).validate_python(v) for k, v in request["inputs"].items()}
    out = Path(request["result_path"])
    try:
        result = fn(**inputs)
    except DataError as e:
        if is_main_process():
            _write(out, {"data_error": {"uri": e.uri, "message": e.message, "rule": e.rule,
                                        "row": e.row}})
        return 2
    except BaseException:
        out.with_name(f"{out.name}.rank{process_index()}.error").write_text(traceback.format_exc())
        raise
    finally:
        _leave_process_group()
    if is_main_process():
        if not isinstance(result, BaseModel):
            raise TypeError(f"{request['stage']}: the main process returned {result!r}")
        _write(out, {"result": result.model_dump(mode="json")})
    return 0


def _leave_process_group() -> None:
    """Tear down this process's part of the process group before the interpreter exits. A
    process that exits with it still up can abort in gloo's destructor at shutdown
    ("terminate called without an active exception", SIGABRT), and the launcher then stops
    the other processes and reports the stage as failed: 2 of about 15 launched SFT runs in
    ``tests/test_multigpu.py`` did so, rank 1 both times, after its last evaluation step.
    Local to this process (no collective), so it is safe on the error paths too."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _write(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    tmp.replace(path)  # the parent never reads half a result


if __name__ == "__main__":
    sys.exit(main())
