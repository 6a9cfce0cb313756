"""How a model runs: :class:`InferenceSettings`, the one object that ``faceattrs predict``,
``faceattrs serve`` and :class:`faceattrs.FaceAnalyzer` build, and that checks itself.

Every rule between backend, dtype, device, threads, streams, batch size and photo workers
is here, checked once when the settings are made (also by :func:`dataclasses.replace`):
one line (:class:`~faceattrs.exceptions.FaceattrsError`) for a bad combination, naming
the command-line option when the settings come from one (``options=True``), the keyword
otherwise.

>>> InferenceSettings(dtype="int8").backend  # int8 runs on onnxruntime
'onnx'
>>> InferenceSettings(backend="torch", dtype="int8")
Traceback (most recent call last):
...
faceattrs.exceptions.FaceattrsError: int8 runs on the onnx backend (backend='onnx', --backend onnx)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .exceptions import FaceattrsError
from .photo.config import PhotoConfig

BACKENDS = ("torch", "onnx")
DTYPES = ("fp32", "bf16", "int8")
TORCH_DTYPES = ("fp32", "bf16")
PHOTO_WORKERS = ("auto", "threads", "processes")


def _whole(value) -> bool:
    """A whole number of at least 1 (``True`` is not one)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass
class InferenceSettings:
    backend: str | None = None  # torch or onnx; None: onnx for int8, torch else
    dtype: str = "fp32"  # fp32, bf16 (torch autocast) or int8 (an int8 ONNX export)
    device: str = "cpu"  # torch device; the onnx backend runs on the CPU
    threads: int | None = None  # CPU threads of each model call (None: see FaceAnalyzer)
    streams: int | None = None  # model calls run at once (None: two on a multi-core CPU)
    batch_size: int = 64  # faces per model call
    photo_workers: str = "auto"  # decode and detect in threads, processes, or auto
    photo: PhotoConfig = field(default_factory=PhotoConfig)  # detection and crop settings
    age: bool = True  # run the bundle's age model when it has one
    options: bool = field(default=False, repr=False, compare=False)  # errors name CLI options

    def __post_init__(self):
        self.photo = self.photo or PhotoConfig()
        if self.photo_workers not in PHOTO_WORKERS:
            raise FaceattrsError(
                f"photo_workers must be one of {', '.join(PHOTO_WORKERS)}, "
                f"got {self.photo_workers!r}"
            )
        if self.batch_size < 1:
            name = "--batch-size" if self.options else "batch size"
            raise FaceattrsError(f"{name} must be at least 1, got {self.batch_size}")
        for name, value in (("threads", self.threads), ("streams", self.streams)):
            if value is None or _whole(value):
                continue
            if self.options:
                raise FaceattrsError(
                    f"--{name} must be at least 1, got {value} (leave it out to use all)"
                )
            raise FaceattrsError(f"{name} must be a whole number of at least 1, got {value!r}")
        self._check_backend()

    def _check_backend(self) -> None:
        implied = self.backend is None
        if implied:
            self.backend = "onnx" if self.dtype == "int8" else "torch"
        if self.backend not in BACKENDS:
            raise FaceattrsError(
                f"unknown backend {self.backend!r}; use one of {', '.join(BACKENDS)}"
            )
        if self.options:
            self._check_options(implied)
        elif self.dtype == "int8" and self.backend != "onnx":
            raise FaceattrsError("int8 runs on the onnx backend (backend='onnx', --backend onnx)")
        elif self.backend == "onnx" and self.dtype != "fp32" and self.dtype != "int8":
            raise FaceattrsError(f"the onnx backend runs fp32 or int8 graphs, not {self.dtype!r}")
        elif self.backend == "torch" and self.dtype not in TORCH_DTYPES:
            raise FaceattrsError(
                f"unknown dtype {self.dtype!r}; use one of {', '.join(TORCH_DTYPES)}"
            )
        elif self.backend == "onnx" and str(self.device) != "cpu":
            raise FaceattrsError(f"the onnx backend runs on the CPU, not {self.device!r}")

    def _check_options(self, implied: bool) -> None:
        """The same rules, each naming the command-line options."""
        if self.dtype not in DTYPES:
            raise FaceattrsError(f"--dtype must be fp32, bf16 or int8, got {self.dtype!r}")
        if self.backend == "torch":
            if self.dtype == "int8":
                raise FaceattrsError(
                    "--dtype int8 runs on the onnx backend: leave out --backend torch"
                )
        elif implied and str(self.device) != "cpu":  # --dtype int8 without --backend
            raise FaceattrsError("--dtype int8 runs on the CPU (onnxruntime): leave out --device")
        elif str(self.device) != "cpu" or self.dtype == "bf16":
            raise FaceattrsError(
                "the onnx backend runs on the CPU, in fp32 or int8 (--dtype int8); "
                "--device and --dtype bf16 are the torch backend's"
            )
