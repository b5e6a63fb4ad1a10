"""Pipeline P2P whose data moves on the copy engine: no SM spins while a message is in flight.

Why (issue 24, ``benchmarks/RESULTS.md``, "Pipeline schedules on H200, compiled"): torch's
pipelining posts its NCCL sends and receives ahead of the compute that needs them, and each
NCCL P2P kernel spins on its SMs until the peer posts the matching call: 116-121 ms of NCCL
kernels per interleaved PP2 step ran beside the compute, and cuBLAS's persistent GEMMs, sized
to every SM, ran 15-28% slower. Here a message is a ``copy_`` into the receiver's symmetric
memory (the copy engine, as ``tensor_parallel/all_gather_matmul.py`` pushes its shards) and a
4-byte sequence number after it; the only kernel is a one-thread wait, and it runs where the
consumer's stream would wait anyway.

Protocol, per channel (sender s, receiver d, kind fwd = activations or bwd = gradients; the
two kinds are independent channels, each with its own ring of ``slots`` slots in d's buffer,
its own side stream on s, and its own pad slots)::

    sender s, send number q (1, 2, ...) in slot i = (q - 1) % slots, at post time:
      side stream (one per (d, kind)): wait for the current stream (the producer)
        [q > slots: wait kernel until ACK[i] on s's pad >= q - slots]   the slot's last reader is done
        copy tensor -> d's slot i                                        copy engine, over NVLink
        copy q -> DATA[i] on d's pad                                     after the data: same stream
    receiver d, receive number q, when the schedule waits on it (Work.wait):
      current stream: wait kernel until DATA[i] >= q; copy slot i -> the recv buffer;
                      copy q -> ACK[i] on s's pad                         the slot is free again

Sequence numbers are the channel's message count mod 2^16, compared serially (the wait kernel
of ``all_gather_matmul``), so pads are never reset. A send's ``wait()`` waits for nothing:
the tensor is kept alive by ``record_stream`` on the side stream, and no compute stream ever
waits on a side stream, so a send can never stall compute (NCCL's send waits for its peer).
The receive's wait kernel is posted at ``wait()``, on the consumer's stream, not when the
schedule posts the receive ahead: a wait kernel posted ahead would spin on a side stream
beside the GEMMs, the very cost this transport removes.

Deadlock freedom. Sends and receives match in order per channel (the schedules keep each pair's
order, as NCCL and gloo need). A side stream blocks only on its own channel's acks; a compute
stream blocks only on data. Message q can land only after the receiver consumed message
q - slots, and every earlier message of the channel (the side stream is in order). So if
the schedule waits for message q while a message <= q - slots of that channel is posted but
not yet consumed, the device would hang: the receiver raises a ``RuntimeError`` on the host
instead (:meth:`CopyEngineP2P._consume`). Otherwise every ack the side stream waits for is
for a message consumed earlier in the receiver's stream order, so it arrives. ``slots`` large
enough that no side stream ever waits (:func:`default_slots`) also keeps that wait kernel from
spinning beside compute.

Workspace: one symmetric allocation per pp group (``sp_reduce_scatter._Workspace``, a
dedicated allocation whose signal pad is ours), rings for each neighbour (pp rank +-1) and
kind, sized at the first message from the largest first message of any rank (a collective
of the pp group: every rank's first message is a post, which waits for nothing, so all reach
it) and regrown, collectively at the end of a step, when a message did not fit; such a
message, and anything the transport cannot serve, goes to NCCL instead, identically on both
ends (the choice depends only on what both know: bytes, peer, device).

Emulation (CPU, ``TRITON_INTERPRET=1``, tests): the same bookkeeping with the buffers and pads
in shared memory files that every rank maps, side streams as threads, and the waits as host
polls; the data path is then the protocol's, byte for byte.
"""

from __future__ import annotations

import math
import os
import queue
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist

_SEQ_MOD = 1 << 16  # as all_gather_matmul._SEQ_MOD: sequence numbers compared serially
_PAD0 = 64  # first pad slot we use; the workspace's init barrier (channel 0) uses [0, world)
_EMULATED_PAD_SLOTS = 512  # torch's default signal pad: 2048 bytes
_EMULATED_TIMEOUT_S = float(os.environ.get("DTP_TEST_TIMEOUT", "300"))
FWD, BWD = 0, 1
KIND_NAMES = ("fwd", "bwd")


def default_slots(schedule: str, pp: int, virtual: int, n_microbatches: int) -> int:
    """Slots per channel so that no send waits for an ack: the most messages of one channel
    that can be sent and not yet consumed, over every timing the schedule allows.

    Measured on torch's schedules (a causal-cut count over ``pipeline_order_with_comms``, every
    rank's actions with their sends, receives and the compute that consumes each receive):
    interleaved 1F1B (v = 2, 4), ZBV and interleaved zero bubble need 2 pp - 1 when m >= 2 pp
    (PP2: 3, PP4: 7, PP8: 15) and at most max(m, pp) below; 1F1B at most pp; GPipe and looped
    BFS m (every forward before any backward). A channel carries at most m v messages a step,
    which bounds all of them.
    """
    per_step = n_microbatches * virtual
    if schedule == "gpipe":
        return per_step
    return max(1, min(per_step, 2 * pp - 1))


def slot_bytes_for(nbytes: int) -> int:
    """A slot's size for messages of up to ``nbytes``: the next power of two, 4 KiB at least."""
    return max(4096, 1 << max(0, math.ceil(math.log2(max(nbytes, 1)))))


def ring_bytes(pp: int, slots: int, message_bytes: int) -> int:
    """The receive rings a rank allocates (the memory estimator counts them): one ring per
    (neighbour, kind), ``slots`` slots of ``slot_bytes_for(message_bytes)`` each."""
    return (2 if pp == 2 else 4) * slots * slot_bytes_for(message_bytes)


def ring_index(owner: int, other: int, kind: int, world: int) -> int:
    """The ring (0..3) at pp rank ``owner`` for messages of ``kind`` exchanged with ``other``, a
    neighbour: 2 x (0: the previous rank, 1: the next; at pp 2 they are one) + kind."""
    pos = 0 if world == 2 or other == (owner - 1) % world else 1
    return 2 * pos + kind


def is_neighbour(a: int, b: int, world: int) -> bool:
    return a != b and (b - a) % world in (1, world - 1)


class _CudaMemory:
    """The GPU workspace: symmetric memory, copy-engine copies, the one-thread wait kernel."""

    def __init__(self, group: dist.ProcessGroup, nbytes: int):
        from ..tensor_parallel import sp_reduce_scatter as sprs

        self.ws = sprs._Workspace(group, max(16, -(-nbytes // 32) * 16))  # two halves >= nbytes; collective
        self.pad_slots = self.ws.pads[0].numel()
        device = self.ws.buf.device
        self.seqs = torch.arange(_SEQ_MOD, dtype=torch.int32, device=device)  # the pad copies' sources
        self.bufs = [self.ws.hdl.get_buffer(p, (2 * self.ws.half_bytes,), torch.uint8, self.ws.offset)
                     for p in range(self.ws.world)]
        self.streams: dict[tuple[int, int], torch.cuda.Stream] = {}

    def region(self, rank: int, offset: int, nbytes: int) -> torch.Tensor:
        return self.bufs[rank][offset:offset + nbytes]

    def signal(self, rank: int, idx: int, seq: int) -> None:
        self.ws.pads[rank][idx:idx + 1].copy_(self.seqs[seq:seq + 1])  # a 4-byte copy, ordered in stream

    def wait(self, idx: int, seq: int) -> None:
        from ..tensor_parallel.all_gather_matmul import wait_for

        wait_for(self.ws.pads[self.ws.rank], idx, seq)  # on the current stream

    def on_side(self, key: tuple[int, int], push, tensor: torch.Tensor) -> None:
        side = self.streams.get(key)
        if side is None:
            side = self.streams[key] = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())  # the producer of `tensor`
        with torch.cuda.stream(side):
            push()
        tensor.record_stream(side)  # not reused before the copy is done

    def drain(self) -> None:
        torch.cuda.synchronize()


class _HostMemory:
    """The emulation: each rank's buffer and pad in a shared memory file every rank maps;
    side streams are threads, waits are polls."""

    def __init__(self, group: dist.ProcessGroup, nbytes: int):
        self.rank, self.world, self.pad_slots = group.rank(), group.size(), _EMULATED_PAD_SLOTS
        size = 4 * self.pad_slots + nbytes
        fd, path = tempfile.mkstemp(prefix="dtp_pp_p2p_", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        os.ftruncate(fd, size)  # zeros
        os.close(fd)
        paths: list = [None] * self.world
        dist.all_gather_object(paths, path, group=group)
        maps = [torch.from_file(p, shared=True, size=size, dtype=torch.uint8) for p in paths]
        dist.barrier(group=group)  # every rank mapped every file: ours can go
        os.unlink(path)
        self.pads = [m[:4 * self.pad_slots].view(torch.int32) for m in maps]
        self.bufs = [m[4 * self.pad_slots:] for m in maps]
        self.threads: dict[tuple[int, int], _SideThread] = {}

    def region(self, rank: int, offset: int, nbytes: int) -> torch.Tensor:
        return self.bufs[rank][offset:offset + nbytes]

    def signal(self, rank: int, idx: int, seq: int) -> None:
        self.pads[rank][idx] = seq

    def wait(self, idx: int, seq: int) -> None:
        deadline = time.monotonic() + _EMULATED_TIMEOUT_S
        while ((int(self.pads[self.rank][idx]) - seq) & 0xFFFF) >= 0x8000:  # the wait kernel's test
            if time.monotonic() > deadline:
                raise TimeoutError(f"copy-engine P2P (emulated): pad slot {idx} never reached {seq}")
            time.sleep(2e-5)

    def on_side(self, key: tuple[int, int], push, tensor: torch.Tensor) -> None:
        thread = self.threads.get(key)
        if thread is None:
            thread = self.threads[key] = _SideThread()
        thread.submit(push)

    def drain(self) -> None:
        for thread in self.threads.values():
            thread.drain()


class _SideThread:
    """A side stream of the emulation: runs its pushes in order, reports the first error."""

    def __init__(self):
        self.tasks: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            fn = self.tasks.get()
            try:
                if self.error is None:
                    fn()
            except BaseException as e:  # noqa: BLE001 - surfaced by drain() / submit()
                self.error = e
            finally:
                self.tasks.task_done()

    def submit(self, fn) -> None:
        if self.error is not None:
            raise RuntimeError("copy-engine P2P (emulated): a send failed") from self.error
        self.tasks.put(fn)

    def drain(self) -> None:
        self.tasks.join()
        if self.error is not None:
            raise RuntimeError("copy-engine P2P (emulated): a send failed") from self.error


class _SendWork:
    """A posted send: ``wait()`` waits for nothing (module docstring)."""

    def wait(self, timeout=None) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


@dataclass
class _RecvWork:
    """A posted receive; ``wait()`` makes the current stream wait for the data and copy it out."""

    transport: "CopyEngineP2P"
    buffer: torch.Tensor
    src: int
    kind: int
    seq: int
    done: bool = False

    def wait(self, timeout=None) -> bool:
        if not self.done:
            self.transport._consume(self)
        return True

    def is_completed(self) -> bool:
        return self.done


class CopyEngineP2P:
    """The transport of one pp group (module docstring). ``emulated``: the CPU emulation."""

    def __init__(self, group: dist.ProcessGroup, slots: int, emulated: bool = False):
        self.group, self.rank, self.world = group, group.rank(), group.size()
        self.slots, self.emulated = slots, emulated
        self.mem: _CudaMemory | _HostMemory | None = None
        self.slot_bytes = 0
        self.rings = 2 if self.world == 2 else 4
        self._want_slots = slots
        self._reset_counts()
        self.sent = self.received = self.fallbacks = 0  # messages this transport carried / left to NCCL

    def _reset_counts(self) -> None:
        self.send_seq: dict[tuple[int, int], int] = defaultdict(int)
        self.recv_seq: dict[tuple[int, int], int] = defaultdict(int)
        self.pending: dict[tuple[int, int], dict[int, _RecvWork]] = defaultdict(dict)
        self.oversize = 0  # the largest message this step that did not fit a slot

    def want_slots(self, slots: int) -> None:
        """Slots the next schedule needs; more than the workspace has: regrown after the step."""
        self._want_slots = max(self._want_slots, slots)
        if self.mem is None:
            self.slots = self._want_slots

    # ---- which ops it serves --------------------------------------------------------------
    def serves(self, tensor: torch.Tensor, peer: int) -> bool:
        """Whether a message of ``tensor`` to or from group rank ``peer`` is ours; both ends of
        a message decide alike."""
        kind = "cpu" if self.emulated else "cuda"
        return tensor.device.type == kind and tensor.numel() > 0 and is_neighbour(self.rank, peer, self.world)

    def post(self, ops: list[tuple[dist.P2POp, int]]) -> tuple[list, list[dist.P2POp]]:
        """Post ``(op, kind)`` pairs in order: their works, and the ops larger than a slot,
        which the caller gives to NCCL (both ends of a message decide alike)."""
        if self.mem is None and ops:
            self._allocate(max(op.tensor.numel() * op.tensor.element_size() for op, _ in ops))
        works, rest = [], []
        for op, kind in ops:
            nbytes = op.tensor.numel() * op.tensor.element_size()
            if nbytes > self.slot_bytes:
                self.oversize = max(self.oversize, nbytes)
                self.fallbacks += 1
                rest.append(op)
            elif op.op is dist.isend:
                works.append(self._send(op.tensor, op.group_peer, kind))
            else:
                works.append(self._recv(op.tensor, op.group_peer, kind))
        return works, rest

    # ---- the protocol -----------------------------------------------------------------------
    def _offset(self, ring: int, slot: int) -> int:
        return (ring * self.slots + slot) * self.slot_bytes

    def _data_pad(self, ring: int, slot: int) -> int:
        return _PAD0 + ring * self.slots + slot

    def _ack_pad(self, ring: int, slot: int) -> int:
        return _PAD0 + (self.rings + ring) * self.slots + slot

    def _send(self, tensor: torch.Tensor, peer: int, kind: int) -> _SendWork:
        key = (peer, kind)
        self.send_seq[key] += 1
        q, n = self.send_seq[key], self.slots
        slot = (q - 1) % n
        src = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        dst = self.mem.region(peer, self._offset(ring_index(peer, self.rank, kind, self.world), slot), src.numel())
        data_pad = self._data_pad(ring_index(peer, self.rank, kind, self.world), slot)
        ack_pad = self._ack_pad(ring_index(self.rank, peer, kind, self.world), slot)
        mem = self.mem

        def push() -> None:
            if q > n:  # the slot's previous message (q - n) must have been copied out
                mem.wait(ack_pad, (q - n) % _SEQ_MOD)
            dst.copy_(src)
            mem.signal(peer, data_pad, q % _SEQ_MOD)

        mem.on_side(key, push, src)
        self.sent += 1
        return _SendWork()

    def _recv(self, buffer: torch.Tensor, src: int, kind: int) -> _RecvWork:
        key = (src, kind)
        self.recv_seq[key] += 1
        work = _RecvWork(self, buffer, src, kind, self.recv_seq[key])
        self.pending[key][work.seq] = work
        self.received += 1
        return work

    def _consume(self, work: _RecvWork) -> None:
        key, q, n = (work.src, work.kind), work.seq, self.slots
        pending = self.pending[key]
        blocking = [p for p in pending if p <= q - n]
        if blocking:
            raise RuntimeError(
                f"copy-engine pipeline P2P would hang: the schedule waits for {KIND_NAMES[work.kind]} message {q} "
                f"from pp rank {work.src} while message {min(blocking)} of that channel is not yet consumed, and "
                f"with {n} slots message {q} can only land after it. The schedule needs more slots per channel "
                f"(PipelineRuntime.p2p_slots) or pipeline_p2p='nccl'")
        slot = (q - 1) % n
        ring = ring_index(self.rank, work.src, work.kind, self.world)
        buf = work.buffer
        nbytes = buf.numel() * buf.element_size()
        self.mem.wait(self._data_pad(ring, slot), q % _SEQ_MOD)
        data = self.mem.region(self.rank, self._offset(ring, slot), nbytes).view(buf.dtype).view(buf.shape)
        with torch.no_grad():
            buf.copy_(data)
        self.mem.signal(work.src, self._ack_pad(ring_index(work.src, self.rank, work.kind, self.world), slot),
                        q % _SEQ_MOD)
        del pending[q]
        work.done = True

    # ---- workspace ----------------------------------------------------------------------------
    def _allocate(self, nbytes: int) -> None:
        """Collective over the pp group: slots of the largest ``nbytes`` any rank asks for."""
        device = torch.device("cpu") if self.emulated else torch.device("cuda", torch.cuda.current_device())
        size = torch.tensor([nbytes, self._want_slots], dtype=torch.int64, device=device)
        dist.all_reduce(size, op=dist.ReduceOp.MAX, group=self.group)
        nbytes, self.slots = int(size[0]), int(size[1])
        self.slot_bytes = slot_bytes_for(nbytes)
        total = ring_bytes(self.world, self.slots, nbytes)
        self.mem = _HostMemory(self.group, total) if self.emulated else _CudaMemory(self.group, total)
        if _PAD0 + 2 * self.rings * self.slots > self.mem.pad_slots:
            raise ValueError(f"copy-engine pipeline P2P: {self.slots} slots per channel need "
                             f"{_PAD0 + 2 * self.rings * self.slots} signal-pad slots; the pad has {self.mem.pad_slots}")
        self._reset_counts()

    def end_step(self) -> None:
        """After a step, on every pp rank: complete receives the schedule did not wait on (NCCL
        would have written them), then, collectively, regrow the workspace if a message did not
        fit or a schedule needs more slots."""
        for pending in list(self.pending.values()):
            for work in sorted(pending.values(), key=lambda w: w.seq):
                work.wait()
        if self.mem is None:
            return
        self.mem.drain()
        device = torch.device("cpu") if self.emulated else torch.device("cuda", torch.cuda.current_device())
        need = torch.tensor([self.oversize, self._want_slots], dtype=torch.int64, device=device)
        dist.all_reduce(need, op=dist.ReduceOp.MAX, group=self.group)
        oversize, slots = int(need[0]), int(need[1])
        if oversize > self.slot_bytes or slots > self.slots:
            self.mem = None  # every rank drained: nothing reads the old buffers
            self._want_slots = slots
            self._allocate(max(oversize, self.slot_bytes))
        self.oversize = 0
