"""Checkpoint directories on disk: safetensors read and written one tensor at a time, atomically.

A Hugging Face checkpoint directory is `config.json` plus `model.safetensors` or shards with a
`model.safetensors.index.json`. Reading here never maps a whole file: each tensor is read with a
positioned read into its own buffer, so host memory holds one tensor at a time. Writing streams
tensors into pre-planned shards (headers first, data as it is produced) inside a temporary directory
that is renamed into place only when complete.

Pickled weights (`pytorch_model*.bin`) are read only when the caller allows it (`allow_pickle`),
and then with `torch.load(weights_only=True)`, memory-mapped, one file at a time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from functools import lru_cache
from typing import Iterable, Iterator

import torch

from ..errors import InputError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"
# Files of a checkpoint directory that are not weights: copied along by quantize/export.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
SKIP_FILES = {"config.json", INDEX_NAME, "pytorch_model.bin.index.json"}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: file, absolute byte offset (-1: inside a pickled .bin file), dtype and shape."""

    name: str
    file: Path
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: Path) -> tuple[dict[str, TensorEntry], dict]:
    """The tensors of one safetensors file (no data read) and its `__metadata__`; a one-line
    InputError naming the file when it is not a complete safetensors file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise InputError(f"{path}: not a safetensors file (shorter than 8 bytes); restore it from the original checkpoint")
        (n,) = struct.unpack("<Q", head)
        if n > 100_000_000 or 8 + n > size:
            raise InputError(f"{path}: not a safetensors file, or truncated (header length {n}, file size {size}); "
                             "restore it from the original checkpoint")  # fmt: skip
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise InputError(f"{path}: the safetensors header is not valid JSON; the file is damaged, restore it from "
                             "the original checkpoint") from None  # fmt: skip
    if not isinstance(header, dict):
        raise InputError(f"{path}: the safetensors header is not a JSON object; the file is damaged")
    meta = header.pop("__metadata__", None) or {}
    start = 8 + n
    entries = {}
    for name, info in header.items():
        try:
            dtype, shape, (a, b) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{path}: tensor {name} has a malformed header entry; the file is damaged") from None
        if dtype not in DTYPES:
            raise InputError(f"{path}: tensor {name} has dtype {dtype}, which qlora_engine cannot read")
        nbytes = math.prod(shape) * torch.empty((), dtype=DTYPES[dtype]).element_size()
        if b - a != nbytes or a < 0:
            raise InputError(f"{path}: tensor {name} claims {b - a} bytes for shape {list(shape)} {dtype}; the file is damaged")
        if start + b > size:
            raise InputError(f"{path} is truncated: tensor {name} ends at byte {start + b} of a {size}-byte file; "
                             "download or copy it again")  # fmt: skip
        entries[name] = TensorEntry(name, path, start + a, b - a, DTYPES[dtype], shape)
    return entries, meta


PICKLE_INDEX = "pytorch_model.bin.index.json"


def checkpoint_files(model_dir: Path, allow_pickle: bool = False) -> list[Path]:
    """The weight files of a checkpoint directory, via the index when there is one: safetensors,
    or pickled `.bin` files when `allow_pickle` (and there are no safetensors)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise InputError(f"{model_dir}: no such checkpoint directory")
    for index_name, suffix in ((INDEX_NAME, ".safetensors"), (PICKLE_INDEX, ".bin")):
        index = model_dir / index_name
        if suffix == ".bin" and not allow_pickle:
            break
        if index.exists():
            try:
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                raise InputError(f"{index} is not a valid weight index (JSON with a weight_map); restore it") from None
            missing = [n for n in names if not (model_dir / n).exists()]
            if missing:
                raise InputError(f"{model_dir}: the index names shard(s) that are missing: {missing}")
            return [model_dir / n for n in names]
        files = sorted(model_dir.glob(f"*{suffix}"))
        if files:
            return files
    pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
    if pickles and not allow_pickle:
        raise InputError(f"{model_dir}: only pickled weights ({', '.join(pickles[:3])}), and unpickling can run code: "
                         "pass --allow-pickle to read them with torch.load(weights_only=True), or convert them to "
                         "safetensors")  # fmt: skip
    other = [p.name for p in model_dir.iterdir() if p.suffix == ".gguf"]
    hint = f" (found {other}: convert to safetensors first)" if other else ""
    raise InputError(f"{model_dir}: no *.safetensors weights{hint}")


@lru_cache(maxsize=1)
def _pickled(path: Path) -> dict[str, torch.Tensor]:
    """One pickled state dict, memory-mapped: only the tensors read are paged in. The newest one only."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - the unpickler raises many types for a bad file
        raise InputError(f"{path}: cannot read it as a weights-only torch file ({str(e).splitlines()[0][:160]})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise InputError(f"{path} does not hold a flat dict of tensors")
    return sd


def list_tensors(model_dir: Path, allow_pickle: bool = False) -> dict[str, TensorEntry]:
    """Every tensor of a checkpoint directory by name, from the headers alone (a pickled file is
    memory-mapped to read its names)."""
    out: dict[str, TensorEntry] = {}
    for f in checkpoint_files(model_dir, allow_pickle):
        if f.suffix == ".safetensors":
            entries, _ = read_header(f)
        else:
            entries = {n: TensorEntry(n, f, -1, t.numel() * t.element_size(), t.dtype, tuple(t.shape))
                       for n, t in _pickled(f).items()}  # fmt: skip
        out.update(entries)
    return out


def read_tensor(entry: TensorEntry, pin: bool = False) -> torch.Tensor:
    """One tensor into a fresh CPU buffer (pinned if asked), by a positioned read."""
    if entry.offset < 0:
        t = _pickled(entry.file)[entry.name]
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=pin)
        return out.copy_(t)
    buf = torch.empty(entry.nbytes, dtype=torch.uint8, pin_memory=pin)
    if entry.nbytes:
        view = memoryview(buf.numpy())
        with open(entry.file, "rb", buffering=0) as f:
            got = 0
            while got < entry.nbytes:
                k = os.preadv(f.fileno(), [view[got:]], entry.offset + got)
                if k <= 0:
                    raise InputError(f"{entry.file} is truncated: it ends inside tensor {entry.name}; copy it again")
                got += k
    return buf.view(entry.dtype).reshape(entry.shape)


def _align8(n: int) -> int:
    return (n + 7) // 8 * 8


def _header_bytes(specs: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict | None) -> tuple[bytes, list[int]]:
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offsets, pos = [], 0
    for name, dtype, shape in specs:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        offsets.append(pos)
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (_align8(len(raw)) - len(raw))
    return raw, offsets


class ShardedWriter:
    """Writes tensors into safetensors shards whose layout is planned up front.

    `specs` lists (name, dtype, shape) in the order tensors will be given to `write`; shards are cut
    when the next tensor would pass `max_shard_bytes`. Only one tensor is in memory at a time.
    """

    def __init__(self, out_dir: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]], max_shard_bytes: int):
        self.out_dir = Path(out_dir)
        self.specs = specs
        shards, cur, size = [], [], 0
        for spec in specs:
            nbytes = math.prod(spec[2]) * torch.empty((), dtype=spec[1]).element_size()
            if cur and size + nbytes > max_shard_bytes:
                shards.append(cur)
                cur, size = [], 0
            cur.append(spec)
            size += nbytes
        if cur or not shards:
            shards.append(cur)
        self.single = len(shards) == 1
        n = len(shards)
        self.names = ["model.safetensors"] if self.single else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._queue = [(i, spec) for i, shard in enumerate(shards) for spec in shard]
        self._shards = shards
        self._pos = 0
        self._open_index = -1
        self._file = None
        self.total_bytes = sum(math.prod(s[2]) * torch.empty((), dtype=s[1]).element_size() for s in specs)

    def _open(self, i: int) -> None:
        if self._file:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        raw, _ = _header_bytes(self._shards[i], None)
        self._file = open(self.out_dir / self.names[i], "wb")
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)
        self._open_index = i

    def write(self, name: str, tensor: torch.Tensor) -> None:
        i, (want, dtype, shape) = self._queue[self._pos]
        if name != want or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"writer expected {want} {dtype} {tuple(shape)}, got {name} {tensor.dtype} {tuple(tensor.shape)}")
        if i != self._open_index:
            self._open(i)
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        try:
            self._file.write(memoryview(data))
        except OSError as e:
            raise named(e, self.out_dir / self.names[i]) from None
        self._pos += 1

    def close(self, metadata: dict | None = None) -> None:
        """Finish the last shard and write the index (when sharded)."""
        if self._pos != len(self._queue):
            raise ValueError(f"writer closed after {self._pos} of {len(self._queue)} tensors")
        if self._file is None:
            self._open(0)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        if not self.single:
            weight_map = {name: self.names[i] for i, shard in enumerate(self._shards) for name, _, _ in shard}
            index = {"metadata": {"total_size": self.total_bytes, **(metadata or {})}, "weight_map": weight_map}
            write_text_atomic(self.out_dir / INDEX_NAME, json.dumps(index, indent=2, sort_keys=True) + "\n")


def save_tensors(out_dir: Path, tensors: Iterable[tuple[str, torch.Tensor]], max_shard_bytes: int = 5 << 30) -> None:
    """Write (name, tensor) pairs that are already in memory as (sharded) safetensors."""
    items = list(tensors)
    w = ShardedWriter(out_dir, [(n, t.dtype, tuple(t.shape)) for n, t in items], max_shard_bytes)
    for n, t in items:
        w.write(n, t)
    w.close()


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; once the block has written it, fsync it, rename it to
    `path` and fsync the directory, so a crash leaves the old file or the new one. On any error
    the temporary file is removed (an OSError then names `path`)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise named(e, path) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def save_file(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """One safetensors file, written to a temp name and renamed (atomic)."""
    specs = [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    raw, _ = _header_bytes(specs, {k: str(v) for k, v in (metadata or {"format": "pt"}).items()})
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in tensors.values():
            f.write(memoryview(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()))


def load_file(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one (small) safetensors file."""
    entries, _ = read_header(Path(path))
    return {name: read_tensor(e) for name, e in entries.items()}


def named(e: OSError, path: Path) -> OSError:
    """The same OSError, naming the file it was writing (Python's write() does not)."""
    return e if e.filename else OSError(e.errno, e.strerror, str(path))


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename, a new file) survive a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """`text` into `path` through a temporary file, fsynced, renamed, the directory fsynced."""
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


MANIFEST = "manifest.json"


class _RecordingWriter:
    """A file for torch.save that remembers the OSError under the RuntimeError torch turns it into."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def save_torch(obj, path: Path) -> None:
    """torch.save(obj, path), fsynced; a full disk or file-size limit is the OSError that says so
    (errno and file name), not torch's "unexpected pos" RuntimeError."""
    path = Path(path)
    try:
        with open(path, "wb", buffering=0) as f:  # unbuffered: a write error surfaces in write(), not in close()
            w = _RecordingWriter(f)
            try:
                torch.save(obj, w)
            except RuntimeError:
                if w.error is None:
                    raise
                raise w.error from None
            os.fsync(f.fileno())
    except OSError as e:
        raise named(e, path) from None


def write_manifest(d: Path) -> dict:
    """manifest.json in `d`: every other file's size and sha256, so that a reader can tell an intact
    directory from one a crash or a full disk cut short."""
    d = Path(d)
    files = {str(p.relative_to(d)): {"bytes": p.stat().st_size, "sha256": file_digest(p)}
             for p in sorted(d.rglob("*")) if p.is_file() and p.name != MANIFEST}  # fmt: skip
    write_text_atomic(d / MANIFEST, json.dumps({"files": files}, indent=1) + "\n")
    return files


def verify_manifest(d: Path) -> str | None:
    """None when every file the manifest lists has its size and checksum, else why not (one line)."""
    d = Path(d)
    try:
        files = json.loads((d / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"no {MANIFEST}"
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        return f"{MANIFEST} is damaged"
    for name, want in sorted(files.items()):
        p = d / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != want.get("bytes"):
            return f"{name} has {p.stat().st_size} bytes, the manifest says {want.get('bytes')}"
        if file_digest(p) != want.get("sha256"):
            return f"{name} does not match its checksum"
    return None


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy tokenizer, chat template, generation config and other non-weight files of a checkpoint."""
    copied = []
    for p in sorted(Path(src).iterdir()):
        if p.is_file() and p.name not in SKIP_FILES and not p.name.endswith(WEIGHT_SUFFIXES) and not p.name.startswith("."):
            shutil.copy2(p, Path(dst) / p.name)
            copied.append(p.name)
    return copied


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(out: Path) -> None:
    """Remove `.NAME.tmp-PID` / `.NAME.old-PID` siblings of `out` left by a process that was killed
    (its PID no longer runs): a crash leaves no half-written output behind for long."""
    out = Path(out)
    if not out.parent.is_dir():
        return
    for p in out.parent.glob(f".{out.name}.*-*"):
        kind, _, pid = p.name[len(out.name) + 2 :].partition("-")
        if kind in ("tmp", "old") and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def fsync_tree(d: Path) -> None:
    for p in sorted(d.rglob("*"), key=lambda p: -len(p.parts)):
        if p.is_file() and not p.is_symlink():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        elif p.is_dir():
            fsync_dir(p)
    fsync_dir(d)


OUR_MARKERS = ("config.json", "adapter_config.json", MANIFEST, "model.safetensors", INDEX_NAME)


def check_replaceable(out: Path) -> None:
    """`out` may be replaced (--force) only when it is what this engine writes: a checkpoint, an
    export or an adapter directory, or an empty one. Anything else is refused, so that a mistyped
    --out (a home directory, a data folder) is never deleted."""
    out = Path(out)
    if out.is_symlink() or not out.is_dir():
        raise InputError(f"{out} exists and is not a directory: refusing to replace it; choose another --out")
    entries = list(out.iterdir())
    if entries and not any((out / m).is_file() for m in OUR_MARKERS):
        raise InputError(f"{out} holds files that are not a checkpoint, export or adapter: refusing to replace it, even "
                         "with --force; choose another --out")  # fmt: skip


def check_not_inside(out: Path, inputs: dict[str, Path]) -> None:
    """An output must not be one of the inputs or a directory that holds one (replacing it would
    delete what is being read)."""
    o = Path(out).resolve()
    for what, p in inputs.items():
        q = Path(p).resolve()
        if o == q or o in q.parents:
            raise InputError(f"--out {out} would replace the {what} ({p}) it reads: choose another --out")


@contextlib.contextmanager
def atomic_directory(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; rename it to `out` only if the block succeeds.

    An existing `out` is refused unless `force`; with `force` it is replaced only after the new
    directory is complete. Every file and the directory are fsynced before the rename, and the
    parent after it, so a crash leaves either the old `out` or the new one. On any error the
    temporary directory is removed and `out` is untouched; temporaries of killed processes are
    removed on the next call.
    """
    out = Path(out)
    if out.exists() and not force:
        raise InputError(f"{out} already exists: choose another --out or pass --force to replace it")
    if out.exists():
        check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        fsync_dir(out.parent)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    else:
        os.replace(tmp, out)
        fsync_dir(out.parent)
