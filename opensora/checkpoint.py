"""Read published checkpoints as they are, load them into Cells, and save without ever
leaving a truncated file behind.

Formats read: `.safetensors` (single or sharded with `*.index.json`), PyTorch's zip format
(`.pth`, `.bin`, `.pt`) read WITHOUT torch and without running pickled code (only tensor
rebuilding and an allow-list of globals), MindSpore `.ckpt`, and `.npz`. A folder is resolved to
the weights file (or shard index) inside it, as Hugging Face and diffusers lay them out.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import struct
import tempfile
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import mindspore as ms
import numpy as np

StateDict = dict[str, np.ndarray]
_UMASK = os.umask(0)
os.umask(_UMASK)


class CheckpointError(Exception):
    """A checkpoint could not be read or does not fit the model it is loaded into."""


# --------------------------------------------------------------------------------------------
# atomic writing


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Write to a temporary file next to `path`, fsync it, then rename it over `path`.

    A crash (or an exception in the block) leaves either the old file or none, never a
    truncated one, because the rename is the only step that makes the file visible.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp_name, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file normal permissions
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def save_npz_atomic(path: str | os.PathLike, **arrays: Any) -> None:
    """`np.savez` through `atomic_write`, for caches that resume by skipping finished files."""
    with atomic_write(path) as handle:
        np.savez(handle, **arrays)


# --------------------------------------------------------------------------------------------
# safetensors (own reader: handles bf16 without torch and reports truncation clearly)

_SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # widened to float32 after reading
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_NUMPY_TO_SAFETENSORS = {v: k for k, v in _SAFETENSORS_DTYPES.items() if k != "BF16"}


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 is the top half of a float32: shift the stored 16 bits into place."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def read_safetensors(path: str | os.PathLike) -> StateDict:
    """Read every tensor of a `.safetensors` file into numpy (bf16 becomes float32)."""
    path = Path(path)
    data = path.read_bytes()
    if len(data) < 8:
        raise CheckpointError(f"{path}: too short to be a safetensors file ({len(data)} bytes)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > len(data) - 8:
        raise CheckpointError(
            f"{path}: header claims {header_len} bytes but the file has {len(data)}; "
            "the file is truncated or not safetensors — download it again"
        )
    try:
        header = json.loads(data[8 : 8 + header_len])
    except ValueError as exc:
        raise CheckpointError(f"{path}: unreadable safetensors header ({exc})") from exc
    body = memoryview(data)[8 + header_len :]
    out: StateDict = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype_name = info.get("dtype")
        if dtype_name not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype_name}")
        start, end = info["data_offsets"]
        if end > len(body):
            raise CheckpointError(
                f"{path}: tensor {name!r} ends at byte {end} but the data section has "
                f"{len(body)} bytes; the file is truncated — download or save it again"
            )
        array = np.frombuffer(body[start:end], dtype=_SAFETENSORS_DTYPES[dtype_name])
        array = array.reshape(info["shape"])
        out[name] = bf16_bits_to_float32(array) if dtype_name == "BF16" else array.copy()
    return out


def write_safetensors(state_dict: Mapping[str, np.ndarray], handle: IO[bytes],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Serialise numpy arrays in the safetensors layout (readable by the official library)."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    arrays = []
    for name in sorted(state_dict):
        array = np.ascontiguousarray(state_dict[name])
        dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
        code = _NUMPY_TO_SAFETENSORS.get(np.dtype(dtype))
        if code is None:
            raise CheckpointError(f"cannot save tensor {name!r} of dtype {array.dtype}")
        raw = array.astype(dtype, copy=False).tobytes()
        header[name] = {"dtype": code, "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        arrays.append(raw)
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    handle.write(struct.pack("<Q", len(header_bytes)))
    handle.write(header_bytes)
    for raw in arrays:
        handle.write(raw)


# --------------------------------------------------------------------------------------------
# PyTorch zip checkpoints, without torch


@dataclass(frozen=True)
class _StorageType:
    dtype: np.dtype
    is_bf16: bool = False


_TORCH_STORAGES = {
    "DoubleStorage": _StorageType(np.dtype("<f8")),
    "FloatStorage": _StorageType(np.dtype("<f4")),
    "HalfStorage": _StorageType(np.dtype("<f2")),
    "BFloat16Storage": _StorageType(np.dtype("<u2"), is_bf16=True),
    "LongStorage": _StorageType(np.dtype("<i8")),
    "IntStorage": _StorageType(np.dtype("<i4")),
    "ShortStorage": _StorageType(np.dtype("<i2")),
    "CharStorage": _StorageType(np.dtype("i1")),
    "ByteStorage": _StorageType(np.dtype("u1")),
    "BoolStorage": _StorageType(np.dtype("?")),
}


@dataclass
class _LazyStorage:
    """A storage record from the pickle; its bytes are read from the zip when a tensor uses it."""

    kind: _StorageType
    key: str


def _rebuild_tensor(storage: np.ndarray, offset: int, size: tuple, stride: tuple,
                    *_unused: Any) -> np.ndarray:
    if not size:
        return storage[offset : offset + 1].reshape(()).copy()
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride)
    )
    return np.array(view)


def _rebuild_parameter(data: np.ndarray, *_unused: Any) -> np.ndarray:
    return data


def _ordered_dict(*args: Any) -> OrderedDict:
    return OrderedDict(*args)


_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
}


class _TorchZipUnpickler(pickle.Unpickler):
    """Resolves only tensor-rebuilding globals; anything else is refused by name."""

    def __init__(self, stream: IO[bytes], archive: zipfile.ZipFile, prefix: str, source: Path):
        super().__init__(stream)
        self._archive = archive
        self._prefix = prefix
        self._source = source
        self._storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _TORCH_STORAGES:
            return _TORCH_STORAGES[name]
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        raise CheckpointError(
            f"{self._source}: refusing to load global '{module}.{name}' from the pickle; only "
            "tensors and plain containers are allowed (this file may run code when unpickled). "
            "Convert it to .safetensors with the tool that made it."
        )

    def persistent_load(self, pid: Any) -> np.ndarray:
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise CheckpointError(f"{self._source}: unknown persistent id {pid!r}")
        kind, key = pid[1], str(pid[2])
        if not isinstance(kind, _StorageType):
            raise CheckpointError(f"{self._source}: unsupported storage type {kind!r}")
        if key not in self._storages:
            try:
                raw = self._archive.read(f"{self._prefix}data/{key}")
            except (KeyError, zipfile.BadZipFile, EOFError) as exc:
                raise CheckpointError(
                    f"{self._source}: tensor data record {key} is missing or damaged ({exc})"
                ) from exc
            array = np.frombuffer(raw, dtype=kind.dtype)
            self._storages[key] = bf16_bits_to_float32(array) if kind.is_bf16 else array
        return self._storages[key]


def read_torch_zip(path: str | os.PathLike) -> Any:
    """Unpickle a `torch.save` zip file into numpy arrays and plain containers."""
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise CheckpointError(
            f"{path}: not a PyTorch zip checkpoint (truncated, or saved with the legacy "
            "non-zip format; re-save it with torch.save(..., _use_new_zipfile_serialization=True))"
        ) from exc
    with archive:
        pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
        if not pickles:
            raise CheckpointError(f"{path}: zip file has no data.pkl; not a torch checkpoint")
        prefix = pickles[0][: -len("data.pkl")]
        try:
            payload = archive.read(pickles[0])
        except (zipfile.BadZipFile, EOFError, OSError) as exc:
            raise CheckpointError(f"{path}: damaged archive ({exc})") from exc
        unpickler = _TorchZipUnpickler(io.BytesIO(payload), archive, prefix, path)
        try:
            return unpickler.load()
        except CheckpointError:
            raise
        except Exception as exc:  # a malformed pickle stream
            raise CheckpointError(f"{path}: cannot unpickle ({type(exc).__name__}: {exc})") from exc


_WRAPPER_KEYS = ("state_dict", "model", "module", "ema", "model_state_dict")


def _flatten_tensors(obj: Any, source: Path) -> StateDict:
    """Unwrap {'model': {...}}-style containers and a DataParallel `module.` prefix."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: top-level object is {type(obj).__name__}, not a dict")
    tensors = {k: v for k, v in obj.items() if isinstance(v, np.ndarray)}
    if not tensors:
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), Mapping):
                return _flatten_tensors(obj[key], source)
        raise CheckpointError(f"{source}: no tensors found (keys: {sorted(obj)[:10]})")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    return tensors


# --------------------------------------------------------------------------------------------
# MindSpore checkpoints


def read_mindspore_ckpt(path: str | os.PathLike) -> StateDict:
    try:
        params = ms.load_checkpoint(str(path))
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read MindSpore checkpoint ({exc})") from exc
    return {name: param.asnumpy() for name, param in params.items()}


# --------------------------------------------------------------------------------------------
# dispatch

_WEIGHT_FILE_NAMES = (
    "model.safetensors",
    "diffusion_pytorch_model.safetensors",
    "model.safetensors.index.json",
    "diffusion_pytorch_model.safetensors.index.json",
    "pytorch_model.bin",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "diffusion_pytorch_model.bin.index.json",
    "model.ckpt",
)


def resolve_weights_file(folder: str | os.PathLike) -> Path:
    """Find the weights of a Hugging Face / diffusers style folder."""
    folder = Path(folder)
    for name in _WEIGHT_FILE_NAMES:
        if (folder / name).is_file():
            return folder / name
    candidates = sorted(
        p for p in folder.iterdir()
        if p.suffix in {".safetensors", ".pth", ".pt", ".bin", ".ckpt"} or p.name.endswith(
            ".index.json")
    )
    if len(candidates) == 1:
        return candidates[0]
    raise CheckpointError(
        f"{folder}: no weights file found (looked for {', '.join(_WEIGHT_FILE_NAMES[:2])}, "
        f"pytorch_model.bin, a *.index.json shard index); folder has "
        f"{sorted(p.name for p in folder.iterdir())[:10]}"
    )


def _read_sharded(index_path: Path) -> StateDict:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"{index_path}: not a shard index with a weight_map ({exc})") from exc
    out: StateDict = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index_path.parent / shard
        if not shard_path.is_file():
            raise CheckpointError(f"{index_path}: shard {shard} listed in the index is missing")
        out.update(read_state_dict(shard_path))
    missing = sorted(set(weight_map) - set(out))
    if missing:
        raise CheckpointError(f"{index_path}: tensors listed but absent from shards: {missing[:5]}")
    return out


def read_state_dict(path: str | os.PathLike) -> StateDict:
    """Read any supported checkpoint file or folder into {name: numpy array}."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path} (pass the path of a weights file or "
                              "of a model folder)")
    if path.is_dir():
        path = resolve_weights_file(path)
    name = path.name
    if name.endswith(".index.json"):
        return _read_sharded(path)
    suffix = path.suffix
    if suffix == ".safetensors":
        return read_safetensors(path)
    if suffix in {".pth", ".pt", ".bin"}:
        return _flatten_tensors(read_torch_zip(path), path)
    if suffix == ".ckpt":
        return read_mindspore_ckpt(path)
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        except (ValueError, OSError, zipfile.BadZipFile) as exc:
            raise CheckpointError(f"{path}: unreadable npz ({exc})") from exc
    raise CheckpointError(
        f"{path}: unknown checkpoint format {suffix!r}; expected .safetensors, .pth/.bin/.pt, "
        ".ckpt, .npz or a folder"
    )


# --------------------------------------------------------------------------------------------
# loading into a Cell


@dataclass
class LoadReport:
    """What happened to each key when a state dict met a Cell."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self, limit: int = 20) -> str:
        lines = [f"{len(self.loaded)} tensors matched"]
        if self.missing:
            lines.append(f"missing in checkpoint ({len(self.missing)}): "
                         + ", ".join(self.missing[:limit]))
        if self.unexpected:
            lines.append(f"unexpected in checkpoint ({len(self.unexpected)}): "
                         + ", ".join(self.unexpected[:limit]))
        if self.mismatched:
            lines.append(f"wrong shape ({len(self.mismatched)}): " + ", ".join(
                f"{k} checkpoint {tuple(c)} vs model {tuple(m)}"
                for k, c, m in self.mismatched[:limit]))
        return "\n".join(lines)


def load_checkpoint(cell: Any, source: str | os.PathLike | Mapping[str, np.ndarray],
                    strict: bool = True,
                    key_map: Callable[[str], str | None] | None = None) -> LoadReport:
    """Copy a state dict onto a Cell's parameters by name.

    With `strict`, any missing, unexpected or mis-shaped key raises one `CheckpointError` listing
    them all, before a single parameter is changed, so a failed load leaves the model intact.
    """
    state = dict(source) if isinstance(source, Mapping) else read_state_dict(source)
    origin = "state dict" if isinstance(source, Mapping) else str(source)
    if key_map is not None:
        mapped: StateDict = {}
        for key, value in state.items():
            new_key = key_map(key)
            if new_key is not None:
                mapped[new_key] = value
        state = mapped
    params = dict(cell.parameters_and_names())
    report = LoadReport()
    report.missing = sorted(set(params) - set(state))
    report.unexpected = sorted(set(state) - set(params))
    for name in sorted(set(params) & set(state)):
        want, got = tuple(params[name].shape), tuple(np.shape(state[name]))
        if want != got:
            report.mismatched.append((name, got, want))
        else:
            report.loaded.append(name)
    if strict and not report.ok:
        raise CheckpointError(
            f"{origin} does not fit {type(cell).__name__}:\n{report.describe()}\n"
            "Check that the preset / config matches the checkpoint, or pass strict=False."
        )

    for name in report.loaded:
        param = params[name]
        param.set_data(ms.Tensor(np.asarray(state[name]), dtype=param.dtype))
    return report


def cell_state_dict(cell: Any) -> StateDict:
    """The Cell's parameters as numpy, keyed like Open-Sora's `state_dict()`."""
    return {name: param.asnumpy() for name, param in cell.parameters_and_names()}


def save_state_dict(source: Any, path: str | os.PathLike,
                    metadata: Mapping[str, str] | None = None) -> Path:
    """Save a Cell or {name: array} atomically as `.safetensors` (or `.ckpt`, `.npz`)."""
    path = Path(path)
    state = dict(source) if isinstance(source, Mapping) else cell_state_dict(source)
    state = {k: np.asarray(v) for k, v in state.items()}
    if path.suffix == ".safetensors":
        with atomic_write(path) as handle:
            write_safetensors(state, handle, metadata)
    elif path.suffix == ".npz":
        save_npz_atomic(path, **state)
    elif path.suffix == ".ckpt":
        with tempfile.TemporaryDirectory(dir=path.parent if path.parent.exists() else None) as tmp:
            tmp_file = Path(tmp) / path.name
            ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in state.items()],
                               str(tmp_file))
            with atomic_write(path) as handle:
                handle.write(tmp_file.read_bytes())
    else:
        raise CheckpointError(f"{path}: save as .safetensors, .ckpt or .npz")
    return path
