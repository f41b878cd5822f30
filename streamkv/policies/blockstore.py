"""Where the `memory` policy puts evicted context: blocks of B tokens in RAM (LRU, byte cap), then on disk.

A block is the keys and values of the same B consecutive stream tokens in *every* layer (the shared slot table
evicts the same tokens from all layers at once; a layer may keep only some of its KV heads, `duo`'s retrieval
heads, so each layer has its own head count, possibly 0), with `pos`, the positions the tokens sat at in the
window (the one the model computed each key at, or, if a position restart happened while it was in the window,
that position moved once by the restart's shift). `memory` hands over each key rotated once from there to
position 0 (stores written before that hold the keys at `pos`; the snapshot says which). Fetching rotates from
this stored copy, never from a fetched one, so rounding cannot accumulate however often a block comes back.

Tiers:
* RAM: an LRU of *layer parts* (one layer's keys and values of one block) capped at `ram_bytes`. New blocks
  land here whole; the cap is enforced when the next step starts, so between steps the tier may hold the blocks
  of one step (a chunk of C tokens: C/B) more.
* Disk: one file per block (`block-00000042.skv`), written when the RAM tier is over its cap (`spill()`, called
  at the start of a step, before the cache changes anything: a failed write raises and leaves the stream as it
  was, the block still in RAM) or for a snapshot (`flush()`). Layer-major layout, so fetching layer l of a block
  is one read; every layer's keys and values carry a CRC32 checked on each read. A missing, torn or foreign
  file is a `BlockStoreError` that names the file, never garbage.
* A part read from disk joins the RAM tier (`_promote`) in place of the least recently used parts, which are on
  disk already once the tier has filled (`spill` then writes every block). Never by writing: reads happen
  mid-step, writes only in `spill`.

Why parts and not whole blocks: each layer chooses its own blocks, so the parts a stream keeps coming back to are
a layer's 16 or so blocks, not whole blocks of 30 layers. With whole blocks, one layer's use kept all 30 layers
of a block resident, 256 MiB held 91 blocks, and every part that came back from disk was read from disk again
the next time (at 16k of Frankenstein: ~64 of a choosing decode step's ~180 reads were disk reads).

File layout: b"SKVBLK1\\n", a little-endian uint32 header length, a JSON header (block id, store tag, shapes,
dtype, positions, CRCs), then for each layer its keys [H_l, B, D] and values [H_l, B, Dv] as raw bytes. The
header gives one shape for every layer ("keys"/"values") or, when layers differ, one per layer
("layer_keys"/"layer_values").
"""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
import weakref
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

MAGIC = b"SKVBLK1\n"
HEADER_CACHE = 1024  # parsed headers of disk blocks kept (LRU): bounded, so RAM does not grow with the store


_LIBC = None  # glibc, loaded once; False where there is none (musl, macOS, Windows)


def glibc():
    """The C library when it is glibc (for malloc_trim here, mallinfo2 in benchmarks/long_stream.py), else None."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim  # noqa: B018 - glibc only
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC or None


def _trim() -> None:
    """Return the C heap's free pages to the operating system (glibc's malloc_trim; nothing elsewhere).

    Why: a stream into memory keeps allocating long-lived blocks (the RAM tier, the index) between the large
    short-lived tensors of each prefill chunk, which glibc serves from its heap once its mmap threshold has
    risen. The freed holes between live blocks cannot be given back by shrinking the heap, so RSS grew with
    the stream though nothing live did. Measured (embedded model, memory defaults, 1 thread, chunks of 512):
    RSS 1,346 MiB at 8k -> 1,806 MiB at 49k, of which 536 MiB free heap; trimming after every chunk,
    1,280 -> 1,296 MiB (+1.2%) for 9 ms a chunk (0.5% of its time). Called when a spill moved blocks: every
    prefill chunk once the RAM tier is full, and one decode step in B, not at every decode step.
    The trim is process-wide: a program embedding streamkv has its own free heap given back too (harmless:
    only pages malloc holds unused)."""
    libc = glibc()
    if libc is not None:
        libc.malloc_trim(0)


class BlockStoreError(RuntimeError):
    """A memory block could not be written or read back intact (the message names the file and what to do)."""


@dataclass
class Block:
    keys: list[torch.Tensor]  # per layer [H_l, B, D], as the policy hands them (`memory`: rotated to position 0)
    values: list[torch.Tensor]  # per layer [H_l, B, Dv]
    pos: torch.Tensor  # [B] positions the tokens sat at in the window


def _nbytes(keys: torch.Tensor, values: torch.Tensor) -> int:
    return keys.numel() * keys.element_size() + values.numel() * values.element_size()


def _raw(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()  # via uint8: works for bfloat16 too


class BlockStore:
    def __init__(self, directory: str | os.PathLike | None, ram_bytes: int, tag: str):
        if directory is None:
            self.directory = Path(tempfile.mkdtemp(prefix="streamkv-memory-"))
            self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.directory), True)
        else:
            self.directory = Path(directory)
            self._cleanup = None
            if not self.directory.is_dir():
                raise BlockStoreError(f"memory store directory {self.directory} does not exist; create it or pass another store_dir")
            if not os.access(self.directory, os.W_OK | os.X_OK):
                raise BlockStoreError(f"memory store directory {self.directory} is not writable; pass another store_dir")
        self.ram_bytes, self.tag = ram_bytes, tag
        self.n_blocks = 0  # blocks 0..n_blocks-1 exist (in RAM, on disk, or both)
        # LRU of layer parts, least recently used first: (block id, layer) -> (keys [H, B, D], values [H, B, Dv],
        # pos [B]). A block not on disk has every part here (parts leave only once their block is written).
        self.ram: OrderedDict[tuple[int, int], tuple] = OrderedDict()
        self._ram_bytes = 0  # bytes of the parts in `ram` (kept as a count: summing them each step cost ms)
        self._n_layers = 0  # parts per block
        self.on_disk: set[int] = set()
        self._pending: dict[int, list] = {}  # block id -> per-layer (keys, values), until every layer gave its part
        self._headers: OrderedDict[int, dict] = OrderedDict()  # LRU of parsed headers, at most HEADER_CACHE
        self.reads = {"ram": 0, "disk": 0}

    # ---- writing -----------------------------------------------------------------------------------
    def add_layer(self, block_id: int, layer: int, n_layers: int, keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor) -> None:
        """One layer's part of block `block_id` (keys [H, B, D], values [H, B, Dv]). The block is complete,
        and retrievable, once all `n_layers` layers have given theirs."""
        parts = self._pending.setdefault(block_id, [None] * n_layers)
        parts[layer] = (keys, values)
        if all(p is not None for p in parts):
            del self._pending[block_id]
            if block_id != self.n_blocks:
                raise BlockStoreError(f"memory blocks must arrive in stream order: got block {block_id}, expected {self.n_blocks}")
            pos = pos.clone()  # one tensor, shared by the block's parts
            for layer, (k, v) in enumerate(parts):
                self.ram[(block_id, layer)] = (k, v, pos)
                self._ram_bytes += _nbytes(k, v)
            self._n_layers = n_layers
            self.n_blocks += 1

    def path(self, block_id: int) -> Path:
        return self.directory / f"block-{block_id:08d}.skv"

    def _write(self, block_id: int, block: Block, sync: bool) -> None:
        layers = len(block.keys)
        chunks, crcs = [], []
        for l in range(layers):
            k, v = _raw(block.keys[l]), _raw(block.values[l])
            chunks += [k, v]
            crcs.append([zlib.crc32(k), zlib.crc32(v)])
        kshapes, vshapes = [list(k.shape) for k in block.keys], [list(v.shape) for v in block.values]
        shapes = ({"keys": kshapes[0], "values": vshapes[0]} if all(k == kshapes[0] for k in kshapes) and all(v == vshapes[0] for v in vshapes)
                  else {"layer_keys": kshapes, "layer_values": vshapes})
        header = json.dumps({
            "block": block_id, "tag": self.tag, "dtype": str(block.keys[0].dtype).removeprefix("torch."),
            **shapes, "layers": layers, "pos": block.pos.tolist(), "crc": crcs,
        }).encode()
        target = self.path(block_id)
        tmp = target.with_suffix(".tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(MAGIC + struct.pack("<I", len(header)) + header)
                for c in chunks:
                    f.write(c)
                if sync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, target)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise BlockStoreError(
                f"could not write memory block {target}: {e.strerror or e}. Free space in {self.directory} or use another "
                "store_dir; nothing was lost (the block is still in RAM)."
            ) from None
        self.on_disk.add(block_id)

    def _blocks_in_ram(self) -> set[int]:
        return {b for b, _ in self.ram}

    def _unwritten(self) -> list[int]:
        """The blocks not on disk yet (every part of each is in RAM), in stream order."""
        return sorted(self._blocks_in_ram() - self.on_disk)

    def _block(self, block_id: int) -> Block:
        """A block not yet on disk, whole, from its parts in RAM (to write it)."""
        parts = [self.ram[(block_id, layer)] for layer in range(self._n_layers)]
        return Block([k for k, _, _ in parts], [v for _, v, _ in parts], parts[0][2])

    def spill(self) -> None:
        """When the RAM tier is over its cap: write every block not on disk yet, then drop least-recently-used
        parts until it fits, and give the heap they leave back to the operating system (`_trim`).

        Why write them all, not only the blocks of the parts dropped: then every part in RAM can be dropped
        without a write, so a part read from disk mid-step can always take the place of the least recently
        used (`_promote`). Each block is written once either way; only a stream that never fills the tier
        writes nothing."""
        moved = False
        if self.ram_used() > self.ram_bytes:
            for block_id in self._unwritten():
                self._write(block_id, self._block(block_id), sync=False)
        while self.ram and self.ram_used() > self.ram_bytes:
            (block_id, layer), (k, v, _) = next(iter(self.ram.items()))
            del self.ram[(block_id, layer)]
            self._ram_bytes -= _nbytes(k, v)
            moved = True
        if moved:
            _trim()

    def flush(self) -> None:
        """Every block on disk (durably), e.g. before a snapshot refers to them. RAM keeps its copies."""
        for block_id in self._unwritten():
            self._write(block_id, self._block(block_id), sync=True)

    # ---- reading -----------------------------------------------------------------------------------
    def _header(self, block_id: int) -> dict:
        if block_id in self._headers:
            self._headers.move_to_end(block_id)
            return self._headers[block_id]
        path = self.path(block_id)
        try:
            with open(path, "rb") as f:
                head = f.read(len(MAGIC) + 4)
                if len(head) < len(MAGIC) + 4 or head[: len(MAGIC)] != MAGIC:
                    raise BlockStoreError(f"memory block {path} is not a streamkv block file (damaged or foreign)")
                (n,) = struct.unpack("<I", head[len(MAGIC):])
                header = json.loads(f.read(n))
        except FileNotFoundError:
            raise BlockStoreError(f"memory block {path} is missing; the memory store of this stream is incomplete") from None
        except (ValueError, UnicodeDecodeError):
            raise BlockStoreError(f"memory block {path} has a damaged header") from None
        if header.get("block") != block_id or header.get("tag") != self.tag:
            raise BlockStoreError(f"memory block {path} belongs to another stream or block (tag {header.get('tag')!r}, block {header.get('block')!r})")
        header["offset"] = len(MAGIC) + 4 + n
        self._headers[block_id] = header
        if len(self._headers) > HEADER_CACHE:
            self._headers.popitem(last=False)
        return header

    def get(self, block_id: int, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layer `layer` of block `block_id`: keys [H, B, D], values [H, B, Dv], pos [B]."""
        if not 0 <= block_id < self.n_blocks:
            raise BlockStoreError(f"memory block {block_id} does not exist (the store holds {self.n_blocks})")
        part = self.ram.get((block_id, layer))
        if part is not None:
            self.ram.move_to_end((block_id, layer))
            self.reads["ram"] += 1
            return part
        h = self._header(block_id)
        dtype = getattr(torch, h["dtype"])
        kshapes = h.get("layer_keys") or [h["keys"]] * h["layers"]
        vshapes = h.get("layer_values") or [h["values"]] * h["layers"]
        if "layout" not in h:  # per layer: (offset in the file, key bytes, value bytes), worked out once per header
            item, offset, layout = torch.finfo(dtype).bits // 8, h["offset"], []
            for k, v in zip(kshapes, vshapes):
                layout.append((offset, math.prod(k) * item, math.prod(v) * item))
                offset += layout[-1][1] + layout[-1][2]
            h["layout"] = layout
        start, ksize, vsize = h["layout"][layer]
        path = self.path(block_id)
        buf = bytearray(ksize + vsize)  # read straight into the tensors' memory: no copy
        with open(path, "rb", buffering=0) as f:
            f.seek(start)
            got = f.readinto(buf)
        kc, vc = h["crc"][layer]
        view = memoryview(buf)
        if got != ksize + vsize or zlib.crc32(view[:ksize]) != kc or zlib.crc32(view[ksize:]) != vc:
            raise BlockStoreError(f"memory block {path} is damaged (layer {layer}: truncated or checksum mismatch)")
        if not buf:  # a layer that keeps no head of this block
            return torch.zeros(kshapes[layer], dtype=dtype), torch.zeros(vshapes[layer], dtype=dtype), torch.tensor(h["pos"], dtype=torch.long)
        keys = torch.frombuffer(buf, dtype=torch.uint8, count=ksize).view(dtype).view(kshapes[layer])
        values = torch.frombuffer(buf, dtype=torch.uint8, offset=ksize, count=vsize).view(dtype).view(vshapes[layer])
        self.reads["disk"] += 1
        if "pos_tensor" not in h:
            h["pos_tensor"] = torch.tensor(h["pos"], dtype=torch.long)
        self._promote((block_id, layer), (keys, values, h["pos_tensor"]))
        return keys, values, h["pos_tensor"]

    def _promote(self, key: tuple[int, int], part: tuple) -> None:
        """A part just read from disk joins the RAM tier, if room can be made by dropping least-recently-used
        parts that are on disk too (no write here: this runs mid-step). The tier stays within its cap."""
        size = _nbytes(part[0], part[1])
        need, drop = self._ram_bytes + size - self.ram_bytes, []  # bytes to free, and the parts that free them
        for old, (k, v, _) in self.ram.items():
            if need <= 0:
                break
            if old[0] not in self.on_disk:
                return  # only a write could make room: drop nothing, keep nothing (the next spill writes)
            drop.append((old, _nbytes(k, v)))
            need -= drop[-1][1]
        if need > 0:
            return  # larger than the whole tier
        for old, n in drop:
            del self.ram[old]
            self._ram_bytes -= n
        self.ram[key] = part
        self._ram_bytes += size

    # ---- bookkeeping -------------------------------------------------------------------------------
    def ram_used(self) -> int:
        return self._ram_bytes

    def disk_used(self) -> int:
        return sum(self.path(i).stat().st_size for i in self.on_disk if self.path(i).exists())

    def stats(self) -> dict:
        return {"blocks": self.n_blocks, "blocks_in_ram": len(self._blocks_in_ram()), "parts_in_ram": len(self.ram),
                "blocks_on_disk": len(self.on_disk), "ram_bytes": self.ram_used(), "disk_bytes": self.disk_used(), "reads_ram": self.reads["ram"],
                "reads_disk": self.reads["disk"], "store_dir": str(self.directory)}

    def adopt(self, n_blocks: int) -> None:
        """Continue from a snapshot taken when the store held `n_blocks` (all flushed to this directory):
        check every block file, forget blocks written after it."""
        self.ram.clear()
        self._ram_bytes = 0
        self._pending.clear()
        self._headers.clear()
        self.n_blocks = n_blocks
        self.on_disk = set(range(n_blocks))
        for i in range(n_blocks):
            self._header(i)

    def close(self) -> None:
        """Delete the store's files (a temporary store is also deleted when garbage-collected)."""
        self.ram.clear()
        self._ram_bytes = 0
        if self._cleanup is not None:
            self._cleanup()
        else:
            for i in range(self.n_blocks):
                self.path(i).unlink(missing_ok=True)
        self.n_blocks = 0
        self.on_disk.clear()
