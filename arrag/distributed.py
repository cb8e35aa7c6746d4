"""Coordination of several processes through torch.distributed: the one place multi-process stages wait for each
other (encode, build-index and its merge, construct-train).

Launched by `torchrun` or `accelerate launch` (RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set), a stage joins a
gloo process group (CPU or GPU machines alike; a group NCCL already runs gets a gloo group beside it): rank 0
decides and broadcasts, ranks exchange rows with all_to_all, records are gathered, and every wait is a
monitored barrier with a timeout (`--dist-timeout`, default 30 min) whose error names the ranks that did not
arrive. A rank that fails ends the job (torchrun's own behaviour). Without such a launcher (one process, or a
job array's `--shard i/n`) there is no group: nothing waits for anything.
"""

from __future__ import annotations

import datetime
import os
import re

import numpy as np

from arrag.errors import ArragError, one_line

DEFAULT_TIMEOUT = 30 * 60  # seconds

_joined: list[Group] = []  # the groups this process created, closed by leave()


def launched() -> bool:
    """True when a launcher (torchrun, accelerate launch) started this process as one of several."""
    env = os.environ
    return int(env.get("WORLD_SIZE", 1)) > 1 and "MASTER_ADDR" in env and "MASTER_PORT" in env


def parse_shard(spec: str | None) -> tuple[int, int]:
    """'i/n' -> (i, n); None -> from RANK/WORLD_SIZE (torchrun, accelerate launch) or (0, 1)."""
    if spec is None:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    m = re.fullmatch(r"(\d+)/(\d+)", spec.strip())
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise ArragError(f"--shard {spec!r}: expected i/n with 0 <= i < n, e.g. 0/4")
    return int(m.group(1)), int(m.group(2))


def join(shard: str | None, timeout: float = DEFAULT_TIMEOUT) -> tuple[Group | None, int, int]:
    """(group, rank, world) of this process: the launcher's process group when there is one and no --shard was
    given; else the --shard (or RANK/WORLD_SIZE) of an independent job-array process, with no group."""
    if shard is not None and launched():
        raise ArragError(f"--shard {shard} in one of {os.environ['WORLD_SIZE']} launched processes (torchrun, "
                         "accelerate launch): every one would take that same slice; launch the processes without "
                         "--shard (they split the work), or run one process per --shard i/n (a job array)")
    group = Group.from_env(timeout) if shard is None else None
    return (group, group.rank, group.world) if group is not None else (None, *parse_shard(shard))


class Group:
    """This process's place among the launched processes, and the collectives the stages use."""

    def __init__(self, timeout: float = DEFAULT_TIMEOUT):
        import torch.distributed as dist

        self.dist, self.timeout = dist, datetime.timedelta(seconds=timeout)
        self.owned = not dist.is_initialized()
        try:
            if self.owned:
                dist.init_process_group("gloo", timeout=self.timeout)
                self.pg = None  # the default group
            else:  # e.g. accelerate's NCCL group: coordination runs on a gloo group beside it
                self.pg = dist.new_group(backend="gloo", timeout=self.timeout)
        except Exception as e:  # a rendezvous that never completes, a port in use, ...
            raise ArragError(f"cannot join the process group at {os.environ.get('MASTER_ADDR')}:"
                             f"{os.environ.get('MASTER_PORT')} ({one_line(e, 160)}); start every rank with the same "
                             "launcher settings") from None
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if self.owned:
            if not _joined:  # a process that ends without leave() still closes its connections before teardown
                import atexit

                atexit.register(leave, False)
            _joined.append(self)

    @classmethod
    def from_env(cls, timeout: float = DEFAULT_TIMEOUT) -> Group | None:
        """The group when a launcher started several processes, else None."""
        if timeout <= 0:
            raise ArragError(f"--dist-timeout must be > 0 seconds, got {timeout}")
        return cls(timeout) if launched() else None

    def barrier(self, name: str) -> None:
        """Wait until every rank reaches `name`; past the timeout, one line naming the ranks that did not."""
        try:
            self.dist.monitored_barrier(group=self.pg, timeout=self.timeout, wait_all_ranks=True)
        except RuntimeError as e:
            missing = _ranks_in(str(e))
            if not missing and self.world == 2:  # a peer that closed its connection goes unnamed: of two, the other
                missing = [1 - self.rank]
            who = f"rank(s) {', '.join(map(str, missing))}" if missing else "another rank"
            wait = self.timeout.total_seconds()
            raise ArragError(f"{name}: {who} of {self.world} did not arrive within {wait:.0f} s (it failed or is "
                             "stuck; see its log), so this rank stops too") from None

    def _collective(self, what: str, fn):
        try:
            return fn()
        except RuntimeError as e:  # a peer that died mid-collective: gloo's connection errors
            raise ArragError(f"{what}: the process group broke ({one_line(e, 160)}); another rank failed or "
                             "stopped, see its log") from None

    def broadcast(self, obj, src: int = 0):
        """`obj` of rank `src`, on every rank."""
        box = [obj if self.rank == src else None]
        self._collective("broadcast", lambda: self.dist.broadcast_object_list(box, src=src, group=self.pg))
        return box[0]

    def all_gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        out = [None] * self.world
        self._collective("all_gather", lambda: self.dist.all_gather_object(out, obj, group=self.pg))
        return out

    def exchange(self, parts: list[np.ndarray]) -> list[np.ndarray]:
        """all_to_all: parts[r] (rows of one dtype and width, any count) goes to rank r; returns what each rank sent
        here, in rank order. Sizes travel first, so every rank knows what to receive."""
        import torch

        assert len(parts) == self.world
        dtype, width = parts[0].dtype, parts[0].shape[1:]
        row_bytes = dtype.itemsize * int(np.prod(width, dtype=np.int64))
        send_counts = torch.tensor([len(p) for p in parts], dtype=torch.int64)
        recv_counts = torch.empty(self.world, dtype=torch.int64)
        self._collective("all_to_all", lambda: self.dist.all_to_all_single(recv_counts, send_counts, group=self.pg))
        send = np.ascontiguousarray(np.concatenate(parts)).view(np.uint8).reshape(-1, row_bytes)
        out = torch.empty((int(recv_counts.sum()), row_bytes), dtype=torch.uint8)
        self._collective("all_to_all", lambda: self.dist.all_to_all_single(
            out, torch.from_numpy(send), output_split_sizes=recv_counts.tolist(),
            input_split_sizes=send_counts.tolist(), group=self.pg))
        got = out.numpy().view(dtype).reshape(-1, *width)
        bounds = np.concatenate([[0], np.cumsum(recv_counts.numpy())])
        return [got[bounds[r]:bounds[r + 1]] for r in range(self.world)]

    def close(self) -> None:
        if self.owned and self.dist.is_initialized():
            self.dist.destroy_process_group()


def leave(ok: bool) -> None:
    """Close the groups this process joined. After work that succeeded, a last barrier first, so no rank closes
    its connections while a peer still reads from them (gloo then aborts the peer: "terminate called without an
    active exception"); after a failure at once, as the other ranks may be gone."""
    while _joined:
        group = _joined.pop()
        if ok:
            try:
                group.barrier("leaving the process group")
            except ArragError:  # this rank's work is done and written; a peer that left early is its own error
                pass
        group.close()


def _ranks_in(message: str) -> list[int]:
    """The ranks a monitored_barrier error names ("Ranks 1, 2 failed to pass monitoredBarrier ...")."""
    m = re.search(r"[Rr]anks? ([\d, ]+) failed to pass", message)
    return [int(x) for x in re.findall(r"\d+", m.group(1))] if m else []

